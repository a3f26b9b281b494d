//! The userspace attach engine, for kernels without the nbd module: our NBD
//! client behind a one-file FUSE filesystem, that file attached to a loop
//! device with direct I/O like a local image. mkfs, mount and raw block use
//! work unchanged on the loop device.
//!
//! Path of one 4 KiB write: loop (direct I/O) -> FUSE request -> this
//! process -> NBD WRITE over TCP -> the owner's server -> its image. See
//! docs/nbd.md for what it costs and what happens to I/O when this
//! process restarts.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, MountOption, OpenFlags,
    ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, WriteFlags,
};
use tokio::runtime::Handle;
use tracing::{info, warn};

use super::client::{NbdError, Target};
use super::resilient::{ReconnectPolicy, ResilientClient};
use crate::attach::loopdev::{self, AttachOptions, LoopDevice};

/// The one file the filesystem holds.
pub const DISK_FILE: &str = "disk";
const DISK_INO: INodeNo = INodeNo(2);
const TTL: Duration = Duration::from_secs(1);

struct NbdFile {
    client: Arc<ResilientClient>,
    rt: Handle,
    size: u64,
    read_only: bool,
}

fn errno(e: &NbdError) -> Errno {
    match e {
        NbdError::Server { errno, .. } => match *errno {
            crate::export::proto::EPERM => Errno::EPERM,
            crate::export::proto::ENOSPC => Errno::ENOSPC,
            crate::export::proto::EINVAL => Errno::EINVAL,
            crate::export::proto::ENOTSUP => Errno::EOPNOTSUPP,
            _ => Errno::EIO,
        },
        NbdError::Unsupported(_) => Errno::EOPNOTSUPP,
        _ => Errno::EIO,
    }
}

