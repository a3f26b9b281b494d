//! NodePublishVolume and NodeUnpublishVolume.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::info;

use crate::attach::loopdev::{self, AttachOptions};
use crate::attach::mount::{self, mount_table, Pinned};
use crate::attach::MountInfo;
use crate::csi;

use super::capability::{self, Access};
use super::error::NodeError;
use super::host::{is_node_bind, list, loop_of_mount, mount_at, mounts_of, mounts_of_image, wait_unbound, LoopInfo};
use super::paths::{AllowedRoots, CreatedDirs};
use super::stage::{block_marker, describe, must_be_folder_if_present, unmount_ours, CreatedFile};
use super::{blocking, check_id, Node};

/// What one publish asks for, checked.
struct Publish {
    id: String,
    image: PathBuf,
    staging: PathBuf,
    target: PathBuf,
    read_only: bool,
    single_writer: bool,
}

impl Node {
    pub(super) async fn publish(&self, req: csi::NodePublishVolumeRequest) -> Result<(), NodeError> {
        let id = check_id(&req.volume_id)?;
        let target = self.roots.check("target_path", &req.target_path)?;
        let cap = capability::parse(req.volume_capability.as_ref())?;
        if req.staging_target_path.is_empty() {
            return Err(NodeError::StagingPathMissing);
        }
        let staging = self.roots.check("staging_target_path", &req.staging_target_path)?;
        let _guard = self.inflight.try_begin(&id)?;
        let (image, known) = self.image_of(&id, &staging).await?;
        if !known {
            return Err(NodeError::VolumeNotFound { id });
        }
        let p = Publish {
            image,
            id,
            staging,
            target,
            // A read-only capability (reader-only mode, or an "ro" mount flag)
            // publishes read-only whatever the flag says.
            read_only: req.readonly || cap.read_only,
            single_writer: cap.single_writer(),
        };
        let roots = self.roots.clone();
        match cap.access {
            Access::Block => blocking(move || publish_block(&roots, &p)).await,
            Access::Mount { .. } => blocking(move || publish_filesystem(&roots, &p)).await,
        }
    }

    pub(super) async fn unpublish(&self, req: csi::NodeUnpublishVolumeRequest) -> Result<(), NodeError> {
        let id = check_id(&req.volume_id)?;
        let target = self.roots.check("target_path", &req.target_path)?;
        let _guard = self.inflight.try_begin(&id)?;
        // By path, as for unstage: a retried unpublish of a volume deleted
        // since is still OK.
        let (image, _) = self.image_of(&id, &target).await?;
        let roots = self.roots.clone();
        blocking(move || unpublish(&roots, &id, &image, &target)).await
    }
}

fn mode(read_only: bool) -> &'static str {
    if read_only {
        "read-only"
    } else {
        "read-write"
    }
}

/// SINGLE_NODE_SINGLE_WRITER: one target per volume (the spec's
/// FAILED_PRECONDITION for a second target). Other single-node modes may
/// publish to several targets, as Kubernetes does for pods sharing a
/// ReadWriteOnce volume on one node.
fn refuse_second_target(p: &Publish, others: Vec<PathBuf>) -> Result<(), NodeError> {
    if !p.single_writer || others.is_empty() {
        return Ok(());
    }
    Err(NodeError::InUse {
        id: p.id.clone(),
        detail: format!(
            "is already published at {}, and its access mode SINGLE_NODE_SINGLE_WRITER allows one target; unpublish it there first",
            list(others)
        ),
    })
}

/// A target that already holds a mount of the other kind is "published but
/// incompatible" (ALREADY_EXISTS), whatever the staging looks like.
fn refuse_other_kind_at_target(table: &[MountInfo], p: &Publish, want_block: bool) -> Result<(), NodeError> {
    match mount_at(table, &p.target) {
        Some(m) if is_node_bind(m) != want_block => Err(NodeError::PublishedOtherwise {
            path: p.target.clone(),
            detail: format!("as {} (the request asks for a {})", describe(m), if want_block { "raw block device" } else { "filesystem" }),
        }),
        _ => Ok(()),
    }
}

fn publish_filesystem(roots: &AllowedRoots, p: &Publish) -> Result<(), NodeError> {
    let table = mount_table()?;
    refuse_other_kind_at_target(&table, p, false)?;
    let not_staged = |detail: String| NodeError::NotStaged { id: p.id.clone(), path: p.staging.clone(), detail };
    let (staged, dev): (MountInfo, LoopInfo) = match mount_at(&table, &p.staging) {
        Some(m) => match loop_of_mount(m)? {
            Some(dev) if dev.backs(&p.image) && !is_node_bind(m) => (m.clone(), dev),
            _ => return Err(not_staged(format!("it holds {}", describe(m)))),
        },
        None if mount_at(&table, &block_marker(&p.staging, &p.id)).is_some() => {
            return Err(not_staged("it is staged as a raw block device and the request asks for a filesystem".into()))
        }
        None => return Err(not_staged("nothing is mounted there".into())),
    };
    if let Some(m) = mount_at(&table, &p.target) {
        let same = !is_node_bind(m) && (m.major, m.minor) == (staged.major, staged.minor) && m.root == staged.root;
        if !same {
            return Err(NodeError::PublishedOtherwise { path: p.target.clone(), detail: format!("as {}", describe(m)) });
        }
        if m.is_read_only() != p.read_only {
            return Err(NodeError::PublishedOtherwise {
                path: p.target.clone(),
                detail: format!("{} (the request asks for {})", mode(m.is_read_only()), mode(p.read_only)),
            });
        }
        info!(volume.id = %p.id, target = %p.target.display(), "already published");
        return Ok(());
    }
    let others = mounts_of(&table, &dev).into_iter().map(|m| m.mount_point.clone()).filter(|t| *t != p.staging && *t != p.target).collect();
    refuse_second_target(p, others)?;
    must_be_folder_if_present("target_path", &p.target)?;
    let mut created = CreatedDirs::default();
    roots.create_dirs(&p.target, &mut created)?;
    mount::bind_mount_on(&roots.open(&p.staging)?, &roots.open(&p.target)?, p.read_only)?;
    created.keep();
    info!(volume.id = %p.id, target = %p.target.display(), read_only = p.read_only, "published");
    Ok(())
}

