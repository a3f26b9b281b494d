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

use tonic::{Code, Status};
use tracing::{info, warn};

use super::agents::{is_mismatch, outcome_unknown};
use super::crossnode;
use super::manager::{status_task, task_err, CreateVolumeSpec, Manager};
use super::records::*;
use crate::agent_proto as pb;
use crate::flow::{Flow, FlowFailure, Task, TaskError};
use crate::scheduler::{Reservation, ScheduleRequest, Segments};
use crate::store::{self, Kind, StoreError};

impl Manager {
    pub async fn create_volume(&self, spec: CreateVolumeSpec) -> Result<VolumeRec, Status> {
        self.wait_leader().await?;
        let m = self.clone();
        self.detached(async move { m.create_volume_now(spec).await }).await
    }

    async fn create_volume_now(&self, spec: CreateVolumeSpec) -> Result<VolumeRec, Status> {
        let id = volume_id_for(&spec.name);
        let _guard = self.inflight.acquire(&id).await;
        let existing: Option<(VolumeRec, u64)> = self.volume(&id).await?;
        let (rec, version) = match existing {
            Some((rec, _)) if rec.fingerprint != spec.fingerprint => {
                return Err(Status::already_exists(format!(
                    "volume name {:?} is taken by a volume with other arguments ({}); pick another name or repeat the original request",
                    spec.name, rec.fingerprint
                )));
            }
            Some((rec, _)) if rec.phase == Phase::Available => return Ok(rec),
            Some((rec, _)) if rec.phase == Phase::Deleting => {
                return Err(Status::aborted(format!("volume {:?} is being deleted; retry when it is gone", spec.name)));
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
                    let reason = if f.error.code == Code::ResourceExhausted { "NoNodeFits" } else { "ProvisioningFailed" };
                    self.event(&ctx.rec, true, reason, f.to_string()).await;
                }
                Err(flow_status(&f))
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

pub(crate) fn flow_status(f: &FlowFailure) -> Status {
    Status::new(f.error.code, f.to_string())
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
                    Err(TaskError::new(Code::Aborted, "another controller is creating this volume; retry"))
                }
                Err(e) => Err(task_err(e)),
            };
        }
        self.version = store::update_json(&*self.m.store, Kind::Volume, &self.rec.id, &self.rec, self.version).await.map_err(task_err)?;
        Ok(())
    }
}

/// Check the source and make the record `Creating` (keyed by the name's
/// ID); a new record is first written together with the node it is placed
/// on (one write, not two), an existing one is reset now. On failure of a
/// later task, record `Error` with every attempt's reason.
struct RecordVolume;

