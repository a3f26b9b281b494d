//! Evacuation: an operator marks a node (`cinderblock ctl node evacuate`);
//! the scheduler places nothing new there (the node view leaves it out),
//! and every reconciler pass of the leader starts migrations of its
//! volumes to nodes the scheduler picks, at most `EVACUATING_AT_ONCE`
//! under way at a time. Each is an ordinary migration (`migrate.rs`):
//! live passes while a volume is published, its switch once it is not
//! (after a drain evicted its pod and the CO unpublished it).

use tracing::{info, warn};

use super::error::ControllerError;
use super::manager::Manager;
use super::migrate::MigrateRequest;
use super::records::*;
use crate::scheduler::{ScheduleRequest, TopologyList};
use crate::store::{self, Kind, StoreError};

/// Migrations off one evacuating node under way at once.
pub const EVACUATING_AT_ONCE: usize = 2;

impl Manager {
    /// Mark (or unmark) a node for evacuation.
    pub async fn evacuate_node(&self, node: &str, evacuate: bool) -> Result<NodeRec, ControllerError> {
        self.wait_leader().await?;
        for _ in 0..5 {
            let (mut rec, version) = self.node(node).await?.ok_or_else(|| ControllerError::NodeNotFound { node: node.to_string() })?;
            if rec.evacuating == evacuate {
                return Ok(rec);
            }
            rec.evacuating = evacuate;
            match store::update_json(&*self.store, Kind::Node, node, &rec, version).await {
                Ok(_) => {
                    info!(node, evacuate, "node evacuation {}", if evacuate { "started" } else { "stopped" });
                    let note = if evacuate { "no new volumes; its volumes migrate away" } else { "the node takes volumes again" };
                    self.node_event(node, false, if evacuate { "Evacuating" } else { "EvacuationStopped" }, note.into()).await;
                    return Ok(rec);
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(ControllerError::InProgress(format!("node {node}'s record kept changing; retry")))
    }

    /// One reconciler pass's share of the evacuations: start migrations
    /// off each evacuating node until `EVACUATING_AT_ONCE` run.
    pub(super) async fn evacuate_some(&self, volumes: &[(String, Option<String>, bool)]) {
        let Ok(nodes) = self.nodes().await else { return };
        for node in nodes.iter().filter(|n| n.evacuating) {
            let on_node = volumes.iter().filter(|(_, n, _)| n.as_deref() == Some(node.id.as_str()));
            let running = on_node.clone().filter(|(_, _, migrating)| *migrating).count();
            for (id, _, _) in on_node.filter(|(_, _, migrating)| !migrating).take(EVACUATING_AT_ONCE.saturating_sub(running)) {
                if let Err(e) = self.evacuate_one(id, &node.id).await {
                    warn!(volume.id = %id, node = %node.id, error = %e, "evacuation could not start this volume's migration");
                }
            }
        }
    }

    async fn evacuate_one(&self, id: &str, from: &str) -> Result<(), ControllerError> {
        let Some((rec, _)) = self.volume(id).await? else { return Ok(()) };
        // A volume pinned to its node stays: its users (a PV's node
        // affinity) could not follow it. Zone volumes move within their zone.
        if rec.phase != Phase::Available || rec.migration.is_some() || rec.accessibility == Accessibility::Node {
            return Ok(());
        }
        let req = ScheduleRequest {
            size_bytes: rec.size_bytes,
            provisioning: rec.provisioning,
            requisite: TopologyList::build(
                rec.accessible_topology
                    .iter()
                    .map(|t| t.iter().filter(|(k, _)| *k != crate::TOPOLOGY_NODE_KEY).map(|(k, v)| (k.as_str(), v.as_str()))),
            ),
            tried: vec![from.to_string()],
            now_ms: now_ms(),
            heartbeat_timeout_ms: self.config.heartbeat_timeout.as_millis() as i64,
            ..Default::default()
        };
        // A trial placement only names the node; the migration reserves its own.
        let to = self
            .view
            .place(&format!("{id}/evacuation"), &req)
            .map_err(|e| ControllerError::NoNodeFits { reasons: e.to_string() })?
            .node_id
            .clone();
        self.migrate_volume(MigrateRequest { volume_id: id.to_string(), to, allow_topology_change: false, evacuation: true }).await?;
        Ok(())
    }
}
