//! Remote attach over NBD (os-brick's `connect_volume` for a volume whose
//! image lives on another node): our protocol client, and two engines that
//! turn an export into a local block device (docs/nbd.md):
//!
//! - `kernel`: the kernel's nbd driver over generic netlink, over kernel
//!   TLS (`ktls`) where the kernel has it;
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
pub mod ktls;
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
/// Set to `CONTEXT_TLS_PLAIN_ALLOWED` when the export also admits the
/// consumer's address in plain text (a kernel engine without kernel TLS);
/// absent: TLS only.
pub const CONTEXT_TLS: &str = "cinderblock.dev/nbd-tls";
pub const CONTEXT_TLS_PLAIN_ALLOWED: &str = "plain-allowed";

/// How this node's engine protects NBD connections (StorageNode `attach_tls`).
pub const TLS_KERNEL: &str = "kernel-tls";
pub const TLS_USERSPACE: &str = "userspace-tls";
pub const TLS_PLAIN: &str = "plain";
/// Engine names (StorageNode `attach_engine`).
pub const ENGINE_KERNEL: &str = "kernel-nbd";
pub const ENGINE_FUSE: &str = "fuse-nbd";

/// TLS for the kernel engine to the NBD server of `node`: as `tls_to_node`,
/// restricted to what kernel TLS takes, with secret extraction.
pub fn kernel_tls_to_node(dir: &crate::tls::TlsDir, node: &str) -> Result<ClientTls, String> {
    let config = ktls::client_config(dir).map_err(|e| format!("TLS for NBD: {e}"))?;
    let name = crate::tls::node_dns_name(node).map_err(|e| e.to_string())?;
    let server_name = rustls::pki_types::ServerName::try_from(name).map_err(|e| e.to_string())?;
    Ok(ClientTls { config, server_name })
}

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
    #[error(
        "volume {0}: this node's kernel has no kernel TLS, so its kernel NBD engine can only speak plain text, and the target asks for TLS"
    )]
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
    /// The kernel engine where the nbd driver answers on netlink (with
    /// kernel TLS where the self-test passes), else FUSE with its mounts
    /// under `state_root`.
    pub async fn detect(state_root: &Path) -> Engine {
        match kernel::status().await {
            Ok(_) => {
                let probe = tokio::task::spawn_blocking(ktls::probe).await.unwrap_or_else(|e| Err(ktls::KtlsError::Session(e.to_string())));
                let kernel_tls = match probe {
                    Ok(()) => {
                        tracing::info!("kernel TLS works: remote volumes attach over TLS carried on by the kernel");
                        true
                    }
                    Err(e) => {
                        tracing::warn!(reason = %e, "no kernel TLS: the kernel NBD engine attaches remote volumes in PLAIN TEXT, from exports that allow this node's address only");
                        false
                    }
                };
                Engine::Kernel(kernel::KernelOptions { kernel_tls, ..Default::default() })
            }
            Err(e) => {
                tracing::info!(reason = %e, "no kernel NBD: remote volumes attach through FUSE");
                Engine::Fuse { state_root: state_root.to_path_buf(), policy: Default::default() }
            }
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Engine::Kernel(_) => ENGINE_KERNEL,
            Engine::Fuse { .. } => ENGINE_FUSE,
        }
    }

    /// How its NBD connections are protected: `TLS_KERNEL`, `TLS_USERSPACE`
    /// or `TLS_PLAIN`.
    pub fn tls_mode(&self) -> &'static str {
        match self {
            Engine::Kernel(o) if o.kernel_tls => TLS_KERNEL,
            Engine::Kernel(_) => TLS_PLAIN,
            Engine::Fuse { .. } => TLS_USERSPACE,
        }
    }

    /// Attach `target` for `volume_id` (a validated ID: it names folders).
    pub async fn connect(&self, volume_id: &str, target: Target, read_only: bool) -> Result<Attachment, EngineError> {
        match self {
            Engine::Kernel(opts) => {
                if target.tls.is_some() && !opts.kernel_tls {
                    return Err(EngineError::TlsOnKernel(volume_id.to_string()));
                }
                Ok(Attachment::Kernel(kernel::connect(&target, opts, volume_id).await?))
            }
            Engine::Fuse { state_root, policy } => {
                let dir = state_root.join(volume_id);
                Ok(Attachment::Fuse(Box::new(fuse::FuseAttachment::attach(target, &dir, policy.clone(), read_only).await?)))
            }
        }
    }
}
