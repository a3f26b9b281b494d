//! The NBD server that serves a pool's images to other nodes (Cinder's
//! `create_export`). One server per agent, one TCP listener, exports added
//! and removed at run time. See docs/nbd.md for the protocol subset, the
//! limits and the access rules.
//!
//! Access: an export names the one node allowed to open it. Over TLS the
//! client's certificate (already verified against the cluster CA by the
//! rustls `ServerConfig`) must name that node, as `PeerCheck` decides; a
//! plain-text connection is accepted only from the addresses listed in
//! `Access::plain_from` (the kernel engine without kernel TLS; loopback in
//! tests). An export's name is 128 random bits and is never listed to a peer
//! that may not open it.

pub mod image;
pub mod metrics;
pub mod proto;

#[doc(hidden)]
pub mod fuzzing;
mod handshake;
mod transmission;
mod uring;

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, RwLock};
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use self::image::Image;
use self::metrics::{ExportMetrics, VolumeStats};

/// The process's export metrics, registered in `crate::metrics::METRICS`.
pub static METRICS: LazyLock<ExportMetrics> = LazyLock::new(|| crate::metrics::METRICS.export.clone());

/// An export's name: 128 random bits, written as 32 hex digits. Knowing it
/// is not enough to open the export, but it is never shown to others.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExportName([u8; 16]);

impl ExportName {
    pub fn random() -> ExportName {
        ExportName(rand::random())
    }
    pub fn parse(s: &str) -> Option<ExportName> {
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut out = [0u8; 16];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(ExportName(out))
    }
}

impl fmt::Display for ExportName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ExportName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Logs show a prefix only: the whole name is a capability.
        write!(f, "ExportName({}…)", &self.to_string()[..8])
    }
}

/// Who may open an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    /// The consuming node; a TLS client's certificate must name it.
    pub node: String,
    /// Addresses allowed to open the export without TLS (empty: TLS only).
    pub plain_from: Vec<IpAddr>,
}

/// Where the image comes from: a handle the volume manager opened (the
/// normal case), or a path to open read-write (tests and tools).
pub enum ImageSource {
    File(File),
    Path(PathBuf),
}

pub struct ExportSpec {
    pub name: ExportName,
    /// Volume (or snapshot) ID, for logs and metric labels.
    pub volume: String,
    pub image: ImageSource,
    pub read_only: bool,
    pub access: Access,
    /// A migration pass's export: served as a layer of these changes over
    /// the previous pass's snapshot (`Image::extents`).
    pub changes: Option<Arc<Vec<crate::volume::changes::Changed>>>,
}

