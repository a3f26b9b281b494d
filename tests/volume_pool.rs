//! The volume manager on real filesystems: XFS with reflink, and ext4 (the
//! copy path). Data goes into the image files exactly as a loop device would
//! put it there, and is read back by checksum.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use cinderblock::volume::pool::CreateVolume;
use cinderblock::volume::{Pool, PoolConfig, Provisioning, VolumeError, VolumeSource};
use common::*;

const MIB: u64 = 1 << 20;

fn blank(id: &str, size: u64) -> CreateVolume {
    CreateVolume { id: id.into(), size_bytes: size, provisioning: Provisioning::Thin, source: None, metadata: BTreeMap::new() }
}

fn from(id: &str, size: u64, source: VolumeSource) -> CreateVolume {
    CreateVolume { source: Some(source), ..blank(id, size) }
}

/// The scenario users care about: write, snapshot, overwrite, restore, clone.
fn snapshot_restore_clone(pool_dir: &Path, expect_reflink: bool) {
    let (pool, _) = Pool::open(pool_dir, PoolConfig::default()).unwrap();
    assert_eq!(pool.reflink(), expect_reflink, "reflink detection on {}", pool_dir.display());

    let v = pool.create_volume(blank("vol-a", 64 * MIB)).unwrap();
    let img = pool.volume_image(&v.id);
    write_pattern(&img, 0, 4 * MIB as usize, 1);
    write_pattern(&img, 40 * MIB, MIB as usize, 2);
    let original = checksum(&img);

    pool.create_snapshot("snap-a", "vol-a", BTreeMap::new()).unwrap();
    let snap_img = pool.snapshot_image("snap-a");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&snap_img).unwrap().permissions().mode() & 0o222, 0, "snapshot must be read-only");

    write_pattern(&img, 0, 4 * MIB as usize, 9); // overwrite after the snapshot
    let overwritten = checksum(&img);
    assert_ne!(original, overwritten);
    assert_eq!(checksum(&snap_img), original, "snapshot changed when its volume was written");

    let restored = pool.create_volume(from("vol-restored", 64 * MIB, VolumeSource::Snapshot("snap-a".into()))).unwrap();
    assert_eq!(checksum(&pool.volume_image(&restored.id)), original, "restore differs from the snapshot");

    let clone = pool.create_volume(from("vol-clone", 64 * MIB, VolumeSource::Volume("vol-a".into()))).unwrap();
    assert_eq!(checksum(&pool.volume_image(&clone.id)), overwritten, "clone differs from its source");

    // A restore may be larger than its snapshot; the extra space reads as zeros.
    let bigger = pool.create_volume(from("vol-bigger", 128 * MIB, VolumeSource::Snapshot("snap-a".into()))).unwrap();
    let bimg = pool.volume_image(&bigger.id);
    assert_eq!(std::fs::metadata(&bimg).unwrap().len(), 128 * MIB);

    // Writing the clone leaves the source alone.
    write_pattern(&pool.volume_image(&clone.id), 0, MIB as usize, 77);
    assert_eq!(checksum(&img), overwritten);

    // Holes stay holes on either path: only the written ranges hold data.
    let src_segments = data_segments(&snap_img);
    assert_eq!(data_segments(&pool.volume_image(&restored.id)), src_segments);
    assert!(allocated(&pool.volume_image(&restored.id)) <= 6 * MIB, "copy filled holes");

    // Everything survives a reopen.
    drop(pool);
    let (pool, report) = Pool::open(pool_dir, PoolConfig::default()).unwrap();
    assert_eq!(report, Default::default());
    assert_eq!(pool.list_volumes().len(), 4);
    assert_eq!(pool.list_snapshots(None).len(), 1);
    assert_eq!(checksum(&pool.volume_image("vol-restored")), original);
    for id in ["vol-a", "vol-restored", "vol-clone", "vol-bigger"] {
        pool.delete_volume(id).unwrap();
        assert!(!pool.volume_image(id).exists());
    }
    // The snapshot outlives its volume.
    assert_eq!(checksum(&snap_img), original);
    pool.delete_snapshot("snap-a").unwrap();
    assert!(tree(&pool_dir.join("volumes")).is_empty() && tree(&pool_dir.join("snapshots")).is_empty());
}

#[test]
fn xfs_reflink_snapshot_restore_clone_are_byte_identical() {
    require_root!();
    let fs = TestFs::new("xfs-reflink", "1G");
    snapshot_restore_clone(&fs.mount.join("pool"), true);
}

#[test]
fn ext4_copy_path_snapshot_restore_clone_are_byte_identical() {
    require_root!();
    let fs = TestFs::new("ext4", "1G");
    snapshot_restore_clone(&fs.mount.join("pool"), false);
}

