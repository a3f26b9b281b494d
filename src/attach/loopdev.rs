//! Loop devices through the kernel's ioctls (no losetup): a local volume's
//! image file becomes a block device.
//!
//! With `autoclear` the kernel detaches the device when its last user closes
//! it, so a device under a mounted filesystem goes away on its own at unmount
//! and a crashed plugin leaks nothing. The flip side: until something else
//! holds the device, the [`LoopHandle`] returned by [`attach`] must stay alive.
//! A bind mount of the device node does not hold the device open, so raw block
//! volumes are attached with `autoclear: false` and detached explicitly.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustix::io::Errno;
use rustix::ioctl::{self, Getter, IntegerSetter, Ioctl, IoctlOutput, NoArg, Opcode, Setter};

use super::{AttachError, Result};

// linux/loop.h
const LOOP_SET_FD: Opcode = 0x4C00;
const LOOP_CLR_FD: Opcode = 0x4C01;
const LOOP_SET_STATUS64: Opcode = 0x4C04;
const LOOP_GET_STATUS64: Opcode = 0x4C05;
const LOOP_SET_CAPACITY: Opcode = 0x4C07;
const LOOP_SET_DIRECT_IO: Opcode = 0x4C08;
const LOOP_CONFIGURE: Opcode = 0x4C0A;
const LOOP_CTL_GET_FREE: Opcode = 0x4C82;
// linux/fs.h: _IOR(0x12, 114, size_t)
const BLKGETSIZE64: Opcode = ioctl::opcode::read::<u64>(0x12, 114);

const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_FLAGS_DIRECT_IO: u32 = 16;
/// The logical sector size every volume's loop device presents.
pub const VOLUME_SECTOR_SIZE: u32 = 512;

const LO_NAME_SIZE: usize = 64;

/// How many free devices to try before giving up when other processes keep
/// taking the one the kernel offered.
const MAX_ATTEMPTS: u32 = 16;

/// `struct loop_info64`.
#[repr(C)]
#[derive(Clone, Copy)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);
const _: () = assert!(std::mem::size_of::<LoopConfig>() == 304);

impl LoopInfo64 {
    fn new(flags: u32, backing: &Path) -> Self {
        let mut info = LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: flags,
            lo_file_name: [0; LO_NAME_SIZE],
            lo_crypt_name: [0; LO_NAME_SIZE],
            lo_encrypt_key: [0; 32],
            lo_init: [0; 2],
        };
        // Informational only (sysfs has the full path); keep the NUL.
        let name = backing.as_os_str().as_bytes();
        let n = name.len().min(LO_NAME_SIZE - 1);
        info.lo_file_name[..n].copy_from_slice(&name[..n]);
        info
    }
}

/// `LOOP_CTL_GET_FREE` answers with the device number as the return value,
/// which none of rustix's ready-made patterns hands back.
struct GetFree;

// SAFETY: LOOP_CTL_GET_FREE takes no argument and touches no user memory.
unsafe impl Ioctl for GetFree {
    type Output = u32;
    const IS_MUTATING: bool = false;
    fn opcode(&self) -> Opcode {
        LOOP_CTL_GET_FREE
    }
    fn as_ptr(&mut self) -> *mut std::ffi::c_void {
        std::ptr::null_mut()
    }
    unsafe fn output_from_ptr(out: IoctlOutput, _: *mut std::ffi::c_void) -> rustix::io::Result<u32> {
        u32::try_from(out).map_err(|_| Errno::RANGE)
    }
}

/// A loop device bound to a backing file.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LoopDevice {
    /// `/dev/loopN`.
    pub path: PathBuf,
    pub number: u32,
    /// Canonical path of the image file.
    pub backing_file: PathBuf,
}

