//! A storage pool: a folder holding volume and snapshot images, each beside
//! its JSON record. Layout:
//!
//! ```text
//! <pool>/volumes/<id>.img   <id>.json   (<id>.img.partial while being made)
//! <pool>/snapshots/<id>.img <id>.json   (images read-only)
//! <pool>/orphaned/          images found without a record, kept for a person
//! <pool>/pool.json           the pool's identity (its UUID)
//! <pool>/journal/            records of recent creates (`journal`)
//! ```
//!
//! Order of writes, so a crash at any instant is recoverable: a create makes
//! its image under a `.partial` name and fsyncs it; then writes its
//! `Available` record under the pending name `<id>.json.tmp`, without an
//! fsync, and appends the same bytes to the pool's journal, which is
//! synced; syncs the folder; renames the image, then the record, into
//! place; syncs the folder again. Deletion renames the record to
//! `<id>.json.deleting`, removes the image, then the record. `Pool::open`
//! first writes back from the journal any record a crash emptied, then
//! reconciles whatever it finds: a partial image alone is dropped, a
//! pending record alone is a create that never answered (rolled back), a
//! record whose image is still partial finishes the rename, a `.deleting`
//! record finishes its deletion.
//!
//! A create and its delete make two files, rewrite none, and cost one file
//! fsync of their own (the image's): creating a file is the costly step on
//! some filesystems (ext4 without a journal scans its recently freed
//! inodes), and a file fsync is the one thing concurrent creates cannot
//! share (folder syncs and journal syncs are shared).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::capacity::{PoolCapacity, Provisioning};
use super::copy::{self, CopyMethod};
use super::error::VolumeError;
use super::freeze::Freezer;
use super::identity;
use super::records::{self, SnapshotRecord, State, VolumeRecord, VolumeSource};
use super::{validate_id, MAX_METADATA_BYTES, MAX_METADATA_ENTRIES};
use crate::keyed_locks::KeyedLocks;

mod copy_target;
mod journal;
mod passes;
mod startup;

/// Images are sized in whole 4 KiB blocks so any block device can sit on them.
pub const SIZE_ALIGN: u64 = 4096;

/// Whether making an image from a source freezes the filesystem mounted
/// from that source: never (volumes, a migration's pass snapshots), for
/// this snapshot alone, or as a member of a group snapshot that holds it.
#[derive(Clone, Copy)]
enum Freeze<'a> {
    Never,
    Alone,
    InGroup(&'a str),
}
/// The largest image we make (an ext4/xfs file can be larger; a loop device
/// offset is a signed 64-bit number).
pub const MAX_VOLUME_BYTES: u64 = 1 << 50;

#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub max_over_subscription_ratio: f64,
    pub reserved_percentage: u32,
    /// When false, snapshots and clones always copy (for benchmarks and tests).
    pub allow_reflink: bool,
}

impl Default for PoolConfig {
    fn default() -> Self {
        // Cinder's defaults: max_over_subscription_ratio 20, reserved 0%.
        PoolConfig { max_over_subscription_ratio: 20.0, reserved_percentage: 0, allow_reflink: true }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PoolStatus {
    pub capacity: PoolCapacity,
    pub volume_count: u32,
    pub snapshot_count: u32,
    pub reflink: bool,
    pub filesystem: String,
}

#[derive(Default)]
pub(super) struct Index {
    pub(super) volumes: BTreeMap<String, VolumeRecord>,
    pub(super) snapshots: BTreeMap<String, SnapshotRecord>,
    /// Keyed like the locks: `volumes/<id>`, `snapshots/<id>`.
    broken: BTreeMap<String, Broken>,
}

/// A volume or snapshot the pool found on disk but cannot serve (its record
/// cannot be read, its image is missing, its size cannot be settled). Its
/// files are left exactly as they were; the rest of the pool is served.
#[derive(Debug, Clone, PartialEq)]
pub struct Broken {
    /// "volume" or "snapshot".
    pub kind: &'static str,
    pub id: String,
    pub reason: String,
}

pub struct Pool {
    pub(super) root: PathBuf,
    uuid: String,
    config: PoolConfig,
    reflink: bool,
    filesystem: String,
    pub(super) locks: KeyedLocks,
    index: Mutex<Index>,
    /// Held across "check capacity, then record Creating" so two concurrent
    /// creates cannot both take the last free bytes.
    admission: Mutex<()>,
    /// Installed by the node process; freezes a source volume's filesystem
    /// while its snapshot is cut.
    freezer: std::sync::RwLock<Option<Arc<dyn Freezer>>>,
    /// Freezes held between the steps of a group snapshot.
    pub(super) groups: super::group::GroupFreezes,
    /// Where creates' records become durable together (`journal`).
    journal: journal::Journal,
}

pub use crate::reconcile_report::ReconcileReport;

/// What a pool holds an image and a record of: a volume or a snapshot.
/// (The controller's store has more kinds of record, `store::Kind`; a pool
/// has these two, each in its own folder.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ImageKind {
    Volume,
    Snapshot,
}

impl ImageKind {
    pub(super) fn dir(self) -> &'static str {
        match self {
            ImageKind::Volume => "volumes",
            ImageKind::Snapshot => "snapshots",
        }
    }
    pub(super) fn name(self) -> &'static str {
        match self {
            ImageKind::Volume => "volume",
            ImageKind::Snapshot => "snapshot",
        }
    }
    pub(super) fn lock_key(self, id: &str) -> String {
        format!("{}/{id}", self.dir())
    }
}

