//! Volumes whose image lives on another node (os-brick's `connect_volume`):
//! the publish context names the owner's NBD export; the attach engine makes
//! it a local *backing path*, and staging then loop-attaches that path
//! exactly as it attaches a local image. So idempotency, the mount-table
//! checks and unstaging are one code path for local and remote volumes.
//!
//! - FUSE engine (this machine's kernel has no nbd module): our NBD client
//!   behind a one-file FUSE filesystem at `<state>/<volume>/fuse/disk`.
//! - Kernel engine: `/dev/nbdN` (a loop device on it keeps staging uniform),
//!   over kernel TLS; where the kernel has none, plain text from an export
//!   that allows this node's address (the publish context says so).
//!
//! The attachment lives in this process: the node plugin keeps it while the
//! volume is staged and lets it go at unstage. After a restart of the node
//! plugin a FUSE attachment is gone (its I/O fails; docs/nbd.md), and
//! unstage still cleans up what is left by the paths it predicts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::attach::nbd::fuse::FuseFile;
use crate::attach::nbd::{
    kernel, Engine, Target, CONTEXT_ADDRESS, CONTEXT_EXPORT, CONTEXT_OWNER, CONTEXT_TLS, CONTEXT_TLS_PLAIN_ALLOWED, CONTEXT_TRANSPORT,
    TRANSPORT_NBD,
};
use crate::tls::TlsDir;

use super::error::NodeError;

/// How this node attaches remote volumes.
#[derive(Clone)]
pub struct RemoteConfig {
    pub engine: Arc<Engine>,
    /// This node's certificate folder: its certificate opens the owner's export.
    pub tls: Arc<TlsDir>,
    /// Where FUSE attachments are mounted (`<state>/<volume>/fuse/disk`).
    pub state_root: PathBuf,
}

enum Backing {
    Fuse(FuseFile),
    Kernel { index: u32, path: PathBuf },
}

impl Backing {
    fn path(&self) -> &Path {
        match self {
            Backing::Fuse(f) => &f.file,
            Backing::Kernel { path, .. } => path,
        }
    }
}

/// Which export a staged remote volume uses, and the attachment serving it.
struct Attached {
    target: RemoteTarget,
    backing: Backing,
}

/// What a publish context says about where a volume is.
#[derive(Clone)]
pub struct RemoteTarget {
    pub address: String,
    pub export: String,
    pub owner: String,
    /// The export also admits this node's address in plain text.
    pub plain_allowed: bool,
}

/// `Some` when the publish context names an NBD export (a remote volume).
pub fn remote_target(context: &HashMap<String, String>) -> Result<Option<RemoteTarget>, NodeError> {
    match context.get(CONTEXT_TRANSPORT).map(String::as_str) {
        Some(TRANSPORT_NBD) => {}
        None | Some("local") => return Ok(None),
        Some(other) => return Err(NodeError::Invalid { what: "publish_context", reason: format!("unknown transport {other:?}") }),
    }
    let get = |k: &str| {
        context.get(k).filter(|v| !v.is_empty()).cloned().ok_or_else(|| NodeError::Invalid {
            what: "publish_context",
            reason: format!("an NBD publication needs {k}; was the volume published by this driver's controller?"),
        })
    };
    let plain_allowed = match context.get(CONTEXT_TLS).map(String::as_str) {
        None | Some("") | Some("tls") => false,
        Some(CONTEXT_TLS_PLAIN_ALLOWED) => true,
        Some(other) => return Err(NodeError::Invalid { what: "publish_context", reason: format!("unknown {CONTEXT_TLS} {other:?}") }),
    };
    Ok(Some(RemoteTarget { address: get(CONTEXT_ADDRESS)?, export: get(CONTEXT_EXPORT)?, owner: get(CONTEXT_OWNER)?, plain_allowed }))
}

/// Where the kernel engine connects for `t`: over kernel TLS when this
/// kernel has it (even where plain text is allowed too), else in plain text
/// when the export allows it, else nowhere.
fn kernel_target(tls: &TlsDir, opts: &kernel::KernelOptions, volume: &str, t: &RemoteTarget) -> Result<Target, NodeError> {
    let tls = if opts.kernel_tls {
        Some(
            crate::attach::nbd::kernel_tls_to_node(tls, &t.owner)
                .map_err(|reason| NodeError::Invalid { what: "publish_context", reason })?,
        )
    } else if t.plain_allowed {
        None
    } else {
        return Err(NodeError::Unusable {
            id: volume.to_string(),
            detail: format!(
                "is served by node {} over TLS only, and this node's kernel has no kernel TLS for its kernel NBD engine; \
                 load the tls module (modprobe tls) and restart the node plugin, or have the controller publish it again \
                 now that this node reports attach_tls=plain",
                t.owner
            ),
        });
    };
    Ok(Target { address: t.address.clone(), export: t.export.clone(), tls })
}