/// Decides whether a TLS peer's verified certificate names a node.
pub trait PeerCheck: Send + Sync {
    fn names_node(&self, end_entity: &CertificateDer<'_>, node: &str) -> bool;
}

/// The default check: the certificate's subjectAltName holds the node name
/// as a DNS name (checked with webpki).
pub struct SubjectAltNameIsNode;

impl PeerCheck for SubjectAltNameIsNode {
    fn names_node(&self, end_entity: &CertificateDer<'_>, node: &str) -> bool {
        let Ok(cert) = webpki::EndEntityCert::try_from(end_entity) else { return false };
        let Ok(name) = rustls::pki_types::ServerName::try_from(node) else { return false };
        cert.verify_is_valid_for_subject_name(&name).is_ok()
    }
}

#[derive(Clone)]
pub struct TlsSetup {
    /// Must verify client certificates against the cluster CA.
    pub config: ServerConfigSource,
    pub peer_check: Arc<dyn PeerCheck>,
}

/// Where each TLS handshake gets its server configuration: a fixed one
/// (tools, tests), or the node's certificate folder, read again when its
/// files change (`crate::tls`), so rotated certificates need no restart.
#[derive(Clone)]
pub enum ServerConfigSource {
    Fixed(Arc<rustls::ServerConfig>),
    Reloading(Arc<crate::tls::ServerTls>),
}

impl ServerConfigSource {
    pub fn current(&self) -> Result<Arc<rustls::ServerConfig>, rustls::Error> {
        match self {
            ServerConfigSource::Fixed(c) => Ok(c.clone()),
            ServerConfigSource::Reloading(t) => t.config(),
        }
    }
}

/// Our cluster's check: the certificate (already verified against the
/// cluster CA) names the node as `<node>.node.cinderblock.dev`.
pub struct CinderblockNodeName;

impl PeerCheck for CinderblockNodeName {
    fn names_node(&self, end_entity: &CertificateDer<'_>, node: &str) -> bool {
        crate::tls::peers_of(end_entity).contains(&crate::tls::Peer::Node(node.to_string()))
    }
}

/// Bounds that keep one client from taking more than its share.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest READ or WRITE payload (NBD_INFO_BLOCK_SIZE maximum).
    pub max_payload: u32,
    /// Requests being served at once on one connection; past this the server
    /// stops reading from that connection.
    pub max_in_flight: usize,
    /// Payload bytes held at once by one connection's requests.
    pub max_bytes_in_flight: usize,
    /// Time allowed for the whole handshake.
    pub handshake_timeout: Duration,
    /// A reply that makes no progress for this long (a client that stopped
    /// reading) closes the connection.
    pub stall_timeout: Duration,
    /// Connections open at once, all exports together.
    pub max_connections: usize,
    /// O_DIRECT for aligned requests (see `image`).
    pub direct_io: bool,
    /// Submit reads and writes with io_uring where the kernel allows it;
    /// false: always on the blocking pool (what happens anyway where a
    /// seccomp profile refuses io_uring).
    pub io_uring: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_payload: 32 << 20,
            max_in_flight: 128,
            max_bytes_in_flight: 64 << 20,
            handshake_timeout: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(60),
            max_connections: 1024,
            direct_io: true,
            io_uring: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("cannot open image {path} for export: {error}")]
    Open { path: PathBuf, error: std::io::Error },
    #[error("cannot read the size of the image of volume {volume}: {error}")]
    Size { volume: String, error: std::io::Error },
    #[error("an export with this name already exists for volume {existing}, not {requested}")]
    NameTaken { existing: String, requested: String },
}

/// A served image.
pub(crate) struct Export {
    pub name: ExportName,
    pub volume: String,
    pub image: Arc<Image>,
    pub size: AtomicU64,
    pub read_only: bool,
    pub access: Access,
    pub stats: VolumeStats,
    pub connections: AtomicUsize,
    /// Becomes true when the export is removed: its connections close.
    pub removed: watch::Sender<bool>,
}

impl Export {
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        use proto::*;
        let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_CAN_MULTI_CONN;
        if self.read_only {
            f |= FLAG_READ_ONLY;
        } else {
            f |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
        }
        if structured {
            f |= FLAG_SEND_DF;
        }
        f
    }
}

/// What `list` shows of an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub name: ExportName,
    pub volume: String,
    pub size: u64,
    pub read_only: bool,
    pub access: Access,
    pub connections: usize,
}

pub(crate) struct Shared {
    pub exports: RwLock<HashMap<ExportName, Arc<Export>>>,
    pub tls: Option<TlsSetup>,
    pub limits: Limits,
    pub connections: AtomicUsize,
}

impl Shared {
    pub fn get(&self, name: &str) -> Option<Arc<Export>> {
        let name = ExportName::parse(name)?;
        self.exports.read().unwrap_or_else(|p| p.into_inner()).get(&name).cloned()
    }
    pub fn all(&self) -> Vec<Arc<Export>> {
        self.exports.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }
}

/// The server: a registry of exports and the loop that serves them.
#[derive(Clone)]
pub struct ExportServer {
    shared: Arc<Shared>,
}

impl ExportServer {
    pub fn new(tls: Option<TlsSetup>, limits: Limits) -> ExportServer {
        ExportServer { shared: Arc::new(Shared { exports: RwLock::default(), tls, limits, connections: AtomicUsize::new(0) }) }
    }

