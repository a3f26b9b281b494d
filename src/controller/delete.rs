//! Deleting a volume: the record goes `Deleting` first (it still owns its
//! image while the node deletes it), then the node deletes the image, then
//! the record goes. A failure leaves `Deleting` for the CO's retry.

use tonic::{Code, Status};
use tracing::info;

use super::manager::{store_status, Manager};
use super::records::*;
use crate::agent_proto as pb;
use crate::store::{self, Kind};

impl Manager {
    pub async fn delete_volume(&self, id: &str) -> Result<(), Status> {
        self.wait_leader().await?;
        let (m, id) = (self.clone(), id.to_string());
        self.detached(async move { m.delete_volume_now(&id).await }).await
    }

    async fn delete_volume_now(&self, id: &str) -> Result<(), Status> {
        // A copy from another node in progress stops (its flow holds the key).
        self.cancel_copy(id);
        let _guard = self.inflight.acquire(id).await;
        self.forget_copy_cancel(id);
        let Some((mut rec, version)) = self.volume(id).await? else {
            return Ok(());
        };
        if let Some(m) = rec.migration.clone() {
            // A delete stops a migration that can still stop, and waits for one that cannot.
            if m.phase == MigrationPhase::Copying {
                self.mark_cancelling(rec, version).await?;
                self.ensure_migration_driver(id);
            }
            return Err(Status::aborted(format!(
                "volume {id} is being migrated to node {} ({:?}); {}; retry",
                m.to,
                m.phase,
                if m.phase == MigrationPhase::Switching || m.phase == MigrationPhase::CleaningUp {
                    "the migration ends first"
                } else {
                    "the migration is being cancelled first"
                }
            )));
        }
        let published: Vec<String> = self.publications(id).await?.into_iter().map(|e| e.node_id).collect();
        if !published.is_empty() {
            return Err(Status::failed_precondition(format!(
                "volume {id} is published to node(s) {}; unpublish it first",
                published.join(", ")
            )));
        }
        if rec.phase != Phase::Deleting {
            rec.phase = Phase::Deleting;
            rec.updated_ms = now_ms();
            store::update_json(&*self.store, Kind::Volume, id, &rec, version).await.map_err(store_status)?;
        }
        if let Some(node) = &rec.node {
            let mut agent = self.agent_for(node).await.map_err(|e| Status::new(e.code, e.message))?;
            agent.delete_volume(pb::DeleteVolumeRequest { volume_id: id.to_string() }).await.map_err(|s| {
                let code = if s.code() == Code::FailedPrecondition { Code::FailedPrecondition } else { Code::Unavailable };
                Status::new(code, format!("node {node} could not delete volume {id}: {}; retry", s.message()))
            })?;
        }
        if let (Some(c), Some(source)) = (rec.copy_under_way(), &rec.source) {
            self.drop_copy_export(id, source, &c.source_node, &c.node)
                .await
                .map_err(|s| Status::unavailable(format!("{}; retry", s.message())))?;
        }
        let (_, version) = self.volume(id).await?.ok_or_else(|| Status::aborted("volume vanished during delete"))?;
        self.store.delete(Kind::Volume, id, Some(version)).await.map_err(store_status)?;
        info!(volume.id = %id, volume.name = %rec.name, "volume deleted");
        Ok(())
    }
}