#[test]
fn reflink_snapshot_of_a_full_volume_takes_no_space() {
    require_root!();
    let fs = TestFs::new("xfs-reflink", "1G");
    let (pool, _) = Pool::open(&fs.mount.join("pool"), PoolConfig::default()).unwrap();
    pool.create_volume(blank("vol-full", 256 * MIB)).unwrap();
    write_pattern(&pool.volume_image("vol-full"), 0, 256 * MIB as usize, 3);
    let before = pool.status().unwrap().capacity.free;
    pool.create_snapshot("snap-full", "vol-full", BTreeMap::new()).unwrap();
    pool.create_volume(from("vol-full-clone", 256 * MIB, VolumeSource::Volume("vol-full".into()))).unwrap();
    let after = pool.status().unwrap().capacity.free;
    assert!(before - after < 8 * MIB, "reflink snapshot+clone of 256 MiB used {} bytes", before - after);
}

#[test]
fn thick_volumes_are_allocated_up_front_and_thin_are_not() {
    require_root!();
    let fs = TestFs::new("ext4", "512M");
    let (pool, _) = Pool::open(&fs.mount.join("pool"), PoolConfig::default()).unwrap();
    let thick = pool.create_volume(CreateVolume { provisioning: Provisioning::Thick, ..blank("vol-thick", 64 * MIB) }).unwrap();
    assert!(allocated(&pool.volume_image(&thick.id)) >= 64 * MIB);
    let thin = pool.create_volume(blank("vol-thin", 64 * MIB)).unwrap();
    assert!(allocated(&pool.volume_image(&thin.id)) < MIB);
    // Expansion keeps the provisioning type.
    pool.expand_volume("vol-thick", 96 * MIB).unwrap();
    assert!(allocated(&pool.volume_image("vol-thick")) >= 96 * MIB);
    assert_eq!(std::fs::metadata(pool.volume_image("vol-thick")).unwrap().len(), 96 * MIB);
}

#[test]
fn capacity_follows_cinder_rules_on_a_real_pool() {
    require_root!();
    let fs = TestFs::new("ext4", "256M");
    let cfg = PoolConfig { max_over_subscription_ratio: 2.0, reserved_percentage: 10, allow_reflink: true };
    let (pool, _) = Pool::open(&fs.mount.join("pool"), cfg).unwrap();
    let cap = pool.status().unwrap().capacity;
    // Thick beyond free minus reserve: refused, nothing left behind.
    let too_big = cap.free - cap.reserved() + MIB;
    let err = pool.create_volume(CreateVolume { provisioning: Provisioning::Thick, ..blank("vol-x", too_big) }).unwrap_err();
    assert!(matches!(err, VolumeError::Capacity { .. }), "{err}");
    // Thin may exceed free space, until provisioned/total reaches the ratio.
    let mut made = 0u64;
    let err = loop {
        match pool.create_volume(blank(&format!("vol-thin-{made}"), 64 * MIB)) {
            Ok(_) => made += 1,
            Err(e) => break e,
        }
    };
    assert!(matches!(err, VolumeError::Capacity { shortfall: cinderblock::volume::Shortfall::OverSubscribed { .. }, .. }), "{err}");
    let provisioned = made * 64 * MIB;
    assert!(provisioned > cap.free, "ratio 2 should allow more than the free space");
    assert!(provisioned as f64 <= 2.0 * cap.total as f64);
    assert!((provisioned + 64 * MIB) as f64 > 2.0 * cap.total as f64);
    // Beyond anything the pool could ever hold: out of range.
    let err = pool.create_volume(blank("vol-huge", cap.total * 3)).unwrap_err();
    assert!(matches!(err, VolumeError::OutOfRange { .. }), "{err}");
    assert_eq!(pool.list_volumes().len() as u64, made);
    let tmp_left: Vec<_> = tree(&fs.mount.join("pool")).into_keys().filter(|k| k.contains("partial") || k.contains(".tmp")).collect();
    assert!(tmp_left.is_empty(), "{tmp_left:?}");
}

#[test]
fn repeats_are_idempotent_and_conflicts_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (pool, _) = Pool::open(dir.path(), PoolConfig::default()).unwrap();
    let a = pool.create_volume(blank("vol-1", 10 * MIB)).unwrap();
    let b = pool.create_volume(blank("vol-1", 10 * MIB)).unwrap();
    assert_eq!(a, b);
    assert!(matches!(pool.create_volume(blank("vol-1", 20 * MIB)), Err(VolumeError::Conflict { .. })));
    let s1 = pool.create_snapshot("snap-1", "vol-1", BTreeMap::new()).unwrap();
    assert_eq!(pool.create_snapshot("snap-1", "vol-1", BTreeMap::new()).unwrap(), s1);
    pool.create_volume(blank("vol-2", MIB)).unwrap();
    assert!(matches!(pool.create_snapshot("snap-1", "vol-2", BTreeMap::new()), Err(VolumeError::Conflict { .. })));
    pool.delete_volume("vol-1").unwrap();
    pool.delete_volume("vol-1").unwrap();
    pool.delete_snapshot("snap-1").unwrap();
    pool.delete_snapshot("snap-1").unwrap();
    pool.delete_volume("never-existed").unwrap();
    // Expanding to a smaller size changes nothing.
    assert_eq!(pool.expand_volume("vol-2", 1).unwrap().size_bytes, MIB);
}

