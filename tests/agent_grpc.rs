//! The agent API over real gRPC against a real `cinderblock node` process:
//! bad input is refused with the right code and changes nothing; SIGKILL at
//! random moments never leaves the pool torn.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use cinderblock::agent_proto as pb;
use common::*;
use rand::Rng;
use tonic::Code;

const MIB: u64 = 1 << 20;

async fn client(node: &NodeProcess) -> AgentClient {
    node.client().await
}

fn create(id: &str, size: u64, source: Option<pb::create_volume_request::Source>) -> pb::CreateVolumeRequest {
    pb::CreateVolumeRequest { volume_id: id.into(), size_bytes: size, provisioning: 0, source, metadata: Default::default(), remote: None }
}

#[tokio::test]
async fn bad_input_gets_a_clear_error_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let node = NodeProcess::start(&pool, &dir.path().join("csi.sock"), "node-1", &[]);
    let mut c = client(&node).await;
    c.create_volume(create("vol-good", 4 * MIB, None)).await.unwrap();
    c.create_snapshot(pb::CreateSnapshotRequest {
        snapshot_id: "snap-good".into(),
        source_volume_id: "vol-good".into(),
        metadata: Default::default(),
        ..Default::default()
    })
    .await
    .unwrap();
    let before = tree(&pool);
    let long = "v".repeat(129);
    use pb::create_volume_request::Source;

    let cases: Vec<(&str, pb::CreateVolumeRequest, Code)> = vec![
        ("empty id", create("", MIB, None), Code::InvalidArgument),
        ("over-long id", create(&long, MIB, None), Code::InvalidArgument),
        ("parent path id", create("../escape", MIB, None), Code::InvalidArgument),
        ("absolute path id", create("/etc/passwd", MIB, None), Code::InvalidArgument),
        ("nested path id", create("a/b", MIB, None), Code::InvalidArgument),
        ("dot id", create("..", MIB, None), Code::InvalidArgument),
        ("zero size", create("vol-zero", 0, None), Code::InvalidArgument),
        ("size beyond any pool", create("vol-huge", u64::MAX, None), Code::OutOfRange),
        ("size beyond this pool", create("vol-big", 1 << 49, None), Code::OutOfRange),
        ("unknown snapshot", create("vol-s", MIB, Some(Source::SnapshotId("snap-nope".into()))), Code::NotFound),
        ("unknown volume", create("vol-c", MIB, Some(Source::SourceVolumeId("vol-nope".into()))), Code::NotFound),
        ("path-like source", create("vol-p", MIB, Some(Source::SnapshotId("../snapshots/snap-good".into()))), Code::InvalidArgument),
        ("smaller than source", create("vol-small", MIB, Some(Source::SourceVolumeId("vol-good".into()))), Code::OutOfRange),
        ("same id other size", create("vol-good", 8 * MIB, None), Code::AlreadyExists),
        ("bad provisioning", pb::CreateVolumeRequest { provisioning: 42, ..create("vol-prov", MIB, None) }, Code::InvalidArgument),
    ];
    for (what, req, code) in cases {
        let err = c.create_volume(req).await.expect_err(what);
        assert_eq!(err.code(), code, "{what}: {}", err.message());
        assert!(!err.message().is_empty(), "{what}: empty message");
        assert_eq!(tree(&pool), before, "{what} changed the pool");
    }
    let snap = |id: &str, src: &str| pb::CreateSnapshotRequest {
        snapshot_id: id.into(),
        source_volume_id: src.into(),
        metadata: Default::default(),
        ..Default::default()
    };
    for (what, req, code) in [
        ("empty snapshot id", snap("", "vol-good"), Code::InvalidArgument),
        ("path snapshot id", snap("../../x", "vol-good"), Code::InvalidArgument),
        ("empty source", snap("snap-x", ""), Code::InvalidArgument),
        ("unknown source", snap("snap-x", "vol-nope"), Code::NotFound),
        ("snapshot id reused", snap("snap-good", "vol-other"), Code::AlreadyExists),
    ] {
        let err = c.create_snapshot(req).await.expect_err(what);
        assert_eq!(err.code(), code, "{what}: {}", err.message());
        assert_eq!(tree(&pool), before, "{what} changed the pool");
    }
    let err = c.delete_volume(pb::DeleteVolumeRequest { volume_id: "../pool".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c.delete_snapshot(pb::DeleteSnapshotRequest { snapshot_id: "".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c.expand_volume(pb::ExpandVolumeRequest { volume_id: "vol-nope".into(), size_bytes: MIB }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = c.expand_volume(pb::ExpandVolumeRequest { volume_id: "vol-good".into(), size_bytes: 0 }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c.expand_volume(pb::ExpandVolumeRequest { volume_id: "vol-good".into(), size_bytes: u64::MAX }).await.unwrap_err();
    assert_eq!(err.code(), Code::OutOfRange);
    let err = c.get_volume(pb::GetVolumeRequest { volume_id: "vol-nope".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(tree(&pool), before, "a refused call changed the pool");
    // Deleting what is not there is success, and changes nothing either.
    c.delete_volume(pb::DeleteVolumeRequest { volume_id: "vol-nope".into() }).await.unwrap();
    assert_eq!(tree(&pool), before);
}

#[tokio::test]
async fn pool_status_reports_capacity_and_counts() {
    require_root!();
    // A filesystem of its own: the figures must not depend on the host's disk.
    let fs = TestFs::new("ext4", "256M");
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProcess::start(&fs.mount.join("pool"), &dir.path().join("csi.sock"), "node-1", &["--reserved-percentage", "5"]);
    let mut c = client(&node).await;
    c.create_volume(create("vol-1", 10 * MIB, None)).await.unwrap();
    c.create_volume(create("vol-2", 6 * MIB, Some(pb::create_volume_request::Source::SourceVolumeId("vol-1".into())))).await.unwrap_err(); // smaller than its source
    c.create_volume(create("vol-2", 10 * MIB, Some(pb::create_volume_request::Source::SourceVolumeId("vol-1".into())))).await.unwrap();
    let s = c.get_pool_status(pb::GetPoolStatusRequest {}).await.unwrap().into_inner().status.unwrap();
    assert_eq!(s.node_id, "node-1");
    assert_eq!(s.volume_count, 2);
    assert_eq!(s.provisioned_bytes, 20 * MIB);
    assert_eq!(s.reserved_percentage, 5);
    assert!(s.total_bytes > 0 && s.free_bytes <= s.total_bytes);
    assert!(s.max_thick_volume_bytes <= s.free_bytes);
}

/// A node lists its volumes and snapshots in pages by ID (every one once,
/// broken ones in their place) and answers for named volumes only, so no
/// answer grows with the whole pool.
#[tokio::test]
async fn listings_come_in_pages_by_id_and_for_named_volumes() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let sock = dir.path().join("csi.sock");
    let ids = ["vol-a", "vol-b", "vol-c", "vol-d", "vol-e", "vol-f"];
    {
        let node = NodeProcess::start(&pool, &sock, "node-1", &[]);
        let mut c = client(&node).await;
        for id in ids {
            c.create_volume(create(id, MIB, None)).await.unwrap();
        }
        for (snap, of) in [("snap-1", "vol-a"), ("snap-2", "vol-b"), ("snap-3", "vol-a"), ("snap-4", "vol-c")] {
            let req = pb::CreateSnapshotRequest { snapshot_id: snap.into(), source_volume_id: of.into(), ..Default::default() };
            c.create_snapshot(req).await.unwrap();
        }
    }
    // vol-c's record torn (after the journal let go of it): the pool holds
    // it as broken, listed in its place.
    checkpoint_pool_journal(&pool);
    std::fs::write(pool.join("volumes/vol-c.json"), b"{\"id\": ").unwrap();
    let node = NodeProcess::start(&pool, &sock, "node-1", &[]);
    let mut c = client(&node).await;

    let everything: Vec<String> =
        c.list_volumes(pb::ListVolumesRequest::default()).await.unwrap().into_inner().volumes.into_iter().map(|v| v.volume_id).collect();
    let mut sorted = everything.clone();
    sorted.sort();
    assert_eq!(sorted, ids, "the whole listing");
    for size in 1..=7u32 {
        let mut paged: Vec<String> = Vec::new();
        let mut calls = 0;
        loop {
            let after = paged.last().cloned().unwrap_or_default();
            let page = c
                .list_volumes(pb::ListVolumesRequest { after, max_entries: size, ..Default::default() })
                .await
                .unwrap()
                .into_inner()
                .volumes;
            calls += 1;
            assert!(page.len() <= size as usize, "page of {size}: {} entries", page.len());
            let short = page.len() < size as usize;
            paged.extend(page.into_iter().map(|v| v.volume_id));
            if short {
                break;
            }
            assert!(calls <= ids.len() + 1, "paging by {size} does not end");
        }
        assert_eq!(paged, ids, "pages of {size}: each volume once, in ID order, the broken one in its place");
    }

    let named = pb::ListVolumesRequest { volume_ids: vec!["vol-e".into(), "vol-c".into(), "vol-nope".into()], ..Default::default() };
    let mut answered: Vec<(String, i32)> =
        c.list_volumes(named).await.unwrap().into_inner().volumes.into_iter().map(|v| (v.volume_id, v.state)).collect();
    answered.sort();
    assert_eq!(
        answered,
        [("vol-c".to_string(), pb::ImageState::Broken as i32), ("vol-e".to_string(), pb::ImageState::Available as i32)],
        "only the named volumes the pool holds, the broken one as broken"
    );

    let snapshots = |source: &str, after: &str, max_entries: u32| pb::ListSnapshotsRequest {
        source_volume_id: source.into(),
        after: after.into(),
        max_entries,
    };
    let mut paged: Vec<String> = Vec::new();
    loop {
        let after = paged.last().cloned().unwrap_or_default();
        let page = c.list_snapshots(snapshots("", &after, 3)).await.unwrap().into_inner().snapshots;
        let short = page.len() < 3;
        paged.extend(page.into_iter().map(|s| s.snapshot_id));
        if short {
            break;
        }
    }
    assert_eq!(paged, ["snap-1", "snap-2", "snap-3", "snap-4"]);
    let of_a: Vec<String> = c
        .list_snapshots(snapshots("vol-a", "snap-1", 1))
        .await
        .unwrap()
        .into_inner()
        .snapshots
        .into_iter()
        .map(|s| s.snapshot_id)
        .collect();
    assert_eq!(of_a, ["snap-3"], "a page of vol-a's snapshots after snap-1");
}

/// One volume whose record is torn and one whose image is gone: the node
/// plugin still starts, serves the others, and says what is wrong with those two.
#[tokio::test]
async fn a_node_with_broken_volumes_starts_and_serves_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let sock = dir.path().join("csi.sock");
    {
        let node = NodeProcess::start(&pool, &sock, "node-1", &[]);
        let mut c = client(&node).await;
        for id in ["vol-good", "vol-torn", "vol-lost"] {
            c.create_volume(create(id, MIB, None)).await.unwrap();
        }
    }
    checkpoint_pool_journal(&pool);
    std::fs::write(pool.join("volumes/vol-torn.json"), b"{\"id\": ").unwrap();
    std::fs::remove_file(pool.join("volumes/vol-lost.img")).unwrap();

    let node = NodeProcess::start(&pool, &sock, "node-1", &[]);
    let mut c = client(&node).await;
    let listed = c.list_volumes(pb::ListVolumesRequest::default()).await.unwrap().into_inner().volumes;
    let state = |id: &str| listed.iter().find(|v| v.volume_id == id).map(|v| (v.state, v.problem.clone()));
    assert_eq!(state("vol-good").map(|s| s.0), Some(pb::ImageState::Available as i32));
    // The broken ones are listed as broken, with why, so nothing on the node is invisible.
    for (id, says) in [("vol-torn", "cannot be read"), ("vol-lost", "missing")] {
        let (st, problem) = state(id).unwrap_or_else(|| panic!("{id} not listed"));
        assert_eq!(st, pb::ImageState::Broken as i32, "{id}");
        assert!(problem.contains(says), "{id}: {problem}");
    }
    let status = c.get_pool_status(pb::GetPoolStatusRequest {}).await.unwrap().into_inner().status.unwrap();
    assert_eq!(status.broken_count, 2);
    c.create_volume(create("vol-new", MIB, Some(pb::create_volume_request::Source::SourceVolumeId("vol-good".into())))).await.unwrap();
    for (id, says) in [("vol-torn", "cannot be read"), ("vol-lost", "missing")] {
        let e = c.get_volume(pb::GetVolumeRequest { volume_id: id.into() }).await.unwrap_err();
        assert_eq!(e.code(), Code::FailedPrecondition, "{id}: {}", e.message());
        assert!(e.message().contains("broken") && e.message().contains(says), "{id}: {}", e.message());
    }
}

/// What the test knows of one ID: present, absent, or in flight when the
/// node was killed (either is acceptable after restart).
#[derive(Clone, Copy, PartialEq, Debug)]
enum Known {
    Present,
    Absent,
    Unsure,
}

struct Worker {
    id: usize,
    volumes: HashMap<String, Known>,
    snapshots: HashMap<String, Known>,
}

impl Worker {
    async fn run(&mut self, mut c: AgentClient) {
        loop {
            let (kind, name, op) = {
                let mut rng = rand::rng();
                let n = rng.random_range(0..6);
                let kind = rng.random_range(0..11);
                (kind, n, rng.random_range(0..3))
            };
            let vol = format!("vol-w{}-{}", self.id, name);
            let snap = format!("snap-w{}-{}", self.id, name);
            let present_vol = self.volumes.iter().find(|(_, k)| **k == Known::Present).map(|(v, _)| v.clone());
            let present_snap = self.snapshots.iter().find(|(_, k)| **k == Known::Present).map(|(s, _)| s.clone());
            match kind {
                0..=3 => {
                    use pb::create_volume_request::Source;
                    let source = match op {
                        1 => present_snap.map(Source::SnapshotId),
                        2 => present_vol.clone().filter(|v| *v != vol).map(Source::SourceVolumeId),
                        _ => None,
                    };
                    if self.volumes.get(&vol) == Some(&Known::Present) {
                        continue;
                    }
                    self.volumes.insert(vol.clone(), Known::Unsure);
                    // Sources grow up to 4 MiB (below); a copy is never smaller.
                    let size = if source.is_some() { 4 * MIB } else { 2 * MIB };
                    match c.create_volume(create(&vol, size, source)).await {
                        Ok(_) => {
                            self.volumes.insert(vol, Known::Present);
                        }
                        Err(e) if e.code() == Code::Unavailable || e.code() == Code::Unknown || e.code() == Code::Cancelled => return,
                        Err(e) => panic!("create {vol}: {e}"),
                    }
                }
                4..=5 => {
                    let Some(src) = present_vol else { continue };
                    if self.snapshots.get(&snap) == Some(&Known::Present) {
                        continue;
                    }
                    self.snapshots.insert(snap.clone(), Known::Unsure);
                    let req = pb::CreateSnapshotRequest {
                        snapshot_id: snap.clone(),
                        source_volume_id: src,
                        metadata: Default::default(),
                        ..Default::default()
                    };
                    match c.create_snapshot(req).await {
                        Ok(_) => {
                            self.snapshots.insert(snap, Known::Present);
                        }
                        Err(e) if e.code() == Code::Unavailable || e.code() == Code::Unknown || e.code() == Code::Cancelled => return,
                        Err(e) => panic!("snapshot {snap}: {e}"),
                    }
                }
                6..=7 => {
                    self.volumes.insert(vol.clone(), Known::Unsure);
                    match c.delete_volume(pb::DeleteVolumeRequest { volume_id: vol.clone() }).await {
                        Ok(_) => {
                            self.volumes.insert(vol, Known::Absent);
                        }
                        Err(_) => return,
                    }
                }
                10 => {
                    let Some(v) = present_vol else { continue };
                    let size = (2 + u64::from(op as u8)) * MIB;
                    match c.expand_volume(pb::ExpandVolumeRequest { volume_id: v.clone(), size_bytes: size }).await {
                        Ok(r) => assert!(r.into_inner().volume.unwrap().size_bytes >= size, "expand {v}"),
                        Err(e) if e.code() == Code::Unavailable || e.code() == Code::Unknown || e.code() == Code::Cancelled => return,
                        Err(e) => panic!("expand {v}: {e}"),
                    }
                }
                _ => {
                    self.snapshots.insert(snap.clone(), Known::Unsure);
                    match c.delete_snapshot(pb::DeleteSnapshotRequest { snapshot_id: snap.clone() }).await {
                        Ok(_) => {
                            self.snapshots.insert(snap, Known::Absent);
                        }
                        Err(_) => return,
                    }
                }
            }
        }
    }
}

/// The pool's folders hold exactly complete pairs of image and record.
fn assert_pool_consistent(pool: &Path, round: usize) -> (Vec<String>, Vec<String>) {
    let mut ids = (vec![], vec![]);
    for (sub, out) in [("volumes", &mut ids.0), ("snapshots", &mut ids.1)] {
        let files: Vec<String> = tree(&pool.join(sub)).into_keys().collect();
        for f in &files {
            if let Some(id) = f.strip_suffix(".json") {
                let rec: serde_json::Value = serde_json::from_slice(&std::fs::read(pool.join(sub).join(f)).unwrap())
                    .unwrap_or_else(|e| panic!("round {round}: torn record {sub}/{f}: {e}"));
                assert_eq!(rec["state"], "Available", "round {round}: {sub}/{f} left {}", rec["state"]);
                assert!(files.contains(&format!("{id}.img")), "round {round}: record without image {sub}/{f}");
                // An expansion is finished or undone: record and image agree.
                assert!(rec.get("expanding_to").is_none(), "round {round}: {sub}/{f} still expanding");
                let len = std::fs::metadata(pool.join(sub).join(format!("{id}.img"))).unwrap().len();
                assert_eq!(rec["size_bytes"], len, "round {round}: {sub}/{f} and its image disagree on the size");
                out.push(id.to_string());
            } else if let Some(id) = f.strip_suffix(".img") {
                assert!(files.contains(&format!("{id}.json")), "round {round}: image without record {sub}/{f}");
            } else {
                panic!("round {round}: stray file {sub}/{f}");
            }
        }
    }
    let orphaned: Vec<_> = tree(&pool.join("orphaned")).into_keys().collect();
    assert!(orphaned.is_empty(), "round {round}: orphaned {orphaned:?}");
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_never_tears_the_pool() {
    const KILLS: usize = 60;
    const WORKERS: usize = 4;
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    let sock = dir.path().join("csi.sock");
    let mut workers: Vec<Worker> = (0..WORKERS).map(|id| Worker { id, volumes: HashMap::new(), snapshots: HashMap::new() }).collect();
    let mut acknowledged_checks = 0usize;
    let mut interrupted = 0usize;
    for round in 0..KILLS {
        // Each kill must have cut at least one call short: otherwise it
        // proved nothing about crash safety.
        if round > 0 {
            let in_flight = workers.iter().any(|w| w.volumes.values().chain(w.snapshots.values()).any(|k| *k == Known::Unsure));
            assert!(in_flight, "round {round}: the kill landed while no call was in flight");
            interrupted += 1;
        }
        let mut node = NodeProcess::start(&pool, &sock, "node-crash", &[]);
        // After the restart: the folder is consistent and agrees with what was acknowledged.
        let (vols, snaps) = assert_pool_consistent(&pool, round);
        for w in workers.iter_mut() {
            for (known, listed) in [(&mut w.volumes, &vols), (&mut w.snapshots, &snaps)] {
                for (id, k) in known.iter_mut() {
                    let there = listed.contains(id);
                    match *k {
                        Known::Present => assert!(there, "round {round}: acknowledged {id} lost"),
                        Known::Absent => assert!(!there, "round {round}: deleted {id} came back"),
                        Known::Unsure => {}
                    }
                    if *k != Known::Unsure {
                        acknowledged_checks += 1;
                    }
                    *k = if there { Known::Present } else { Known::Absent };
                }
            }
        }
        let c = client(&node).await;
        let mut listed = c.clone();
        let via_api: Vec<String> = listed
            .list_volumes(pb::ListVolumesRequest::default())
            .await
            .unwrap()
            .into_inner()
            .volumes
            .into_iter()
            .map(|v| v.volume_id)
            .collect();
        let mut sorted_vols = vols.clone();
        sorted_vols.sort();
        assert_eq!(via_api, sorted_vols, "round {round}: API and folder disagree");

        let run_for = Duration::from_millis(rand::rng().random_range(10..120));
        let mut tasks = vec![];
        for mut w in workers.drain(..) {
            let c = c.clone();
            tasks.push(tokio::spawn(async move {
                w.run(c).await;
                w
            }));
        }
        tokio::time::sleep(run_for).await;
        node.kill9();
        for t in tasks {
            workers.push(tokio::time::timeout(Duration::from_secs(10), t).await.expect("worker stuck").unwrap());
        }
    }
    let node = NodeProcess::start(&pool, &sock, "node-crash", &[]);
    assert_pool_consistent(&pool, KILLS);
    drop(node);
    assert!(acknowledged_checks > 100, "too little was checked: {acknowledged_checks}");
    eprintln!("{KILLS} kills, each during a call ({interrupted} checked), {acknowledged_checks} acknowledged states checked");
    let _ = BTreeMap::<(), ()>::new();
}
