//! Trust in a cluster, on the real kube-apiserver of scripts/k8s/testbed.sh
//! with the chart's own RBAC and ValidatingAdmissionPolicy (as rendered in
//! deploy/cinderblock.yaml):
//! - node plugins get their certificates through CertificateSigningRequests
//!   that the controller signs for the node their token is bound to;
//! - node A's credentials cannot change node B's StorageNode (403), the
//!   controller's can;
//! - a leader paused (SIGSTOP) past its lease, a new leader acting, then the
//!   old one resumed: its pending destructive call is refused by the agent;
//! - the store emptied under a running controller: every image stays, byte
//!   for byte, the circuit breaker holds, with an event and a metric.
//!
//! There is no kubelet: each node plugin runs as a process with a service
//! account token bound (TokenRequest) to a Pod object placed on its node,
//! which is what a kubelet gives a pod. Runs when CINDERBLOCK_TEST_KUBECONFIG
//! names the bed's admin kubeconfig (scripts/test-all.sh sets it).

mod common;
#[path = "common/kube.rs"]
mod kube_bed;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cinderblock::csi;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::ApiResource;
use kube::Client;
use kube_bed::eventually;
use serde::Deserialize;
use serde_json::json;

const NS: &str = "cinderblock";
const NODE_SA: &str = "cinderblock-node";
const MIB: i64 = 1 << 20;

struct Proc {
    child: Child,
}

impl Proc {
    fn start(dir: &Path, name: &str, args: &[String], env: &[(&str, String)]) -> Proc {
        let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_cinderblock"))
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Proc { child }
    }
    fn signal(&self, sig: rustix::process::Signal) {
        rustix::process::kill_process(rustix::process::Pid::from_raw(self.child.id() as i32).unwrap(), sig).unwrap();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.signal(rustix::process::Signal::CONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Apply YAML documents with server-side apply, keeping only `kinds`.
async fn apply(client: &Client, yaml: &str, kinds: &[&str]) -> usize {
    let discovery = kube::Discovery::new(client.clone()).run().await.unwrap();
    let mut n = 0;
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let v = serde_yaml::Value::deserialize(doc).unwrap();
        if v.is_null() {
            continue;
        }
        let obj: DynamicObject = serde_yaml::from_value(v).unwrap();
        let tm = obj.types.clone().unwrap();
        if !kinds.contains(&tm.kind.as_str()) {
            continue;
        }
        let gvk = kube::core::GroupVersionKind::try_from(&tm).unwrap();
        let (ar, caps) = discovery.resolve_gvk(&gvk).unwrap_or_else(|| panic!("{gvk:?} unknown to the API server"));
        let api: Api<DynamicObject> = match (caps.scope, obj.metadata.namespace.as_deref()) {
            (kube::discovery::Scope::Namespaced, Some(ns)) => Api::namespaced_with(client.clone(), ns, &ar),
            _ => Api::all_with(client.clone(), &ar),
        };
        let name = obj.metadata.name.clone().unwrap();
        api.patch(&name, &PatchParams::apply("cinderblock-trust-test").force(), &Patch::Apply(&obj)).await.unwrap();
        n += 1;
    }
    n
}

async fn apply_crds(client: &Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    apply(client, &cinderblock::kube::crds::all_yaml(), &["CustomResourceDefinition"]).await;
    for crd in ["blockvolumes", "blocksnapshots", "storagenodes", "blockexports", "blockgroupsnapshots"] {
        let name = format!("{crd}.cinderblock.dev");
        eventually(&format!("CRD {name}"), Duration::from_secs(30), || async {
            let c = api.get(&name).await.ok()?;
            c.status?.conditions?.iter().any(|c| c.type_ == "Established" && c.status == "True").then_some(())
        })
        .await;
    }
}

/// A kubeconfig for the node plugin on `node`: a service account token
/// bound to a Pod placed on that node, as the kubelet would mount it.
async fn node_kubeconfig(client: &Client, admin: &Path, node: &str, out: &Path) -> PathBuf {
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    let pod_name = format!("plugin-{node}");
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": pod_name, "namespace": NS},
        "spec": {"nodeName": node, "serviceAccountName": NODE_SA, "automountServiceAccountToken": false,
                 "containers": [{"name": "plugin", "image": "cinderblock:test"}]}
    }))
    .unwrap();
    let _ = pods.create(&PostParams::default(), &pod).await;
    let pod = pods.get(&pod_name).await.unwrap();
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), NS);
    let tr = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: None,
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod_name.clone()),
                uid: pod.metadata.uid.clone(),
            }),
            expiration_seconds: Some(3600),
        }),
        ..Default::default()
    };
    let token = sas.create_token_request(NODE_SA, &PostParams::default(), &tr).await.unwrap().status.unwrap().token.unwrap();
    // The admin's kubeconfig with its user swapped for the token.
    let mut kc: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(admin).unwrap()).unwrap();
    let user = format!("{node}-plugin");
    kc["users"] = serde_yaml::from_str(&format!("[{{name: {user}, user: {{token: {token}}}}}]")).unwrap();
    for c in kc["contexts"].as_sequence_mut().unwrap() {
        c["context"]["user"] = user.clone().into();
    }
    std::fs::write(out, serde_yaml::to_string(&kc).unwrap()).unwrap();
    out.to_path_buf()
}

