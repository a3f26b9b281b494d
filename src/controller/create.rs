//! Cinder's create-volume flow: record the volume `Creating` (keyed by its
//! name), schedule it over the nodes, create it on the chosen one; on a
//! node's failure clean up there, exclude it and reschedule; out of
//! attempts, record `Error` with every reason.
//!
//! A call to a node whose outcome is unknown (timeout, broken connection) is
//! followed by asking the node what it did; nothing is deleted or
//! rescheduled on a guess. When the node cannot be asked, the record stays
//! `Creating` on that node for a retry or the reconciler to finish.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::crossnode;
use super::error::{ControllerError, Failure, TaskError};
use super::manager::{CreateVolumeSpec, Manager};
use super::records::*;
use crate::agent_proto as pb;
use crate::flow::{Flow, Task};
use crate::scheduler::{Reservation, ScheduleRequest, Segments};
use crate::store::{self, Kind, StoreError};

impl Manager {
    pub async fn create_volume(&self, spec: CreateVolumeSpec) -> Result<VolumeRec, ControllerError> {
        self.wait_leader().await?;
        let m = self.clone();
        self.detached(async move { m.create_volume_now(spec).await }).await
    }

    async fn create_volume_now(&self, spec: CreateVolumeSpec) -> Result<VolumeRec, ControllerError> {
        let id = volume_id_for(&spec.name);
        let _guard = self.inflight.acquire(&id).await;
        let existing: Option<(VolumeRec, u64)> = self.volume(&id).await?;
        let (rec, version) = match existing {
            Some((rec, _)) if rec.fingerprint != spec.fingerprint => {
                return Err(ControllerError::NameTaken {
                    kind: "volume",
                    name: spec.name,
                    holder: format!("a volume with other arguments ({})", rec.fingerprint),
                });
            }
            Some((rec, _)) if rec.phase == Phase::Available => return Ok(rec),
            Some((rec, _)) if rec.phase == Phase::Deleting => {
                return Err(ControllerError::BeingDeleted { kind: "volume", name: spec.name });
            }
            // Creating (an interrupted or earlier attempt) or Error (retry): run the flow again.
            Some((rec, version)) => (rec, version),
            None => {
                let now = now_ms();
                let rec = VolumeRec {
                    id: id.clone(),
                    name: spec.name.clone(),
                    size_bytes: spec.size_bytes,
                    node: None,
                    phase: Phase::Creating,
                    source: spec.source.clone(),
                    provisioning: spec.provisioning,
                    parameters: spec.parameters.clone(),
                    fingerprint: spec.fingerprint.clone(),
                    accessible_topology: vec![],
                    attempts: vec![],
                    error: None,
                    metadata: spec.metadata.clone(),
                    created_ms: now,
                    updated_ms: now,
                    accessibility: spec.accessibility,
                    copy: None,
                    migration: None,
                };
                (rec, 0)
            }
        };
        let mut ctx = CreateCtx { m: self.clone(), spec, rec, version, pinned: None, source_metadata: BTreeMap::new(), reservation: None };
        let flow = Flow::new("create_volume").then(RecordVolume).then(ScheduleAndCreate).then(MarkAvailable);
        match flow.run(&mut ctx).await {
            Ok(()) => Ok(ctx.rec),
            Err(f) => {
                if !f.error.pending {
                    let reason = if f.error.error.failure() == Failure::NoSpace { "NoNodeFits" } else { "ProvisioningFailed" };
                    self.event(&ctx.rec, true, reason, f.to_string()).await;
                }
                Err(ControllerError::FlowFailed(Box::new(f)))
            }
        }
    }
}

impl CreateCtx {
    /// The volume exists on its node: the view keeps the reservation until
    /// the node's next report counts it.
    fn settle(&mut self) {
        if let Some(r) = self.reservation.take() {
            r.settle();
        }
    }
}

