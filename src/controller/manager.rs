//! The controller's domain: Cinder's create-volume flow (record, schedule,
//! create on the chosen node, revert and reschedule on failure), snapshots,
//! deletion and expansion. The CSI layer (controller/service.rs) only maps
//! requests and answers onto this.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tonic::{Code, Status};
use tracing::{info, warn};

use super::agents::Agents;
use super::inflight::Inflight;
use super::records::*;
use crate::agent_proto as pb;
use crate::flow::{Flow, FlowFailure, Task, TaskError};
use crate::scheduler::{self, Placement, ScheduleRequest, Segments};
use crate::store::{self, Kind, Store, StoreError};
use crate::volume::Provisioning;

#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// A node whose last report is older than this is not scheduled.
    pub heartbeat_timeout: Duration,
    /// Cinder's scheduler_max_attempts.
    pub max_attempts: usize,
    /// Records stuck in Creating longer than this (and not being worked on) are resolved.
    pub stuck_grace: Duration,
    /// Per-call timeout towards node agents.
    pub agent_timeout: Duration,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            heartbeat_timeout: Duration::from_secs(15),
            max_attempts: 3,
            stuck_grace: Duration::from_secs(120),
            agent_timeout: Duration::from_secs(120),
        }
    }
}

/// A validated CreateVolume.
#[derive(Debug, Clone)]
pub struct CreateVolumeSpec {
    pub name: String,
    pub size_bytes: u64,
    pub provisioning: Provisioning,
    pub placement: Placement,
    pub source: Option<SourceRef>,
    pub requisite: Vec<Segments>,
    pub preferred: Vec<Segments>,
    pub parameters: BTreeMap<String, String>,
    pub metadata: BTreeMap<String, String>,
    pub fingerprint: String,
}

/// Where the controller tells people what it decided (Kubernetes Events on
/// the PVC in a cluster; nothing in standalone).
#[tonic::async_trait]
pub trait EventSink: Send + Sync {
    async fn volume_event(&self, volume: &VolumeRec, warning: bool, reason: &str, note: String);
}

#[derive(Clone)]
pub struct Manager {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) agents: Arc<Agents>,
    pub(crate) config: ControllerConfig,
    inflight: Arc<Inflight>,
    events: Option<Arc<dyn EventSink>>,
    /// With leader election: true while this replica leads. Without: None.
    leader: Option<tokio::sync::watch::Receiver<bool>>,
}

pub fn store_status(e: StoreError) -> Status {
    Status::from(e)
}

fn task_err(e: StoreError) -> TaskError {
    let s = Status::from(e);
    TaskError::new(s.code(), s.message().to_string())
}

impl Manager {
    pub fn new(store: Arc<dyn Store>, config: ControllerConfig) -> Self {
        Manager {
            agents: Arc::new(Agents::new(config.agent_timeout)),
            store,
            config,
            inflight: Arc::new(Inflight::default()),
            events: None,
            leader: None,
        }
    }

    pub fn with_events(mut self, events: Arc<dyn EventSink>) -> Self {
        self.events = Some(events);
        self
    }

    pub fn with_leader(mut self, leader: tokio::sync::watch::Receiver<bool>) -> Self {
        self.leader = Some(leader);
        self
    }

    pub fn is_leader(&self) -> bool {
        self.leader.as_ref().is_none_or(|l| *l.borrow())
    }

