//! Snapshots: record `Creating`, take the snapshot on the source volume's
//! node, record `Available` (ready to use) or `Error`. A lost answer is
//! followed by asking the node; deletion marks the record `Deleting` first.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tonic::{Code, Status};
use tracing::{info, warn};

use super::agents::{is_mismatch, outcome_unknown};
use super::manager::{store_status, Manager};
use super::records::*;
use crate::agent_proto as pb;
use crate::store::{self, Kind};

impl Manager {
    pub async fn create_snapshot(
        &self,
        name: &str,
        source_volume_id: &str,
        parameters: BTreeMap<String, String>,
    ) -> Result<SnapshotRec, Status> {
        self.wait_leader().await?;
        let (m, name, source) = (self.clone(), name.to_string(), source_volume_id.to_string());
        self.detached(async move { m.create_snapshot_now(&name, &source, parameters).await }).await
    }

    async fn create_snapshot_now(
        &self,
        name: &str,
        source_volume_id: &str,
        parameters: BTreeMap<String, String>,
    ) -> Result<SnapshotRec, Status> {
        let id = snapshot_id_for(name);
        let _guard = self.inflight.acquire(&id).await;
        if let Some((rec, version)) = self.snapshot(&id).await? {
            if rec.source_volume_id != source_volume_id {
                return Err(Status::already_exists(format!(
                    "snapshot name {name:?} is taken by a snapshot of volume {}; pick another name",
                    rec.source_volume_id
                )));
            }
            match rec.phase {
                Phase::Available => return Ok(rec),
                Phase::Deleting => return Err(Status::aborted(format!("snapshot {name:?} is being deleted; retry"))),
                // Creating after an interruption, or Error: again, on the same node.
                _ => return self.run_snapshot(rec, version).await,
            }
        }
        let volume = self
            .volume(source_volume_id)
            .await?
            .map(|(v, _)| v)
            .ok_or_else(|| Status::not_found(format!("source volume {source_volume_id} does not exist")))?;
        let (Phase::Available, Some(node)) = (volume.phase, volume.node.clone()) else {
            return Err(Status::failed_precondition(format!(
                "source volume {source_volume_id} is {:?}, not Available; wait for it or pick another",
                volume.phase
            )));
        };
        let mut metadata = volume.metadata.clone();
        metadata.extend(parameters.into_iter().filter(|(k, _)| k.starts_with("csi.storage.k8s.io/volumesnapshot")));
        let rec = SnapshotRec {
            id: id.clone(),
            name: name.to_string(),
            source_volume_id: source_volume_id.to_string(),
            node,
            size_bytes: volume.size_bytes,
            phase: Phase::Creating,
            error: None,
            metadata,
            created_ms: now_ms(),
            group_id: None,
        };
        let version = store::create_json(&*self.store, Kind::Snapshot, &id, &rec).await.map_err(store_status)?;
        self.run_snapshot(rec, version).await
    }