#[test]
fn concurrent_calls_on_one_id_make_one_volume() {
    let dir = tempfile::tempdir().unwrap();
    let (pool, _) = Pool::open(dir.path(), PoolConfig::default()).unwrap();
    let pool = std::sync::Arc::new(pool);
    let handles: Vec<_> = (0..32)
        .map(|i| {
            let pool = pool.clone();
            std::thread::spawn(move || {
                if i % 4 == 3 {
                    let _ = pool.delete_volume("vol-race");
                    None
                } else {
                    Some(pool.create_volume(blank("vol-race", 8 * MIB)))
                }
            })
        })
        .collect();
    for h in handles {
        if let Some(r) = h.join().unwrap() {
            r.unwrap();
        }
    }
    // Whatever the interleaving, the folder agrees with the index.
    let on_disk: Vec<_> = tree(&dir.path().join("volumes")).into_keys().collect();
    match pool.get_volume("vol-race") {
        Ok(_) => assert_eq!(on_disk, vec!["vol-race.img", "vol-race.json"]),
        Err(_) => assert!(on_disk.is_empty(), "{on_disk:?}"),
    }
}

#[test]
fn reconcile_finishes_or_removes_half_made_records() {
    use cinderblock::volume::records::write_record;
    use cinderblock::volume::{State, VolumeRecord};
    let dir = tempfile::tempdir().unwrap();
    {
        let (pool, _) = Pool::open(dir.path(), PoolConfig::default()).unwrap();
        pool.create_volume(blank("vol-ok", MIB)).unwrap();
    }
    let vols = dir.path().join("volumes");
    let rec = |id: &str, state| VolumeRecord {
        id: id.into(),
        size_bytes: MIB,
        provisioning: Provisioning::Thin,
        source: None,
        metadata: BTreeMap::new(),
        created_at_ms: 0,
        state,
        expanding_to: None,
        copy: None,
    };
    // Crashed before the image was renamed into place: rolled back.
    write_record(&vols.join("vol-half.json"), &rec("vol-half", State::Creating)).unwrap();
    write_file(&vols.join("vol-half.img.partial"), b"partial");
    // Crashed after the rename, before the record said Available: finished.
    write_record(&vols.join("vol-done.json"), &rec("vol-done", State::Creating)).unwrap();
    write_file(&vols.join("vol-done.img"), &[0u8; 4096]);
    // Crashed mid-delete: deletion finished.
    write_record(&vols.join("vol-going.json"), &rec("vol-going", State::Deleting)).unwrap();
    // An image nobody recorded: kept aside, not deleted.
    write_file(&vols.join("vol-stray.img"), b"who am i");
    // A torn temporary record: dropped.
    write_file(&vols.join("vol-ok.json.tmp"), b"{\"id\": \"vol-o");
    // Creates whose record was still pending (never answered): rolled
    // back, their images removed, not kept as orphans. One crashed with its
    // image in place, just before the record's rename; one while its
    // record was being written.
    write_file(&vols.join("vol-pending.json.tmp"), &serde_json::to_vec(&rec("vol-pending", State::Available)).unwrap());
    write_file(&vols.join("vol-pending.img"), &[0u8; 4096]);
    write_file(&vols.join("vol-torn.json.tmp"), b"{\"id\": \"vol-t");
    write_file(&vols.join("vol-torn.img.partial"), b"partial");
    // A create whose record reached its name while its image was still
    // partial (the two renames landed apart): finished.
    write_file(&vols.join("vol-renamed.json"), &serde_json::to_vec(&rec("vol-renamed", State::Available)).unwrap());
    write_file(&vols.join("vol-renamed.img.partial"), &vec![0u8; MIB as usize]);
    // A deletion that was decided (record moved aside): finished.
    write_file(&vols.join("vol-moved.json.deleting"), &serde_json::to_vec(&rec("vol-moved", State::Available)).unwrap());
    write_file(&vols.join("vol-moved.img"), &[0u8; 4096]);

    let (pool, report) = Pool::open(dir.path(), PoolConfig::default()).unwrap();
    assert_eq!(report.rolled_back, vec!["volumes/vol-half", "volumes/vol-pending", "volumes/vol-torn"]);
    assert_eq!(report.finished, vec!["volumes/vol-done", "volumes/vol-renamed"]);
    assert_eq!(report.deleted, vec!["volumes/vol-going", "volumes/vol-moved"]);
    assert_eq!(report.quarantined, vec!["volumes/vol-stray"]);
    let ids: Vec<_> = pool.list_volumes().into_iter().map(|v| v.id).collect();
    assert_eq!(ids, vec!["vol-done", "vol-ok", "vol-renamed"]);
    let files: Vec<_> = tree(&vols).into_keys().collect();
    assert_eq!(files, vec!["vol-done.img", "vol-done.json", "vol-ok.img", "vol-ok.json", "vol-renamed.img", "vol-renamed.json"]);
    assert_eq!(std::fs::read_dir(dir.path().join("orphaned")).unwrap().count(), 1);
}

