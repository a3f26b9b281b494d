//! NodeGetVolumeStats (usage and condition) and NodeExpandVolume.

use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::attach::mount::mount_table;
use crate::attach::{filesystem, loopdev, MountInfo};
use crate::csi;
use crate::csi::volume_usage::Unit;

use super::capability;
use super::error::NodeError;
use super::host::{block_devnum, is_node_bind, loop_by_devnum, loop_of_mount, mount_at, mounts_of, mounts_of_image, LoopInfo};
use super::stage::{block_marker, describe};
use super::{blocking, check_id, Node};

/// A device read that takes longer than this makes the volume abnormal.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// What a volume path turned out to be.
enum Found {
    /// A mount of the volume's filesystem (staging or target).
    Filesystem { mount: Box<MountInfo>, dev: LoopInfo, mounts: Vec<MountInfo> },
    /// The volume's device node (a block target, or a block staging marker).
    Block { dev: LoopInfo },
}

impl Found {
    fn dev(&self) -> &LoopInfo {
        match self {
            Found::Filesystem { dev, .. } | Found::Block { dev } => dev,
        }
    }
}

/// Look at `path` and say whether (and how) volume `id` is there.
fn find_volume_at(id: &str, image: &Path, path: &Path) -> Result<Found, NodeError> {
    let not_here = |detail: String| NodeError::NotAtPath { id: id.to_string(), path: path.to_path_buf(), detail };
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(not_here("it does not exist".into())),
        Err(e) => return Err(NodeError::io(format!("inspecting {}", path.display()))(e)),
    };
    if meta.file_type().is_block_device() {
        let (major, minor) = block_devnum(path)?.unwrap_or_default();
        return match loop_by_devnum(major, minor)? {
            Some(dev) if dev.backs(image) => Ok(Found::Block { dev }),
            Some(dev) => Err(not_here(format!("it is {}", dev.describe()))),
            None => Err(not_here(format!("it is block device {major}:{minor}, not a loop device of this volume"))),
        };
    }
    if !meta.is_dir() {
        return Err(not_here("it is neither a folder nor a device".into()));
    }
    let table = mount_table()?;
    if let Some(m) = mount_at(&table, path) {
        return match loop_of_mount(m)? {
            Some(dev) if dev.backs(image) && !is_node_bind(m) => {
                let mounts = mounts_of(&table, &dev).into_iter().cloned().collect();
                Ok(Found::Filesystem { mount: Box::new(m.clone()), dev, mounts })
            }
            _ => Err(not_here(format!("it holds {}", describe(m)))),
        };
    }
    // The staging folder of a raw block volume.
    let marker = block_marker(path, id);
    if mount_at(&table, &marker).is_some() {
        return find_volume_at(id, image, &marker);
    }
    Err(not_here("nothing is mounted there".into()))
}

fn usage(unit: Unit, total: u64, available: Option<u64>, used: Option<u64>) -> csi::VolumeUsage {
    let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    csi::VolumeUsage {
        unit: unit as i32,
        total: clamp(total),
        available: available.map(clamp).unwrap_or(0),
        used: used.map(clamp).unwrap_or(0),
    }
}

fn abnormal(message: String) -> csi::VolumeCondition {
    csi::VolumeCondition { abnormal: true, message }
}

/// Read the first block of the device past the page cache: an I/O error or
/// a hang shows here before a pod notices.
async fn probe_read(device: PathBuf) -> Option<String> {
    let shown = device.display().to_string();
    let read = tokio::task::spawn_blocking(move || -> io::Result<()> {
        let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&device)?;
        // O_DIRECT wants an aligned buffer.
        let mut buf = vec![0u8; 8192];
        let off = buf.as_ptr().align_offset(4096);
        f.read_exact_at(&mut buf[off..off + 4096], 0)
    });
    match tokio::time::timeout(PROBE_TIMEOUT, read).await {
        Ok(Ok(Ok(()))) => None,
        Ok(Ok(Err(e))) => Some(format!("reading {shown} failed: {e}; check the node's kernel log and the pool's disk")),
        Ok(Err(e)) => Some(format!("reading {shown} failed: {e}")),
        Err(_) => Some(format!(
            "reading {shown} did not finish within {} s; the pool's disk may be failing or overloaded",
            PROBE_TIMEOUT.as_secs()
        )),
    }
}