pub struct CreateVolume {
    pub id: String,
    pub size_bytes: u64,
    pub provisioning: Provisioning,
    pub source: Option<VolumeSource>,
    pub metadata: BTreeMap<String, String>,
}

impl Pool {
    /// Open (creating if needed) the pool at `root` and reconcile it.
    pub fn open(root: &Path, config: PoolConfig) -> Result<(Pool, ReconcileReport), VolumeError> {
        if !(config.max_over_subscription_ratio > 0.0 && config.max_over_subscription_ratio.is_finite()) {
            return Err(VolumeError::Invalid {
                what: "max_over_subscription_ratio",
                reason: format!("{} must be a positive number", config.max_over_subscription_ratio),
            });
        }
        if config.reserved_percentage > 100 {
            return Err(VolumeError::Invalid {
                what: "reserved_percentage",
                reason: format!("{} must be between 0 and 100", config.reserved_percentage),
            });
        }
        // Read before anything is created: an unusable record stops here
        // with the folder untouched.
        let record = identity::read(root)?;
        let adopted = record.is_none() && root.join("volumes").is_dir();
        for d in ["volumes", "snapshots", "orphaned"] {
            std::fs::create_dir_all(root.join(d)).map_err(VolumeError::io(format!("creating pool folder {}", root.join(d).display())))?;
        }
        let root = root.canonicalize().map_err(VolumeError::io(format!("resolving pool folder {}", root.display())))?;
        let reflink = config.allow_reflink
            && copy::probe_reflink(&root.join("volumes"))
                .map_err(VolumeError::io(format!("probing reflink support in {}", root.display())))?;
        let filesystem = filesystem_name(&root);
        let record = match record {
            Some(r) => r,
            None => identity::create(&root, adopted)?,
        };
        let (journal, restored) =
            journal::Journal::open(&root).map_err(VolumeError::io(format!("opening the journal of pool {}", root.display())))?;
        let pool = Pool {
            root,
            uuid: record.uuid,
            config,
            reflink,
            filesystem,
            locks: KeyedLocks::default(),
            index: Mutex::new(Index::default()),
            admission: Mutex::new(()),
            freezer: std::sync::RwLock::new(None),
            groups: Default::default(),
            journal,
        };
        let mut report = pool.reconcile()?;
        report.restored = restored;
        let (volumes, snapshots) = {
            let index = pool.index();
            (index.volumes.len(), index.snapshots.len())
        };
        info!(pool = %pool.root.display(), pool.uuid = %pool.uuid, reflink = pool.reflink, filesystem = %pool.filesystem, volumes, snapshots, "pool open");
        Ok((pool, report))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }
    /// The pool's UUID, given when it was first created and kept in
    /// `pool.json`; the same across restarts.
    pub fn uuid(&self) -> &str {
        &self.uuid
    }
    pub fn reflink(&self) -> bool {
        self.reflink
    }
    pub fn config(&self) -> &PoolConfig {
        &self.config
    }

    /// Have snapshots freeze the filesystem mounted from their source
    /// volume's image (the node process installs this; see `volume::freeze`).
    pub fn set_freezer(&self, freezer: Arc<dyn Freezer>) {
        *self.freezer.write().unwrap_or_else(|p| p.into_inner()) = Some(freezer);
    }

    pub(super) fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn path(&self, kind: ImageKind, id: &str, ext: &str) -> PathBuf {
        // Only ever called with validated IDs.
        self.root.join(kind.dir()).join(format!("{id}.{ext}"))
    }

    pub fn volume_image(&self, id: &str) -> PathBuf {
        self.path(ImageKind::Volume, id, "img")
    }
    pub fn snapshot_image(&self, id: &str) -> PathBuf {
        self.path(ImageKind::Snapshot, id, "img")
    }

    fn grow_file(&self, image: &Path, size: u64, provisioning: Provisioning) -> Result<(), VolumeError> {
        let f = File::options().write(true).open(image).map_err(VolumeError::io(format!("opening {}", image.display())))?;
        let len = f.metadata().map_err(VolumeError::io("reading image size"))?.len();
        if len < size {
            if provisioning == Provisioning::Thick {
                copy::allocate(&f, size).map_err(VolumeError::io(format!("allocating {size} bytes for {}", image.display())))?;
            } else {
                f.set_len(size).map_err(VolumeError::io(format!("growing {} to {size} bytes", image.display())))?;
            }
            f.sync_all().map_err(VolumeError::io("syncing image"))?;
        }
        Ok(())
    }

    // ---------------------------------------------------------------- broken

    /// Volumes and snapshots found on disk that the pool cannot serve, with
    /// the reason each is broken (for the node's report and for people).
    pub fn broken(&self) -> Vec<Broken> {
        self.index().broken.values().cloned().collect()
    }

    fn refuse_broken(&self, kind: ImageKind, id: &str) -> Result<(), VolumeError> {
        match self.index().broken.get(&kind.lock_key(id)) {
            Some(b) => Err(VolumeError::Broken { kind: b.kind, id: b.id.clone(), reason: b.reason.clone() }),
            None => Ok(()),
        }
    }

