//! Remote attach over NBD (os-brick's `connect_volume` for a volume whose
//! image lives on another node): our protocol client, and two engines that
//! turn an export into a local block device (docs/nbd.md):
//!
//! - `kernel`: the kernel's nbd driver over generic netlink;
//! - `fuse`: where the kernel has no nbd module, our client behind a FUSE
//!   file that is loop-attached like a local image.
//!
//! The node's stage code calls [`Engine::connect`] and gets a device path;
//! the rest of staging (probe, mkfs, mount, bind) is the same as for a
//! local volume.

pub mod cli;
pub mod client;
pub mod fuse;
pub mod kernel;
pub mod resilient;

use std::path::{Path, PathBuf};

pub use client::{Client, ClientTls, ExportInfo, NbdError, Target};

/// publish_context keys a ControllerPublishVolume answer carries for a
/// volume served from another node.
pub const CONTEXT_TRANSPORT: &str = "cinderblock.dev/transport";
pub const CONTEXT_ADDRESS: &str = "cinderblock.dev/nbd-address";
pub const CONTEXT_EXPORT: &str = "cinderblock.dev/nbd-export";
/// The node that serves the export: its certificate must name that node.
pub const CONTEXT_OWNER: &str = "cinderblock.dev/nbd-owner";
/// The value of `CONTEXT_TRANSPORT` for NBD.
pub const TRANSPORT_NBD: &str = "nbd";

/// TLS for our client to the NBD server of `node`: this node's certificate
/// (which the export admits), and only `node`'s certificate accepted.
pub fn tls_to_node(dir: std::sync::Arc<crate::tls::TlsDir>, node: &str) -> Result<ClientTls, String> {
    let connector = crate::tls::AgentConnector::new(dir, &crate::tls::Peer::Node(node.to_string()), vec![]).map_err(|e| e.to_string())?;
    let config = connector.config().map_err(|e| format!("TLS for NBD: {e}"))?;
    let name = crate::tls::node_dns_name(node).map_err(|e| e.to_string())?;
    let server_name = rustls::pki_types::ServerName::try_from(name).map_err(|e| e.to_string())?;
    Ok(ClientTls { config, server_name })
}

/// Which engine this node attaches with, chosen once at start.
pub enum Engine {
    Kernel(kernel::KernelOptions),
    Fuse { state_root: PathBuf, policy: resilient::ReconnectPolicy },
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Kernel(#[from] kernel::KernelError),
    #[error(transparent)]
    Fuse(#[from] fuse::FuseError),
    #[error("the kernel engine speaks plain text only; TLS was asked for {0}")]
    TlsOnKernel(String),
}

/// A remote volume attached here.
pub enum Attachment {
    Kernel(kernel::KernelDevice),
    Fuse(Box<fuse::FuseAttachment>),
}

impl Attachment {
    pub fn device(&self) -> &Path {
        match self {
            Attachment::Kernel(d) => &d.path,
            Attachment::Fuse(f) => &f.device.path,
        }
    }

    pub async fn disconnect(self) -> Result<(), EngineError> {
        match self {
            Attachment::Kernel(d) => Ok(kernel::disconnect(d.index).await?),
            Attachment::Fuse(f) => Ok(f.detach().await?),
        }
    }
}

impl Engine {
    /// The kernel engine where the nbd driver answers on netlink, else FUSE
    /// with its mounts under `state_root`.
    pub async fn detect(state_root: &Path) -> Engine {
        match kernel::status().await {
            Ok(_) => Engine::Kernel(kernel::KernelOptions::default()),
            Err(e) => {
                tracing::info!(reason = %e, "no kernel NBD: remote volumes attach through FUSE");
                Engine::Fuse { state_root: state_root.to_path_buf(), policy: Default::default() }
            }
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Engine::Kernel(_) => "kernel-nbd",
            Engine::Fuse { .. } => "fuse-nbd",
        }
    }

    /// Attach `target` for `volume_id` (a validated ID: it names folders).
    pub async fn connect(&self, volume_id: &str, target: Target, read_only: bool) -> Result<Attachment, EngineError> {
        match self {
            Engine::Kernel(opts) => {
                if target.tls.is_some() {
                    return Err(EngineError::TlsOnKernel(volume_id.to_string()));
                }
                Ok(Attachment::Kernel(kernel::connect(&target.address, &target.export, opts, volume_id).await?))
            }
            Engine::Fuse { state_root, policy } => {
                let dir = state_root.join(volume_id);
                Ok(Attachment::Fuse(Box::new(fuse::FuseAttachment::attach(target, &dir, policy.clone(), read_only).await?)))
            }
        }
    }
}
