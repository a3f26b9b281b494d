//! A storage pool: a folder holding volume and snapshot images, each beside
//! its JSON record. Layout:
//!
//! ```text
//! <pool>/volumes/<id>.img   <id>.json   (<id>.img.partial while being made)
//! <pool>/snapshots/<id>.img <id>.json   (images read-only)
//! <pool>/orphaned/          images found without a record, kept for a person
//! <pool>/pool.json           the pool's identity (its UUID)
//! ```
//!
//! Order of writes, so a crash at any instant is recoverable: the record is
//! written `Creating`, the image is made under a `.partial` name and fsynced,
//! renamed into place, then the record becomes `Available`. Deletion marks the
//! record `Deleting`, removes the image, then the record. `Pool::open`
//! reconciles whatever it finds.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tracing::{info, warn};

use super::capacity::{PoolCapacity, Provisioning};
use super::copy::{self, CopyMethod};
use super::error::VolumeError;
use super::identity;
use super::locks::KeyedLocks;
use super::records::{self, SnapshotRecord, State, VolumeRecord, VolumeSource};
use super::{validate_id, MAX_METADATA_BYTES, MAX_METADATA_ENTRIES};

/// Images are sized in whole 4 KiB blocks so any block device can sit on them.
pub const SIZE_ALIGN: u64 = 4096;
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
struct Index {
    volumes: BTreeMap<String, VolumeRecord>,
    snapshots: BTreeMap<String, SnapshotRecord>,
}

pub struct Pool {
    root: PathBuf,
    uuid: String,
    config: PoolConfig,
    reflink: bool,
    filesystem: String,
    locks: KeyedLocks,
    index: Mutex<Index>,
    /// Held across "check capacity, then record Creating" so two concurrent
    /// creates cannot both take the last free bytes.
    admission: Mutex<()>,
}

/// What a reconcile found and did, for the log and for tests.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ReconcileReport {
    pub finished: Vec<String>,
    pub rolled_back: Vec<String>,
    pub deleted: Vec<String>,
    pub orphaned: Vec<String>,
    pub missing_images: Vec<String>,
}

#[derive(Clone, Copy)]
enum Kind {
    Volume,
    Snapshot,
}

