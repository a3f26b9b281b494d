//! Volume migration through a real `cinderblock standalone` (controller and
//! node agents, mutual TLS, NBD between the agents), on real pools:
//! - a detached thin volume with data at odd offsets and holes, on pools
//!   without reflink (offline migration, through `ctl volume migrate`):
//!   byte-identical on the new node, holes kept, the source image gone, the
//!   record on the new node; bad requests change nothing;
//! - on XFS with reflink, a volume published on its node and written by fio
//!   (with verification headers) through a loop device on its image, as a
//!   local publication does, while live passes copy it; writes stop, the
//!   volume is unpublished, the last pass and the switch follow, and fio's
//!   verification over the new node's image passes for every block;
//! - SIGKILL of the whole process during the copy, between the last pass
//!   and the switch, and after the switch: after a restart the migration
//!   ends, the data verifies, and nothing is left on either node;
//! - a cancel and a delete during the copy, a thick volume, an evacuation,
//!   and the extent-map diff that live passes copy.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cinderblock::admin_proto as admin;
use cinderblock::csi;
use cinderblock::csi::controller_client::ControllerClient;
use common::*;
use tonic::Code;

type Client = ControllerClient<tonic::transport::Channel>;
type Admin = admin::admin_client::AdminClient<tonic::transport::Channel>;

const MIB: u64 = 1 << 20;

fn start(dir: &Path, nodes: u32) -> Standalone {
    Standalone::start(dir, nodes, 1, &["--heartbeat-interval", "0.2"])
}

async fn clients(s: &Standalone) -> (Client, Admin) {
    let ch = csi_channel(&s.endpoint).await;
    (ControllerClient::new(ch.clone()), admin::admin_client::AdminClient::new(ch))
}

async fn create(c: &mut Client, r: csi::CreateVolumeRequest) -> csi::Volume {
    c.create_volume(r).await.expect("CreateVolume").into_inner().volume.unwrap()
}

async fn record(a: &mut Admin, id: &str) -> admin::Volume {
    a.get_volume(admin::GetVolumeRequest { volume: id.into() }).await.expect("admin GetVolume").into_inner().volume.unwrap()
}

async fn migrate(a: &mut Admin, id: &str, to: &str) -> Result<admin::Volume, tonic::Status> {
    let req = admin::MigrateVolumeRequest { volume: id.into(), to_node: to.into(), ..Default::default() };
    a.migrate_volume(req).await.map(|r| r.into_inner().volume.unwrap())
}

