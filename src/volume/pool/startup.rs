//! The pool's start-up reconcile (`Pool::open`): the folder brought to a
//! consistent state after whatever stopped the node, following the order
//! of writes the pool module describes, and the index loaded from it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tracing::{info, warn};

use super::{shrink_to, Broken, ImageKind, Index, Pool, ReconcileReport};
use crate::volume::error::VolumeError;
use crate::volume::records::{self, SnapshotRecord, State, VolumeRecord};

/// What the start-up reconcile did with one record.
pub(super) enum Outcome {
    Kept,
    Finished,
    RolledBack,
    Deleted,
}

enum Entry {
    Volume(VolumeRecord),
    Snapshot(SnapshotRecord),
}

impl Entry {
    fn state(&self) -> State {
        match self {
            Entry::Volume(v) => v.state,
            Entry::Snapshot(s) => s.state,
        }
    }
    fn id(&self) -> &str {
        match self {
            Entry::Volume(v) => &v.id,
            Entry::Snapshot(s) => &s.id,
        }
    }
    fn with_state(self, state: State) -> Entry {
        match self {
            Entry::Volume(mut v) => {
                v.state = state;
                Entry::Volume(v)
            }
            Entry::Snapshot(mut s) => {
                s.state = state;
                Entry::Snapshot(s)
            }
        }
    }
    fn write(&self, path: &Path) -> std::io::Result<()> {
        match self {
            Entry::Volume(v) => records::write_record(path, v),
            Entry::Snapshot(s) => records::write_record(path, s),
        }
    }
}

impl Pool {
    /// Bring the folder to a consistent state and load the index: finish or
    /// undo half-made records and expansions, roll back creates whose record
    /// is still pending, finish deletions, move images
    /// that have no record to `orphaned/`, and drop stray temporary files.
    /// A volume or snapshot that cannot be brought back is marked broken,
    /// with the reason, and left as it is: one bad volume never stops the
    /// pool from serving the others.
    pub(super) fn reconcile(&self) -> Result<ReconcileReport, VolumeError> {
        let mut report = ReconcileReport::default();
        let mut index = Index::default();
        for kind in [ImageKind::Volume, ImageKind::Snapshot] {
            let dir = self.root.join(kind.dir());
            let mut records: BTreeMap<String, PathBuf> = BTreeMap::new();
            let mut images: Vec<(String, PathBuf)> = Vec::new();
            let mut stray: Vec<PathBuf> = Vec::new();
            let mut pending: Vec<String> = Vec::new();
            let mut deleting: Vec<String> = Vec::new();
            for entry in std::fs::read_dir(&dir).map_err(VolumeError::io(format!("reading {}", dir.display())))? {
                let entry = entry.map_err(VolumeError::io(format!("reading {}", dir.display())))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let path = entry.path();
                if let Some(id) = name.strip_suffix(".json") {
                    records.insert(id.to_string(), path);
                } else if let Some(id) = name.strip_suffix(".img") {
                    images.push((id.to_string(), path));
                } else {
                    if let Some(id) = name.strip_suffix(".json.tmp") {
                        pending.push(id.to_string());
                    } else if let Some(id) = name.strip_suffix(".json.deleting") {
                        deleting.push(id.to_string());
                    }
                    // *.json.tmp, *.json.deleting, *.img.partial, probes:
                    // resolved below via the records
                    stray.push(path);
                }
            }
            for (id, rec_path) in &records {
                let key = kind.lock_key(id);
                match self.reconcile_one(kind, id, rec_path) {
                    Ok((entry, outcome)) => {
                        match outcome {
                            Outcome::Kept => {}
                            Outcome::Finished => report.finished.push(key),
                            Outcome::RolledBack => report.rolled_back.push(key),
                            Outcome::Deleted => report.deleted.push(key),
                        }
                        match entry {
                            Some(Entry::Volume(v)) => {
                                index.volumes.insert(v.id.clone(), v);
                            }
                            Some(Entry::Snapshot(s)) => {
                                index.snapshots.insert(s.id.clone(), s);
                            }
                            None => {}
                        }
                    }
                    Err(reason) => {
                        warn!(kind = kind.name(), id = %id, %reason, "marked broken; its files are left as they are");
                        report.broken.push(key.clone());
                        index.broken.insert(key, Broken { kind: kind.name(), id: id.clone(), reason });
                    }
                }
            }
            // A record moved aside for deletion: finish the deletion. A
            // pending record alone: a create that never answered, rolled back.
            let mut settled = std::collections::BTreeSet::new();
            pending.sort();
            deleting.sort();
            let unfinished = deleting.into_iter().map(|id| (id, true)).chain(pending.into_iter().map(|id| (id, false)));
            for (id, delete) in unfinished {
                if records.contains_key(&id) || settled.contains(&id) {
                    // A torn rewrite beside its record, or the file of an
                    // earlier, finished deletion: dropped with the strays.
                    // (Or a pending record beside a `.deleting` one, settled.)
                    continue;
                }
                match self.remove_unfinished(kind, &id) {
                    Ok(()) if delete => report.deleted.push(kind.lock_key(&id)),
                    Ok(()) => report.rolled_back.push(kind.lock_key(&id)),
                    Err(e) => warn!(kind = kind.name(), id = %id, error = %e, "could not finish removing it; the next start tries again"),
                }
                settled.insert(id);
            }
            for (id, image) in images {
                if !records.contains_key(&id) && !settled.contains(&id) {
                    match self.move_to_orphaned(&image) {
                        Ok(()) => {
                            warn!(image = %image.display(), "image without a record moved to orphaned/");
                            report.quarantined.push(kind.lock_key(&id));
                        }
                        Err(e) => {
                            warn!(image = %image.display(), error = %e, "image without a record could not be moved to orphaned/; left in place")
                        }
                    }
                }
            }
            for path in stray {
                let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
                let owner = name.split('.').next().unwrap_or_default().to_string();
                let live_partial = name.ends_with(".img.partial") && records.contains_key(&owner);
                // Settled ones' files are gone, or stay for the next start
                // when their removal failed.
                if !live_partial && !settled.contains(&owner) && path.is_file() {
                    if let Err(e) = records::remove_if_exists(&path) {
                        warn!(file = %path.display(), error = %e, "could not remove a stray file");
                    }
                }
            }
            records::sync_dir(&dir).map_err(VolumeError::io(format!("syncing {}", dir.display())))?;
        }
        *self.index() = index;
        if !report.is_empty() {
            info!(?report, "pool reconciled");
        }
        Ok(report)
    }