impl Kind {
    fn dir(self) -> &'static str {
        match self {
            Kind::Volume => "volumes",
            Kind::Snapshot => "snapshots",
        }
    }
    fn name(self) -> &'static str {
        match self {
            Kind::Volume => "volume",
            Kind::Snapshot => "snapshot",
        }
    }
    fn lock_key(self, id: &str) -> String {
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
            std::fs::create_dir_all(root.join(d))
                .map_err(VolumeError::io(format!("creating pool folder {}", root.join(d).display())))?;
        }
        let root = root
            .canonicalize()
            .map_err(VolumeError::io(format!("resolving pool folder {}", root.display())))?;
        let reflink = config.allow_reflink
            && copy::probe_reflink(&root.join("volumes"))
                .map_err(VolumeError::io(format!("probing reflink support in {}", root.display())))?;
        let filesystem = filesystem_name(&root);
        let record = match record {
            Some(r) => r,
            None => identity::create(&root, adopted)?,
        };
        let pool = Pool {
            root,
            uuid: record.uuid,
            config,
            reflink,
            filesystem,
            locks: KeyedLocks::default(),
            index: Mutex::new(Index::default()),
            admission: Mutex::new(()),
        };
        let report = pool.reconcile()?;
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

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path(&self, kind: Kind, id: &str, ext: &str) -> PathBuf {
        // Only ever called with validated IDs.
        self.root.join(kind.dir()).join(format!("{id}.{ext}"))
    }

    pub fn volume_image(&self, id: &str) -> PathBuf {
        self.path(Kind::Volume, id, "img")
    }
    pub fn snapshot_image(&self, id: &str) -> PathBuf {
        self.path(Kind::Snapshot, id, "img")
    }

    // ---------------------------------------------------------------- reconcile

    /// Bring the folder to a consistent state and load the index: finish or
    /// undo half-made records, finish deletions, move images that have no
    /// record to `orphaned/`, and drop stray temporary files.
    fn reconcile(&self) -> Result<ReconcileReport, VolumeError> {
        let mut report = ReconcileReport::default();
        let mut index = Index::default();
        for kind in [Kind::Volume, Kind::Snapshot] {
            let dir = self.root.join(kind.dir());
            let mut records: BTreeMap<String, PathBuf> = BTreeMap::new();
            let mut images: Vec<(String, PathBuf)> = Vec::new();
            let mut stray: Vec<PathBuf> = Vec::new();
            for entry in std::fs::read_dir(&dir).map_err(VolumeError::io(format!("reading {}", dir.display())))? {
                let entry = entry.map_err(VolumeError::io(format!("reading {}", dir.display())))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let path = entry.path();
                if let Some(id) = name.strip_suffix(".json") {
                    records.insert(id.to_string(), path);
                } else if let Some(id) = name.strip_suffix(".img") {
                    images.push((id.to_string(), path));
                } else {
                    // *.json.tmp, *.img.partial, probes: resolved below via the records
                    stray.push(path);
                }
            }
            for (id, rec_path) in &records {
                let image = self.path(kind, id, "img");
                let partial = self.path(kind, id, "img.partial");
                let state = match kind {
                    Kind::Volume => records::read_record::<VolumeRecord>(rec_path).map(|r| (r.state, Some(r), None)),
                    Kind::Snapshot => records::read_record::<SnapshotRecord>(rec_path).map(|r| (r.state, None, Some(r))),
                };
                let (state, vol, snap) = match state {
                    Ok(s) => s,
                    Err(e) => {
                        // Cannot happen with atomic writes; keep the evidence.
                        warn!(record = %rec_path.display(), error = %e, "unreadable record moved to orphaned/");
                        self.move_to_orphaned(rec_path)?;
                        report.orphaned.push(id.clone());
                        continue;
                    }
                };
                let key = format!("{}/{id}", kind.dir());
                match state {
                    State::Creating if image.exists() => {
                        // The image was complete and durable before its rename.
                        self.set_state(kind, rec_path, vol.clone(), snap.clone(), State::Available)?;
                        report.finished.push(key);
                        let (v, s) = with_state(vol, snap, State::Available);
                        insert(&mut index, v, s);
                    }
                    State::Creating => {
                        records::remove_if_exists(&partial).map_err(VolumeError::io("removing partial image"))?;
                        records::remove_if_exists(rec_path).map_err(VolumeError::io("removing record"))?;
                        report.rolled_back.push(key);
                    }
                    State::Deleting => {
                        records::remove_if_exists(&image).map_err(VolumeError::io("removing image"))?;
                        records::remove_if_exists(&partial).map_err(VolumeError::io("removing partial image"))?;
                        records::remove_if_exists(rec_path).map_err(VolumeError::io("removing record"))?;
                        report.deleted.push(key);
                    }
                    State::Available => {
                        if !image.exists() {
                            warn!(record = %rec_path.display(), "record without image: kept, reported as missing");
                            report.missing_images.push(key);
                        } else if let Some(v) = &vol {
                            // An expansion records the new size first, then grows the file.
                            self.grow_file(&image, v.size_bytes, v.provisioning)?;
                        }
                        records::remove_if_exists(&partial).map_err(VolumeError::io("removing partial image"))?;
                        insert(&mut index, vol, snap);
                    }
                }
            }
            for (id, image) in images {
                if !records.contains_key(&id) {
                    warn!(image = %image.display(), "image without a record moved to orphaned/");
                    self.move_to_orphaned(&image)?;
                    report.orphaned.push(format!("{}/{id}", kind.dir()));
                }
            }
            for path in stray {
                let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
                let owner = name.split('.').next().unwrap_or_default().to_string();
                let live_partial = name.ends_with(".img.partial") && records.contains_key(&owner);
                if !live_partial && path.is_file() {
                    records::remove_if_exists(&path).map_err(VolumeError::io("removing stray file"))?;
                }
            }
            records::sync_dir(&dir).map_err(VolumeError::io("syncing pool folder"))?;
        }
        *self.index() = index;
        if report != ReconcileReport::default() {
            info!(?report, "pool reconciled");
        }
        return Ok(report);

        fn with_state(
            v: Option<VolumeRecord>,
            s: Option<SnapshotRecord>,
            st: State,
        ) -> (Option<VolumeRecord>, Option<SnapshotRecord>) {
            (v.map(|mut r| {
                r.state = st;
                r
            }), s.map(|mut r| {
                r.state = st;
                r
            }))
        }
        fn insert(index: &mut Index, v: Option<VolumeRecord>, s: Option<SnapshotRecord>) {
            if let Some(v) = v {
                index.volumes.insert(v.id.clone(), v);
            }
            if let Some(s) = s {
                index.snapshots.insert(s.id.clone(), s);
            }
        }
    }

    fn set_state(
        &self,
        _kind: Kind,
        path: &Path,
        vol: Option<VolumeRecord>,
        snap: Option<SnapshotRecord>,
        state: State,
    ) -> Result<(), VolumeError> {
        let r = if let Some(mut v) = vol {
            v.state = state;
            records::write_record(path, &v)
        } else if let Some(mut s) = snap {
            s.state = state;
            records::write_record(path, &s)
        } else {
            Ok(())
        };
        r.map_err(VolumeError::io(format!("writing record {}", path.display())))
    }

    fn move_to_orphaned(&self, path: &Path) -> Result<(), VolumeError> {
        let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
        let target = self.root.join("orphaned").join(format!("{}-{name}", records::now_ms()));
        std::fs::rename(path, &target).map_err(VolumeError::io(format!("moving {} to orphaned/", path.display())))?;
        records::sync_dir(&self.root.join("orphaned")).map_err(VolumeError::io("syncing orphaned/"))
    }

    fn grow_file(&self, image: &Path, size: u64, provisioning: Provisioning) -> Result<(), VolumeError> {
        let f = File::options().write(true).open(image).map_err(VolumeError::io(format!("opening {}", image.display())))?;
        let len = f.metadata().map_err(VolumeError::io("reading image size"))?.len();
        if len < size {
            if provisioning == Provisioning::Thick {
                copy::allocate(&f, size).map_err(VolumeError::io("allocating image space"))?;
            } else {
                f.set_len(size).map_err(VolumeError::io("growing image"))?;
            }
            f.sync_all().map_err(VolumeError::io("syncing image"))?;
        }
        Ok(())
    }

    // ---------------------------------------------------------------- capacity

    pub fn status(&self) -> Result<PoolStatus, VolumeError> {
        let st = rustix::fs::statvfs(&self.root)
            .map_err(|e| VolumeError::Io { context: format!("statvfs {}", self.root.display()), source: e.into() })?;
        let index = self.index();
        let provisioned: u64 = index.volumes.values().map(|v| v.size_bytes).sum::<u64>()
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
            Provisioning::Thin if cap.max_over_subscription_ratio >= 1.0 => {
                (cap.total as f64 * cap.max_over_subscription_ratio) as u64
            }
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
        self.index()
            .volumes
            .get(id)
            .cloned()
            .ok_or_else(|| VolumeError::NotFound { kind: "volume", id: id.to_string() })
    }

    pub fn list_volumes(&self) -> Vec<VolumeRecord> {
        self.index().volumes.values().cloned().collect()
    }

    pub fn create_volume(&self, req: CreateVolume) -> Result<VolumeRecord, VolumeError> {
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
        let size = req.size_bytes.div_ceil(SIZE_ALIGN) * SIZE_ALIGN;
        let mut keys = vec![Kind::Volume.lock_key(&req.id)];
        match &req.source {
            Some(VolumeSource::Snapshot(s)) => {
                validate_id("source snapshot id", s)?;
                keys.push(Kind::Snapshot.lock_key(s));
            }
            Some(VolumeSource::Volume(v)) => {
                validate_id("source volume id", v)?;
                if *v == req.id {
                    return Err(VolumeError::Invalid { what: "source volume id", reason: "a volume cannot be its own source".into() });
                }
                keys.push(Kind::Volume.lock_key(v));
            }
            None => {}
        }
        let _guard = self.locks.lock(&keys);

        if let Some(existing) = self.index().volumes.get(&req.id).cloned() {
            let same = existing.size_bytes == size
                && existing.provisioning == req.provisioning
                && existing.source == req.source;
            if same {
                return Ok(existing);
            }
            return Err(VolumeError::Conflict {
                kind: "volume",
                id: req.id.clone(),
                detail: format!(
                    "it has {} bytes, {}, source {:?}",
                    existing.size_bytes,
                    existing.provisioning.as_str(),
                    existing.source
                ),
            });
        }

        // The source, held by its lock for the whole copy.
        let source_image = match &req.source {
            Some(VolumeSource::Snapshot(s)) => {
                let snap = self.index().snapshots.get(s).cloned().ok_or_else(|| VolumeError::NotFound {
                    kind: "source snapshot",
                    id: s.clone(),
                })?;
                if size < snap.size_bytes {
                    return Err(VolumeError::OutOfRange {
                        requested: size,
                        reason: format!("smaller than snapshot {s:?} ({} bytes)", snap.size_bytes),
                    });
                }
                Some(self.snapshot_image(s))
            }
            Some(VolumeSource::Volume(v)) => {
                let vol = self.index().volumes.get(v).cloned().ok_or_else(|| VolumeError::NotFound {
                    kind: "source volume",
                    id: v.clone(),
                })?;
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

        let record = VolumeRecord {
            id: req.id.clone(),
            size_bytes: size,
            provisioning: req.provisioning,
            source: req.source.clone(),
            metadata: req.metadata.clone(),
            created_at_ms: records::now_ms(),
            state: State::Creating,
        };
        let rec_path = self.path(Kind::Volume, &req.id, "json");
        {
            let _admission = self.admission.lock().unwrap_or_else(|p| p.into_inner());
            // A clone by reflink shares its source's blocks, but it may be
            // rewritten entirely, so it counts in full, as in Cinder.
            self.admit(size, req.provisioning)?;
            records::write_record(&rec_path, &record).map_err(VolumeError::io("writing volume record"))?;
            self.index().volumes.insert(req.id.clone(), record.clone());
        }

        let made = self.make_image(Kind::Volume, &req.id, size, req.provisioning, source_image.as_deref(), false);
        let result = made.and_then(|method| {
            let mut done = record.clone();
            done.state = State::Available;
            records::write_record(&rec_path, &done).map_err(VolumeError::io("writing volume record"))?;
            Ok((done, method))
        });
        match result {
            Ok((done, method)) => {
                info!(volume.id = %req.id, size, provisioning = req.provisioning.as_str(), ?method, "volume created");
                self.index().volumes.insert(req.id.clone(), done.clone());
                Ok(done)
            }
            Err(e) => {
                self.undo_create(Kind::Volume, &req.id);
                Err(e)
            }
        }
    }

    /// Make `<id>.img` under its partial name, fill it, make it durable and
    /// rename it into place. Returns how the content was produced.
    fn make_image(
        &self,
        kind: Kind,
        id: &str,
        size: u64,
        provisioning: Provisioning,
        source: Option<&Path>,
        read_only: bool,
    ) -> Result<Option<CopyMethod>, VolumeError> {
        let partial = self.path(kind, id, "img.partial");
        let image = self.path(kind, id, "img");
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
            method = Some(
                copy::clone_into(&s, &f, self.reflink)
                    .map_err(VolumeError::io(format!("copying {} to {}", src.display(), partial.display())))?,
            );
        }
        let len = f.metadata().map_err(VolumeError::io("reading image size"))?.len();
        if len < size {
            f.set_len(size).map_err(VolumeError::io("sizing image"))?;
        }
        if provisioning == Provisioning::Thick {
            copy::allocate(&f, size).map_err(VolumeError::io("allocating thick image"))?;
        }
        if read_only {
            f.set_permissions(std::fs::Permissions::from_mode(0o444))
                .map_err(VolumeError::io("making snapshot read-only"))?;
        }
        f.sync_all().map_err(VolumeError::io(format!("syncing {}", partial.display())))?;
        drop(f);
        std::fs::rename(&partial, &image).map_err(VolumeError::io(format!("renaming {}", partial.display())))?;
        records::sync_dir(&self.root.join(kind.dir())).map_err(VolumeError::io("syncing pool folder"))?;
        Ok(method)
    }

    /// Undo a failed create as far as possible; whatever remains is a
    /// `Creating` record the next reconcile rolls back.
    fn undo_create(&self, kind: Kind, id: &str) {
        let partial = self.path(kind, id, "img.partial");
        let image = self.path(kind, id, "img");
        let rec = self.path(kind, id, "json");
        let mut ok = records::remove_if_exists(&partial).is_ok();
        ok &= records::remove_if_exists(&image).is_ok();
        ok &= records::remove_if_exists(&rec).is_ok();
        ok &= records::sync_dir(&self.root.join(kind.dir())).is_ok();
        if ok {
            let mut index = self.index();
            match kind {
                Kind::Volume => {
                    index.volumes.remove(id);
                }
                Kind::Snapshot => {
                    index.snapshots.remove(id);
                }
            }
        } else {
            warn!(id, kind = kind.name(), "could not undo a failed create; the record stays Creating until the next start");
        }
    }

    pub fn delete_volume(&self, id: &str) -> Result<(), VolumeError> {
        validate_id("volume id", id)?;
        let _guard = self.locks.lock(&[Kind::Volume.lock_key(id)]);
        self.delete(Kind::Volume, id)
    }

    fn delete(&self, kind: Kind, id: &str) -> Result<(), VolumeError> {
        let rec_path = self.path(kind, id, "json");
        let known = match kind {
            Kind::Volume => self.index().volumes.get(id).cloned().map(|mut v| {
                v.state = State::Deleting;
                serde_json::to_vec_pretty(&v)
            }),
            Kind::Snapshot => self.index().snapshots.get(id).cloned().map(|mut s| {
                s.state = State::Deleting;
                serde_json::to_vec_pretty(&s)
            }),
        };
        let Some(bytes) = known else {
            return Ok(()); // already gone: deletion is idempotent
        };
        let bytes = bytes.map_err(|e| VolumeError::io("encoding record")(std::io::Error::other(e)))?;
        records::write_atomically(&rec_path, &bytes).map_err(VolumeError::io("marking record Deleting"))?;
        records::remove_if_exists(&self.path(kind, id, "img")).map_err(VolumeError::io("removing image"))?;
        records::remove_if_exists(&self.path(kind, id, "img.partial")).map_err(VolumeError::io("removing image"))?;
        records::sync_dir(&self.root.join(kind.dir())).map_err(VolumeError::io("syncing pool folder"))?;
        records::remove_if_exists(&rec_path).map_err(VolumeError::io("removing record"))?;
        records::sync_dir(&self.root.join(kind.dir())).map_err(VolumeError::io("syncing pool folder"))?;
        let mut index = self.index();
        match kind {
            Kind::Volume => {
                index.volumes.remove(id);
            }
            Kind::Snapshot => {
                index.snapshots.remove(id);
            }
        }
        info!(id, kind = kind.name(), "deleted");
        Ok(())
    }

    pub fn expand_volume(&self, id: &str, new_size: u64) -> Result<VolumeRecord, VolumeError> {
        validate_id("volume id", id)?;
        if new_size == 0 {
            return Err(VolumeError::Invalid { what: "size", reason: "a volume needs a size above zero".into() });
        }
        if new_size > MAX_VOLUME_BYTES {
            return Err(VolumeError::OutOfRange {
                requested: new_size,
                reason: format!("the largest volume is {MAX_VOLUME_BYTES} bytes"),
            });
        }
        let _guard = self.locks.lock(&[Kind::Volume.lock_key(id)]);
        let current = self.get_volume(id)?;
        let size = new_size.div_ceil(SIZE_ALIGN) * SIZE_ALIGN;
        if size <= current.size_bytes {
            return Ok(current);
        }
        let mut grown = current.clone();
        grown.size_bytes = size;
        {
            let _admission = self.admission.lock().unwrap_or_else(|p| p.into_inner());
            self.admit(size - current.size_bytes, current.provisioning)?;
            // Record first: a crash before the file grows is finished on start.
            records::write_record(&self.path(Kind::Volume, id, "json"), &grown)
                .map_err(VolumeError::io("writing volume record"))?;
            self.index().volumes.insert(id.to_string(), grown.clone());
        }
        self.grow_file(&self.volume_image(id), size, current.provisioning)?;
        info!(volume.id = %id, from = current.size_bytes, to = size, "volume expanded");
        Ok(grown)
    }

    // ---------------------------------------------------------------- snapshots

    pub fn get_snapshot(&self, id: &str) -> Result<SnapshotRecord, VolumeError> {
        validate_id("snapshot id", id)?;
        self.index()
            .snapshots
            .get(id)
            .cloned()
            .ok_or_else(|| VolumeError::NotFound { kind: "snapshot", id: id.to_string() })
    }

    pub fn list_snapshots(&self, source_volume_id: Option<&str>) -> Vec<SnapshotRecord> {
        self.index()
            .snapshots
            .values()
            .filter(|s| source_volume_id.is_none_or(|v| s.source_volume_id == v))
            .cloned()
            .collect()
    }

    pub fn create_snapshot(
        &self,
        id: &str,
        source_volume_id: &str,
        metadata: BTreeMap<String, String>,
    ) -> Result<SnapshotRecord, VolumeError> {
        validate_id("snapshot id", id)?;
        validate_id("source volume id", source_volume_id)?;
        validate_metadata(&metadata)?;
        let _guard = self.locks.lock(&[Kind::Snapshot.lock_key(id), Kind::Volume.lock_key(source_volume_id)]);
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
        let volume = self.index().volumes.get(source_volume_id).cloned().ok_or_else(|| VolumeError::NotFound {
            kind: "source volume",
            id: source_volume_id.to_string(),
        })?;
        let record = SnapshotRecord {
            id: id.to_string(),
            source_volume_id: source_volume_id.to_string(),
            size_bytes: volume.size_bytes,
            metadata,
            created_at_ms: records::now_ms(),
            state: State::Creating,
        };
        let rec_path = self.path(Kind::Snapshot, id, "json");
        {
            let _admission = self.admission.lock().unwrap_or_else(|p| p.into_inner());
            if !self.reflink {
                // A copied snapshot takes real space: as much as the source uses.
                let used = File::open(self.volume_image(source_volume_id))
                    .and_then(|f| copy::allocated_bytes(&f))
                    .map_err(VolumeError::io("reading source volume"))?;
                self.admit(used.max(1), Provisioning::Thick)?;
            }
            records::write_record(&rec_path, &record).map_err(VolumeError::io("writing snapshot record"))?;
            self.index().snapshots.insert(id.to_string(), record.clone());
        }
        let src = self.volume_image(source_volume_id);
        let made = self.make_image(Kind::Snapshot, id, volume.size_bytes, Provisioning::Thin, Some(&src), true);
        let result = made.and_then(|method| {
            let mut done = record.clone();
            done.state = State::Available;
            records::write_record(&rec_path, &done).map_err(VolumeError::io("writing snapshot record"))?;
            Ok((done, method))
        });
        match result {
            Ok((done, method)) => {
                info!(snapshot.id = %id, volume.id = %source_volume_id, ?method, "snapshot created");
                self.index().snapshots.insert(id.to_string(), done.clone());
                Ok(done)
            }
            Err(e) => {
                self.undo_create(Kind::Snapshot, id);
                Err(e)
            }
        }
    }

    pub fn delete_snapshot(&self, id: &str) -> Result<(), VolumeError> {
        validate_id("snapshot id", id)?;
        let _guard = self.locks.lock(&[Kind::Snapshot.lock_key(id)]);
        self.delete(Kind::Snapshot, id)
    }

    /// Bytes an image really occupies.
    pub fn allocated_bytes(&self, image: &Path) -> u64 {
        File::open(image).and_then(|f| copy::allocated_bytes(&f)).unwrap_or(0)
    }
}

fn validate_metadata(m: &BTreeMap<String, String>) -> Result<(), VolumeError> {
    let bytes: usize = m.iter().map(|(k, v)| k.len() + v.len()).sum();
    if m.len() > MAX_METADATA_ENTRIES || bytes > MAX_METADATA_BYTES {
        return Err(VolumeError::Invalid {
            what: "metadata",
            reason: format!(
                "{} entries, {bytes} bytes; at most {MAX_METADATA_ENTRIES} entries and {MAX_METADATA_BYTES} bytes",
                m.len()
            ),
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
