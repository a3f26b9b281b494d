//! Making one image from another: a reflink (FICLONE) where the filesystem
//! shares extents, otherwise a copy that skips holes so sparse stays sparse.

use std::fs::File;
use std::io;
use std::path::Path;

use rustix::fs::{FallocateFlags, SeekFrom};

/// How an image was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMethod {
    Reflink,
    SparseCopy,
}

/// Clone `src` into the empty file `dst`: reflink when possible, else a
/// sparse-aware copy. `dst` ends with the same length as `src`.
pub fn clone_into(src: &File, dst: &File, allow_reflink: bool) -> io::Result<CopyMethod> {
    if allow_reflink {
        match reflink(src, dst) {
            Ok(()) => return Ok(CopyMethod::Reflink),
            Err(e) if reflink_unsupported(&e) => {}
            Err(e) => return Err(e),
        }
    }
    sparse_copy(src, dst)?;
    Ok(CopyMethod::SparseCopy)
}

/// FICLONE: share all of the source's extents with the target.
pub fn reflink(src: &File, dst: &File) -> io::Result<()> {
    rustix::fs::ioctl_ficlone(dst, src).map_err(io::Error::from)
}

fn reflink_unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::EXDEV) | Some(libc::EINVAL) | Some(libc::ENOSYS))
}

/// Copy only the data segments of `src` (found with SEEK_DATA/SEEK_HOLE),
/// so holes in the source stay holes in the target.
pub fn sparse_copy(src: &File, dst: &File) -> io::Result<()> {
    sparse_copy_with(src, dst, copy_range)
}

fn sparse_copy_with(src: &File, dst: &File, copy: fn(&File, &File, i64, i64) -> io::Result<()>) -> io::Result<()> {
    let len = src.metadata()?.len();
    dst.set_len(len)?;
    let mut pos: i64 = 0;
    while (pos as u64) < len {
        let data = match seek(src, SeekFrom::Data(pos as u64)) {
            Ok(d) => d,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break, // only a hole remains
            Err(e) => return Err(e),
        };
        let hole = seek(src, SeekFrom::Hole(data as u64))?;
        copy(src, dst, data, hole - data)?;
        pos = hole;
    }
    Ok(())
}

fn seek(f: &File, to: SeekFrom) -> io::Result<i64> {
    rustix::fs::seek(f, to).map(|at| at as i64).map_err(io::Error::from)
}

fn copy_range(src: &File, dst: &File, offset: i64, len: i64) -> io::Result<()> {
    let mut done: i64 = 0;
    while done < len {
        let mut off_in = (offset + done) as u64;
        let mut off_out = (offset + done) as u64;
        let chunk = (len - done).min(1 << 30) as usize;
        let n = match rustix::fs::copy_file_range(src, Some(&mut off_in), dst, Some(&mut off_out), chunk) {
            Ok(n) => n,
            Err(e) => {
                let e = io::Error::from(e);
                if matches!(e.raw_os_error(), Some(libc::EXDEV) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP)) {
                    return copy_range_by_hand(src, dst, offset + done, len - done);
                }
                return Err(e);
            }
        };
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "source shrank during copy"));
        }
        done += n as i64;
    }
    Ok(())
}

fn copy_range_by_hand(src: &File, dst: &File, offset: i64, len: i64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < len as u64 {
        let want = buf.len().min((len as u64 - done) as usize);
        let n = src.read_at(&mut buf[..want], offset as u64 + done)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "source shrank during copy"));
        }
        dst.write_all_at(&buf[..n], offset as u64 + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Does the filesystem holding `dir` support reflinks? Tried for real with
/// two scratch files, which are removed again.
pub fn probe_reflink(dir: &Path) -> io::Result<bool> {
    let a_path = dir.join(".reflink-probe-a");
    let b_path = dir.join(".reflink-probe-b");
    let result = (|| {
        let a = File::options().read(true).write(true).create(true).truncate(true).open(&a_path)?;
        std::io::Write::write_all(&mut &a, &[0x5a; 4096])?;
        a.sync_all()?;
        let b = File::options().read(true).write(true).create(true).truncate(true).open(&b_path)?;
        match reflink(&a, &b) {
            Ok(()) => Ok(true),
            Err(e) if reflink_unsupported(&e) => Ok(false),
            Err(e) => Err(e),
        }
    })();
    let _ = std::fs::remove_file(&a_path);
    let _ = std::fs::remove_file(&b_path);
    result
}

/// Bytes the file really occupies (st_blocks * 512).
pub fn allocated_bytes(f: &File) -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(f.metadata()?.blocks() * 512)
}

/// Allocate every byte of the file up to `len` (thick provisioning).
pub fn allocate(f: &File, len: u64) -> io::Result<()> {
    // Mode 0: allocate and extend.
    rustix::fs::fallocate(f, FallocateFlags::empty(), 0, len).map_err(io::Error::from)
}

/// Make `dst`, just reflinked from `src`, own all its blocks, so that
/// neither file's writes ever need space for a copy-on-write: the shared
/// extents are unshared (FALLOC_FL_UNSHARE_RANGE), or, where the filesystem
/// cannot (btrfs), `dst` is rewritten by reading and writing (btrfs would
/// answer copy_file_range with another reflink).
pub fn own_blocks(src: &File, dst: &File) -> io::Result<()> {
    let len = dst.metadata()?.len();
    match rustix::fs::fallocate(dst, rustix::fs::FallocateFlags::UNSHARE_RANGE, 0, len) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {
            dst.set_len(0)?;
            sparse_copy_with(src, dst, copy_range_by_hand)
        }
        Err(e) => Err(e.into()),
    }
}