#[test]
fn answered_creates_survive_a_power_cut() {
    // Records of new volumes are written without an fsync and made durable
    // in the pool's journal. A real crash (XFS shut down without its log)
    // cuts concurrent creates short and empties records; every create
    // answered before it must be there after the next open.
    require_root!();
    require_tools!("mkfs.xfs", "xfs_io");
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let fs = TestFs::new("xfs-reflink", "512M");
    let pool_dir = fs.mount.join("pool");
    let answered: Arc<Mutex<BTreeMap<String, u64>>> = Default::default();
    {
        let (pool, _) = Pool::open(&pool_dir, PoolConfig::default()).unwrap();
        let pool = Arc::new(pool);
        pool.create_volume(blank("vol-data", 8 * MIB)).unwrap();
        write_pattern(&pool.volume_image("vol-data"), MIB, MIB as usize, 7);
        pool.create_snapshot("snap-data", "vol-data", BTreeMap::new()).unwrap();
        answered.lock().unwrap().insert("vol-data".into(), 8 * MIB);
        // Creates from 8 threads at once, as a node serves them, until the
        // crash makes them fail; every fifth a clone of the snapshot.
        let crashed = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let (pool, answered, crashed) = (pool.clone(), answered.clone(), crashed.clone());
                std::thread::spawn(move || {
                    for i in 0.. {
                        let id = format!("vol-{t}-{i}");
                        let source = (i % 5 == 0).then(|| VolumeSource::Snapshot("snap-data".into()));
                        let size = if source.is_some() { 8 * MIB } else { (t as u64 + 1) * MIB };
                        match pool.create_volume(CreateVolume { source, ..blank(&id, size) }) {
                            // Counted only when it ended before the shutdown
                            // began. Unlike a power cut, a shutdown leaves the
                            // process running, and a call that spans it can be
                            // told a lie: XFS's fsync of a folder answers 0
                            // once the shutdown has dropped the changes it
                            // would have forced (nothing of the folder is left
                            // pinned in the log).
                            Ok(v) if !crashed.load(Ordering::SeqCst) => {
                                answered.lock().unwrap().insert(id, v.size_bytes);
                            }
                            Ok(_) => {}
                            Err(_) => return,
                        }
                    }
                })
            })
            .collect();
        let waited = std::time::Instant::now();
        while answered.lock().unwrap().len() < 150 {
            assert!(waited.elapsed() < std::time::Duration::from_secs(120), "150 creates did not finish in 2 minutes");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        crashed.store(true, Ordering::SeqCst);
        fs.crash();
        for t in threads {
            t.join().unwrap();
        }
    }
    fs.mount_again();

    let answered = answered.lock().unwrap().clone();
    let (pool, report) = Pool::open(&pool_dir, PoolConfig::default()).unwrap();
    // Without the journal these records would be empty files now.
    assert!(!report.restored.is_empty(), "the crash emptied no record, so this test proved nothing: {report:?}");
    assert!(report.broken.is_empty() && report.quarantined.is_empty(), "{report:?}");
    let found: BTreeMap<String, u64> = pool.list_volumes().into_iter().map(|v| (v.id, v.size_bytes)).collect();
    let lost: Vec<_> = answered.iter().filter(|(id, size)| found.get(*id) != Some(size)).collect();
    if !lost.is_empty() {
        let files: Vec<String> = std::fs::read_dir(pool_dir.join("volumes"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| lost.iter().any(|(id, _)| name.starts_with(&format!("{id}."))))
            .collect();
        panic!("answered before the crash, not found after it: {lost:?}; their files now: {files:?}; the open: {report:?}");
    }
    // A create the crash cut short may be there too (its last step landed,
    // its answer did not): whole, or rolled back.
    for id in found.keys() {
        assert_eq!(record_on_disk(&pool_dir, id)["id"], id.as_str());
        assert!(pool.volume_image(id).is_file(), "{id}");
    }
    assert_eq!(pool.list_snapshots(None).len(), 1);
    // The clones answered hold the snapshot's data.
    let want = checksum(&pool.snapshot_image("snap-data"));
    for id in answered.keys().filter(|id| id.ends_with("-0") || id.ends_with("-5")) {
        assert_eq!(checksum(&pool.volume_image(id)), want, "{id}");
    }
    // The pool takes new work after the crash.
    pool.create_volume(blank("vol-after", MIB)).unwrap();
}