pub(super) struct CreateCtx {
    pub(super) m: Manager,
    pub(super) spec: CreateVolumeSpec,
    pub(super) rec: VolumeRec,
    version: u64,
    /// The source's node: the volume goes there when it fits (a reflink),
    /// elsewhere by a copy only when the StorageClass allows it.
    pinned: Option<String>,
    source_metadata: BTreeMap<String, String>,
    /// What the node view holds for this volume on the node it was placed on.
    reservation: Option<Reservation>,
}

impl CreateCtx {
    /// Writes the record: the first write creates it (version 0: not yet
    /// stored), later ones compare-and-set.
    pub(super) async fn save(&mut self) -> Result<(), TaskError> {
        self.rec.updated_ms = now_ms();
        if self.version == 0 {
            return match store::create_json(&*self.m.store, Kind::Volume, &self.rec.id, &self.rec).await {
                Ok(v) => {
                    self.version = v;
                    Ok(())
                }
                Err(StoreError::AlreadyExists { .. }) => {
                    Err(ControllerError::InProgress("another controller is creating this volume; retry".into()).into())
                }
                Err(e) => Err(ControllerError::from(e).into()),
            };
        }
        self.version =
            store::update_json(&*self.m.store, Kind::Volume, &self.rec.id, &self.rec, self.version).await.map_err(ControllerError::from)?;
        Ok(())
    }
}

/// Check the source and make the record `Creating` (keyed by the name's
/// ID); a new record is first written together with the node it is placed
/// on (one write, not two), an existing one is reset now. On failure of a
/// later task, record `Error` with every attempt's reason.
struct RecordVolume;

#[tonic::async_trait]
impl Task<CreateCtx, ControllerError> for RecordVolume {
    fn name(&self) -> &'static str {
        "record"
    }
    async fn execute(&self, ctx: &mut CreateCtx) -> Result<(), TaskError> {
        // The source decides the node (a reflink needs the same filesystem).
        match &ctx.spec.source {
            Some(SourceRef::Snapshot(s)) => {
                let (snap, _) = ctx.m.snapshot(s).await?.ok_or_else(|| ControllerError::not_found("source snapshot", s))?;
                if snap.phase != Phase::Available {
                    let what = format!("source snapshot {s}");
                    return Err(ControllerError::NotAvailable { what, phase: snap.phase, then: "wait until it is ready" }.into());
                }
                if ctx.spec.size_bytes < snap.size_bytes {
                    let of = format!("snapshot {s}");
                    return Err(ControllerError::SmallerThanSource { size: ctx.spec.size_bytes, of, of_size: snap.size_bytes }.into());
                }
                ctx.pinned = Some(snap.node.clone());
                ctx.source_metadata = snap.metadata.clone();
            }
            Some(SourceRef::Volume(v)) => {
                let (vol, _) = ctx.m.volume(v).await?.ok_or_else(|| ControllerError::not_found("source volume", v))?;
                let (Phase::Available, Some(node)) = (vol.phase, vol.node.clone()) else {
                    let what = format!("source volume {v}");
                    return Err(ControllerError::NotAvailable { what, phase: vol.phase, then: "wait for it or pick another" }.into());
                };
                if ctx.spec.size_bytes < vol.size_bytes {
                    let of = format!("volume {v}");
                    return Err(ControllerError::SmallerThanSource { size: ctx.spec.size_bytes, of, of_size: vol.size_bytes }.into());
                }
                ctx.pinned = Some(node);
                ctx.source_metadata = vol.metadata.clone();
            }
            None => {}
        }
        for (k, v) in ctx.source_metadata.clone() {
            ctx.rec.metadata.entry(k).or_insert(v);
        }
        if ctx.version != 0 {
            ctx.rec.phase = Phase::Creating;
            ctx.rec.error = None;
            // An interrupted attempt's node stays: the flow goes there first.
            if ctx.rec.node.is_none() {
                ctx.rec.attempts.clear();
            }
            ctx.save().await?;
        }
        Ok(())
    }
    async fn revert(&self, ctx: &mut CreateCtx, cause: &TaskError) -> Result<(), TaskError> {
        ctx.reservation = None;
        ctx.rec.phase = Phase::Error;
        ctx.rec.node = None;
        ctx.rec.error = Some(cause.to_string());
        ctx.save().await
    }
}

