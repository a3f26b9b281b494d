//! Group snapshots (CSI GroupController): one snapshot of each source
//! volume, all cut at one point in the stream of writes. Three steps across
//! the nodes that hold the sources:
//! 1. every node freezes the filesystems of its members (`FreezeVolumes`),
//!    each for a bounded time (its watchdog thaws it if we never come back);
//!    a member published to another node (used there over NBD) is also
//!    frozen on that node, its consumer, where its filesystem is mounted;
//!    a node that fails undoes the step everywhere;
//! 2. only once every member everywhere is frozen, each member's snapshot
//!    is taken (a reflink, constant time);
//! 3. every node thaws (`ThawVolumes`), on every path, and says whether each
//!    member stayed frozen all along. One that did not makes the group fail:
//!    its snapshots are deleted, the call answers ABORTED and the CO retries.
//!
//! Records: the group's (`GroupSnapshotRec`, keyed by an ID derived from the
//! CSI name) and one `SnapshotRec` per member (its `group_id` set), written
//! `Creating` before any node is called and `Available` when all held. A
//! retry of a group that did not finish deletes what an earlier try left on
//! the nodes and starts again, so no member from another instant survives.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures::future::join_all;
use tracing::{info, warn};

use super::error::ControllerError;
use super::manager::Manager;
use super::records::*;
use crate::agent_proto as pb;
use crate::store::{self, Kind, StoreError};

/// How long the members may stay frozen, from the first freeze to the last
/// thaw (the agents' watchdogs enforce it). A reflink takes milliseconds.
pub const GROUP_FREEZE_LIMIT: Duration = Duration::from_secs(30);

/// What one node freezes for a group.
#[derive(Default)]
pub(super) struct NodeFreeze {
    /// Members in its pool.
    owned: Vec<String>,
    /// Members of other nodes' pools it has mounted (published to it over NBD).
    consumed: Vec<String>,
}

impl NodeFreeze {
    fn describe(&self) -> String {
        let mut parts = self.owned.clone();
        parts.extend(self.consumed.iter().map(|v| format!("{v} (mounted there from its owner)")));
        parts.join(", ")
    }
}

impl Manager {
    pub async fn group_snapshot(&self, id: &str) -> Result<Option<(GroupSnapshotRec, u64)>, ControllerError> {
        store::get_json(&*self.store, Kind::GroupSnapshot, id).await.map_err(ControllerError::from)
    }

    /// The group and its members' records (a member whose record is gone is left out).
    pub async fn group_members(&self, group: &GroupSnapshotRec) -> Result<Vec<SnapshotRec>, ControllerError> {
        let mut out = Vec::with_capacity(group.snapshot_ids.len());
        for id in &group.snapshot_ids {
            if let Some((s, _)) = self.snapshot(id).await? {
                out.push(s);
            }
        }
        Ok(out)
    }

    pub async fn create_group_snapshot(&self, name: &str, sources: Vec<String>) -> Result<GroupSnapshotRec, ControllerError> {
        self.wait_leader().await?;
        let (m, name) = (self.clone(), name.to_string());
        self.detached(async move { m.create_group_now(&name, sources).await }).await
    }

    async fn create_group_now(&self, name: &str, sources: Vec<String>) -> Result<GroupSnapshotRec, ControllerError> {
        let id = group_snapshot_id_for(name);
        let _guard = self.inflight.acquire(&id).await;
        let sources: Vec<String> = sources.into_iter().collect::<BTreeSet<_>>().into_iter().collect();
        if let Some((rec, version)) = self.group_snapshot(&id).await? {
            if rec.source_volume_ids != sources {
                let holder = format!("a group of volumes {}", rec.source_volume_ids.join(", "));
                return Err(ControllerError::NameTaken { kind: "group snapshot", name: name.to_string(), holder });
            }
            return match rec.phase {
                Phase::Available => Ok(rec),
                Phase::Deleting => Err(ControllerError::BeingDeleted { kind: "group snapshot", name: name.to_string() }),
                _ => self.run_group(rec, version).await,
            };
        }
        for v in &sources {
            self.source_volume(v).await?;
        }
        let rec = GroupSnapshotRec {
            id: id.clone(),
            name: name.to_string(),
            source_volume_ids: sources.clone(),
            snapshot_ids: sources.iter().map(|v| group_member_id(&id, v)).collect(),
            phase: Phase::Creating,
            error: None,
            created_ms: now_ms(),
        };
        let version = store::create_json(&*self.store, Kind::GroupSnapshot, &id, &rec).await?;
        self.run_group(rec, version).await
    }