#[test]
fn a_read_only_pool_fails_cleanly() {
    require_root!();
    let fs = TestFs::new("ext4", "128M");
    let pool_dir = fs.mount.join("pool");
    let (pool, _) = Pool::open(&pool_dir, PoolConfig::default()).unwrap();
    pool.create_volume(blank("vol-before", MIB)).unwrap();
    run("mount", &["-o", "remount,ro", fs.mount.to_str().unwrap()]);
    let before = tree(&pool_dir);
    let err = pool.create_volume(blank("vol-after", MIB)).unwrap_err();
    assert!(matches!(err, VolumeError::Io { .. }), "{err}");
    assert_eq!(tree(&pool_dir), before);
    run("mount", &["-o", "remount,rw", fs.mount.to_str().unwrap()]);
    // The failed create left nothing that blocks a retry.
    pool.create_volume(blank("vol-after", MIB)).unwrap();
}

#[test]
fn a_pool_keeps_its_uuid_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let (pool, _) = Pool::open(dir.path(), PoolConfig::default()).unwrap();
    let uuid = pool.uuid().to_string();
    uuid::Uuid::parse_str(&uuid).expect("a UUID");
    pool.create_volume(blank("vol-1", MIB)).unwrap();
    drop(pool);
    let (pool, _) = Pool::open(dir.path(), PoolConfig::default()).unwrap();
    assert_eq!(pool.uuid(), uuid);
    // Another pool is another UUID.
    let other = tempfile::tempdir().unwrap();
    assert_ne!(Pool::open(other.path(), PoolConfig::default()).unwrap().0.uuid(), uuid);
}

#[test]
fn a_pool_made_before_pool_records_gets_a_uuid_and_keeps_its_volumes() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (pool, _) = Pool::open(dir.path(), PoolConfig::default()).unwrap();
        pool.create_volume(blank("vol-old", MIB)).unwrap();
    }
    // What a milestone-1 pool looks like: no pool.json.
    std::fs::remove_file(dir.path().join("pool.json")).unwrap();
    let (pool, report) = Pool::open(dir.path(), PoolConfig::default()).unwrap();
    assert_eq!(report, Default::default());
    assert!(uuid::Uuid::parse_str(pool.uuid()).is_ok());
    assert_eq!(pool.list_volumes().len(), 1);
    let written: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join("pool.json")).unwrap()).unwrap();
    assert_eq!(written["uuid"], pool.uuid());
}

#[test]
fn an_unreadable_pool_record_stops_the_open_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (pool, _) = Pool::open(dir.path(), PoolConfig::default()).unwrap();
        pool.create_volume(blank("vol-1", MIB)).unwrap();
    }
    std::fs::write(dir.path().join("pool.json"), b"{\"uuid\": \"3b5").unwrap();
    // Leftovers a normal open would tidy, to see that it did not run.
    write_file(&dir.path().join("volumes/vol-1.json.tmp"), b"torn");
    let before = tree(dir.path());
    let err = Pool::open(dir.path(), PoolConfig::default()).err().expect("open must fail");
    assert!(matches!(err, VolumeError::BadPoolRecord { .. }), "{err}");
    assert!(err.to_string().contains("pool.json") && err.to_string().contains("nothing was changed"), "{err}");
    assert_eq!(tree(dir.path()), before);
}

// ------------------------------------------------------------ expansion

fn record_on_disk(pool_dir: &Path, id: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(pool_dir.join("volumes").join(format!("{id}.json"))).unwrap()).unwrap()
}

fn free_bytes(path: &Path) -> u64 {
    let st = rustix::fs::statvfs(path).unwrap();
    st.f_bavail * st.f_frsize
}

/// Take all but `leave` bytes of the filesystem holding `dir`, for real.
fn fill(dir: &Path, leave: u64) -> std::path::PathBuf {
    use std::os::fd::AsRawFd;
    let path = dir.join("filler");
    let f = std::fs::File::create(&path).unwrap();
    let take = free_bytes(dir).saturating_sub(leave);
    assert_eq!(unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, take as i64) }, 0, "filling {}", dir.display());
    f.sync_all().unwrap();
    path
}

