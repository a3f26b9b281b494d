//! End to end on real Kubernetes parts: a real kube-apiserver (with etcd and
//! kube-controller-manager's PV binder) started by scripts/k8s/testbed.sh,
//! the real csi-provisioner, csi-snapshotter with snapshot-controller,
//! csi-resizer and csi-attacher, driving two `cinderblock controller`
//! replicas (leader election; the standby hands calls to the leader) and
//! three `cinderblock node` processes with real pools, two of them in one
//! zone (zone volumes published over NBD through VolumeAttachments). There is
//! no kubelet: the test registers the nodes as kubelet would (Node labels
//! and CSINode from NodeGetInfo's topology).
//!
//! Runs when CINDERBLOCK_TEST_KUBECONFIG (admin kubeconfig of the bed) and
//! CINDERBLOCK_K8S_BIN (the built binaries) are set; scripts/test-all.sh
//! sets both.

mod common;
#[path = "common/kube.rs"]
mod kube_bed;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::{CSIDriver, StorageClass, VolumeAttachment};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube_bed::*;
use serde_json::json;

/// The nodes and their zones: two share zone-1, so a zone volume can be
/// published from one to the other.
const NODES: [(&str, &str); 3] = [("node-a", "zone-1"), ("node-b", "zone-2"), ("node-c", "zone-1")];
const MI: i64 = 1 << 20;

fn gvk_resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

fn pvc(name: &str, size: i64, data_source: Option<serde_json::Value>) -> PersistentVolumeClaim {
    let mut spec = json!({
        "accessModes": ["ReadWriteOnce"],
        "storageClassName": "cinderblock",
        "resources": {"requests": {"storage": size.to_string()}},
    });
    if let Some(ds) = data_source {
        spec["dataSource"] = ds;
    }
    serde_json::from_value(json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name}, "spec": spec})).unwrap()
}

async fn bound_pv(pvcs: &Api<PersistentVolumeClaim>, pvs: &Api<PersistentVolume>, name: &str) -> PersistentVolume {
    let pv_name = eventually(&format!("PVC {name} bound"), Duration::from_secs(90), || async {
        let c = pvcs.get(name).await.ok()?;
        (c.status.as_ref()?.phase.as_deref() == Some("Bound")).then(|| c.spec.unwrap().volume_name.unwrap())
    })
    .await;
    pvs.get(&pv_name).await.unwrap()
}

fn pv_node(pv: &PersistentVolume) -> String {
    let terms = &pv.spec.as_ref().unwrap().node_affinity.as_ref().unwrap().required.as_ref().unwrap().node_selector_terms;
    for t in terms {
        for e in t.match_expressions.clone().unwrap_or_default() {
            if e.key == cinderblock::TOPOLOGY_NODE_KEY {
                return e.values.unwrap()[0].clone();
            }
        }
    }
    panic!("PV has no node affinity on {}: {terms:?}", cinderblock::TOPOLOGY_NODE_KEY)
}

fn handle(pv: &PersistentVolume) -> String {
    pv.spec.as_ref().unwrap().csi.as_ref().unwrap().volume_handle.clone()
}

