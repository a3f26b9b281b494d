//! Node registration: each node reports its pool and topology to the store
//! every few seconds; the scheduler skips nodes whose report is stale.

use std::sync::Arc;
use std::time::Duration;

use tracing::warn;

use super::records::pool_status_to_node;
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
        let rec = pool_status_to_node(&self.node_id, &self.zone, &self.agent_address, self.max_volumes, &status);
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