/// Wait until the volume's migration has ended, for at most `limit`.
async fn migrated(a: &mut Admin, id: &str, limit: Duration) -> admin::Volume {
    let until = Instant::now() + limit;
    loop {
        let v = record(a, id).await;
        if v.migration.is_none() {
            return v;
        }
        assert!(Instant::now() < until, "the migration did not end in {limit:?}: {:?}", v.migration);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn image(s: &Standalone, node: u32, id: &str) -> PathBuf {
    s.pool(node).join("volumes").join(format!("{id}.img"))
}

fn data_bytes(path: &Path) -> u64 {
    data_segments(path).iter().map(|(a, b)| (b - a) as u64).sum()
}

fn pool_files(s: &Standalone, node: u32) -> Vec<String> {
    common::pool_files(&s.pool(node))
}

fn volume_files(id: &str) -> Vec<String> {
    vec![format!("volumes/{id}.img"), format!("volumes/{id}.json")]
}

fn ctl(endpoint: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_cinderblock")).arg("ctl").args(args).env("CSI_ENDPOINT", endpoint).output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

async fn publish(c: &mut Client, id: &str, node: &str) -> HashMap<String, String> {
    c.controller_publish_volume(csi::ControllerPublishVolumeRequest {
        volume_id: id.into(),
        node_id: node.into(),
        volume_capability: Some(rwo_capability(true)),
        ..Default::default()
    })
    .await
    .expect("ControllerPublishVolume")
    .into_inner()
    .publish_context
}

async fn unpublish(c: &mut Client, id: &str, node: &str) {
    c.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
        volume_id: id.into(),
        node_id: node.into(),
        ..Default::default()
    })
    .await
    .expect("ControllerUnpublishVolume");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detached_volume_moves_whole_and_bad_requests_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path(), 3);
    let (mut c, mut a) = clients(&s).await;
    let size = 64 * MIB;
    let v = create(&mut c, zone_volume_on("data", "node-1", size as i64, true)).await;
    let id = v.volume_id.clone();
    let src = image(&s, 1, &id);
    write_pattern(&src, MIB + 4097, 300_000, 7);
    write_pattern(&src, 40 * MIB + 123, 2 * MIB as usize, 9);
    write_pattern(&src, size - 5000, 5000, 11);
    let (sum, allocated) = (checksum(&src), data_bytes(&src));
    assert!(allocated < size / 8, "thin: {allocated}");

    // Bad requests: an error that says what to fix, and nothing changed.
    let before = (s.images(), pool_files(&s, 1), pool_files(&s, 2));
    let cases: [(&str, &str, Code); 3] =
        [("no-such-volume", "node-2", Code::NotFound), (&id, "node-1", Code::InvalidArgument), (&id, "node-9", Code::InvalidArgument)];
    for (vol, to, code) in cases {
        let e = migrate(&mut a, vol, to).await.unwrap_err();
        assert_eq!(e.code(), code, "{vol} -> {to}: {e:?}");
    }
    // A volume pinned to its node is outside every other node's topology.
    let mut pinned = zone_volume_on("pinned", "node-1", 16 * MIB as i64, true);
    pinned.parameters.clear();
    let pinned = create(&mut c, pinned).await;
    let e = migrate(&mut a, &pinned.volume_id, "node-2").await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("accessible topology") && e.message().contains("allow-topology-change"), "{}", e.message());
    // Published, on a pool without reflink: offline only.
    publish(&mut c, &id, "node-1").await;
    let e = migrate(&mut a, &id, "node-2").await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("offline") && e.message().contains("unpublish"), "{}", e.message());
    unpublish(&mut c, &id, "node-1").await;
    // No room on the target: take most of node-2's capacity with another volume.
    let cap = |node: &str| {
        let segments = [(cinderblock::TOPOLOGY_NODE_KEY.to_string(), node.to_string())].into();
        csi::GetCapacityRequest { accessible_topology: Some(csi::Topology { segments }), ..Default::default() }
    };
    let big_size = 64 << 30;
    let big = create(&mut c, zone_volume_on("big", "node-1", big_size as i64, true)).await;
    let mut gone = vec![big.volume_id.clone(), pinned.volume_id.clone()];
    loop {
        let room = c.get_capacity(cap("node-2")).await.unwrap().into_inner().available_capacity as u64;
        if room < big_size {
            break;
        }
        let filler = (room - big_size / 2).min(512 << 30) / MIB * MIB;
        gone.push(create(&mut c, zone_volume_on(&format!("filler-{}", gone.len()), "node-2", filler as i64, true)).await.volume_id);
    }
    let e = migrate(&mut a, &big.volume_id, "node-2").await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    for gone in &gone {
        c.delete_volume(csi::DeleteVolumeRequest { volume_id: gone.clone(), ..Default::default() }).await.unwrap();
    }
    assert_eq!((s.images(), pool_files(&s, 1), pool_files(&s, 2)), before, "refused requests changed nothing");
    let rec = record(&mut a, &id).await;
    assert_eq!((rec.node.as_str(), rec.migration.is_none()), ("node-1", true));

    // The migration, as a person runs it.
    let (ok, out, err) = ctl(&s.endpoint, &["volume", "migrate", "data", "--to", "node-2", "--wait", "-o", "json"]);
    assert!(ok, "ctl volume migrate: {err}");
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((shown["node"].as_str(), shown["migration"].is_null()), (Some("node-2"), true), "{out}");
    let rec = record(&mut a, &id).await;
    assert_eq!((rec.node.as_str(), rec.phase), ("node-2", admin::Phase::Available as i32));
    let dst = image(&s, 2, &id);
    assert_eq!(std::fs::metadata(&dst).unwrap().len(), size);
    assert_eq!(checksum(&dst), sum, "the migrated volume differs");
    assert_eq!(data_bytes(&dst), allocated, "holes stay holes");
    assert!(!src.exists(), "the source's image is gone");
    assert_eq!(pool_files(&s, 1), Vec::<String>::new(), "node-1 keeps nothing of it");
    assert_eq!(pool_files(&s, 2), volume_files(&id), "node-2 has the volume and nothing else");

    // Once moved, a publication uses the new node: local there, NBD from it elsewhere.
    let ctx = publish(&mut c, &id, "node-2").await;
    assert_eq!(ctx.get(cinderblock::attach::nbd::CONTEXT_TRANSPORT).map(String::as_str), Some("local"), "{ctx:?}");
    unpublish(&mut c, &id, "node-2").await;
    let ctx = publish(&mut c, &id, "node-3").await;
    assert_eq!(ctx.get(cinderblock::attach::nbd::CONTEXT_OWNER).map(String::as_str), Some("node-2"), "{ctx:?}");
    unpublish(&mut c, &id, "node-3").await;
    c.delete_volume(csi::DeleteVolumeRequest { volume_id: id.clone(), ..Default::default() }).await.unwrap();
    assert!(s.images().is_empty(), "{:?}", s.images());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_in_use_is_copied_live_and_switches_once_unpublished() {
    require_root!();
    require_tools!("fio", "losetup", "mkfs.xfs");
    let fs = TestFs::new("xfs-reflink", "3G");
    let data = fs.mount.join("standalone");
    let _leftovers = Leftovers(data.clone());
    let s = start(&data, 2);
    let (mut c, mut a) = clients(&s).await;
    let size = 256 * MIB;
    let span = 96 * MIB;
    let v = create(&mut c, zone_volume_on("busy", "node-1", size as i64, true)).await;
    let id = v.volume_id.clone();
    let src = image(&s, 1, &id);
    write_pattern(&src, 200 * MIB + 4097, 100_000, 5);

    // Published on its own node, written through a loop device on its image.
    publish(&mut c, &id, "node-1").await;
    let dev = Loop::attach(&src);
    let started = migrate(&mut a, &id, "node-2").await.expect("MigrateVolume");
    let m = started.migration.clone().expect("the answer shows the migration");
    assert_eq!((m.from_node.as_str(), m.to_node.as_str(), m.phase.as_str(), m.live), ("node-1", "node-2", "Copying", true));
    // Asking again reports the migration under way; another target is refused.
    let again = migrate(&mut a, &id, "node-2").await.unwrap();
    assert_eq!(again.migration.unwrap().started_ms, m.started_ms);
    assert_eq!(migrate(&mut a, &id, "node-1").await.unwrap_err().code(), Code::FailedPrecondition);

    // Rounds of writes over the same blocks while passes run, each with
    // its own seed, so each overwrites the one before and later passes
    // must carry changes. They go on (at least two) until pass 3 has
    // begun: on a busy machine pass 1 alone can outlast two rounds.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (dev, stop) = (dev.0.clone(), stop.clone());
        tokio::task::spawn_blocking(move || {
            let mut seed = 0;
            while seed < 2 || !stop.load(Ordering::SeqCst) {
                seed += 1;
                fio(&dev, span, seed, false, "24m");
            }
            seed
        })
    };
    let mut passes_seen = 0;
    let deadline = Instant::now() + Duration::from_secs(240);
    while !writer.is_finished() {
        let r = record(&mut a, &id).await;
        let m = r.migration.expect("the migration goes on");
        assert_eq!((r.node.as_str(), m.phase.as_str()), ("node-1", "Copying"), "no switch while published");
        passes_seen = passes_seen.max(m.pass);
        if passes_seen >= 3 || Instant::now() > deadline {
            stop.store(true, Ordering::SeqCst);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let last_seed = writer.await.unwrap();
    assert!(passes_seen >= 3, "live passes followed the writes (pass {passes_seen} seen in 240 s, {last_seed} rounds written)");
    // The pod is gone: writes stop, the node unstages, the CO unpublishes.
    drop(dev);
    let want = checksum(&src);
    unpublish(&mut c, &id, "node-1").await;
    // At once its new pod wants it on node-2 (a drain): the publish waits
    // for the switch (ABORTED until then) and then finds the volume local,
    // rather than being served from node-1 over NBD.
    let req = csi::ControllerPublishVolumeRequest {
        volume_id: id.clone(),
        node_id: "node-2".into(),
        volume_capability: Some(rwo_capability(true)),
        ..Default::default()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let ctx = loop {
        match c.controller_publish_volume(req.clone()).await {
            Ok(r) => break r.into_inner().publish_context,
            Err(e) if e.code() == Code::Aborted && Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(e) => panic!("publish to node-2 after the release: {e:?}"),
        }
    };
    assert!(!ctx.contains_key("cinderblock.dev/nbd-address"), "published over NBD from the old node: {ctx:?}");
    let rec = migrated(&mut a, &id, Duration::from_secs(60)).await;
    assert_eq!(rec.node, "node-2");
    unpublish(&mut c, &id, "node-2").await;
    let dst = image(&s, 2, &id);
    assert_eq!(checksum(&dst), want, "the new node's image differs from the source's last state");
    let verified = fio(dst.to_str().unwrap(), span, last_seed, true, "");
    assert!(
        verified.contains("err= 0") && verified.contains(&format!("io={:.1}MiB", (span / MIB) as f64)),
        "fio read every block back: {verified}"
    );
    assert_eq!(pool_files(&s, 1), Vec::<String>::new(), "node-1 keeps nothing");
    assert_eq!(pool_files(&s, 2), volume_files(&id));
    let log = s.log_text();
    let passes: Vec<&str> = log.lines().filter(|l| l.contains("migration pass copied")).collect();
    eprintln!("{} passes copied ({passes_seen} seen while published):\n{}", passes.len(), passes.join("\n"));
}

/// Where a crash test kills the process.
#[derive(Debug, Clone, Copy)]
enum KillAt {
    /// The target has copied part of the first pass.
    Copying,
    /// The target's image is whole, the record still names the source.
    BeforeSwitch,
    /// The record names the target; the source's leftovers may remain.
    AfterSwitch,
}

fn target_record(s: &Standalone, id: &str) -> serde_json::Value {
    let p = s.pool(2).join("volumes").join(format!("{id}.json"));
    std::fs::read(p).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
}

async fn crash_and_resume(dir: &Path, at: KillAt) {
    let mut s = start(dir, 2);
    let (mut c, mut a) = clients(&s).await;
    let size = 1024 * MIB;
    let v = create(&mut c, zone_volume_on("crash", "node-1", size as i64, true)).await;
    let id = v.volume_id.clone();
    let src = image(&s, 1, &id);
    for i in 0..4u64 {
        write_pattern(&src, i * 256 * MIB + 4097, 64 * MIB as usize, i as u8 + 1);
    }
    let (want, allocated) = (checksum(&src), data_bytes(&src));
    migrate(&mut a, &id, "node-2").await.expect("MigrateVolume");
    let until = Instant::now() + Duration::from_secs(120);
    let seen = loop {
        assert!(Instant::now() < until, "never reached {at:?}");
        let hit = match at {
            KillAt::Copying => target_record(&s, &id)["copy"]["resume_at"].as_u64().unwrap_or(0) > 0,
            KillAt::BeforeSwitch => target_record(&s, &id)["state"] == "Available",
            KillAt::AfterSwitch => record(&mut a, &id).await.node == "node-2",
        };
        if hit {
            s.kill9();
            break format!("{:?}", target_record(&s, &id)["state"]);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let s = start(dir, 2);
    let (mut c, mut a) = clients(&s).await;
    let at_restart = record(&mut a, &id).await;
    if at_restart.migration.as_ref().is_some_and(|m| m.phase == "Switching") {
        // A publication during the last pass and the switch waits for the
        // switch (then uses the new node) or is told to retry; it never
        // gets the source, whose writes the switch would lose.
        let req = csi::ControllerPublishVolumeRequest {
            volume_id: id.clone(),
            node_id: "node-1".into(),
            volume_capability: Some(rwo_capability(true)),
            ..Default::default()
        };
        match c.controller_publish_volume(req).await {
            Ok(r) => {
                let ctx = r.into_inner().publish_context;
                assert_eq!(ctx.get(cinderblock::attach::nbd::CONTEXT_OWNER).map(String::as_str), Some("node-2"), "{ctx:?}");
                eprintln!("{at:?}: a publication during the switch waited for it and got node-2's export");
                unpublish(&mut c, &id, "node-1").await;
            }
            Err(e) => {
                assert_eq!(e.code(), Code::Aborted, "{e:?}");
                eprintln!("{at:?}: a publication during the switch was told to retry");
            }
        }
    }
    eprintln!("{at:?}: killed with the target {seen}, restarted with {:?} on {}", at_restart.migration, at_restart.node);
    let rec = migrated(&mut a, &id, Duration::from_secs(120)).await;
    assert_eq!(rec.node, "node-2", "{at:?}: the migration ended on the new node");
    let dst = image(&s, 2, &id);
    assert_eq!(checksum(&dst), want, "{at:?}: the data differs after the crash");
    assert_eq!(data_bytes(&dst), allocated, "{at:?}");
    assert_eq!(pool_files(&s, 1), Vec::<String>::new(), "{at:?}: node-1 keeps nothing");
    assert_eq!(pool_files(&s, 2), volume_files(&id), "{at:?}: node-2 keeps the volume only");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_killed_at_any_step_ends_after_a_restart() {
    require_root!();
    require_tools!("mkfs.xfs");
    let fs = TestFs::new("xfs-reflink", "4G");
    for (i, at) in [KillAt::Copying, KillAt::BeforeSwitch, KillAt::AfterSwitch].into_iter().enumerate() {
        let dir = fs.mount.join(format!("run-{i}"));
        crash_and_resume(&dir, at).await;
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evacuated_node_takes_nothing_new_and_its_zone_volumes_move_away() {
    let dir = tempfile::tempdir().unwrap();
    let s = Standalone::start(dir.path(), 3, 1, &["--heartbeat-interval", "0.2", "--reconcile-interval", "0.5"]);
    let (mut c, mut a) = clients(&s).await;
    let mut moving = vec![];
    for i in 0..4u8 {
        let v = create(&mut c, zone_volume_on(&format!("zone-{i}"), "node-1", 32 * MIB as i64, true)).await;
        write_pattern(&image(&s, 1, &v.volume_id), u64::from(i) * MIB + 4097, 200_000, i + 1);
        moving.push((v.volume_id.clone(), checksum(&image(&s, 1, &v.volume_id))));
    }
    let mut pinned = zone_volume_on("pinned", "node-1", 16 * MIB as i64, true);
    pinned.parameters.clear();
    let pinned = create(&mut c, pinned).await;

    let (ok, out, err) = ctl(&s.endpoint, &["node", "evacuate", "node-1", "-o", "json"]);
    assert!(ok, "ctl node evacuate: {err}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap()["evacuating"], true, "{out}");
    // Nothing new lands there, asked for or not.
    let e = c.create_volume(zone_volume_on("new-on-1", "node-1", 16 * MIB as i64, true)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    for i in 0..3 {
        let mut anywhere = zone_volume_on(&format!("anywhere-{i}"), "node-1", 16 * MIB as i64, true);
        anywhere.accessibility_requirements = None;
        let v = create(&mut c, anywhere).await;
        assert_ne!(v.volume_context["cinderblock.dev/node"], "node-1");
        c.delete_volume(csi::DeleteVolumeRequest { volume_id: v.volume_id, ..Default::default() }).await.unwrap();
    }
    // The zone volumes move, at most two at a time; the pinned one stays.
    let until = Instant::now() + Duration::from_secs(120);
    let mut most_at_once = 0;
    loop {
        let mut at_once = 0;
        let mut left = 0;
        for (id, _) in &moving {
            let r = record(&mut a, id).await;
            at_once += usize::from(r.migration.as_ref().is_some_and(|m| m.evacuation && m.phase != "CleaningUp"));
            left += usize::from(r.node == "node-1" || r.migration.is_some());
        }
        most_at_once = most_at_once.max(at_once);
        if left == 0 {
            break;
        }
        assert!(Instant::now() < until, "{left} volumes still on node-1");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!((1..=2).contains(&most_at_once), "{most_at_once} migrations at once");
    for (id, sum) in &moving {
        let r = record(&mut a, id).await;
        assert_ne!(r.node, "node-1");
        let node: u32 = r.node.trim_start_matches("node-").parse().unwrap();
        assert_eq!(checksum(&image(&s, node, id)), *sum, "{id} moved whole");
    }
    assert_eq!(record(&mut a, &pinned.volume_id).await.node, "node-1", "a volume pinned to its node stays");
    assert_eq!(pool_files(&s, 1), volume_files(&pinned.volume_id), "node-1 keeps only the pinned volume");

    let (ok, _, err) = ctl(&s.endpoint, &["node", "evacuate", "node-1", "--stop"]);
    assert!(ok, "ctl node evacuate --stop: {err}");
    let back = create(&mut c, zone_volume_on("new-on-1", "node-1", 16 * MIB as i64, true)).await;
    assert_eq!(back.volume_context["cinderblock.dev/node"], "node-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_or_deleted_migration_leaves_nothing_on_the_target() {
    require_root!();
    require_tools!("mkfs.xfs");
    let fs = TestFs::new("xfs-reflink", "2G");
    let s = start(&fs.mount.join("standalone"), 2);
    let (mut c, mut a) = clients(&s).await;
    let v = create(&mut c, zone_volume_on("stays", "node-1", 128 * MIB as i64, true)).await;
    let id = v.volume_id.clone();
    write_pattern(&image(&s, 1, &id), 3 * MIB + 1, 500_000, 3);
    let want = checksum(&image(&s, 1, &id));
    // Published, so the migration keeps copying passes and never switches.
    publish(&mut c, &id, "node-1").await;
    let wait_for_pass = |a: &mut Admin| {
        let mut a = a.clone();
        let id = id.clone();
        async move {
            let until = Instant::now() + Duration::from_secs(60);
            while record(&mut a, &id).await.migration.is_none_or(|m| m.pass < 2) {
                assert!(Instant::now() < until, "no second pass");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    migrate(&mut a, &id, "node-2").await.unwrap();
    wait_for_pass(&mut a).await;
    let (ok, out, err) = ctl(&s.endpoint, &["volume", "migrate", "stays", "--cancel", "--wait", "-o", "json"]);
    assert!(ok, "ctl volume migrate --cancel: {err}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap()["node"], "node-1", "{out}");
    assert_eq!(pool_files(&s, 2), Vec::<String>::new(), "the target keeps nothing");
    assert_eq!(pool_files(&s, 1), volume_files(&id), "the source keeps the volume only");
    assert_eq!(checksum(&image(&s, 1, &id)), want);
    let e = a.migrate_volume(admin::MigrateVolumeRequest { volume: id.clone(), cancel: true, ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "nothing to cancel: {e:?}");

    // A DeleteVolume during the copy cancels it first (ABORTED: retry).
    migrate(&mut a, &id, "node-2").await.unwrap();
    wait_for_pass(&mut a).await;
    let delete = |c: &mut Client| {
        let mut c = c.clone();
        let id = id.clone();
        async move { c.delete_volume(csi::DeleteVolumeRequest { volume_id: id, ..Default::default() }).await }
    };
    assert_eq!(delete(&mut c).await.unwrap_err().code(), Code::Aborted);
    migrated(&mut a, &id, Duration::from_secs(60)).await;
    assert_eq!(pool_files(&s, 2), Vec::<String>::new(), "the target keeps nothing");
    assert_eq!(delete(&mut c).await.unwrap_err().code(), Code::FailedPrecondition, "still published");
    unpublish(&mut c, &id, "node-1").await;
    delete(&mut c).await.expect("DeleteVolume");
    assert!(s.images().is_empty(), "{:?}", s.images());
    assert_eq!((pool_files(&s, 1), pool_files(&s, 2)), (vec![], vec![]));
}

/// What a live pass copies: the ranges whose blocks differ between two
/// reflinked snapshots of one file, from the extent maps alone.
#[test]
fn the_changes_between_two_reflinked_snapshots_are_the_writes_between_them() {
    require_root!();
    require_tools!("mkfs.xfs");
    use cinderblock::volume::changes::{changed_ranges, Changed};
    use std::os::unix::fs::FileExt;
    let fs = TestFs::new("xfs-reflink", "512M");
    let vol_path = fs.mount.join("vol");
    let vol = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&vol_path).unwrap();
    vol.set_len(16 * MIB).unwrap();
    vol.write_all_at(&vec![7u8; 8 * MIB as usize], 0).unwrap();
    vol.write_all_at(&vec![9u8; 4 * MIB as usize], 12 * MIB).unwrap();
    vol.sync_all().unwrap();
    let snapshot = |name: &str| {
        let f = std::fs::File::create(fs.mount.join(name)).unwrap();
        cinderblock::volume::copy::reflink(&vol, &f).unwrap();
        f.sync_all().unwrap();
        std::fs::File::open(fs.mount.join(name)).unwrap()
    };
    let first = snapshot("first");
    assert_eq!(changed_ranges(&first, &snapshot("same")).unwrap(), vec![], "nothing written, nothing changed");
    // Between the two snapshots: a block rewritten, a few bytes inside
    // another, a range punched, data where there was a hole.
    vol.write_all_at(&[1u8; 4096], MIB).unwrap();
    vol.write_all_at(b"0123456789", 5 * MIB + 100).unwrap();
    rustix::fs::fallocate(&vol, rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE, 3 * MIB, 64 << 10).unwrap();
    vol.write_all_at(&[2u8; 8192], 9 * MIB).unwrap();
    vol.sync_all().unwrap();
    let second = snapshot("second");
    let c = |offset, len, zero| Changed { offset, len, zero };
    let got = changed_ranges(&first, &second).unwrap();
    eprintln!("changed ranges: {got:?}");
    assert_eq!(got, vec![c(MIB, 4096, false), c(3 * MIB, 64 << 10, true), c(5 * MIB, 4096, false), c(9 * MIB, 8192, false)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thick_volume_stays_thick_on_its_new_node() {
    require_root!();
    require_tools!("mkfs.xfs");
    let fs = TestFs::new("xfs-reflink", "1G");
    let s = start(&fs.mount.join("standalone"), 2);
    let (mut c, mut a) = clients(&s).await;
    let mut r = zone_volume_on("thick", "node-1", 64 * MIB as i64, true);
    r.parameters.insert("provisioning".into(), "thick".into());
    let id = create(&mut c, r).await.volume_id;
    write_pattern(&image(&s, 1, &id), 7 * MIB + 3, 123_457, 4);
    let want = checksum(&image(&s, 1, &id));
    let started = migrate(&mut a, &id, "node-2").await.unwrap();
    assert!(started.migration.unwrap().live, "XFS with reflink: live passes");
    let rec = migrated(&mut a, &id, Duration::from_secs(60)).await;
    assert_eq!((rec.node.as_str(), rec.provisioning.as_str()), ("node-2", "thick"));
    let dst = image(&s, 2, &id);
    assert_eq!(checksum(&dst), want);
    assert!(allocated(&dst) >= 64 * MIB, "thick on the new node too: {} bytes allocated", allocated(&dst));
    assert_eq!((pool_files(&s, 1), pool_files(&s, 2)), (vec![], volume_files(&id)));
}