fn images(pools: &[(String, PathBuf)]) -> Vec<String> {
    let mut out = vec![];
    for (node, pool) in pools {
        for sub in ["volumes", "snapshots"] {
            for f in std::fs::read_dir(pool.join(sub)).into_iter().flatten().flatten() {
                if let Some(id) = f.file_name().to_string_lossy().strip_suffix(".img") {
                    out.push(format!("{node}/{id}"));
                }
            }
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_end_to_end() {
    let (Ok(kubeconfig), Ok(bin)) = (std::env::var("CINDERBLOCK_TEST_KUBECONFIG"), std::env::var("CINDERBLOCK_K8S_BIN")) else {
        common::cannot_run(
            "kubernetes_end_to_end",
            "needs CINDERBLOCK_TEST_KUBECONFIG and CINDERBLOCK_K8S_BIN (scripts/test-all.sh sets them)",
        );
        return;
    };
    let bin = PathBuf::from(bin);
    let crd_dir =
        PathBuf::from(std::env::var("CINDERBLOCK_K8S_CRDS").unwrap_or_else(|_| bin.parent().unwrap().join("crds").display().to_string()));
    let cb = PathBuf::from(env!("CARGO_BIN_EXE_cinderblock"));
    let dir = tempfile::Builder::new().prefix("cinderblock-e2e-").tempdir().unwrap();
    let d = dir.path();
    eprintln!("e2e work folder: {}", d.display());
    let client = cinderblock::kube::client(Some(Path::new(&kubeconfig))).await.unwrap();
    let kc = kubeconfig.as_str();

    // CRDs: ours (exactly what `cinderblock crds` prints) and the snapshot ones.
    apply_crds(&client, &cinderblock::kube::crds::all_yaml()).await;
    let mut snapshot_crds = String::new();
    for f in std::fs::read_dir(&crd_dir).unwrap_or_else(|e| panic!("{}: {e}", crd_dir.display())).flatten() {
        snapshot_crds.push_str(&std::fs::read_to_string(f.path()).unwrap());
        snapshot_crds.push_str("\n---\n");
    }
    apply_crds(&client, &snapshot_crds).await;

    // The nodes, registered as kubelet would do it.
    register_nodes(&client, &NODES).await;
    let drivers: Api<CSIDriver> = Api::all(client.clone());
    let driver: CSIDriver = serde_json::from_value(json!({
        "apiVersion": "storage.k8s.io/v1", "kind": "CSIDriver", "metadata": {"name": DRIVER},
        "spec": {"attachRequired": false, "podInfoOnMount": false, "volumeLifecycleModes": ["Persistent"], "storageCapacity": false}
    }))
    .unwrap();
    let _ = drivers.create(&PostParams::default(), &driver).await;
    let classes: Api<StorageClass> = Api::all(client.clone());
    let sc: StorageClass = serde_json::from_value(json!({
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": "cinderblock"},
        "provisioner": DRIVER, "volumeBindingMode": "Immediate", "allowVolumeExpansion": true, "reclaimPolicy": "Delete",
        "parameters": {"provisioning": "thin"}
    }))
    .unwrap();
    let _ = classes.create(&PostParams::default(), &sc).await;
    // Zone volumes: usable from any node of their zone (over NBD), here zone-1.
    let zone_sc: StorageClass = serde_json::from_value(json!({
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": "cinderblock-zone"},
        "provisioner": DRIVER, "volumeBindingMode": "Immediate", "reclaimPolicy": "Delete",
        "parameters": {"provisioning": "thin", "accessibility": "zone"},
        "allowedTopologies": [{"matchLabelExpressions": [{"key": cinderblock::TOPOLOGY_ZONE_KEY, "values": ["zone-1"]}]}]
    }))
    .unwrap();
    let _ = classes.create(&PostParams::default(), &zone_sc).await;
    let vsc_ar = gvk_resource("snapshot.storage.k8s.io", "v1", "VolumeSnapshotClass", "volumesnapshotclasses");
    let vsc_api: Api<DynamicObject> = Api::all_with(client.clone(), &vsc_ar);
    let vsc = DynamicObject::new("cinderblock", &vsc_ar).data(json!({"driver": DRIVER, "deletionPolicy": "Delete"}));
    let _ = vsc_api.create(&PostParams::default(), &vsc).await;

    // cinderblock: two nodes with real pools, two controller replicas, with
    // certificates from a CA made here (tests/kube_trust.rs covers the
    // cluster's own CA and certificate requests).
    let pki = local_pki(d, &NODES.map(|(n, _)| n));
    let mut pools = vec![];
    let mut procs = vec![];
    for (name, _) in NODES {
        let pool = d.join(name).join("pool");
        pools.push((name.to_string(), pool.clone()));
        let args = node_args(d, name, &pool, kc, &pki, "127.0.0.1:0", "127.0.0.1:0");
        procs.push(Proc::start(d, name, &cb, &args, &[]));
    }
    let replica_args = |id: &str| controller_args(d, id, kc, &pki, "cinderblock-controller");
    let mut ctrl_a = Proc::start(d, "ctrl-a", &cb, &replica_args("ctrl-a"), &[]);
    // Let ctrl-a take the Lease first.
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(client.clone(), "default");
    eventually("ctrl-a leads", Duration::from_secs(30), || async {
        let l = leases.get("cinderblock-controller").await.ok()?;
        (l.spec?.holder_identity.as_deref() == Some("ctrl-a")).then_some(())
    })
    .await;
    let _ctrl_b = Proc::start(d, "ctrl-b", &cb, &replica_args("ctrl-b"), &[]);

    let sidecar = |name: &str, sock: &str, extra: &[&str]| -> Proc {
        let mut args: Vec<String> = vec![format!("--csi-address={}/{sock}.sock", d.display()), format!("--kubeconfig={kc}")];
        args.extend(extra.iter().map(|s| s.to_string()));
        let exe = name.split('@').next().unwrap();
        Proc::start(d, &name.replace('@', "-"), &bin.join(exe), &args, &[("POD_NAMESPACE", "default"), ("NODE_NAME", "node-a")])
    };
    let prov_flags = [
        "--extra-create-metadata",
        "--leader-election",
        "--leader-election-namespace=default",
        "--leader-election-lease-duration=4s",
        "--leader-election-renew-deadline=3s",
        "--leader-election-retry-period=1s",
        "--retry-interval-start=1s",
        "--retry-interval-max=5s",
        "--timeout=60s",
    ];
    let mut prov_a = sidecar("csi-provisioner@a", "ctrl-a", &prov_flags);
    let sc_proc = Proc::start(d, "snapshot-controller", &bin.join("snapshot-controller"), &[format!("--kubeconfig={kc}")], &[]);
    let mut snapshotter = sidecar("csi-snapshotter", "ctrl-a", &["--timeout=60s"]);
    let mut resizer = sidecar("csi-resizer", "ctrl-a", &["--timeout=60s"]);
    let mut attacher = sidecar("csi-attacher", "ctrl-a", &["--timeout=60s", "--retry-interval-start=1s", "--retry-interval-max=5s"]);
    let _ = (&sc_proc, &mut snapshotter, &mut resizer, &mut attacher);

    let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "default");
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let bvols: Api<DynamicObject> = Api::all_with(client.clone(), &ApiResource::erase::<cinderblock::kube::crds::BlockVolume>(&()));
    let bsnaps: Api<DynamicObject> = Api::all_with(client.clone(), &ApiResource::erase::<cinderblock::kube::crds::BlockSnapshot>(&()));
    let snodes: Api<DynamicObject> = Api::all_with(client.clone(), &ApiResource::erase::<cinderblock::kube::crds::StorageNode>(&()));

    // Both nodes registered, with the zone read from their Node objects.
    for (name, zone) in NODES {
        eventually(&format!("StorageNode {name}"), Duration::from_secs(30), || async {
            let n = snodes.get(name).await.ok()?;
            (n.data["spec"]["zone"] == zone).then_some(())
        })
        .await;
    }

    // 1. A PVC binds to a PV with our handle and node affinity; the BlockVolume is Available there.
    pvcs.create(&PostParams::default(), &pvc("data", 64 * MI, None)).await.unwrap();
    let pv = bound_pv(&pvcs, &pvs, "data").await;
    assert_eq!(pv.spec.as_ref().unwrap().csi.as_ref().unwrap().driver, DRIVER);
    let vol = handle(&pv);
    let node = pv_node(&pv);
    let bv = bvols.get(&vol).await.unwrap();
    assert_eq!(bv.data["spec"]["phase"], "Available");
    assert_eq!(bv.data["spec"]["node"], node.as_str());
    assert_eq!(bv.data["spec"]["metadata"]["csi.storage.k8s.io/pvc/name"], "data");

    // 2. Snapshot, restore, clone.
    let vs_ar = gvk_resource("snapshot.storage.k8s.io", "v1", "VolumeSnapshot", "volumesnapshots");
    let vss: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &vs_ar);
    let vs = DynamicObject::new("data-snap", &vs_ar)
        .data(json!({"spec": {"volumeSnapshotClassName": "cinderblock", "source": {"persistentVolumeClaimName": "data"}}}));
    vss.create(&PostParams::default(), &vs).await.unwrap();
    eventually("VolumeSnapshot readyToUse", Duration::from_secs(90), || async {
        let s = vss.get("data-snap").await.ok()?;
        (s.data["status"]["readyToUse"] == true).then_some(())
    })
    .await;
    let snaps = bsnaps.list(&ListParams::default()).await.unwrap();
    assert_eq!(snaps.items.len(), 1);
    assert_eq!(snaps.items[0].data["spec"]["node"], node.as_str());
    let ds = |kind: &str, name: &str, group: Option<&str>| {
        let mut v = json!({"kind": kind, "name": name});
        if let Some(g) = group {
            v["apiGroup"] = json!(g);
        }
        v
    };
    pvcs.create(
        &PostParams::default(),
        &pvc("restored", 64 * MI, Some(ds("VolumeSnapshot", "data-snap", Some("snapshot.storage.k8s.io")))),
    )
    .await
    .unwrap();
    pvcs.create(&PostParams::default(), &pvc("cloned", 64 * MI, Some(ds("PersistentVolumeClaim", "data", None)))).await.unwrap();
    let restored = bound_pv(&pvcs, &pvs, "restored").await;
    let cloned = bound_pv(&pvcs, &pvs, "cloned").await;
    assert_eq!(pv_node(&restored), node, "a restore lands on the snapshot's node");
    assert_eq!(pv_node(&cloned), node, "a clone lands on its source's node");

    // 3. Larger than any pool: Pending, with an Event saying why.
    pvcs.create(&PostParams::default(), &pvc("huge", 1 << 52, None)).await.unwrap();
    let events: Api<Event> = Api::namespaced(client.clone(), "default");
    let why = eventually("an Event on PVC huge", Duration::from_secs(60), || async {
        let list = events.list(&ListParams::default().fields("involvedObject.name=huge")).await.ok()?;
        list.items.into_iter().filter_map(|e| e.message).find(|m| m.contains("no node can take"))
    })
    .await;
    eprintln!("PVC huge: {why}");
    let huge = pvcs.get("huge").await.unwrap();
    assert_eq!(huge.status.unwrap().phase.as_deref(), Some("Pending"));

    // 4. Resize grows the volume.
    pvcs.patch(
        "data",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"resources": {"requests": {"storage": (128 * MI).to_string()}}}})),
    )
    .await
    .unwrap();
    eventually("PV grown to 128Mi", Duration::from_secs(90), || async {
        let pv = pvs.get(&pv.metadata.name.clone().unwrap()).await.ok()?;
        let cap = pv.spec?.capacity?.get("storage")?.0.clone();
        (cap == (128 * MI).to_string() || cap == "128Mi").then_some(())
    })
    .await;
    let bv = bvols.get(&vol).await.unwrap();
    assert_eq!(bv.data["spec"]["size_bytes"], 128 * MI);
    let img = pools.iter().find(|(n, _)| *n == node).unwrap().1.join("volumes").join(format!("{vol}.img"));
    assert_eq!(std::fs::metadata(&img).unwrap().len(), (128 * MI) as u64);

    // 4b. A zone volume published through the csi-attacher and VolumeAttachments:
    // to another node of its zone an NBD export only that node may use; to
    // a node of another zone an error; to its own node a local publication;
    // one node at a time; unpublished (export removed) when the attachment goes.
    {
        let mut claim = pvc("shared", 32 * MI, None);
        claim.spec.as_mut().unwrap().storage_class_name = Some("cinderblock-zone".into());
        pvcs.create(&PostParams::default(), &claim).await.unwrap();
        let pv = bound_pv(&pvcs, &pvs, "shared").await;
        let pv_name = pv.metadata.name.clone().unwrap();
        let terms = format!("{:?}", pv.spec.as_ref().unwrap().node_affinity);
        assert!(terms.contains(cinderblock::TOPOLOGY_ZONE_KEY) && terms.contains("zone-1"), "a zone volume's PV names its zone: {terms}");
        assert!(!terms.contains(cinderblock::TOPOLOGY_NODE_KEY), "a zone volume's PV is not pinned to a node: {terms}");
        let vol = handle(&pv);
        let owner = bvols.get(&vol).await.unwrap().data["spec"]["node"].as_str().unwrap().to_string();
        let other = if owner == "node-a" { "node-c" } else { "node-a" };
        let bexports: Api<DynamicObject> = Api::all_with(client.clone(), &ApiResource::erase::<cinderblock::kube::crds::BlockExport>(&()));
        let vas: Api<VolumeAttachment> = Api::all(client.clone());
        let attach = |name: &str, node: &str| -> VolumeAttachment {
            serde_json::from_value(json!({
                "apiVersion": "storage.k8s.io/v1", "kind": "VolumeAttachment", "metadata": {"name": name},
                "spec": {"attacher": DRIVER, "nodeName": node, "source": {"persistentVolumeName": pv_name}}
            }))
            .unwrap()
        };
        let settled = |name: &'static str| {
            let vas = vas.clone();
            async move {
                eventually(&format!("VolumeAttachment {name} attached or refused"), Duration::from_secs(60), || async {
                    let st = vas.get(name).await.ok()?.status?;
                    (st.attached || st.attach_error.is_some()).then_some(st)
                })
                .await
            }
        };

        vas.create(&PostParams::default(), &attach("va-remote", other)).await.unwrap();
        let st = settled("va-remote").await;
        assert!(st.attached, "publishing to {other} in the volume's zone failed: {:?}", st.attach_error);
        let meta = st.attachment_metadata.unwrap_or_default();
        assert_eq!(meta.get("cinderblock.dev/transport").map(String::as_str), Some("nbd"), "{meta:?}");
        assert_eq!(meta.get("cinderblock.dev/nbd-owner"), Some(&owner), "{meta:?}");
        assert!(meta.get("cinderblock.dev/nbd-address").is_some_and(|a| a.starts_with("127.0.0.1:")), "{meta:?}");
        let export = meta.get("cinderblock.dev/nbd-export").cloned().unwrap_or_default();
        assert!(export.len() >= 32, "an export name with 128 random bits, got {export:?}");
        let recs = bexports.list(&ListParams::default()).await.unwrap().items;
        assert_eq!(recs.len(), 1, "one BlockExport for the publication");
        assert_eq!(recs[0].data["spec"]["node_id"], other, "{:?}", recs[0].data);

        // Another zone: refused, nothing exported.
        vas.create(&PostParams::default(), &attach("va-far", "node-b")).await.unwrap();
        let st = settled("va-far").await;
        assert!(!st.attached);
        let msg = st.attach_error.and_then(|e| e.message).unwrap_or_default();
        assert!(msg.contains("zone"), "the refusal says why: {msg}");
        // The owner too while another node holds it (ReadWriteOnce): refused.
        vas.create(&PostParams::default(), &attach("va-owner", &owner)).await.unwrap();
        let st = settled("va-owner").await;
        assert!(!st.attached, "published to two nodes at once");
        let msg = st.attach_error.and_then(|e| e.message).unwrap_or_default();
        assert!(msg.contains("one node at a time"), "{msg}");
        assert_eq!(bexports.list(&ListParams::default()).await.unwrap().items.len(), 1);

        // The remote attachment goes: the export goes with it; then the owner attaches locally.
        for name in ["va-remote", "va-far"] {
            vas.delete(name, &DeleteParams::default()).await.unwrap();
        }
        for name in ["va-remote", "va-far"] {
            eventually(&format!("VolumeAttachment {name} detached and gone"), Duration::from_secs(60), || async {
                vas.get_opt(name).await.ok()?.is_none().then_some(())
            })
            .await;
        }
        eventually(&format!("the BlockExport to {other} removed"), Duration::from_secs(30), || async {
            let left = bexports.list(&ListParams::default()).await.ok()?.items;
            (!left.iter().any(|e| e.data["spec"]["node_id"] == other)).then_some(())
        })
        .await;
        let st = eventually("va-owner attached once the volume is free", Duration::from_secs(60), || async {
            let st = vas.get("va-owner").await.ok()?.status?;
            st.attached.then_some(st)
        })
        .await;
        assert_eq!(st.attachment_metadata.unwrap_or_default().get("cinderblock.dev/transport").map(String::as_str), Some("local"));
        vas.delete("va-owner", &DeleteParams::default()).await.unwrap();
        eventually("va-owner gone", Duration::from_secs(60), || async { vas.get_opt("va-owner").await.ok()?.is_none().then_some(()) })
            .await;
        eventually("no BlockExport left", Duration::from_secs(30), || async {
            bexports.list(&ListParams::default()).await.ok()?.items.is_empty().then_some(())
        })
        .await;
        pvcs.delete("shared", &DeleteParams::default()).await.unwrap();
    }

    // 5. Deleting the PVCs and the snapshot removes the images from the pools.
    for name in ["restored", "cloned", "huge", "data"] {
        pvcs.delete(name, &DeleteParams::default()).await.unwrap();
    }
    vss.delete("data-snap", &DeleteParams::default()).await.unwrap();
    eventually("all images removed", Duration::from_secs(90), || async { images(&pools).is_empty().then_some(()) }).await;
    eventually("all BlockVolumes removed (failed ones expire)", Duration::from_secs(60), || async {
        bvols.list(&ListParams::default()).await.ok()?.items.is_empty().then_some(())
    })
    .await;

    // 5b. A sidecar whose own leader sits beside the standby: ctrl-b hands
    // calls that change something to the leader (its peer server, mutual
    // TLS) and answers reads itself, so calls neither hang nor fail.
    {
        let mut standby = cinderblock::csi::controller_client::ControllerClient::new(
            common::csi_channel(&format!("unix://{}/ctrl-b.sock", d.display())).await,
        );
        let cap = cinderblock::csi::VolumeCapability {
            access_type: Some(cinderblock::csi::volume_capability::AccessType::Mount(Default::default())),
            access_mode: Some(cinderblock::csi::volume_capability::AccessMode {
                mode: cinderblock::csi::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
            }),
        };
        let mut req = tonic::Request::new(cinderblock::csi::CreateVolumeRequest {
            name: "through-the-standby".into(),
            capacity_range: Some(cinderblock::csi::CapacityRange { required_bytes: 32 * MI, limit_bytes: 0 }),
            volume_capabilities: vec![cap],
            ..Default::default()
        });
        req.set_timeout(Duration::from_secs(30));
        let v = standby.create_volume(req).await.expect("CreateVolume through the standby").into_inner().volume.unwrap();
        let rec = bvols.get(&v.volume_id).await.unwrap();
        assert_eq!(rec.data["spec"]["phase"], "Available");
        let leader = leases.get("cinderblock-controller").await.unwrap().spec.unwrap().holder_identity.unwrap();
        assert_eq!(leader, "ctrl-a", "ctrl-a leads throughout");
        let a_log = std::fs::read_to_string(d.join("ctrl-a.log")).unwrap();
        assert!(a_log.contains(&v.volume_id), "the leader (ctrl-a) made {}: its log does not name it", v.volume_id);
        let got = standby
            .controller_get_volume(cinderblock::csi::ControllerGetVolumeRequest { volume_id: v.volume_id.clone() })
            .await
            .expect("a read answered by the standby")
            .into_inner();
        assert_eq!(got.volume.unwrap().volume_id, v.volume_id);
        standby
            .delete_volume(cinderblock::csi::DeleteVolumeRequest { volume_id: v.volume_id.clone(), ..Default::default() })
            .await
            .expect("DeleteVolume through the standby");
        eventually("the standby-made volume removed", Duration::from_secs(30), || async {
            bvols.get_opt(&v.volume_id).await.ok()?.is_none().then_some(())
        })
        .await;
        assert!(images(&pools).is_empty(), "{:?}", images(&pools));
        // The standby counts what it handed on.
        let metrics_addr = common::metrics_address_in_log(&d.join("ctrl-b.log")).expect("ctrl-b's metrics address in its log");
        let metrics = common::http_get(&metrics_addr, "/metrics");
        for method in ["CreateVolume", "DeleteVolume"] {
            let line = format!("cinderblock_controller_forwarded_calls_total{{service=\"csi.v1.Controller\",method=\"{method}\"}} 1");
            assert!(metrics.lines().any(|l| l == line), "no {line:?} on ctrl-b:\n{metrics}");
        }
    }

    // 6. The leader killed mid-provisioning: the standby finishes, no duplicate, no leak.
    // A clone of a volume full of data is a slow copy on these (non-reflink) pools.
    pvcs.create(&PostParams::default(), &pvc("source", 256 * MI, None)).await.unwrap();
    let src_pv = bound_pv(&pvcs, &pvs, "source").await;
    let src_img = pools.iter().find(|(n, _)| *n == pv_node(&src_pv)).unwrap().1.join("volumes").join(format!("{}.img", handle(&src_pv)));
    common::write_pattern(&src_img, 0, (256 * MI) as usize, 7);
    pvcs.create(&PostParams::default(), &pvc("failover", 256 * MI, Some(ds("PersistentVolumeClaim", "source", None)))).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    ctrl_a.kill9();
    prov_a.kill9();
    snapshotter.kill9();
    resizer.kill9();
    // The standby's sidecar (in a cluster: the provisioner in the standby's pod).
    let _prov_b = sidecar("csi-provisioner@b", "ctrl-b", &prov_flags);
    let pv = bound_pv(&pvcs, &pvs, "failover").await;
    let vol = handle(&pv);
    let leader = leases.get("cinderblock-controller").await.unwrap().spec.unwrap().holder_identity.unwrap();
    assert_eq!(leader, "ctrl-b", "the standby must have taken over");
    let named: Vec<_> = bvols
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|b| b.data["spec"]["metadata"]["csi.storage.k8s.io/pvc/name"] == "failover")
        .collect();
    assert_eq!(named.len(), 1, "exactly one BlockVolume for the PVC");
    let imgs: Vec<String> = images(&pools).into_iter().filter(|i| !i.ends_with(&handle(&src_pv))).collect();
    assert_eq!(imgs, vec![format!("{}/{vol}", pv_node(&pv))], "exactly one image for the clone, on the PV's node");
    assert_eq!(
        common::checksum(&src_img),
        common::checksum(&pools.iter().find(|(n, _)| *n == pv_node(&pv)).unwrap().1.join("volumes").join(format!("{vol}.img")))
    );
    pvcs.delete("failover", &DeleteParams::default()).await.unwrap();
    pvcs.delete("source", &DeleteParams::default()).await.unwrap();
    eventually("failover image removed", Duration::from_secs(60), || async { images(&pools).is_empty().then_some(()) }).await;
    let _ = BTreeMap::<(), ()>::new();
}
