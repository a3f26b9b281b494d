//! Group snapshots through the CSI GroupController of a real `cinderblock
//! standalone` (two nodes, real agents over mutual TLS): three ext4 volumes,
//! two on node-1 (staged and published through the CSI Node service) and
//! one on node-2 (mounted from its image on this host, as node-2's own
//! plugin would), while a writer appends numbered records across them,
//! record i to volume i % 3 only once record i - 1 is durable. The group is
//! cut mid-run; each member is restored to a new volume, and together they
//! must hold records 0..n with none missing: no record k present while an
//! earlier one is absent. Then the CSI error cases and the deletion.
//! A second test stages two members of node-2 on node-1 over NBD (FUSE
//! engine), so their filesystems are mounted on their consumer, and
//! checks that node-1 freezes them there for the group (and for a single
//! snapshot of one of them), with a writer that syncs only now and then.
//! Needs root (loop devices, mkfs, mounts; FUSE for the second).

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cinderblock::csi;
use cinderblock::csi::controller_client::ControllerClient;
use cinderblock::csi::group_controller_client::GroupControllerClient;
use cinderblock::csi::identity_client::IdentityClient;
use cinderblock::csi::node_client::NodeClient;
use common::*;
use tonic::Code;

const MIB: i64 = 1 << 20;

/// A thread appending "i\n" to `records` in the folder of volume i % 3,
/// then the next; every `sync_every`-th record is made durable before the
/// next is written (1: each of them).
struct Writer {
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<()>,
}

