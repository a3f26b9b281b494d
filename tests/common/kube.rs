//! What the tests on the Kubernetes test bed (scripts/k8s/testbed.sh) share:
//! processes they start and restart, waiting for a condition, our CRDs
//! applied, nodes registered as kubelet would, and the arguments of
//! `cinderblock node` and `cinderblock controller` processes on the bed.
//!
//! Only those tests include this file (`#[path = "common/kube.rs"] mod kube_bed;`
//! next to `mod common;`), so the other test binaries do not compile the
//! Kubernetes client code it uses.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::storage::v1::CSINode;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::Client;
use serde::Deserialize;
use serde_json::json;

pub const DRIVER: &str = "cinderblock.dev";

/// The admin kubeconfig of the test bed, from CINDERBLOCK_TEST_KUBECONFIG;
/// without it the test cannot run (a failure under CI=true).
#[macro_export]
macro_rules! require_kube_bed {
    () => {
        match std::env::var("CINDERBLOCK_TEST_KUBECONFIG") {
            Ok(k) => k,
            Err(_) => {
                common::cannot_run(
                    module_path!(),
                    "needs CINDERBLOCK_TEST_KUBECONFIG, the admin kubeconfig of a test bed (scripts/k8s/testbed.sh up; scripts/test-all.sh sets it)",
                );
                return;
            }
        }
    };
}

/// A process of the test, its stderr in `<dir>/<name>.log` (a restart
/// writes `<name>.<life>.log`); killed on drop.
pub struct Proc {
    pub name: String,
    pub child: Child,
    dir: PathBuf,
    cmd: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// 1 for the first start, 2 after the first restart, ...
    pub life: u32,
}

impl Proc {
    pub fn start(dir: &Path, name: &str, cmd: &Path, args: &[String], env: &[(&str, &str)]) -> Proc {
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let child = spawn(dir, name, 1, cmd, args, &env);
        Proc { name: name.to_string(), child, dir: dir.to_path_buf(), cmd: cmd.to_path_buf(), args: args.to_vec(), env, life: 1 }
    }

    /// SIGKILL, and wait for it to be gone.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Start it again with the same command, arguments and environment.
    pub fn restart(&mut self) {
        self.kill9();
        self.life += 1;
        self.child = spawn(&self.dir, &self.name, self.life, &self.cmd, &self.args, &self.env);
    }

    /// The log of its current life.
    pub fn log(&self) -> PathBuf {
        log_path(&self.dir, &self.name, self.life)
    }

    /// Every life's log, oldest first, as one text.
    pub fn all_logs(&self) -> String {
        (1..=self.life).map(|l| std::fs::read_to_string(log_path(&self.dir, &self.name, l)).unwrap_or_default()).collect()
    }
}

fn log_path(dir: &Path, name: &str, life: u32) -> PathBuf {
    if life == 1 {
        dir.join(format!("{name}.log"))
    } else {
        dir.join(format!("{name}.{life}.log"))
    }
}

