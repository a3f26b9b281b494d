//! NodeStageVolume and NodeUnstageVolume.

use std::io;
use std::path::{Path, PathBuf};

use tracing::info;

use crate::attach::loopdev::{self, AttachOptions, LoopHandle};
use crate::attach::mount::{self, mount_table, Pinned};
use crate::attach::{filesystem, Filesystem, MountInfo};
use crate::csi;
use crate::volume::State;

use super::capability::{self, Access};
use super::error::NodeError;
use super::host::{detach_unused, list, loop_of_mount, mount_at, mounts_of, mounts_of_image};
use super::paths::{AllowedRoots, CreatedDirs};
use super::remote::remote_target;
use super::{blocking, check_id, Node};

impl Node {
    pub(super) async fn stage(&self, req: csi::NodeStageVolumeRequest) -> Result<(), NodeError> {
        let id = check_id(&req.volume_id)?;
        let staging = self.roots.check("staging_target_path", &req.staging_target_path)?;
        must_be_folder_if_present("staging_target_path", &staging)?;
        let cap = capability::parse(req.volume_capability.as_ref())?;
        let _guard = self.inflight.try_begin(&id)?;
        let read_only = cap.read_only;
        // A volume of another node: its NBD export, attached here, is the
        // image; everything after that is the same as for a local volume.
        let (image, attached_now) = match remote_target(&req.publish_context)? {
            Some(target) => {
                let remote = self.remote.as_ref().ok_or_else(|| NodeError::Unusable {
                    id: id.clone(),
                    detail: "lives on another node, and this node plugin attaches no remote volumes (it has no certificate folder for NBD)"
                        .into(),
                })?;
                remote.attach(&id, &target, read_only).await?
            }
            None => {
                let record = self.config.pool.get_volume(&id)?;
                if record.state != State::Available {
                    return Err(NodeError::Unusable {
                        id,
                        detail: format!("is {:?} in the pool; wait until it is Available", record.state),
                    });
                }
                (self.config.pool.volume_image(&id), false)
            }
        };
        let roots = self.roots.clone();
        let vid = id.clone();
        let result = match cap.access {
            Access::Block => blocking(move || stage_block(&roots, &vid, &image, &staging, read_only)).await,
            Access::Mount { fs, flags } => stage_filesystem(roots, vid, image, staging, fs, flags, read_only).await,
        };
        if result.is_err() && attached_now {
            if let Some(r) = &self.remote {
                r.release(&id).await;
            }
        }
        result
    }

    pub(super) async fn unstage(&self, req: csi::NodeUnstageVolumeRequest) -> Result<(), NodeError> {
        let id = check_id(&req.volume_id)?;
        let staging = self.roots.check("staging_target_path", &req.staging_target_path)?;
        let _guard = self.inflight.try_begin(&id)?;
        // By path, not by record: a volume deleted while staged is still
        // cleaned up, and a retried unstage of a deleted volume is OK. A
        // remote volume's image is its attachment's backing path: the one
        // this process holds, or the one its staging mount shows.
        let mut image = self.config.pool.volume_image(&id);
        let mut remote = false;
        if let Some(r) = &self.remote {
            if let Some(b) = r.backing_of(&id).await {
                (image, remote) = (b, true);
            } else {
                let (s, vid) = (staging.clone(), id.clone());
                if let Some(b) = blocking(move || staged_backing(&s, &vid)).await? {
                    if r.is_remote_backing(&b) {
                        (image, remote) = (b, true);
                    }
                }
            }
        }
        let roots = self.roots.clone();
        let vid = id.clone();
        blocking(move || unstage(&roots, &vid, &image, &staging)).await?;
        if remote {
            if let Some(r) = &self.remote {
                r.release(&id).await;
            }
        }
        Ok(())
    }
}

impl Node {
    /// The image a volume is attached from on this host, and whether the
    /// volume is known here: its pool image when the pool holds it; for a
    /// remote volume its attachment's backing path (held by this process,
    /// or seen in the loop device mounted at `at`, a staging or target
    /// path). An unknown volume gets its pool image path (cleanups by path
    /// of a volume deleted meanwhile still work).
    pub(super) async fn image_of(&self, id: &str, at: &Path) -> Result<(PathBuf, bool), NodeError> {
        if self.config.pool.get_volume(id).is_ok() {
            return Ok((self.config.pool.volume_image(id), true));
        }
        if let Some(r) = &self.remote {
            if let Some(b) = r.backing_of(id).await {
                return Ok((b, true));
            }
            let (p, vid) = (at.to_path_buf(), id.to_string());
            if let Some(b) = blocking(move || staged_backing(&p, &vid)).await? {
                if r.is_remote_backing(&b) {
                    return Ok((b, false));
                }
            }
        }
        Ok((self.config.pool.volume_image(id), false))
    }
}

