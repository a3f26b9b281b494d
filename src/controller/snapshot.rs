//! Snapshots: record `Creating`, take the snapshot on the source volume's
//! node, record `Available` (ready to use) or `Error`. A lost answer is
//! followed by asking the node; deletion marks the record `Deleting` first.
//!
//! The owner freezes a filesystem mounted from the source's image itself.
//! A source used from another node over NBD has its filesystem mounted
//! there: it is frozen there like a group of one (`group.rs`: the owner
//! holds it, its consumer freezes it, the owner cuts, both thaw, and a
//! freeze that did not hold fails the snapshot).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::error::{ControllerError, Failure};
use super::manager::Manager;
use super::records::*;
use crate::agent_proto as pb;
use crate::store::{self, Kind};

impl Manager {
    pub async fn create_snapshot(
        &self,
        name: &str,
        source_volume_id: &str,
        parameters: BTreeMap<String, String>,
    ) -> Result<SnapshotRec, ControllerError> {
        self.wait_leader().await?;
        let (m, name, source) = (self.clone(), name.to_string(), source_volume_id.to_string());
        self.detached(async move { m.create_snapshot_now(&name, &source, parameters).await }).await
    }

    async fn create_snapshot_now(
        &self,
        name: &str,
        source_volume_id: &str,
        parameters: BTreeMap<String, String>,
    ) -> Result<SnapshotRec, ControllerError> {
        let id = snapshot_id_for(name);
        let _guard = self.inflight.acquire(&id).await;
        if let Some((rec, version)) = self.snapshot(&id).await? {
            if rec.source_volume_id != source_volume_id {
                let holder = format!("a snapshot of volume {}", rec.source_volume_id);
                return Err(ControllerError::NameTaken { kind: "snapshot", name: name.to_string(), holder });
            }
            match rec.phase {
                Phase::Available => return Ok(rec),
                Phase::Deleting => return Err(ControllerError::BeingDeleted { kind: "snapshot", name: name.to_string() }),
                // Creating after an interruption, or Error: again, on the same node.
                _ => return self.run_snapshot(rec, version).await,
            }
        }
        let volume = self
            .volume(source_volume_id)
            .await?
            .map(|(v, _)| v)
            .ok_or_else(|| ControllerError::not_found("source volume", source_volume_id))?;
        let (Phase::Available, Some(node)) = (volume.phase, volume.node.clone()) else {
            let what = format!("source volume {source_volume_id}");
            return Err(ControllerError::NotAvailable { what, phase: volume.phase, then: "wait for it or pick another" });
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
        let version = store::create_json(&*self.store, Kind::Snapshot, &id, &rec).await?;
        self.run_snapshot(rec, version).await
    }

    async fn run_snapshot(&self, mut rec: SnapshotRec, version: u64) -> Result<SnapshotRec, ControllerError> {
        // Published to another node: frozen there under the snapshot's own ID.
        let plan = self.freeze_plan(std::slice::from_ref(&rec)).await?;
        let held = plan.len() > 1;
        let req = pb::CreateSnapshotRequest {
            snapshot_id: rec.id.clone(),
            source_volume_id: rec.source_volume_id.clone(),
            metadata: rec.metadata.clone().into_iter().collect(),
            group_id: if held { rec.id.clone() } else { String::new() },
            ..Default::default()
        };
        let frozen = match held {
            true => self.freeze_nodes(&rec.id, &plan).await,
            false => Ok(()),
        };
        let result = match (frozen, self.agent_for(&rec.node).await) {
            (Err(e), _) => Err(e),
            (Ok(()), Ok(mut agent)) => agent.create_snapshot(req).await.map(|r| r.snapshot).map_err(ControllerError::Agent),
            (Ok(()), Err(e)) => Err(e),
        };
        let result = match result {
            Err(e) if e.outcome_unknown() && !e.never_sent() => {
                warn!(snapshot.id = %rec.id, node = %rec.node, error = %e, "snapshot's outcome unknown; asking the node");
                match self.ask_snapshot(&rec.node, &rec.id).await {
                    Ok(Some(snap)) => Ok(Some(snap)),
                    Ok(None) => Err(e),
                    Err(asked) => {
                        if held {
                            let _ = self.thaw_nodes(&rec.id, plan.keys()).await;
                        }
                        return Err(ControllerError::OutcomeUnknown { node: rec.node, call: e.to_string(), asked: asked.to_string() });
                    }
                }
            }
            other => other,
        };
        let result = match (result, held) {
            (Ok(snap), true) => self.thaw_nodes(&rec.id, plan.keys()).await.map(|()| snap),
            (Err(e), true) => {
                let _ = self.thaw_nodes(&rec.id, plan.keys()).await;
                Err(e)
            }
            (result, false) => result,
        };
        match result {
            Ok(snap) => {
                if let Some(s) = snap {
                    rec.size_bytes = s.size_bytes;
                    rec.created_ms = s.created_at_ms;
                }
                rec.phase = Phase::Available;
                rec.error = None;
                store::update_json(&*self.store, Kind::Snapshot, &rec.id, &rec, version).await?;
                info!(snapshot.id = %rec.id, volume.id = %rec.source_volume_id, node = %rec.node, "snapshot ready");
                Ok(rec)
            }
            Err(e) => {
                // Revert what this call made; the record says why. Never on
                // a node whose identity did not match.
                if !e.is_mismatch() {
                    if let Ok(mut agent) = self.agent_for(&rec.node).await {
                        let _ = agent.delete_snapshot(pb::DeleteSnapshotRequest { snapshot_id: rec.id.clone() }).await;
                    }
                }
                rec.phase = Phase::Error;
                rec.error = Some(e.to_string());
                let _ = store::update_json(&*self.store, Kind::Snapshot, &rec.id, &rec, version).await;
                warn!(snapshot.id = %rec.id, error = %e, "snapshot failed");
                Err(ControllerError::SnapshotFailed { snapshot: rec.name, node: rec.node, cause: Box::new(e) })
            }
        }
    }

    /// The snapshot as the node has it (None: it has none), asking for up
    /// to the agent deadline while the node is still making it.
    async fn ask_snapshot(&self, node: &str, id: &str) -> Result<Option<pb::Snapshot>, ControllerError> {
        let until = Instant::now() + self.config.agent_timeout;
        loop {
            let asked = match self.agent_for(node).await {
                Ok(mut agent) => {
                    agent.get_snapshot(pb::GetSnapshotRequest { snapshot_id: id.to_string() }).await.map_err(ControllerError::Agent)
                }
                Err(e) => Err(e),
            };
            match asked {
                Ok(r) => {
                    let s = r.snapshot.unwrap_or_default();
                    if s.state != pb::ImageState::Creating as i32 {
                        return Ok(Some(s));
                    }
                    if Instant::now() >= until {
                        return Err(ControllerError::InProgress(format!("snapshot {id} is still being made on node {node}")));
                    }
                }
                Err(e) if e.failure() == Failure::NotFound => return Ok(None),
                Err(e) if Instant::now() >= until => return Err(e),
                Err(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    pub async fn delete_snapshot(&self, id: &str) -> Result<(), ControllerError> {
        self.wait_leader().await?;
        let (m, id) = (self.clone(), id.to_string());
        self.detached(async move { m.delete_snapshot_now(&id).await }).await
    }

    async fn delete_snapshot_now(&self, id: &str) -> Result<(), ControllerError> {
        let _guard = self.inflight.acquire(id).await;
        let Some((mut rec, version)) = self.snapshot(id).await? else {
            return Ok(());
        };
        if rec.phase != Phase::Deleting {
            rec.phase = Phase::Deleting;
            store::update_json(&*self.store, Kind::Snapshot, id, &rec, version).await?;
        }
        let mut agent = self.agent_for(&rec.node).await.map_err(|e| ControllerError::Unfinished(Box::new(e)))?;
        agent
            .delete_snapshot(pb::DeleteSnapshotRequest { snapshot_id: id.to_string() })
            .await
            .map_err(ControllerError::unfinished(format!("node {} could not delete snapshot {id}", rec.node)))?;
        self.store.delete(Kind::Snapshot, id, None).await?;
        info!(snapshot.id = %id, "snapshot deleted");
        Ok(())
    }
}