    /// Only the leader changes records; a standby waits a little (a
    /// takeover may be under way), then asks the caller to retry.
    pub async fn wait_leader(&self) -> Result<(), Status> {
        let Some(mut rx) = self.leader.clone() else { return Ok(()) };
        let wait = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|l| *l)).await;
        match wait {
            Ok(Ok(_)) => Ok(()),
            _ => Err(Status::unavailable("this controller replica is not the leader; retry (the leader answers)")),
        }
    }

    async fn event(&self, volume: &VolumeRec, warning: bool, reason: &str, note: String) {
        if let Some(e) = &self.events {
            e.volume_event(volume, warning, reason, note).await;
        }
    }

    pub fn store(&self) -> &dyn Store {
        &*self.store
    }

    pub async fn volume(&self, id: &str) -> Result<Option<(VolumeRec, u64)>, Status> {
        store::get_json(&*self.store, Kind::Volume, id).await.map_err(store_status)
    }
    pub async fn snapshot(&self, id: &str) -> Result<Option<(SnapshotRec, u64)>, Status> {
        store::get_json(&*self.store, Kind::Snapshot, id).await.map_err(store_status)
    }
    pub async fn nodes(&self) -> Result<Vec<NodeRec>, Status> {
        Ok(store::list_json::<NodeRec>(&*self.store, Kind::Node).await.map_err(store_status)?.into_iter().map(|(n, _)| n).collect())
    }
    pub async fn volumes(&self) -> Result<Vec<VolumeRec>, Status> {
        Ok(store::list_json::<VolumeRec>(&*self.store, Kind::Volume).await.map_err(store_status)?.into_iter().map(|(v, _)| v).collect())
    }
    pub async fn snapshots(&self) -> Result<Vec<SnapshotRec>, Status> {
        Ok(store::list_json::<SnapshotRec>(&*self.store, Kind::Snapshot).await.map_err(store_status)?.into_iter().map(|(s, _)| s).collect())
    }

    pub fn node_is_healthy(&self, n: &NodeRec) -> bool {
        now_ms() - n.heartbeat_ms <= self.config.heartbeat_timeout.as_millis() as i64
    }

    async fn agent_for(&self, node_id: &str) -> Result<crate::controller::agents::AgentClient, TaskError> {
        let node: Option<(NodeRec, u64)> = store::get_json(&*self.store, Kind::Node, node_id).await.map_err(task_err)?;
        let node = node.ok_or_else(|| {
            TaskError::new(Code::Unavailable, format!("node {node_id} is not registered")).reschedulable()
        })?;
        self.agents.client(&node.0.agent_address).map_err(|s| TaskError::new(s.code(), s.message()))
    }

    // ------------------------------------------------------------ create volume

    pub async fn create_volume(&self, spec: CreateVolumeSpec) -> Result<VolumeRec, Status> {
        self.wait_leader().await?;
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
            // Creating (a crashed or earlier attempt) or Error (retry): run the flow again.
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
                };
                (rec, 0)
            }
        };
        let mut ctx = CreateCtx { m: self.clone(), spec, rec, version, pinned: None, source_metadata: BTreeMap::new() };
        let flow = Flow::new("create_volume").then(RecordVolume).then(ScheduleAndCreate).then(MarkAvailable);
        match flow.run(&mut ctx).await {
            Ok(()) => Ok(ctx.rec),
            Err(f) => {
                let reason = if f.error.code == Code::ResourceExhausted { "NoNodeFits" } else { "ProvisioningFailed" };
                self.event(&ctx.rec, true, reason, f.to_string()).await;
                Err(flow_status(&f))
            }
        }
    }

    // ------------------------------------------------------------ delete volume

    pub async fn delete_volume(&self, id: &str) -> Result<(), Status> {
        self.wait_leader().await?;
        let _guard = self.inflight.acquire(id).await;
        let Some((mut rec, version)) = self.volume(id).await? else {
            return Ok(());
        };
        if rec.phase != Phase::Deleting {
            rec.phase = Phase::Deleting;
            rec.updated_ms = now_ms();
            store::update_json(&*self.store, Kind::Volume, id, &rec, version).await.map_err(store_status)?;
        }
        if let Some(node) = &rec.node {
            let mut agent = self.agent_for(node).await.map_err(|e| Status::unavailable(e.message))?;
            agent
                .delete_volume(pb::DeleteVolumeRequest { volume_id: id.to_string() })
                .await
                .map_err(|s| Status::new(Code::Unavailable, format!("node {node} could not delete volume {id}: {}; retry", s.message())))?;
        }
        let (_, version) = self.volume(id).await?.ok_or_else(|| Status::aborted("volume vanished during delete"))?;
        self.store.delete(Kind::Volume, id, Some(version)).await.map_err(store_status)?;
        info!(volume.id = %id, volume.name = %rec.name, "volume deleted");
        Ok(())
    }

    // ------------------------------------------------------------ snapshots

    pub async fn create_snapshot(
        &self,
        name: &str,
        source_volume_id: &str,
        parameters: BTreeMap<String, String>,
    ) -> Result<SnapshotRec, Status> {
        let id = snapshot_id_for(name);
        self.wait_leader().await?;
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
                _ => {
                    // Creating after a crash, or Error: retry on the same node.
                    return self.run_snapshot(rec, version).await;
                }
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
        };
        let version = store::create_json(&*self.store, Kind::Snapshot, &id, &rec).await.map_err(store_status)?;
        self.run_snapshot(rec, version).await
    }

    async fn run_snapshot(&self, mut rec: SnapshotRec, mut version: u64) -> Result<SnapshotRec, Status> {
        let result = async {
            let mut agent = self.agent_for(&rec.node).await?;
            agent
                .create_snapshot(pb::CreateSnapshotRequest {
                    snapshot_id: rec.id.clone(),
                    source_volume_id: rec.source_volume_id.clone(),
                    metadata: rec.metadata.clone().into_iter().collect(),
                })
                .await
                .map_err(|s| TaskError::new(s.code(), format!("node {}: {}", rec.node, s.message())))
        }
        .await;
        match result {
            Ok(resp) => {
                if let Some(s) = resp.into_inner().snapshot {
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
                // Revert: nothing half-made stays on the node; the record says why.
                if let Ok(mut agent) = self.agent_for(&rec.node).await {
                    let _ = agent.delete_snapshot(pb::DeleteSnapshotRequest { snapshot_id: rec.id.clone() }).await;
                }
                rec.phase = Phase::Error;
                rec.error = Some(e.message.clone());
                if let Ok(v) = store::update_json(&*self.store, Kind::Snapshot, &rec.id, &rec, version).await {
                    version = v;
                }
                let _ = version;
                warn!(snapshot.id = %rec.id, error = %e.message, "snapshot failed");
                let code = match e.code {
                    Code::NotFound => Code::NotFound,
                    Code::ResourceExhausted => Code::ResourceExhausted,
                    Code::Unavailable => Code::Unavailable,
                    _ => Code::Internal,
                };
                Err(Status::new(code, format!("snapshot {} failed: {}", rec.name, e.message)))
            }
        }
    }

    pub async fn delete_snapshot(&self, id: &str) -> Result<(), Status> {
        self.wait_leader().await?;
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

    // ------------------------------------------------------------ expand

    pub async fn expand_volume(&self, id: &str, size: u64) -> Result<VolumeRec, Status> {
        self.wait_leader().await?;
        let _guard = self.inflight.acquire(id).await;
        let (mut rec, version) = self.volume(id).await?.ok_or_else(|| Status::not_found(format!("volume {id} does not exist")))?;
        let (Phase::Available, Some(node)) = (rec.phase, rec.node.clone()) else {
            return Err(Status::failed_precondition(format!("volume {id} is {:?}; only an Available volume can grow", rec.phase)));
        };
        if size <= rec.size_bytes {
            return Ok(rec);
        }
        let mut agent = self.agent_for(&node).await.map_err(|e| Status::unavailable(e.message))?;
        let v = agent
            .expand_volume(pb::ExpandVolumeRequest { volume_id: id.to_string(), size_bytes: size })
            .await
            .map_err(|s| Status::new(s.code(), format!("node {node}: {}", s.message())))?
            .into_inner()
            .volume
            .ok_or_else(|| Status::internal("agent answered without a volume"))?;
        rec.size_bytes = v.size_bytes;
        rec.updated_ms = now_ms();
        store::update_json(&*self.store, Kind::Volume, id, &rec, version).await.map_err(store_status)?;
        info!(volume.id = %id, size = rec.size_bytes, "volume expanded");
        Ok(rec)
    }

    // ------------------------------------------------------------ reconciler

    /// One pass of the reconciler: records stuck in Creating for longer than
    /// the grace period (a controller crash) are reverted to Error with their
    /// node cleaned; images on a node that no record owns, older than the
    /// grace period, are deleted. Everything it does is logged.
    pub async fn reconcile_once(&self) -> Result<ReconcileReport, Status> {
        let mut report = ReconcileReport::default();
        if !self.is_leader() {
            return Ok(report);
        }
        let grace = self.config.stuck_grace.as_millis() as i64;
        let now = now_ms();
        let listed = store::list_json::<VolumeRec>(&*self.store, Kind::Volume).await.map_err(store_status)?;
        for (rec, _) in &listed {
            if rec.phase == Phase::Creating && now - rec.updated_ms > grace && !self.inflight.busy(&rec.id) {
                let _guard = self.inflight.acquire(&rec.id).await;
                let Some((mut rec, version)) = self.volume(&rec.id).await? else { continue };
                if rec.phase != Phase::Creating {
                    continue;
                }
                if let Some(node) = rec.node.clone() {
                    if let Ok(mut agent) = self.agent_for(&node).await {
                        if agent.delete_volume(pb::DeleteVolumeRequest { volume_id: rec.id.clone() }).await.is_err() {
                            continue; // try again next pass
                        }
                    } else {
                        continue;
                    }
                }
                warn!(volume.id = %rec.id, volume.name = %rec.name, "volume stuck in Creating: reverted to Error");
                rec.phase = Phase::Error;
                rec.node = None;
                rec.error = Some("creation was interrupted (controller restart); a retry of CreateVolume starts it again".into());
                rec.updated_ms = now_ms();
                store::update_json(&*self.store, Kind::Volume, &rec.id, &rec, version).await.map_err(store_status)?;
                report.stuck_reverted.push(rec.id.clone());
            }
        }
        // A record left in Error with nothing on any node is only a note of a
        // failure; the CO retries CreateVolume while it still wants the
        // volume (which makes a new record), so it expires after the grace.
        for (rec, version) in listed {
            if rec.phase == Phase::Error && rec.node.is_none() && now - rec.updated_ms > grace && !self.inflight.busy(&rec.id) {
                let _guard = self.inflight.acquire(&rec.id).await;
                if self.store.delete(Kind::Volume, &rec.id, Some(version)).await.is_ok() {
                    warn!(volume.id = %rec.id, volume.name = %rec.name, error = ?rec.error, "failed volume record expired");
                    report.errors_expired.push(rec.id.clone());
                }
            }
        }
        let volumes: BTreeMap<String, VolumeRec> =
            self.volumes().await?.into_iter().map(|v| (v.id.clone(), v)).collect();
        let snapshots: BTreeMap<String, SnapshotRec> =
            self.snapshots().await?.into_iter().map(|s| (s.id.clone(), s)).collect();
        record_phase_metrics(&volumes, &snapshots);
        for node in self.nodes().await? {
            if !self.node_is_healthy(&node) {
                continue;
            }
            let Ok(mut agent) = self.agents.client(&node.agent_address) else { continue };
            let Ok(listed) = agent.list_volumes(pb::ListVolumesRequest {}).await else { continue };
            for v in listed.into_inner().volumes {
                let owned = volumes.get(&v.volume_id).is_some_and(|r| r.node.as_deref() == Some(node.id.as_str()));
                if owned || self.inflight.busy(&v.volume_id) || now - v.created_at_ms <= grace {
                    continue;
                }
                warn!(node = %node.id, volume.id = %v.volume_id, "image without a record on this node: deleting");
                if agent.delete_volume(pb::DeleteVolumeRequest { volume_id: v.volume_id.clone() }).await.is_ok() {
                    report.orphans_deleted.push(format!("{}/{}", node.id, v.volume_id));
                }
            }
            let Ok(listed) = agent.list_snapshots(pb::ListSnapshotsRequest::default()).await else { continue };
            for s in listed.into_inner().snapshots {
                let owned = snapshots.get(&s.snapshot_id).is_some_and(|r| r.node == node.id);
                if owned || self.inflight.busy(&s.snapshot_id) || now - s.created_at_ms <= grace {
                    continue;
                }
                warn!(node = %node.id, snapshot.id = %s.snapshot_id, "snapshot image without a record: deleting");
                if agent.delete_snapshot(pb::DeleteSnapshotRequest { snapshot_id: s.snapshot_id.clone() }).await.is_ok() {
                    report.orphans_deleted.push(format!("{}/{}", node.id, s.snapshot_id));
                }
            }
        }
        Ok(report)
    }

    /// Run `reconcile_once` every `every` until the process stops.
    pub async fn run_reconciler(self, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            match self.reconcile_once().await {
                Ok(r) if r != ReconcileReport::default() => info!(?r, "reconciler acted"),
                Ok(_) => {}
                Err(e) => warn!(error = %e.message(), "reconciler pass failed"),
            }
        }
    }
}

