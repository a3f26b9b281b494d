//! What the host says about a volume, read fresh on every call: which loop
//! devices are bound to its image (sysfs) and which mounts use them
//! (`/proc/self/mountinfo`). Nothing is remembered between calls, so a
//! restarted plugin sees exactly what the one before it left.
//!
//! Two kinds of mounts use a volume's loop device:
//! - a filesystem mount (the staging mount, and the bind mounts of it at
//!   each target): the mount table shows the device as `major:minor`;
//! - a bind mount of the device node onto a file (raw block staging and
//!   publishing): the mount table shows the `/dev` filesystem with the node's
//!   name as the root, e.g. `/loop3`, and `stat` on the file gives the device.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::attach::loopdev::{self, LoopDevice};
use crate::attach::MountInfo;

use super::error::NodeError;

/// A bound loop device as sysfs describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopInfo {
    /// `loopN`
    pub name: String,
    pub number: u32,
    pub major: u32,
    pub minor: u32,
    /// The image, with the kernel's " (deleted)" mark taken off.
    pub backing: PathBuf,
    /// The image was unlinked while the device held it.
    pub deleted: bool,
    pub read_only: bool,
}

impl LoopInfo {
    pub fn path(&self) -> PathBuf {
        Path::new("/dev").join(&self.name)
    }

    pub fn device(&self) -> LoopDevice {
        LoopDevice { path: self.path(), number: self.number, backing_file: self.backing.clone() }
    }

    /// Bound to `image` (also when the image has since been deleted).
    pub fn backs(&self, image: &Path) -> bool {
        // The sysfs path, or (bound from a mount namespace that is gone, by
        // a plugin container since restarted) the same device and inode.
        self.backing == image || (!self.deleted && loopdev::is_bound_to(self.number, image).unwrap_or(false))
    }

    pub fn describe(&self) -> String {
        format!(
            "{} ({}{}{})",
            self.path().display(),
            self.backing.display(),
            if self.deleted { ", deleted" } else { "" },
            if self.read_only { ", read-only" } else { "" }
        )
    }
}

fn sysfs_read(path: &Path) -> io::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s.trim_end_matches('\n').to_string())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

fn sysfs_err(path: &Path) -> impl FnOnce(io::Error) -> NodeError + '_ {
    move |e| NodeError::io(format!("reading {}", path.display()))(e)
}

/// The loop device `loopN`, when it is bound to a file.
pub fn loop_by_name(name: &str) -> Result<Option<LoopInfo>, NodeError> {
    let Some(number) = name.strip_prefix("loop").and_then(|n| n.parse::<u32>().ok()) else {
        return Ok(None);
    };
    let Some((backing, deleted)) = loopdev::sysfs_backing_file(number)? else {
        return Ok(None);
    };
    let base = Path::new("/sys/block").join(name);
    let dev_path = base.join("dev");
    let dev = sysfs_read(&dev_path).map_err(sysfs_err(&dev_path))?.unwrap_or_default();
    let Some((major, minor)) = dev.split_once(':').and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?))) else {
        return Ok(None);
    };
    let ro_path = base.join("ro");
    let read_only = sysfs_read(&ro_path).map_err(sysfs_err(&ro_path))?.as_deref() == Some("1");
    Ok(Some(LoopInfo { name: name.to_string(), number, major, minor, backing, deleted, read_only }))
}

/// The loop device with this device number, when it is one and is bound.
pub fn loop_by_devnum(major: u32, minor: u32) -> Result<Option<LoopInfo>, NodeError> {
    let link = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    let target = match std::fs::read_link(&link) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(sysfs_err(&link)(e)),
    };
    match target.file_name().and_then(|n| n.to_str()) {
        Some(name) => loop_by_name(name),
        None => Ok(None),
    }
}

/// The device number of `path` when it is a block device node (or a file
/// with one bind-mounted on it).
pub fn block_devnum(path: &Path) -> Result<Option<(u32, u32)>, NodeError> {
    match std::fs::metadata(path) {
        Ok(m) if m.file_type().is_block_device() => {
            let rdev = m.rdev();
            Ok(Some((rustix::fs::major(rdev), rustix::fs::minor(rdev))))
        }
        Ok(_) => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(NodeError::io(format!("inspecting {}", path.display()))(e)),
    }
}

/// The loop device of a filesystem mount, or of a device node bound at
/// `mount.mount_point`.
pub fn loop_of_mount(m: &MountInfo) -> Result<Option<LoopInfo>, NodeError> {
    if let Some(name) = bound_node_name(m) {
        return loop_by_name(&name);
    }
    if m.source.starts_with("/dev/loop") {
        return loop_by_devnum(m.major, m.minor);
    }
    Ok(None)
}

/// Whether `m` is a device node bound onto a file (raw block staging or
/// publishing) rather than a filesystem.
pub fn is_node_bind(m: &MountInfo) -> bool {
    bound_node_name(m).is_some()
}

/// For a bind mount of a `/dev/loopN` node: `loopN`.
fn bound_node_name(m: &MountInfo) -> Option<String> {
    if m.root.parent() != Some(Path::new("/")) {
        return None;
    }
    let name = m.root.file_name()?.to_str()?;
    let digits = name.strip_prefix("loop")?;
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())).then(|| name.to_string())
}

