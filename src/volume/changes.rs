//! What changed between two reflinked snapshots of one volume, from the
//! filesystem's extent maps (FIEMAP) alone, without reading any data.
//!
//! Both snapshots were reflinked from the same volume, so a block that was
//! not written in between is the very same physical block in both: a range
//! whose physical location is the same in the two maps is unchanged. A write
//! to the volume after the first snapshot went to a new block (the old one
//! was shared, so copy-on-write), and shows as a range whose location
//! differs, or that one map has and the other lacks. A block shared by two
//! read-only snapshots is never rewritten in place, so "same location" can
//! only mean "same bytes"; anything the maps cannot vouch for (delayed,
//! encoded, inline or unknown extents) counts as changed. Works on XFS with
//! reflink and on btrfs (whose "physical" addresses are its own logical
//! ones, shared the same way).

use std::fs::File;
use std::io;

use rustix::ioctl::{self, Opcode, Updater};

/// One changed range of the newer snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Changed {
    pub offset: u64,
    pub len: u64,
    /// The range reads as zeroes in the newer snapshot (a hole, or an
    /// unwritten extent): the copy punches it instead of reading it.
    pub zero: bool,
}

/// One extent of a file's map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Extent {
    logical: u64,
    physical: u64,
    len: u64,
    flags: u32,
}

/// `_IOWR('f', 11, struct fiemap)`: the size in the opcode is the header's
/// (the extents that follow it are the caller's to size).
const FS_IOC_FIEMAP: Opcode = ioctl::opcode::read_write::<FiemapHeader>(b'f', 11);
const FIEMAP_FLAG_SYNC: u32 = 0x1;
const FIEMAP_EXTENT_LAST: u32 = 0x1;
const FIEMAP_EXTENT_UNWRITTEN: u32 = 0x800;
/// UNKNOWN, DELALLOC, ENCODED, DATA_ENCRYPTED, NOT_ALIGNED, DATA_INLINE,
/// DATA_TAIL: the location says nothing reliable about the bytes.
const FIEMAP_EXTENT_VAGUE: u32 = 0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x200 | 0x400;
/// Extents asked per ioctl.
const BATCH: usize = 512;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapExtent {
    fe_logical: u64,
    fe_physical: u64,
    fe_length: u64,
    fe_reserved64: [u64; 2],
    fe_flags: u32,
    fe_reserved: [u32; 3],
}

/// `struct fiemap` without its extents.
#[repr(C)]
struct FiemapHeader {
    fm_start: u64,
    fm_length: u64,
    fm_flags: u32,
    fm_mapped_extents: u32,
    fm_extent_count: u32,
    fm_reserved: u32,
}

/// `struct fiemap` with room for BATCH extents after the header.
#[repr(C)]
struct Fiemap {
    header: FiemapHeader,
    fm_extents: [FiemapExtent; BATCH],
}

/// The file's extent map, in logical order.
fn extents(f: &File) -> io::Result<Vec<Extent>> {
    let len = f.metadata()?.len();
    let mut out = Vec::new();
    let mut start = 0u64;
    while start < len {
        let mut map = Box::new(Fiemap {
            header: FiemapHeader {
                fm_start: start,
                fm_length: u64::MAX - start,
                fm_flags: FIEMAP_FLAG_SYNC,
                fm_mapped_extents: 0,
                fm_extent_count: BATCH as u32,
                fm_reserved: 0,
            },
            fm_extents: [FiemapExtent::default(); BATCH],
        });
        // SAFETY: FS_IOC_FIEMAP reads and writes a `struct fiemap`, and
        // `map` is one whose fm_extent_count (BATCH) extents follow it.
        unsafe { ioctl::ioctl(f, Updater::<FS_IOC_FIEMAP, Fiemap>::new(&mut map)) }?;
        let n = map.header.fm_mapped_extents as usize;
        if n == 0 {
            break;
        }
        let mut last = false;
        for e in &map.fm_extents[..n.min(BATCH)] {
            out.push(Extent { logical: e.fe_logical, physical: e.fe_physical, len: e.fe_length, flags: e.fe_flags });
            last |= e.fe_flags & FIEMAP_EXTENT_LAST != 0;
        }
        let end = out.last().map(|e| e.logical + e.len).unwrap_or(len);
        if last || end <= start {
            break;
        }
        start = end;
    }
    Ok(out)
}

/// Where `at` lies in a map: (physical address of `at`, flags, end of its
/// extent) inside an extent, or None in a hole, with where the hole ends.
fn locate(map: &[Extent], i: &mut usize, at: u64, size: u64) -> (Option<(u64, u32)>, u64) {
    while *i < map.len() && map[*i].logical + map[*i].len <= at {
        *i += 1;
    }
    match map.get(*i) {
        Some(e) if e.logical <= at => (Some((e.physical + (at - e.logical), e.flags)), e.logical + e.len),
        Some(e) => (None, e.logical.min(size)),
        None => (None, size),
    }
}

/// The ranges of `newer` that differ from `older` (both reflinked from one
/// volume, `older` first), in order, adjacent ranges of one kind merged.
pub fn changed_ranges(older: &File, newer: &File) -> io::Result<Vec<Changed>> {
    let size = newer.metadata()?.len();
    let (old_map, new_map) = (extents(older)?, extents(newer)?);
    let (mut i, mut j) = (0usize, 0usize);
    let mut out: Vec<Changed> = Vec::new();
    let mut at = 0u64;
    while at < size {
        let (old, old_end) = locate(&old_map, &mut i, at, size);
        let (new, new_end) = locate(&new_map, &mut j, at, size);
        let end = old_end.min(new_end).min(size).max(at + 1);
        let change = match (old, new) {
            (None, None) => None,
            (Some(_), None) => Some(true),
            (_, Some((_, nf))) if nf & FIEMAP_EXTENT_VAGUE != 0 => Some(false),
            (Some((op, of)), Some((np, nf)))
                if op == np && of & FIEMAP_EXTENT_VAGUE == 0 && of & FIEMAP_EXTENT_UNWRITTEN == nf & FIEMAP_EXTENT_UNWRITTEN =>
            {
                None
            }
            (_, Some((_, nf))) => Some(nf & FIEMAP_EXTENT_UNWRITTEN != 0),
        };
        if let Some(zero) = change {
            match out.last_mut() {
                Some(c) if c.zero == zero && c.offset + c.len == at => c.len += end - at,
                _ => out.push(Changed { offset: at, len: end - at, zero }),
            }
        }
        at = end;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(logical: u64, physical: u64, len: u64) -> Extent {
        Extent { logical, physical, len, flags: 0 }
    }

    #[test]
    fn the_fiemap_opcode_is_the_kernels() {
        // linux/fs.h: FS_IOC_FIEMAP _IOWR('f', 11, struct fiemap), a 32-byte header.
        assert_eq!(std::mem::size_of::<FiemapHeader>(), 32);
        assert_eq!(FS_IOC_FIEMAP as u64, 0xC020_660B);
    }

    #[test]
    fn locate_walks_extents_and_holes() {
        let map = [ext(0, 100, 10), ext(20, 500, 10)];
        let mut i = 0;
        assert_eq!(locate(&map, &mut i, 5, 40), (Some((105, 0)), 10));
        assert_eq!(locate(&map, &mut i, 12, 40), (None, 20));
        assert_eq!(locate(&map, &mut i, 25, 40), (Some((505, 0)), 30));
        assert_eq!(locate(&map, &mut i, 35, 40), (None, 40));
    }
}
