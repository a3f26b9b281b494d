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
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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
    current: Mutex<Segment>,
    group: GroupSync,
    checkpoints: Arc<Checkpoints>,
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

/// Removing segments whose records are on disk; run on a thread of its
/// own after a rotation (a `syncfs` can take a while on a busy pool, and
/// no create waits for it), and at open.
struct Checkpoints {
    /// The journal's folder.
    dir: PathBuf,
    /// The pool's folder, held open for `syncfs`.
    pool_root: File,
    /// Held while a checkpoint runs (one at a time).
    running: Mutex<()>,
    /// The first segment a failed `syncfs` or read left in doubt: it and
    /// every later one stay until the next open replays them.
    keep_from: AtomicU64,
    /// Checkpoints started and not finished (tests wait for them).
    pending: AtomicUsize,
}

impl Journal {
    /// Open the journal of the pool at `root`: restore the record files
    /// its segments speak for, checkpoint them, and start a new segment.
    /// Returns the journal and the volumes and snapshots whose record was
    /// written again (as `volumes/<id>`, `snapshots/<id>`). A segment or a
    /// record that cannot be read is logged and left as it is (the
    /// reconcile marks such a record broken): one bad file never stops the
    /// pool.
    pub(super) fn open(root: &Path) -> io::Result<(Journal, Vec<String>)> {
        let dir = root.join("journal");
        if !dir.is_dir() {
            std::fs::create_dir_all(&dir)?;
            records::sync_dir(root)?;
        }
        let checkpoints = Arc::new(Checkpoints {
            dir: dir.clone(),
            pool_root: File::open(root)?,
            running: Mutex::new(()),
            keep_from: AtomicU64::new(u64::MAX),
            pending: AtomicUsize::new(0),
        });
        let segments = list_segments(&dir)?;
        let mut latest: BTreeMap<(ImageKind, String), Vec<u8>> = BTreeMap::new();
        for (number, path) in &segments {
            let bytes = match std::fs::read(path) {
                Ok(b) => b,
                Err(e) => {
                    warn!(segment = %path.display(), error = %e, "journal segment cannot be read; kept for the next start");
                    checkpoints.keep_from.fetch_min(*number, Ordering::SeqCst);
                    continue;
                }
            };
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
            match restore(&path, id, record) {
                Ok(true) => {
                    warn!(record = %path.display(), "record lost its content in a crash; written again from the pool's journal");
                    restored.push(kind.lock_key(id));
                }
                Ok(false) => {}
                Err(e) => warn!(record = %path.display(), error = %e, "record could not be checked against the pool's journal"),
            }
        }
        let next = segments.last().map(|(n, _)| n + 1).unwrap_or(1);
        drop(create_segment(&dir, next)?);
        match segments.last() {
            // Entries: their files go to disk before the segments go.
            Some((last, _)) if !latest.is_empty() => checkpoints.run(*last),
            // Only empty segments (a start with no create since the last).
            Some((last, _)) => checkpoints.remove_up_to(*last),
            None => {}
        }
        let journal = Journal {
            current: Mutex::new(Segment { number: next, file: None, entries: 0, in_flight: 0, failed: None }),
            group: GroupSync::default(),
            checkpoints,
        };
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
                let rotated = current
                    .file
                    .as_ref()
                    .map_or(Ok(()), |f| f.sync_data())
                    .and_then(|()| create_segment(&self.checkpoints.dir, current.number + 1));
                let file = match rotated {
                    Ok(file) => file,
                    Err(e) => {
                        // The new segment may exist half made: no retry.
                        current.failed = Some(e.to_string());
                        return Err(e);
                    }
                };
                full = Some(current.number);
                current.number += 1;
                current.file = Some(Arc::new(file));
                current.entries = 0;
            }
            let file = match &current.file {
                Some(file) => file.clone(),
                None => {
                    let file = Arc::new(File::options().append(true).open(self.checkpoints.dir.join(segment_name(current.number)))?);
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
            self.checkpoints.start(number);
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
        let synced = file.sync_data();
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        match synced {
            Err(e) => Err(current.failed.get_or_insert(e.to_string()).clone()),
            // A rotation syncs the same file description under the lock; an
            // error is reported to one of the two calls only, so this one
            // answers what the other found.
            Ok(()) => current.failed.clone().map_or(Ok(()), Err),
        }
    }

    /// Waits until the checkpoints started so far have finished.
    #[cfg(test)]
    fn wait_for_checkpoints(&self) {
        while self.checkpoints.pending.load(Ordering::SeqCst) > 0 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
}

impl Checkpoints {
    /// Checkpoint up to segment `upto` on a thread of its own (inline if no
    /// thread can be made).
    fn start(self: &Arc<Self>, upto: u64) {
        self.pending.fetch_add(1, Ordering::SeqCst);
        let me = self.clone();
        let spawned = std::thread::Builder::new().name("pool-journal-checkpoint".into()).spawn(move || me.run_counted(upto));
        if spawned.is_err() {
            self.run_counted(upto);
        }
    }

    fn run_counted(&self, upto: u64) {
        self.run(upto);
        self.pending.fetch_sub(1, Ordering::SeqCst);
    }

    /// Put every file of the pool's filesystem on disk (`syncfs`) and remove
    /// the segments numbered up to `upto`: the records they speak for no
    /// longer need them. Best effort: what is not removed is read again at
    /// the next open. (`syncfs` reports writeback errors since Linux 5.8.)
    fn run(&self, upto: u64) {
        let _running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = rustix::fs::syncfs(&self.pool_root) {
            // Some file on the filesystem failed to reach the disk, perhaps
            // a record: its segments stay for the next open to replay.
            let first = list_segments(&self.dir).ok().and_then(|s| s.first().map(|(n, _)| *n)).unwrap_or(upto);
            self.keep_from.fetch_min(first, Ordering::SeqCst);
            warn!(journal = %self.dir.display(), error = %e, "syncing the pool's filesystem failed; the journal keeps its segments until the next start");
            return;
        }
        self.remove_up_to(upto);
    }

    /// Remove the segments numbered up to `upto`, but none a failure left
    /// in doubt.
    fn remove_up_to(&self, upto: u64) {
        let keep_from = self.keep_from.load(Ordering::SeqCst);
        let segments = match list_segments(&self.dir) {
            Ok(s) => s,
            Err(e) => return warn!(journal = %self.dir.display(), error = %e, "could not list the journal's segments"),
        };
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
/// not read as a record of that volume or snapshot (empty, zeroed or torn:
/// what a crash leaves of bytes that never reached the disk). True when it
/// was written.
///
/// A file that reads as a record of the same ID is kept, whatever it says:
/// it is the entry's own record or a later one (a rewrite, or a cross-node
/// copy's record, which are fsynced and never journaled), never an older
/// one.
fn restore(path: &Path, id: &str, record: &[u8]) -> io::Result<bool> {
    let on_disk = match std::fs::read(path) {
        Ok(b) => b,
        // Deleted since, or a create that never answered.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if record_id(record).as_deref() != Some(id) || record_id(&on_disk).as_deref() == Some(id) {
        return Ok(false);
    }
    records::rewrite_in_place(path, record)?;
    Ok(true)
}

/// The ID of a record, when the bytes read as one.
fn record_id(bytes: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    Some(v.get("id")?.as_str()?.to_string())
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

    /// The numbers of the segments in `root`'s journal.
    fn segment_numbers(root: &Path) -> Vec<u64> {
        list_segments(&root.join("journal")).unwrap().into_iter().map(|(n, _)| n).collect()
    }

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
    fn open_writes_back_lost_records_and_keeps_any_record_of_the_same_volume() {
        let root = tempfile::tempdir().unwrap();
        let vols = root.path().join("volumes");
        std::fs::create_dir_all(&vols).unwrap();
        std::fs::create_dir_all(root.path().join("snapshots")).unwrap();
        {
            let (journal, restored) = Journal::open(root.path()).unwrap();
            assert!(restored.is_empty());
            for (id, created) in [("vol-lost", 1), ("vol-torn", 2), ("vol-stale", 3), ("vol-good", 4), ("vol-gone", 5), ("vol-copied", 6)] {
                journal.append(ImageKind::Volume, id, &record(id, created)).unwrap();
            }
        }
        // What a crash can leave of files written without an fsync (the
        // crash itself is in tests/volume_pool.rs, on XFS): an empty file,
        // a torn one, the stale bytes of another volume's record.
        std::fs::write(vols.join("vol-lost.json"), b"").unwrap();
        std::fs::write(vols.join("vol-torn.json"), &record("vol-torn", 2)[..10]).unwrap();
        std::fs::write(vols.join("vol-stale.json"), record("vol-other", 9)).unwrap();
        std::fs::write(vols.join("vol-good.json"), record("vol-good", 4)).unwrap();
        // Deleted and copied back from another node since its create: the
        // copy's record (fsynced, not journaled) is newer than the entry.
        std::fs::write(vols.join("vol-copied.json"), record("vol-copied", 60)).unwrap();
        // vol-gone.json: deleted since; not made again.
        let good = std::fs::metadata(vols.join("vol-good.json")).unwrap().modified().unwrap();

        let (_journal, restored) = Journal::open(root.path()).unwrap();
        assert_eq!(restored, vec!["volumes/vol-lost", "volumes/vol-stale", "volumes/vol-torn"]);
        for (id, created) in [("vol-lost", 1), ("vol-torn", 2), ("vol-stale", 3), ("vol-good", 4), ("vol-copied", 60)] {
            assert_eq!(std::fs::read(vols.join(format!("{id}.json"))).unwrap(), record(id, created), "{id}");
        }
        assert!(!vols.join("vol-gone.json").exists());
        assert_eq!(std::fs::metadata(vols.join("vol-good.json")).unwrap().modified().unwrap(), good);
        // The replayed segment was checkpointed away; a new one is open.
        assert_eq!(segment_numbers(root.path()), vec![2]);
    }

    #[test]
    fn a_segment_that_cannot_be_read_is_kept_and_the_pool_still_opens() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("volumes")).unwrap();
        drop(Journal::open(root.path()).unwrap());
        // A segment that is not a file (reading it fails with EISDIR).
        std::fs::create_dir(root.path().join("journal").join(segment_name(7))).unwrap();
        let (journal, restored) = Journal::open(root.path()).unwrap();
        assert!(restored.is_empty());
        journal.append(ImageKind::Volume, "vol-1", &record("vol-1", 1)).unwrap();
        assert_eq!(segment_numbers(root.path()), vec![7, 8]);
    }

    #[test]
    fn starts_without_creates_leave_one_empty_segment() {
        let root = tempfile::tempdir().unwrap();
        for _ in 0..3 {
            let (_journal, restored) = Journal::open(root.path()).unwrap();
            assert!(restored.is_empty());
        }
        assert_eq!(segment_numbers(root.path()), vec![3]);
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
        journal.wait_for_checkpoints();
        let dir = root.path().join("journal");
        let segments = list_segments(&dir).unwrap();
        // 2 × 4096 + 40 appends: two full segments were checkpointed.
        assert_eq!(segments.iter().map(|(n, _)| *n).collect::<Vec<_>>(), vec![3], "{segments:?}");
        let (entries, torn) = read_frames(&std::fs::read(&segments[0].1).unwrap());
        assert_eq!((entries.len(), torn), (40, false));
    }
}
