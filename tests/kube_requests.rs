//! What the cluster mode costs the API server, as the API server itself
//! counts it (its `apiserver_request_total` metric): requests per
//! CreateVolume, and per node heartbeat. A real `cinderblock controller`
//! (watch caches) and two real `cinderblock node --register` processes on a
//! real kube-apiserver (scripts/k8s/testbed.sh; CINDERBLOCK_TEST_KUBECONFIG
//! names its admin kubeconfig and the cinderblock.dev CRDs are applied).

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cinderblock::csi;
use kube::api::{Api, DeleteParams, ListParams};
use kube::core::{ApiResource, DynamicObject};

const NODES: [&str; 2] = ["req-node-a", "req-node-b"];
const CREATES: usize = 20;
const BEAT_SECONDS: u64 = 10;

struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(d: &Path, name: &str, args: &[&str]) -> Killed {
    let log = std::fs::File::create(d.join(format!("{name}.log"))).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_cinderblock"))
        .args(args)
        .env("RUST_LOG", "info")
        .env_remove("POD_NAMESPACE")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {name}: {e}"));
    Killed(child)
}

/// Non-watch requests the API server has served, by resource.
async fn requests(client: &kube::Client) -> BTreeMap<String, f64> {
    let req = http::Request::get("/metrics").body(Vec::new()).unwrap();
    let text = client.request_text(req).await.expect("the API server's /metrics (admin may read it)");
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("apiserver_request_total{")) {
        let Some((labels, value)) = line.rsplit_once("} ") else { continue };
        let label = |key: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.trim_start_matches("apiserver_request_total{").strip_prefix(&format!("{key}=\"")))
                .map(|v| v.trim_end_matches('"').to_string())
        };
        let verb = label("verb").unwrap_or_default();
        if verb == "WATCH" || verb == "CONNECT" {
            continue; // long-running: opened once, not per operation
        }
        *out.entry(label("resource").unwrap_or_default()).or_default() += value.trim().parse::<f64>().unwrap_or(0.0);
    }
    out
}

fn diff(after: &BTreeMap<String, f64>, before: &BTreeMap<String, f64>, resource: &str) -> f64 {
    after.get(resource).copied().unwrap_or(0.0) - before.get(resource).copied().unwrap_or(0.0)
}

