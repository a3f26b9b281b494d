//! The store's behaviour suite against the custom-resource store on a real
//! kube-apiserver. Runs when CINDERBLOCK_TEST_KUBECONFIG names the admin
//! kubeconfig of a test bed whose cinderblock.dev CRDs are installed
//! (scripts/test-all.sh starts one: see scripts/k8s/).
//!
//! The suite stores arbitrary bytes; the CRDs hold typed records. A thin
//! adapter (test-only) carries the suite's bytes, hex-encoded, inside an
//! otherwise fixed valid record of each kind, so the suite checks exactly
//! the kube store's versions, compare-and-set, lists and deletes.

mod common;
mod store_suite;

use std::collections::BTreeMap;

use cinderblock::controller::records::{ExportRec, GroupSnapshotRec, NodeRec, Phase, SnapshotRec, VolumeRec};
use cinderblock::store::{Change, Kind, Store, StoreError, Versioned};
use cinderblock::volume::{PoolCapacity, Provisioning};

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

fn encode(kind: Kind, id: &str, bytes: &[u8]) -> Vec<u8> {
    let carrier = hex(bytes);
    let v = match kind {
        Kind::Volume => serde_json::to_vec(&VolumeRec {
            id: id.into(),
            name: id.into(),
            size_bytes: 4096,
            node: None,
            phase: Phase::Creating,
            source: None,
            provisioning: Provisioning::Thin,
            parameters: BTreeMap::new(),
            fingerprint: carrier,
            accessible_topology: vec![],
            attempts: vec![],
            error: None,
            metadata: BTreeMap::new(),
            created_ms: 1,
            updated_ms: 1,
            accessibility: Default::default(),
            copy: None,
            migration: None,
        }),
        Kind::Snapshot => serde_json::to_vec(&SnapshotRec {
            id: id.into(),
            name: carrier,
            source_volume_id: "vol-x".into(),
            node: "node-x".into(),
            size_bytes: 4096,
            phase: Phase::Creating,
            error: None,
            metadata: BTreeMap::new(),
            created_ms: 1,
            group_id: None,
        }),
        Kind::Node => serde_json::to_vec(&NodeRec {
            id: id.into(),
            zone: String::new(),
            agent_address: "http://127.0.0.1:1".into(),
            capacity: PoolCapacity { total: 1, free: 1, provisioned: 0, max_over_subscription_ratio: 1.5, reserved_percentage: 0 },
            volume_count: 0,
            snapshot_count: 0,
            max_volumes: 0,
            reflink: false,
            filesystem: carrier,
            heartbeat_ms: 1,
            pool_uuid: String::new(),
            mismatch: None,
            orphan_count: 0,
            orphan_bytes: 0,
            broken_count: 0,
            attach_engine: "kernel-nbd".into(),
            attach_tls: "kernel-tls".into(),
            evacuating: false,
        }),
        Kind::Export => serde_json::to_vec(&ExportRec {
            id: id.into(),
            volume_id: "vol-x".into(),
            node_id: "node-x".into(),
            protocol: "nbd".into(),
            address: String::new(),
            export_name: carrier,
            phase: Phase::Creating,
            owner_node: String::new(),
            read_only: false,
            plain_text: true,
        }),
        Kind::GroupSnapshot => serde_json::to_vec(&GroupSnapshotRec {
            id: id.into(),
            name: carrier,
            source_volume_ids: vec!["vol-x".into()],
            snapshot_ids: vec!["snap-x".into()],
            phase: Phase::Creating,
            error: None,
            created_ms: 1,
        }),
    };
    v.unwrap()
}

fn decode(kind: Kind, value: &[u8]) -> Vec<u8> {
    let j: serde_json::Value = serde_json::from_slice(value).expect("the kube store returned JSON");
    let field = match kind {
        Kind::Volume => "fingerprint",
        Kind::Snapshot => "name",
        Kind::Node => "filesystem",
        Kind::Export => "export_name",
        Kind::GroupSnapshot => "name",
    };
    unhex(j[field].as_str().unwrap_or_default())
}

struct Carrier<S>(S);

fn dec(kind: Kind, v: Versioned) -> Versioned {
    Versioned { version: v.version, value: decode(kind, &v.value) }
}

fn dec_err(kind: Kind, e: StoreError) -> StoreError {
    match e {
        StoreError::AlreadyExists { kind: k, id, existing } => StoreError::AlreadyExists { kind: k, id, existing: dec(kind, existing) },
        other => other,
    }
}

#[tonic::async_trait]
impl<S: Store> Store for Carrier<S> {
    async fn get(&self, kind: Kind, id: &str) -> Result<Option<Versioned>, StoreError> {
        Ok(self.0.get(kind, id).await?.map(|v| dec(kind, v)))
    }
    async fn list(&self, kind: Kind) -> Result<Vec<(String, Versioned)>, StoreError> {
        Ok(self.0.list(kind).await?.into_iter().map(|(id, v)| (id, dec(kind, v))).collect())
    }
    async fn create(&self, kind: Kind, id: &str, value: Vec<u8>) -> Result<u64, StoreError> {
        self.0.create(kind, id, encode(kind, id, &value)).await.map_err(|e| dec_err(kind, e))
    }
    async fn update(&self, kind: Kind, id: &str, value: Vec<u8>, expected: u64) -> Result<u64, StoreError> {
        self.0.update(kind, id, encode(kind, id, &value), expected).await.map_err(|e| dec_err(kind, e))
    }
    async fn put(&self, kind: Kind, id: &str, value: Vec<u8>) -> Result<u64, StoreError> {
        self.0.put(kind, id, encode(kind, id, &value)).await.map_err(|e| dec_err(kind, e))
    }
    async fn delete(&self, kind: Kind, id: &str, expected: Option<u64>) -> Result<(), StoreError> {
        self.0.delete(kind, id, expected).await
    }
    async fn list_page(&self, kind: Kind, after: Option<&str>, limit: usize) -> Result<Vec<(String, Versioned)>, StoreError> {
        Ok(self.0.list_page(kind, after, limit).await?.into_iter().map(|(id, v)| (id, dec(kind, v))).collect())
    }
    // The feed carries the inner store's values (the suite checks IDs and versions only).
    fn changes(&self) -> tokio::sync::broadcast::Receiver<(u64, Change)> {
        self.0.changes()
    }
    fn change_seq(&self) -> u64 {
        self.0.change_seq()
    }
    async fn renew_liveness(&self, node: &str) -> Result<bool, StoreError> {
        self.0.renew_liveness(node).await
    }
    async fn liveness(&self) -> Result<Vec<(String, i64)>, StoreError> {
        self.0.liveness().await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_store_passes_the_behaviour_suite() {
    let Ok(path) = std::env::var("CINDERBLOCK_TEST_KUBECONFIG") else {
        common::cannot_run("kube_store", "set CINDERBLOCK_TEST_KUBECONFIG to a test bed's admin kubeconfig (scripts/test-all.sh does)");
        return;
    };
    let client = cinderblock::kube::client(Some(std::path::Path::new(&path))).await.unwrap();
    // The controller's store: caches filled by watches, writes to the API server.
    let watching = cinderblock::kube::KubeStore::watching(client, "default", std::time::Duration::from_secs(60)).await.unwrap();
    let store = Carrier(watching);
    store_suite::behaviour_suite(&store).await;
}
