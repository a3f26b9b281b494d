//! The controller through real gRPC on a unix socket, against real node
//! agents (a `cinderblock standalone` process with temporary pools): the
//! three create sources, idempotency, races, reschedule on a real fault,
//! and a controller killed mid-flow.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use cinderblock::controller::records::volume_id_for;
use cinderblock::csi;
use cinderblock::csi::controller_client::ControllerClient;
use common::*;
use tonic::Code;

type Client = ControllerClient<tonic::transport::Channel>;

const MIB: i64 = 1 << 20;

fn mount_cap() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(csi::volume_capability::AccessType::Mount(Default::default())),
        access_mode: Some(csi::volume_capability::AccessMode { mode: csi::volume_capability::access_mode::Mode::SingleNodeWriter as i32 }),
    }
}

fn req(name: &str, size: i64) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange { required_bytes: size, limit_bytes: 0 }),
        volume_capabilities: vec![mount_cap()],
        ..Default::default()
    }
}

fn with_params(mut r: csi::CreateVolumeRequest, kv: &[(&str, &str)]) -> csi::CreateVolumeRequest {
    r.parameters = kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<HashMap<_, _>>();
    r
}

fn from_snapshot(mut r: csi::CreateVolumeRequest, snap: &str) -> csi::CreateVolumeRequest {
    r.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(csi::volume_content_source::SnapshotSource { snapshot_id: snap.into() })),
    });
    r
}

fn clone_of(mut r: csi::CreateVolumeRequest, vol: &str) -> csi::CreateVolumeRequest {
    r.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Volume(csi::volume_content_source::VolumeSource { volume_id: vol.into() })),
    });
    r
}

async fn create(c: &mut Client, r: csi::CreateVolumeRequest) -> csi::Volume {
    c.create_volume(r).await.expect("CreateVolume").into_inner().volume.unwrap()
}

fn node_of(v: &csi::Volume) -> String {
    v.volume_context["cinderblock.dev/node"].clone()
}

async fn client(s: &Standalone) -> Client {
    ControllerClient::new(csi_channel(&s.endpoint).await)
}