/// The backing file of the loop device mounted at `at` (a filesystem or a
/// raw block device's marker below it), if any.
fn staged_backing(staging: &Path, id: &str) -> Result<Option<PathBuf>, NodeError> {
    let table = mount_table()?;
    for at in [staging.to_path_buf(), block_marker(staging, id)] {
        if let Some(m) = mount_at(&table, &at) {
            if let Some(dev) = loop_of_mount(m)? {
                return Ok(Some(dev.backing));
            }
        }
    }
    Ok(None)
}

pub(super) fn must_be_folder_if_present(field: &'static str, path: &Path) -> Result<(), NodeError> {
    match std::fs::metadata(path) {
        Ok(m) if !m.is_dir() => {
            Err(NodeError::InvalidPath { field, path: path.display().to_string(), reason: "it exists and is not a folder".into() })
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(NodeError::io(format!("inspecting {field} {}", path.display()))(e)),
    }
}

pub(super) fn describe(m: &MountInfo) -> String {
    if m.root.as_os_str() == "/" {
        format!("a mount of {} ({})", m.source, m.fs_type)
    } else {
        format!("a mount of {} ({}, {})", m.source, m.fs_type, m.root.display())
    }
}

/// The file on which a raw block volume's device node is bound while staged.
pub(super) fn block_marker(staging: &Path, id: &str) -> PathBuf {
    staging.join(id)
}

/// A volume is staged once per node: refuse when any mount uses its image.
fn refuse_if_in_use(table: &[MountInfo], id: &str, image: &Path) -> Result<(), NodeError> {
    let users = mounts_of_image(table, image)?;
    if users.is_empty() {
        return Ok(());
    }
    Err(NodeError::InUse {
        id: id.to_string(),
        detail: format!(
            "is already staged or published at {}; a volume is staged once per node, unstage it there first",
            list(users.into_iter().map(|(m, _)| m.mount_point))
        ),
    })
}

/// Inspect, clean up what a crash left, and attach; then probe, format if
/// blank, and mount.
async fn stage_filesystem(
    roots: AllowedRoots,
    id: String,
    image: PathBuf,
    staging: PathBuf,
    wanted: Option<Filesystem>,
    flags: Vec<String>,
    read_only: bool,
) -> Result<(), NodeError> {
    let prepared = {
        let (id, image, staging, roots) = (id.clone(), image.clone(), staging.clone(), roots.clone());
        blocking(move || -> Result<Option<(LoopHandle, CreatedDirs)>, NodeError> {
            let table = mount_table()?;
            if let Some(m) = mount_at(&table, &staging) {
                return match loop_of_mount(m)? {
                    Some(dev) if dev.backs(&image) => already_staged_filesystem(&id, &staging, m, wanted, read_only).map(|()| None),
                    _ => Err(NodeError::Occupied { path: staging, detail: describe(m) }),
                };
            }
            if mount_at(&table, &block_marker(&staging, &id)).is_some() {
                return Err(NodeError::StagedOtherwise {
                    id,
                    path: staging,
                    detail: "as a raw block device (the request asks for a filesystem)".into(),
                });
            }
            refuse_if_in_use(&table, &id, &image)?;
            detach_unused(&id, &image)?;
            let mut created = CreatedDirs::default();
            roots.create_dirs(&staging, &mut created)?;
            let handle = loopdev::attach(&image, AttachOptions::for_filesystem(read_only))?;
            Ok(Some((handle, created)))
        })
        .await?
    };
    // Until the mount holds the device, `handle` does: dropping it on any
    // failure below lets autoclear detach the device again.
    let Some((handle, created)) = prepared else { return Ok(()) };
    let device = handle.device.path.clone();
    let fs = match filesystem::probe(&device).await? {
        None if read_only => {
            return Err(NodeError::Unusable {
                id,
                detail: "is blank and the request is read-only (access mode or an \"ro\" mount flag), so it cannot be formatted; stage it read-write once".into(),
            })
        }
        None => {
            let fs = wanted.unwrap_or(Filesystem::Ext4);
            filesystem::format(&device, fs.as_str(), &[]).await?;
            info!(volume.id = %id, device = %device.display(), fs_type = %fs, "formatted blank volume");
            fs
        }
        Some(found) => match Filesystem::parse(&found) {
            Ok(found_fs) if wanted.is_none_or(|w| w == found_fs) => found_fs,
            Ok(_) => {
                return Err(NodeError::Unusable {
                    id,
                    detail: format!(
                        "holds {found}, not the requested {}; it is never reformatted: ask for {found} or leave fs_type empty",
                        wanted.map(|w| w.as_str()).unwrap_or_default()
                    ),
                })
            }
            Err(_) => {
                return Err(NodeError::Unusable {
                    id,
                    detail: format!(
                        "holds {found}, which cinderblock does not mount (only ext4 and xfs), and data is never formatted over"
                    ),
                })
            }
        },
    };
    // A volume expanded while it was not staged, or a restore or clone
    // into a larger volume: its ext4 grows here, unmounted, where it needs
    // no CAP_SYS_RESOURCE (see the function).
    if fs == Filesystem::Ext4 && !read_only {
        filesystem::grow_unmounted_ext4(&device).await?;
    }
    let (mounted_device, mounted_at) = (device.clone(), staging.clone());
    blocking(move || {
        let mut flags = flags;
        // Volumes restored from a snapshot or cloned carry their source's
        // filesystem UUID, and XFS refuses a second mount of a UUID.
        if fs == Filesystem::Xfs && !flags.iter().flat_map(|f| f.split(',')).any(|o| o.trim() == "nouuid") {
            flags.push("nouuid".into());
        }
        // On the folder as it was checked and made, not on whatever the
        // path names now.
        let at = roots.open(&staging)?;
        mount::mount_fs_on(&device, &at, fs.as_str(), &flags, read_only)?;
        drop(handle);
        created.keep();
        info!(volume.id = %id, device = %device.display(), staging = %staging.display(), fs_type = %fs, read_only, "staged");
        Ok(())
    })
    .await?;
    // xfs grows only mounted: one that is smaller than its device (a
    // restore or clone into a larger volume, or a volume expanded while
    // unstaged) grows now; one that fills it (its superblock says so) is
    // left alone without running xfs_growfs. A failure leaves the volume
    // usable at its old size and is retried by the kubelet's
    // NodeExpandVolume, so it is only logged.
    if fs == Filesystem::Xfs && !read_only {
        let would_grow =
            loopdev::size_bytes(&mounted_device).and_then(|device_bytes| filesystem::xfs_would_grow(&mounted_device, device_bytes));
        if !matches!(would_grow, Ok(Some(false))) {
            if let Err(e) = filesystem::grow(&mounted_device, fs.as_str(), &mounted_at).await {
                tracing::warn!(device = %mounted_device.display(), error = %e, "xfs not grown to its device at stage");
            }
        }
    }
    Ok(())
}

fn already_staged_filesystem(
    id: &str,
    staging: &Path,
    m: &MountInfo,
    wanted: Option<Filesystem>,
    read_only: bool,
) -> Result<(), NodeError> {
    let other = |detail: String| NodeError::StagedOtherwise { id: id.to_string(), path: staging.to_path_buf(), detail };
    if let Some(w) = wanted {
        if m.fs_type != w.as_str() {
            return Err(other(format!("with {} (the request asks for {w})", m.fs_type)));
        }
    }
    if m.is_read_only() != read_only {
        return Err(other(if m.is_read_only() {
            "read-only (the request's capability allows writing)".into()
        } else {
            "read-write (the request's capability is read-only)".into()
        }));
    }
    info!(volume.id = %id, staging = %staging.display(), "already staged");
    Ok(())
}

/// Removes a file this call created unless the call succeeds.
pub(super) struct CreatedFile {
    path: Option<PathBuf>,
    roots: AllowedRoots,
}

impl CreatedFile {
    /// Create `path` (checked) as an empty file; an existing file is reused
    /// (and left alone on failure), anything else is refused.
    pub(super) fn create(roots: &AllowedRoots, field: &'static str, path: &Path) -> Result<Self, NodeError> {
        let made = roots.create_file(field, path)?;
        Ok(CreatedFile { path: made.then(|| path.to_path_buf()), roots: roots.clone() })
    }

    pub(super) fn keep(mut self) {
        self.path = None;
    }
}

impl Drop for CreatedFile {
    fn drop(&mut self) {
        if let Some(p) = self.path.take() {
            let _ = self.roots.remove(&p, false);
        }
    }
}

fn stage_block(roots: &AllowedRoots, id: &str, image: &Path, staging: &Path, read_only: bool) -> Result<(), NodeError> {
    let table = mount_table()?;
    let marker = block_marker(staging, id);
    if let Some(m) = mount_at(&table, &marker) {
        return match loop_of_mount(m)? {
            Some(dev) if dev.backs(image) && dev.read_only == read_only => {
                info!(volume.id = %id, staging = %staging.display(), "already staged");
                Ok(())
            }
            Some(dev) if dev.backs(image) => Err(NodeError::StagedOtherwise {
                id: id.to_string(),
                path: staging.to_path_buf(),
                detail: format!("on {}, whose read-only setting differs from the request's access mode", dev.describe()),
            }),
            _ => Err(NodeError::Occupied { path: marker, detail: describe(m) }),
        };
    }
    if let Some(m) = mount_at(&table, staging) {
        return Err(match loop_of_mount(m)? {
            Some(dev) if dev.backs(image) => NodeError::StagedOtherwise {
                id: id.to_string(),
                path: staging.to_path_buf(),
                detail: "as a filesystem (the request asks for a raw block device)".into(),
            },
            _ => NodeError::Occupied { path: staging.to_path_buf(), detail: describe(m) },
        });
    }
    refuse_if_in_use(&table, id, image)?;
    detach_unused(id, image)?;
    let mut created = CreatedDirs::default();
    roots.create_dirs(staging, &mut created)?;
    let marker_file = CreatedFile::create(roots, "staging_target_path", &marker)?;
    let dev = loopdev::attach(image, AttachOptions::for_block(read_only))?.release();
    let bound = roots.open(&marker).and_then(|at| Ok(mount::bind_mount_on(&Pinned::trusted(&dev.path)?, &at, false)?));
    if let Err(e) = bound {
        let _ = loopdev::detach(&dev);
        return Err(e);
    }
    marker_file.keep();
    created.keep();
    info!(volume.id = %id, device = %dev.path.display(), staging = %staging.display(), read_only, "staged raw block");
    Ok(())
}

/// Unmount `path` while the top mount there passes `ours` (stacked mounts
/// from an earlier bug or crash included). Each unmount goes through the
/// folder opened beneath its root, and does not follow a link at the name.
pub(super) fn unmount_ours(
    roots: &AllowedRoots,
    path: &Path,
    ours: impl Fn(&MountInfo) -> Result<bool, NodeError>,
) -> Result<(), NodeError> {
    for _ in 0..8 {
        let table = mount_table()?;
        match mount_at(&table, path) {
            Some(m) if ours(m)? => {
                let (parent, name) = roots.open_parent_pinned(path)?;
                mount::unmount_in(&parent, name)?;
            }
            _ => return Ok(()),
        }
    }
    Ok(())
}

fn unstage(roots: &AllowedRoots, id: &str, image: &Path, staging: &Path) -> Result<(), NodeError> {
    let table = mount_table()?;
    let marker = block_marker(staging, id);
    let still_published = |others: Vec<PathBuf>| NodeError::InUse {
        id: id.to_string(),
        detail: format!("is still published at {}; unpublish it there first", list(others)),
    };

    if let Some(m) = mount_at(&table, &marker) {
        // A device that is no longer bound (detached by hand) still gets its
        // bind mount removed.
        if let Some(dev) = loop_of_mount(m)? {
            if !dev.backs(image) {
                return Err(NodeError::Foreign { id: id.to_string(), path: marker, detail: dev.describe() });
            }
        }
        let others: Vec<PathBuf> =
            mounts_of_image(&table, image)?.into_iter().map(|(m, _)| m.mount_point).filter(|p| *p != marker).collect();
        if !others.is_empty() {
            return Err(still_published(others));
        }
        unmount_ours(roots, &marker, |m| Ok(loop_of_mount(m)?.is_none_or(|d| d.backs(image))))?;
    }
    match std::fs::symlink_metadata(&marker) {
        Ok(m) if m.is_file() => roots.remove(&marker, false).map_err(NodeError::io(format!("removing {}", marker.display())))?,
        _ => {}
    }

    if let Some(m) = mount_at(&table, staging) {
        match loop_of_mount(m)? {
            Some(dev) if dev.backs(image) => {
                let others: Vec<PathBuf> =
                    mounts_of(&table, &dev).into_iter().map(|m| m.mount_point.clone()).filter(|p| p != staging).collect();
                if !others.is_empty() {
                    return Err(still_published(others));
                }
                unmount_ours(roots, staging, |m| Ok(loop_of_mount(m)?.is_some_and(|d| d.backs(image))))?;
            }
            _ => return Err(NodeError::Foreign { id: id.to_string(), path: staging.to_path_buf(), detail: describe(m) }),
        }
    }

    let detached = detach_unused(id, image)?;
    info!(volume.id = %id, staging = %staging.display(), detached, "unstaged");
    Ok(())
}
