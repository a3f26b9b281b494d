//! The pool's side of a cross-node copy (a restore or clone whose source
//! lives on another node): the volume's record is written `Creating` with
//! where the copy reads (`CopyState`), the image is filled under its
//! `.partial` name by the agent's copier (`crate::agent::copier`), which
//! notes durable progress here, and `finish_copy` makes it whole like any
//! other create (fsync, rename, record `Available`). A start-up reconcile
//! keeps such a record and its partial image, so the copy resumes.

use std::fs::File;

use tracing::info;

use super::{ImageKind, Pool, SIZE_ALIGN};
use crate::volume::capacity::Provisioning;
use crate::volume::copy;
use crate::volume::error::VolumeError;
use crate::volume::pool::CreateVolume;
use crate::volume::records::{self, CopyState, State, VolumeRecord};

impl Pool {
    /// Record a volume that will be copied from another node and make its
    /// empty (sparse) partial image. A repeat with the same arguments
    /// returns the volume as it is now (`Creating` with its progress, or
    /// `Available`); a new export for it (`address`, `export_name`)
    /// replaces the old one.
    pub fn begin_copy(&self, req: CreateVolume, from: CopyState) -> Result<VolumeRecord, VolumeError> {
        let size = Self::checked_size(&req)?;
        crate::volume::validate_id("export name", &from.export_name)?;
        let _guard = self.locks.lock(&[ImageKind::Volume.lock_key(&req.id)]);
        self.refuse_broken(ImageKind::Volume, &req.id)?;
        let rec_path = self.path(ImageKind::Volume, &req.id, "json");
        let existing = self.index().volumes.get(&req.id).cloned();
        if let Some(mut existing) = existing {
            Self::same_create(&existing, &req, size)?;
            if let Some(c) = existing.copy.as_mut().filter(|_| existing.state == State::Creating) {
                if from.pass > c.pass {
                    // A migration's next pass: from its start, from a newer snapshot.
                    if !c.pass_done {
                        return Err(VolumeError::Invalid {
                            what: "copy pass",
                            reason: format!("pass {} of volume {} is still being copied; pass {} waits for it", c.pass, req.id, from.pass),
                        });
                    }
                    *c = CopyState { resume_at: 0, copied_bytes: 0, total_bytes: 0, pass_done: false, ..from };
                    records::write_record(&rec_path, &existing).map_err(VolumeError::io("writing volume record"))?;
                    self.index().volumes.insert(req.id.clone(), existing.clone());
                    info!(volume.id = %req.id, pass = from.pass, "next copy pass");
                } else if from.pass == c.pass
                    && (c.address != from.address || c.export_name != from.export_name || c.server_node != from.server_node)
                {
                    (c.address, c.export_name, c.server_node) = (from.address, from.export_name, from.server_node);
                    records::write_record(&rec_path, &existing).map_err(VolumeError::io("writing volume record"))?;
                    self.index().volumes.insert(req.id.clone(), existing.clone());
                }
            }
            return Ok(existing);
        }
        let record =
            Self::creating(&req, size, Some(CopyState { resume_at: 0, copied_bytes: 0, total_bytes: 0, pass_done: false, ..from }));
        self.admit_and_record(&record, true)?;
        let partial = self.path(ImageKind::Volume, &req.id, "img.partial");
        let made = File::create(&partial).and_then(|f| {
            f.set_len(size)?;
            f.sync_all()
        });
        if let Err(e) = made.and_then(|_| records::sync_dir(&self.root.join(ImageKind::Volume.dir()))) {
            self.undo_create(ImageKind::Volume, &req.id);
            return Err(VolumeError::io(format!("creating {}", partial.display()))(e));
        }
        info!(volume.id = %req.id, size, server = %record.copy.as_ref().map(|c| c.server_node.as_str()).unwrap_or(""), "volume to be copied from another node");
        Ok(record)
    }

    /// The partial image a copy writes into, and where it stands.
    pub fn copy_target(&self, id: &str) -> Result<(File, VolumeRecord), VolumeError> {
        let v = self.get_volume(id)?;
        if v.state != State::Creating || v.copy.is_none() {
            return Err(VolumeError::Invalid { what: "volume", reason: format!("{id} is not being copied") });
        }
        let partial = self.path(ImageKind::Volume, id, "img.partial");
        let f = File::options().write(true).open(&partial).map_err(VolumeError::io(format!("opening {}", partial.display())))?;
        Ok((f, v))
    }