impl Writer {
    fn start(mounts: &[PathBuf], sync_every: u64) -> Writer {
        let (stop, done) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let mut files: Vec<std::fs::File> =
            mounts.iter().map(|d| std::fs::OpenOptions::new().create(true).append(true).open(d.join("records")).unwrap()).collect();
        assert_eq!(files.len(), 3);
        let (stopping, counting) = (stop.clone(), done.clone());
        let thread = std::thread::spawn(move || {
            let mut i = 0u64;
            while !stopping.load(Ordering::SeqCst) {
                let f = &mut files[(i % 3) as usize];
                f.write_all(format!("{i}\n").as_bytes()).unwrap();
                if i.is_multiple_of(sync_every) {
                    f.sync_data().unwrap();
                }
                i += 1;
                counting.store(i, Ordering::SeqCst);
                if i.is_multiple_of(64) {
                    // Unsynced records would otherwise pile up by the million.
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        });
        Writer { stop, done, thread }
    }

    /// Records written so far.
    fn written(&self) -> u64 {
        self.done.load(Ordering::SeqCst)
    }

    async fn until(&self, records: u64) {
        while self.written() < records {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the writer; the records it wrote in all.
    fn stop(self) -> u64 {
        let Writer { stop, done, thread } = self;
        stop.store(true, Ordering::SeqCst);
        thread.join().unwrap();
        done.load(Ordering::SeqCst)
    }
}

/// The records in an image's `records` file, mounted read-only (a
/// snapshot cut frozen needs no journal replay).
fn records_in(image: &Path) -> Vec<u64> {
    let m = tempfile::tempdir().unwrap();
    run("mount", &["-o", "loop,ro", image.to_str().unwrap(), m.path().to_str().unwrap()]);
    let text = std::fs::read_to_string(m.path().join("records"));
    run("umount", &[m.path().to_str().unwrap()]);
    text.unwrap().lines().map(|l| l.parse().unwrap_or_else(|_| panic!("a torn record {l:?} in {}", image.display()))).collect()
}

/// Restore a snapshot to a new volume `name` and read its records.
async fn restored_records(
    ctl: &mut ControllerClient<tonic::transport::Channel>,
    s: &Standalone,
    name: &str,
    snapshot_id: &str,
) -> Vec<u64> {
    let restore = csi::CreateVolumeRequest {
        name: name.to_string(),
        volume_capabilities: vec![rwo_capability(false)],
        volume_content_source: Some(csi::VolumeContentSource {
            r#type: Some(csi::volume_content_source::Type::Snapshot(csi::volume_content_source::SnapshotSource {
                snapshot_id: snapshot_id.to_string(),
            })),
        }),
        ..Default::default()
    };
    let r = ctl.create_volume(restore).await.unwrap().into_inner().volume.unwrap();
    let on = &r.volume_context["cinderblock.dev/node"];
    let n: u32 = on.trim_start_matches("node-").parse().unwrap();
    records_in(&s.pool(n).join("volumes").join(format!("{}.img", r.volume_id)))
}

/// Restore every member of `made` and read its records: each holds its
/// own records in order, and together they hold 0..n with none missing.
/// Returns n.
async fn members_hold_one_prefix(
    ctl: &mut ControllerClient<tonic::transport::Channel>,
    s: &Standalone,
    made: &csi::VolumeGroupSnapshot,
    sources: &[String],
) -> u64 {
    let mut seen = BTreeSet::new();
    for snap in &made.snapshots {
        let slot = sources.iter().position(|v| *v == snap.source_volume_id).unwrap() as u64;
        let records = restored_records(ctl, s, &format!("{}-restore-{slot}", made.group_snapshot_id), &snap.snapshot_id).await;
        assert!(records.windows(2).all(|p| p[0] + 3 == p[1]), "volume {slot} holds {records:?}");
        assert!(records.iter().all(|r| r % 3 == slot));
        eprintln!("member {slot} ({}) holds {} records, last {:?}", snap.source_volume_id, records.len(), records.last());
        seen.extend(records);
    }
    let n = seen.len() as u64;
    assert_eq!(seen, (0..n).collect::<BTreeSet<_>>(), "the members are not a consistent prefix: {} records, highest {:?}", n, seen.last());
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_snapshot_across_two_nodes_holds_a_consistent_prefix() {
    require_root!();
    require_tools!("mkfs.ext4", "mount");
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = Leftovers(dir.path().to_path_buf());
    let s = Standalone::start(dir.path(), 2, 1, &[]);
    let ch = csi_channel(&s.endpoint).await;
    let mut ctl = ControllerClient::new(ch.clone());
    let mut group = GroupControllerClient::new(ch.clone());
    let mut node = NodeClient::new(ch.clone());

    // The plugin says it serves group snapshots.
    let caps = IdentityClient::new(ch.clone()).get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {}).await.unwrap().into_inner();
    let group_service = csi::plugin_capability::service::Type::GroupControllerService as i32;
    assert!(
        caps.capabilities.iter().any(|c| matches!(&c.r#type, Some(csi::plugin_capability::Type::Service(s)) if s.r#type == group_service)),
        "{caps:?}"
    );
    let gcaps = group.group_controller_get_capabilities(csi::GroupControllerGetCapabilitiesRequest {}).await.unwrap().into_inner();
    assert_eq!(gcaps.capabilities.len(), 1);

    // Three volumes: a, b on node-1, c on node-2.
    let mut vols = vec![];
    for (name, on) in [("grp-a", "node-1"), ("grp-b", "node-1"), ("grp-c", "node-2")] {
        let v = ctl.create_volume(zone_volume_on(name, on, 64 * MIB, false)).await.unwrap().into_inner().volume.unwrap();
        assert_eq!(v.volume_context["cinderblock.dev/node"], on);
        vols.push(v);
    }
    let mut mounts = vec![];
    for v in &vols[..2] {
        let publish = csi::ControllerPublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            node_id: "node-1".into(),
            volume_capability: Some(rwo_capability(false)),
            ..Default::default()
        };
        let ctx = ctl.controller_publish_volume(publish).await.unwrap().into_inner().publish_context;
        let staging = dir.path().join("kubelet").join(format!("{}-staging", v.volume_id));
        let target = dir.path().join("kubelet").join(format!("{}-target", v.volume_id));
        stage_and_publish_rwo(&mut node, &v.volume_id, &staging, &target, false, &ctx).await;
        mounts.push(target);
    }
    // node-2's volume, mounted from its image through a loop device as
    // node-2's plugin would stage it there.
    let c_image = s.pool(2).join("volumes").join(format!("{}.img", vols[2].volume_id));
    run("mkfs.ext4", &["-q", "-b", "4096", c_image.to_str().unwrap()]);
    let c_mount = dir.path().join("node-2-mount");
    std::fs::create_dir_all(&c_mount).unwrap();
    run("mount", &["-o", "loop", c_image.to_str().unwrap(), c_mount.to_str().unwrap()]);
    mounts.push(c_mount.clone());

    let sources: Vec<String> = vols.iter().map(|v| v.volume_id.clone()).collect();

    // A node that cannot freeze (node-2's filesystem is frozen already, by
    // someone else): the group fails with ABORTED, node-1's members are
    // thawed again at once, and no member image is left anywhere.
    run("fsfreeze", &["-f", c_mount.to_str().unwrap()]);
    let failing =
        csi::CreateVolumeGroupSnapshotRequest { name: "grp-retry".into(), source_volume_ids: sources.clone(), ..Default::default() };
    let e = group.create_volume_group_snapshot(failing.clone()).await.unwrap_err();
    run("fsfreeze", &["-u", c_mount.to_str().unwrap()]);
    assert_eq!(e.code(), Code::Aborted, "{e:?}");
    assert!(e.message().contains("node-2"), "{}", e.message());
    for m in &mounts[..2] {
        let probe = m.join("probe");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut f = std::fs::File::create(&probe).unwrap();
            f.write_all(b"x").unwrap();
            f.sync_all().unwrap();
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(10)).unwrap_or_else(|_| panic!("{} stayed frozen after the failed group", m.display()));
    }
    assert!(!s.images().iter().any(|i| i.contains("/snap-")), "member images left: {:?}", s.images());
    // The CO's retry, once the node can freeze, makes the group.
    let retried = group.create_volume_group_snapshot(failing).await.unwrap().into_inner().group_snapshot.unwrap();
    assert!(retried.ready_to_use);
    let del = csi::DeleteVolumeGroupSnapshotRequest { group_snapshot_id: retried.group_snapshot_id.clone(), ..Default::default() };
    group.delete_volume_group_snapshot(del).await.unwrap();

    let w = Writer::start(&mounts, 1);
    w.until(300).await;
    let create =
        csi::CreateVolumeGroupSnapshotRequest { name: "grp-snap".into(), source_volume_ids: sources.clone(), ..Default::default() };
    let before = w.written();
    let made = group.create_volume_group_snapshot(create.clone()).await.unwrap().into_inner().group_snapshot.unwrap();
    let after_cut = w.written();
    // The writer goes on after the thaw.
    w.until(after_cut + 300).await;
    let total = w.stop();

    assert!(made.ready_to_use);
    // Both nodes froze the filesystems mounted from their members.
    let log = s.log_text();
    let froze: Vec<&str> =
        log.lines().filter(|l| l.contains("volumes frozen for a group snapshot") && l.contains(&made.group_snapshot_id)).collect();
    assert_eq!(froze.len(), 2, "{froze:?}");
    assert!(froze.iter().any(|l| l.contains("filesystems=2")) && froze.iter().any(|l| l.contains("filesystems=1")), "{froze:?}");
    assert_eq!(made.snapshots.len(), 3);
    for snap in &made.snapshots {
        assert_eq!(snap.group_snapshot_id, made.group_snapshot_id);
        assert!(snap.ready_to_use);
        assert!(sources.contains(&snap.source_volume_id));
    }
    // Idempotent by name.
    let again = group.create_volume_group_snapshot(create.clone()).await.unwrap().into_inner().group_snapshot.unwrap();
    assert_eq!(again.group_snapshot_id, made.group_snapshot_id);
    assert_eq!(
        again.snapshots.iter().map(|s| &s.snapshot_id).collect::<BTreeSet<_>>(),
        made.snapshots.iter().map(|s| &s.snapshot_id).collect::<BTreeSet<_>>()
    );

    // Restore every member and read its records.
    let n = members_hold_one_prefix(&mut ctl, &s, &made, &sources).await;
    // A record written but not yet synced when the freeze came is flushed by it: one more at most.
    assert!(n >= before && n <= after_cut + 1, "the cut ({n} records) lies outside the call ({before}..{after_cut})");
    assert!(n < total, "the writer went on after the cut");
    eprintln!("group snapshot cut after record {n} of {total} (the call began after {before})");

    // Errors the spec names, each changing nothing.
    let other =
        csi::CreateVolumeGroupSnapshotRequest { name: "grp-snap".into(), source_volume_ids: sources[..2].to_vec(), ..Default::default() };
    assert_eq!(group.create_volume_group_snapshot(other).await.unwrap_err().code(), Code::AlreadyExists);
    let unknown = csi::CreateVolumeGroupSnapshotRequest {
        name: "grp-unknown".into(),
        source_volume_ids: vec!["vol-00000000-0000-0000-0000-000000000000".into()],
        ..Default::default()
    };
    assert_eq!(group.create_volume_group_snapshot(unknown).await.unwrap_err().code(), Code::NotFound);
    let empty = csi::CreateVolumeGroupSnapshotRequest { name: "grp-empty".into(), ..Default::default() };
    assert_eq!(group.create_volume_group_snapshot(empty).await.unwrap_err().code(), Code::InvalidArgument);
    let wrong = csi::GetVolumeGroupSnapshotRequest {
        group_snapshot_id: made.group_snapshot_id.clone(),
        snapshot_ids: vec![made.snapshots[0].snapshot_id.clone()],
        ..Default::default()
    };
    assert_eq!(group.get_volume_group_snapshot(wrong).await.unwrap_err().code(), Code::InvalidArgument);
    let member = csi::DeleteSnapshotRequest { snapshot_id: made.snapshots[0].snapshot_id.clone(), ..Default::default() };
    assert_eq!(ctl.delete_snapshot(member).await.unwrap_err().code(), Code::FailedPrecondition, "a member is deleted with its group only");
    let got = group
        .get_volume_group_snapshot(csi::GetVolumeGroupSnapshotRequest {
            group_snapshot_id: made.group_snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .group_snapshot
        .unwrap();
    assert_eq!(got.snapshots.len(), 3);

    // Delete: the group and its members' images go; a repeat is OK.
    let del = csi::DeleteVolumeGroupSnapshotRequest { group_snapshot_id: made.group_snapshot_id.clone(), ..Default::default() };
    group.delete_volume_group_snapshot(del.clone()).await.unwrap();
    group.delete_volume_group_snapshot(del).await.unwrap();
    let e = group
        .get_volume_group_snapshot(csi::GetVolumeGroupSnapshotRequest {
            group_snapshot_id: made.group_snapshot_id.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let images = s.images();
    for snap in &made.snapshots {
        assert!(!images.iter().any(|i| i.ends_with(&snap.snapshot_id)), "{} left: {images:?}", snap.snapshot_id);
    }

    // The writer's filesystems are all thawed: one more durable record each.
    for m in &mounts {
        let mut f = std::fs::OpenOptions::new().append(true).open(m.join("records")).unwrap();
        f.write_all(b"end\n").unwrap();
        f.sync_data().unwrap();
    }
    run("umount", &[c_mount.to_str().unwrap()]);
}

/// Two of the three members live on node-2 and are used from node-1 over
/// NBD (FUSE engine): their filesystems are mounted on node-1, their
/// consumer, not on their owner. The group must freeze them there, before
/// any member is cut, and thaw them after; a writer that leaves most
/// records unsynced sees every member cut at one point of its stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_freezes_members_where_another_node_mounts_them() {
    require_root!();
    require_tools!("mkfs.ext4", "mount");
    require_fuse!();
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = Leftovers(dir.path().to_path_buf());
    let s = Standalone::start(dir.path(), 2, 1, &[]);
    let ch = csi_channel(&s.endpoint).await;
    let mut ctl = ControllerClient::new(ch.clone());
    let mut group = GroupControllerClient::new(ch.clone());
    let mut node = NodeClient::new(ch.clone());

    // a on node-1, used there; b and c on node-2, used from node-1.
    let mut vols = vec![];
    for (name, on) in [("cgrp-a", "node-1"), ("cgrp-b", "node-2"), ("cgrp-c", "node-2")] {
        let v = ctl.create_volume(zone_volume_on(name, on, 64 * MIB, false)).await.unwrap().into_inner().volume.unwrap();
        assert_eq!(v.volume_context["cinderblock.dev/node"], on);
        vols.push(v);
    }
    let mut mounts = vec![];
    let mut staged = vec![];
    for v in &vols {
        let publish = csi::ControllerPublishVolumeRequest {
            volume_id: v.volume_id.clone(),
            node_id: "node-1".into(),
            volume_capability: Some(rwo_capability(false)),
            ..Default::default()
        };
        let ctx = ctl.controller_publish_volume(publish).await.unwrap().into_inner().publish_context;
        let remote = ctx.get("cinderblock.dev/transport").map(String::as_str) == Some("nbd");
        assert_eq!(remote, v.volume_context["cinderblock.dev/node"] == "node-2", "{ctx:?}");
        let staging = dir.path().join("kubelet").join(format!("{}-staging", v.volume_id));
        let target = dir.path().join("kubelet").join(format!("{}-target", v.volume_id));
        stage_and_publish_rwo(&mut node, &v.volume_id, &staging, &target, false, &ctx).await;
        staged.push((v.volume_id.clone(), staging));
        mounts.push(target);
    }
    let sources: Vec<String> = vols.iter().map(|v| v.volume_id.clone()).collect();

    let w = Writer::start(&mounts, 16);
    w.until(600).await;
    let create =
        csi::CreateVolumeGroupSnapshotRequest { name: "cgrp-snap".into(), source_volume_ids: sources.clone(), ..Default::default() };
    let before = w.written();
    let made = group.create_volume_group_snapshot(create).await;
    let after_cut = w.written();
    if made.is_ok() {
        w.until(after_cut + 600).await;
    }
    // A plain snapshot of b, still being written from node-1, is cut with
    // b's filesystem frozen there too: it holds every record written to b
    // before the call, synced or not.
    let single = csi::CreateSnapshotRequest { name: "cgrp-single-b".into(), source_volume_id: sources[1].clone(), ..Default::default() };
    let before_single = w.written();
    let single = if made.is_ok() { Some(ctl.create_snapshot(single).await) } else { None };
    let total = w.stop();
    let made = made.unwrap().into_inner().group_snapshot.unwrap();
    assert!(made.ready_to_use);
    assert_eq!(made.snapshots.len(), 3);

    // node-1 froze its own member and, as their consumer, b's and c's
    // filesystems (the staged mounts of their NBD attachments); node-2,
    // their owner, had nothing of them mounted and only held them.
    let log = s.log_text();
    let froze: Vec<&str> =
        log.lines().filter(|l| l.contains("volumes frozen for a group snapshot") && l.contains(&made.group_snapshot_id)).collect();
    assert_eq!(froze.len(), 2, "{froze:?}");
    assert!(froze.iter().any(|l| l.contains("filesystems=1") && l.contains("consumed_filesystems=2")), "{froze:?}");
    assert!(froze.iter().any(|l| l.contains("filesystems=0") && l.contains("consumed_filesystems=0")), "{froze:?}");
    for v in &sources[1..] {
        assert!(
            log.lines().any(|l| l.contains("frozen on this node, its consumer") && l.contains(v.as_str()) && l.contains("kubelet")),
            "{v}'s filesystem was not frozen on node-1"
        );
    }
    // And thawed them, all frozen all along.
    let thawed: Vec<&str> =
        log.lines().filter(|l| l.contains("group snapshot's volumes thawed") && l.contains(&made.group_snapshot_id)).collect();
    assert_eq!(thawed.len(), 2, "{thawed:?}");
    assert!(thawed.iter().all(|l| l.contains("thawed_early=0")), "{thawed:?}");

    // Every member restored, read: one prefix of the stream.
    let n = members_hold_one_prefix(&mut ctl, &s, &made, &sources).await;
    assert!(n >= before && n <= after_cut + 1, "the cut ({n} records) lies outside the call ({before}..{after_cut})");
    assert!(n < total, "the writer went on after the cut");
    eprintln!("group snapshot cut after record {n} of {total} (the call began after {before})");

    let single = single.unwrap().unwrap().into_inner().snapshot.unwrap();
    assert!(single.ready_to_use);
    assert!(
        log.lines().any(|l| l.contains("volumes frozen for a group snapshot")
            && l.contains(&single.snapshot_id)
            && l.contains("consumed_filesystems=1")),
        "b's filesystem was not frozen on node-1 for its snapshot"
    );
    let records = restored_records(&mut ctl, &s, "cgrp-single-restore", &single.snapshot_id).await;
    let want = (0..before_single).rev().find(|i| i % 3 == 1).unwrap();
    assert!(records.windows(2).all(|p| p[0] + 3 == p[1]) && records.first() == Some(&1), "b's snapshot holds {records:?}");
    assert!(records.last().is_some_and(|&l| l >= want), "b's snapshot ends at {:?}; written before the call: {want}", records.last());
    eprintln!("snapshot of b ends at record {:?} (the call began after {before_single})", records.last());

    // All thawed: one more durable record on each; then unstaged cleanly.
    for m in &mounts {
        let mut f = std::fs::OpenOptions::new().append(true).open(m.join("records")).unwrap();
        f.write_all(b"end\n").unwrap();
        f.sync_data().unwrap();
    }
    for ((id, staging), target) in staged.iter().zip(&mounts) {
        let unpublish = csi::NodeUnpublishVolumeRequest { volume_id: id.clone(), target_path: target.display().to_string() };
        node.node_unpublish_volume(unpublish).await.unwrap();
        let unstage = csi::NodeUnstageVolumeRequest { volume_id: id.clone(), staging_target_path: staging.display().to_string() };
        node.node_unstage_volume(unstage).await.unwrap();
    }
}