    /// Settle one record found at start-up. `Err` is the reason the volume
    /// or snapshot is broken.
    fn reconcile_one(&self, kind: ImageKind, id: &str, rec_path: &Path) -> Result<(Option<Entry>, Outcome), String> {
        let image = self.path(kind, id, "img");
        let partial = self.path(kind, id, "img.partial");
        let entry = match kind {
            ImageKind::Volume => records::read_record::<VolumeRecord>(rec_path).map(Entry::Volume),
            ImageKind::Snapshot => records::read_record::<SnapshotRecord>(rec_path).map(Entry::Snapshot),
        }
        .map_err(|e| format!("its record {} cannot be read: {e}", rec_path.display()))?;
        if entry.id() != id {
            return Err(format!("its record {} names another ID, {:?}", rec_path.display(), entry.id()));
        }
        let failed = |what: &str, path: &Path| {
            let what = format!("{what} {}", path.display());
            move |e: std::io::Error| format!("{what} failed: {e}")
        };
        let image_exists = image.try_exists().map_err(failed("looking for", &image))?;
        match entry.state() {
            State::Creating if image_exists => {
                // The image was complete and durable before its rename.
                let entry = entry.with_state(State::Available);
                entry.write(rec_path).map_err(failed("writing", rec_path))?;
                Ok((Some(entry), Outcome::Finished))
            }
            // A cross-node copy under way goes on from its last durable point.
            State::Creating if matches!(&entry, Entry::Volume(v) if v.copy.is_some()) && partial.exists() => {
                Ok((Some(entry), Outcome::Kept))
            }
            State::Creating => {
                records::remove_if_exists(&partial).map_err(failed("removing", &partial))?;
                records::remove_if_exists(rec_path).map_err(failed("removing", rec_path))?;
                Ok((None, Outcome::RolledBack))
            }
            State::Deleting => {
                records::remove_if_exists(&image).map_err(failed("removing", &image))?;
                records::remove_if_exists(&partial).map_err(failed("removing", &partial))?;
                records::remove_if_exists(rec_path).map_err(failed("removing", rec_path))?;
                Ok((None, Outcome::Deleted))
            }
            State::Available if !image_exists && !partial.exists() => Err(format!("its image {} is missing", image.display())),
            State::Available => {
                let renamed = !image_exists;
                if renamed {
                    // Crashed between a create's two renames: the partial image
                    // was complete and durable before the record was written.
                    let dir = self.root.join(kind.dir());
                    std::fs::rename(&partial, &image).map_err(failed("renaming", &partial))?;
                    records::sync_dir(&dir).map_err(failed("syncing", &dir))?;
                } else {
                    records::remove_if_exists(&partial).map_err(failed("removing", &partial))?;
                }
                let (entry, outcome) = match entry {
                    Entry::Volume(v) => {
                        let (v, outcome) = self.settle_size(v).map_err(|e| e.to_string())?;
                        (Entry::Volume(v), outcome)
                    }
                    snapshot => (snapshot, Outcome::Kept),
                };
                Ok((Some(entry), if renamed { Outcome::Finished } else { outcome }))
            }
        }
    }