    /// Deleting a broken volume or snapshot moves its files to `orphaned/`
    /// (nothing the pool cannot read is destroyed by it). `false` when `id`
    /// is not broken.
    fn set_aside_broken(&self, kind: ImageKind, id: &str) -> Result<bool, VolumeError> {
        let key = kind.lock_key(id);
        if !self.index().broken.contains_key(&key) {
            return Ok(false);
        }
        for ext in ["img", "img.partial", "json"] {
            let path = self.path(kind, id, ext);
            if path.try_exists().map_err(VolumeError::io(format!("looking for {}", path.display())))? {
                self.move_to_orphaned(&path)?;
            }
        }
        records::sync_dir(&self.root.join(kind.dir())).map_err(VolumeError::io("syncing pool folder"))?;
        self.index().broken.remove(&key);
        warn!(kind = kind.name(), id, "broken and deleted: its files were moved to orphaned/");
        Ok(true)
    }

    // ---------------------------------------------------------------- capacity

    pub fn status(&self) -> Result<PoolStatus, VolumeError> {
        let st = rustix::fs::statvfs(&self.root)
            .map_err(|e| VolumeError::Io { context: format!("statvfs {}", self.root.display()), source: e.into() })?;
        let index = self.index();
        // An expansion under way holds its new size.
        let provisioned: u64 = index.volumes.values().map(|v| v.size_bytes.max(v.expanding_to.unwrap_or(0))).sum::<u64>()
            + index.snapshots.values().map(|s| s.size_bytes).sum::<u64>();
        Ok(PoolStatus {
            capacity: PoolCapacity {
                total: st.f_blocks * st.f_frsize,
                free: st.f_bavail * st.f_frsize,
                provisioned,
                max_over_subscription_ratio: self.config.max_over_subscription_ratio,
                reserved_percentage: self.config.reserved_percentage,
            },
            volume_count: index.volumes.len() as u32,
            snapshot_count: index.snapshots.len() as u32,
            reflink: self.reflink,
            filesystem: self.filesystem.clone(),
        })
    }

    fn admit(&self, size: u64, provisioning: Provisioning) -> Result<(), VolumeError> {
        let cap = self.status()?.capacity;
        let ceiling = match provisioning {
            Provisioning::Thin if cap.max_over_subscription_ratio >= 1.0 => (cap.total as f64 * cap.max_over_subscription_ratio) as u64,
            _ => cap.total,
        };
        if size > ceiling {
            return Err(VolumeError::OutOfRange {
                requested: size,
                reason: format!("the pool could never hold it ({} bytes at most, {})", ceiling, provisioning.as_str()),
            });
        }
        cap.fits(size, provisioning).map_err(|shortfall| VolumeError::Capacity { requested: size, shortfall })
    }

    // ---------------------------------------------------------------- volumes

    pub fn get_volume(&self, id: &str) -> Result<VolumeRecord, VolumeError> {
        validate_id("volume id", id)?;
        self.refuse_broken(ImageKind::Volume, id)?;
        self.index().volumes.get(id).cloned().ok_or_else(|| VolumeError::NotFound { kind: "volume", id: id.to_string() })
    }

    pub fn list_volumes(&self) -> Vec<VolumeRecord> {
        self.volumes_after(None, usize::MAX)
    }

    /// At most `limit` volumes whose IDs sort after `after` (from the
    /// first when None), in ID order: a page costs its own length, not the
    /// pool's.
    pub fn volumes_after(&self, after: Option<&str>, limit: usize) -> Vec<VolumeRecord> {
        page_after(&self.index().volumes, after, limit, |_| true)
    }

    /// The volumes among `ids` the pool holds.
    pub fn volumes_named(&self, ids: &[String]) -> Vec<VolumeRecord> {
        let index = self.index();
        ids.iter().filter_map(|id| index.volumes.get(id).cloned()).collect()
    }

    /// The pool's broken volumes or snapshots (`kind` is "volume" or
    /// "snapshot") whose IDs sort after `after`, up to and including
    /// `through` when given.
    pub fn broken_between(&self, kind: &str, after: Option<&str>, through: Option<&str>) -> Vec<Broken> {
        self.index()
            .broken
            .values()
            .filter(|b| b.kind == kind && after.is_none_or(|a| b.id.as_str() > a) && through.is_none_or(|t| b.id.as_str() <= t))
            .cloned()
            .collect()
    }

    /// Check a create's ID, metadata and size; the size rounded up to whole blocks.
    fn checked_size(req: &CreateVolume) -> Result<u64, VolumeError> {
        validate_id("volume id", &req.id)?;
        validate_metadata(&req.metadata)?;
        if req.size_bytes == 0 {
            return Err(VolumeError::Invalid { what: "size", reason: "a volume needs a size above zero".into() });
        }
        if req.size_bytes > MAX_VOLUME_BYTES {
            return Err(VolumeError::OutOfRange {
                requested: req.size_bytes,
                reason: format!("the largest volume is {MAX_VOLUME_BYTES} bytes"),
            });
        }
        Ok(req.size_bytes.div_ceil(SIZE_ALIGN) * SIZE_ALIGN)
    }