impl NbdFile {
    fn attr(&self, ino: INodeNo) -> FileAttr {
        let now = SystemTime::now();
        let dir = ino == INodeNo::ROOT;
        FileAttr {
            ino,
            size: if dir { 0 } else { self.size },
            blocks: if dir { 0 } else { self.size.div_ceil(512) },
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            kind: if dir { FileType::Directory } else { FileType::RegularFile },
            perm: if dir {
                0o700
            } else if self.read_only {
                0o400
            } else {
                0o600
            },
            nlink: if dir { 2 } else { 1 },
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    /// Clip a request to the file: the kernel may ask past the end.
    fn clip(&self, offset: u64, len: u64) -> u64 {
        len.min(self.size.saturating_sub(offset))
    }
}

impl fuser::Filesystem for NbdFile {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Several direct I/O requests of the loop device in flight at once.
        let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO);
        let _ = config.set_max_write(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == INodeNo::ROOT && name == DISK_FILE {
            reply.entry(&TTL, &self.attr(DISK_INO), Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino == INodeNo::ROOT || ino == DISK_INO {
            reply.attr(&TTL, &self.attr(ino));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino != DISK_INO {
            return reply.error(Errno::EISDIR);
        }
        let write = flags.0 & libc::O_ACCMODE != libc::O_RDONLY;
        if write && self.read_only {
            return reply.error(Errno::EROFS);
        }
        // No page cache in this process's path: the loop device above and
        // the filesystem above it cache already.
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let len = self.clip(offset, size as u64) as u32;
        if len == 0 {
            return reply.data(&[]);
        }
        let client = self.client.clone();
        self.rt.spawn(async move {
            match client.read(offset, len).await {
                Ok(d) => reply.data(&d),
                Err(e) => {
                    warn!(offset, len, error = %e, "NBD read failed");
                    reply.error(errno(&e))
                }
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let len = self.clip(offset, data.len() as u64) as usize;
        if len < data.len() {
            return reply.error(Errno::ENOSPC);
        }
        let fua = flags.0 & (libc::O_SYNC | libc::O_DSYNC) != 0;
        let client = self.client.clone();
        let data = data.to_vec();
        self.rt.spawn(async move {
            match client.write(offset, data, fua).await {
                Ok(()) => reply.written(len as u32),
                Err(e) => {
                    warn!(offset, len, error = %e, "NBD write failed");
                    reply.error(errno(&e))
                }
            }
        });
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let client = self.client.clone();
        self.rt.spawn(async move {
            match client.flush().await {
                Ok(()) => reply.ok(),
                Err(e) => {
                    warn!(error = %e, "NBD flush failed");
                    reply.error(errno(&e))
                }
            }
        });
    }

    fn fallocate(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, offset: u64, length: u64, mode: i32, reply: ReplyEmpty) {
        let length = self.clip(offset, length);
        let client = self.client.clone();
        let punch = mode & libc::FALLOC_FL_PUNCH_HOLE != 0;
        let zero = mode & libc::FALLOC_FL_ZERO_RANGE != 0;
        if mode & !(libc::FALLOC_FL_KEEP_SIZE | libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0 {
            return reply.error(Errno::EOPNOTSUPP);
        }
        if !punch && !zero {
            // Plain allocation: the export is already its full size.
            return reply.ok();
        }
        self.rt.spawn(async move {
            // In requests of at most 1 GiB: NBD lengths are 32 bits.
            let mut done = 0;
            while done < length {
                let n = (length - done).min(1 << 30) as u32;
                // The loop device discards with PUNCH_HOLE and expects zeroes
                // back, so a punch is a WRITE_ZEROES that may leave a hole.
                let r = client.write_zeroes(offset + done, n, zero && !punch).await;
                if let Err(e) = r {
                    warn!(offset, length, error = %e, "NBD zeroing failed");
                    return reply.error(errno(&e));
                }
                done += n as u64;
            }
            reply.ok()
        });
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
            (DISK_INO, FileType::RegularFile, DISK_FILE),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(self.size / 4096, 0, 0, 1, 0, 4096, 255, 4096);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    #[error(transparent)]
    Nbd(#[from] NbdError),
    #[error("cannot mount the FUSE file at {path}: {error}; check that /dev/fuse exists and the plugin may mount")]
    Mount { path: PathBuf, error: std::io::Error },
    #[error(transparent)]
    Attach(#[from] crate::attach::AttachError),
    #[error("cannot create {path}: {error}")]
    Folder { path: PathBuf, error: std::io::Error },
}

/// An export served as one file through FUSE (`<state_dir>/fuse/disk`),
/// without a loop device yet: the node's stage code loop-attaches it like
/// a local image, so staging, idempotency checks and unstaging are the same
/// code for local and remote volumes. Unmount with [`FuseFile::unmount`];
/// dropping it unmounts too, which fails the I/O of whatever still uses it.
pub struct FuseFile {
    pub file: PathBuf,
    pub client: Arc<ResilientClient>,
    pub size: u64,
    pub read_only: bool,
    mountpoint: PathBuf,
    session: Option<fuser::BackgroundSession>,
}

impl FuseFile {
    /// Connect to `target` and serve it as a file under `state_dir`.
    pub async fn mount(target: Target, state_dir: &Path, policy: ReconnectPolicy, read_only: bool) -> Result<FuseFile, FuseError> {
        let client = Arc::new(ResilientClient::connect(target, policy).await?);
        let info = client.info();
        let mountpoint = state_dir.join("fuse");
        std::fs::create_dir_all(&mountpoint).map_err(|error| FuseError::Folder { path: mountpoint.clone(), error })?;
        let read_only = read_only || info.read_only();
        let fs = NbdFile { client: client.clone(), rt: Handle::current(), size: info.size, read_only };
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            MountOption::FSName("cinderblock-nbd".into()),
            MountOption::Subtype("cinderblock".into()),
            MountOption::NoDev,
            MountOption::NoSuid,
            MountOption::NoExec,
        ];
        config.n_threads = Some(2);
        config.clone_fd = true;
        let mp = mountpoint.clone();
        let session = tokio::task::spawn_blocking(move || fuser::spawn_mount(fs, &mp, &config))
            .await
            .expect("mount task")
            .map_err(|error| FuseError::Mount { path: mountpoint.clone(), error })?;
        let file = mountpoint.join(DISK_FILE);
        info!(file = %file.display(), size = info.size, "NBD export served as a FUSE file");
        Ok(FuseFile { file, client, size: info.size, read_only, mountpoint, session: Some(session) })
    }

    /// Flush, disconnect and unmount (nothing may use the file any more).
    pub async fn unmount(mut self) {
        if let Err(e) = self.client.disconnect().await {
            warn!(error = %e, "NBD disconnect failed; unmounting anyway");
        }
        let session = self.session.take();
        tokio::task::spawn_blocking(move || drop(session)).await.expect("unmount task");
        let _ = std::fs::remove_dir(&self.mountpoint);
    }
}

/// An attached export: a [`FuseFile`] and the loop device on it, for tools
/// and tests that want a block device straight away. Detach with
/// [`FuseAttachment::detach`]; dropping it unmounts too, which fails the
/// device's I/O.
pub struct FuseAttachment {
    pub device: LoopDevice,
    pub file: PathBuf,
    pub client: Arc<ResilientClient>,
    inner: Option<FuseFile>,
}

impl FuseAttachment {
    /// Connect to `target` and attach it. `state_dir` holds the FUSE mount
    /// (`<state_dir>/fuse/disk`); one attachment per folder.
    pub async fn attach(target: Target, state_dir: &Path, policy: ReconnectPolicy, read_only: bool) -> Result<FuseAttachment, FuseError> {
        let inner = FuseFile::mount(target, state_dir, policy, read_only).await?;
        let opts = AttachOptions::for_block(inner.read_only);
        let f = inner.file.clone();
        let handle = match tokio::task::spawn_blocking(move || loopdev::attach(&f, opts)).await.expect("attach task") {
            Ok(h) => h,
            Err(e) => {
                inner.unmount().await;
                return Err(e.into());
            }
        };
        info!(device = %handle.device.path.display(), size = inner.size, direct_io = handle.direct_io, "NBD export attached through FUSE");
        Ok(FuseAttachment { device: handle.release(), file: inner.file.clone(), client: inner.client.clone(), inner: Some(inner) })
    }

    /// Detach the loop device, flush, disconnect and unmount.
    pub async fn detach(mut self) -> Result<(), FuseError> {
        let dev = self.device.clone();
        tokio::task::spawn_blocking(move || loopdev::detach(&dev)).await.expect("detach task")?;
        if let Some(inner) = self.inner.take() {
            inner.unmount().await;
        }
        Ok(())
    }
}

impl Drop for FuseAttachment {
    fn drop(&mut self) {
        if self.inner.is_some() {
            let _ = loopdev::detach(&self.device);
        }
    }
}
