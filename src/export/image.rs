//! An exported image: positioned reads and writes, flush, hole punching,
//! zeroing and allocation queries on a file handle the volume manager
//! opened. Everything here is synchronous: reads and writes are submitted
//! with io_uring (`uring`) where the kernel allows it, everything else runs
//! on tokio's blocking pool.
//!
//! Aligned requests go through a second handle opened with O_DIRECT, so the
//! owner node does not cache what the consumer's page cache already holds
//! (qemu's cache=none); unaligned ones, rare with a block-device client, use
//! the page cache. Linux keeps the two coherent: a direct read writes back
//! dirty cached pages of its range first, a direct write drops them.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use rustix::fs::{FallocateFlags, SeekFrom};
use rustix::io::{Errno, ReadWriteFlags};

use super::proto;
use crate::volume::changes::Changed;

/// Memory alignment of buffers, enough for O_DIRECT on any Linux device.
pub const BUFFER_ALIGN: usize = 4096;

pub struct Image {
    buffered: File,
    direct: Option<File>,
    /// Offsets and lengths must be multiples of this to use `direct`.
    direct_align: u64,
    /// Set for a migration pass's export: what changed since the previous
    /// pass's snapshot, which `extents` then describes instead of holes.
    changes: Option<Arc<Vec<Changed>>>,
}

impl Image {
    /// Wrap a handle to an image. `direct`: also open an O_DIRECT handle on
    /// the same file (through /proc/self/fd, i.e. the same inode, no path of
    /// ours); falls back to the page cache where the filesystem refuses it.
    pub fn new(file: File, direct: bool) -> Image {
        let direct_file = if direct { reopen_direct(&file).ok() } else { None };
        let direct_align = direct_file.as_ref().map(dio_alignment).unwrap_or(u64::MAX);
        Image { buffered: file, direct: direct_file, direct_align, changes: None }
    }

    /// Describe the image as a layer over an older snapshot (see `extents`).
    pub fn with_changes(mut self, changes: Option<Arc<Vec<Changed>>>) -> Image {
        self.changes = changes;
        self
    }

    pub fn size_bytes(&self) -> io::Result<u64> {
        Ok(self.buffered.metadata()?.len())
    }

    pub fn uses_direct_io(&self) -> bool {
        self.direct.is_some()
    }

    /// The handle for a transfer of `len` bytes at `offset` from or to a
    /// buffer at `buf_addr`: the O_DIRECT one when everything is aligned.
    pub(crate) fn file_for(&self, offset: u64, len: usize, buf_addr: usize) -> &File {
        match &self.direct {
            Some(d)
                if offset.is_multiple_of(self.direct_align)
                    && (len as u64).is_multiple_of(self.direct_align)
                    && buf_addr.is_multiple_of(BUFFER_ALIGN) =>
            {
                d
            }
            _ => &self.buffered,
        }
    }

    /// Fill `buf` from `offset`; bytes past the end of the file read as zero.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let file = self.file_for(offset, buf.len(), buf.as_ptr() as usize);
        let mut done = 0;
        while done < buf.len() {
            match file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Write `buf` at `offset`; with `fua`, durable before returning.
    pub fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        let file = self.file_for(offset, buf.len(), buf.as_ptr() as usize);
        let flags = if fua { ReadWriteFlags::DSYNC } else { ReadWriteFlags::empty() };
        let mut done = 0;
        while done < buf.len() {
            match rustix::io::pwritev2(file, &[io::IoSlice::new(&buf[done..])], offset + done as u64, flags) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => done += n,
                Err(Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    pub fn flush(&self) -> io::Result<()> {
        rustix::fs::fdatasync(&self.buffered).map_err(Into::into)
    }

    /// NBD_CMD_TRIM: give the range back to the filesystem.
    pub fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        match rustix::fs::fallocate(&self.buffered, FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE, offset, len) {
            // Trim is advisory: a filesystem without hole punching ignores it.
            Ok(()) | Err(Errno::OPNOTSUPP) => {}
            Err(e) => return Err(e.into()),
        }
        if fua {
            self.flush()?;
        }
        Ok(())
    }

    /// NBD_CMD_WRITE_ZEROES. Without `no_hole` the range may become a hole;
    /// with it, the blocks stay allocated. `fast`: fail with ENOTSUP rather
    /// than fall back to writing zeroes.
    pub fn write_zeroes(&self, offset: u64, len: u64, fua: bool, no_hole: bool, fast: bool) -> Result<(), ZeroError> {
        if len == 0 {
            return Ok(());
        }
        let mode = if no_hole {
            FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE
        } else {
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE
        };
        match rustix::fs::fallocate(&self.buffered, mode, offset, len) {
            Ok(()) => {}
            Err(Errno::OPNOTSUPP) if fast => return Err(ZeroError::NotFast),
            Err(Errno::OPNOTSUPP) => self.write_zero_buffers(offset, len).map_err(ZeroError::Io)?,
            Err(e) => return Err(ZeroError::Io(e.into())),
        }
        if fua {
            self.flush().map_err(ZeroError::Io)?;
        }
        Ok(())
    }

    fn write_zero_buffers(&self, offset: u64, len: u64) -> io::Result<()> {
        let zeroes = AlignedBuf::zeroed((len as usize).min(1 << 20));
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64) as usize;
            self.write_at(&zeroes[..n], offset + done, false)?;
            done += n as u64;
        }
        Ok(())
    }

