//! Quarantine: images no record owns are moved to `orphaned/`, never deleted
//! by anything automatic. Each entry is `<ms>-<id>` with up to three files:
//! `.img` (the image), `.json` (its pool record) and `.note.json` (why and
//! when, written first). Ages are the node's own clock. Only an operator's
//! purge, or the node's opt-in retention, deletes them.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::error::VolumeError;
use super::pool::{ImageKind, Pool};
use super::records::{self, now_ms, State};

/// What the note beside a quarantined image says.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrphanNote {
    pub kind: String,
    pub id: String,
    pub reason: String,
    pub quarantined_at_ms: i64,
}

/// One entry of `orphaned/`.
#[derive(Debug, Clone, PartialEq)]
pub struct Orphan {
    pub name: String,
    pub kind: String,
    pub id: String,
    pub reason: String,
    pub age_ms: u64,
    pub size_bytes: u64,
    pub allocated_bytes: u64,
}

const NOTE: &str = ".note.json";
const ORPHANS_LOCK: &str = "orphaned/";

/// The entry a file of `orphaned/` belongs to. A note being written is
/// `<entry>.note.json.tmp` for a moment: it belongs to its entry, not to
/// one called `<entry>.note` (a listing that raced a quarantine showed one).
fn entry_stem(file: &str) -> Option<&str> {
    [".note.json.tmp", NOTE, ".img.partial", ".img", ".json.tmp", ".json"].iter().find_map(|s| file.strip_suffix(s))
}

impl Pool {
    fn orphaned_dir(&self) -> std::path::PathBuf {
        self.root.join("orphaned")
    }