    /// A repeated create must ask for what the volume is: ALREADY_EXISTS otherwise.
    fn same_create(existing: &VolumeRecord, req: &CreateVolume, size: u64) -> Result<(), VolumeError> {
        if existing.size_bytes == size && existing.provisioning == req.provisioning && existing.source == req.source {
            return Ok(());
        }
        Err(VolumeError::Conflict {
            kind: "volume",
            id: req.id.clone(),
            detail: format!("it has {} bytes, {}, source {:?}", existing.size_bytes, existing.provisioning.as_str(), existing.source),
        })
    }

    /// The `Creating` record of a new volume.
    fn creating(req: &CreateVolume, size: u64, copy: Option<records::CopyState>) -> VolumeRecord {
        VolumeRecord {
            id: req.id.clone(),
            size_bytes: size,
            provisioning: req.provisioning,
            source: req.source.clone(),
            metadata: req.metadata.clone(),
            created_at_ms: records::now_ms(),
            state: State::Creating,
            expanding_to: None,
            copy,
        }
    }

    /// Admit a new volume against the pool's capacity and enter it in the
    /// index as `Creating`, as one step racing creates cannot interleave.
    /// `resumable` (a cross-node copy): its `Creating` record is written to
    /// disk now, so a restart resumes the copy. Any other create writes its
    /// record once its image is made (`finish_create`).
    fn admit_and_record(&self, record: &VolumeRecord, resumable: bool) -> Result<(), VolumeError> {
        let _admission = self.admission.lock().unwrap_or_else(|p| p.into_inner());
        self.admit(record.size_bytes, record.provisioning)?;
        if resumable {
            let path = self.path(ImageKind::Volume, &record.id, "json");
            records::write_record(&path, record).map_err(VolumeError::io("writing volume record"))?;
        }
        self.index().volumes.insert(record.id.clone(), record.clone());
        Ok(())
    }

    pub fn create_volume(&self, req: CreateVolume) -> Result<VolumeRecord, VolumeError> {
        let size = Self::checked_size(&req)?;
        let mut keys = vec![ImageKind::Volume.lock_key(&req.id)];
        match &req.source {
            Some(VolumeSource::Snapshot(s)) => {
                validate_id("source snapshot id", s)?;
                keys.push(ImageKind::Snapshot.lock_key(s));
            }
            Some(VolumeSource::Volume(v)) => {
                validate_id("source volume id", v)?;
                if *v == req.id {
                    return Err(VolumeError::Invalid { what: "source volume id", reason: "a volume cannot be its own source".into() });
                }
                keys.push(ImageKind::Volume.lock_key(v));
            }
            None => {}
        }
        let _guard = self.locks.lock(&keys);
        self.refuse_broken(ImageKind::Volume, &req.id)?;
        match &req.source {
            Some(VolumeSource::Snapshot(s)) => self.refuse_broken(ImageKind::Snapshot, s)?,
            Some(VolumeSource::Volume(v)) => self.refuse_broken(ImageKind::Volume, v)?,
            None => {}
        }

        if let Some(existing) = self.index().volumes.get(&req.id).cloned() {
            return Self::same_create(&existing, &req, size).map(|_| existing);
        }

        // The source, held by its lock for the whole copy.
        let source_image = match &req.source {
            Some(VolumeSource::Snapshot(s)) => {
                let snap = self
                    .index()
                    .snapshots
                    .get(s)
                    .cloned()
                    .ok_or_else(|| VolumeError::NotFound { kind: "source snapshot", id: s.clone() })?;
                if size < snap.size_bytes {
                    return Err(VolumeError::OutOfRange {
                        requested: size,
                        reason: format!("smaller than snapshot {s:?} ({} bytes)", snap.size_bytes),
                    });
                }
                Some(self.snapshot_image(s))
            }
            Some(VolumeSource::Volume(v)) => {
                let vol =
                    self.index().volumes.get(v).cloned().ok_or_else(|| VolumeError::NotFound { kind: "source volume", id: v.clone() })?;
                if size < vol.size_bytes {
                    return Err(VolumeError::OutOfRange {
                        requested: size,
                        reason: format!("smaller than volume {v:?} ({} bytes)", vol.size_bytes),
                    });
                }
                Some(self.volume_image(v))
            }
            None => None,
        };

        let record = Self::creating(&req, size, None);
        // A clone by reflink shares its source's blocks, but it may be
        // rewritten entirely, so it counts in full, as in Cinder.
        self.admit_and_record(&record, false)?;

        let made = self.make_image(ImageKind::Volume, &req.id, size, req.provisioning, source_image.as_deref(), Freeze::Never);
        let result = made.and_then(|method| {
            let mut done = record.clone();
            done.state = State::Available;
            self.finish_create(ImageKind::Volume, &req.id, &done)?;
            Ok((done, method))
        });
        match result {
            Ok((done, method)) => {
                info!(volume.id = %req.id, size, provisioning = req.provisioning.as_str(), ?method, "volume created");
                self.index().volumes.insert(req.id.clone(), done.clone());
                Ok(done)
            }
            Err(e) => {
                self.undo_create(ImageKind::Volume, &req.id);
                Err(e)
            }
        }
    }

