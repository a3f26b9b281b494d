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
    assert!(
        matches!(err, VolumeError::Capacity { shortfall: cinderblock::volume::Shortfall::OverSubscribed { .. }, .. }),
        "{err}"
    );
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

    let (pool, report) = Pool::open(dir.path(), PoolConfig::default()).unwrap();
    assert_eq!(report.rolled_back, vec!["volumes/vol-half"]);
    assert_eq!(report.finished, vec!["volumes/vol-done"]);
    assert_eq!(report.deleted, vec!["volumes/vol-going"]);
    assert_eq!(report.orphaned, vec!["volumes/vol-stray"]);
    let ids: Vec<_> = pool.list_volumes().into_iter().map(|v| v.id).collect();
    assert_eq!(ids, vec!["vol-done", "vol-ok"]);
    let files: Vec<_> = tree(&vols).into_keys().collect();
    assert_eq!(files, vec!["vol-done.img", "vol-done.json", "vol-ok.img", "vol-ok.json"]);
    assert_eq!(std::fs::read_dir(dir.path().join("orphaned")).unwrap().count(), 1);
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