#[test]
fn thick_expansion_without_space_fails_keeps_the_volume_and_a_retry_grows() {
    require_root!();
    let fs = TestFs::new("xfs-noreflink", "320M");
    let pool_dir = fs.mount.join("pool");
    let (pool, _) = Pool::open(&pool_dir, PoolConfig::default()).unwrap();
    let thick = CreateVolume { provisioning: Provisioning::Thick, ..blank("vol-thick", 32 * MIB) };
    pool.create_volume(thick).unwrap();
    let img = pool.volume_image("vol-thick");
    write_pattern(&img, 0, 32 * MIB as usize, 5);
    let data = checksum(&img);

    // The pool says the bytes are free; the filesystem cannot give them
    // (it needs a few more for its own bookkeeping): the grow itself fails.
    let filler = fill(&fs.mount, 24 * MIB);
    let free = pool.status().unwrap().capacity.free;
    let err = pool.expand_volume("vol-thick", 32 * MIB + free).unwrap_err();
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::ResourceExhausted);
    for _ in 0..2 {
        assert_eq!(pool.get_volume("vol-thick").unwrap().size_bytes, 32 * MIB);
        assert_eq!(std::fs::metadata(&img).unwrap().len(), 32 * MIB);
        assert_eq!(checksum(&img), data);
        assert!(record_on_disk(&pool_dir, "vol-thick").get("expanding_to").is_none());
        // A retry grows again, it does not answer OK for a size it never reached.
        let err = pool.expand_volume("vol-thick", 32 * MIB + free).unwrap_err();
        assert!(err.to_string().contains("stays at 33554432 bytes"), "{err}");
    }
    drop(pool);
    let (pool, report) = Pool::open(&pool_dir, PoolConfig::default()).unwrap();
    assert_eq!(report, Default::default());
    assert_eq!(pool.get_volume("vol-thick").unwrap().size_bytes, 32 * MIB);

    std::fs::remove_file(filler).unwrap();
    // XFS frees a deleted file's blocks in the background.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while pool.status().unwrap().capacity.free < 32 * MIB + free {
        assert!(std::time::Instant::now() < deadline, "the freed space never showed");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let grown = pool.expand_volume("vol-thick", 32 * MIB + free).unwrap();
    assert_eq!(grown.size_bytes, (32 * MIB + free).div_ceil(4096) * 4096);
    assert_eq!(std::fs::metadata(&img).unwrap().len(), grown.size_bytes);
    assert!(allocated(&img) >= grown.size_bytes, "a thick volume is allocated in full");
    assert_eq!(record_on_disk(&pool_dir, "vol-thick")["size_bytes"], grown.size_bytes);
    use std::os::unix::fs::FileExt;
    let mut first = vec![0u8; 32 * MIB as usize];
    std::fs::File::open(&img).unwrap().read_exact_at(&mut first, 0).unwrap();
    let expected: Vec<u8> = (0..32 * MIB as usize).map(|i| (i as u8).wrapping_mul(31).wrapping_add(5)).collect();
    assert!(first == expected, "the data before the expansion changed");
}

#[test]
fn expansion_beyond_what_the_filesystem_can_hold_is_out_of_range_and_changes_nothing() {
    require_root!();
    let fs = TestFs::new("ext4", "128M");
    let pool_dir = fs.mount.join("pool");
    // A ratio that lets a thin volume be promised far past ext4's 16 TiB files.
    let cfg = PoolConfig { max_over_subscription_ratio: 1e6, ..PoolConfig::default() };
    let (pool, _) = Pool::open(&pool_dir, cfg.clone()).unwrap();
    pool.create_volume(blank("vol-1", MIB)).unwrap();
    write_pattern(&pool.volume_image("vol-1"), 0, MIB as usize, 8);
    let before = tree(&pool_dir);
    let err = pool.expand_volume("vol-1", 17 << 40).unwrap_err();
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::OutOfRange);
    assert_eq!(tree(&pool_dir), before);
    assert_eq!(pool.status().unwrap().capacity.provisioned, MIB, "a failed expansion holds no capacity");
    assert_eq!(pool.expand_volume("vol-1", 2 * MIB).unwrap().size_bytes, 2 * MIB);
    assert_eq!(std::fs::metadata(pool.volume_image("vol-1")).unwrap().len(), 2 * MIB);
}

#[test]
fn an_interrupted_expansion_is_finished_or_undone_at_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (pool, _) = Pool::open(dir.path(), PoolConfig::default()).unwrap();
        for id in ["vol-grown", "vol-not-grown", "vol-half-grown", "vol-old-style"] {
            pool.create_volume(blank(id, 4 * MIB)).unwrap();
            write_pattern(&pool.volume_image(id), 0, 4 * MIB as usize, 3);
        }
    }
    let vols = dir.path().join("volumes");
    let set = |id: &str, size: u64, expanding_to: Option<u64>, image_len: u64| {
        let path = vols.join(format!("{id}.json"));
        let mut r: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        r["size_bytes"] = size.into();
        if let Some(t) = expanding_to {
            r["expanding_to"] = t.into();
        }
        std::fs::write(&path, serde_json::to_vec(&r).unwrap()).unwrap();
        std::fs::OpenOptions::new().write(true).open(vols.join(format!("{id}.img"))).unwrap().set_len(image_len).unwrap();
    };
    // Killed after the grow, before the record took the new size.
    set("vol-grown", 4 * MIB, Some(8 * MIB), 8 * MIB);
    // Killed after the intent, before the grow.
    set("vol-not-grown", 4 * MIB, Some(8 * MIB), 4 * MIB);
    // Killed in the middle of a thick allocation.
    set("vol-half-grown", 4 * MIB, Some(8 * MIB), 6 * MIB);
    // An older version's order: the record grew first.
    set("vol-old-style", 8 * MIB, None, 4 * MIB);

    let (pool, report) = Pool::open(dir.path(), PoolConfig::default()).unwrap();
    assert_eq!(report.finished, vec!["volumes/vol-grown", "volumes/vol-old-style"]);
    assert_eq!(report.rolled_back, vec!["volumes/vol-half-grown", "volumes/vol-not-grown"]);
    assert!(report.broken.is_empty(), "{report:?}");
    for (id, size) in [("vol-grown", 8 * MIB), ("vol-not-grown", 4 * MIB), ("vol-half-grown", 4 * MIB), ("vol-old-style", 8 * MIB)] {
        assert_eq!(pool.get_volume(id).unwrap().size_bytes, size, "{id}");
        assert_eq!(std::fs::metadata(pool.volume_image(id)).unwrap().len(), size, "{id}");
        let on_disk = record_on_disk(dir.path(), id);
        assert_eq!(on_disk["size_bytes"], size, "{id}");
        assert!(on_disk.get("expanding_to").is_none(), "{id}: {on_disk}");
    }
}