    /// Serve `spec`. Adding the same name for the same volume again is a
    /// no-op (idempotent); the same name for another volume is an error.
    pub fn add(&self, spec: ExportSpec) -> Result<ExportInfo, ExportError> {
        if let Some(existing) = self.shared.exports.read().unwrap_or_else(|p| p.into_inner()).get(&spec.name) {
            return if existing.volume == spec.volume {
                Ok(info(existing))
            } else {
                Err(ExportError::NameTaken { existing: existing.volume.clone(), requested: spec.volume })
            };
        }
        let file = match spec.image {
            ImageSource::File(f) => f,
            ImageSource::Path(path) => std::fs::OpenOptions::new()
                .read(true)
                .write(!spec.read_only)
                .open(&path)
                .map_err(|error| ExportError::Open { path, error })?,
        };
        let image = Image::new(file, self.shared.limits.direct_io).with_changes(spec.changes);
        let size = image.size_bytes().map_err(|error| ExportError::Size { volume: spec.volume.clone(), error })?;
        let export = Arc::new(Export {
            name: spec.name,
            stats: METRICS.for_volume(&spec.volume),
            volume: spec.volume,
            image: Arc::new(image),
            size: AtomicU64::new(size),
            read_only: spec.read_only,
            access: spec.access,
            connections: AtomicUsize::new(0),
            removed: watch::channel(false).0,
        });
        let mut exports = self.shared.exports.write().unwrap_or_else(|p| p.into_inner());
        let export = exports.entry(spec.name).or_insert(export).clone();
        info!(volume = %export.volume, node = %export.access.node, size, direct_io = export.image.uses_direct_io(), "export added");
        Ok(info(&export))
    }

    /// Stop serving an export and close its connections. True if it existed.
    pub fn remove(&self, name: &ExportName) -> bool {
        let removed = self.shared.exports.write().unwrap_or_else(|p| p.into_inner()).remove(name);
        match removed {
            Some(export) => {
                export.removed.send_replace(true);
                if !self.shared.all().iter().any(|e| e.volume == export.volume) {
                    METRICS.forget(&export.volume);
                }
                info!(volume = %export.volume, "export removed");
                true
            }
            None => false,
        }
    }

    /// The image grew (volume expansion): new connections see the new size.
    /// Returns the size now served.
    pub fn refresh_size(&self, name: &ExportName) -> Option<u64> {
        let export = self.shared.exports.read().unwrap_or_else(|p| p.into_inner()).get(name).cloned()?;
        let size = export.image.size_bytes().ok()?;
        export.size.store(size, Ordering::Release);
        Some(size)
    }

    pub fn list(&self) -> Vec<ExportInfo> {
        let mut out: Vec<ExportInfo> = self.shared.all().iter().map(|e| info(e)).collect();
        out.sort_by(|a, b| a.volume.cmp(&b.volume));
        out
    }

    /// Accept connections on `listener` until `shutdown` resolves.
    pub async fn serve(&self, listener: TcpListener, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        // Dropped when this loop ends: the connection threads then close
        // their connections, as tasks of this runtime would be dropped.
        let (_serving, serving) = watch::channel(());
        let addr = listener.local_addr().ok();
        info!(?addr, tls = self.shared.tls.is_some(), "NBD server listening");
        loop {
            let (stream, peer) = tokio::select! {
                _ = &mut shutdown => break,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: wait rather than spin.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            if self.shared.connections.load(Ordering::Relaxed) >= self.shared.limits.max_connections {
                warn!(%peer, "too many NBD connections; refusing");
                continue;
            }
            let _ = stream.set_nodelay(true);
            self.spawn_tcp_connection(stream, peer, serving.clone());
        }
    }

    /// Serve a TCP connection on a thread of its own with a single-threaded
    /// runtime: the connection's event loop, its socket's poller and its
    /// io_uring submissions then stay on one thread, so a completion wakes
    /// that thread only, with no hand-off between the workers of a shared
    /// runtime (docs/nbd.md, "I/O"; docs/benchmarks.md measured a small
    /// gain at best on a loaded two-vCPU machine). It
    /// ends with its connection, or when `serving`'s sender is dropped.
    fn spawn_tcp_connection(&self, stream: tokio::net::TcpStream, peer: SocketAddr, mut serving: watch::Receiver<()>) {
        let shared = self.shared.clone();
        // Out of this runtime's poller; the thread's runtime takes it.
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => return warn!(%peer, error = %e, "could not hand an NBD connection to its thread"),
        };
        shared.connections.fetch_add(1, Ordering::Relaxed);
        let thread_shared = shared.clone();
        let spawned = std::thread::Builder::new().name("nbd-connection".into()).spawn(move || {
            let shared = thread_shared;
            let result = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(ConnectionError::from).and_then(|rt| {
                rt.block_on(async {
                    let stream = tokio::net::TcpStream::from_std(stream)?;
                    tokio::select! {
                        r = serve_connection(&shared, Box::new(stream), peer) => r,
                        _ = serving.changed() => Ok(()),
                    }
                })
            });
            shared.connections.fetch_sub(1, Ordering::Relaxed);
            if let Err(e) = result {
                debug!(%peer, error = %e, "NBD connection closed");
            }
        });
        if let Err(e) = spawned {
            shared.connections.fetch_sub(1, Ordering::Relaxed);
            warn!(%peer, error = %e, "could not start a thread for an NBD connection");
        }
    }