impl LoopDevice {
    fn new(number: u32, backing_file: PathBuf) -> Self {
        LoopDevice { path: PathBuf::from(format!("/dev/loop{number}")), number, backing_file }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttachOptions {
    /// The device refuses writes (the image is opened read-only too).
    pub read_only: bool,
    /// Ask for direct I/O, which skips the double page cache. Falls back to
    /// buffered I/O (with a log line) when the backing filesystem refuses.
    pub direct_io: bool,
    /// Detach when the last user closes the device. Use `true` when a
    /// filesystem will be mounted from it, `false` for raw block volumes
    /// published by bind mount (which does not keep the device open).
    pub autoclear: bool,
}

impl AttachOptions {
    /// For a filesystem volume: the mount keeps the device alive.
    pub fn for_filesystem(read_only: bool) -> Self {
        AttachOptions { read_only, direct_io: true, autoclear: true }
    }

    /// For a raw block volume: stays attached until [`detach`].
    pub fn for_block(read_only: bool) -> Self {
        AttachOptions { read_only, direct_io: true, autoclear: false }
    }
}

/// A freshly attached device and an open descriptor on it.
///
/// With `autoclear`, dropping this before anything else opens the device
/// (e.g. before mounting it) detaches it again.
#[derive(Debug)]
pub struct LoopHandle {
    pub device: LoopDevice,
    /// Whether the kernel accepted direct I/O.
    pub direct_io: bool,
    pub read_only: bool,
    fd: OwnedFd,
}

impl LoopHandle {
    /// Close the descriptor and keep the description.
    pub fn release(self) -> LoopDevice {
        drop(self.fd);
        self.device
    }
}

impl AsFd for LoopHandle {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Attach `backing_file` (a regular file or block device) to a free loop
/// device. Does not look for an existing attachment: call
/// [`find_by_backing_file`] first.
pub fn attach(backing_file: &Path, opts: AttachOptions) -> Result<LoopHandle> {
    attach_with(backing_file, opts, true)
}

fn attach_with(backing_file: &Path, opts: AttachOptions, mut try_configure: bool) -> Result<LoopHandle> {
    let backing_path =
        backing_file.canonicalize().map_err(|error| AttachError::OpenBackingFile { path: backing_file.to_path_buf(), error })?;
    let backing = OpenOptions::new()
        .read(true)
        .write(!opts.read_only)
        .open(&backing_path)
        .map_err(|error| AttachError::OpenBackingFile { path: backing_path.clone(), error })?;
    let meta = backing.metadata().map_err(|error| AttachError::OpenBackingFile { path: backing_path.clone(), error })?;
    if !(meta.file_type().is_file() || meta.file_type().is_block_device()) {
        return Err(AttachError::BadBackingFile { path: backing_path, reason: "it is neither a regular file nor a block device".into() });
    }

    let control =
        OpenOptions::new().read(true).write(true).open("/dev/loop-control").map_err(|error| AttachError::LoopControl { error })?;

    for attempt in 1..=MAX_ATTEMPTS {
        // SAFETY: GetFree matches LOOP_CTL_GET_FREE (no argument).
        let number = unsafe { ioctl::ioctl(&control, GetFree) }.map_err(|e| AttachError::LoopControl { error: e.into() })?;
        let device = LoopDevice::new(number, backing_path.clone());
        let dev = match OpenOptions::new().read(true).write(true).open(&device.path) {
            Ok(f) => f,
            // The node may not be in /dev yet; the next round gets it.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                backoff(attempt);
                continue;
            }
            Err(error) => return Err(AttachError::OpenDevice { device: device.path, error }),
        };
        match bind(&dev, &device, &backing, opts, &mut try_configure)? {
            Bound::Busy => {
                tracing::debug!(device = %device.path.display(), attempt, "loop device taken by another process, trying the next free one");
                backoff(attempt);
            }
            Bound::Done => {
                let flags = get_status(&dev, &device.path)?.lo_flags;
                let direct_io = flags & LO_FLAGS_DIRECT_IO != 0;
                let read_only = flags & LO_FLAGS_READ_ONLY != 0;
                if opts.direct_io && !direct_io {
                    tracing::warn!(
                        device = %device.path.display(),
                        backing_file = %backing_path.display(),
                        "backing filesystem refused direct I/O; the loop device uses buffered I/O"
                    );
                }
                tracing::info!(
                    device = %device.path.display(),
                    backing_file = %backing_path.display(),
                    direct_io,
                    read_only,
                    autoclear = opts.autoclear,
                    "attached loop device"
                );
                return Ok(LoopHandle { device, direct_io, read_only, fd: dev.into() });
            }
        }
    }
    Err(AttachError::LoopBusy { backing_file: backing_path, attempts: MAX_ATTEMPTS })
}

fn backoff(attempt: u32) {
    std::thread::sleep(Duration::from_millis(2 * u64::from(attempt)));
}

enum Bound {
    Done,
    /// Another process bound this device between GET_FREE and our call.
    Busy,
}

/// Bind `backing` to the open device: LOOP_CONFIGURE in one step where the
/// kernel has it (5.8+), LOOP_SET_FD + LOOP_SET_STATUS64 otherwise.
fn bind(dev: &File, device: &LoopDevice, backing: &File, opts: AttachOptions, try_configure: &mut bool) -> Result<Bound> {
    let mut flags = 0;
    if opts.autoclear {
        flags |= LO_FLAGS_AUTOCLEAR;
    }
    if opts.read_only {
        flags |= LO_FLAGS_READ_ONLY;
    }
    let ioctl_err = |op, e: Errno| AttachError::LoopIoctl { op, device: device.path.clone(), error: e.into() };

    if *try_configure {
        let mut dio = opts.direct_io;
        loop {
            let f = if dio { flags | LO_FLAGS_DIRECT_IO } else { flags };
            match configure(dev, backing, f, &device.backing_file) {
                Ok(()) => return Ok(Bound::Done),
                Err(Errno::BUSY) => return Ok(Bound::Busy),
                // Some kernels reject LO_FLAGS_DIRECT_IO outright when the
                // backing file cannot do O_DIRECT; others drop it silently.
                Err(Errno::INVAL) if dio => {
                    tracing::warn!(
                        device = %device.path.display(),
                        backing_file = %device.backing_file.display(),
                        "LOOP_CONFIGURE with direct I/O refused (EINVAL); retrying with buffered I/O"
                    );
                    dio = false;
                }
                Err(Errno::INVAL) | Err(Errno::NOTTY) => {
                    tracing::info!(device = %device.path.display(), "LOOP_CONFIGURE not supported; using LOOP_SET_FD");
                    *try_configure = false;
                    break;
                }
                Err(e) => return Err(ioctl_err("LOOP_CONFIGURE", e)),
            }
        }
    }

    // SAFETY: LOOP_SET_FD takes a file descriptor by value; `backing` stays
    // open for the call and the kernel takes its own reference.
    match unsafe { ioctl::ioctl(dev, IntegerSetter::<LOOP_SET_FD>::new_usize(backing.as_raw_fd() as usize)) } {
        Ok(()) => {}
        Err(Errno::BUSY) => return Ok(Bound::Busy),
        Err(e) => return Err(ioctl_err("LOOP_SET_FD", e)),
    }
    let info = LoopInfo64::new(flags & !LO_FLAGS_READ_ONLY, &device.backing_file);
    // SAFETY: LOOP_SET_STATUS64 reads a struct loop_info64.
    if let Err(e) = unsafe { ioctl::ioctl(dev, Setter::<LOOP_SET_STATUS64, LoopInfo64>::new(info)) } {
        // Do not leave a half-configured device (without autoclear) behind.
        // SAFETY: LOOP_CLR_FD takes no argument.
        let _ = unsafe { ioctl::ioctl(dev, NoArg::<LOOP_CLR_FD>::new()) };
        return Err(ioctl_err("LOOP_SET_STATUS64", e));
    }
    if opts.direct_io {
        // SAFETY: LOOP_SET_DIRECT_IO takes an integer (0 or 1).
        if let Err(e) = unsafe { ioctl::ioctl(dev, IntegerSetter::<LOOP_SET_DIRECT_IO>::new_usize(1)) } {
            tracing::warn!(
                device = %device.path.display(),
                backing_file = %device.backing_file.display(),
                error = %io::Error::from(e),
                "backing filesystem refused direct I/O; the loop device uses buffered I/O"
            );
        }
    }
    Ok(Bound::Done)
}

fn configure(dev: &File, backing: &File, flags: u32, name: &Path) -> std::result::Result<(), Errno> {
    let config = LoopConfig {
        fd: backing.as_raw_fd() as u32,
        // Always 512-byte logical sectors. Left to the kernel (0), a loop
        // device with direct I/O takes the backing disk's sector size, so on
        // a 4Kn disk the same image shows 4096 on one attach and 512 on
        // another (buffered), and a file system made on the one does not
        // mount on the other (xfs: "device supports 4096 byte sectors").
        // Where 512 is too small for direct I/O on the backing disk the
        // kernel refuses direct I/O, and the caller attaches buffered.
        block_size: VOLUME_SECTOR_SIZE,
        info: LoopInfo64::new(flags, name),
        reserved: [0; 8],
    };
    // SAFETY: LOOP_CONFIGURE reads a struct loop_config whose fd stays open
    // for the call.
    unsafe { ioctl::ioctl(dev, Setter::<LOOP_CONFIGURE, LoopConfig>::new(config)) }
}

fn get_status(dev: &File, path: &Path) -> Result<LoopInfo64> {
    // SAFETY: LOOP_GET_STATUS64 fills a struct loop_info64.
    unsafe { ioctl::ioctl(dev, Getter::<LOOP_GET_STATUS64, LoopInfo64>::new()) }.map_err(|e| AttachError::LoopIoctl {
        op: "LOOP_GET_STATUS64",
        device: path.to_path_buf(),
        error: e.into(),
    })
}

/// What sysfs says backs loop device `number`: `None` when it is not bound,
/// otherwise the path and whether the file has been deleted since. The one
/// reader of a loop device's `backing_file` (the node's host view uses it
/// too).
pub fn sysfs_backing_file(number: u32) -> Result<Option<(PathBuf, bool)>> {
    let path = PathBuf::from(format!("/sys/block/loop{number}/loop/backing_file"));
    let raw = match std::fs::read(&path) {
        Ok(raw) => raw,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        // A device being removed as it is read (another caller detached it
        // and the kernel is tearing it down): no longer bound either.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENODEV) | Some(libc::ENXIO)) => return Ok(None),
        Err(error) => return Err(AttachError::Sysfs { path, error }),
    };
    let raw = raw.strip_suffix(b"\n").unwrap_or(&raw);
    // d_path() marks an unlinked file with this suffix.
    Ok(Some(match raw.strip_suffix(b" (deleted)") {
        Some(name) => (PathBuf::from(std::ffi::OsStr::from_bytes(name)), true),
        None => (PathBuf::from(std::ffi::OsStr::from_bytes(raw)), false),
    }))
}

/// Every bound loop device, lowest number first, with the path sysfs shows
/// for its file (without the mark of a deleted one).
pub fn bound_devices() -> Result<Vec<LoopDevice>> {
    let mut out = Vec::new();
    for number in loop_numbers()? {
        if let Some((path, _)) = sysfs_backing_file(number)? {
            out.push(LoopDevice::new(number, path));
        }
    }
    Ok(out)
}

/// Whether loop device `number` reads and writes its file with direct I/O
/// (sysfs `loop/dio`); `None` when there is no such device.
pub fn direct_io(number: u32) -> Result<Option<bool>> {
    let path = PathBuf::from(format!("/sys/block/loop{number}/loop/dio"));
    match std::fs::read_to_string(&path) {
        Ok(s) => Ok(Some(s.trim() == "1")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(AttachError::Sysfs { path, error }),
    }
}

/// Numbers of the loop devices the kernel knows, in order.
fn loop_numbers() -> Result<Vec<u32>> {
    let dir = Path::new("/sys/block");
    let entries = std::fs::read_dir(dir).map_err(|error| AttachError::Sysfs { path: dir.to_path_buf(), error })?;
    let mut numbers: Vec<u32> =
        entries.filter_map(|e| e.ok()).filter_map(|e| e.file_name().to_str()?.strip_prefix("loop")?.parse().ok()).collect();
    numbers.sort_unstable();
    Ok(numbers)
}

/// The device and inode of the file loop device `number` is bound to
/// (LOOP_GET_STATUS64), `None` when it is not bound.
///
/// The path sysfs shows depends on the mount namespace the device was bound
/// from: once that namespace is gone (the node plugin's container
/// restarted), the path is relative to the file system's root, e.g.
/// `/volumes/vol-x.img` instead of `/var/lib/cinderblock/pool/volumes/vol-x.img`.
/// The identity does not change.
fn backing_identity(number: u32) -> Result<Option<(u64, u64)>> {
    let path = PathBuf::from(format!("/dev/loop{number}"));
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENXIO)) => return Ok(None),
        Err(error) => return Err(AttachError::OpenDevice { device: path, error }),
    };
    // SAFETY: LOOP_GET_STATUS64 fills a struct loop_info64.
    match unsafe { ioctl::ioctl(&file, Getter::<LOOP_GET_STATUS64, LoopInfo64>::new()) } {
        Ok(info) => Ok(Some((info.lo_device, info.lo_inode))),
        Err(Errno::NXIO) => Ok(None),
        // Bound to a file whose FUSE server is gone (a remote attachment of
        // a node plugin that died): not bound to any file that exists.
        Err(Errno::NOTCONN) => Ok(None),
        Err(e) => Err(AttachError::LoopIoctl { op: "LOOP_GET_STATUS64", device: path, error: e.into() }),
    }
}