    /// Make `<id>.img.partial`, fill it and make it durable (`finish_create`
    /// renames it into place). Returns how the content was produced.
    ///
    /// A snapshot is read-only, and its source's filesystem is frozen while
    /// it is copied. A thick image owns every block: one made by reflink is
    /// unshared, so writing to it (or, for a snapshot of a thick volume, to
    /// its source) never needs space the pool no longer has.
    fn make_image(
        &self,
        kind: ImageKind,
        id: &str,
        size: u64,
        provisioning: Provisioning,
        source: Option<&Path>,
        freeze: Freeze<'_>,
    ) -> Result<Option<CopyMethod>, VolumeError> {
        let snapshot = matches!(kind, ImageKind::Snapshot);
        let partial = self.path(kind, id, "img.partial");
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&partial)
            .map_err(VolumeError::io(format!("creating {}", partial.display())))?;
        let mut method = None;
        if let Some(src) = source {
            let s = File::open(src).map_err(VolumeError::io(format!("opening source {}", src.display())))?;
            let frozen = match freeze {
                Freeze::Never => None,
                Freeze::Alone => self.freeze(src, &s, None)?,
                Freeze::InGroup(g) => self.freeze(src, &s, Some(g))?,
            };
            let started = Instant::now();
            let copied = copy::clone_into(&s, &f, self.reflink).map_err(VolumeError::io(format!(
                "copying {} to {}",
                src.display(),
                partial.display()
            )));
            if let Some(frozen) = frozen {
                // Thawed before anything else, whatever the copy did.
                let held = frozen.thaw();
                tracing::info!(image = %src.display(), frozen_ms = started.elapsed().as_millis() as u64, "source filesystem was frozen for the copy");
                held.map_err(|reason| VolumeError::Freeze { volume: file_id(src), reason })?;
            }
            let copied = copied?;
            if copied == CopyMethod::Reflink && provisioning == Provisioning::Thick {
                let what = format!("giving {} blocks of its own", partial.display());
                copy::own_blocks(&s, &f).map_err(VolumeError::io(what))?;
            }
            method = Some(copied);
        }
        let len = f.metadata().map_err(VolumeError::io("reading image size"))?.len();
        if len < size {
            f.set_len(size).map_err(VolumeError::io("sizing image"))?;
        }
        if provisioning == Provisioning::Thick {
            copy::allocate(&f, size).map_err(VolumeError::io("allocating thick image"))?;
        }
        if snapshot {
            f.set_permissions(std::fs::Permissions::from_mode(0o444)).map_err(VolumeError::io("making snapshot read-only"))?;
        }
        f.sync_all().map_err(VolumeError::io(format!("syncing {}", partial.display())))?;
        Ok(method)
    }

    /// The last steps of a create, once its partial image is complete and
    /// durable: the `Available` record under its pending name, fsynced; the
    /// folder synced, so both files are there after a crash; the image and
    /// then the record renamed into place; the folder synced again. A crash
    /// before the record's rename leaves a pending record alone, which the
    /// next start rolls back (the create never answered); one after it, with
    /// the image still partial, finishes that rename.
    fn finish_create<T: serde::Serialize>(&self, kind: ImageKind, id: &str, done: &T) -> Result<(), VolumeError> {
        let rec_path = self.path(kind, id, "json");
        let dir = self.root.join(kind.dir());
        let partial = self.path(kind, id, "img.partial");
        let bytes = serde_json::to_vec_pretty(done).map_err(|e| VolumeError::io(format!("encoding {} record", kind.name()))(e.into()))?;
        records::write_pending_unsynced(&rec_path, &bytes).map_err(VolumeError::io(format!("writing {} record", kind.name())))?;
        self.journal.append(kind, id, &bytes).map_err(VolumeError::io(format!("journaling {} record", kind.name())))?;
        records::sync_dir(&dir).map_err(VolumeError::io("syncing pool folder"))?;
        std::fs::rename(&partial, self.path(kind, id, "img")).map_err(VolumeError::io(format!("renaming {}", partial.display())))?;
        std::fs::rename(records::pending_path(&rec_path), &rec_path)
            .map_err(VolumeError::io(format!("renaming {} record", kind.name())))?;
        records::sync_dir(&dir).map_err(VolumeError::io("syncing pool folder"))
    }

    /// Freeze the filesystem mounted from `image`, if any, through the
    /// node's freezer. The time limit leaves room for a copy where there is
    /// no reflink (at a slow 20 MiB/s).
    ///
    /// A source held frozen by a group snapshot is not frozen again: the
    /// group's own snapshot goes ahead (the group thaws it and says whether
    /// it held), any other waits for the group to end.
    fn freeze(&self, image: &Path, opened: &File, group: Option<&str>) -> Result<Option<Box<dyn super::freeze::Thaw>>, VolumeError> {
        let volume = file_id(image);
        match (self.groups.holder(&volume), group) {
            (Some((holder, true)), Some(g)) if holder == g => return Ok(None),
            (Some((holder, _)), _) => {
                return Err(VolumeError::Freeze {
                    volume,
                    reason: format!("group snapshot {holder} holds it frozen (or its time ran out); retry when that one ends"),
                })
            }
            (None, Some(g)) => {
                return Err(VolumeError::Freeze {
                    volume,
                    reason: format!(
                        "group snapshot {g} does not hold it frozen (its freeze ended or was never made); start the group snapshot again"
                    ),
                })
            }
            (None, None) => {}
        }
        let copy_time = if self.reflink { 0 } else { copy::allocated_bytes(opened).unwrap_or(0) / (20 << 20) };
        self.freeze_with(image, Duration::from_secs(30 + copy_time))
    }

    /// Freeze through the node's freezer for at most `max`; None when there
    /// is no freezer or nothing writable is mounted from `image`.
    pub(super) fn freeze_with(&self, image: &Path, max: Duration) -> Result<Option<Box<dyn super::freeze::Thaw>>, VolumeError> {
        let Some(freezer) = self.freezer.read().unwrap_or_else(|p| p.into_inner()).clone() else {
            return Ok(None);
        };
        freezer
            .freeze(image, max)
            .map_err(|reason| VolumeError::Freeze { volume: file_id(image), reason: format!("freezing its filesystem failed: {reason}") })
    }

    /// Freeze, through the node's freezer, what this node has mounted from
    /// `volume` of another node's pool; None when there is no freezer or
    /// nothing writable of it is mounted here.
    pub(super) fn freeze_consumed_with(&self, volume: &str, max: Duration) -> Result<Option<Box<dyn super::freeze::Thaw>>, VolumeError> {
        let Some(freezer) = self.freezer.read().unwrap_or_else(|p| p.into_inner()).clone() else {
            return Ok(None);
        };
        freezer.freeze_consumed(volume, max).map_err(|reason| VolumeError::Freeze {
            volume: volume.to_string(),
            reason: format!("freezing its filesystem mounted on this node (from its owner over NBD) failed: {reason}"),
        })
    }

    /// Undo a failed create as far as possible; whatever remains (a partial
    /// image, a pending record, a copy's `Creating` record) the next start
    /// drops, rolls back or resumes.
    fn undo_create(&self, kind: ImageKind, id: &str) {
        let partial = self.path(kind, id, "img.partial");
        let image = self.path(kind, id, "img");
        let rec = self.path(kind, id, "json");
        let mut ok = records::remove_if_exists(&partial).is_ok();
        ok &= records::remove_if_exists(&image).is_ok();
        ok &= records::remove_if_exists(&rec).is_ok();
        ok &= records::remove_if_exists(&records::pending_path(&rec)).is_ok();
        ok &= records::sync_dir(&self.root.join(kind.dir())).is_ok();
        if ok {
            let mut index = self.index();
            match kind {
                ImageKind::Volume => {
                    index.volumes.remove(id);
                }
                ImageKind::Snapshot => {
                    index.snapshots.remove(id);
                }
            }
        } else {
            warn!(id, kind = kind.name(), "could not undo a failed create; the record stays Creating until the next start");
        }
    }

    pub fn delete_volume(&self, id: &str) -> Result<(), VolumeError> {
        validate_id("volume id", id)?;
        let _guard = self.locks.lock(&[ImageKind::Volume.lock_key(id)]);
        self.delete(ImageKind::Volume, id)
    }

    fn delete(&self, kind: ImageKind, id: &str) -> Result<(), VolumeError> {
        if self.set_aside_broken(kind, id)? {
            return Ok(());
        }
        let known = match kind {
            ImageKind::Volume => self.index().volumes.contains_key(id),
            ImageKind::Snapshot => self.index().snapshots.contains_key(id),
        };
        if !known {
            return Ok(()); // already gone: deletion is idempotent
        }
        let rec_path = self.path(kind, id, "json");
        let dir = self.root.join(kind.dir());
        // The decision, made durable by a rename (nothing is rewritten, no
        // file is made): from here a crash finishes the deletion at the
        // next start. A record still pending is one whose create failed
        // and could not be undone.
        let deleting = records::deleting_path(&rec_path);
        let moved = match std::fs::rename(&rec_path, &deleting) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::rename(records::pending_path(&rec_path), &deleting),
            other => other,
        };
        match moved {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(VolumeError::io("moving the record aside for deletion")(e)),
            _ => {}
        }
        records::sync_dir(&dir).map_err(VolumeError::io("syncing pool folder"))?;
        records::remove_if_exists(&self.path(kind, id, "img")).map_err(VolumeError::io("removing image"))?;
        records::remove_if_exists(&self.path(kind, id, "img.partial")).map_err(VolumeError::io("removing image"))?;
        // The images are gone for good before the record goes: a record
        // whose removal is lost in a crash comes back as `.deleting` and
        // its deletion is finished again, so that removal needs no sync.
        records::sync_dir(&dir).map_err(VolumeError::io("syncing pool folder"))?;
        records::remove_if_exists(&deleting).map_err(VolumeError::io("removing record"))?;
        let mut index = self.index();
        match kind {
            ImageKind::Volume => {
                index.volumes.remove(id);
            }
            ImageKind::Snapshot => {
                index.snapshots.remove(id);
            }
        }
        info!(id, kind = kind.name(), "deleted");
        Ok(())
    }

    /// Grow a volume, in an order a crash cannot tear: the record first
    /// notes the intent (`expanding_to`, the size unchanged), then the image
    /// grows, then the record takes the new size. A grow that fails (no
    /// space for a thick volume, a size the filesystem cannot hold) is
    /// undone, the volume keeps its old size, and a retry grows again.
    pub fn expand_volume(&self, id: &str, new_size: u64) -> Result<VolumeRecord, VolumeError> {
        validate_id("volume id", id)?;
        if new_size == 0 {
            return Err(VolumeError::Invalid { what: "size", reason: "a volume needs a size above zero".into() });
        }
        if new_size > MAX_VOLUME_BYTES {
            return Err(VolumeError::OutOfRange { requested: new_size, reason: format!("the largest volume is {MAX_VOLUME_BYTES} bytes") });
        }
        let _guard = self.locks.lock(&[ImageKind::Volume.lock_key(id)]);
        let mut current = self.get_volume(id)?;
        let image = self.volume_image(id);
        let rec_path = self.path(ImageKind::Volume, id, "json");
        // A leftover intent (its undo failed) or an image smaller than its
        // record: settle first, so an answer always matches the image.
        let len = std::fs::metadata(&image).map_err(VolumeError::io(format!("inspecting {}", image.display())))?.len();
        if current.expanding_to.is_some() || len < current.size_bytes {
            current = self.settle_size(current)?.0;
            self.index().volumes.insert(id.to_string(), current.clone());
        }
        let size = new_size.div_ceil(SIZE_ALIGN) * SIZE_ALIGN;
        if size <= current.size_bytes {
            return Ok(current);
        }
        let old = current.size_bytes;
        let mut intent = current.clone();
        intent.expanding_to = Some(size);
        {
            let _admission = self.admission.lock().unwrap_or_else(|p| p.into_inner());
            let needed = match current.provisioning {
                Provisioning::Thin => size - old,
                // Whatever of the image is not allocated yet must be.
                Provisioning::Thick => size - old.min(self.allocated_bytes(&image)),
            };
            self.admit(needed, current.provisioning)?;
            records::write_record(&rec_path, &intent).map_err(VolumeError::io("writing volume record"))?;
            self.index().volumes.insert(id.to_string(), intent.clone());
        }
        if let Err(e) = self.grow_file(&image, size, current.provisioning) {
            let undone = shrink_to(&image, old).and_then(|()| records::write_record(&rec_path, &current));
            match undone {
                Ok(()) => {
                    self.index().volumes.insert(id.to_string(), current.clone());
                }
                // The intent stays; the next call or start settles it.
                Err(u) => warn!(volume.id = %id, error = %u, "could not undo a failed expansion yet"),
            }
            warn!(volume.id = %id, from = old, to = size, error = %e, "expansion failed; the volume keeps its size");
            return Err(match e {
                VolumeError::Io { context, source } => {
                    VolumeError::Io { context: format!("volume {id:?} stays at {old} bytes: {context}"), source }
                }
                other => other,
            });
        }
        let mut grown = current;
        grown.size_bytes = size;
        records::write_record(&rec_path, &grown).map_err(VolumeError::io("writing volume record"))?;
        self.index().volumes.insert(id.to_string(), grown.clone());
        info!(volume.id = %id, from = old, to = size, "volume expanded");
        Ok(grown)
    }

    // ---------------------------------------------------------------- snapshots

    pub fn get_snapshot(&self, id: &str) -> Result<SnapshotRecord, VolumeError> {
        validate_id("snapshot id", id)?;
        self.refuse_broken(ImageKind::Snapshot, id)?;
        self.index().snapshots.get(id).cloned().ok_or_else(|| VolumeError::NotFound { kind: "snapshot", id: id.to_string() })
    }

    pub fn list_snapshots(&self, source_volume_id: Option<&str>) -> Vec<SnapshotRecord> {
        self.snapshots_after(source_volume_id, None, usize::MAX)
    }

    /// Snapshots as `volumes_after` pages volumes, of one source volume
    /// only when `source_volume_id` is given.
    pub fn snapshots_after(&self, source_volume_id: Option<&str>, after: Option<&str>, limit: usize) -> Vec<SnapshotRecord> {
        page_after(&self.index().snapshots, after, limit, |s| source_volume_id.is_none_or(|v| s.source_volume_id == v))
    }

    pub fn create_snapshot(
        &self,
        id: &str,
        source_volume_id: &str,
        metadata: BTreeMap<String, String>,
    ) -> Result<SnapshotRecord, VolumeError> {
        self.create_snapshot_in_group(id, source_volume_id, metadata, None)
    }

    /// A snapshot; with `group`, one member of a group snapshot, whose
    /// source that group must hold frozen (`freeze_group`).
    pub fn create_snapshot_in_group(
        &self,
        id: &str,
        source_volume_id: &str,
        metadata: BTreeMap<String, String>,
        group: Option<&str>,
    ) -> Result<SnapshotRecord, VolumeError> {
        self.snapshot_with(id, source_volume_id, metadata, group, false)
    }

    /// A snapshot; `pass`: one of a migration's pass snapshots (reflink
    /// only, never frozen, blocks shared even for a thick volume: it lives
    /// for one pass of the copy and is compared with the next one).
    pub(super) fn snapshot_with(
        &self,
        id: &str,
        source_volume_id: &str,
        metadata: BTreeMap<String, String>,
        group: Option<&str>,
        pass: bool,
    ) -> Result<SnapshotRecord, VolumeError> {
        validate_id("snapshot id", id)?;
        validate_id("source volume id", source_volume_id)?;
        validate_metadata(&metadata)?;
        let _guard = self.locks.lock(&[ImageKind::Snapshot.lock_key(id), ImageKind::Volume.lock_key(source_volume_id)]);
        self.refuse_broken(ImageKind::Snapshot, id)?;
        self.refuse_broken(ImageKind::Volume, source_volume_id)?;
        if let Some(existing) = self.index().snapshots.get(id).cloned() {
            if existing.source_volume_id == source_volume_id {
                return Ok(existing);
            }
            return Err(VolumeError::Conflict {
                kind: "snapshot",
                id: id.to_string(),
                detail: format!("it is a snapshot of volume {:?}", existing.source_volume_id),
            });
        }
        let volume = self
            .index()
            .volumes
            .get(source_volume_id)
            .cloned()
            .ok_or_else(|| VolumeError::NotFound { kind: "source volume", id: source_volume_id.to_string() })?;
        let record = SnapshotRecord {
            id: id.to_string(),
            source_volume_id: source_volume_id.to_string(),
            size_bytes: volume.size_bytes,
            metadata,
            created_at_ms: records::now_ms(),
            state: State::Creating,
        };
        {
            let _admission = self.admission.lock().unwrap_or_else(|p| p.into_inner());
            if !pass && (!self.reflink || volume.provisioning == Provisioning::Thick) {
                // A copied snapshot takes real space: as much as the source
                // uses. So does one of a thick volume, which is unshared.
                let used = File::open(self.volume_image(source_volume_id))
                    .and_then(|f| copy::allocated_bytes(&f))
                    .map_err(VolumeError::io("reading source volume"))?;
                self.admit(used.max(1), Provisioning::Thick)?;
            }
            self.index().snapshots.insert(id.to_string(), record.clone());
        }
        let src = self.volume_image(source_volume_id);
        let made = if pass {
            self.make_image(ImageKind::Snapshot, id, volume.size_bytes, Provisioning::Thin, Some(&src), Freeze::Never)
        } else {
            let freeze = group.map_or(Freeze::Alone, Freeze::InGroup);
            self.make_image(ImageKind::Snapshot, id, volume.size_bytes, volume.provisioning, Some(&src), freeze)
        };
        let result = made.and_then(|method| {
            let mut done = record.clone();
            done.state = State::Available;
            self.finish_create(ImageKind::Snapshot, id, &done)?;
            Ok((done, method))
        });
        match result {
            Ok((done, method)) => {
                info!(snapshot.id = %id, volume.id = %source_volume_id, ?method, "snapshot created");
                self.index().snapshots.insert(id.to_string(), done.clone());
                Ok(done)
            }
            Err(e) => {
                self.undo_create(ImageKind::Snapshot, id);
                Err(e)
            }
        }
    }

    pub fn delete_snapshot(&self, id: &str) -> Result<(), VolumeError> {
        validate_id("snapshot id", id)?;
        let _guard = self.locks.lock(&[ImageKind::Snapshot.lock_key(id)]);
        self.delete(ImageKind::Snapshot, id)
    }

    /// Bytes an image really occupies.
    pub fn allocated_bytes(&self, image: &Path) -> u64 {
        File::open(image).and_then(|f| copy::allocated_bytes(&f)).unwrap_or(0)
    }
}