    /// Serve one already-accepted connection (any byte stream; the fuzz
    /// target and tests use in-memory ones).
    pub fn spawn_connection<S>(&self, stream: S, peer: SocketAddr) -> tokio::task::JoinHandle<()>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let shared = self.shared.clone();
        shared.connections.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let result = serve_connection(&shared, Box::new(stream), peer).await;
            shared.connections.fetch_sub(1, Ordering::Relaxed);
            if let Err(e) = result {
                debug!(%peer, error = %e, "NBD connection closed");
            }
        })
    }

    /// Serve one connection to completion on the current task.
    pub async fn serve_stream<S>(&self, stream: S, peer: SocketAddr) -> Result<(), ConnectionError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        serve_connection(&self.shared, Box::new(stream), peer).await
    }
}

fn info(e: &Export) -> ExportInfo {
    ExportInfo {
        name: e.name,
        volume: e.volume.clone(),
        size: e.size.load(Ordering::Acquire),
        read_only: e.read_only,
        access: e.access.clone(),
        connections: e.connections.load(Ordering::Relaxed),
    }
}

/// Byte streams the server speaks over: TCP, TLS over TCP, in-memory pipes.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("handshake took longer than {0:?}")]
    HandshakeTimeout(Duration),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("peer refused: {0}")]
    Refused(String),
    #[error("client stopped reading replies for {0:?}")]
    Stalled(Duration),
}

async fn serve_connection(shared: &Arc<Shared>, stream: Box<dyn Stream>, peer: SocketAddr) -> Result<(), ConnectionError> {
    let timeout = shared.limits.handshake_timeout;
    let negotiated = match tokio::time::timeout(timeout, handshake::negotiate(shared, stream, peer)).await {
        Ok(r) => r?,
        Err(_) => return Err(ConnectionError::HandshakeTimeout(timeout)),
    };
    let Some(session) = negotiated else { return Ok(()) };
    transmission::serve(shared, session).await
}

/// Whether `peer` may open `export` on this connection.
pub(crate) fn allowed(shared: &Shared, export: &Export, peer: &SocketAddr, tls_peer: Option<&CertificateDer<'_>>) -> bool {
    match (tls_peer, &shared.tls) {
        (Some(cert), Some(tls)) => tls.peer_check.names_node(cert, &export.access.node),
        _ => export.access.plain_from.contains(&canonical_ip(peer.ip())),
    }
}

fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// TLS for a node's NBD server from its certificate folder (read again
/// when its files change): any node's certificate opens the handshake, each
/// export then admits only the node it names; no session tickets.
pub fn node_tls(dir: Arc<crate::tls::TlsDir>) -> TlsSetup {
    TlsSetup { config: ServerConfigSource::Reloading(crate::tls::ServerTls::for_nbd(dir)), peer_check: Arc::new(CinderblockNodeName) }
}

/// `config` sending no TLS 1.3 session tickets: a consumer on the kernel
/// engine hands its session to kernel TLS after GO, and the kernel takes
/// application data only (docs/nbd.md).
pub fn without_session_tickets(mut config: rustls::ServerConfig) -> rustls::ServerConfig {
    config.send_tls13_tickets = 0;
    config
}

/// A node's NBD server for its pool: TLS with the node's certificate folder
/// (`node_tls`), the exports kept on disk served again, and the listener
/// served until the process stops.
pub fn serve_pool(
    pool: Arc<crate::volume::Pool>,
    tls_dir: Arc<crate::tls::TlsDir>,
    listener: TcpListener,
    address: String,
) -> std::io::Result<Arc<crate::agent::exports::Exports>> {
    let server = ExportServer::new(Some(node_tls(tls_dir)), Limits::default());
    let exports = Arc::new(crate::agent::exports::Exports::open(pool, server.clone(), address)?);
    tokio::spawn(async move { server.serve(listener, crate::server::shutdown_signal()).await });
    Ok(exports)
}
