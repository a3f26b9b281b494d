//! The owner's side of a live migration: each pass of the copy reads a
//! new snapshot of the volume (a reflink: constant time, never frozen),
//! and every pass after the first reads only what changed since the
//! previous pass's snapshot (`volume::changes`, from the two extent maps).

use std::collections::BTreeMap;
use std::fs::File;

use super::{ImageKind, Pool};
use crate::volume::changes::{self, Changed};
use crate::volume::error::VolumeError;
use crate::volume::records::SnapshotRecord;

impl Pool {
    /// Snapshot `volume_id` for a migration pass. Only where the pool
    /// shares blocks (reflink): elsewhere a pass would copy the whole
    /// volume, and a migration is offline (the volume itself is read).
    pub fn create_pass_snapshot(&self, id: &str, volume_id: &str) -> Result<SnapshotRecord, VolumeError> {
        if !self.reflink() {
            return Err(VolumeError::Invalid {
                what: "migration pass",
                reason: format!("the pool at {} cannot reflink, so a volume on it migrates offline only", self.root().display()),
            });
        }
        let metadata = BTreeMap::from([("cinderblock.dev/migration-of".to_string(), volume_id.to_string())]);
        self.snapshot_with(id, volume_id, metadata, None, true)
    }

    /// What changed from snapshot `older` to snapshot `newer` (two pass
    /// snapshots of one volume).
    pub fn snapshot_changes(&self, older: &str, newer: &str) -> Result<Vec<Changed>, VolumeError> {
        self.get_snapshot(older)?;
        self.get_snapshot(newer)?;
        let open = |id: &str| {
            let path = self.path(ImageKind::Snapshot, id, "img");
            File::open(&path).map_err(VolumeError::io(format!("opening {}", path.display())))
        };
        let (a, b) = (open(older)?, open(newer)?);
        changes::changed_ranges(&a, &b).map_err(VolumeError::io(format!("mapping the extents of snapshots {older} and {newer}")))
    }
}