async fn csi_client(sock: &Path) -> csi::controller_client::ControllerClient<tonic::transport::Channel> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(ch) = tonic::transport::Endpoint::from_shared(format!("unix://{}", sock.display())).unwrap().connect().await {
            return csi::controller_client::ControllerClient::new(ch);
        }
        assert!(Instant::now() < deadline, "no CSI endpoint at {}", sock.display());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn create_req(name: &str, node: &str) -> csi::CreateVolumeRequest {
    use csi::volume_capability::{AccessMode, AccessType, MountVolume};
    let seg = BTreeMap::from([(cinderblock::TOPOLOGY_NODE_KEY.to_string(), node.to_string())]);
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange { required_bytes: 8 * MIB, limit_bytes: 0 }),
        volume_capabilities: vec![csi::VolumeCapability {
            access_mode: Some(AccessMode { mode: csi::volume_capability::access_mode::Mode::SingleNodeWriter as i32 }),
            access_type: Some(AccessType::Mount(MountVolume::default())),
        }],
        accessibility_requirements: Some(csi::TopologyRequirement {
            requisite: vec![csi::Topology { segments: seg.clone().into_iter().collect() }],
            preferred: vec![csi::Topology { segments: seg.into_iter().collect() }],
        }),
        ..Default::default()
    }
}

