//! The calling side: a tonic connector that opens TCP, presents our
//! certificate and accepts the server only when its certificate, from the
//! cluster CA, names the node we meant to reach. A changed address can
//! therefore not put another node (or anyone else) in that node's place.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::files::TlsDir;
use super::{Peer, TlsError};

/// Said by every connection failure: the request never left.
pub const NOT_CONNECTED: &str = "could not connect to";

/// True when a call failed before any of it was sent (no connection).
pub fn never_sent(s: &tonic::Status) -> bool {
    s.message().contains(NOT_CONNECTED)
}

/// Connects to the agent of one node.
#[derive(Clone)]
pub struct AgentConnector {
    dir: Arc<TlsDir>,
    server_name: ServerName<'static>,
    alpn: Vec<Vec<u8>>,
}

impl AgentConnector {
    /// A connector that accepts only `peer`'s certificate.
    pub fn new(dir: Arc<TlsDir>, peer: &Peer, alpn: Vec<Vec<u8>>) -> Result<AgentConnector, TlsError> {
        let name = peer.dns_name()?;
        let server_name = ServerName::try_from(name.clone()).map_err(|e| TlsError::Invalid(format!("{name}: {e}")))?;
        Ok(AgentConnector { dir, server_name, alpn })
    }

    /// A fresh client config from the folder's current certificates.
    pub fn config(&self) -> Result<Arc<ClientConfig>, rustls::Error> {
        let m = self.dir.current();
        let mut cfg = ClientConfig::builder_with_provider(super::provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(m.roots.clone())
            .with_client_auth_cert(m.chain.clone(), m.key.clone_key())?;
        cfg.alpn_protocols = self.alpn.clone();
        Ok(Arc::new(cfg))
    }

    /// Open a verified TLS connection to `addr` ("host:port"). Errors say
    /// `NOT_CONNECTED`: nothing of any request was sent.
    pub async fn connect(&self, addr: &str) -> std::io::Result<TlsStream<TcpStream>> {
        let fail = |e: std::io::Error| std::io::Error::new(e.kind(), format!("{NOT_CONNECTED} {addr}: {e}"));
        let cfg = self.config().map_err(|e| fail(std::io::Error::other(e)))?;
        let tcp = TcpStream::connect(addr).await.map_err(fail)?;
        let _ = tcp.set_nodelay(true);
        tokio_rustls::TlsConnector::from(cfg).connect(self.server_name.clone(), tcp).await.map_err(fail)
    }
}

impl tower::Service<http::Uri> for AgentConnector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let host = uri.host().ok_or_else(|| std::io::Error::other(format!("{uri} names no host")))?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let port = uri.port_u16().unwrap_or(443);
            let addr = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
            Ok(TokioIo::new(this.connect(&addr).await?))
        })
    }
}
