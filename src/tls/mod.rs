//! Mutual TLS between the controller and the node agents (and, later, NBD
//! exports): one cluster CA; each node's certificate names its node, the
//! controller's names the controller. See docs/security.md.
//!
//! Identities are DNS names in the certificate's subject alternative names:
//! `<node-id>.node.cinderblock.dev` for a node (server and client use) and
//! `controller.cinderblock.dev` for the controller (client use only). A
//! certificate folder holds `ca.crt`, `tls.crt` and `tls.key` (the layout of
//! a Kubernetes TLS Secret), and is read again whenever its files change, so
//! rotated certificates are used without a restart.

pub mod authority;
pub mod client;
pub mod files;
pub mod server;

pub use authority::Authority;
pub use client::AgentConnector;
pub use files::TlsDir;
pub use server::{serve_incoming, PeerInfo, PeerRule, ServerTls};

/// The suffix of every node's certificate name.
pub const NODE_NAME_SUFFIX: &str = ".node.cinderblock.dev";
/// The controller's certificate name.
pub const CONTROLLER_NAME: &str = "controller.cinderblock.dev";

/// Who a certificate speaks for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Peer {
    Controller,
    Node(String),
}

impl Peer {
    /// The DNS name this peer's certificate carries.
    pub fn dns_name(&self) -> Result<String, TlsError> {
        match self {
            Peer::Controller => Ok(CONTROLLER_NAME.to_string()),
            Peer::Node(id) => node_dns_name(id),
        }
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Controller => f.write_str("the controller"),
            Peer::Node(id) => write!(f, "node {id}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("node ID {id:?} cannot be named in a certificate: {reason} (node IDs are Kubernetes node names: lowercase letters, digits, '-' and '.')")]
    BadNodeId { id: String, reason: &'static str },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("certificate authority: {0}")]
    Authority(String),
}

/// `<node-id>.node.cinderblock.dev`, when the node ID makes a valid DNS
/// name (Kubernetes node names always do).
pub fn node_dns_name(node_id: &str) -> Result<String, TlsError> {
    let bad = |reason| Err(TlsError::BadNodeId { id: node_id.to_string(), reason });
    if node_id.is_empty() {
        return bad("it is empty");
    }
    if node_id.len() + NODE_NAME_SUFFIX.len() > 253 {
        return bad("it is too long");
    }
    for label in node_id.split('.') {
        if label.is_empty() || label.len() > 63 {
            return bad("each dot-separated part must have 1 to 63 characters");
        }
        if !label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
            return bad("only lowercase letters, digits, '-' and '.' are allowed");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return bad("a part may not start or end with '-'");
        }
    }
    Ok(format!("{node_id}{NODE_NAME_SUFFIX}"))
}

/// The identities a certificate carries (from its DNS subject alternative
/// names). Only meaningful for a certificate whose chain was verified.
pub fn peers_of(cert_der: &[u8]) -> Vec<Peer> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(cert_der) else { return vec![] };
    let Ok(Some(san)) = cert.subject_alternative_name() else { return vec![] };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) if *d == CONTROLLER_NAME => Some(Peer::Controller),
            GeneralName::DNSName(d) => {
                d.strip_suffix(NODE_NAME_SUFFIX).filter(|id| node_dns_name(id).is_ok()).map(|id| Peer::Node(id.to_string()))
            }
            _ => None,
        })
        .collect()
}

/// The provider every config here uses (ring, as kube's client does).
pub(crate) fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_follow_dns_rules() {
        assert_eq!(node_dns_name("node-1").unwrap(), "node-1.node.cinderblock.dev");
        assert_eq!(node_dns_name("ip-10-0-0-1.ec2.internal").unwrap(), "ip-10-0-0-1.ec2.internal.node.cinderblock.dev");
        for bad in ["", "Node", "a_b", "-a", "a-", "a..b", ".a", "a b", &"x".repeat(64), "*"] {
            assert!(node_dns_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
