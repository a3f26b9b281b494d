//! Node registration: each node reports its pool and topology to the store
//! every few seconds; the scheduler skips nodes whose report is stale.

use std::sync::Arc;
use std::time::Duration;

use tracing::warn;

use super::records::{pool_status_to_node, NodeRec};
use crate::store::{self, Kind, Store};
use crate::volume::Pool;

pub struct Registration {
    pub node_id: String,
    pub zone: String,
    pub agent_address: String,
    pub max_volumes: u32,
}

impl Registration {
    /// Write this node's record once.
    pub async fn report(&self, store: &dyn Store, pool: &Arc<Pool>) -> Result<(), String> {
        let p = pool.clone();
        let node_id = self.node_id.clone();
        let status = tokio::task::spawn_blocking(move || crate::agent::status_to_pb(&node_id, &p))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        crate::metrics::METRICS.set_pool(&self.node_id, status.total_bytes, status.free_bytes, status.provisioned_bytes);
        let labels = crate::metrics::PoolLabels { node: self.node_id.clone() };
        crate::metrics::METRICS.pool_orphans.get_or_create(&labels).set(i64::from(status.orphan_count));
        let mut rec = pool_status_to_node(&self.node_id, &self.zone, &self.agent_address, self.max_volumes, &status);
        // The record's pool is the one the node first registered with. A
        // different pool under the same name (a node rebuilt with an empty
        // pool, a store restored from a backup), or this pool under another
        // name (a renamed node), is a mismatch for a person to resolve:
        // volumes recorded on this node would otherwise look lost.
        let existing: Option<(NodeRec, u64)> = store::get_json(store, Kind::Node, &self.node_id).await.map_err(|e| e.to_string())?;
        if let Some((old, _)) = &existing {
            rec.mismatch = old.mismatch.clone();
            if !old.pool_uuid.is_empty() && old.pool_uuid != rec.pool_uuid {
                rec.mismatch = Some(format!(
                    "node {} now serves pool {} but registered with pool {}; delete the StorageNode {} to accept the new pool",
                    self.node_id, rec.pool_uuid, old.pool_uuid, self.node_id
                ));
                rec.pool_uuid = old.pool_uuid.clone();
            }
        }
        if rec.mismatch.is_none() {
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
        crate::metrics::METRICS.node_mismatched.get_or_create(&labels).set(i64::from(rec.mismatch.is_some()));
        store::put_json(store, Kind::Node, &self.node_id, &rec).await.map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Report now and then every `every`, until the task is dropped.
    pub async fn run(self, store: Arc<dyn Store>, pool: Arc<Pool>, every: Duration) {
        loop {
            if let Err(e) = self.report(&*store, &pool).await {
                warn!(node = %self.node_id, error = %e, "node report failed");
            }
            tokio::time::sleep(every).await;
        }
    }
}
