//! The pool's journal: where a new volume's or snapshot's record becomes
//! durable, shared by concurrent creates.
//!
//! A create writes its record file without an fsync and appends the same
//! bytes to the journal; one `fdatasync` of the journal covers every create
//! that appended before it started (group commit, `records::GroupSync`).
//! So 64 creates finishing together cost a few journal syncs instead of 64
//! record fsyncs. The image keeps its own fsync (its content cannot be
//! written again from a record).
//!
//! An entry is needed only until its record file is on disk. A segment
//! (`journal/<number>.log`) holds at most `ENTRIES_PER_SEGMENT` entries;
//! when it is full, appends move to a new segment, and the full ones are
//! removed once a `syncfs` of the pool's filesystem has put every file they
//! speak for on disk (the checkpoint). A `syncfs` that fails keeps them.
//!
//! `Journal::open` (from `Pool::open`, before the reconcile) reads the
//! segments it finds. For each volume or snapshot, the last entry is its
//! latest create; if its record file (`<id>.json`) is there but does not
//! read as that record (empty or torn: a crash lost its unsynced bytes),
//! the file is written again from the entry, fsynced. A record that reads
//! as the same volume (same ID, same creation time) is kept: it may be a
//! later rewrite, which is always fsynced. A pending record alone
//! (`<id>.json.tmp`) is left to the reconcile, which rolls it back (that
//! create never answered), and a record that is gone was deleted.
//!
//! Frame: payload length (u32, little-endian), CRC-32 of the payload (u32,
//! little-endian), payload: the folder (`volumes` or `snapshots`), a
//! newline, the ID, a newline, the record's JSON. The first frame that does
//! not check ends what a segment holds: an append a crash cut short, which
//! never answered.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tracing::{info, warn};

use super::ImageKind;
use crate::volume::records::{self, GroupSync};

/// Entries a segment holds before appends move to a new one. At about 400
/// bytes an entry, a segment is under 2 MiB, and a start after a crash
/// reads at most two segments' worth of records again.
pub(super) const ENTRIES_PER_SEGMENT: usize = 4096;

/// The largest payload a frame may claim (a record's metadata is limited
/// far below this); a larger length is a torn or foreign frame.
const MAX_PAYLOAD: usize = 4 << 20;

pub(super) struct Journal {
    dir: PathBuf,
    /// The pool's folder, held open for `syncfs` at checkpoints.
    pool_root: File,
    current: Mutex<Segment>,
    group: GroupSync,
    /// Held while a checkpoint runs (one at a time).
    checkpointing: Mutex<()>,
    /// The first segment a failed `syncfs` left in doubt: it and every
    /// later one stay until the next open replays them.
    keep_from: AtomicU64,
}

struct Segment {
    number: u64,
    /// Open while appends are in flight, closed when the last of them has
    /// been synced: an idle pool holds no file open for writing, so its
    /// filesystem can still be remounted read-only.
    file: Option<Arc<File>>,
    entries: usize,
    /// Appends written and not yet answered.
    in_flight: usize,
    /// Set by a failed write or sync: an fsync error is reported once, so
    /// after one nothing appended to this journal can be trusted to be on
    /// disk, and every later append fails until the pool is opened again.
    failed: Option<String>,
}

impl Journal {
    /// Open the journal of the pool at `root`: restore the record files
    /// its segments speak for, checkpoint them, and start a new segment.
    /// Returns the journal and the volumes and snapshots whose record was
    /// written again (as `volumes/<id>`, `snapshots/<id>`).
    pub(super) fn open(root: &Path) -> io::Result<(Journal, Vec<String>)> {
        let dir = root.join("journal");
        if !dir.is_dir() {
            std::fs::create_dir_all(&dir)?;
            records::sync_dir(root)?;
        }
        let pool_root = File::open(root)?;
        let segments = list_segments(&dir)?;
        let mut latest: BTreeMap<(ImageKind, String), Vec<u8>> = BTreeMap::new();
        for (_, path) in &segments {
            let bytes = std::fs::read(path)?;
            let (entries, torn) = read_frames(&bytes);
            if torn {
                info!(segment = %path.display(), entries = entries.len(), "journal segment ends in an append cut short (it never answered)");
            }
            for (kind, id, record) in entries {
                latest.insert((kind, id), record);
            }
        }
        let mut restored = Vec::new();
        for ((kind, id), record) in &latest {
            let path = root.join(kind.dir()).join(format!("{id}.json"));
            if restore(&path, id, record)? {
                warn!(record = %path.display(), "record lost its content in a crash; written again from the pool's journal");
                restored.push(kind.lock_key(id));
            }
        }
        let next = segments.last().map(|(n, _)| n + 1).unwrap_or(1);
        drop(create_segment(&dir, next)?);
        let journal = Journal {
            current: Mutex::new(Segment { number: next, file: None, entries: 0, in_flight: 0, failed: None }),
            dir,
            pool_root,
            group: GroupSync::default(),
            checkpointing: Mutex::new(()),
            keep_from: AtomicU64::new(u64::MAX),
        };
        match segments.last() {
            // Entries: their files go to disk before the segments go.
            Some((last, _)) if !latest.is_empty() => journal.checkpoint(*last),
            // Only empty segments (a start with no create since the last).
            Some(_) => {
                for (_, path) in &segments {
                    records::remove_if_exists(path)?;
                }
            }
            None => {}
        }
        Ok((journal, restored))
    }

