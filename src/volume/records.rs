//! The pool's on-disk records and how they are written without tearing.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, LazyLock, Mutex};

use serde::{Deserialize, Serialize};

use super::capacity::Provisioning;

/// Where a record is in its life. A record is written `Creating` before its
/// image exists and `Deleting` before its image goes, so a crash at any
/// moment leaves something the start-up reconcile can finish or undo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum State {
    Creating,
    Available,
    Deleting,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VolumeSource {
    Snapshot(String),
    Volume(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub id: String,
    pub size_bytes: u64,
    pub provisioning: Provisioning,
    pub source: Option<VolumeSource>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    pub created_at_ms: i64,
    pub state: State,
    /// Set while an expansion is under way: the image is being grown to
    /// this size and `size_bytes` is still the size the volume has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expanding_to: Option<u64>,
    /// Set while the volume is being copied from another node's export (a
    /// cross-node restore or clone); gone once it is `Available`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy: Option<CopyState>,
}

/// Where a cross-node copy reads and how far it got. Everything below
/// `resume_at` is in the `.partial` image and was synced before this was
/// written, so a restarted copy goes on from there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyState {
    /// host:port of the source node's NBD server.
    pub address: String,
    /// The export's name (a capability; the record is readable by root only).
    pub export_name: String,
    /// The source node: the certificate the NBD server must show.
    pub server_node: String,
    pub resume_at: u64,
    /// Allocated bytes copied below `resume_at`.
    pub copied_bytes: u64,
    /// Allocated bytes of the source, once mapped (0 before).
    #[serde(default)]
    pub total_bytes: u64,
    /// A migration copies in passes (1, 2, ...), each from a newer
    /// snapshot of the volume on its owner; 0 for a one-time copy.
    #[serde(default)]
    pub pass: u32,
    /// More passes follow this one: when it is copied the volume stays
    /// `Creating` with `pass_done`, instead of becoming `Available`.
    #[serde(default)]
    pub more_passes: bool,
    #[serde(default)]
    pub pass_done: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub id: String,
    pub source_volume_id: String,
    pub size_bytes: u64,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    pub created_at_ms: i64,
    pub state: State,
}

/// Write `bytes` to `path` so that a crash leaves either the old file or the
/// new one: write a temporary file (`pending_path`), fsync it, rename it
/// over, fsync the folder.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().ok_or_else(|| io::Error::other("record path has no folder"))?;
    let tmp = pending_path(path);
    write_synced(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    sync_dir(dir)
}

fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = File::options().write(true).create(true).truncate(true).open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

/// `<id>.json.tmp`: the temporary name of a record being rewritten, and the
/// name a new volume's or snapshot's record has for a moment at the end of
/// its create. Found at start-up beside its record, it is a torn rewrite
/// (dropped); alone, a create that never answered (rolled back: its images
/// are removed).
pub fn pending_path(record: &Path) -> PathBuf {
    with_suffix(record, ".tmp")
}

/// `<id>.json.deleting`: a record moved aside (renamed, nothing rewritten)
/// once its deletion is decided; a start-up finishes that deletion.
pub fn deleting_path(record: &Path) -> PathBuf {
    with_suffix(record, ".deleting")
}

/// Write a new volume's or snapshot's record under its pending name, not
/// fsynced: the pool's journal holds the same bytes on disk (`pool::journal`)
/// and puts them back if a crash loses them. The caller syncs the folder
/// and renames it into place.
pub fn write_pending_unsynced(record: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = File::options().write(true).create(true).truncate(true).open(pending_path(record))?;
    f.write_all(bytes)
}