pub struct Remote {
    config: RemoteConfig,
    attached: Arc<Mutex<HashMap<String, Attached>>>,
}

impl Remote {
    /// With the kernel engine, also starts the supervisor that gives a
    /// device new connections when its server comes back (must run inside
    /// a tokio runtime).
    pub fn new(config: RemoteConfig) -> Remote {
        let attached = Arc::new(Mutex::new(HashMap::new()));
        if let Engine::Kernel(opts) = &*config.engine {
            match kernel::LinkDeadWatcher::open() {
                Ok(watcher) => {
                    tokio::spawn(supervise(watcher, attached.clone(), opts.clone(), config.tls.clone()));
                }
                Err(e) => {
                    warn!(error = %e, "cannot watch the nbd driver for lost connections; a restarted owner agent will leave kernel-attached volumes without I/O")
                }
            }
        }
        Remote { config, attached }
    }

    pub fn engine_name(&self) -> &'static str {
        self.config.engine.name()
    }

    /// Where a FUSE attachment of `volume` serves its file.
    pub fn fuse_file_of(&self, volume: &str) -> PathBuf {
        self.config.state_root.join(volume).join("fuse").join("disk")
    }

    /// True when `backing` (a loop device's backing file) is one of ours.
    pub fn is_remote_backing(&self, backing: &Path) -> bool {
        backing.starts_with(&self.config.state_root) || backing.to_string_lossy().starts_with("/dev/nbd")
    }

    /// The backing path of `volume`, attaching it first when needed. The
    /// bool says whether this call attached it (then a failing stage lets
    /// it go again).
    pub async fn attach(&self, volume: &str, t: &RemoteTarget, read_only: bool) -> Result<(PathBuf, bool), NodeError> {
        let mut attached = self.attached.lock().await;
        if let Some(a) = attached.get(volume) {
            if a.target.export == t.export {
                return Ok((a.backing.path().to_path_buf(), false));
            }
            return Err(NodeError::InUse {
                id: volume.to_string(),
                detail: "is attached here from another export; unstage it first".into(),
            });
        }
        let backing = match &*self.config.engine {
            Engine::Fuse { policy, .. } => {
                let tls = crate::attach::nbd::tls_to_node(self.config.tls.clone(), &t.owner)
                    .map_err(|reason| NodeError::Invalid { what: "publish_context", reason })?;
                let target = Target { address: t.address.clone(), export: t.export.clone(), tls: Some(tls) };
                let dir = self.config.state_root.join(volume);
                let f = FuseFile::mount(target, &dir, policy.clone(), read_only)
                    .await
                    .map_err(|e| NodeError::Internal { detail: format!("attaching volume {volume} from {}: {e}", t.address) })?;
                Backing::Fuse(f)
            }
            Engine::Kernel(opts) => {
                let target = kernel_target(&self.config.tls, opts, volume, t)?;
                if target.tls.is_none() {
                    warn!(volume, owner = %t.owner, "kernel NBD engine without kernel TLS: the data path to the owner is PLAIN TEXT (docs/nbd.md)");
                }
                let dev = kernel::connect(&target, opts, volume)
                    .await
                    .map_err(|e| NodeError::Internal { detail: format!("attaching volume {volume} from {}: {e}", t.address) })?;
                Backing::Kernel { index: dev.index, path: dev.path.clone() }
            }
        };
        let path = backing.path().to_path_buf();
        info!(volume, owner = %t.owner, address = %t.address, engine = self.engine_name(), tls = self.config.engine.tls_mode(), backing = %path.display(), "remote volume attached");
        attached.insert(volume.to_string(), Attached { target: t.clone(), backing });
        Ok((path, true))
    }

    /// The backing path of a volume attached by this process, if any.
    pub async fn backing_of(&self, volume: &str) -> Option<PathBuf> {
        self.attached.lock().await.get(volume).map(|a| a.backing.path().to_path_buf())
    }

    /// `backing_of` for a caller on a blocking thread (the agent's
    /// workers, freezing a group's members); also finds a kernel NBD
    /// device an earlier node plugin attached (its backend identifier is
    /// the volume's ID). Not to be called on an async thread.
    pub fn backing_of_blocking(&self, volume: &str) -> Option<PathBuf> {
        if let Some(path) = self.attached.blocking_lock().get(volume).map(|a| a.backing.path().to_path_buf()) {
            return Some(path);
        }
        let Ok(entries) = std::fs::read_dir("/sys/block") else { return None };
        entries.flatten().find_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let backend = std::fs::read_to_string(e.path().join("backend")).ok()?;
            (name.starts_with("nbd") && backend.trim() == volume).then(|| PathBuf::from("/dev").join(name))
        })
    }

    /// The attached volume grew on its owner: make the local device show the
    /// new size. Returns that size in bytes.
    pub async fn grow(&self, volume: &str) -> Result<u64, NodeError> {
        let attached = self.attached.lock().await;
        let Some(a) = attached.get(volume) else {
            return Err(NodeError::Unusable {
                id: volume.to_string(),
                detail: "is not attached by this node plugin; stage it again".into(),
            });
        };
        match (&a.backing, &*self.config.engine) {
            (Backing::Kernel { index, .. }, Engine::Kernel(opts)) => {
                let target = kernel_target(&self.config.tls, opts, volume, &a.target)?;
                kernel::resize(*index, &target, volume)
                    .await
                    .map_err(|e| NodeError::Internal { detail: format!("growing the nbd device of volume {volume}: {e}") })
            }
            _ => Err(NodeError::Unusable {
                id: volume.to_string(),
                detail: "is attached with the FUSE engine, which shows a new size only when the volume is staged again".into(),
            }),
        }
    }

    /// Let `volume`'s attachment go (nothing may use it any more). Also
    /// cleans a FUSE mount left by an earlier process.
    pub async fn release(&self, volume: &str) {
        let a = self.attached.lock().await.remove(volume);
        match a.map(|a| a.backing) {
            Some(Backing::Fuse(f)) => f.unmount().await,
            Some(Backing::Kernel { index, .. }) => {
                if let Err(e) = kernel::disconnect(index).await {
                    warn!(volume, index, error = %e, "could not disconnect the nbd device");
                }
            }
            None => {
                // A FUSE mount whose server (an earlier node plugin) is gone.
                let mountpoint = self.config.state_root.join(volume).join("fuse");
                if std::fs::symlink_metadata(&mountpoint).is_ok() {
                    let _ = rustix::mount::unmount(&mountpoint, rustix::mount::UnmountFlags::DETACH);
                    let _ = std::fs::remove_dir(&mountpoint);
                }
            }
        }
        let _ = std::fs::remove_dir(self.config.state_root.join(volume));
    }
}

