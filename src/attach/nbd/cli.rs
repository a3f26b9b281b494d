//! `cinderblock nbd ...`: the NBD parts on their own, for operators, the
//! interop and benchmark scripts, and the kernel test bed.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::export::{Access, ExportName, ExportServer, ExportSpec, ImageSource, Limits, SubjectAltNameIsNode, TlsSetup};

#[derive(clap::Subcommand)]
pub enum NbdCommand {
    /// Serve one image over NBD until interrupted; prints the export name.
    Serve(ServeArgs),
}

#[derive(clap::Args)]
pub struct ServeArgs {
    /// The image file to export.
    #[arg(long)]
    pub image: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:10809")]
    pub listen: SocketAddr,
    /// Export name (32 hex digits); random when left out.
    #[arg(long)]
    pub name: Option<String>,
    /// The node allowed to open the export over TLS.
    #[arg(long, default_value = "")]
    pub node: String,
    /// Addresses allowed to open the export without TLS.
    #[arg(long, value_delimiter = ',')]
    pub plain_from: Vec<IpAddr>,
    /// PEM files for TLS: server certificate chain, its key, and the CA that signs client certificates.
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    #[arg(long)]
    pub read_only: bool,
    /// Use the page cache for every request instead of O_DIRECT.
    #[arg(long)]
    pub buffered: bool,
}

pub async fn run(command: NbdCommand) -> Result<(), String> {
    match command {
        NbdCommand::Serve(a) => serve(a).await,
    }
}

/// A rustls server configuration that requires client certificates signed
/// by the CA in `ca`.
pub fn server_tls_from_pem(cert: &PathBuf, key: &PathBuf, ca: &PathBuf) -> Result<TlsSetup, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<_, _>>())
        .map_err(|e| format!("reading certificates from {}: {e}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("reading key {}: {e}", key.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).map_err(|e| format!("reading CA {}: {e}", ca.display()))? {
        roots.add(c.map_err(|e| format!("reading CA {}: {e}", ca.display()))?).map_err(|e| e.to_string())?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| e.to_string())?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| e.to_string())?;
    Ok(TlsSetup { config: Arc::new(config), peer_check: Arc::new(SubjectAltNameIsNode) })
}

async fn serve(a: ServeArgs) -> Result<(), String> {
    let tls = match (&a.tls_cert, &a.tls_key, &a.tls_ca) {
        (Some(c), Some(k), Some(ca)) => Some(server_tls_from_pem(c, k, ca)?),
        _ => None,
    };
    let name = match &a.name {
        Some(n) => ExportName::parse(n).ok_or("--name must be 32 hex digits")?,
        None => ExportName::random(),
    };
    let server = ExportServer::new(tls, Limits { direct_io: !a.buffered, ..Limits::default() });
    server
        .add(ExportSpec {
            name,
            volume: "cli".into(),
            image: ImageSource::Path(a.image.clone()),
            read_only: a.read_only,
            access: Access { node: a.node.clone(), plain_from: a.plain_from.clone() },
        })
        .map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind(a.listen).await.map_err(|e| format!("listening on {}: {e}", a.listen))?;
    println!("export {name} on {}", listener.local_addr().map_err(|e| e.to_string())?);
    server.serve(listener, crate::server::shutdown_signal()).await;
    Ok(())
}