/// Why the volume is not healthy, checked cheapest first; `None` if it is.
fn host_condition(known: bool, image: &Path, found: &Found) -> Option<String> {
    let dev = found.dev();
    if dev.deleted || !image.exists() {
        return Some(format!(
            "its image {} was deleted while attached as {}; data written now is lost when it is detached: copy it out, then unpublish and unstage",
            image.display(),
            dev.path().display()
        ));
    }
    if !known {
        return Some("the node's pool has no record of this volume any more; unpublish and unstage it".into());
    }
    if let Found::Filesystem { mounts, .. } = found {
        // A read-write mount on a read-only superblock: the filesystem
        // switched itself to read-only, which they do on errors.
        let flipped = mounts.iter().any(|m| !m.is_read_only() && m.super_options.iter().any(|o| o == "ro"));
        if flipped {
            return Some(format!(
                "its filesystem on {} went read-only, usually after I/O or consistency errors; see the node's kernel log, then unstage it and run fsck",
                dev.path().display()
            ));
        }
        let errors = std::fs::read_to_string(format!("/sys/fs/ext4/{}/errors_count", dev.name))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if errors > 0 {
            return Some(format!("ext4 on {} recorded {errors} error(s); unstage it and run fsck.ext4", dev.path().display()));
        }
    }
    None
}

impl Node {
    /// For the calls that only look (stats, expand), a path where the
    /// plugin never puts a volume cannot hold one: NOT_FOUND, as the spec
    /// (and csi-sanity) expect, with the reason. A missing path is still
    /// INVALID_ARGUMENT.
    fn lookup_path(&self, id: &str, field: &'static str, raw: &str) -> Result<PathBuf, NodeError> {
        self.roots.check(field, raw).map_err(|e| match e {
            NodeError::InvalidPath { path, reason, .. } => NodeError::NotAtPath {
                id: id.to_string(),
                path: PathBuf::from(path),
                detail: format!("{field} is not a path the plugin uses: {reason}"),
            },
            other => other,
        })
    }

    pub(super) async fn stats(&self, req: csi::NodeGetVolumeStatsRequest) -> Result<csi::NodeGetVolumeStatsResponse, NodeError> {
        let id = check_id(&req.volume_id)?;
        let path = self.lookup_path(&id, "volume_path", &req.volume_path)?;
        if !req.staging_target_path.is_empty() {
            self.lookup_path(&id, "staging_target_path", &req.staging_target_path)?;
        }
        // Not required: a volume deleted from the pool while in use is
        // still reported, as abnormal.
        let (image, known) = self.image_of(&id, &path).await?;
        let (found, problem, usage) = {
            let (id, path, image) = (id.clone(), path.clone(), image.clone());
            blocking(move || {
                let found = find_volume_at(&id, &image, &path)?;
                let problem = host_condition(known, &image, &found);
                let usage: Result<Vec<csi::VolumeUsage>, NodeError> = match &found {
                    Found::Filesystem { .. } => filesystem::stats(&path)
                        .map(|s| {
                            vec![
                                usage(Unit::Bytes, s.total_bytes, Some(s.available_bytes), Some(s.used_bytes)),
                                usage(Unit::Inodes, s.total_inodes, Some(s.free_inodes), Some(s.used_inodes)),
                            ]
                        })
                        .map_err(Into::into),
                    Found::Block { dev } => {
                        loopdev::size_bytes(&dev.path()).map(|total| vec![usage(Unit::Bytes, total, None, None)]).map_err(Into::into)
                    }
                };
                Ok((found, problem, usage))
            })
            .await?
        };
        let dev_path = found.dev().path();
        let problem = match problem {
            Some(p) => Some(p),
            None => probe_read(dev_path.clone()).await,
        };
        let (usage, problem) = match usage {
            Ok(u) => (u, problem),
            Err(e) => (vec![], problem.or(Some(format!("cannot read its usage: {e}")))),
        };
        let condition = match problem {
            Some(p) => abnormal(p),
            None => csi::VolumeCondition {
                abnormal: false,
                message: format!("attached as {}; its image is present and reads succeed", dev_path.display()),
            },
        };
        if condition.abnormal {
            tracing::warn!(volume.id = %id, path = %path.display(), condition = %condition.message, "volume is abnormal");
        }
        Ok(csi::NodeGetVolumeStatsResponse { usage, volume_condition: Some(condition) })
    }