/// Whether loop device `number` is bound to the existing file `file` (same
/// device and inode), whatever path sysfs shows for it.
pub fn is_bound_to(number: u32, file: &Path) -> Result<bool> {
    use std::os::unix::fs::MetadataExt;
    let meta = match std::fs::metadata(file) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(error) => return Err(AttachError::OpenBackingFile { path: file.to_path_buf(), error }),
    };
    Ok(backing_identity(number)? == Some((meta.dev(), meta.ino())))
}

/// The loop device (lowest number first) backed by `backing_file`.
///
/// When the file still exists, only a device bound to that very file
/// matches (by path, or by device and inode when the path sysfs shows was
/// bound from another mount namespace); one still bound to an older,
/// deleted file of the same name does not. When the file is gone, a device
/// bound to the deleted file matches, so it can be found and detached.
pub fn find_by_backing_file(backing_file: &Path) -> Result<Option<LoopDevice>> {
    let (wanted, wanted_deleted) = match backing_file.canonicalize() {
        Ok(p) => (p, false),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let parent = backing_file.parent().unwrap_or(Path::new("/"));
            let parent = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
            let (Some(name), Ok(parent)) = (backing_file.file_name(), parent.canonicalize()) else {
                return Ok(None);
            };
            (parent.join(name), true)
        }
        Err(error) => return Err(AttachError::OpenBackingFile { path: backing_file.to_path_buf(), error }),
    };
    for number in loop_numbers()? {
        let Some((path, deleted)) = sysfs_backing_file(number)? else {
            continue;
        };
        if path == wanted && deleted == wanted_deleted {
            return Ok(Some(LoopDevice::new(number, path)));
        }
        if !wanted_deleted && !deleted && path != wanted && is_bound_to(number, &wanted)? {
            return Ok(Some(LoopDevice::new(number, path)));
        }
    }
    Ok(None)
}

