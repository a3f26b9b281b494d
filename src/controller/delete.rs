//! Deleting a volume: the record goes `Deleting` first (it still owns its
//! image while the node deletes it), then the node deletes the image, then
//! the record goes. A failure leaves `Deleting` for the CO's retry.

use tracing::info;

use super::error::ControllerError;
use super::manager::Manager;
use super::records::*;
use crate::agent_proto as pb;
use crate::store::{self, Kind};

impl Manager {
    pub async fn delete_volume(&self, id: &str) -> Result<(), ControllerError> {
        self.wait_leader().await?;
        let (m, id) = (self.clone(), id.to_string());
        self.detached(async move { m.delete_volume_now(&id).await }).await
    }

    async fn delete_volume_now(&self, id: &str) -> Result<(), ControllerError> {
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
            let then = if m.phase == MigrationPhase::Switching || m.phase == MigrationPhase::CleaningUp {
                "the migration ends first"
            } else {
                "the migration is being cancelled first"
            };
            return Err(ControllerError::Migrating { volume: id.to_string(), to: m.to, phase: m.phase, then });
        }
        let published: Vec<String> = self.publications(id).await?.into_iter().map(|e| e.node_id).collect();
        if !published.is_empty() {
            return Err(ControllerError::InUse { volume: id.to_string(), nodes: published, why: "unpublish it first".into() });
        }
        if rec.phase != Phase::Deleting {
            rec.phase = Phase::Deleting;
            rec.updated_ms = now_ms();
            store::update_json(&*self.store, Kind::Volume, id, &rec, version).await?;
        }
        if let Some(node) = &rec.node {
            let mut agent = self.agent_for(node).await?;
            agent
                .delete_volume(pb::DeleteVolumeRequest { volume_id: id.to_string() })
                .await
                .map_err(ControllerError::unfinished_unless_refused(format!("node {node} could not delete volume {id}")))?;
        }
        if let (Some(c), Some(source)) = (rec.copy_under_way(), &rec.source) {
            self.drop_copy_export(id, source, &c.source_node, &c.node).await.map_err(|e| ControllerError::Unfinished(Box::new(e)))?;
        }
        let (_, version) = self.volume(id).await?.ok_or_else(|| ControllerError::InProgress("volume vanished during delete".into()))?;
        self.store.delete(Kind::Volume, id, Some(version)).await?;
        info!(volume.id = %id, volume.name = %rec.name, "volume deleted");
        Ok(())
    }
}