    /// Move the image (and its record) of `id` to `orphaned/` with a note.
    /// Only an Available image older than `min_age_ms` on this node's clock
    /// is moved; anything else answers `None` and changes nothing.
    pub fn quarantine(&self, kind: ImageKind, id: &str, reason: &str, min_age_ms: u64) -> Result<Option<String>, VolumeError> {
        super::validate_id("id", id)?;
        let _guard = self.locks.lock(&[kind.lock_key(id), ORPHANS_LOCK.to_string()]);
        let created = {
            let index = self.index();
            match kind {
                ImageKind::Volume => index.volumes.get(id).map(|v| (v.state, v.created_at_ms)),
                ImageKind::Snapshot => index.snapshots.get(id).map(|s| (s.state, s.created_at_ms)),
            }
        };
        let Some((State::Available, created_at_ms)) = created else { return Ok(None) };
        let now = now_ms();
        if (now - created_at_ms).max(0) as u64 <= min_age_ms {
            return Ok(None);
        }
        let dir = self.orphaned_dir();
        let name = format!("{now}-{id}");
        let note = OrphanNote { kind: kind.name().to_string(), id: id.to_string(), reason: reason.to_string(), quarantined_at_ms: now };
        records::write_record(&dir.join(format!("{name}{NOTE}")), &note).map_err(VolumeError::io("writing the orphan note"))?;
        // Record first, image second: a crash between the two leaves an
        // image without a record, which the next open also moves here.
        let pool_dir = self.root.join(kind.dir());
        // A new record's bytes may still be only in the journal, which
        // writes back records in the pool's folders, not in orphaned/.
        records::sync_file(&self.path(kind, id, "json")).map_err(VolumeError::io("syncing the record before moving it"))?;
        std::fs::rename(self.path(kind, id, "json"), dir.join(format!("{name}.json")))
            .map_err(VolumeError::io("moving the record to orphaned/"))?;
        records::sync_dir(&pool_dir).map_err(VolumeError::io("syncing pool folder"))?;
        match std::fs::rename(self.path(kind, id, "img"), dir.join(format!("{name}.img"))) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => warn!(id, "record without an image quarantined"),
            Err(e) => return Err(VolumeError::io("moving the image to orphaned/")(e)),
        }
        records::sync_dir(&pool_dir).map_err(VolumeError::io("syncing pool folder"))?;
        records::sync_dir(&dir).map_err(VolumeError::io("syncing orphaned/"))?;
        {
            let mut index = self.index();
            match kind {
                ImageKind::Volume => {
                    index.volumes.remove(id);
                }
                ImageKind::Snapshot => {
                    index.snapshots.remove(id);
                }
            }
        }
        info!(id, kind = kind.name(), orphan = %name, reason, "image quarantined in orphaned/");
        Ok(Some(name))
    }

    /// Every entry of `orphaned/`, oldest first.
    pub fn list_orphans(&self) -> Result<Vec<Orphan>, VolumeError> {
        let dir = self.orphaned_dir();
        let now = now_ms();
        let mut entries: BTreeMap<String, Orphan> = BTreeMap::new();
        let rd = std::fs::read_dir(&dir).map_err(VolumeError::io(format!("reading {}", dir.display())))?;
        for e in rd {
            let e = e.map_err(VolumeError::io(format!("reading {}", dir.display())))?;
            let file = e.file_name().to_string_lossy().into_owned();
            let Some(stem) = entry_stem(&file).map(str::to_string) else { continue };
            let (ms, id) = match stem.split_once('-') {
                Some((ms, id)) if ms.parse::<i64>().is_ok() => (ms.parse::<i64>().unwrap_or(0), id.to_string()),
                _ => (0, stem.clone()),
            };
            let entry = entries.entry(stem.clone()).or_insert_with(|| Orphan {
                name: stem.clone(),
                kind: "unknown".into(),
                id,
                reason: "found without a record when the pool opened".into(),
                age_ms: (now - ms).max(0) as u64,
                size_bytes: 0,
                allocated_bytes: 0,
            });
            if file.ends_with(NOTE) {
                if let Ok(note) = records::read_record::<OrphanNote>(&e.path()) {
                    entry.kind = note.kind;
                    entry.id = note.id;
                    entry.reason = note.reason;
                    entry.age_ms = (now - note.quarantined_at_ms).max(0) as u64;
                }
            } else if file.ends_with(".img") {
                if let Ok(m) = e.metadata() {
                    entry.size_bytes = m.len();
                    entry.allocated_bytes = m.blocks() * 512;
                }
            }
        }
        let mut out: Vec<Orphan> = entries.into_values().collect();
        out.sort_by(|a, b| b.age_ms.cmp(&a.age_ms).then(a.name.cmp(&b.name)));
        Ok(out)
    }

    /// Delete the entries of `orphaned/` older than `older_than_ms` (node
    /// clock); with `dry_run`, only say which.
    pub fn purge_orphans(&self, older_than_ms: u64, dry_run: bool) -> Result<Vec<Orphan>, VolumeError> {
        let _guard = self.locks.lock(&[ORPHANS_LOCK.to_string()]);
        let dir = self.orphaned_dir();
        let victims: Vec<Orphan> = self.list_orphans()?.into_iter().filter(|o| o.age_ms >= older_than_ms).collect();
        if dry_run || victims.is_empty() {
            return Ok(victims);
        }
        let rd = std::fs::read_dir(&dir).map_err(VolumeError::io(format!("reading {}", dir.display())))?;
        let names: Vec<String> = rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        for v in &victims {
            // The image last, so an interrupted purge still leaves its note.
            let mut files: Vec<&String> = names.iter().filter(|f| entry_stem(f) == Some(v.name.as_str())).collect();
            files.sort_by_key(|f| f.ends_with(".img"));
            for f in files {
                remove(&dir.join(f))?;
            }
            info!(orphan = %v.name, id = %v.id, age_ms = v.age_ms, bytes = v.allocated_bytes, "orphan purged");
        }
        records::sync_dir(&dir).map_err(VolumeError::io("syncing orphaned/"))?;
        Ok(victims)
    }
}

fn remove(path: &Path) -> Result<(), VolumeError> {
    if let Ok(m) = std::fs::symlink_metadata(path) {
        // Snapshot images are read-only files; unlinking needs no write bit.
        if m.is_file() || m.file_type().is_symlink() {
            records::remove_if_exists(path).map_err(VolumeError::io(format!("removing {}", path.display())))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::entry_stem;

    #[test]
    fn every_file_of_an_entry_names_the_entry() {
        for file in ["1-vol-a.img", "1-vol-a.img.partial", "1-vol-a.json", "1-vol-a.json.tmp", "1-vol-a.note.json", "1-vol-a.note.json.tmp"]
        {
            assert_eq!(entry_stem(file), Some("1-vol-a"), "{file}");
        }
        assert_eq!(entry_stem("README"), None);
    }
}