/// Detach the device. Already detached is fine. If the device number now
/// backs a different file (it was auto-cleared and reused), it is left alone.
/// While the device is still open elsewhere (mounted), the kernel detaches
/// it when the last user closes it.
pub fn detach(dev: &LoopDevice) -> Result<()> {
    match sysfs_backing_file(dev.number)? {
        None => return Ok(()),
        Some((path, _)) if path != dev.backing_file => {
            tracing::warn!(
                device = %dev.path.display(),
                expected = %dev.backing_file.display(),
                found = %path.display(),
                "loop device now backs another file; not detaching it"
            );
            return Ok(());
        }
        Some(_) => {}
    }
    let file = match File::open(&dev.path) {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) || e.raw_os_error() == Some(libc::ENXIO) => return Ok(()),
        Err(error) => return Err(AttachError::OpenDevice { device: dev.path.clone(), error }),
    };
    // SAFETY: LOOP_CLR_FD takes no argument.
    match unsafe { ioctl::ioctl(&file, NoArg::<LOOP_CLR_FD>::new()) } {
        Ok(()) | Err(Errno::NXIO) => {
            tracing::info!(device = %dev.path.display(), backing_file = %dev.backing_file.display(), "detached loop device");
            Ok(())
        }
        Err(e) => Err(AttachError::LoopIoctl { op: "LOOP_CLR_FD", device: dev.path.clone(), error: e.into() }),
    }
}