    /// `base:allocation` extents of `[offset, offset+len)`: (length, flags)
    /// pairs, at most `max` of them, from SEEK_DATA / SEEK_HOLE.
    ///
    /// An image with `changes` (a migration pass after the first) answers
    /// as a layer over the previous pass's snapshot, which the reader holds
    /// already: unchanged ranges are holes whose content is not promised
    /// (HOLE without ZERO), changed data is allocated (0), and ranges that
    /// became zeroes are ZERO without HOLE, so the reader punches them
    /// without reading. A reader that skips holes thus copies the changes.
    pub fn extents(&self, offset: u64, len: u32, max: usize) -> io::Result<Vec<(u32, u32)>> {
        if let Some(changes) = &self.changes {
            return Ok(layer_extents(changes, offset, len, max));
        }
        let end = offset + len as u64;
        let size = self.size_bytes()?;
        let mut out: Vec<(u32, u32)> = Vec::new();
        let mut pos = offset;
        let push = |out: &mut Vec<(u32, u32)>, n: u64, flags: u32| match out.last_mut() {
            Some(last) if last.1 == flags => last.0 += n as u32,
            _ => out.push((n as u32, flags)),
        };
        while pos < end && out.len() < max {
            if pos >= size {
                push(&mut out, end - pos, proto::STATE_HOLE | proto::STATE_ZERO);
                break;
            }
            let data = match rustix::fs::seek(&self.buffered, SeekFrom::Data(pos)) {
                Ok(d) => d,
                Err(Errno::NXIO) => size,
                // A filesystem without SEEK_DATA: all data.
                Err(Errno::INVAL) | Err(Errno::OPNOTSUPP) => {
                    push(&mut out, end - pos, 0);
                    break;
                }
                Err(e) => return Err(e.into()),
            };
            if data > pos {
                let stop = data.min(end);
                push(&mut out, stop - pos, proto::STATE_HOLE | proto::STATE_ZERO);
                pos = stop;
                continue;
            }
            let hole = match rustix::fs::seek(&self.buffered, SeekFrom::Hole(pos)) {
                Ok(h) => h,
                Err(Errno::NXIO) => size,
                Err(e) => return Err(e.into()),
            };
            let stop = hole.max(pos + 1).min(end);
            push(&mut out, stop - pos, 0);
            pos = stop;
        }
        out.truncate(max);
        Ok(out)
    }
}

/// `extents` of a layer: (length, flags) pairs of `[offset, offset+len)`.
fn layer_extents(changes: &[Changed], offset: u64, len: u32, max: usize) -> Vec<(u32, u32)> {
    let end = offset + len as u64;
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut push = |n: u64, flags: u32| match out.last_mut() {
        Some(last) if last.1 == flags => last.0 += n as u32,
        _ => out.push((n as u32, flags)),
    };
    let mut pos = offset;
    let first = changes.partition_point(|c| c.offset + c.len <= offset);
    for c in &changes[first..] {
        if pos >= end {
            break;
        }
        if c.offset > pos {
            let stop = c.offset.min(end);
            push(stop - pos, proto::STATE_HOLE);
            pos = stop;
        }
        if pos < end {
            let stop = (c.offset + c.len).min(end);
            push(stop - pos, if c.zero { proto::STATE_ZERO } else { 0 });
            pos = stop;
        }
    }
    if pos < end {
        push(end - pos, proto::STATE_HOLE);
    }
    out.truncate(max);
    out
}

#[derive(Debug)]
pub enum ZeroError {
    NotFast,
    Io(io::Error),
}

/// The error value the protocol allows for an OS error.
pub fn errno_for(e: &io::Error) -> u32 {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => proto::ENOSPC,
        Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) => proto::EPERM,
        Some(libc::EINVAL) => proto::EINVAL,
        Some(libc::ENOMEM) => proto::ENOMEM,
        _ => proto::EIO,
    }
}