#[tonic::async_trait]
impl Task<CreateCtx> for RecordVolume {
    fn name(&self) -> &'static str {
        "record"
    }
    async fn execute(&self, ctx: &mut CreateCtx) -> Result<(), TaskError> {
        // The source decides the node (a reflink needs the same filesystem).
        match &ctx.spec.source {
            Some(SourceRef::Snapshot(s)) => {
                let (snap, _) = ctx
                    .m
                    .snapshot(s)
                    .await
                    .map_err(status_task)?
                    .ok_or_else(|| TaskError::new(Code::NotFound, format!("source snapshot {s} does not exist")))?;
                if snap.phase != Phase::Available {
                    return Err(TaskError::new(Code::FailedPrecondition, format!("source snapshot {s} is {:?}, not ready", snap.phase)));
                }
                if ctx.spec.size_bytes < snap.size_bytes {
                    return Err(TaskError::new(
                        Code::OutOfRange,
                        format!("{} bytes is smaller than snapshot {s} ({} bytes)", ctx.spec.size_bytes, snap.size_bytes),
                    ));
                }
                ctx.pinned = Some(snap.node.clone());
                ctx.source_metadata = snap.metadata.clone();
            }
            Some(SourceRef::Volume(v)) => {
                let (vol, _) = ctx
                    .m
                    .volume(v)
                    .await
                    .map_err(status_task)?
                    .ok_or_else(|| TaskError::new(Code::NotFound, format!("source volume {v} does not exist")))?;
                let (Phase::Available, Some(node)) = (vol.phase, vol.node.clone()) else {
                    return Err(TaskError::new(Code::FailedPrecondition, format!("source volume {v} is {:?}, not Available", vol.phase)));
                };
                if ctx.spec.size_bytes < vol.size_bytes {
                    return Err(TaskError::new(
                        Code::OutOfRange,
                        format!("{} bytes is smaller than volume {v} ({} bytes)", ctx.spec.size_bytes, vol.size_bytes),
                    ));
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
        ctx.rec.error = Some(cause.message.clone());
        ctx.save().await
    }
}

/// What a node did with a create whose answer was lost.
#[allow(clippy::large_enum_variant)] // one short-lived value per lost answer
enum Asked {
    Created(pb::Volume),
    Absent,
    StillCreating,
    CannotAsk(Status),
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
                Err(s) if s.code() == Code::NotFound => return Asked::Absent,
                Err(s) => Some(s),
            },
            Err(e) => Some(Status::new(e.code, e.message)),
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
impl Task<CreateCtx> for ScheduleAndCreate {
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
                    ctx.m.view_ready().await.map_err(status_task)?;
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
                            return Err(TaskError::new(Code::ResourceExhausted, msg));
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
                Err(s) if crate::tls::client::never_sent(&s) => {
                    // Nothing reached the node: another node may do, nothing to clean.
                    TaskError::new(s.code(), format!("node {node}: {}", s.message())).reschedulable()
                }
                Err(s) if outcome_unknown(&s) => {
                    // The node may have done it, may be doing it, or may not
                    // have heard: ask before deciding anything.
                    warn!(volume.id = %ctx.rec.id, node = %node, error = %s.message(), "create's outcome unknown; asking the node");
                    match ask_node(&ctx.m, &node, &ctx.rec.id, ctx.m.config.agent_timeout).await {
                        Asked::Created(v) => {
                            ctx.rec.size_bytes = v.size_bytes;
                            ctx.settle();
                            return Ok(());
                        }
                        Asked::Absent => {
                            TaskError::new(s.code(), format!("node {node}: {} (the node has no such volume)", s.message())).reschedulable()
                        }
                        Asked::StillCreating => {
                            return Err(TaskError::new(
                                Code::Aborted,
                                format!("volume is still being created on node {node}; retry to collect it"),
                            )
                            .pending());
                        }
                        Asked::CannotAsk(e) => {
                            return Err(TaskError::new(
                                Code::Unavailable,
                                format!(
                                    "node {node} did not answer ({}) and cannot be asked what it did ({}); retry",
                                    s.message(),
                                    e.message()
                                ),
                            )
                            .pending());
                        }
                    }
                }
                Err(s) if is_mismatch(&s) => {
                    // Not the node we meant: write nothing there, not even a cleanup.
                    TaskError::new(s.code(), s.message()).reschedulable()
                }
                Err(s) => {
                    warn!(volume.id = %ctx.rec.id, node = %node, error = %s.message(), "create on node failed; cleaning up there");
                    if let Ok(mut agent) = ctx.m.agent_for(&node).await {
                        let _ = agent.delete_volume(pb::DeleteVolumeRequest { volume_id: ctx.rec.id.clone() }).await;
                    }
                    let e = TaskError::new(s.code(), format!("node {node}: {}", s.message()));
                    // The node's own trouble (full, broken pool): another node
                    // may do. Not a refusal by the fence: then this replica
                    // no longer leads and must stop.
                    match s.code() {
                        Code::Internal | Code::ResourceExhausted => e.reschedulable(),
                        _ => e,
                    }
                }
            };
            // That node's reservation goes; the next placement makes its own.
            ctx.reservation = None;
            ctx.rec.attempts.push(Attempt {
                node: node.clone(),
                error: format!("{:?}: {}", failure.code, failure.message),
                at_ms: now_ms(),
            });
            ctx.rec.node = None;
            ctx.save().await?;
            // A source that must stay on its node leaves nowhere else to go.
            let pinned = ctx.pinned.is_some() && !crossnode::allowed(&ctx.spec.parameters);
            let again = failure.reschedulable && !pinned && ctx.rec.attempts.len() < max;
            if again {
                crate::metrics::METRICS.reschedules.inc();
                let note = format!("node {node} failed ({}); rescheduling", failure.message);
                ctx.m.event(&ctx.rec, true, "Rescheduling", note).await;
                continue;
            }
            let reasons: Vec<String> = ctx.rec.attempts.iter().map(|a| format!("{}: {}", a.node, a.error)).collect();
            let code = if failure.reschedulable && !pinned { Code::Internal } else { failure.code };
            return Err(TaskError::new(
                code,
                format!("volume could not be created after {} attempt(s): {}", ctx.rec.attempts.len(), reasons.join("; ")),
            ));
        }
    }
    async fn revert(&self, ctx: &mut CreateCtx, _cause: &TaskError) -> Result<(), TaskError> {
        if let Some(node) = ctx.rec.node.clone() {
            let mut agent = ctx.m.agent_for(&node).await?;
            agent
                .delete_volume(pb::DeleteVolumeRequest { volume_id: ctx.rec.id.clone() })
                .await
                .map_err(|s| TaskError::new(s.code(), format!("cleanup on {node}: {}", s.message())))?;
        }
        Ok(())
    }
}

async fn create_on(ctx: &CreateCtx, node: &str) -> Result<pb::Volume, Status> {
    let mut agent = ctx.m.agent_for(node).await.map_err(|e| Status::new(e.code, e.message))?;
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
    agent.create_volume(req).await?.volume.ok_or_else(|| Status::internal("agent answered without a volume"))
}

/// Mark the record Available with where it can be reached from.
struct MarkAvailable;

#[tonic::async_trait]
impl Task<CreateCtx> for MarkAvailable {
    fn name(&self) -> &'static str {
        "mark_available"
    }
    async fn execute(&self, ctx: &mut CreateCtx) -> Result<(), TaskError> {
        let node = ctx.rec.node.clone().unwrap_or_default();
        let zone = ctx.m.node_in_view(&node).await.map_err(status_task)?.map(|n| n.zone).unwrap_or_default();
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
