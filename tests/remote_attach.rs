//! Remote attach end to end on one machine: a `cinderblock standalone` with
//! two nodes in one zone; a volume with `accessibility: zone` whose image is
//! on node-2 is published to node-1 (the owner exports it over NBD with TLS
//! to node-1 only), staged on node-1 through the FUSE engine, formatted,
//! written, unstaged, unpublished; the owner's image holds the data. Block
//! mode likewise. Nothing is left: no export, no FUSE mount, no loop device.
//! Needs root (FUSE, loop devices, mkfs, mounts).

mod common;

use std::time::Duration;

use cinderblock::csi;
use cinderblock::csi::controller_client::ControllerClient;
use cinderblock::csi::node_client::NodeClient;
use common::*;

const MIB: i64 = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zone_volume_is_used_from_another_node_over_nbd() {
    require_root!();
    require_tools!("mkfs.ext4", "mount");
    require_fuse!();
    let dir = tempfile::tempdir().unwrap();
    let _cleanup = Leftovers(dir.path().to_path_buf());
    let s = Standalone::start(dir.path(), 2, 1, &[]);
    let ch = csi_channel(&s.endpoint).await;
    let mut ctl = ControllerClient::new(ch.clone());
    let mut node = NodeClient::new(ch);

    for (name, block) in [("remote-fs", false), ("remote-block", true)] {
        let vol = ctl.create_volume(zone_volume_on(name, "node-2", 64 * MIB, block)).await.unwrap().into_inner().volume.unwrap();
        // Reachable from the whole zone, not just its node.
        let seg = &vol.accessible_topology[0].segments;
        assert_eq!(seg.get(cinderblock::TOPOLOGY_ZONE_KEY).map(String::as_str), Some("zone-1"));
        assert!(!seg.contains_key(cinderblock::TOPOLOGY_NODE_KEY), "{seg:?}");
        let image = s.pool(2).join("volumes").join(format!("{}.img", vol.volume_id));
        assert!(image.exists(), "the image is on node-2");

        let publish = csi::ControllerPublishVolumeRequest {
            volume_id: vol.volume_id.clone(),
            node_id: "node-1".into(),
            volume_capability: Some(rwo_capability(block)),
            ..Default::default()
        };
        let ctx = ctl.controller_publish_volume(publish.clone()).await.unwrap().into_inner().publish_context;
        assert_eq!(ctx.get("cinderblock.dev/transport").map(String::as_str), Some("nbd"), "{ctx:?}");
        assert_eq!(ctx.get("cinderblock.dev/nbd-owner").map(String::as_str), Some("node-2"));
        assert_eq!(ctx.get("cinderblock.dev/nbd-export").map(|e| e.len()), Some(32), "a 128-bit export name");
        // Idempotent; and one node at a time for a single-node access mode.
        assert_eq!(ctl.controller_publish_volume(publish.clone()).await.unwrap().into_inner().publish_context, ctx);
        let elsewhere = csi::ControllerPublishVolumeRequest { node_id: "node-3".into(), ..publish.clone() };
        let e = ctl.controller_publish_volume(elsewhere).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
        let got =
            ctl.controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: vol.volume_id.clone() }).await.unwrap().into_inner();
        assert_eq!(got.status.unwrap().published_node_ids, vec!["node-1".to_string()]);
        // A published volume is not deleted.
        let e = ctl.delete_volume(csi::DeleteVolumeRequest { volume_id: vol.volume_id.clone(), ..Default::default() }).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition);

        let staging = dir.path().join("kubelet").join(format!("{name}-staging"));
        let target = dir.path().join("kubelet").join(format!("{name}-target"));
        let stage = csi::NodeStageVolumeRequest {
            volume_id: vol.volume_id.clone(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(rwo_capability(block)),
            publish_context: ctx.clone(),
            ..Default::default()
        };
        node.node_stage_volume(stage.clone()).await.unwrap();
        node.node_stage_volume(stage).await.expect("staging again is OK");
        node.node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: vol.volume_id.clone(),
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(rwo_capability(block)),
            publish_context: ctx.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        if block {
            // Data straight through the device, at an odd offset.
            write_pattern(&target, 3 * MIB as u64 + 512, 1 << 20, 42);
        } else {
            std::fs::write(target.join("hello.txt"), b"written on node-1, kept on node-2").unwrap();
            let f = std::fs::File::open(target.join("hello.txt")).unwrap();
            f.sync_all().unwrap();
        }
        node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
            volume_id: vol.volume_id.clone(),
            target_path: target.display().to_string(),
        })
        .await
        .unwrap();
        node.node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: vol.volume_id.clone(),
            staging_target_path: staging.display().to_string(),
        })
        .await
        .unwrap();
        ctl.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
            volume_id: vol.volume_id.clone(),
            node_id: "node-1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let got =
            ctl.controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: vol.volume_id.clone() }).await.unwrap().into_inner();
        assert!(got.status.unwrap().published_node_ids.is_empty());

        // The owner's image holds what node-1 wrote.
        if block {
            use std::os::unix::fs::FileExt;
            let mut buf = vec![0u8; 1 << 20];
            std::fs::File::open(&image).unwrap().read_exact_at(&mut buf, 3 * MIB as u64 + 512).unwrap();
            let want: Vec<u8> = (0..1 << 20).map(|i: usize| (i as u8).wrapping_mul(31).wrapping_add(42)).collect();
            assert!(buf == want, "the block data did not reach node-2's image");
        } else {
            let m = tempfile::tempdir().unwrap();
            run("mount", &["-o", "loop,ro,noload", image.to_str().unwrap(), m.path().to_str().unwrap()]);
            let text = std::fs::read_to_string(m.path().join("hello.txt"));
            run("umount", &[m.path().to_str().unwrap()]);
            assert_eq!(text.unwrap(), "written on node-1, kept on node-2");
        }
    }
    // Nothing left behind: no FUSE mount, no loop device on an attachment.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let attach = dir.path().join("node-1").join("attach");
    assert!(mounted_under(&attach).is_empty(), "mounts left: {:?}", mounted_under(&attach));
    assert!(loops_on(&attach).is_empty(), "loop devices left: {:?}", loops_on(&attach));
}
