//! Node registration: each node reports its pool and topology to the store,
//! and says it is alive every few seconds; the scheduler skips nodes that
//! have gone silent.
//!
//! A heartbeat is one small write (`Store::renew_liveness`: a Lease in a
//! cluster). The node's record is written only when what it reports
//! changes: its pool, its counts, or its free space by more than
//! `FREE_SLACK` of the pool. The controller's node view adds its own
//! reservations on top, and the node refuses what does not fit anyway.

use std::sync::Arc;
use std::time::Duration;

use tracing::warn;

use crate::controller::records::{pool_status_to_node, NodeRec};
use crate::store::{self, Kind, Store, StoreError};
use crate::volume::Pool;

/// Free space moves with every write to the pool's filesystem (logs, other
/// tenants); a change smaller than this share of the pool (in thousandths)
/// is not worth a write.
const FREE_SLACK_PER_MILLE: u64 = 5;

pub struct Registration {
    pub node_id: String,
    pub zone: String,
    pub agent_address: String,
    pub max_volumes: u32,
    /// This node's remote attach engine and TLS mode, reported with its pool.
    attach: Option<(&'static str, &'static str)>,
    /// The record as last written and its version; None until the first
    /// report (which reads what the store holds).
    written: Option<(NodeRec, u64)>,
}

impl Registration {
    pub fn new(node_id: String, zone: String, agent_address: String, max_volumes: u32) -> Self {
        Registration { node_id, zone, agent_address, max_volumes, attach: None, written: None }
    }

    /// Report `engine` and `tls` (see `attach::nbd::Engine`) as how this
    /// node attaches other nodes' volumes.
    pub fn with_attach(mut self, engine: &'static str, tls: &'static str) -> Self {
        self.attach = Some((engine, tls));
        self
    }

    /// Write this node's record if it changed, and say the node is alive.
    pub async fn report(&mut self, store: &dyn Store, pool: &Arc<Pool>) -> Result<(), String> {
        let p = pool.clone();
        let node_id = self.node_id.clone();
        let mut status = tokio::task::spawn_blocking(move || crate::agent::status_to_pb(&node_id, &p))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        if let Some((engine, tls)) = self.attach {
            (status.attach_engine, status.attach_tls) = (engine.to_string(), tls.to_string());
        }
        self.report_status(store, status).await
    }

    /// As `report`, from a status the node's agent gave (a registrar that
    /// does not hold the pool itself).
    pub async fn report_status(&mut self, store: &dyn Store, status: crate::agent_proto::PoolStatus) -> Result<(), String> {
        crate::metrics::METRICS.set_pool(&self.node_id, status.total_bytes, status.free_bytes, status.provisioned_bytes);
        let labels = crate::metrics::PoolLabels { node: self.node_id.clone() };
        crate::metrics::METRICS.pool_orphans.get_or_create(&labels).set(i64::from(status.orphan_count));
        let rec = pool_status_to_node(&self.node_id, &self.zone, &self.agent_address, self.max_volumes, &status);
        let unchanged = self.written.as_ref().is_some_and(|(old, _)| same_report(old, &rec));
        if !unchanged {
            self.write(store, rec.clone()).await?;
        }
        let missing = store.renew_liveness(&self.node_id).await.map_err(|e| e.to_string())?;
        if missing && unchanged {
            // The record was deleted (an operator resolving a mismatch):
            // register again, from what the store holds now.
            self.written = None;
            self.write(store, rec).await?;
        }
        let mismatched = self.written.as_ref().is_some_and(|(r, _)| r.mismatch.is_some());
        crate::metrics::METRICS.node_mismatched.get_or_create(&labels).set(i64::from(mismatched));
        Ok(())
    }