fn images(pools: &[(String, PathBuf)]) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (node, pool) in pools {
        for sub in ["volumes", "snapshots", "orphaned"] {
            for f in std::fs::read_dir(pool.join(sub)).into_iter().flatten().flatten() {
                let name = f.file_name().to_string_lossy().into_owned();
                if name.ends_with(".img") {
                    out.insert(format!("{node}/{sub}/{name}"), common::checksum(&f.path()));
                }
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trust_on_a_real_api_server() {
    let Ok(admin) = std::env::var("CINDERBLOCK_TEST_KUBECONFIG") else {
        common::cannot_run("trust_on_a_real_api_server", "needs CINDERBLOCK_TEST_KUBECONFIG (scripts/test-all.sh sets it)");
        return;
    };
    let admin = PathBuf::from(admin);
    let dir = tempfile::Builder::new().prefix("cinderblock-trust-").tempdir().unwrap();
    let d = dir.path();
    eprintln!("trust test work folder: {}", d.display());
    let client = cinderblock::kube::client(Some(&admin)).await.unwrap();
    apply_crds(&client).await;
    // Start from no records (an earlier test on this bed registered its own nodes).
    for ar in [
        ApiResource::erase::<cinderblock::kube::crds::StorageNode>(&()),
        ApiResource::erase::<cinderblock::kube::crds::BlockVolume>(&()),
        ApiResource::erase::<cinderblock::kube::crds::BlockSnapshot>(&()),
    ] {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        api.delete_collection(&DeleteParams::default(), &ListParams::default()).await.unwrap();
    }

    // The chart's objects for the node plugins and the policy, as rendered in deploy/.
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let _ = namespaces.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": NS}})).unwrap()).await;
    let rendered = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/cinderblock.yaml")).unwrap();
    let applied = apply(
        &client,
        &rendered,
        &[
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding",
        ],
    )
    .await;
    assert!(applied >= 10, "deploy/cinderblock.yaml gave only {applied} objects");
    let nodes: Api<Node> = Api::all(client.clone());
    for n in ["node-a", "node-b"] {
        let _ = nodes.create(&PostParams::default(), &serde_json::from_value(json!({"metadata": {"name": n}})).unwrap()).await;
    }

    // Two controller replicas: the CA in a Secret, node certificates signed on request.
    let hold = d.join("hold-agent-writes");
    let controller = |id: &str| -> Vec<String> {
        [
            "controller",
            "--endpoint",
            &format!("unix://{}/{id}.sock", d.display()),
            "--kubeconfig",
            admin.to_str().unwrap(),
            "--leader-election",
            "--leader-election-namespace",
            NS,
            "--leader-election-lease",
            "cinderblock-trust",
            "--identity",
            id,
            "--lease-duration",
            "4",
            "--heartbeat-timeout",
            "10",
            "--reconcile-interval",
            "1",
            "--stuck-grace",
            "2",
            "--tls-dir",
            &format!("{}/{id}-tls", d.display()),
            "--tls-namespace",
            NS,
            "--tls-ca-secret",
            "cinderblock-ca",
            "--node-service-account",
            &format!("system:serviceaccount:{NS}:{NODE_SA}"),
            "--metrics-addr",
            "127.0.0.1:0",
            "--node-lease-namespace",
            NS,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let ctrl_a = Proc::start(d, "ctrl-a", &controller("ctrl-a"), &[("CINDERBLOCK_TEST_HOLD_AGENT_WRITES", hold.display().to_string())]);
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(client.clone(), NS);
    let holder = || async { leases.get("cinderblock-trust").await.ok().and_then(|l| l.spec?.holder_identity) };
    eventually("ctrl-a leads", Duration::from_secs(30), || async { (holder().await.as_deref() == Some("ctrl-a")).then_some(()) }).await;
    let _ctrl_b = Proc::start(d, "ctrl-b", &controller("ctrl-b"), &[]);

    // Two node plugins, each with its pod's bound token: certificates by CSR.
    let mut pools = vec![];
    let mut node_procs = vec![];
    let mut node_kcs = BTreeMap::new();
    for n in ["node-a", "node-b"] {
        let kc = node_kubeconfig(&client, &admin, n, &d.join(format!("{n}.kubeconfig"))).await;
        node_kcs.insert(n, kc.clone());
        let pool = d.join(n).join("pool");
        pools.push((n.to_string(), pool.clone()));
        let args: Vec<String> = [
            "node",
            "--pool",
            pool.to_str().unwrap(),
            "--node-id",
            n,
            "--agent-listen",
            "127.0.0.1:0",
            "--endpoint",
            &format!("unix://{}/{n}.sock", d.display()),
            "--allowed-root",
            d.to_str().unwrap(),
            "--register",
            "--kubeconfig",
            kc.to_str().unwrap(),
            "--heartbeat-interval",
            "1",
            "--tls-dir",
            &format!("{}/{n}-tls", d.display()),
            "--tls-bootstrap",
            "--tls-namespace",
            NS,
            "--tls-ca-configmap",
            "cinderblock-ca",
            "--node-lease-namespace",
            NS,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        node_procs.push(Proc::start(d, n, &args, &[]));
    }
    let snodes: Api<DynamicObject> = Api::all_with(client.clone(), &ApiResource::erase::<cinderblock::kube::crds::StorageNode>(&()));
    for n in ["node-a", "node-b"] {
        eventually(&format!("StorageNode {n} registered with its own token"), Duration::from_secs(60), || async {
            snodes.get(n).await.ok().map(|_| ())
        })
        .await;
        let cert = eventually(&format!("{n}'s certificate"), Duration::from_secs(30), || async {
            std::fs::read(d.join(format!("{n}-tls/tls.crt"))).ok()
        })
        .await;
        let der = rustls_pki_types::pem::PemObject::from_pem_slice(&cert).map(|c: rustls_pki_types::CertificateDer<'static>| c).unwrap();
        assert_eq!(cinderblock::tls::peers_of(&der), vec![cinderblock::tls::Peer::Node(n.to_string())], "{n}'s certificate");
    }

    // 1. The policy: node-a's credentials cannot change node-b's record; its own, yes; the controller's (admin) can.
    let node_a = cinderblock::kube::client(Some(&node_kcs["node-a"])).await.unwrap();
    let as_a: Api<DynamicObject> = Api::all_with(node_a.clone(), &ApiResource::erase::<cinderblock::kube::crds::StorageNode>(&()));
    // An update (what RBAC allows the node plugin) of node-b's record with another agent address.
    let mut b_rec = as_a.get("node-b").await.expect("node plugins may read StorageNodes");
    b_rec.data["spec"]["agent_address"] = json!("https://10.9.9.9:1");
    let denied = as_a.replace("node-b", &PostParams::default(), &b_rec).await.expect_err("node-a changed node-b's record");
    match denied {
        kube::Error::Api(s) => {
            assert_eq!(s.code, 403, "{s:?}");
            assert!(s.message.contains("only its own StorageNode"), "{}", s.message);
        }
        e => panic!("expected 403, got {e}"),
    }
    as_a.delete("node-b", &DeleteParams::default()).await.expect_err("node-a deleted node-b's record");
    let mut a_rec = as_a.get("node-a").await.unwrap();
    a_rec.metadata.labels = Some([("checked".to_string(), "yes".to_string())].into());
    as_a.replace("node-a", &PostParams::default(), &a_rec).await.expect("node-a may change its own record");
    snodes
        .patch("node-b", &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"checked": "yes"}}})))
        .await
        .expect("the controller's (admin) credentials may change any record");
    assert_ne!(snodes.get("node-b").await.unwrap().data["spec"]["agent_address"], "https://10.9.9.9:1");

    // 2. Certificate requests: only the node plugins' account, only for its own node.
    let csrs: Api<CertificateSigningRequest> = Api::all(client.clone());
    let (request, _) = cinderblock::tls::authority::certificate_request(&cinderblock::tls::Peer::Node("node-b".into())).unwrap();
    let csr = |name: &str| -> CertificateSigningRequest {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"request": k8s_openapi::ByteString(request.clone().into_bytes()), "signerName": cinderblock::kube::certs::SIGNER,
                     "usages": ["digital signature", "key encipherment", "server auth", "client auth"]}
        }))
        .unwrap()
    };
    csrs.create(&PostParams::default(), &csr("by-the-admin")).await.unwrap();
    let as_a_csrs: Api<CertificateSigningRequest> = Api::all(node_a.clone());
    as_a_csrs.create(&PostParams::default(), &csr("node-a-asks-for-node-b")).await.unwrap();
    let denied = eventually("the admin's request denied", Duration::from_secs(30), || async {
        let c = csrs.get("by-the-admin").await.ok()?;
        c.status?.conditions?.into_iter().find(|c| c.type_ == "Denied")
    })
    .await;
    assert!(denied.message.unwrap_or_default().contains("not by the node plugins' service account"));
    let signed = eventually("node-a's request signed", Duration::from_secs(30), || async {
        csrs.get("node-a-asks-for-node-b").await.ok()?.status?.certificate
    })
    .await;
    let der = rustls_pki_types::pem::PemObject::from_pem_slice(&signed.0).map(|c: rustls_pki_types::CertificateDer<'static>| c).unwrap();
    assert_eq!(
        cinderblock::tls::peers_of(&der),
        vec![cinderblock::tls::Peer::Node("node-a".into())],
        "a request from node-a's pod is signed for node-a, whatever it asks"
    );

    // 3. Fencing: ctrl-a, the leader, is paused right before a call that
    // changes data (the hold), then stopped past its lease; ctrl-b takes
    // over and acts; ctrl-a resumes and its call is refused by the agent.
    let mut a = csi_client(&d.join("ctrl-a.sock")).await;
    let vol = a.create_volume(create_req("fenced-volume", "node-a")).await.unwrap().into_inner().volume.unwrap().volume_id;
    let before = images(&pools);
    std::fs::write(&hold, b"").unwrap();
    let pending = tokio::spawn({
        let mut a = a.clone();
        let vol = vol.clone();
        async move { a.delete_volume(csi::DeleteVolumeRequest { volume_id: vol, ..Default::default() }).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await; // the delete reaches the hold
    ctrl_a.signal(rustix::process::Signal::STOP);
    eventually("ctrl-b leads", Duration::from_secs(30), || async { (holder().await.as_deref() == Some("ctrl-b")).then_some(()) }).await;
    let mut b = csi_client(&d.join("ctrl-b.sock")).await;
    let other = eventually("ctrl-b creates a volume on node-a", Duration::from_secs(30), || {
        let mut b = b.clone();
        async move { b.create_volume(create_req("after-failover", "node-a")).await.ok() }
    })
    .await
    .into_inner()
    .volume
    .unwrap()
    .volume_id;
    std::fs::remove_file(&hold).unwrap();
    ctrl_a.signal(rustix::process::Signal::CONT);
    let refused = tokio::time::timeout(Duration::from_secs(60), pending).await.expect("the resumed call ends").unwrap();
    let e = refused.expect_err("the deposed leader's delete went through");
    assert!(e.message().contains("fenced"), "refused, but not by the fence: {e:?}");
    let after = images(&pools);
    for (img, sum) in &before {
        assert_eq!(after.get(img), Some(sum), "{img} changed or vanished");
    }
    assert!(after.keys().any(|k| k.ends_with(&format!("{other}.img"))));
    let node_a_log = std::fs::read_to_string(d.join("node-a.log")).unwrap();
    assert!(node_a_log.contains("refused a call from a deposed controller leader"), "node-a's log does not show the refusal");

    // 4. The store emptied under the running leader: nothing is lost.
    for i in 0..8 {
        b.create_volume(create_req(&format!("keep-{i}"), if i % 2 == 0 { "node-a" } else { "node-b" })).await.unwrap();
    }
    for (_, pool) in &pools {
        for f in std::fs::read_dir(pool.join("volumes")).unwrap().flatten() {
            if f.path().extension().is_some_and(|x| x == "img") {
                common::write_pattern(&f.path(), 1 << 20, 100_000, 3);
            }
        }
    }
    let before = images(&pools);
    let bvols: Api<DynamicObject> = Api::all_with(client.clone(), &ApiResource::erase::<cinderblock::kube::crds::BlockVolume>(&()));
    let bsnaps: Api<DynamicObject> = Api::all_with(client.clone(), &ApiResource::erase::<cinderblock::kube::crds::BlockSnapshot>(&()));
    bvols.delete_collection(&DeleteParams::default(), &ListParams::default()).await.unwrap();
    bsnaps.delete_collection(&DeleteParams::default(), &ListParams::default()).await.unwrap();
    // Several reconcile passes (every second, grace 2 s).
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(images(&pools), before, "an image changed or vanished after the store was emptied");
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::all(client.clone());
    let held = eventually("QuarantineHeld events on both StorageNodes", Duration::from_secs(30), || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        let on: std::collections::BTreeSet<String> = list
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some("QuarantineHeld"))
            .filter_map(|e| e.regarding.and_then(|r| r.name))
            .collect();
        (on.contains("node-a") && on.contains("node-b")).then_some(on)
    })
    .await;
    eprintln!("breaker held on {held:?}");
    let metrics_addr = eventually("ctrl-b's metrics address in its log", Duration::from_secs(5), || async {
        common::metrics_address_in_log(&d.join("ctrl-b.log"))
    })
    .await;
    let metrics = common::http_get(&metrics_addr, "/metrics");
    assert!(
        metrics.lines().any(|l| l.starts_with("cinderblock_reconciler_breaker_held_total{node=\"node-a\"}")),
        "no breaker metric on ctrl-b"
    );
    drop(node_procs);
}
