//! Growing a volume: the node grows the image (crash-safe on its side, and a
//! retry grows again), then the record takes the size the node reports.

use tracing::info;

use super::error::ControllerError;
use super::manager::Manager;
use super::records::*;
use crate::agent_proto as pb;
use crate::store::{self, Kind};

impl Manager {
    pub async fn expand_volume(&self, id: &str, size: u64) -> Result<VolumeRec, ControllerError> {
        self.wait_leader().await?;
        let (m, id) = (self.clone(), id.to_string());
        self.detached(async move { m.expand_volume_now(&id, size).await }).await
    }

    async fn expand_volume_now(&self, id: &str, size: u64) -> Result<VolumeRec, ControllerError> {
        let _guard = self.inflight.acquire(id).await;
        let (mut rec, version) = self.volume(id).await?.ok_or_else(|| ControllerError::not_found("volume", id))?;
        let (Phase::Available, Some(node)) = (rec.phase, rec.node.clone()) else {
            let what = format!("volume {id}");
            return Err(ControllerError::NotAvailable { what, phase: rec.phase, then: "only an Available volume can grow" });
        };
        if size <= rec.size_bytes {
            return Ok(rec);
        }
        if let Some(m) = &rec.migration {
            let (to, phase) = (m.to.clone(), m.phase);
            return Err(ControllerError::Migrating { volume: id.to_string(), to, phase, then: "it grows once the migration ends" });
        }
        let mut agent = self.agent_for(&node).await.map_err(|e| ControllerError::Unfinished(Box::new(e)))?;
        let v = agent
            .expand_volume(pb::ExpandVolumeRequest { volume_id: id.to_string(), size_bytes: size })
            .await
            .map_err(ControllerError::during(format!("node {node}")))?
            .volume
            .ok_or(ControllerError::IncompleteAnswer("a volume"))?;
        rec.size_bytes = v.size_bytes;
        rec.updated_ms = now_ms();
        store::update_json(&*self.store, Kind::Volume, id, &rec, version).await?;
        info!(volume.id = %id, size = rec.size_bytes, "volume expanded");
        Ok(rec)
    }
}