    /// Note how far a copy got. The caller synced the partial image first,
    /// so everything below `resume_at` survives a crash.
    pub fn note_copy_progress(&self, id: &str, resume_at: u64, copied_bytes: u64, total_bytes: u64) -> Result<(), VolumeError> {
        let _guard = self.locks.lock(&[ImageKind::Volume.lock_key(id)]);
        let Some(mut v) = self.index().volumes.get(id).cloned() else {
            return Err(VolumeError::NotFound { kind: "volume", id: id.to_string() });
        };
        let Some(c) = v.copy.as_mut() else { return Ok(()) };
        (c.resume_at, c.copied_bytes, c.total_bytes) = (resume_at, copied_bytes, total_bytes);
        records::write_record(&self.path(ImageKind::Volume, id, "json"), &v).map_err(VolumeError::io("writing volume record"))?;
        self.index().volumes.insert(id.to_string(), v);
        Ok(())
    }

    /// The copy is complete: make the image whole (thick: allocate the
    /// rest), durable, renamed into place; the record `Available`.
    pub fn finish_copy(&self, id: &str) -> Result<VolumeRecord, VolumeError> {
        let _guard = self.locks.lock(&[ImageKind::Volume.lock_key(id)]);
        let Some(v) = self.index().volumes.get(id).cloned() else {
            return Err(VolumeError::NotFound { kind: "volume", id: id.to_string() });
        };
        if v.state == State::Available {
            return Ok(v);
        }
        let partial = self.path(ImageKind::Volume, id, "img.partial");
        let f = File::options().write(true).open(&partial).map_err(VolumeError::io(format!("opening {}", partial.display())))?;
        debug_assert_eq!(v.size_bytes % SIZE_ALIGN, 0);
        if v.provisioning == Provisioning::Thick {
            copy::allocate(&f, v.size_bytes).map_err(VolumeError::io("allocating thick image"))?;
        }
        f.sync_all().map_err(VolumeError::io(format!("syncing {}", partial.display())))?;
        drop(f);
        let image = self.path(ImageKind::Volume, id, "img");
        std::fs::rename(&partial, &image).map_err(VolumeError::io(format!("renaming {}", partial.display())))?;
        records::sync_dir(&self.root.join(ImageKind::Volume.dir())).map_err(VolumeError::io("syncing pool folder"))?;
        let mut done = v;
        done.state = State::Available;
        // The copy's figures stay with the volume (what it cost).
        let copied = done.copy.as_ref().map(|c| c.copied_bytes).unwrap_or(0);
        records::write_record(&self.path(ImageKind::Volume, id, "json"), &done).map_err(VolumeError::io("writing volume record"))?;
        self.index().volumes.insert(id.to_string(), done.clone());
        info!(volume.id = %id, size = done.size_bytes, copied, "volume copied from another node");
        Ok(done)
    }

    /// Volumes whose copy is under way (resumed when the agent starts).
    pub fn copies(&self) -> Vec<VolumeRecord> {
        self.index()
            .volumes
            .values()
            .filter(|v| v.state == State::Creating && v.copy.as_ref().is_some_and(|c| !c.pass_done))
            .cloned()
            .collect()
    }

    /// A pass of a migration's copy is complete (the caller synced the
    /// partial image): the volume waits for the next pass.
    pub fn note_pass_done(&self, id: &str) -> Result<(), VolumeError> {
        let _guard = self.locks.lock(&[ImageKind::Volume.lock_key(id)]);
        let Some(mut v) = self.index().volumes.get(id).cloned() else {
            return Err(VolumeError::NotFound { kind: "volume", id: id.to_string() });
        };
        let Some(c) = v.copy.as_mut().filter(|c| c.more_passes) else { return Ok(()) };
        c.pass_done = true;
        c.resume_at = v.size_bytes;
        records::write_record(&self.path(ImageKind::Volume, id, "json"), &v).map_err(VolumeError::io("writing volume record"))?;
        self.index().volumes.insert(id.to_string(), v);
        info!(volume.id = %id, "copy pass complete");
        Ok(())
    }
}