fn spawn(dir: &Path, name: &str, life: u32, cmd: &Path, args: &[String], env: &[(String, String)]) -> Child {
    let log = std::fs::File::create(log_path(dir, name, life)).unwrap();
    Command::new(cmd)
        .args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("starting {name} ({}): {e}", cmd.display()))
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Poll `f` until it gives a value, at most `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Apply the CRDs of a multi-document YAML and wait until they are established.
pub async fn apply_crds(client: &Client, yaml: &str) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let mut names = vec![];
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let v = serde_yaml::Value::deserialize(doc).unwrap();
        if v.is_null() {
            continue;
        }
        let crd: CustomResourceDefinition = serde_yaml::from_value(v).unwrap();
        let name = crd.metadata.name.clone().unwrap();
        api.patch(&name, &PatchParams::apply("cinderblock-e2e").force(), &Patch::Apply(&crd)).await.unwrap();
        names.push(name);
    }
    for name in names {
        eventually(&format!("CRD {name} established"), Duration::from_secs(30), || {
            let api = api.clone();
            let name = name.clone();
            async move {
                let c = api.get(&name).await.ok()?;
                c.status?.conditions?.iter().any(|c| c.type_ == "Established" && c.status == "True").then_some(())
            }
        })
        .await;
    }
}

/// The Node and CSINode objects of `(name, zone)` nodes, as kubelet and
/// node-driver-registrar would make them (kept when they exist).
pub async fn register_nodes(client: &Client, nodes: &[(&str, &str)]) {
    let node_api: Api<Node> = Api::all(client.clone());
    let csinodes: Api<CSINode> = Api::all(client.clone());
    for &(name, zone) in nodes {
        let node: Node = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name,
                "labels": {"topology.kubernetes.io/zone": zone, cinderblock::TOPOLOGY_NODE_KEY: name, cinderblock::TOPOLOGY_ZONE_KEY: zone},
                "annotations": {"csi.volume.kubernetes.io/nodeid": format!("{{\"{DRIVER}\":\"{name}\"}}")}}
        }))
        .unwrap();
        let _ = node_api.create(&PostParams::default(), &node).await;
        let csinode: CSINode = serde_json::from_value(json!({
            "apiVersion": "storage.k8s.io/v1", "kind": "CSINode", "metadata": {"name": name},
            "spec": {"drivers": [{"name": DRIVER, "nodeID": name,
                "topologyKeys": [cinderblock::TOPOLOGY_NODE_KEY, cinderblock::TOPOLOGY_ZONE_KEY]}]}
        }))
        .unwrap();
        let _ = csinodes.create(&PostParams::default(), &csinode).await;
    }
}

/// A CA and certificate folders for the controller and `nodes`, made in
/// `<dir>/tls`; the folder of each peer by `peer_tls`.
pub fn local_pki(dir: &Path, nodes: &[&str]) -> PathBuf {
    use cinderblock::tls::Peer;
    let pki = dir.join("tls");
    let mut peers = vec![Peer::Controller];
    peers.extend(nodes.iter().map(|n| Peer::Node(n.to_string())));
    cinderblock::tls::authority::ensure_local_pki(&pki, &peers).unwrap();
    pki
}

pub fn peer_tls(pki: &Path, peer: &cinderblock::tls::Peer) -> String {
    cinderblock::tls::authority::local_peer_dir(pki, peer).display().to_string()
}

/// `cinderblock node` on the bed: its pool, its CSI socket `<dir>/<name>.sock`,
/// registered through `kubeconfig`, with its agent and NBD server on
/// `agent_listen` and `nbd_listen` (127.0.0.1:0 for any free port).
pub fn node_args(dir: &Path, name: &str, pool: &Path, kubeconfig: &str, pki: &Path, agent_listen: &str, nbd_listen: &str) -> Vec<String> {
    [
        "node",
        "--pool",
        pool.to_str().unwrap(),
        "--node-id",
        name,
        "--agent-listen",
        agent_listen,
        "--endpoint",
        &format!("unix://{}/{name}.sock", dir.display()),
        "--allowed-root",
        dir.to_str().unwrap(),
        "--register",
        "--kubeconfig",
        kubeconfig,
        "--heartbeat-interval",
        "1",
        "--nbd-listen",
        nbd_listen,
        "--tls-dir",
        &peer_tls(pki, &cinderblock::tls::Peer::Node(name.to_string())),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// `cinderblock controller` replica `id` on the bed, its CSI and admin
/// socket `<dir>/<id>.sock`, electing its leader on Lease `lease` in the
/// default namespace (4 s), with a peer server for the other replicas and
/// metrics on a free port.
pub fn controller_args(dir: &Path, id: &str, kubeconfig: &str, pki: &Path, lease: &str) -> Vec<String> {
    [
        "controller",
        "--endpoint",
        &format!("unix://{}/{id}.sock", dir.display()),
        "--kubeconfig",
        kubeconfig,
        "--leader-election",
        "--leader-election-namespace",
        "default",
        "--leader-election-lease",
        lease,
        "--identity",
        id,
        "--lease-duration",
        "4",
        "--heartbeat-timeout",
        "10",
        "--reconcile-interval",
        "2",
        "--stuck-grace",
        "8",
        "--tls-dir",
        &peer_tls(pki, &cinderblock::tls::Peer::Controller),
        "--peer-listen",
        "127.0.0.1:0",
        "--metrics-addr",
        "127.0.0.1:0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Who holds Lease `name` in the default namespace.
pub async fn lease_holder(client: &Client, name: &str) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
    leases.get(name).await.ok()?.spec?.holder_identity
}
