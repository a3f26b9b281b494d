//! The serving side: a TLS acceptor that demands a client certificate from
//! the cluster CA naming an allowed peer, and a stream of verified
//! connections for tonic (`serve_with_incoming`). A peer that fails the
//! check never completes the handshake, so no request of it is ever read.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tracing::{debug, info};

use super::files::TlsDir;
use super::{peers_of, Peer};

/// How long a client may take to finish its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Which client certificates a server accepts (beyond coming from the CA).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerRule {
    /// Only the controller (the agent API).
    Controller,
    /// Any node; the service checks which one per request (NBD exports).
    AnyNode,
}

impl PeerRule {
    fn admits(&self, peers: &[Peer]) -> bool {
        match self {
            PeerRule::Controller => peers.contains(&Peer::Controller),
            PeerRule::AnyNode => peers.iter().any(|p| matches!(p, Peer::Node(_))),
        }
    }
}

/// Who is on the other end of a verified connection; tonic puts it in
/// every request's extensions.
#[derive(Debug, Clone)]
pub struct PeerInfo {
    pub remote: Option<SocketAddr>,
    pub peers: Vec<Peer>,
}

/// Chain verification by webpki against the current CA, then the name rule.
#[derive(Debug)]
struct NamedClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    rule: PeerRule,
}

impl ClientCertVerifier for NamedClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn client_auth_mandatory(&self) -> bool {
        true
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ok = self.inner.verify_client_cert(end_entity, intermediates, now)?;
        let peers = peers_of(end_entity);
        if !self.rule.admits(&peers) {
            return Err(rustls::Error::General(format!("client certificate names {peers:?}; this server admits {:?} only", self.rule)));
        }
        Ok(ok)
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Server TLS over a certificate folder: the config is rebuilt when the
/// folder's certificates change.
pub struct ServerTls {
    dir: Arc<TlsDir>,
    rule: PeerRule,
    alpn: Vec<Vec<u8>>,
    /// Send TLS 1.3 session tickets after the handshake (rustls' default).
    session_tickets: bool,
    cached: Mutex<Option<(u64, Arc<ServerConfig>)>>,
}

impl ServerTls {
    pub fn new(dir: Arc<TlsDir>, rule: PeerRule, alpn: Vec<Vec<u8>>) -> Arc<ServerTls> {
        Arc::new(ServerTls { dir, rule, alpn, session_tickets: true, cached: Mutex::new(None) })
    }

    /// For NBD exports: any node's certificate opens the handshake, and no
    /// session tickets are sent, since a consumer may hand its session to
    /// kernel TLS, which takes application data only (`attach::nbd::ktls`).
    pub fn for_nbd(dir: Arc<TlsDir>) -> Arc<ServerTls> {
        Arc::new(ServerTls { dir, rule: PeerRule::AnyNode, alpn: vec![], session_tickets: false, cached: Mutex::new(None) })
    }

    /// The config for the next handshake.
    pub fn config(&self) -> Result<Arc<ServerConfig>, rustls::Error> {
        let m = self.dir.current();
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((generation, cfg)) = &*cached {
            if *generation == m.generation {
                return Ok(cfg.clone());
            }
        }
        let provider = super::provider();
        let inner = WebPkiClientVerifier::builder_with_provider(m.roots.clone(), provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        let verifier = Arc::new(NamedClientVerifier { inner, rule: self.rule.clone() });
        let mut cfg = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(m.chain.clone(), m.key.clone_key())?;
        cfg.alpn_protocols = self.alpn.clone();
        if !self.session_tickets {
            cfg.send_tls13_tickets = 0;
        }
        let cfg = Arc::new(cfg);
        *cached = Some((m.generation, cfg.clone()));
        Ok(cfg)
    }

    /// Handshake with one accepted connection.
    pub async fn accept(&self, tcp: TcpStream) -> std::io::Result<TlsConn> {
        let remote = tcp.peer_addr().ok();
        let cfg = self.config().map_err(std::io::Error::other)?;
        let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, tokio_rustls::TlsAcceptor::from(cfg).accept(tcp))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        let peers = stream.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| peers_of(c)).unwrap_or_default();
        Ok(TlsConn { inner: stream, info: PeerInfo { remote, peers } })
    }
}

/// A verified connection.
pub struct TlsConn {
    inner: TlsStream<TcpStream>,
    info: PeerInfo,
}

impl TlsConn {
    pub fn peer(&self) -> &PeerInfo {
        &self.info
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

/// Accept on `listener`, handshake each connection on its own task (a slow
/// or hostile client holds up nobody), and yield the verified ones. Refused
/// handshakes are logged with the peer's address and the reason.
pub fn serve_incoming(listener: TcpListener, tls: Arc<ServerTls>) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsConn>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, addr) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    debug!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            let _ = tcp.set_nodelay(true);
            let (tls, tx) = (tls.clone(), tx.clone());
            tokio::spawn(async move {
                match tls.accept(tcp).await {
                    Ok(conn) => {
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Err(e) => info!(peer = %addr, error = %e, "refused a connection: TLS handshake failed"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