fn record_phase_metrics(volumes: &BTreeMap<String, VolumeRec>, snapshots: &BTreeMap<String, SnapshotRec>) {
    use crate::metrics::{RecordLabels, METRICS};
    for (kind, phases) in [
        ("volume", volumes.values().map(|v| v.phase).collect::<Vec<_>>()),
        ("snapshot", snapshots.values().map(|s| s.phase).collect::<Vec<_>>()),
    ] {
        for phase in [Phase::Creating, Phase::Available, Phase::Deleting, Phase::Error] {
            let n = phases.iter().filter(|p| **p == phase).count() as i64;
            METRICS.records.get_or_create(&RecordLabels { kind: kind.into(), phase: format!("{phase:?}") }).set(n);
        }
    }
}

#[derive(Debug, Default, Clone, PartialEq)]
pub struct ReconcileReport {
    pub stuck_reverted: Vec<String>,
    pub errors_expired: Vec<String>,
    pub orphans_deleted: Vec<String>,
}

fn flow_status(f: &FlowFailure) -> Status {
    Status::new(f.error.code, f.to_string())
}

// ---------------------------------------------------------------- the flow

struct CreateCtx {
    m: Manager,
    spec: CreateVolumeSpec,
    rec: VolumeRec,
    version: u64,
    pinned: Option<String>,
    source_metadata: BTreeMap<String, String>,
}