/// Make the device pick up a grown backing file (online expansion).
/// Returns the new size in bytes.
pub fn refresh_capacity(dev: &LoopDevice) -> Result<u64> {
    let file = File::open(&dev.path).map_err(|error| AttachError::OpenDevice { device: dev.path.clone(), error })?;
    // SAFETY: LOOP_SET_CAPACITY takes no argument.
    unsafe { ioctl::ioctl(&file, NoArg::<LOOP_SET_CAPACITY>::new()) }.map_err(|e| AttachError::LoopIoctl {
        op: "LOOP_SET_CAPACITY",
        device: dev.path.clone(),
        error: e.into(),
    })?;
    block_size(&file, &dev.path)
}

/// Size of any block device in bytes (BLKGETSIZE64).
pub fn size_bytes(device: &Path) -> Result<u64> {
    let file = File::open(device).map_err(|error| AttachError::OpenDevice { device: device.to_path_buf(), error })?;
    block_size(&file, device)
}

fn block_size(file: &File, device: &Path) -> Result<u64> {
    // SAFETY: BLKGETSIZE64 writes a u64.
    unsafe { ioctl::ioctl(file, Getter::<BLKGETSIZE64, u64>::new()) }.map_err(|e| AttachError::LoopIoctl {
        op: "BLKGETSIZE64",
        device: device.to_path_buf(),
        error: e.into(),
    })
}

