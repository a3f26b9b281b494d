//! Volume health end to end on a real `cinderblock standalone`: a mounted
//! volume whose image is removed from the pool turns abnormal in
//! NodeGetVolumeStats and ControllerGetVolume at the next call, in
//! ListVolumes (which answers from the controller's health pass) by the
//! next pass, and the controller's own pass notes the turn once (the
//! Warning event on the PVC in a cluster; standalone has no API server, so
//! its log shows it).
//! Needs root (loop devices, mkfs, mounts).

mod common;

use std::time::{Duration, Instant};

use cinderblock::csi;
use cinderblock::csi::controller_client::ControllerClient;
use cinderblock::csi::node_client::NodeClient;
use common::*;

const MIB: i64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_removed_under_a_mounted_volume_turns_it_abnormal_everywhere() {
    require_root!();
    require_tools!("mkfs.ext4", "mount");
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = Leftovers(dir.path().to_path_buf());
    let s = Standalone::start(dir.path(), 1, 1, &["--reconcile-interval", "1"]);
    let ch = csi_channel(&s.endpoint).await;
    let mut ctl = ControllerClient::new(ch.clone());
    let mut node = NodeClient::new(ch);

    let v = ctl.create_volume(zone_volume_on("health", "node-1", 32 * MIB, false)).await.unwrap().into_inner().volume.unwrap();
    let id = v.volume_id.clone();
    let publish = csi::ControllerPublishVolumeRequest {
        volume_id: id.clone(),
        node_id: "node-1".into(),
        volume_capability: Some(rwo_capability(false)),
        ..Default::default()
    };
    let ctx = ctl.controller_publish_volume(publish).await.unwrap().into_inner().publish_context;
    let staging = dir.path().join("kubelet/health-staging");
    let target = dir.path().join("kubelet/health-target");
    stage_and_publish_rwo(&mut node, &id, &staging, &target, false, &ctx).await;

    let stats = csi::NodeGetVolumeStatsRequest { volume_id: id.clone(), volume_path: target.display().to_string(), ..Default::default() };
    let get = csi::ControllerGetVolumeRequest { volume_id: id.clone() };
    let node_cond = node.node_get_volume_stats(stats.clone()).await.unwrap().into_inner().volume_condition.unwrap();
    assert!(!node_cond.abnormal, "{node_cond:?}");
    let got = ctl.controller_get_volume(get.clone()).await.unwrap().into_inner().status.unwrap();
    assert!(!got.volume_condition.as_ref().unwrap().abnormal, "{got:?}");
    assert_eq!(got.published_node_ids, ["node-1"]);
    let listed = ctl.list_volumes(csi::ListVolumesRequest::default()).await.unwrap().into_inner();
    let status = listed.entries.iter().find(|e| e.volume.as_ref().unwrap().volume_id == id).unwrap().status.clone().unwrap();
    assert!(!status.volume_condition.unwrap().abnormal);
    assert_eq!(status.published_node_ids, ["node-1"]);

    // The image goes away under the mounted filesystem.
    let image = s.pool(1).join("volumes").join(format!("{id}.img"));
    std::fs::remove_file(&image).unwrap();

    let node_cond = node.node_get_volume_stats(stats.clone()).await.unwrap().into_inner().volume_condition.unwrap();
    assert!(node_cond.abnormal && node_cond.message.contains("deleted"), "{node_cond:?}");
    let cond = ctl.controller_get_volume(get.clone()).await.unwrap().into_inner().status.unwrap().volume_condition.unwrap();
    assert!(cond.abnormal && cond.message.contains("missing"), "{cond:?}");
    // ListVolumes by the next health pass (one a second here).
    let until = Instant::now() + Duration::from_secs(10);
    let cond = loop {
        let listed = ctl.list_volumes(csi::ListVolumesRequest::default()).await.unwrap().into_inner();
        let status = listed.entries.iter().find(|e| e.volume.as_ref().unwrap().volume_id == id).unwrap().status.clone().unwrap();
        let cond = status.volume_condition.unwrap();
        if cond.abnormal || Instant::now() > until {
            break cond;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(cond.abnormal && cond.message.contains("missing"), "{cond:?}");

    // The controller notes the turn once, whoever looked first, however
    // often it looks again (its reconciler looks every second).
    let until = Instant::now() + Duration::from_secs(10);
    while !s.log_text().contains("volume turned abnormal") {
        assert!(Instant::now() < until, "the controller never noted the turn");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let log = s.log_text();
    let turns: Vec<&str> = log.lines().filter(|l| l.contains("volume turned abnormal")).collect();
    assert_eq!(turns.len(), 1, "{turns:?}");
    assert!(turns[0].contains(&id) && turns[0].contains("missing"), "{}", turns[0]);

    node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest { volume_id: id.clone(), target_path: target.display().to_string() })
        .await
        .unwrap();
    node.node_unstage_volume(csi::NodeUnstageVolumeRequest { volume_id: id.clone(), staging_target_path: staging.display().to_string() })
        .await
        .unwrap();
}

/// A volume deleted between the controller's read of its record and its
/// node's answer is missing from that node, which says nothing of its
/// health: deletions while the controller looks (ListVolumes in a loop, its
/// own pass every second) raise no abnormal turn and no event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volumes_deleted_while_the_controller_looks_do_not_turn_abnormal() {
    require_root!();
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = Leftovers(dir.path().to_path_buf());
    let s = Standalone::start(dir.path(), 1, 1, &["--reconcile-interval", "1"]);
    let ch = csi_channel(&s.endpoint).await;
    let mut ctl = ControllerClient::new(ch.clone());

    const VOLUMES: usize = 240;
    let mut ids = vec![];
    for i in 0..VOLUMES {
        let v = ctl.create_volume(zone_volume_on(&format!("churn-{i}"), "node-1", MIB, false)).await.unwrap().into_inner();
        ids.push(v.volume.unwrap().volume_id);
    }
    // Lookers: ListVolumes over and over, as a health monitor polls.
    let looking = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let lookers: Vec<_> = (0..2)
        .map(|_| {
            let mut c = ctl.clone();
            let looking = looking.clone();
            tokio::spawn(async move {
                let mut looks = 0;
                while looking.load(std::sync::atomic::Ordering::Relaxed) {
                    c.list_volumes(csi::ListVolumesRequest::default()).await.unwrap();
                    looks += 1;
                }
                looks
            })
        })
        .collect();
    // Deleters: four at a time, each volume once.
    let chunks: Vec<Vec<String>> = ids.chunks(VOLUMES / 4).map(<[String]>::to_vec).collect();
    let deleters: Vec<_> = chunks
        .into_iter()
        .map(|chunk| {
            let mut c = ctl.clone();
            tokio::spawn(async move {
                for id in chunk {
                    c.delete_volume(csi::DeleteVolumeRequest { volume_id: id, ..Default::default() }).await.unwrap();
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        })
        .collect();
    for d in deleters {
        d.await.unwrap();
    }
    looking.store(false, std::sync::atomic::Ordering::Relaxed);
    let mut looks = 0;
    for l in lookers {
        looks += l.await.unwrap();
    }
    assert!(looks >= 10, "the lookers looked only {looks} times while the volumes went");
    let log = s.log_text();
    let turns: Vec<&str> = log.lines().filter(|l| l.contains("volume turned abnormal")).collect();
    assert!(turns.is_empty(), "{} deletions seen as abnormal volumes ({looks} looks), e.g. {:?}", turns.len(), turns.first());
    let listed = ctl.list_volumes(csi::ListVolumesRequest::default()).await.unwrap().into_inner();
    assert!(listed.entries.is_empty(), "{:?}", listed.entries.len());
}