fn reopen_direct(file: &File) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let writable = rustix::fs::fcntl_getfl(file).map(|f| f.contains(rustix::fs::OFlags::RDWR)).unwrap_or(false);
    std::fs::OpenOptions::new().read(true).write(writable).custom_flags(libc::O_DIRECT).open(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

/// The offset alignment O_DIRECT needs on this file (statx's dio_offset_align
/// where the kernel reports it, else the logical block size guess of 512).
fn dio_alignment(file: &File) -> u64 {
    let stx = rustix::fs::statx(file, "", rustix::fs::AtFlags::EMPTY_PATH, rustix::fs::StatxFlags::DIOALIGN);
    match stx {
        Ok(s) if s.stx_dio_offset_align > 0 => (s.stx_dio_offset_align as u64).max(512),
        _ => 512,
    }
}

/// A heap buffer aligned for O_DIRECT.
pub struct AlignedBuf {
    ptr: *mut u8,
    len: usize,
}

// The buffer is plain owned memory.
unsafe impl Send for AlignedBuf {}
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    pub fn zeroed(len: usize) -> AlignedBuf {
        if len == 0 {
            return AlignedBuf { ptr: std::ptr::NonNull::<u8>::dangling().as_ptr(), len: 0 };
        }
        let layout = Layout::from_size_align(len, BUFFER_ALIGN).expect("buffer size fits a layout");
        // SAFETY: layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        AlignedBuf { ptr, len }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes (or dangling with len 0).
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we own the memory exclusively.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: allocated in `zeroed` with this layout.
            unsafe { dealloc(self.ptr, Layout::from_size_align_unchecked(self.len, BUFFER_ALIGN)) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(size: u64) -> (tempfile::TempDir, Image) {
        let dir = tempfile::Builder::new().prefix("nbd-image-").tempdir_in("/var/tmp").unwrap();
        let path = dir.path().join("img");
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        f.set_len(size).unwrap();
        (dir, Image::new(f, true))
    }

    #[test]
    fn writes_read_back_through_both_handles() {
        let (_d, img) = image(1 << 20);
        let mut a = AlignedBuf::zeroed(8192);
        a.fill(7);
        img.write_at(&a, 4096, false).unwrap();
        img.write_at(b"xyz", 5000, true).unwrap(); // unaligned: page cache
        let mut back = AlignedBuf::zeroed(8192);
        img.read_at(&mut back, 4096).unwrap();
        assert_eq!(&back[..904], &[7u8; 904][..]);
        assert_eq!(&back[904..907], b"xyz");
        assert!(back[907..].iter().all(|&b| b == 7));
    }

    #[test]
    fn a_layer_shows_its_changes_and_promises_nothing_elsewhere() {
        let c = |offset, len, zero| Changed { offset, len, zero };
        let changes = [c(4096, 4096, false), c(8192, 4096, true), c(65536, 8192, false)];
        let (h, z) = (proto::STATE_HOLE, proto::STATE_ZERO);
        assert_eq!(layer_extents(&changes, 0, 131072, 16), vec![(4096, h), (4096, 0), (4096, z), (53248, h), (8192, 0), (57344, h)]);
        assert_eq!(layer_extents(&changes, 6000, 4000, 16), vec![(2192, 0), (1808, z)]);
        assert_eq!(layer_extents(&changes, 70000, 100, 16), vec![(100, 0)]);
        assert_eq!(layer_extents(&changes, 0, 131072, 2), vec![(4096, h), (4096, 0)]);
        assert_eq!(layer_extents(&[], 0, 512, 16), vec![(512, h)]);
    }

    #[test]
    fn extents_show_holes_and_trim_makes_them() {
        let (_d, img) = image(4 << 20);
        assert_eq!(img.extents(0, 4 << 20, 16).unwrap(), vec![(4 << 20, 3)]);
        let mut a = AlignedBuf::zeroed(1 << 20);
        a.fill(1);
        img.write_at(&a, 1 << 20, false).unwrap();
        img.flush().unwrap();
        assert_eq!(img.extents(0, 4 << 20, 16).unwrap(), vec![(1 << 20, 3), (1 << 20, 0), (2 << 20, 3)]);
        assert_eq!(img.extents(0, 4 << 20, 1).unwrap(), vec![(1 << 20, 3)]);
        img.trim(1 << 20, 1 << 20, false).unwrap();
        assert_eq!(img.extents(0, 4 << 20, 16).unwrap(), vec![(4 << 20, 3)]);
        img.write_at(&a, 0, false).unwrap();
        img.write_zeroes(0, 1 << 20, false, true, false).unwrap();
        let mut back = AlignedBuf::zeroed(4096);
        img.read_at(&mut back, 0).unwrap();
        assert!(back.iter().all(|&b| b == 0));
    }
}
