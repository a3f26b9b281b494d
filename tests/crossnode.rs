//! Cross-node restore and clone through a real `cinderblock standalone`
//! (controller and two node agents, mutual TLS, NBD between the agents):
//! a thin volume with data at odd offsets and holes, snapshotted on node-1,
//! restored and cloned onto node-2 (node-1 excluded by the requisite
//! topology): the new images are byte-identical, only the allocated bytes
//! are copied (metric and record), holes stay holes, and the copy's export
//! is gone afterwards. `crossNodeSources: "false"` refuses instead and
//! leaves nothing; a delete during a copy cancels it and cleans up; a copy
//! interrupted by killing the whole process resumes where it was.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cinderblock::admin_proto as admin;
use cinderblock::controller::records::volume_id_for;
use cinderblock::csi;
use cinderblock::csi::controller_client::ControllerClient;
use common::*;
use tonic::Code;

type Client = ControllerClient<tonic::transport::Channel>;

const MIB: u64 = 1 << 20;
const BIG: u64 = 2048 * MIB;

fn req(name: &str, size: u64, node: &str, params: &[(&str, &str)]) -> csi::CreateVolumeRequest {
    let segments = [(cinderblock::TOPOLOGY_NODE_KEY.to_string(), node.to_string())].into();
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange { required_bytes: size as i64, limit_bytes: 0 }),
        volume_capabilities: vec![rwo_capability(false)],
        parameters: params.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<HashMap<_, _>>(),
        accessibility_requirements: Some(csi::TopologyRequirement { requisite: vec![csi::Topology { segments }], preferred: vec![] }),
        ..Default::default()
    }
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

fn node_of(v: &csi::Volume) -> String {
    v.volume_context["cinderblock.dev/node"].clone()
}

fn volume_image(s: &Standalone, node: u32, id: &str) -> PathBuf {
    s.pool(node).join("volumes").join(format!("{id}.img"))
}

/// Bytes the file has allocated, by its data segments (what BLOCK_STATUS reports).
fn data_bytes(path: &Path) -> u64 {
    data_segments(path).iter().map(|(a, b)| (b - a) as u64).sum()
}

/// Files the node-1 pool keeps for exports (one record per export).
fn export_records(s: &Standalone, node: u32) -> Vec<String> {
    match std::fs::read_dir(s.pool(node).join("exports")) {
        Ok(d) => d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect(),
        Err(_) => vec![],
    }
}