fn create_request(i: usize) -> csi::CreateVolumeRequest {
    csi::CreateVolumeRequest {
        name: format!("pvc-requests-{i}"),
        capacity_range: Some(csi::CapacityRange { required_bytes: 16 << 20, limit_bytes: 0 }),
        volume_capabilities: vec![csi::VolumeCapability {
            access_type: Some(csi::volume_capability::AccessType::Mount(Default::default())),
            access_mode: Some(csi::volume_capability::AccessMode {
                mode: csi::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
            }),
        }],
        // As csi-provisioner --extra-create-metadata sends them: Events go to the PVC.
        parameters: [
            ("csi.storage.k8s.io/pvc/name".to_string(), format!("claim-{i}")),
            ("csi.storage.k8s.io/pvc/namespace".to_string(), "default".to_string()),
        ]
        .into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_requests_per_create_and_per_heartbeat() {
    let Ok(admin) = std::env::var("CINDERBLOCK_TEST_KUBECONFIG") else {
        common::cannot_run("kube_requests", "set CINDERBLOCK_TEST_KUBECONFIG to a test bed's admin kubeconfig (scripts/test-all.sh does)");
        return;
    };
    let dir = tempfile::Builder::new().prefix("cinderblock-requests-").tempdir().unwrap();
    let d = dir.path();
    let client = cinderblock::kube::client(Some(Path::new(&admin))).await.unwrap();
    for ar in
        [ApiResource::erase::<cinderblock::kube::crds::StorageNode>(&()), ApiResource::erase::<cinderblock::kube::crds::BlockVolume>(&())]
    {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        api.delete_collection(&DeleteParams::default(), &ListParams::default()).await.unwrap();
    }

    let mut procs = vec![];
    let mut controller_tls = None;
    for n in NODES {
        let (ctl_tls, node_tls) = common::test_pki(d, n);
        controller_tls = Some(ctl_tls);
        let pool = d.join(format!("pool-{n}"));
        let args = [
            "node",
            "--pool",
            pool.to_str().unwrap(),
            "--node-id",
            n,
            "--zone",
            "zone-1",
            "--agent-listen",
            "127.0.0.1:0",
            "--endpoint",
            &format!("unix://{}/{n}.sock", d.display()),
            "--allowed-root",
            d.to_str().unwrap(),
            "--tls-dir",
            node_tls.to_str().unwrap(),
            "--register",
            "--kubeconfig",
            &admin,
            "--heartbeat-interval",
            "1",
            "--node-lease-namespace",
            "default",
        ];
        procs.push(start(d, n, &args));
    }
    let sock = d.join("controller.sock");
    let controller_tls = controller_tls.unwrap();
    let args = [
        "controller",
        "--endpoint",
        &format!("unix://{}", sock.display()),
        "--kubeconfig",
        &admin,
        "--tls-dir",
        controller_tls.to_str().unwrap(),
        "--heartbeat-timeout",
        "10",
        "--reconcile-interval",
        "3600",
        "--node-lease-namespace",
        "default",
    ];
    procs.push(start(d, "controller", &args));
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(
            Instant::now() < deadline,
            "the controller did not start: {}",
            std::fs::read_to_string(d.join("controller.log")).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let channel = common::csi_channel(&format!("unix://{}", sock.display())).await;
    let mut c = csi::controller_client::ControllerClient::new(channel);
    // Both nodes registered and alive in the controller's view.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let nodes = Api::<DynamicObject>::all_with(client.clone(), &ApiResource::erase::<cinderblock::kube::crds::StorageNode>(&()));
        let registered = nodes.list(&ListParams::default()).await.unwrap().items.len();
        let cap = c.get_capacity(csi::GetCapacityRequest::default()).await.map(|r| r.into_inner().available_capacity).unwrap_or(0);
        if registered == NODES.len() && cap > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "nodes did not register: {registered} records, capacity {cap}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Warm: connections to the agents are made, the first Event for a reporter is sent.
    c.create_volume(create_request(1000)).await.expect("CreateVolume");

    let before = requests(&client).await;
    for i in 0..CREATES {
        c.create_volume(create_request(i)).await.expect("CreateVolume");
    }
    let after = requests(&client).await;
    let records = diff(&after, &before, "blockvolumes");
    let events = diff(&after, &before, "events");
    let per_create = (records + events) / CREATES as f64;
    eprintln!(
        "per CreateVolume: {per_create:.2} requests ({records} on blockvolumes, {events} events for {CREATES} creates); \
         meanwhile {} on storagenodes (node reports) and {} on leases (heartbeats)",
        diff(&after, &before, "storagenodes"),
        diff(&after, &before, "leases")
    );
    assert!(
        per_create <= 3.0,
        "a CreateVolume costs at most 3 API requests; it cost {per_create:.2}: {records} record, {events} event requests for {CREATES}"
    );

    // Heartbeats of idle nodes: one Lease renewal each per interval, and no
    // StorageNode write while the pool's figures stay put.
    tokio::time::sleep(Duration::from_secs(3)).await; // the reports after the creates
    let before = requests(&client).await;
    tokio::time::sleep(Duration::from_secs(BEAT_SECONDS)).await;
    let after = requests(&client).await;
    let leases = diff(&after, &before, "leases");
    let node_records = diff(&after, &before, "storagenodes");
    let beats = (NODES.len() as u64 * BEAT_SECONDS) as f64;
    eprintln!(
        "{BEAT_SECONDS} s of {} idle nodes beating every 1 s: {leases} lease requests, {node_records} StorageNode requests",
        NODES.len()
    );
    // +1 per node for a beat at each edge of the window, +2 for the API
    // server's own identity lease (renewed every 10 s).
    assert!(leases <= beats + NODES.len() as f64 + 2.0, "{leases} lease requests for {beats} heartbeats");
    assert!(leases >= beats / 2.0, "the nodes renewed their leases only {leases} times in {beats} heartbeats");
    assert!(node_records <= NODES.len() as f64, "idle nodes wrote their records {node_records} times in {BEAT_SECONDS} s");
    drop(procs);
    // Leave the bed as found: the next test (or suite) may want it empty.
    for ar in
        [ApiResource::erase::<cinderblock::kube::crds::StorageNode>(&()), ApiResource::erase::<cinderblock::kube::crds::BlockVolume>(&())]
    {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        api.delete_collection(&DeleteParams::default(), &ListParams::default()).await.unwrap();
    }
}