    /// Append `record` (the bytes of `<id>.json`) and return once it is on
    /// disk in the journal.
    pub(super) fn append(&self, kind: ImageKind, id: &str, record: &[u8]) -> io::Result<()> {
        let frame = frame(kind, id, record);
        let full = {
            let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(e) = &current.failed {
                return Err(io::Error::other(format!("the pool's journal failed earlier ({e}); restart the node to reopen the pool")));
            }
            let mut full = None;
            if current.entries >= ENTRIES_PER_SEGMENT {
                // Everything appended to the full segment is put on disk
                // before appends move on, so a sync of the new segment
                // covers every append made before it started.
                if let Some(file) = &current.file {
                    if let Err(e) = file.sync_data() {
                        current.failed = Some(e.to_string());
                        return Err(e);
                    }
                }
                let number = current.number + 1;
                let file = create_segment(&self.dir, number)?;
                full = Some(current.number);
                current.number = number;
                current.file = Some(Arc::new(file));
                current.entries = 0;
            }
            let file = match &current.file {
                Some(file) => file.clone(),
                None => {
                    let file = Arc::new(File::options().append(true).open(self.dir.join(segment_name(current.number)))?);
                    current.file = Some(file.clone());
                    file
                }
            };
            crate::metrics::METRICS.journal_appends.inc();
            if let Err(e) = (&*file).write_all(&frame) {
                // A frame may be half there; nothing after it could be read.
                current.failed = Some(e.to_string());
                return Err(e);
            }
            current.entries += 1;
            current.in_flight += 1;
            full
        };
        let synced = self.group.sync(|| self.sync_current());
        {
            let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
            current.in_flight -= 1;
            if current.in_flight == 0 && current.failed.is_none() {
                current.file = None;
            }
        }
        synced.map_err(|e| io::Error::other(format!("syncing the pool's journal: {e}")))?;
        if let Some(number) = full {
            self.checkpoint(number);
        }
        Ok(())
    }

    fn sync_current(&self) -> Result<(), String> {
        let file = {
            let current = self.current.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(e) = &current.failed {
                return Err(e.clone());
            }
            match &current.file {
                Some(file) => file.clone(),
                // Closed: every append was synced before it was.
                None => return Ok(()),
            }
        };
        crate::metrics::METRICS.journal_syncs.inc();
        file.sync_data().map_err(|e| {
            let e = e.to_string();
            self.current.lock().unwrap_or_else(|p| p.into_inner()).failed.get_or_insert(e.clone());
            e
        })
    }

    /// Put every file of the pool's filesystem on disk (`syncfs`) and remove
    /// the segments numbered up to `upto`: the records they speak for no
    /// longer need them. Best effort: what is not removed is read again at
    /// the next open.
    fn checkpoint(&self, upto: u64) {
        let _running = self.checkpointing.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = rustix::fs::syncfs(self.pool_root.as_fd()) {
            // Some file on the filesystem failed to reach the disk, perhaps
            // a record: its segments stay for the next open to replay.
            let first = list_segments(&self.dir).ok().and_then(|s| s.first().map(|(n, _)| *n)).unwrap_or(upto);
            self.keep_from.fetch_min(first, Ordering::SeqCst);
            warn!(journal = %self.dir.display(), error = %e, "syncing the pool's filesystem failed; the journal keeps its segments until the next start");
            return;
        }
        let keep_from = self.keep_from.load(Ordering::SeqCst);
        let Ok(segments) = list_segments(&self.dir) else { return };
        for (number, path) in segments {
            if number <= upto && number < keep_from {
                if let Err(e) = records::remove_if_exists(&path) {
                    warn!(segment = %path.display(), error = %e, "could not remove a checkpointed journal segment; the next start reads it again");
                }
            }
        }
    }
}