    /// Writes `rec`, keeping what the store says of the node's identity.
    async fn write(&mut self, store: &dyn Store, mut rec: NodeRec) -> Result<(), String> {
        for _ in 0..5 {
            let first = self.written.is_none();
            let existing = match self.written.take() {
                Some(w) => Some(w),
                None => store::get_json::<NodeRec>(store, Kind::Node, &self.node_id).await.map_err(|e| e.to_string())?,
            };
            self.settle_identity(store, &mut rec, existing.as_ref().map(|(n, _)| n), first).await?;
            let written = match &existing {
                None => store::create_json(store, Kind::Node, &self.node_id, &rec).await,
                Some((_, version)) => store::update_json(store, Kind::Node, &self.node_id, &rec, *version).await,
            };
            match written {
                Ok(version) => {
                    self.written = Some((rec, version));
                    return Ok(());
                }
                // Someone else wrote the record (the controller marking a
                // mismatch, an operator): read it again and keep what it says.
                Err(StoreError::Conflict { .. } | StoreError::AlreadyExists { .. } | StoreError::NotFound { .. }) => {
                    self.written = None;
                    continue;
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        Err(format!("node {}: the record kept changing while it was written; retrying at the next report", self.node_id))
    }

    /// The record's pool is the one the node first registered with. A
    /// different pool under the same name (a node rebuilt with an empty
    /// pool, a store restored from a backup), or this pool under another
    /// name (a renamed node), is a mismatch for a person to resolve: volumes
    /// recorded on this node would otherwise look lost. Another node with
    /// this pool is looked for when the process starts (a rename needs a
    /// restart), not at every write.
    async fn settle_identity(&self, store: &dyn Store, rec: &mut NodeRec, old: Option<&NodeRec>, first: bool) -> Result<(), String> {
        if let Some(old) = old {
            rec.mismatch = old.mismatch.clone();
            rec.evacuating = old.evacuating;
            if !old.pool_uuid.is_empty() && old.pool_uuid != rec.pool_uuid {
                rec.mismatch = Some(format!(
                    "node {} now serves pool {} but registered with pool {}; delete the StorageNode {} to accept the new pool",
                    self.node_id, rec.pool_uuid, old.pool_uuid, self.node_id
                ));
                rec.pool_uuid = old.pool_uuid.clone();
            }
        }
        if rec.mismatch.is_none() && first {
            let others: Vec<(NodeRec, u64)> = store::list_json(store, Kind::Node).await.map_err(|e| e.to_string())?;
            if let Some((other, _)) = others.iter().find(|(n, _)| n.id != self.node_id && n.pool_uuid == rec.pool_uuid) {
                rec.mismatch = Some(format!(
                    "pool {} is registered as node {}; was the node renamed? Delete the StorageNode {} if it is gone for good",
                    rec.pool_uuid, other.id, other.id
                ));
            }
        }
        if let Some(m) = &rec.mismatch {
            warn!(node = %self.node_id, mismatch = %m, "node registered as mismatched: the controller writes nothing here");
        }
        Ok(())
    }

    /// Report now and then every `every`, until the task is dropped.
    pub async fn run(mut self, store: Arc<dyn Store>, pool: Arc<Pool>, every: Duration) {
        loop {
            if let Err(e) = self.report(&*store, &pool).await {
                warn!(node = %self.node_id, error = %e, "node report failed");
            }
            tokio::time::sleep(every).await;
        }
    }
}

/// The same report but for the time it was made and small moves of free space.
fn same_report(old: &NodeRec, new: &NodeRec) -> bool {
    let slack = old.capacity.total / 1000 * FREE_SLACK_PER_MILLE;
    let free_close = old.capacity.free.abs_diff(new.capacity.free) <= slack;
    let mut a = old.clone();
    let mut b = new.clone();
    (a.heartbeat_ms, b.heartbeat_ms) = (0, 0);
    (a.capacity.free, b.capacity.free) = (0, 0);
    // The identity fields are settled against the store when written.
    (a.mismatch, b.mismatch) = (None, None);
    (a.evacuating, b.evacuating) = (false, false);
    b.pool_uuid.clone_from(&a.pool_uuid);
    free_close && a == b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::PoolCapacity;

    fn rec(free: u64) -> NodeRec {
        let state = crate::scheduler::NodeState {
            id: "n1".into(),
            zone: String::new(),
            capacity: PoolCapacity { total: 1000 << 20, free, provisioned: 0, max_over_subscription_ratio: 20.0, reserved_percentage: 0 },
            volume_count: 0,
            max_volumes: 0,
            last_heartbeat_ms: 1,
            reflink: false,
        };
        NodeRec {
            agent_address: "https://127.0.0.1:1".into(),
            filesystem: "ext4".into(),
            pool_uuid: "p".into(),
            ..NodeRec::of_state(&state)
        }
    }

    #[test]
    fn a_report_is_written_again_only_when_it_changed() {
        let old = rec(500 << 20);
        let mut later = rec((500 << 20) + (4 << 20));
        later.heartbeat_ms = 99;
        assert!(same_report(&old, &later), "4 MiB of a 1000 MiB pool is within the slack, and the time does not count");
        assert!(!same_report(&old, &rec(400 << 20)), "100 MiB less free is news");
        let mut one_more = rec(500 << 20);
        one_more.volume_count = 1;
        assert!(!same_report(&old, &one_more), "a new volume is news");
        let mut provisioned = rec(500 << 20);
        provisioned.capacity.provisioned = 1;
        assert!(!same_report(&old, &provisioned));
    }
}