#[tokio::test]
async fn blank_snapshot_restore_and_clone_with_idempotent_repeats() {
    let dir = tempfile::tempdir().unwrap();
    let s = Standalone::start(dir.path(), 3, 2, &[]);
    let mut c = client(&s).await;

    let v = create(&mut c, req("pvc-data", 64 * MIB)).await;
    assert_eq!(v.capacity_bytes, 64 * MIB);
    assert_eq!(create(&mut c, req("pvc-data", 64 * MIB)).await, v, "a repeat must return the same volume");
    let node = node_of(&v);
    let topo = &v.accessible_topology[0].segments;
    assert_eq!(topo[cinderblock::TOPOLOGY_NODE_KEY], node);
    assert!(topo.contains_key(cinderblock::TOPOLOGY_ZONE_KEY));

    // Data in the image, as a loop device would have written it.
    let n: u32 = node.trim_start_matches("node-").parse().unwrap();
    let img = |id: &str| s.pool(n).join("volumes").join(format!("{id}.img"));
    write_pattern(&img(&v.volume_id), 0, 1 << 20, 5);
    let original = checksum(&img(&v.volume_id));

    let snap = c
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: v.volume_id.clone(),
            name: "snap-data".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert!(snap.ready_to_use);
    assert_eq!(snap.size_bytes, 64 * MIB);
    let again = c
        .create_snapshot(csi::CreateSnapshotRequest {
            source_volume_id: v.volume_id.clone(),
            name: "snap-data".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap();
    assert_eq!(again.snapshot_id, snap.snapshot_id);

    write_pattern(&img(&v.volume_id), 0, 1 << 20, 6);
    let changed = checksum(&img(&v.volume_id));

    let restored = create(&mut c, from_snapshot(req("pvc-restored", 64 * MIB), &snap.snapshot_id)).await;
    assert_eq!(node_of(&restored), node, "a restore goes to the snapshot's node");
    assert_eq!(checksum(&img(&restored.volume_id)), original);

    let cloned = create(&mut c, clone_of(req("pvc-clone", 0), &v.volume_id)).await;
    assert_eq!(node_of(&cloned), node, "a clone goes to its source's node");
    assert_eq!(cloned.capacity_bytes, 64 * MIB, "a clone defaults to its source's size");
    assert_eq!(checksum(&img(&cloned.volume_id)), changed);

    // Same name, other arguments: ALREADY_EXISTS, and nothing new on disk.
    let before = s.images();
    let err = c.create_volume(req("pvc-data", 128 * MIB)).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists, "{}", err.message());
    let err = c.create_volume(with_params(req("pvc-data", 64 * MIB), &[("provisioning", "thick")])).await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert_eq!(s.images(), before);

    // Listing pages through everything.
    let mut ids = BTreeSet::new();
    let mut token = String::new();
    loop {
        let r = c.list_volumes(csi::ListVolumesRequest { max_entries: 2, starting_token: token }).await.unwrap().into_inner();
        ids.extend(r.entries.into_iter().map(|e| e.volume.unwrap().volume_id));
        if r.next_token.is_empty() {
            break;
        }
        token = r.next_token;
    }
    assert_eq!(ids.len(), 3);
    let err = c.list_volumes(csi::ListVolumesRequest { max_entries: 2, starting_token: "bogus".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::Aborted);

    for id in [&v.volume_id, &restored.volume_id, &cloned.volume_id] {
        c.delete_volume(csi::DeleteVolumeRequest { volume_id: id.clone(), ..Default::default() }).await.unwrap();
        c.delete_volume(csi::DeleteVolumeRequest { volume_id: id.clone(), ..Default::default() }).await.unwrap();
    }
    c.delete_snapshot(csi::DeleteSnapshotRequest { snapshot_id: snap.snapshot_id.clone(), ..Default::default() }).await.unwrap();
    assert!(s.images().is_empty(), "left behind: {:?}", s.images());
}

#[tokio::test]
async fn bad_requests_get_the_spec_codes_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = Standalone::start(dir.path(), 2, 1, &[]);
    let mut c = client(&s).await;
    let mut no_caps = req("x", MIB);
    no_caps.volume_capabilities.clear();
    let mut multi = req("x", MIB);
    multi.volume_capabilities[0].access_mode =
        Some(csi::volume_capability::AccessMode { mode: csi::volume_capability::access_mode::Mode::MultiNodeMultiWriter as i32 });
    let cases: Vec<(&str, csi::CreateVolumeRequest, Code)> = vec![
        ("no name", req("", MIB), Code::InvalidArgument),
        ("no capabilities", no_caps, Code::InvalidArgument),
        ("multi-node access", multi, Code::InvalidArgument),
        ("negative size", req("neg", -5), Code::InvalidArgument),
        ("unknown parameter", with_params(req("p", MIB), &[("color", "blue")]), Code::InvalidArgument),
        ("bad provisioning", with_params(req("p", MIB), &[("provisioning", "fat")]), Code::InvalidArgument),
        ("unknown snapshot", from_snapshot(req("s", MIB), "snap-00000000-0000-0000-0000-000000000000"), Code::NotFound),
        ("foreign snapshot id", from_snapshot(req("s", MIB), "../../etc"), Code::NotFound),
        ("unknown volume", clone_of(req("c", MIB), "vol-00000000-0000-0000-0000-000000000000"), Code::NotFound),
        ("larger than any pool", req("huge", i64::MAX / 2), Code::ResourceExhausted),
    ];
    for (what, r, code) in cases {
        let err = c.create_volume(r).await.expect_err(what);
        assert_eq!(err.code(), code, "{what}: {}", err.message());
    }
    assert!(s.images().is_empty());
    let err = c.delete_volume(csi::DeleteVolumeRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c
        .create_snapshot(csi::CreateSnapshotRequest {
            name: "s".into(),
            source_volume_id: "vol-00000000-0000-0000-0000-000000000000".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = c.get_snapshot(csi::GetSnapshotRequest { snapshot_id: "snap-nope".into(), ..Default::default() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = c
        .controller_expand_volume(csi::ControllerExpandVolumeRequest {
            volume_id: "vol-nope".into(),
            capacity_range: Some(csi::CapacityRange { required_bytes: MIB, limit_bytes: 0 }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(s.images().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_parallel_creates_with_one_name_make_one_volume() {
    let dir = tempfile::tempdir().unwrap();
    let s = Standalone::start(dir.path(), 3, 1, &[]);
    let c = client(&s).await;
    let mut tasks = vec![];
    for _ in 0..64 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move { c.create_volume(req("pvc-race", 32 * MIB)).await }));
    }
    let mut ids = BTreeSet::new();
    for t in tasks {
        let v = t.await.unwrap().expect("every racer gets the volume").into_inner().volume.unwrap();
        ids.insert(v.volume_id);
    }
    assert_eq!(ids.len(), 1);
    assert_eq!(s.images().len(), 1, "{:?}", s.images());
}

/// Cinder's consume_from_volume: each placement reserves its size in the
/// controller's node view at once, so a burst of concurrent creates over
/// equal nodes spreads evenly instead of piling onto the node that looked
/// emptiest a moment ago (before: 23 creates on 3 nodes went 3 / 20 / 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_concurrent_creates_spread_evenly_over_eight_equal_nodes() {
    let dir = tempfile::tempdir().unwrap();
    // One filesystem under every pool: eight equal nodes, no zones. Reports
    // every 60 s, so the spread comes from the reservations, not from
    // reports arriving in the middle of the burst.
    let s = Standalone::start(dir.path(), 8, 0, &["--heartbeat-interval", "60", "--heartbeat-timeout", "300"]);
    let c = client(&s).await;
    let mut tasks = vec![];
    for i in 0..64 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move { c.create_volume(req(&format!("pvc-spread-{i}"), 64 * MIB)).await }));
    }
    let mut per_node: BTreeMap<String, usize> = (1..=8).map(|i| (format!("node-{i}"), 0)).collect();
    for t in tasks {
        let v = t.await.unwrap().expect("every create succeeds").into_inner().volume.unwrap();
        *per_node.get_mut(&node_of(&v)).expect("a node of the standalone") += 1;
    }
    let mean = 64 / 8;
    let (least, most) = (*per_node.values().min().unwrap(), *per_node.values().max().unwrap());
    assert!(most <= mean + 1 && least + 1 >= mean, "64 creates over 8 equal nodes should land within 1 of {mean} each: {per_node:?}");
    assert_eq!(s.images().len(), 64);
}

#[tokio::test]
async fn capacity_reports_the_largest_volume_that_fits() {
    let dir = tempfile::tempdir().unwrap();
    let s = Standalone::start(dir.path(), 2, 2, &["--max-over-subscription-ratio", "1"]);
    let mut c = client(&s).await;
    let cap = c.get_capacity(csi::GetCapacityRequest::default()).await.unwrap().into_inner();
    assert!(cap.available_capacity > 0);
    let thick = c
        .get_capacity(csi::GetCapacityRequest {
            parameters: [("provisioning".to_string(), "thick".to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(thick.available_capacity > 0);
    let nowhere = c
        .get_capacity(csi::GetCapacityRequest {
            accessible_topology: Some(csi::Topology {
                segments: [(cinderblock::TOPOLOGY_ZONE_KEY.to_string(), "zone-9".to_string())].into(),
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(nowhere.available_capacity, 0);
    // One byte more than fits anywhere: RESOURCE_EXHAUSTED.
    let err = c.create_volume(req("too-big", cap.available_capacity + 64 * MIB)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
}

#[tokio::test]
async fn a_failing_node_is_cleaned_up_excluded_and_the_volume_rescheduled() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    // node-1's pool lives on its own small filesystem, which we break for real.
    let fs = TestFs::new("ext4", "256M");
    std::fs::create_dir_all(dir.path().join("node-1")).unwrap();
    std::os::unix::fs::symlink(&fs.mount, dir.path().join("node-1").join("pool")).unwrap();
    let mut s = Standalone::start(dir.path(), 3, 1, &[]);
    let mut c = client(&s).await;
    // "stack" places on the fullest node: the small node-1.
    let first = create(&mut c, with_params(req("pvc-first", 16 * MIB), &[("placement", "stack")])).await;
    assert_eq!(node_of(&first), "node-1", "stack placement should pick the smallest pool");

    run("mount", &["-o", "remount,ro", fs.mount.to_str().unwrap()]);
    let second = create(&mut c, with_params(req("pvc-second", 16 * MIB), &[("placement", "stack")])).await;
    assert_ne!(node_of(&second), "node-1", "the failed node must be excluded");
    assert!(s.log_text().contains("create on node failed"), "the failure on node-1 should be logged");
    let leftovers: Vec<_> = tree(&fs.mount).into_keys().filter(|k| k.contains(&volume_id_for("pvc-second"))).collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // The volume already there is abnormal while its pool takes no writes.
    let get = csi::ControllerGetVolumeRequest { volume_id: first.volume_id.clone() };
    let cond = c.controller_get_volume(get.clone()).await.unwrap().into_inner().status.unwrap().volume_condition.unwrap();
    assert!(cond.abnormal && cond.message.contains("read-only"), "{cond:?}");
    run("mount", &["-o", "remount,rw", fs.mount.to_str().unwrap()]);
    let cond = c.controller_get_volume(get).await.unwrap().into_inner().status.unwrap().volume_condition.unwrap();
    assert!(!cond.abnormal, "{cond:?}");
    s.kill9();
}

#[tokio::test]
async fn all_nodes_failing_ends_in_error_with_every_reason() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let mut filesystems = vec![];
    for n in 1..=3 {
        let fs = TestFs::new("ext4", "128M");
        std::fs::create_dir_all(dir.path().join(format!("node-{n}"))).unwrap();
        std::os::unix::fs::symlink(&fs.mount, dir.path().join(format!("node-{n}")).join("pool")).unwrap();
        filesystems.push(fs);
    }
    let mut s = Standalone::start(dir.path(), 3, 1, &[]);
    let mut c = client(&s).await;
    for fs in &filesystems {
        run("mount", &["-o", "remount,ro", fs.mount.to_str().unwrap()]);
    }
    let err = c.create_volume(req("pvc-doomed", 8 * MIB)).await.unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{}", err.message());
    for n in 1..=3 {
        assert!(err.message().contains(&format!("node-{n}")), "reason for node-{n} missing: {}", err.message());
    }
    // The record says Error, with the reasons.
    let v = c.controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: volume_id_for("pvc-doomed") }).await.unwrap().into_inner();
    let cond = v.status.unwrap().volume_condition.unwrap();
    assert!(cond.abnormal);
    assert!(cond.message.starts_with("Error"), "{}", cond.message);
    for fs in &filesystems {
        run("mount", &["-o", "remount,rw", fs.mount.to_str().unwrap()]);
    }
    // Once the fault is gone, the same request succeeds (the CO retries).
    let v = create(&mut c, req("pvc-doomed", 8 * MIB)).await;
    assert_eq!(v.volume_id, volume_id_for("pvc-doomed"));
    s.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_killed_mid_flow_leaves_no_duplicate_and_no_leak() {
    let dir = tempfile::tempdir().unwrap();
    let names: Vec<String> = (0..24).map(|i| format!("pvc-crash-{i}")).collect();
    for round in 0..5 {
        let round_start = cinderblock::controller::records::now_ms();
        let mut s = Standalone::start(dir.path(), 3, 1, &[]);
        let c = client(&s).await;
        let mut tasks = vec![];
        for n in &names {
            let mut c = c.clone();
            let r = with_params(req(n, 64 * MIB), &[("provisioning", "thick")]);
            tasks.push(tokio::spawn(async move { c.create_volume(r).await }));
        }
        // Kill once flows are under way (the log says a node was chosen),
        // a little later each round.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !s.log_text().contains("scheduled") {
            assert!(std::time::Instant::now() < deadline, "no flow started");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        tokio::time::sleep(Duration::from_millis(5 * round)).await;
        s.kill9();
        let mut cut = 0;
        for t in tasks {
            if t.await.unwrap().is_err() {
                cut += 1;
            }
        }
        // The kill must have landed inside flows: calls cut short, and
        // records the next start finds still Creating.
        assert!(cut > 0, "round {round}: every create had finished before the kill");
        let store = cinderblock::store::EmbeddedStore::open(&dir.path().join("store.redb")).unwrap();
        let recs: Vec<(cinderblock::controller::records::VolumeRec, u64)> =
            cinderblock::store::list_json(&store, cinderblock::store::Kind::Volume).await.unwrap();
        let creating = recs
            .iter()
            .filter(|(v, _)| v.phase == cinderblock::controller::records::Phase::Creating && v.updated_ms >= round_start)
            .count();
        assert!(creating > 0, "round {round}: no flow of this round was interrupted ({} records)", recs.len());
    }
    // After the last restart the CO retries everything, as the provisioner does.
    let s = Standalone::start(dir.path(), 3, 1, &[]);
    let mut c = client(&s).await;
    let mut ids = BTreeSet::new();
    for n in &names {
        ids.insert(create(&mut c, with_params(req(n, 64 * MIB), &[("provisioning", "thick")])).await.volume_id);
    }
    assert_eq!(ids.len(), names.len());
    let images = s.images();
    assert_eq!(images.len(), names.len(), "duplicate or leaked images: {images:?}");
    for id in &ids {
        c.delete_volume(csi::DeleteVolumeRequest { volume_id: id.clone(), ..Default::default() }).await.unwrap();
    }
    assert!(s.images().is_empty(), "leaked: {:?}", s.images());
}

/// CreateVolume calls whose caller gives up (the sidecar's timeout) at
/// random points: each flow still runs to its end, a retry returns the
/// volume, and nothing leaks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_creates_run_to_their_end_and_never_leak() {
    let dir = tempfile::tempdir().unwrap();
    let s = Standalone::start(dir.path(), 2, 1, &[]);
    let c = client(&s).await;
    let names: Vec<String> = (0..50).map(|i| format!("pvc-cancel-{i}")).collect();
    let mut cancelled = 0;
    for n in &names {
        let mut c = c.clone();
        let r = with_params(req(n, 48 * MIB), &[("provisioning", "thick")]);
        // Within a create's usual time (a few ms since group commit), so
        // that most calls are cut short at some point of their flow.
        let wait = Duration::from_millis(rand::random_range(0..15));
        if tokio::time::timeout(wait, c.create_volume(r)).await.is_err() {
            cancelled += 1;
        }
    }
    assert!(cancelled >= 25, "only {cancelled} of 50 calls were cut short; the test proves little");
    // The CO retries each: the answer is the volume, made once.
    let mut c = c.clone();
    let mut ids = BTreeSet::new();
    for n in &names {
        let v = create(&mut c, with_params(req(n, 48 * MIB), &[("provisioning", "thick")])).await;
        ids.insert(v.volume_id);
    }
    assert_eq!(ids.len(), names.len());
    let images: BTreeSet<String> = s.images().into_iter().map(|i| i.split('/').nth(1).unwrap().to_string()).collect();
    assert_eq!(images, ids, "images must be exactly the volumes the retries returned");
    for id in &ids {
        c.delete_volume(csi::DeleteVolumeRequest { volume_id: id.clone(), ..Default::default() }).await.unwrap();
    }
    assert!(s.images().is_empty(), "leaked: {:?}", s.images());
    eprintln!("{cancelled} of 50 creates cancelled by their caller; every retry found its volume; nothing leaked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciler_resolves_stuck_records_and_quarantines_orphaned_images() {
    let dir = tempfile::tempdir().unwrap();
    let names: Vec<String> = (0..16).map(|i| format!("pvc-stuck-{i}")).collect();
    {
        let mut s = Standalone::start(dir.path(), 2, 1, &[]);
        let c = client(&s).await;
        let mut tasks = vec![];
        for n in &names {
            let mut c = c.clone();
            let r = with_params(req(n, 128 * MIB), &[("provisioning", "thick")]);
            tasks.push(tokio::spawn(async move { c.create_volume(r).await }));
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
        s.kill9();
        for t in tasks {
            let _ = t.await;
        }
    }
    // An image no record owns, as a crash between cleanup steps might leave.
    let stray = dir.path().join("node-2/pool/volumes");
    std::fs::create_dir_all(&stray).unwrap();
    write_file(
        &stray.join("vol-stray.json"),
        br#"{"id":"vol-stray","size_bytes":4096,"provisioning":"thin","source":null,"metadata":{},"created_at_ms":0,"state":"Available"}"#,
    );
    write_file(&stray.join("vol-stray.img"), &[0u8; 4096]);

    // No CO retries now: the reconciler alone must resolve everything.
    let s = Standalone::start(dir.path(), 2, 1, &["--stuck-grace", "0.5", "--reconcile-interval", "0.5"]);
    let mut c = client(&s).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let available: BTreeSet<String> = c
        .list_volumes(csi::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .map(|e| e.volume.unwrap().volume_id)
        .collect();
    let on_disk: BTreeSet<String> = s.images().into_iter().map(|i| i.split('/').nth(1).unwrap().to_string()).collect();
    assert_eq!(on_disk, available, "images in the pools must be exactly the Available volumes");
    // The stray image was quarantined, not deleted: whole, with a note of why.
    assert!(!on_disk.contains("vol-stray"));
    let orphaned: Vec<String> = std::fs::read_dir(dir.path().join("node-2/pool/orphaned"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let image =
        orphaned.iter().find(|f| f.ends_with("-vol-stray.img")).unwrap_or_else(|| panic!("vol-stray not quarantined: {orphaned:?}"));
    assert_eq!(std::fs::read(dir.path().join("node-2/pool/orphaned").join(image)).unwrap(), vec![0u8; 4096]);
    let note = orphaned.iter().find(|f| f.ends_with("-vol-stray.note.json")).expect("a note beside the quarantined image");
    let note = std::fs::read_to_string(dir.path().join("node-2/pool/orphaned").join(note)).unwrap();
    assert!(note.contains("no record placed this image"), "{note}");
    for n in &names {
        let v = c.controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: volume_id_for(n) }).await;
        if let Ok(v) = v {
            let cond = v.into_inner().status.unwrap().volume_condition.unwrap();
            assert!(!cond.message.starts_with("Creating"), "{n} still Creating");
        }
    }
}