/// Every mount that uses `dev`: filesystem mounts of it and binds of its node.
pub fn mounts_of<'a>(table: &'a [MountInfo], dev: &LoopInfo) -> Vec<&'a MountInfo> {
    table
        .iter()
        .filter(|m| {
            bound_node_name(m).as_deref() == Some(dev.name.as_str())
                || (m.source.starts_with("/dev/loop") && (m.major, m.minor) == (dev.major, dev.minor))
        })
        .collect()
}

/// Every mount that uses a loop device of `image`, with that device.
pub fn mounts_of_image(table: &[MountInfo], image: &Path) -> Result<Vec<(MountInfo, LoopInfo)>, NodeError> {
    let mut out = Vec::new();
    for m in table {
        if let Some(dev) = loop_of_mount(m)? {
            if dev.backs(image) {
                out.push((m.clone(), dev));
            }
        }
    }
    Ok(out)
}

/// The top mount at `path` (where several are stacked, the last one).
pub fn mount_at<'a>(table: &'a [MountInfo], path: &Path) -> Option<&'a MountInfo> {
    table.iter().rev().find(|m| m.mount_point == path)
}

pub fn list(paths: impl IntoIterator<Item = PathBuf>) -> String {
    paths.into_iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
}

/// Detach the loop devices of `image` that no mount uses (left by a crash,
/// or by a read-only block publish), and wait until the kernel has let them
/// go. Stops at the first device still in use: that one belongs to a
/// staging or publish elsewhere. Returns how many were detached.
pub fn detach_unused(id: &str, image: &Path) -> Result<usize, NodeError> {
    let mut detached = 0;
    for _ in 0..16 {
        let Some(dev) = loopdev::find_by_backing_file(image)? else { break };
        let Some(info) = loop_by_name(&format!("loop{}", dev.number))? else { continue };
        let table = crate::attach::mount::mount_table()?;
        if !mounts_of(&table, &info).is_empty() {
            break;
        }
        loopdev::detach(&dev)?;
        if !wait_unbound(&info, Duration::from_secs(5))? {
            return Err(NodeError::InUse {
                id: id.to_string(),
                detail: format!(
                    "has loop device {} that some process still holds open; it is detached when closed (see `fuser -v {}`)",
                    info.path().display(),
                    info.path().display()
                ),
            });
        }
        tracing::info!(volume.id = %id, device = %info.path().display(), "detached unused loop device");
        detached += 1;
    }
    Ok(detached)
}

/// Wait up to `timeout` for the kernel to unbind `dev` from its image
/// (autoclear and a deferred detach happen asynchronously). False when it
/// is still bound.
pub fn wait_unbound(dev: &LoopInfo, timeout: Duration) -> Result<bool, NodeError> {
    let deadline = Instant::now() + timeout;
    loop {
        match loop_by_name(&dev.name)? {
            Some(now) if now.backing == dev.backing => {}
            _ => return Ok(true),
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attach::mount::parse_mountinfo;

    const TABLE: &str = "\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
24 27 0:6 / /dev rw,relatime - devtmpfs devtmpfs rw
40 27 7:3 / /k/staging/a rw,relatime - ext4 /dev/loop3 rw
41 27 7:3 / /k/pods/p1/mount rw,relatime - ext4 /dev/loop3 rw
42 27 0:6 /loop5 /k/staging/b/vol-b rw,relatime - devtmpfs devtmpfs rw
43 27 0:6 /loop5 /k/pods/p2/dev rw,relatime - devtmpfs devtmpfs rw
44 27 0:6 /loop-control /k/odd rw,relatime - devtmpfs devtmpfs rw
45 27 7:30 / /k/other rw,relatime - xfs /dev/loop30 rw
";

    fn dev(name: &str, minor: u32) -> LoopInfo {
        LoopInfo {
            name: name.into(),
            number: minor,
            major: 7,
            minor,
            backing: PathBuf::from(format!("/pool/volumes/{name}.img")),
            deleted: false,
            read_only: false,
        }
    }

    #[test]
    fn finds_filesystem_mounts_and_node_binds_of_a_device() {
        let t = parse_mountinfo(TABLE).unwrap();
        let fs: Vec<_> = mounts_of(&t, &dev("loop3", 3)).iter().map(|m| m.mount_point.clone()).collect();
        assert_eq!(fs, [PathBuf::from("/k/staging/a"), PathBuf::from("/k/pods/p1/mount")]);
        let block: Vec<_> = mounts_of(&t, &dev("loop5", 5)).iter().map(|m| m.mount_point.clone()).collect();
        assert_eq!(block, [PathBuf::from("/k/staging/b/vol-b"), PathBuf::from("/k/pods/p2/dev")]);
        assert!(mounts_of(&t, &dev("loop30", 31)).is_empty());
        assert_eq!(bound_node_name(&t[6]), None, "loop-control is not a loop device");
        assert_eq!(mount_at(&t, Path::new("/k/pods/p2/dev")).unwrap().mount_id, 43);
        assert!(mount_at(&t, Path::new("/k/pods")).is_none());
    }

    #[test]
    fn unknown_devices_are_none() {
        assert_eq!(loop_by_name("sda").unwrap(), None);
        assert_eq!(loop_by_name("loopx").unwrap(), None);
        assert_eq!(loop_by_devnum(4095, 1048575).unwrap(), None);
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(block_devnum(dir.path()).unwrap(), None);
        assert_eq!(block_devnum(&dir.path().join("missing")).unwrap(), None);
    }
}