#[test]
fn a_broken_volume_is_marked_and_the_rest_of_the_pool_is_served() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (pool, _) = Pool::open(dir.path(), PoolConfig::default()).unwrap();
        for id in ["vol-good", "vol-torn", "vol-lost"] {
            pool.create_volume(blank(id, MIB)).unwrap();
        }
        pool.create_snapshot("snap-good", "vol-good", BTreeMap::new()).unwrap();
    }
    let vols = dir.path().join("volumes");
    // Torn long after its create: the journal no longer holds it (its
    // segments were checkpointed away), so nothing can write it again.
    checkpoint_pool_journal(dir.path());
    std::fs::write(vols.join("vol-torn.json"), b"{\"id\": \"vol-to").unwrap();
    std::fs::remove_file(vols.join("vol-lost.img")).unwrap();
    let without_journal = |tree: BTreeMap<String, (u64, u64)>| -> BTreeMap<String, (u64, u64)> {
        tree.into_iter().filter(|(name, _)| !name.starts_with("journal/")).collect()
    };
    let before = without_journal(tree(dir.path()));

    let (pool, report) = Pool::open(dir.path(), PoolConfig::default()).unwrap();
    assert_eq!(report.broken, vec!["volumes/vol-lost", "volumes/vol-torn"]);
    assert!(report.quarantined.is_empty(), "the torn record's image is not an orphan: {report:?}");
    assert_eq!(without_journal(tree(dir.path())), before, "broken volumes are left exactly as they were");
    let broken = pool.broken();
    assert_eq!(broken.len(), 2);
    assert!(
        broken.iter().any(|b| b.id == "vol-lost" && b.kind == "volume" && b.reason.contains("image") && b.reason.contains("missing")),
        "{broken:?}"
    );
    assert!(broken.iter().any(|b| b.id == "vol-torn" && b.reason.contains("cannot be read")), "{broken:?}");

    // The others work as usual.
    assert_eq!(pool.list_volumes().iter().map(|v| v.id.as_str()).collect::<Vec<_>>(), vec!["vol-good"]);
    pool.create_volume(from("vol-new", MIB, VolumeSource::Snapshot("snap-good".into()))).unwrap();
    pool.expand_volume("vol-good", 2 * MIB).unwrap();

    // A broken volume answers with its reason and is never overwritten.
    let err = pool.get_volume("vol-torn").unwrap_err();
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::FailedPrecondition);
    let err = pool.create_volume(blank("vol-torn", MIB)).unwrap_err();
    assert!(matches!(err, VolumeError::Broken { .. }), "{err}");
    assert!(matches!(pool.create_snapshot("snap-x", "vol-lost", BTreeMap::new()), Err(VolumeError::Broken { .. })));
    assert!(matches!(pool.expand_volume("vol-lost", 2 * MIB), Err(VolumeError::Broken { .. })));

    // Deleting it keeps its files, in orphaned/.
    let torn_image = checksum(&vols.join("vol-torn.img"));
    pool.delete_volume("vol-torn").unwrap();
    pool.delete_volume("vol-torn").unwrap();
    assert!(!vols.join("vol-torn.img").exists() && !vols.join("vol-torn.json").exists());
    let kept: Vec<_> = tree(&dir.path().join("orphaned")).into_iter().collect();
    assert_eq!(kept.len(), 2, "{kept:?}");
    assert!(kept.iter().any(|(name, (_, sum))| name.ends_with("vol-torn.img") && *sum == torn_image), "{kept:?}");
    assert_eq!(pool.broken().len(), 1);
    pool.create_volume(blank("vol-torn", MIB)).unwrap();
}

#[test]
fn an_old_style_expansion_that_cannot_be_finished_marks_only_that_volume_broken() {
    require_root!();
    let fs = TestFs::new("ext4", "128M");
    let pool_dir = fs.mount.join("pool");
    {
        let (pool, _) = Pool::open(&pool_dir, PoolConfig::default()).unwrap();
        pool.create_volume(blank("vol-ok", MIB)).unwrap();
        pool.create_volume(blank("vol-big", MIB)).unwrap();
    }
    // The record of an older version says 17 TiB; ext4 cannot grow a file so far.
    let path = pool_dir.join("volumes/vol-big.json");
    let mut r: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    r["size_bytes"] = (17u64 << 40).into();
    std::fs::write(&path, serde_json::to_vec(&r).unwrap()).unwrap();
    let (pool, report) = Pool::open(&pool_dir, PoolConfig::default()).unwrap();
    assert_eq!(report.broken, vec!["volumes/vol-big"]);
    let reason = &pool.broken()[0].reason;
    assert!(reason.contains("growing the image failed") && reason.contains("File too large"), "{reason}");
    assert_eq!(std::fs::metadata(pool_dir.join("volumes/vol-big.img")).unwrap().len(), MIB);
    assert!(pool.get_volume("vol-ok").is_ok());
}