/// For volume health: the device is still bound to its image, and the image
/// has not been deleted or moved away.
pub fn backing_file_exists(dev: &LoopDevice) -> bool {
    match sysfs_backing_file(dev.number) {
        Ok(Some((path, deleted))) => !deleted && path == dev.backing_file && path.exists(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attach::testutil::{running_as_root, Cleanup};
    use std::io::{Seek, SeekFrom, Write};
    use std::os::unix::fs::FileExt;

    const MIB: u64 = 1024 * 1024;

    fn sparse_file(dir: &Path, name: &str, size: u64) -> PathBuf {
        let path = dir.join(name);
        File::create(&path).unwrap().set_len(size).unwrap();
        path
    }

    /// With autoclear the kernel may detach asynchronously after the last close.
    fn wait_detached(path: &Path) -> bool {
        for _ in 0..200 {
            if find_by_backing_file(path).unwrap().is_none() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    fn roundtrip(try_configure: bool) {
        let dir = tempfile::tempdir().unwrap();
        let mut cleanup = Cleanup::default();
        let image = sparse_file(dir.path(), "vol.img", 64 * MIB);

        let handle = attach_with(&image, AttachOptions::for_block(false), try_configure).unwrap();
        cleanup.attached(&handle.device);
        let dev = handle.release();
        assert_eq!(dev.backing_file, image.canonicalize().unwrap());
        assert!(dev.path.starts_with("/dev"));
        assert_eq!(size_bytes(&dev.path).unwrap(), 64 * MIB);

        // Write through the device, read from the image.
        let pattern: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        {
            let mut f = OpenOptions::new().write(true).open(&dev.path).unwrap();
            f.seek(SeekFrom::Start(MIB)).unwrap();
            f.write_all(&pattern).unwrap();
            f.sync_all().unwrap();
        }
        let mut back = vec![0u8; pattern.len()];
        File::open(&image).unwrap().read_exact_at(&mut back, MIB).unwrap();
        assert_eq!(back, pattern);

        assert_eq!(find_by_backing_file(&image).unwrap().as_ref(), Some(&dev));
        assert!(backing_file_exists(&dev));

        // Without autoclear it outlives every descriptor.
        assert!(find_by_backing_file(&image).unwrap().is_some());
        detach(&dev).unwrap();
        assert!(wait_detached(&image));
        detach(&dev).unwrap(); // idempotent
        assert!(!backing_file_exists(&dev));
    }

    #[test]
    fn attach_write_find_detach() {
        if !running_as_root("attach_write_find_detach") {
            return;
        }
        roundtrip(true);
    }

    #[test]
    fn attach_legacy_set_fd_path() {
        if !running_as_root("attach_legacy_set_fd_path") {
            return;
        }
        roundtrip(false);
    }

    #[test]
    fn autoclear_detaches_on_last_close() {
        if !running_as_root("autoclear_detaches_on_last_close") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut cleanup = Cleanup::default();
        let image = sparse_file(dir.path(), "vol.img", 8 * MIB);
        let handle = attach(&image, AttachOptions::for_filesystem(false)).unwrap();
        cleanup.attached(&handle.device);
        assert!(handle.direct_io, "ext4 under the tempdir should take direct I/O");
        assert!(find_by_backing_file(&image).unwrap().is_some());
        drop(handle);
        assert!(wait_detached(&image), "autoclear device still attached after the last close");
    }

    #[test]
    fn read_only_device_refuses_writes() {
        if !running_as_root("read_only_device_refuses_writes") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut cleanup = Cleanup::default();
        let image = sparse_file(dir.path(), "vol.img", 8 * MIB);
        let handle = attach(&image, AttachOptions::for_block(true)).unwrap();
        cleanup.attached(&handle.device);
        assert!(handle.read_only);
        // Depending on the kernel, the open or the write is refused.
        let err = OpenOptions::new()
            .write(true)
            .open(&handle.device.path)
            .and_then(|mut f| f.write_all(&[1u8; 4096]).and_then(|()| f.sync_all()))
            .unwrap_err();
        assert!(matches!(err.raw_os_error(), Some(libc::EROFS) | Some(libc::EACCES) | Some(libc::EPERM)), "unexpected error {err}");
        let mut back = vec![0u8; 4096];
        File::open(&image).unwrap().read_exact_at(&mut back, 0).unwrap();
        assert!(back.iter().all(|b| *b == 0), "the image was written through a read-only device");
        assert_eq!(size_bytes(&handle.device.path).unwrap(), 8 * MIB);
    }

    #[test]
    fn deleted_image_is_found_by_its_old_path_only_while_missing() {
        if !running_as_root("deleted_image_is_found_by_its_old_path_only_while_missing") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut cleanup = Cleanup::default();
        let image = sparse_file(dir.path(), "vol.img", 8 * MIB);
        let dev = attach(&image, AttachOptions::for_block(false)).unwrap().release();
        cleanup.attached(&dev);

        std::fs::remove_file(&image).unwrap();
        assert!(!backing_file_exists(&dev));
        assert_eq!(find_by_backing_file(&image).unwrap().as_ref(), Some(&dev));

        // A new image under the same name is not that device's.
        sparse_file(dir.path(), "vol.img", 8 * MIB);
        assert_eq!(find_by_backing_file(&image).unwrap(), None);
        std::fs::remove_file(&image).unwrap();

        detach(&dev).unwrap();
        assert!(wait_detached(&image));
    }

    #[test]
    fn refresh_capacity_sees_a_grown_image() {
        if !running_as_root("refresh_capacity_sees_a_grown_image") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut cleanup = Cleanup::default();
        let image = sparse_file(dir.path(), "vol.img", 16 * MIB);
        let dev = attach(&image, AttachOptions::for_block(false)).unwrap().release();
        cleanup.attached(&dev);
        OpenOptions::new().write(true).open(&image).unwrap().set_len(48 * MIB).unwrap();
        assert_eq!(size_bytes(&dev.path).unwrap(), 16 * MIB);
        assert_eq!(refresh_capacity(&dev).unwrap(), 48 * MIB);
        assert_eq!(size_bytes(&dev.path).unwrap(), 48 * MIB);
    }

    #[test]
    fn detach_leaves_a_reused_number_alone() {
        if !running_as_root("detach_leaves_a_reused_number_alone") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut cleanup = Cleanup::default();
        let image = sparse_file(dir.path(), "vol.img", 8 * MIB);
        let dev = attach(&image, AttachOptions::for_block(false)).unwrap().release();
        cleanup.attached(&dev);
        let stale = LoopDevice { backing_file: dir.path().join("other.img"), ..dev.clone() };
        detach(&stale).unwrap();
        assert_eq!(find_by_backing_file(&image).unwrap(), Some(dev));
    }

    #[test]
    fn concurrent_attaches_get_distinct_devices() {
        if !running_as_root("concurrent_attaches_get_distinct_devices") {
            return;
        }
        // Several attaches race for the same free device; EBUSY sends the
        // losers on to the next one.
        let dir = tempfile::tempdir().unwrap();
        let mut cleanup = Cleanup::default();
        let images: Vec<PathBuf> = (0..6).map(|i| sparse_file(dir.path(), &format!("v{i}.img"), 4 * MIB)).collect();
        let results: Vec<_> = std::thread::scope(|s| {
            let handles: Vec<_> =
                images.iter().map(|img| s.spawn(move || attach(img, AttachOptions::for_block(false)).map(LoopHandle::release))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut numbers = Vec::new();
        for dev in results.iter().flatten() {
            cleanup.attached(dev);
            numbers.push(dev.number);
        }
        for (img, r) in images.iter().zip(&results) {
            let dev = r.as_ref().unwrap();
            assert_eq!(find_by_backing_file(img).unwrap().as_ref(), Some(dev));
        }
        numbers.sort_unstable();
        numbers.dedup();
        assert_eq!(numbers.len(), images.len());
    }

    #[test]
    fn missing_or_odd_images_are_refused_with_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.img");
        let err = attach(&missing, AttachOptions::for_block(false)).unwrap_err();
        assert!(err.to_string().contains("nope.img"), "{err}");
        let err = attach(dir.path(), AttachOptions::for_block(true)).unwrap_err();
        assert!(matches!(err, AttachError::BadBackingFile { .. }), "{err}");
        assert_eq!(find_by_backing_file(&missing).unwrap(), None);
    }
}
