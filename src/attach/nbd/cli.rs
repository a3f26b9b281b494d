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
    /// Attach an export as a local block device and print its path. The
    /// kernel engine returns at once (or, with --supervise, stays to
    /// reconfigure the device when the server comes back); the FUSE engine
    /// serves in the foreground until interrupted, then detaches.
    Attach(AttachArgs),
    /// Disconnect kernel nbd device N.
    Detach {
        #[arg(long)]
        index: u32,
    },
    /// Give kernel nbd device N new connections and the export's current size.
    Reconfigure {
        #[arg(long)]
        index: u32,
        #[arg(long)]
        address: String,
        #[arg(long)]
        export: String,
        #[arg(long, default_value_t = 2)]
        connections: usize,
    },
    /// Tell kernel nbd device N the export's current size (it grew).
    Resize {
        #[arg(long)]
        index: u32,
        #[arg(long)]
        address: String,
        #[arg(long)]
        export: String,
    },
    /// List kernel nbd devices and whether each is connected.
    Status,
}

#[derive(clap::Args)]
pub struct AttachArgs {
    /// host:port of the NBD server.
    #[arg(long)]
    pub address: String,
    /// Export name.
    #[arg(long)]
    pub export: String,
    /// kernel or fuse.
    #[arg(long, default_value = "kernel", value_parser = ["kernel", "fuse"])]
    pub engine: String,
    /// TCP connections (kernel engine).
    #[arg(long, default_value_t = 2)]
    pub connections: usize,
    /// Seconds the kernel device waits for new connections after losing them.
    #[arg(long, default_value_t = 120)]
    pub dead_connection_timeout: u64,
    /// Kernel engine: stay and reconfigure the device when its connections die.
    #[arg(long)]
    pub supervise: bool,
    /// FUSE engine: folder for the FUSE mount.
    #[arg(long, default_value = "/run/cinderblock/nbd")]
    pub state_dir: PathBuf,
    /// This node's certificate folder (ca.crt, tls.crt, tls.key): connect
    /// over TLS (the kernel engine then hands the session to kernel TLS).
    #[arg(long, requires = "owner")]
    pub tls_dir: Option<PathBuf>,
    /// With --tls-dir: the node serving the export (its certificate must name it).
    #[arg(long)]
    pub owner: Option<String>,
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
    /// TLS from a node's certificate folder (ca.crt, tls.crt, tls.key) as the
    /// agent serves it: client certificates must name the node --node.
    #[arg(long, conflicts_with = "tls_cert")]
    pub tls_dir: Option<PathBuf>,
    #[arg(long)]
    pub read_only: bool,
    /// Use the page cache for every request instead of O_DIRECT.
    #[arg(long)]
    pub buffered: bool,
}

pub async fn run(command: NbdCommand) -> Result<(), String> {
    use super::kernel;
    match command {
        NbdCommand::Serve(a) => serve(a).await,
        NbdCommand::Attach(a) => attach(a).await,
        NbdCommand::Detach { index } => kernel::disconnect(index).await.map_err(|e| e.to_string()),
        NbdCommand::Reconfigure { index, address, export, connections } => {
            let opts = kernel::KernelOptions { connections, ..Default::default() };
            let target = super::Target { address, export: export.clone(), tls: None };
            let size = kernel::reconfigure(index, &target, &opts, &export).await.map_err(|e| e.to_string())?;
            println!("/dev/nbd{index} {size}");
            Ok(())
        }
        NbdCommand::Resize { index, address, export } => {
            let target = super::Target { address, export: export.clone(), tls: None };
            let size = kernel::resize(index, &target, &export).await.map_err(|e| e.to_string())?;
            println!("/dev/nbd{index} {size}");
            Ok(())
        }
        NbdCommand::Status => {
            for (index, connected) in kernel::status().await.map_err(|e| e.to_string())? {
                println!("/dev/nbd{index} {}", if connected { "connected" } else { "free" });
            }
            Ok(())
        }
    }
}

async fn attach(a: AttachArgs) -> Result<(), String> {
    use super::kernel;
    let dir = match &a.tls_dir {
        Some(d) => Some(crate::tls::TlsDir::open(d).map_err(|e| format!("certificate folder {}: {e}", d.display()))?),
        None => None,
    };
    let owner = a.owner.clone().unwrap_or_default();
    if a.engine == "fuse" {
        let tls = dir.map(|d| super::tls_to_node(d, &owner)).transpose()?;
        let target = super::Target { address: a.address, export: a.export, tls };
        let att = super::fuse::FuseAttachment::attach(target, &a.state_dir, Default::default(), false).await.map_err(|e| e.to_string())?;
        println!("{}", att.device.path.display());
        crate::server::shutdown_signal().await;
        return att.detach().await.map_err(|e| e.to_string());
    }
    let opts = kernel::KernelOptions {
        connections: a.connections,
        dead_connection_timeout: std::time::Duration::from_secs(a.dead_connection_timeout),
        ..Default::default()
    };
    // Listen before connecting so no notification is missed.
    let watcher = if a.supervise { Some(kernel::LinkDeadWatcher::open().map_err(|e| e.to_string())?) } else { None };
    let tls = dir.as_deref().map(|d| super::kernel_tls_to_node(d, &owner)).transpose()?;
    let target = super::Target { address: a.address.clone(), export: a.export.clone(), tls };
    let dev = kernel::connect(&target, &opts, &a.export).await.map_err(|e| e.to_string())?;
    println!("{}", dev.path.display());
    let Some(watcher) = watcher else { return Ok(()) };
    let watcher = std::sync::Arc::new(watcher);
    loop {
        let w = watcher.clone();
        let next = tokio::task::spawn_blocking(move || w.next(std::time::Duration::from_secs(1)));
        let dead = tokio::select! {
            _ = crate::server::shutdown_signal() => return Ok(()),
            r = next => r.map_err(|e| e.to_string())?.map_err(|e| e.to_string())?,
        };
        if dead != Some(dev.index) {
            continue;
        }
        tracing::warn!(device = dev.index, "NBD connection lost; reconnecting");
        let tls = dir.as_deref().map(|d| super::kernel_tls_to_node(d, &owner)).transpose()?;
        let target = super::Target { tls, ..target.clone() };
        kernel::reconnect(dev.index, &target, &opts, &a.export).await.map_err(|e| format!("/dev/nbd{} lost its server: {e}", dev.index))?;
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
    let config = crate::export::without_session_tickets(config);
    Ok(TlsSetup { config: crate::export::ServerConfigSource::Fixed(Arc::new(config)), peer_check: Arc::new(SubjectAltNameIsNode) })
}

async fn serve(a: ServeArgs) -> Result<(), String> {
    let tls = match (&a.tls_cert, &a.tls_key, &a.tls_ca, &a.tls_dir) {
        (Some(c), Some(k), Some(ca), _) => Some(server_tls_from_pem(c, k, ca)?),
        (_, _, _, Some(d)) => {
            let dir = crate::tls::TlsDir::open(d).map_err(|e| format!("certificate folder {}: {e}", d.display()))?;
            Some(crate::export::node_tls(dir))
        }
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
            changes: None,
        })
        .map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind(a.listen).await.map_err(|e| format!("listening on {}: {e}", a.listen))?;
    println!("export {name} on {}", listener.local_addr().map_err(|e| e.to_string())?);
    server.serve(listener, crate::server::shutdown_signal()).await;
    Ok(())
}