impl CreateCtx {
    async fn save(&mut self) -> Result<(), TaskError> {
        self.rec.updated_ms = now_ms();
        self.version = store::update_json(&*self.m.store, Kind::Volume, &self.rec.id, &self.rec, self.version)
            .await
            .map_err(task_err)?;
        Ok(())
    }
}

/// Write the record `Creating` (keyed by the name's ID); on failure of a
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
                let (snap, _) = ctx.m.snapshot(s).await.map_err(|e| TaskError::new(e.code(), e.message()))?.ok_or_else(|| {
                    TaskError::new(Code::NotFound, format!("source snapshot {s} does not exist"))
                })?;
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
                let (vol, _) = ctx.m.volume(v).await.map_err(|e| TaskError::new(e.code(), e.message()))?.ok_or_else(|| {
                    TaskError::new(Code::NotFound, format!("source volume {v} does not exist"))
                })?;
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
        if ctx.version == 0 {
            match store::create_json(&*ctx.m.store, Kind::Volume, &ctx.rec.id, &ctx.rec).await {
                Ok(v) => ctx.version = v,
                Err(StoreError::AlreadyExists { .. }) => {
                    return Err(TaskError::new(Code::Aborted, "another controller is creating this volume; retry"));
                }
                Err(e) => return Err(task_err(e)),
            }
        } else {
            ctx.rec.phase = Phase::Creating;
            ctx.rec.error = None;
            ctx.rec.attempts.clear();
            ctx.save().await?;
        }
        Ok(())
    }
    async fn revert(&self, ctx: &mut CreateCtx, cause: &TaskError) -> Result<(), TaskError> {
        ctx.rec.phase = Phase::Error;
        ctx.rec.node = None;
        ctx.rec.error = Some(cause.message.clone());
        ctx.save().await
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
        // A record resumed after a crash may already name its node: go there
        // first (the agent's create is idempotent), so nothing is duplicated.
        let mut resume = ctx.rec.node.clone();
        loop {
            let node = match resume.take() {
                Some(n) => n,
                None => {
                    let nodes = ctx.m.nodes().await.map_err(|e| TaskError::new(e.code(), e.message()))?;
                    let states: Vec<_> = nodes.iter().map(NodeRec::state).collect();
                    let req = ScheduleRequest {
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
                    match scheduler::schedule_best(&states, &req) {
                        Ok(best) => best.node_id,
                        Err(no) => {
                            let mut msg = no.to_string();
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
            match create_on(ctx, &node).await {
                Ok(v) => {
                    ctx.rec.size_bytes = v.size_bytes;
                    return Ok(());
                }
                Err(e) => {
                    warn!(volume.id = %ctx.rec.id, node = %node, error = %e.message, "create on node failed; cleaning up there");
                    if let Ok(mut agent) = ctx.m.agent_for(&node).await {
                        let _ = agent.delete_volume(pb::DeleteVolumeRequest { volume_id: ctx.rec.id.clone() }).await;
                    }
                    ctx.rec.attempts.push(Attempt { node: node.clone(), error: format!("{:?}: {}", e.code, e.message), at_ms: now_ms() });
                    ctx.rec.node = None;
                    ctx.save().await?;
                    let pinned = ctx.pinned.is_some();
                    if e.reschedulable && !pinned && ctx.rec.attempts.len() < max {
                        crate::metrics::METRICS.reschedules.inc();
                        let note = format!("node {node} failed ({}); rescheduling", e.message);
                        ctx.m.event(&ctx.rec, true, "Rescheduling", note).await;
                    }
                    if !e.reschedulable || pinned || ctx.rec.attempts.len() >= max {
                        let reasons: Vec<String> = ctx.rec.attempts.iter().map(|a| format!("{}: {}", a.node, a.error)).collect();
                        let code = if e.reschedulable && !pinned { Code::Internal } else { e.code };
                        return Err(TaskError::new(
                            code,
                            format!("volume could not be created after {} attempt(s): {}", ctx.rec.attempts.len(), reasons.join("; ")),
                        ));
                    }
                }
            }
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

async fn create_on(ctx: &CreateCtx, node: &str) -> Result<pb::Volume, TaskError> {
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
    };
    match agent.create_volume(req).await {
        Ok(r) => r.into_inner().volume.ok_or_else(|| TaskError::new(Code::Internal, "agent answered without a volume")),
        Err(s) => {
            let e = TaskError::new(s.code(), format!("node {node}: {}", s.message()));
            // The node's own trouble (down, full, broken pool): another node may do.
            Err(match s.code() {
                Code::Unavailable | Code::DeadlineExceeded | Code::Internal | Code::ResourceExhausted | Code::Unknown | Code::Cancelled => {
                    e.reschedulable()
                }
                _ => e,
            })
        }
    }
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
        let zone = store::get_json::<NodeRec>(&*ctx.m.store, Kind::Node, &node).await.map_err(task_err)?.map(|(n, _)| n.zone).unwrap_or_default();
        let mut segments = Segments::new();
        segments.insert(crate::TOPOLOGY_NODE_KEY.to_string(), node.clone());
        if !zone.is_empty() {
            segments.insert(crate::TOPOLOGY_ZONE_KEY.to_string(), zone);
        }
        ctx.rec.accessible_topology = vec![segments];
        ctx.rec.phase = Phase::Available;
        ctx.rec.error = None;
        ctx.save().await?;
        info!(volume.id = %ctx.rec.id, volume.name = %ctx.rec.name, node = %node, size = ctx.rec.size_bytes, "volume available");
        Ok(())
    }
}