    /// Remove what an unfinished create or a decided deletion left: the
    /// images first, durably, then the record's pending or `.deleting` file.
    fn remove_unfinished(&self, kind: ImageKind, id: &str) -> std::io::Result<()> {
        let rec_path = self.path(kind, id, "json");
        records::remove_if_exists(&self.path(kind, id, "img"))?;
        records::remove_if_exists(&self.path(kind, id, "img.partial"))?;
        records::sync_dir(&self.root.join(kind.dir()))?;
        records::remove_if_exists(&records::pending_path(&rec_path))?;
        records::remove_if_exists(&records::deleting_path(&rec_path))?;
        Ok(())
    }

    /// Make a volume's record and image agree on its size. An expansion
    /// writes its intent (`expanding_to`) first, grows the image, then
    /// records the new size, so: an image that reached the new size finishes
    /// the expansion; one that did not is cut back to the old size, which
    /// is all anyone was ever told the volume has.
    pub(super) fn settle_size(&self, mut v: VolumeRecord) -> Result<(VolumeRecord, Outcome), VolumeError> {
        let image = self.volume_image(&v.id);
        let rec_path = self.path(ImageKind::Volume, &v.id, "json");
        let len = std::fs::metadata(&image).map_err(VolumeError::io(format!("inspecting {}", image.display())))?.len();
        let outcome = match v.expanding_to {
            Some(target) if len >= target => {
                v.size_bytes = target;
                Outcome::Finished
            }
            Some(_) => {
                shrink_to(&image, v.size_bytes).map_err(VolumeError::io(format!(
                    "cutting {} back to {} bytes",
                    image.display(),
                    v.size_bytes
                )))?;
                Outcome::RolledBack
            }
            None if len < v.size_bytes => {
                // Records of older versions hold the new size before the
                // image grows, and say nothing of the old one.
                self.grow_file(&image, v.size_bytes, v.provisioning).map_err(|e| VolumeError::Io {
                    context: format!(
                        "its record says {} bytes but its image has {len}, and growing the image failed; free space in the pool, then restart the node plugin",
                        v.size_bytes
                    ),
                    source: match e {
                        VolumeError::Io { source, .. } => source,
                        other => std::io::Error::other(other.to_string()),
                    },
                })?;
                Outcome::Finished
            }
            None => return Ok((v, Outcome::Kept)),
        };
        if let Some(target) = v.expanding_to.take() {
            records::write_record(&rec_path, &v).map_err(VolumeError::io(format!("writing {}", rec_path.display())))?;
            match outcome {
                Outcome::Finished => info!(volume.id = %v.id, size = target, "finished an interrupted expansion"),
                _ => {
                    warn!(volume.id = %v.id, size = v.size_bytes, wanted = target, "an interrupted expansion was undone; the volume keeps its old size")
                }
            }
        }
        Ok((v, outcome))
    }

    pub(super) fn move_to_orphaned(&self, path: &Path) -> Result<(), VolumeError> {
        let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let target = self.root.join("orphaned").join(format!("{}-{name}", records::now_ms()));
        std::fs::rename(path, &target).map_err(VolumeError::io(format!("moving {} to orphaned/", path.display())))?;
        records::sync_dir(&self.root.join("orphaned")).map_err(VolumeError::io("syncing orphaned/"))
    }
}