    /// A group's source: it must exist and be Available on a node.
    async fn source_volume(&self, id: &str) -> Result<VolumeRec, ControllerError> {
        let (volume, _) = self.volume(id).await?.ok_or_else(|| ControllerError::not_found("source volume", id))?;
        if volume.phase != Phase::Available || volume.node.is_none() {
            let what = format!("source volume {id}");
            return Err(ControllerError::NotAvailable { what, phase: volume.phase, then: "wait for it or leave it out of the group" });
        }
        Ok(volume)
    }

    /// The members' records, written `Creating` where missing (a first try,
    /// or one interrupted before it wrote them all), before any node makes
    /// an image: the reconciler never takes one for an orphan.
    async fn ensure_members(&self, rec: &GroupSnapshotRec) -> Result<Vec<SnapshotRec>, ControllerError> {
        let mut out = Vec::with_capacity(rec.snapshot_ids.len());
        for (volume_id, snap_id) in rec.source_volume_ids.iter().zip(&rec.snapshot_ids) {
            if let Some((s, _)) = self.snapshot(snap_id).await? {
                out.push(s);
                continue;
            }
            let volume = self.source_volume(volume_id).await?;
            let member = SnapshotRec {
                id: snap_id.clone(),
                name: format!("{}/{}", rec.name, volume.id),
                source_volume_id: volume.id.clone(),
                node: volume.node.clone().unwrap_or_default(),
                size_bytes: volume.size_bytes,
                phase: Phase::Creating,
                error: None,
                metadata: volume.metadata.clone(),
                created_ms: now_ms(),
                group_id: Some(rec.id.clone()),
            };
            match store::create_json(&*self.store, Kind::Snapshot, snap_id, &member).await {
                Ok(_) | Err(StoreError::AlreadyExists { .. }) => out.push(member),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
    }

    /// Freeze all, snapshot all, thaw all; record the outcome.
    async fn run_group(&self, mut rec: GroupSnapshotRec, version: u64) -> Result<GroupSnapshotRec, ControllerError> {
        let members = self.ensure_members(&rec).await?;
        // Whatever an earlier try left on the nodes was cut at another instant.
        self.delete_member_images(&members).await?;
        let by_node = self.freeze_plan(&members).await?;
        let started = std::time::Instant::now();
        let cut = self.freeze_and_cut(&rec.id, &by_node, &members).await;
        let thawed = self.thaw_nodes(&rec.id, by_node.keys()).await;
        let frozen_ms = started.elapsed().as_millis() as u64;
        let outcome = match (cut, thawed) {
            (Err(e), _) => Err(e),
            (Ok(_), Err(e)) => Err(e),
            (Ok(snaps), Ok(())) => Ok(snaps),
        };
        match outcome {
            Ok(snaps) => {
                for mut m in members {
                    if let Some(s) = snaps.get(&m.id) {
                        m.size_bytes = s.size_bytes;
                        m.created_ms = s.created_at_ms;
                    }
                    m.phase = Phase::Available;
                    m.error = None;
                    store::put_json(&*self.store, Kind::Snapshot, &m.id.clone(), &m).await?;
                }
                rec.created_ms = snaps.values().map(|s| s.created_at_ms).max().unwrap_or(rec.created_ms);
                rec.phase = Phase::Available;
                rec.error = None;
                store::update_json(&*self.store, Kind::GroupSnapshot, &rec.id, &rec, version).await?;
                info!(group.id = %rec.id, members = rec.snapshot_ids.len(), nodes = by_node.len(), frozen_ms, "group snapshot ready");
                Ok(rec)
            }
            Err(e) => {
                warn!(group.id = %rec.id, error = %e, "group snapshot failed; undoing it");
                let _ = self.delete_member_images(&members).await;
                for mut m in members {
                    m.phase = Phase::Error;
                    m.error = Some(e.to_string());
                    let _ = store::put_json(&*self.store, Kind::Snapshot, &m.id.clone(), &m).await;
                }
                rec.phase = Phase::Error;
                rec.error = Some(e.to_string());
                let _ = store::update_json(&*self.store, Kind::GroupSnapshot, &rec.id, &rec, version).await;
                Err(ControllerError::GroupSnapshotFailed { group: rec.name, cause: Box::new(e) })
            }
        }
    }

    /// Which node freezes what: each owner its members (it holds them for
    /// the group and cuts them), and each node a member is published to
    /// over NBD the filesystem it has mounted from it (read-only
    /// publications are at rest).
    pub(super) async fn freeze_plan(&self, members: &[SnapshotRec]) -> Result<BTreeMap<String, NodeFreeze>, ControllerError> {
        let mut plan: BTreeMap<String, NodeFreeze> = BTreeMap::new();
        for m in members {
            plan.entry(m.node.clone()).or_default().owned.push(m.source_volume_id.clone());
            for e in self.publications(&m.source_volume_id).await? {
                if e.node_id != m.node && !e.read_only {
                    plan.entry(e.node_id).or_default().consumed.push(m.source_volume_id.clone());
                }
            }
        }
        Ok(plan)
    }

    /// Step 1: every node freezes what the plan gives it, all or none
    /// there; an error when one could not (the caller thaws them all).
    pub(super) async fn freeze_nodes(&self, group: &str, by_node: &BTreeMap<String, NodeFreeze>) -> Result<(), ControllerError> {
        let freezes = by_node.iter().map(|(node, f)| async move {
            let req = pb::FreezeVolumesRequest {
                group_id: group.to_string(),
                volume_ids: f.owned.clone(),
                max_ms: GROUP_FREEZE_LIMIT.as_millis() as u64,
                consumed_volume_ids: f.consumed.clone(),
            };
            let what = f.describe();
            let mut agent = self.agent_for(node).await?;
            match tokio::time::timeout(GROUP_FREEZE_LIMIT, agent.freeze_volumes(req)).await {
                Ok(r) => r.map(|_| ()).map_err(ControllerError::during(format!("node {node} could not freeze {what}"))),
                Err(_) => Err(ControllerError::NotCutTogether(format!("node {node} did not freeze {what} in time"))),
            }
        });
        join_all(freezes).await.into_iter().collect()
    }

    /// Steps 1 and 2: every node freezes its members and what it consumes
    /// of them; only then every member is cut. The snapshots as the nodes
    /// made them, by member ID.
    async fn freeze_and_cut(
        &self,
        group: &str,
        by_node: &BTreeMap<String, NodeFreeze>,
        members: &[SnapshotRec],
    ) -> Result<BTreeMap<String, pb::Snapshot>, ControllerError> {
        self.freeze_nodes(group, by_node).await?;
        let cuts = members.iter().map(|m| async move {
            let req = pb::CreateSnapshotRequest {
                snapshot_id: m.id.clone(),
                source_volume_id: m.source_volume_id.clone(),
                metadata: m.metadata.clone().into_iter().collect(),
                group_id: group.to_string(),
                ..Default::default()
            };
            let mut agent = self.agent_for(&m.node).await?;
            match tokio::time::timeout(GROUP_FREEZE_LIMIT, agent.create_snapshot(req)).await {
                Ok(Ok(r)) => Ok((m.id.clone(), r.snapshot.unwrap_or_default())),
                Ok(Err(s)) => Err(ControllerError::during(format!("snapshot of {} on node {}", m.source_volume_id, m.node))(s)),
                Err(_) => Err(ControllerError::NotCutTogether(format!(
                    "the snapshot of {} on node {} took longer than the freeze may last",
                    m.source_volume_id, m.node
                ))),
            }
        });
        join_all(cuts).await.into_iter().collect()
    }

    /// Step 3, on every path: thaw on every node (a few tries each). An
    /// error when a member did not stay frozen, or a node could not be
    /// reached (its watchdog thaws it; the cut cannot be trusted).
    pub(super) async fn thaw_nodes<'a>(&self, group: &str, nodes: impl Iterator<Item = &'a String>) -> Result<(), ControllerError> {
        let thaws = nodes.map(|node| async move {
            let mut last = String::new();
            for attempt in 0..3 {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                let mut agent = match self.agent_for(node).await {
                    Ok(a) => a,
                    Err(e) => {
                        last = e.to_string();
                        continue;
                    }
                };
                match agent.thaw_volumes(pb::ThawVolumesRequest { group_id: group.to_string() }).await {
                    Ok(r) if r.thawed_early.is_empty() => return Ok(()),
                    Ok(r) => return Err(format!("on node {node} not frozen all along: {}", r.thawed_early.join("; "))),
                    Err(s) => last = s.message,
                }
            }
            warn!(group.id = %group, node = %node, error = %last, "could not thaw; the node's watchdog thaws within the freeze limit");
            Err(format!("node {node} could not be asked to thaw ({last}); its watchdog thaws within {} s", GROUP_FREEZE_LIMIT.as_secs()))
        });
        let problems: Vec<String> = join_all(thaws).await.into_iter().filter_map(|r| r.err()).collect();
        match problems.is_empty() {
            true => Ok(()),
            false => {
                Err(ControllerError::NotCutTogether(format!("the members did not stay frozen together ({}); retry", problems.join("; "))))
            }
        }
    }

    /// Delete the members' images on their nodes (an absent one is fine).
    async fn delete_member_images(&self, members: &[SnapshotRec]) -> Result<(), ControllerError> {
        let deletes = members.iter().map(|m| async move {
            let mut agent = self.agent_for(&m.node).await?;
            agent
                .delete_snapshot(pb::DeleteSnapshotRequest { snapshot_id: m.id.clone() })
                .await
                .map(|_| ())
                .map_err(ControllerError::unfinished(format!("node {} could not delete snapshot {}", m.node, m.id)))
        });
        join_all(deletes).await.into_iter().collect()
    }

    pub async fn delete_group_snapshot(&self, id: &str) -> Result<(), ControllerError> {
        self.wait_leader().await?;
        let (m, id) = (self.clone(), id.to_string());
        self.detached(async move { m.delete_group_now(&id).await }).await
    }

    async fn delete_group_now(&self, id: &str) -> Result<(), ControllerError> {
        let _guard = self.inflight.acquire(id).await;
        let Some((mut rec, version)) = self.group_snapshot(id).await? else {
            return Ok(());
        };
        if rec.phase != Phase::Deleting {
            rec.phase = Phase::Deleting;
            store::update_json(&*self.store, Kind::GroupSnapshot, id, &rec, version).await?;
        }
        let members = self.group_members(&rec).await?;
        for mut m in members.clone() {
            if m.phase != Phase::Deleting {
                m.phase = Phase::Deleting;
                store::put_json(&*self.store, Kind::Snapshot, &m.id.clone(), &m).await?;
            }
        }
        self.delete_member_images(&members).await?;
        for m in &members {
            self.store.delete(Kind::Snapshot, &m.id, None).await?;
        }
        self.store.delete(Kind::GroupSnapshot, id, None).await?;
        info!(group.id = %id, members = members.len(), "group snapshot deleted");
        Ok(())
    }
}