/// What a node did with a create whose answer was lost.
#[allow(clippy::large_enum_variant)] // one short-lived value per lost answer
enum Asked {
    Created(pb::Volume),
    Absent,
    StillCreating,
    CannotAsk(ControllerError),
}

/// Ask `node` about volume `id` until it has an answer other than "still
/// being made", for at most `patience`.
async fn ask_node(m: &Manager, node: &str, id: &str, patience: Duration) -> Asked {
    let until = Instant::now() + patience;
    loop {
        let last_err = match m.agent_for(node).await {
            Ok(mut agent) => match agent.get_volume(pb::GetVolumeRequest { volume_id: id.to_string() }).await {
                Ok(r) => {
                    let v = r.volume.unwrap_or_default();
                    if v.state == pb::ImageState::Available as i32 {
                        return Asked::Created(v);
                    }
                    if v.state != pb::ImageState::Creating as i32 {
                        return Asked::Absent; // being deleted, or broken: not ours to use
                    }
                    None
                }
                Err(e) if e.failure == Failure::NotFound => return Asked::Absent,
                Err(e) => Some(ControllerError::Agent(e)),
            },
            Err(e) => Some(e),
        };
        if Instant::now() >= until {
            return match last_err {
                Some(s) => Asked::CannotAsk(s),
                None => Asked::StillCreating,
            };
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Schedule, call the chosen node; on a node's failure clean up there,
/// exclude it and try again, at most `max_attempts` times.
struct ScheduleAndCreate;

#[tonic::async_trait]
impl Task<CreateCtx, ControllerError> for ScheduleAndCreate {
    fn name(&self) -> &'static str {
        "schedule_and_create"
    }
    async fn execute(&self, ctx: &mut CreateCtx) -> Result<(), TaskError> {
        let max = ctx.m.config.max_attempts.max(1);
        // A record resumed after an interruption may already name its node:
        // go there first (the agent's create is idempotent), so nothing is
        // duplicated and nothing half-made is abandoned.
        let mut resume = ctx.rec.node.clone();
        loop {
            let node = match resume.take() {
                Some(n) => n,
                None => {
                    ctx.m.view_ready().await?;
                    let mut req = ScheduleRequest {
                        size_bytes: ctx.spec.size_bytes,
                        provisioning: ctx.spec.provisioning,
                        requisite: ctx.spec.requisite.clone(),
                        preferred: ctx.spec.preferred.clone(),
                        pinned_node: ctx.pinned.clone(),
                        tried: ctx.rec.attempts.iter().map(|a| a.node.clone()).collect(),
                        placement: ctx.spec.placement,
                        now_ms: now_ms(),
                        heartbeat_timeout_ms: ctx.m.config.heartbeat_timeout.as_millis() as i64,
                    };
                    // The view leaves mismatched nodes out, and reserves
                    // the size on the chosen node at once. The source's
                    // node first (a reflink); then, where allowed, any
                    // other (a copy over NBD).
                    let mut placed = ctx.m.view.place(&ctx.rec.id, &req).map_err(|no| no.to_string());
                    if let (Err(first), Some(source_node)) = (&placed, ctx.pinned.clone()) {
                        let first = first.to_string();
                        placed = if crossnode::allowed(&ctx.spec.parameters) {
                            req.pinned_node = None;
                            req.tried.push(source_node);
                            ctx.m.view.place(&ctx.rec.id, &req).map_err(|no| format!("{first}; and for a copy from another node: {no}"))
                        } else {
                            Err(format!(
                                "{first}; the StorageClass forbids copying the source to another node (crossNodeSources: \"false\")"
                            ))
                        };
                    }
                    match placed {
                        Ok(placed) => {
                            let node = placed.node_id.clone();
                            ctx.reservation = Some(placed);
                            node
                        }
                        Err(mut msg) => {
                            for a in &ctx.rec.attempts {
                                msg.push_str(&format!("; attempt on {} failed: {}", a.node, a.error));
                            }
                            return Err(ControllerError::NoNodeFits { reasons: msg }.into());
                        }
                    }
                }
            };
            ctx.rec.node = Some(node.clone());
            ctx.save().await?; // the choice is durable before the node acts
            info!(volume.id = %ctx.rec.id, node = %node, attempt = ctx.rec.attempts.len() + 1, "scheduled");
            let note = format!("scheduled on node {node} (attempt {})", ctx.rec.attempts.len() + 1);
            ctx.m.event(&ctx.rec, false, "Scheduled", note).await;
            let made = match ctx.pinned.clone() {
                Some(source_node) if source_node != node => crossnode::copy_on(ctx, &node, &source_node).await,
                _ => create_on(ctx, &node).await,
            };
            let failure = match made {
                Ok(v) => {
                    ctx.rec.size_bytes = v.size_bytes;
                    ctx.settle();
                    return Ok(());
                }
                Err(e) if e.never_sent() => {
                    // Nothing reached the node: another node may do, nothing to clean.
                    TaskError::new(ControllerError::During { what: format!("node {node}"), cause: Box::new(e) }).reschedulable()
                }
                Err(e) if e.outcome_unknown() => {
                    // The node may have done it, may be doing it, or may not
                    // have heard: ask before deciding anything.
                    warn!(volume.id = %ctx.rec.id, node = %node, error = %e, "create's outcome unknown; asking the node");
                    match ask_node(&ctx.m, &node, &ctx.rec.id, ctx.m.config.agent_timeout).await {
                        Asked::Created(v) => {
                            ctx.rec.size_bytes = v.size_bytes;
                            ctx.settle();
                            return Ok(());
                        }
                        Asked::Absent => {
                            let what = format!("node {node} (it has no such volume)");
                            TaskError::new(ControllerError::During { what, cause: Box::new(e) }).reschedulable()
                        }
                        Asked::StillCreating => {
                            let busy = format!("volume is still being created on node {node}; retry to collect it");
                            return Err(TaskError::new(ControllerError::InProgress(busy)).pending());
                        }
                        Asked::CannotAsk(asked) => {
                            let unknown =
                                ControllerError::OutcomeUnknown { node: node.clone(), call: e.to_string(), asked: asked.to_string() };
                            return Err(TaskError::new(unknown).pending());
                        }
                    }
                }
                Err(e) if e.is_mismatch() => {
                    // Not the node we meant: write nothing there, not even a cleanup.
                    TaskError::new(e).reschedulable()
                }
                Err(e) => {
                    warn!(volume.id = %ctx.rec.id, node = %node, error = %e, "create on node failed; cleaning up there");
                    if let Ok(mut agent) = ctx.m.agent_for(&node).await {
                        let _ = agent.delete_volume(pb::DeleteVolumeRequest { volume_id: ctx.rec.id.clone() }).await;
                    }
                    // The node's own trouble (full, broken pool): another node
                    // may do. Not a refusal by the fence: then this replica
                    // no longer leads and must stop.
                    let own_trouble = matches!(e.failure(), Failure::Internal | Failure::NoSpace);
                    let e = TaskError::new(ControllerError::During { what: format!("node {node}"), cause: Box::new(e) });
                    if own_trouble {
                        e.reschedulable()
                    } else {
                        e
                    }
                }
            };
            // That node's reservation goes; the next placement makes its own.
            ctx.reservation = None;
            ctx.rec.attempts.push(Attempt {
                node: node.clone(),
                error: format!("{:?}: {}", failure.error.code(), failure.error),
                at_ms: now_ms(),
            });
            ctx.rec.node = None;
            ctx.save().await?;
            // A source that must stay on its node leaves nowhere else to go.
            let pinned = ctx.pinned.is_some() && !crossnode::allowed(&ctx.spec.parameters);
            let again = failure.reschedulable && !pinned && ctx.rec.attempts.len() < max;
            if again {
                crate::metrics::METRICS.reschedules.inc();
                let note = format!("node {node} failed ({}); rescheduling", failure.error);
                ctx.m.event(&ctx.rec, true, "Rescheduling", note).await;
                continue;
            }
            let reasons: Vec<String> = ctx.rec.attempts.iter().map(|a| format!("{}: {}", a.node, a.error)).collect();
            return Err(ControllerError::AttemptsFailed {
                attempts: ctx.rec.attempts.len(),
                reasons: reasons.join("; "),
                rescheduled: failure.reschedulable && !pinned,
                last: Box::new(failure.error),
            }
            .into());
        }
    }
    async fn revert(&self, ctx: &mut CreateCtx, _cause: &TaskError) -> Result<(), TaskError> {
        if let Some(node) = ctx.rec.node.clone() {
            let mut agent = ctx.m.agent_for(&node).await?;
            agent
                .delete_volume(pb::DeleteVolumeRequest { volume_id: ctx.rec.id.clone() })
                .await
                .map_err(ControllerError::during(format!("cleanup on {node}")))?;
        }
        Ok(())
    }
}

async fn create_on(ctx: &CreateCtx, node: &str) -> Result<pb::Volume, ControllerError> {
    let mut agent = ctx.m.agent_for(node).await?;
    let source = match &ctx.spec.source {
        Some(SourceRef::Snapshot(s)) => Some(pb::create_volume_request::Source::SnapshotId(s.clone())),
        Some(SourceRef::Volume(v)) => Some(pb::create_volume_request::Source::SourceVolumeId(v.clone())),
        None => None,
    };
    let req = pb::CreateVolumeRequest {
        volume_id: ctx.rec.id.clone(),
        size_bytes: ctx.spec.size_bytes,
        provisioning: crate::agent::provisioning_to_pb(ctx.spec.provisioning) as i32,
        source,
        metadata: ctx.rec.metadata.clone().into_iter().collect(),
        remote: None,
    };
    agent.create_volume(req).await.map_err(ControllerError::Agent)?.volume.ok_or(ControllerError::IncompleteAnswer("a volume"))
}

/// Mark the record Available with where it can be reached from.
struct MarkAvailable;

#[tonic::async_trait]
impl Task<CreateCtx, ControllerError> for MarkAvailable {
    fn name(&self) -> &'static str {
        "mark_available"
    }
    async fn execute(&self, ctx: &mut CreateCtx) -> Result<(), TaskError> {
        let node = ctx.rec.node.clone().unwrap_or_default();
        let zone = ctx.m.node_in_view(&node).await?.map(|n| n.zone).unwrap_or_default();
        ctx.rec.accessible_topology = vec![accessible_from(&node, &zone, ctx.rec.accessibility)];
        ctx.rec.phase = Phase::Available;
        ctx.rec.error = None;
        ctx.save().await?;
        info!(volume.id = %ctx.rec.id, volume.name = %ctx.rec.name, node = %node, size = ctx.rec.size_bytes, "volume available");
        Ok(())
    }
}

/// Where a volume can be used from: its node, or its node's whole zone
/// (remote attach over NBD); a node without a zone keeps node access.
pub(crate) fn accessible_from(node: &str, zone: &str, accessibility: Accessibility) -> Segments {
    if accessibility == Accessibility::Zone && !zone.is_empty() {
        return Segments::from([(crate::TOPOLOGY_ZONE_KEY.to_string(), zone.to_string())]);
    }
    topology_of(node, zone)
}

pub(crate) fn topology_of(node: &str, zone: &str) -> Segments {
    let mut segments = Segments::new();
    segments.insert(crate::TOPOLOGY_NODE_KEY.to_string(), node.to_string());
    if !zone.is_empty() {
        segments.insert(crate::TOPOLOGY_ZONE_KEY.to_string(), zone.to_string());
    }
    segments
}