/// Write `<id>.json` again from its journal entry when it is there but does
/// not read as that record. True when it was written.
fn restore(path: &Path, id: &str, record: &[u8]) -> io::Result<bool> {
    let on_disk = match std::fs::read(path) {
        Ok(b) => b,
        // Deleted since, or a create that never answered.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let journaled = identity_of(record).filter(|(journaled_id, _)| journaled_id == id);
    if journaled.is_none() || identity_of(&on_disk) == journaled {
        return Ok(false);
    }
    records::rewrite_in_place(path, record)?;
    Ok(true)
}

/// A record's ID and creation time, when the bytes read as a record.
fn identity_of(bytes: &[u8]) -> Option<(String, i64)> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    Some((v.get("id")?.as_str()?.to_string(), v.get("created_at_ms")?.as_i64()?))
}

fn segment_name(number: u64) -> String {
    format!("{number:016}.log")
}

/// Create segment `number` and make its name durable before anything in it
/// is relied on.
fn create_segment(dir: &Path, number: u64) -> io::Result<File> {
    let file = File::options().append(true).create_new(true).open(dir.join(segment_name(number)))?;
    records::sync_dir(dir)?;
    Ok(file)
}

/// The segments in `dir`, oldest first. Other files are left alone.
fn list_segments(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(number) = name.strip_suffix(".log").filter(|n| n.len() == 16).and_then(|n| n.parse::<u64>().ok()) {
            out.push((number, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

fn frame(kind: ImageKind, id: &str, record: &[u8]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(kind.dir().len() + id.len() + record.len() + 2);
    payload.extend_from_slice(kind.dir().as_bytes());
    payload.push(b'\n');
    payload.extend_from_slice(id.as_bytes());
    payload.push(b'\n');
    payload.extend_from_slice(record);
    let mut out = Vec::with_capacity(payload.len() + 8);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// The entries of a segment, in order, and whether it ends in bytes that
/// are not a whole, checked frame.
fn read_frames(bytes: &[u8]) -> (Vec<(ImageKind, String, Vec<u8>)>, bool) {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let Some(entry) = read_frame(&bytes[at..]) else {
            return (out, true);
        };
        let (len, kind, id, record) = entry;
        out.push((kind, id, record));
        at += 8 + len;
    }
    (out, false)
}

fn read_frame(bytes: &[u8]) -> Option<(usize, ImageKind, String, Vec<u8>)> {
    let len = u32::from_le_bytes(bytes.get(0..4)?.try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(bytes.get(4..8)?.try_into().ok()?);
    if len > MAX_PAYLOAD {
        return None;
    }
    let payload = bytes.get(8..8 + len)?;
    if crc32(payload) != crc {
        return None;
    }
    let mut parts = payload.splitn(3, |b| *b == b'\n');
    let kind = match parts.next()? {
        b"volumes" => ImageKind::Volume,
        b"snapshots" => ImageKind::Snapshot,
        _ => return None,
    };
    let id = std::str::from_utf8(parts.next()?).ok()?.to_string();
    crate::volume::validate_id("journaled id", &id).ok()?;
    Some((len, kind, id, parts.next()?.to_vec()))
}

/// CRC-32 (the IEEE polynomial, reflected, as zlib and Ethernet use).
fn crc32(bytes: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut k = 0;
            while k < 8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
                k += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for b in bytes {
        crc = TABLE[((crc ^ *b as u32) & 0xFF) as usize] ^ (crc >> 8);
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, created: i64) -> Vec<u8> {
        serde_json::to_vec_pretty(&serde_json::json!({"id": id, "created_at_ms": created, "size_bytes": 4096})).unwrap()
    }

    #[test]
    fn crc32_matches_the_check_value_of_the_ieee_polynomial() {
        // The standard check value: CRC-32 of the ASCII digits 1 to 9.
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    }

    #[test]
    fn frames_read_back_and_a_cut_or_damaged_tail_ends_the_segment() {
        let mut bytes = frame(ImageKind::Volume, "vol-1", &record("vol-1", 1));
        bytes.extend(frame(ImageKind::Snapshot, "snap-1", &record("snap-1", 2)));
        let (entries, torn) = read_frames(&bytes);
        assert!(!torn);
        assert_eq!(entries.len(), 2);
        assert_eq!((entries[1].0, entries[1].1.as_str()), (ImageKind::Snapshot, "snap-1"));
        assert_eq!(entries[1].2, record("snap-1", 2));
        // Cut anywhere inside the second frame: only the first is read.
        let first = frame(ImageKind::Volume, "vol-1", &record("vol-1", 1)).len();
        for cut in first + 1..bytes.len() {
            let (entries, torn) = read_frames(&bytes[..cut]);
            assert!(torn, "cut at {cut}");
            assert_eq!(entries.len(), 1, "cut at {cut}");
        }
        // One byte of the payload changed: the CRC does not check.
        let mut damaged = bytes.clone();
        let last = damaged.len() - 3;
        damaged[last] ^= 0x20;
        assert_eq!(read_frames(&damaged).0.len(), 1);
        // Zeros (a preallocated or zero-filled tail) are not a frame.
        let mut zeros = bytes.clone();
        zeros.extend([0u8; 64]);
        let (entries, torn) = read_frames(&zeros);
        assert_eq!((entries.len(), torn), (2, true));
    }

    #[test]
    fn open_writes_back_lost_records_and_keeps_good_or_newer_ones() {
        let root = tempfile::tempdir().unwrap();
        let vols = root.path().join("volumes");
        std::fs::create_dir_all(&vols).unwrap();
        std::fs::create_dir_all(root.path().join("snapshots")).unwrap();
        {
            let (journal, restored) = Journal::open(root.path()).unwrap();
            assert!(restored.is_empty());
            for (id, created) in [("vol-lost", 1), ("vol-torn", 2), ("vol-good", 3), ("vol-gone", 4), ("vol-again", 5), ("vol-again", 6)] {
                journal.append(ImageKind::Volume, id, &record(id, created)).unwrap();
            }
        }
        // What a crash can leave of files written without an fsync (the
        // crash itself is in tests/volume_pool.rs, on XFS): an empty file,
        // a torn one, stale bytes of another record.
        std::fs::write(vols.join("vol-lost.json"), b"").unwrap();
        std::fs::write(vols.join("vol-torn.json"), &record("vol-torn", 2)[..10]).unwrap();
        std::fs::write(vols.join("vol-good.json"), record("vol-good", 3)).unwrap();
        // Recreated under the same ID: its file holds the first create's
        // record; the last entry (the second create) wins.
        std::fs::write(vols.join("vol-again.json"), record("vol-again", 5)).unwrap();
        // vol-gone.json: deleted since; not made again.
        let good = std::fs::metadata(vols.join("vol-good.json")).unwrap().modified().unwrap();

        let (_journal, restored) = Journal::open(root.path()).unwrap();
        assert_eq!(restored, vec!["volumes/vol-again", "volumes/vol-lost", "volumes/vol-torn"]);
        for (id, created) in [("vol-lost", 1), ("vol-torn", 2), ("vol-good", 3), ("vol-again", 6)] {
            assert_eq!(std::fs::read(vols.join(format!("{id}.json"))).unwrap(), record(id, created), "{id}");
        }
        assert!(!vols.join("vol-gone.json").exists());
        assert_eq!(std::fs::metadata(vols.join("vol-good.json")).unwrap().modified().unwrap(), good);
        // The replayed segment was checkpointed away; a new one is open.
        let left: Vec<u64> = list_segments(&root.path().join("journal")).unwrap().into_iter().map(|(n, _)| n).collect();
        assert_eq!(left, vec![2]);
    }

    #[test]
    fn starts_without_creates_leave_one_empty_segment() {
        let root = tempfile::tempdir().unwrap();
        for _ in 0..3 {
            let (_journal, restored) = Journal::open(root.path()).unwrap();
            assert!(restored.is_empty());
        }
        let left: Vec<u64> = list_segments(&root.path().join("journal")).unwrap().into_iter().map(|(n, _)| n).collect();
        assert_eq!(left, vec![3]);
    }

    #[test]
    fn a_full_segment_moves_appends_on_and_is_removed_once_synced() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("volumes")).unwrap();
        let (journal, _) = Journal::open(root.path()).unwrap();
        let journal = Arc::new(journal);
        // From 4 threads, as concurrent creates append.
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let journal = journal.clone();
                std::thread::spawn(move || {
                    for i in 0..(ENTRIES_PER_SEGMENT / 2 + 10) {
                        let id = format!("vol-{t}-{i}");
                        journal.append(ImageKind::Volume, &id, &record(&id, 1)).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let dir = root.path().join("journal");
        let segments = list_segments(&dir).unwrap();
        // 2 × 4096 + 40 appends: two full segments were checkpointed.
        assert_eq!(segments.iter().map(|(n, _)| *n).collect::<Vec<_>>(), vec![3], "{segments:?}");
        let (entries, torn) = read_frames(&std::fs::read(&segments[0].1).unwrap());
        assert_eq!((entries.len(), torn), (40, false));
    }
}