// ------------------------------------------------------------ thick clones

/// Take every free byte of the filesystem holding `dir`, 1 MiB at a time.
fn fill_completely(dir: &Path) -> std::path::PathBuf {
    use std::os::fd::AsRawFd;
    let path = dir.join("filler");
    let f = std::fs::File::create(&path).unwrap();
    let mut len: i64 = 0;
    for chunk in [MIB as i64, 4096] {
        while unsafe { libc::fallocate(f.as_raw_fd(), 0, len, chunk) } == 0 {
            len += chunk;
        }
    }
    f.sync_all().unwrap();
    path
}

#[test]
fn thick_copies_by_reflink_own_their_blocks_and_take_a_full_overwrite_on_a_full_pool() {
    require_root!();
    let fs = TestFs::new("xfs-reflink", "768M");
    let pool_dir = fs.mount.join("pool");
    let (pool, _) = Pool::open(&pool_dir, PoolConfig::default()).unwrap();
    assert!(pool.reflink());
    const SIZE: u64 = 96 * MIB;
    let thick = |id: &str| CreateVolume { provisioning: Provisioning::Thick, ..blank(id, SIZE) };
    pool.create_volume(thick("vol-src")).unwrap();
    write_pattern(&pool.volume_image("vol-src"), 0, SIZE as usize, 1);
    let original = checksum(&pool.volume_image("vol-src"));
    let free = || pool.status().unwrap().capacity.free;

    // Each thick copy takes its full size from the pool, as admission
    // counted it: it shares nothing with its source.
    let mut before = free();
    pool.create_volume(CreateVolume { source: Some(VolumeSource::Volume("vol-src".into())), ..thick("vol-clone") }).unwrap();
    assert!(before - free() >= SIZE - MIB, "the thick clone took {} bytes", before - free());
    before = free();
    pool.create_snapshot("snap-src", "vol-src", BTreeMap::new()).unwrap();
    assert!(before - free() >= SIZE - MIB, "the snapshot of a thick volume took {} bytes", before - free());
    before = free();
    pool.create_volume(CreateVolume { source: Some(VolumeSource::Snapshot("snap-src".into())), ..thick("vol-restored") }).unwrap();
    assert!(before - free() >= SIZE - MIB, "the thick restore took {} bytes", before - free());
    for id in ["vol-clone", "vol-restored"] {
        assert_eq!(checksum(&pool.volume_image(id)), original, "{id}");
        assert!(allocated(&pool.volume_image(id)) >= SIZE, "{id}");
    }
    assert_eq!(pool.status().unwrap().capacity.provisioned, 4 * SIZE);

    // Nothing left; a full overwrite of every thick volume still succeeds.
    let _filler = fill_completely(&fs.mount);
    assert!(free() < MIB, "the pool still has {} bytes free", free());
    for (seed, id) in ["vol-src", "vol-clone", "vol-restored"].into_iter().enumerate() {
        write_pattern(&pool.volume_image(id), 0, SIZE as usize, 100 + seed as u8);
    }
    assert_eq!(checksum(&pool.snapshot_image("snap-src")), original, "the snapshot changed");
}

#[test]
fn a_copy_from_another_node_is_kept_across_a_restart_before_any_progress() {
    use cinderblock::volume::records::CopyState;
    use cinderblock::volume::State;
    let dir = tempfile::tempdir().unwrap();
    let from = CopyState {
        address: "127.0.0.1:10809".into(),
        export_name: "export-1".into(),
        server_node: "node-2".into(),
        resume_at: 0,
        copied_bytes: 0,
        total_bytes: 0,
        pass: 0,
        more_passes: false,
        pass_done: false,
    };
    {
        let (pool, _) = Pool::open(dir.path(), PoolConfig::default()).unwrap();
        pool.begin_copy(blank("vol-copy", MIB), from.clone()).unwrap();
        // A plain create whose image is made but whose record is not written yet
        // would be rolled back; a copy's record is on disk from the start.
    }
    let (pool, report) = Pool::open(dir.path(), PoolConfig::default()).unwrap();
    assert_eq!(report, Default::default());
    let v = pool.get_volume("vol-copy").unwrap();
    assert_eq!(v.state, State::Creating);
    assert_eq!(v.copy.as_ref().map(|c| c.server_node.as_str()), Some("node-2"));
    let files: Vec<_> = tree(&dir.path().join("volumes")).into_keys().collect();
    assert_eq!(files, vec!["vol-copy.img.partial", "vol-copy.json"]);
}