/// Fsync a file that is already written.
pub fn sync_file(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// Write `bytes` to `path` in place and fsync it (a record the journal
/// puts back; its name is already on disk).
pub fn rewrite_in_place(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_synced(path, bytes)
}

pub fn write_record<T: Serialize>(path: &Path, record: &T) -> io::Result<()> {
    let bytes = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
    write_atomically(path, &bytes)
}

pub fn read_record<T: for<'de> Deserialize<'de>>(path: &Path) -> io::Result<T> {
    let bytes = std::fs::read(path)?;
    serde_json::from_slice(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Make a rename or unlink in `dir` durable.
///
/// Group commit: concurrent callers on one folder share fsyncs. A caller
/// waits for a sync that *starts* after it asked (so it covers its rename),
/// and one sync covers everyone who asked before it started; 64 creates
/// finishing together cost a few folder syncs, not 64.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    folder_sync(dir).sync()
}

fn folder_sync(dir: &Path) -> Arc<FolderSync> {
    static FOLDERS: LazyLock<Mutex<HashMap<PathBuf, Arc<FolderSync>>>> = LazyLock::new(Default::default);
    let mut folders = FOLDERS.lock().unwrap_or_else(|p| p.into_inner());
    if folders.len() > 256 {
        // Folders nobody is syncing now (tests make many).
        folders.retain(|_, f| Arc::strong_count(f) > 1);
    }
    folders.entry(dir.to_path_buf()).or_insert_with(|| Arc::new(FolderSync::new(dir))).clone()
}

/// One folder's shared fsyncs.
struct FolderSync {
    dir: PathBuf,
    group: GroupSync,
}

impl FolderSync {
    fn new(dir: &Path) -> Self {
        FolderSync { dir: dir.to_path_buf(), group: GroupSync::default() }
    }

    fn sync(&self) -> io::Result<()> {
        crate::metrics::METRICS.folder_sync_requests.inc();
        self.group
            .sync(|| {
                crate::metrics::METRICS.folder_syncs.inc();
                File::open(&self.dir).and_then(|d| d.sync_all()).map_err(|e| e.to_string())
            })
            .map_err(|e| io::Error::other(format!("syncing folder {}: {e}", self.dir.display())))
    }
}

/// Group commit for one thing to sync (a folder, the pool's journal):
/// callers share syncs. A caller waits for a sync that *starts* after it
/// asked (so it covers what the caller wrote before asking), and one sync
/// covers everyone who asked before it started.
#[derive(Default)]
pub(crate) struct GroupSync {
    state: Mutex<SyncState>,
    done: Condvar,
}

#[derive(Default)]
struct SyncState {
    /// Tickets handed out: the last caller's number.
    asked: u64,
    running: bool,
    /// Finished syncs, oldest first: the last ticket each covered, and
    /// its outcome (kept a while, for the callers still to wake).
    finished: VecDeque<(u64, Result<(), String>)>,
}

/// Finished syncs remembered for callers that have not woken yet.
const REMEMBERED: usize = 1024;

impl GroupSync {
    /// Wait until a sync that started after this call has finished, and
    /// answer its outcome; `sync` is what this caller runs if it is the one
    /// to start that sync.
    pub(crate) fn sync(&self, sync: impl FnOnce() -> Result<(), String>) -> Result<(), String> {
        let mut sync = Some(sync);
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.asked += 1;
        let ticket = s.asked;
        loop {
            if s.finished.back().is_some_and(|(covered, _)| *covered >= ticket) {
                // The first sync that covered this ticket gives the answer.
                return match s.finished.iter().find(|(covered, _)| *covered >= ticket) {
                    Some((_, outcome)) => outcome.clone(),
                    None => Err("the outcome was lost; retry".into()),
                };
            }
            if s.running {
                s = self.done.wait(s).unwrap_or_else(|p| p.into_inner());
                continue;
            }
            // Start one that covers every ticket handed out so far.
            s.running = true;
            let covers = s.asked;
            drop(s);
            let run = sync.take().expect("a caller starts at most one sync: the one it starts covers it");
            let outcome = run();
            s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            s.running = false;
            s.finished.push_back((covers, outcome));
            while s.finished.len() > REMEMBERED {
                s.finished.pop_front();
            }
            self.done.notify_all();
        }
    }
}

/// Remove a file; a file that is already gone is fine.
pub fn remove_if_exists(path: &Path) -> io::Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concurrent_record_writes_in_one_folder_all_land_and_a_failed_sync_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let threads: Vec<_> = (0..32)
            .map(|i| {
                let path = dir.path().join(format!("r{i}.json"));
                std::thread::spawn(move || write_atomically(&path, b"{}"))
            })
            .collect();
        for t in threads {
            t.join().unwrap().unwrap();
        }
        for i in 0..32 {
            assert_eq!(std::fs::read(dir.path().join(format!("r{i}.json"))).unwrap(), b"{}");
        }
        // How many syncs were shared depends on timing; the figures are in
        // the metrics (pool_folder_sync_requests / pool_folder_syncs).
        // A folder that is gone: the error reaches the caller.
        let gone = dir.path().join("gone");
        assert!(sync_dir(&gone).is_err());
    }
}
