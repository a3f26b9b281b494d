//! Growing a volume: the node grows the image (crash-safe on its side, and a
//! retry grows again), then the record takes the size the node reports.

use tonic::Status;
use tracing::info;

use super::manager::{store_status, Manager};
use super::records::*;
use crate::agent_proto as pb;
use crate::store::{self, Kind};

impl Manager {
    pub async fn expand_volume(&self, id: &str, size: u64) -> Result<VolumeRec, Status> {
        self.wait_leader().await?;
        let (m, id) = (self.clone(), id.to_string());
        self.detached(async move { m.expand_volume_now(&id, size).await }).await
    }

    async fn expand_volume_now(&self, id: &str, size: u64) -> Result<VolumeRec, Status> {
        let _guard = self.inflight.acquire(id).await;
        let (mut rec, version) = self.volume(id).await?.ok_or_else(|| Status::not_found(format!("volume {id} does not exist")))?;
        let (Phase::Available, Some(node)) = (rec.phase, rec.node.clone()) else {
            return Err(Status::failed_precondition(format!("volume {id} is {:?}; only an Available volume can grow", rec.phase)));
        };
        if size <= rec.size_bytes {
            return Ok(rec);
        }
        if let Some(m) = &rec.migration {
            return Err(Status::aborted(format!(
                "volume {id} is being migrated to node {} ({:?}); it grows once the migration ends; retry",
                m.to, m.phase
            )));
        }
        let mut agent = self.agent_for(&node).await.map_err(|e| Status::unavailable(e.message))?;
        let v = agent
            .expand_volume(pb::ExpandVolumeRequest { volume_id: id.to_string(), size_bytes: size })
            .await
            .map_err(|s| Status::new(s.code(), format!("node {node}: {}", s.message())))?
            .volume
            .ok_or_else(|| Status::internal("agent answered without a volume"))?;
        rec.size_bytes = v.size_bytes;
        rec.updated_ms = now_ms();
        store::update_json(&*self.store, Kind::Volume, id, &rec, version).await.map_err(store_status)?;
        info!(volume.id = %id, size = rec.size_bytes, "volume expanded");
        Ok(rec)
    }
}