/// The kernel engine's supervisor: when the driver reports that a device
/// lost its connections (the owner's agent restarted), connect new sockets
/// and RECONFIGURE the device, retrying for its dead-connection timeout.
/// The driver holds the device's I/O meanwhile, so nothing above it fails.
async fn supervise(
    watcher: kernel::LinkDeadWatcher,
    attached: Arc<Mutex<HashMap<String, Attached>>>,
    opts: kernel::KernelOptions,
    tls: Arc<TlsDir>,
) {
    let watcher = Arc::new(watcher);
    // Devices being reconnected: a reconnect task holds its device's key.
    let reconnecting = crate::keyed_locks::KeyedLocks::default();
    loop {
        let w = watcher.clone();
        let dead = match tokio::task::spawn_blocking(move || w.next(std::time::Duration::from_secs(5))).await {
            Ok(Ok(Some(index))) => index,
            Ok(Ok(None)) => continue,
            Ok(Err(e)) => {
                warn!(error = %e, "watching the nbd driver failed; retrying");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
            Err(_) => return,
        };
        let found = attached.lock().await.iter().find_map(|(volume, a)| match a.backing {
            Backing::Kernel { index, .. } if index == dead => Some((volume.clone(), a.target.clone())),
            _ => None,
        });
        let Some((volume, t)) = found else { continue };
        // Each of its sockets reports its death: one reconnect is enough.
        let Some(held) = reconnecting.try_lock(&[format!("nbd{dead}")]) else { continue };
        warn!(volume, device = dead, address = %t.address, "NBD connection lost; reconnecting");
        let (opts, tls) = (opts.clone(), tls.clone());
        // Other devices are watched meanwhile.
        tokio::spawn(async move {
            // Built now: the certificates may have been renewed since the attach.
            let result = match kernel_target(&tls, &opts, &volume, &t) {
                Ok(target) => kernel::reconnect(dead, &target, &opts, &volume).await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match result {
                Ok(_) => info!(volume, device = dead, "NBD device reconnected"),
                Err(e) => warn!(volume, device = dead, error = %e, "could not reconnect the nbd device; its I/O fails now"),
            }
            drop(held);
        });
    }
}