/// Up to `limit` values of `map` that `keep` accepts, whose keys sort
/// after `after`, in key order.
fn page_after<T: Clone>(map: &BTreeMap<String, T>, after: Option<&str>, limit: usize, keep: impl Fn(&T) -> bool) -> Vec<T> {
    use std::ops::Bound;
    let from = match after {
        Some(a) => Bound::Excluded(a),
        None => Bound::Unbounded,
    };
    map.range::<str, _>((from, Bound::Unbounded)).map(|(_, v)| v).filter(|v| keep(v)).take(limit).cloned().collect()
}

fn validate_metadata(m: &BTreeMap<String, String>) -> Result<(), VolumeError> {
    let bytes: usize = m.iter().map(|(k, v)| k.len() + v.len()).sum();
    if m.len() > MAX_METADATA_ENTRIES || bytes > MAX_METADATA_BYTES {
        return Err(VolumeError::Invalid {
            what: "metadata",
            reason: format!("{} entries, {bytes} bytes; at most {MAX_METADATA_ENTRIES} entries and {MAX_METADATA_BYTES} bytes", m.len()),
        });
    }
    Ok(())
}

/// The filesystem type under `path`, from the mount table, for reports.
fn filesystem_name(path: &Path) -> String {
    let Ok(table) = std::fs::read_to_string("/proc/self/mounts") else {
        return "unknown".into();
    };
    let mut best: Option<(usize, String)> = None;
    for line in table.lines() {
        let mut f = line.split_whitespace();
        let (Some(_src), Some(target), Some(fstype)) = (f.next(), f.next(), f.next()) else { continue };
        let target = target.replace("\\040", " ");
        if path.starts_with(&target) && best.as_ref().is_none_or(|(l, _)| target.len() >= *l) {
            best = Some((target.len(), fstype.to_string()));
        }
    }
    best.map(|(_, f)| f).unwrap_or_else(|| "unknown".into())
}

/// Cut `image` back to `size` bytes when a grow left it longer; the bytes
/// past `size` were never part of the volume anyone used.
fn shrink_to(image: &Path, size: u64) -> std::io::Result<()> {
    let f = File::options().write(true).open(image)?;
    if f.metadata()?.len() > size {
        f.set_len(size)?;
        f.sync_all()?;
    }
    Ok(())
}

/// The ID an image path names (`<id>.img`), for messages.
fn file_id(image: &Path) -> String {
    image.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}