fn publish_block(roots: &AllowedRoots, p: &Publish) -> Result<(), NodeError> {
    let table = mount_table()?;
    refuse_other_kind_at_target(&table, p, true)?;
    let marker = block_marker(&p.staging, &p.id);
    let not_staged = |detail: String| NodeError::NotStaged { id: p.id.clone(), path: p.staging.clone(), detail };
    let staged: LoopInfo = match mount_at(&table, &marker) {
        Some(m) => match loop_of_mount(m)? {
            Some(dev) if dev.backs(&p.image) && is_node_bind(m) => dev,
            _ => return Err(not_staged(format!("{} holds {}", marker.display(), describe(m)))),
        },
        None if mount_at(&table, &p.staging).is_some() => {
            return Err(not_staged(
                "it is staged as a filesystem or holds another mount, and the request asks for a raw block device".into(),
            ))
        }
        None => return Err(not_staged("nothing is staged there".into())),
    };
    if let Some(m) = mount_at(&table, &p.target) {
        return match loop_of_mount(m)? {
            Some(dev) if dev.backs(&p.image) && is_node_bind(m) && dev.read_only == p.read_only => {
                info!(volume.id = %p.id, target = %p.target.display(), "already published");
                Ok(())
            }
            Some(dev) if dev.backs(&p.image) && is_node_bind(m) => Err(NodeError::PublishedOtherwise {
                path: p.target.clone(),
                detail: format!("{} (the request asks for {})", mode(dev.read_only), mode(p.read_only)),
            }),
            _ => Err(NodeError::PublishedOtherwise { path: p.target.clone(), detail: format!("as {}", describe(m)) }),
        };
    }
    let others =
        mounts_of_image(&table, &p.image)?.into_iter().map(|(m, _)| m.mount_point).filter(|t| *t != marker && *t != p.target).collect();
    refuse_second_target(p, others)?;
    if std::fs::metadata(&p.target).is_ok_and(|m| m.is_dir()) {
        return Err(NodeError::InvalidPath {
            field: "target_path",
            path: p.target.display().to_string(),
            reason: "it is a folder; a raw block volume is published on a file (which the plugin creates)".into(),
        });
    }
    let mut created = CreatedDirs::default();
    if let Some(parent) = p.target.parent() {
        roots.create_dirs(parent, &mut created)?;
    }
    let file = CreatedFile::create(roots, "target_path", &p.target)?;
    // A read-only bind of a device node does not stop writes through it, so
    // a read-only target gets a device of its own that the kernel keeps
    // read-only. It is detached at unpublish, when nothing uses it.
    let (device, dedicated) = if p.read_only && !staged.read_only {
        (loopdev::attach(&p.image, AttachOptions::for_block(true))?.release(), true)
    } else {
        (staged.device(), false)
    };
    let bound = roots.open(&p.target).and_then(|at| Ok(mount::bind_mount_on(&Pinned::trusted(&device.path)?, &at, p.read_only)?));
    if let Err(e) = bound {
        if dedicated {
            let _ = loopdev::detach(&device);
        }
        return Err(e);
    }
    file.keep();
    created.keep();
    info!(volume.id = %p.id, target = %p.target.display(), device = %device.path.display(), read_only = p.read_only, "published raw block");
    Ok(())
}

fn unpublish(roots: &AllowedRoots, id: &str, image: &Path, target: &Path) -> Result<(), NodeError> {
    let meta = match std::fs::symlink_metadata(target) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(NodeError::io(format!("inspecting {}", target.display()))(e)),
    };
    let table = mount_table()?;
    if let Some(m) = mount_at(&table, target) {
        let dev = loop_of_mount(m)?;
        let ours = |m: &MountInfo| -> Result<bool, NodeError> {
            Ok(match loop_of_mount(m)? {
                Some(d) => d.backs(image),
                // A device node whose loop device was detached by hand.
                None => is_node_bind(m),
            })
        };
        if !ours(m)? {
            return Err(NodeError::Foreign {
                id: id.to_string(),
                path: target.to_path_buf(),
                detail: dev.map(|d| d.describe()).unwrap_or_else(|| describe(m)),
            });
        }
        let bound_node = is_node_bind(m);
        unmount_ours(roots, target, ours)?;
        // The read-only device of a raw block target: detach it once
        // nothing uses it (the staged device stays, bound at the staging).
        if let Some(dev) = dev.filter(|_| bound_node) {
            if mounts_of(&mount_table()?, &dev).is_empty() {
                loopdev::detach(&dev.device())?;
                if !wait_unbound(&dev, Duration::from_secs(5))? {
                    tracing::warn!(volume.id = %id, device = %dev.path().display(), "loop device still held open after unpublish; it detaches when closed");
                }
            }
        }
    }
    match roots.remove(target, meta.is_dir()) {
        Ok(()) => {}
        Err(e) => {
            return Err(NodeError::io(format!(
                "removing target {} (it is no longer a mount; if it is a non-empty folder something wrote into it while unmounted)",
                target.display()
            ))(e))
        }
    }
    info!(volume.id = %id, target = %target.display(), "unpublished");
    Ok(())
}