/// Everything a pool holds under volumes/ for `id`.
fn files_of(s: &Standalone, node: u32, id: &str) -> Vec<String> {
    std::fs::read_dir(s.pool(node).join("volumes"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(id))
        .collect()
}

/// `cinderblock_volume_copy_bytes_total{node=...}` from the process's /metrics (0 when absent).
fn copied_metric(metrics_addr: &str, node: &str) -> u64 {
    let text = http_get(metrics_addr, "/metrics");
    let prefix = format!("cinderblock_volume_copy_bytes_total{{node=\"{node}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&prefix).map(|v| v.trim().parse::<f64>().unwrap() as u64)).unwrap_or(0)
}

async fn admin_volume(s: &Standalone, id: &str) -> Result<admin::Volume, tonic::Status> {
    let mut a = admin::admin_client::AdminClient::new(csi_channel(&s.endpoint).await);
    a.get_volume(admin::GetVolumeRequest { volume: id.into() }).await.map(|r| r.into_inner().volume.unwrap())
}

async fn create(c: &mut Client, r: csi::CreateVolumeRequest) -> csi::Volume {
    c.create_volume(r).await.expect("CreateVolume").into_inner().volume.unwrap()
}

async fn delete(c: &mut Client, id: &str) {
    c.delete_volume(csi::DeleteVolumeRequest { volume_id: id.to_string(), ..Default::default() }).await.unwrap();
}

async fn snapshot(c: &mut Client, name: &str, source: &str) -> String {
    c.create_snapshot(csi::CreateSnapshotRequest { name: name.into(), source_volume_id: source.into(), ..Default::default() })
        .await
        .expect("CreateSnapshot")
        .into_inner()
        .snapshot
        .unwrap()
        .snapshot_id
}

fn start(dir: &Path, port: u16) -> Standalone {
    Standalone::start(dir, 2, 1, &["--metrics-addr", &format!("127.0.0.1:{port}"), "--heartbeat-interval", "0.2"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_and_clone_on_another_node_copy_only_the_allocated_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let s = start(dir.path(), port);
    let mut c = ControllerClient::new(csi_channel(&s.endpoint).await);
    let size = 64 * MIB;

    let src = create(&mut c, req("src", size, "node-1", &[])).await;
    assert_eq!(node_of(&src), "node-1");
    let src_img = volume_image(&s, 1, &src.volume_id);
    // Data at odd offsets, holes between and around.
    write_pattern(&src_img, MIB + 4097, 300_000, 7);
    write_pattern(&src_img, 40 * MIB + 123, 2 * MIB as usize, 9);
    write_pattern(&src_img, size - 5000, 5000, 11);
    let snap = snapshot(&mut c, "snap", &src.volume_id).await;
    let snap_img = s.pool(1).join("snapshots").join(format!("{snap}.img"));
    let allocated = data_bytes(&snap_img);
    assert!(allocated > 0 && allocated < size / 8, "the source is thin: {allocated} of {size} bytes allocated");
    assert_eq!(copied_metric(&metrics, "node-2"), 0);

    // Restore onto node-2: node-1 is not allowed by the topology.
    let restored = create(&mut c, from_snapshot(req("restored", size, "node-2", &[]), &snap)).await;
    assert_eq!(node_of(&restored), "node-2");
    let img = volume_image(&s, 2, &restored.volume_id);
    assert_eq!(std::fs::metadata(&img).unwrap().len(), size);
    assert_eq!(checksum(&img), checksum(&snap_img), "the restored volume differs from its snapshot");
    assert_eq!(data_bytes(&img), allocated, "holes stay holes: {:?} vs {:?}", data_segments(&img), data_segments(&snap_img));
    assert_eq!(copied_metric(&metrics, "node-2"), allocated, "the copy read the allocated bytes only, not the size");
    let rec = admin_volume(&s, &restored.volume_id).await.unwrap();
    assert_eq!(
        (rec.copy_source_node.as_str(), rec.copied_bytes, rec.copy_total_bytes, rec.copy_finished),
        ("node-1", allocated, allocated, true)
    );
    assert!(export_records(&s, 1).is_empty(), "the copy's export is gone: {:?}", export_records(&s, 1));
    // A repeat answers the same volume and copies nothing more.
    let again = create(&mut c, from_snapshot(req("restored", size, "node-2", &[]), &snap)).await;
    assert_eq!(again.volume_id, restored.volume_id);
    assert_eq!(copied_metric(&metrics, "node-2"), allocated);

    // A clone of the volume onto node-2, larger than its source.
    let clone = create(&mut c, clone_of(req("clone", size + 16 * MIB, "node-2", &[]), &src.volume_id)).await;
    assert_eq!(node_of(&clone), "node-2");
    let clone_img = volume_image(&s, 2, &clone.volume_id);
    assert_eq!(std::fs::metadata(&clone_img).unwrap().len(), size + 16 * MIB);
    let mut want = std::fs::read(&src_img).unwrap();
    want.resize((size + 16 * MIB) as usize, 0);
    assert!(std::fs::read(&clone_img).unwrap() == want, "the clone differs from its source");
    assert_eq!(data_bytes(&clone_img), data_bytes(&src_img));
    assert_eq!(copied_metric(&metrics, "node-2"), allocated + data_bytes(&src_img));
    assert!(export_records(&s, 1).is_empty());

    // Where the source's node fits, it is used (no copy).
    let mut local = req("local", size, "node-1", &[]);
    local.accessibility_requirements = None;
    let local = create(&mut c, from_snapshot(local, &snap)).await;
    assert_eq!(node_of(&local), "node-1");
    assert_eq!(copied_metric(&metrics, "node-1"), 0);
    assert_eq!(admin_volume(&s, &local.volume_id).await.unwrap().copy_source_node, "");

    // The copies are ordinary volumes: they and the source go.
    for v in [&restored.volume_id, &clone.volume_id, &local.volume_id] {
        delete(&mut c, v).await;
    }
    c.delete_snapshot(csi::DeleteSnapshotRequest { snapshot_id: snap, ..Default::default() }).await.unwrap();
    delete(&mut c, &src.volume_id).await;
    assert!(s.images().is_empty(), "{:?}", s.images());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_node_sources_false_refuses_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), free_port());
    let mut c = ControllerClient::new(csi_channel(&s.endpoint).await);
    let src = create(&mut c, req("src", 16 * MIB, "node-1", &[])).await;
    write_pattern(&volume_image(&s, 1, &src.volume_id), 4097, 10_000, 3);
    let snap = snapshot(&mut c, "snap", &src.volume_id).await;

    let forbid = [("crossNodeSources", "false")];
    for r in [
        from_snapshot(req("no-copy", 16 * MIB, "node-2", &forbid), &snap),
        clone_of(req("no-clone", 16 * MIB, "node-2", &forbid), &src.volume_id),
    ] {
        let name = r.name.clone();
        let e = c.create_volume(r).await.unwrap_err();
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        assert!(e.message().contains("crossNodeSources"), "the message says why: {}", e.message());
        let id = volume_id_for(&name);
        assert!(files_of(&s, 2, &id).is_empty() && files_of(&s, 1, &id).is_empty(), "nothing made for {name}");
    }
    assert!(export_records(&s, 1).is_empty(), "no export: {:?}", export_records(&s, 1));
    // On the source's node it is allowed, of course.
    let ok = create(&mut c, from_snapshot(req("here", 16 * MIB, "node-1", &forbid), &snap)).await;
    assert_eq!(node_of(&ok), "node-1");

    // A bad value is the caller's error, and changes nothing.
    let before = s.images();
    let e = c.create_volume(from_snapshot(req("bad", 16 * MIB, "node-2", &[("crossNodeSources", "no")]), &snap)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("crossNodeSources"), "{}", e.message());
    assert_eq!(s.images(), before);
    assert!(admin_volume(&s, "bad").await.is_err(), "no record for a refused request");
}

/// A 2 GiB thin volume holding 512 MiB in 8 pieces at odd offsets: a copy
/// that takes long enough to be interrupted.
fn big_source(s: &Standalone, c_src: &str) -> (PathBuf, u64) {
    let img = volume_image(s, 1, c_src);
    for i in 0..8u64 {
        write_pattern(&img, i * 256 * MIB + 4097, 64 * MIB as usize, i as u8);
    }
    let allocated = data_bytes(&img);
    (img, allocated)
}

/// Wait until `what` holds, for at most a minute.
async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_volume_during_its_copy_cancels_and_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), free_port());
    let mut c = ControllerClient::new(csi_channel(&s.endpoint).await);
    let src = create(&mut c, req("src", BIG, "node-1", &[])).await;
    big_source(&s, &src.volume_id);
    let id = volume_id_for("copy");
    let partial = s.pool(2).join("volumes").join(format!("{id}.img.partial"));
    let mut c2 = c.clone();
    let src_id = src.volume_id.clone();
    let create = tokio::spawn(async move { c2.create_volume(clone_of(req("copy", BIG, "node-2", &[]), &src_id)).await });
    wait_for("the copy to start writing", || partial.exists() && allocated(&partial) > 0).await;
    assert_eq!(export_records(&s, 1).len(), 1, "the source is exported for the copy");

    c.delete_volume(csi::DeleteVolumeRequest { volume_id: id.clone(), ..Default::default() }).await.expect("a delete during the copy");
    let e = create.await.unwrap().expect_err("the create whose volume was deleted fails");
    assert_eq!(e.code(), Code::Aborted, "{e:?}");
    assert!(files_of(&s, 2, &id).is_empty(), "node-2 keeps nothing of the copy: {:?}", files_of(&s, 2, &id));
    assert!(export_records(&s, 1).is_empty(), "the source's export is gone: {:?}", export_records(&s, 1));
    assert_eq!(admin_volume(&s, &id).await.unwrap_err().code(), Code::NotFound);
    // Nothing holds the source any more.
    delete(&mut c, &src.volume_id).await;
    assert!(s.images().is_empty(), "{:?}", s.images());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_interrupted_by_a_crash_resumes_where_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut s = start(dir.path(), port);
    let mut c = ControllerClient::new(csi_channel(&s.endpoint).await);
    let src = create(&mut c, req("src", BIG, "node-1", &[])).await;
    let (src_img, allocated) = big_source(&s, &src.volume_id);
    let snap = snapshot(&mut c, "snap", &src.volume_id).await;
    let id = volume_id_for("copy");
    let record = s.pool(2).join("volumes").join(format!("{id}.json"));
    let mut c2 = c.clone();
    let snap2 = snap.clone();
    let create = tokio::spawn(async move { c2.create_volume(from_snapshot(req("copy", BIG, "node-2", &[]), &snap2)).await });
    let resume_at = |p: &Path| -> u64 {
        let v: serde_json::Value = std::fs::read(p).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        v["copy"]["resume_at"].as_u64().unwrap_or(0)
    };
    wait_for("the copy to note durable progress", || resume_at(&record) > 0).await;
    // Controller and both agents die at once, mid-copy.
    s.kill9();
    let _ = create.await;
    let durable = resume_at(&record);
    assert!(durable > 0 && durable < BIG, "stopped mid-copy at {durable}");

    let s = start(dir.path(), port);
    let mut c = ControllerClient::new(csi_channel(&s.endpoint).await);
    // The CO retries the create: it finishes the copy that resumed on node-2.
    let v = match c.create_volume(from_snapshot(req("copy", BIG, "node-2", &[]), &snap)).await {
        Ok(v) => v.into_inner().volume.unwrap(),
        Err(e) => {
            let log = s.log_text();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            panic!("the retried create: {e:?}\nlast lines of the log:\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
    };
    assert_eq!((v.volume_id.as_str(), node_of(&v).as_str()), (id.as_str(), "node-2"));
    let img = volume_image(&s, 2, &id);
    assert_eq!(checksum(&img), checksum(&src_img), "the resumed copy differs from its source");
    assert_eq!(data_bytes(&img), allocated);
    let after = copied_metric(&format!("127.0.0.1:{port}"), "node-2");
    assert!(after < allocated, "the copy went on from where it was ({after} of {allocated} bytes copied after the restart)");
    let rec = admin_volume(&s, &id).await.unwrap();
    assert_eq!((rec.copied_bytes, rec.copy_total_bytes, rec.copy_finished), (allocated, allocated, true));
    assert!(export_records(&s, 1).is_empty(), "{:?}", export_records(&s, 1));
}
