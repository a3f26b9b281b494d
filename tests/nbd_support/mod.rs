//! Shared pieces of the NBD tests: a throwaway CA and node certificates
//! (rcgen), our server on loopback, images, and third-party tools.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use cinderblock::attach::nbd::{ClientTls, Target};
use cinderblock::export::{Access, ExportName, ExportServer, ExportSpec, ImageSource, Limits, SubjectAltNameIsNode, TlsSetup};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};

pub const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A tool the test needs: present, or the test cannot run. Under CI=true a
/// missing tool fails the test; elsewhere the test says so and passes.
pub fn have(tool: &str) -> bool {
    let found = std::env::var_os("PATH").map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file())).unwrap_or(false);
    if !found {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{tool} is missing; scripts/test-all.sh installs it (nbdkit, libnbd-bin, qemu-utils, fio)");
        }
        eprintln!("SKIPPED: {tool} is not installed");
    }
    found
}

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub struct Leaf {
    pub cert: CertificateDer<'static>,
    pub cert_pem: String,
    pub key_der: Vec<u8>,
    pub key_pem: String,
}

impl Leaf {
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

/// A cluster CA for one test with certificates for the server and nodes.
pub struct Pki {
    pub ca_cert: CertificateDer<'static>,
    pub ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    pub fn new() -> Pki {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "cinderblock test CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let cert = params.self_signed(&key).unwrap();
        Pki { ca_cert: cert.der().clone(), ca_pem: cert.pem(), issuer: Issuer::new(params, key) }
    }

    /// A certificate naming `names` (DNS names or IP addresses), good for
    /// both ends of TLS.
    pub fn leaf(&self, names: &[&str]) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf { cert: cert.der().clone(), cert_pem: cert.pem(), key_der: key.serialize_der(), key_pem: key.serialize_pem() }
    }

    pub fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_cert.clone()).unwrap();
        roots
    }

    /// Our server's TLS: a certificate for localhost/127.0.0.1, client
    /// certificates required and checked against the CA.
    pub fn server_tls(&self) -> TlsSetup {
        let leaf = self.leaf(&["localhost", "127.0.0.1"]);
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(self.roots()), provider()).build().unwrap();
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![leaf.cert.clone()], leaf.key())
            .unwrap();
        TlsSetup { config: cinderblock::export::ServerConfigSource::Fixed(Arc::new(config)), peer_check: Arc::new(SubjectAltNameIsNode) }
    }

    /// Our client's TLS as node `node` (no client certificate with None).
    pub fn client_tls(&self, node: Option<&str>) -> ClientTls {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(self.roots());
        let config = match node {
            Some(n) => {
                let leaf = self.leaf(&[n]);
                builder.with_client_auth_cert(vec![leaf.cert.clone()], leaf.key()).unwrap()
            }
            None => builder.with_no_client_auth(),
        };
        ClientTls { config: Arc::new(config), server_name: ServerName::try_from("localhost").unwrap().to_owned() }
    }

    /// Files for GnuTLS-based peers (libnbd, qemu, nbdkit): `ca-cert.pem`,
    /// and `<role>-cert.pem` / `<role>-key.pem` for client and server.
    pub fn write_gnutls_dir(&self, dir: &Path, client_node: &str) {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("ca-cert.pem"), &self.ca_pem).unwrap();
        let client = self.leaf(&[client_node]);
        std::fs::write(dir.join("client-cert.pem"), &client.cert_pem).unwrap();
        std::fs::write(dir.join("client-key.pem"), &client.key_pem).unwrap();
        let server = self.leaf(&["localhost", "127.0.0.1"]);
        std::fs::write(dir.join("server-cert.pem"), &server.cert_pem).unwrap();
        std::fs::write(dir.join("server-key.pem"), &server.key_pem).unwrap();
    }
}

/// A sparse image file in a temporary folder under /var/tmp (a real disk
/// filesystem: O_DIRECT and SEEK_HOLE behave as in a pool).
pub struct TestImage {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl TestImage {
    pub fn new(size: u64) -> TestImage {
        let dir = tempfile::Builder::new().prefix("cinderblock-nbd-").tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("volume.img");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(size).unwrap();
        TestImage { dir, path }
    }
}

/// Our server on 127.0.0.1 (a free port), on its own runtime thread; it
/// stops when this is dropped.
pub struct TestServer {
    pub server: ExportServer,
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServer {
    pub fn start(tls: Option<TlsSetup>, limits: Limits) -> TestServer {
        TestServer::start_on(SocketAddr::new(LOOPBACK, 0), tls, limits)
    }

    /// On a given address (a restarted server takes its predecessor's).
    pub fn start_on(bind: SocketAddr, tls: Option<TlsSetup>, limits: Limits) -> TestServer {
        let server = ExportServer::new(tls, limits);
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let s = server.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = bind_retrying(bind).await;
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                s.serve(listener, async move {
                    let _ = stop_rx.await;
                })
                .await;
            });
            rt.shutdown_timeout(Duration::from_secs(2));
        });
        let addr = addr_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        TestServer { server, addr, stop: Some(stop), thread: Some(thread) }
    }

    /// Export `image` to `node`, also in plain text from loopback when `plain`.
    pub fn export(&self, image: &Path, node: &str, plain: bool) -> ExportName {
        self.export_named(image, ExportName::random(), node, plain)
    }

    pub fn export_named(&self, image: &Path, name: ExportName, node: &str, plain: bool) -> ExportName {
        self.server
            .add(ExportSpec {
                name,
                volume: format!("vol-{}", &name.to_string()[..8]),
                image: ImageSource::Path(image.to_path_buf()),
                read_only: false,
                access: Access { node: node.into(), plain_from: if plain { vec![LOOPBACK] } else { vec![] } },
                changes: None,
            })
            .unwrap();
        name
    }

    pub fn target(&self, name: &ExportName, tls: Option<ClientTls>) -> Target {
        Target { address: self.addr.to_string(), export: name.to_string(), tls }
    }

    pub fn uri(&self, name: &ExportName) -> String {
        format!("nbd://127.0.0.1:{}/{}", self.addr.port(), name)
    }
}

async fn bind_retrying(addr: SocketAddr) -> tokio::net::TcpListener {
    let started = std::time::Instant::now();
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(e) if started.elapsed() < Duration::from_secs(10) => {
                eprintln!("binding {addr}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("cannot bind {addr}: {e}"),
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Run a program, returning stdout; panics with stderr when it fails.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run a program that must fail; returns its stderr.
pub fn run_fails(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(!out.status.success(), "{cmd:?} succeeded but should have been refused");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

/// Deterministic test data.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