    async fn run_snapshot(&self, mut rec: SnapshotRec, version: u64) -> Result<SnapshotRec, Status> {
        let req = pb::CreateSnapshotRequest {
            snapshot_id: rec.id.clone(),
            source_volume_id: rec.source_volume_id.clone(),
            metadata: rec.metadata.clone().into_iter().collect(),
            ..Default::default()
        };
        let result = match self.agent_for(&rec.node).await {
            Ok(mut agent) => agent.create_snapshot(req).await.map(|r| r.snapshot),
            Err(e) => Err(Status::new(e.code, e.message)),
        };
        let result = match result {
            Err(s) if outcome_unknown(&s) && !crate::tls::client::never_sent(&s) => {
                warn!(snapshot.id = %rec.id, node = %rec.node, error = %s.message(), "snapshot's outcome unknown; asking the node");
                match self.ask_snapshot(&rec.node, &rec.id).await {
                    Ok(Some(snap)) => Ok(Some(snap)),
                    Ok(None) => Err(s),
                    Err(asked) => {
                        return Err(Status::unavailable(format!(
                            "node {} did not answer ({}) and cannot be asked what it did ({}); retry",
                            rec.node,
                            s.message(),
                            asked.message()
                        )))
                    }
                }
            }
            other => other,
        };
        match result {
            Ok(snap) => {
                if let Some(s) = snap {
                    rec.size_bytes = s.size_bytes;
                    rec.created_ms = s.created_at_ms;
                }
                rec.phase = Phase::Available;
                rec.error = None;
                store::update_json(&*self.store, Kind::Snapshot, &rec.id, &rec, version).await.map_err(store_status)?;
                info!(snapshot.id = %rec.id, volume.id = %rec.source_volume_id, node = %rec.node, "snapshot ready");
                Ok(rec)
            }
            Err(e) => {
                // Revert what this call made; the record says why. Never on
                // a node whose identity did not match.
                if !is_mismatch(&e) {
                    if let Ok(mut agent) = self.agent_for(&rec.node).await {
                        let _ = agent.delete_snapshot(pb::DeleteSnapshotRequest { snapshot_id: rec.id.clone() }).await;
                    }
                }
                rec.phase = Phase::Error;
                rec.error = Some(e.message().to_string());
                let _ = store::update_json(&*self.store, Kind::Snapshot, &rec.id, &rec, version).await;
                warn!(snapshot.id = %rec.id, error = %e.message(), "snapshot failed");
                let code = match e.code() {
                    Code::NotFound | Code::ResourceExhausted | Code::Unavailable | Code::FailedPrecondition => e.code(),
                    _ => Code::Internal,
                };
                Err(Status::new(code, format!("snapshot {} failed on node {}: {}", rec.name, rec.node, e.message())))
            }
        }
    }

    /// The snapshot as the node has it (None: it has none), asking for up
    /// to the agent deadline while the node is still making it.
    async fn ask_snapshot(&self, node: &str, id: &str) -> Result<Option<pb::Snapshot>, Status> {
        let until = Instant::now() + self.config.agent_timeout;
        loop {
            let asked = match self.agent_for(node).await {
                Ok(mut agent) => agent.get_snapshot(pb::GetSnapshotRequest { snapshot_id: id.to_string() }).await,
                Err(e) => Err(Status::new(e.code, e.message)),
            };
            match asked {
                Ok(r) => {
                    let s = r.snapshot.unwrap_or_default();
                    if s.state != pb::ImageState::Creating as i32 {
                        return Ok(Some(s));
                    }
                    if Instant::now() >= until {
                        return Err(Status::aborted(format!("snapshot {id} is still being made on node {node}")));
                    }
                }
                Err(s) if s.code() == Code::NotFound => return Ok(None),
                Err(s) if Instant::now() >= until => return Err(s),
                Err(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    pub async fn delete_snapshot(&self, id: &str) -> Result<(), Status> {
        self.wait_leader().await?;
        let (m, id) = (self.clone(), id.to_string());
        self.detached(async move { m.delete_snapshot_now(&id).await }).await
    }

    async fn delete_snapshot_now(&self, id: &str) -> Result<(), Status> {
        let _guard = self.inflight.acquire(id).await;
        let Some((mut rec, version)) = self.snapshot(id).await? else {
            return Ok(());
        };
        if rec.phase != Phase::Deleting {
            rec.phase = Phase::Deleting;
            store::update_json(&*self.store, Kind::Snapshot, id, &rec, version).await.map_err(store_status)?;
        }
        let mut agent = self.agent_for(&rec.node).await.map_err(|e| Status::unavailable(e.message))?;
        agent
            .delete_snapshot(pb::DeleteSnapshotRequest { snapshot_id: id.to_string() })
            .await
            .map_err(|s| Status::unavailable(format!("node {} could not delete snapshot {id}: {}; retry", rec.node, s.message())))?;
        self.store.delete(Kind::Snapshot, id, None).await.map_err(store_status)?;
        info!(snapshot.id = %id, "snapshot deleted");
        Ok(())
    }
}