    pub(super) async fn expand(&self, req: csi::NodeExpandVolumeRequest) -> Result<csi::NodeExpandVolumeResponse, NodeError> {
        let id = check_id(&req.volume_id)?;
        let path = self.lookup_path(&id, "volume_path", &req.volume_path)?;
        if !req.staging_target_path.is_empty() {
            self.lookup_path(&id, "staging_target_path", &req.staging_target_path)?;
        }
        if req.volume_capability.is_some() {
            capability::parse(req.volume_capability.as_ref())?;
        }
        let (required, limit) = match &req.capacity_range {
            Some(r) if r.required_bytes < 0 || r.limit_bytes < 0 => {
                return Err(NodeError::Invalid { what: "capacity_range", reason: "sizes must not be negative".into() })
            }
            Some(r) => (r.required_bytes as u64, r.limit_bytes as u64),
            None => (0, 0),
        };
        let _guard = self.inflight.try_begin(&id)?;
        // A local volume's size is its record's; a remote one (attached here
        // from its owner over NBD) shows its new size once the attachment
        // has asked the owner.
        let (image, size_bytes) = match self.config.pool.get_volume(&id) {
            Ok(record) => (self.config.pool.volume_image(&id), record.size_bytes),
            Err(e) => match (self.image_of(&id, &path).await?, &self.remote) {
                ((backing, true), Some(remote)) => {
                    let size = remote.grow(&id).await?;
                    (backing, size)
                }
                _ => return Err(e.into()),
            },
        };
        if required > size_bytes {
            return Err(NodeError::CapacityRange {
                detail: format!(
                    "{required} bytes asked, but volume {id:?} is {size_bytes} bytes in the pool; ControllerExpandVolume grows it first"
                ),
            });
        }
        if limit > 0 && size_bytes > limit {
            return Err(NodeError::CapacityRange {
                detail: format!("volume {id:?} is already {size_bytes} bytes, above limit_bytes {limit}"),
            });
        }
        let found = {
            let (id, path, image) = (id.clone(), path.clone(), image.clone());
            blocking(move || find_volume_at(&id, &image, &path)).await?
        };
        let size = match found {
            Found::Block { dev } => {
                // Every device of the image: the staged one and any
                // read-only publish devices.
                blocking(move || {
                    let mut devs: Vec<LoopInfo> = mounts_of_image(&mount_table()?, &image)?.into_iter().map(|(_, d)| d).collect();
                    devs.push(dev.clone());
                    devs.sort_by(|a, b| a.name.cmp(&b.name));
                    devs.dedup_by(|a, b| a.name == b.name);
                    let mut size = 0;
                    for d in devs {
                        let s = loopdev::refresh_capacity(&d.device())?;
                        if d.name == dev.name {
                            size = s;
                        }
                    }
                    Ok(size)
                })
                .await?
            }
            Found::Filesystem { mount, dev, .. } => {
                let device = dev.device();
                let size = blocking(move || Ok(loopdev::refresh_capacity(&device)?)).await?;
                filesystem::grow(&dev.path(), &mount.fs_type, &path).await?;
                size
            }
        };
        tracing::info!(volume.id = %id, path = %path.display(), capacity_bytes = size, "expanded on the node");
        Ok(csi::NodeExpandVolumeResponse { capacity_bytes: i64::try_from(size).unwrap_or(i64::MAX) })
    }
}
