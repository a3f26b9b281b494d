//! The node agent: the volume manager served over gRPC (proto/agent.proto).
//! Each call runs on the agent's own worker threads (`volume::workers`);
//! heavy ones (copies, thick allocations) wait for a turn first; the pool
//! serializes calls per ID.
//! Served only over mutual TLS to the controller (`crate::tls`); every call
//! checks that the connection's certificate named the controller, and every
//! call that changes data passes the fence (`fence.rs`).

pub mod copier;
pub mod exports;
pub mod fence;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::warn;

use crate::agent_proto as pb;
use crate::agent_proto::volume_manager_server::VolumeManager;
use crate::tls::{Peer, PeerInfo};
use crate::volume::health::ImageLooker;
use crate::volume::pool::CreateVolume;
use crate::volume::workers::{HeavyGate, WorkLimits, Workers};
use crate::volume::{ImageKind, Orphan, Pool, Provisioning, SnapshotRecord, State, VolumeError, VolumeRecord, VolumeSource};

use fence::Fence;

pub struct AgentService {
    pool: Arc<Pool>,
    node_id: String,
    fence: Arc<Fence>,
    workers: Arc<Workers>,
    heavy: Arc<HeavyGate>,
    /// The node's NBD exports; None when this node serves none.
    exports: Option<Arc<exports::Exports>>,
    /// Copies from other nodes' exports; None when this node makes none.
    copier: Option<Arc<copier::Copier>>,
    /// This node's remote attach engine and its TLS mode, for the pool status.
    attach: Option<(&'static str, &'static str)>,
}

impl AgentService {
    /// Report how this node attaches other nodes' volumes (engine, TLS mode)
    /// in its pool status, so the controller can publish to it accordingly.
    pub fn with_attach(mut self, engine: &'static str, tls: &'static str) -> Self {
        self.attach = Some((engine, tls));
        self
    }

    /// Serve NBD exports of this pool through `exports`.
    pub fn with_exports(mut self, exports: Arc<exports::Exports>) -> Self {
        self.exports = Some(exports);
        self
    }

    /// Make cross-node copies with `copier`, and go on with those under way.
    pub fn with_copier(mut self, copier: Arc<copier::Copier>) -> Self {
        copier.resume_all();
        self.copier = Some(copier);
        self
    }

    /// A volume as the pool has it, with the live progress of its copy.
    fn with_progress(&self, mut v: pb::Volume) -> pb::Volume {
        if let Some((copied, total, problem)) = self.copier.as_ref().and_then(|c| c.progress(&v.volume_id)) {
            if v.state == pb::ImageState::Creating as i32 {
                (v.copied_bytes, v.copy_total_bytes, v.problem) = (copied.max(v.copied_bytes), total.max(v.copy_total_bytes), problem);
            }
        }
        v
    }

    fn exports(&self) -> Result<Arc<exports::Exports>, Status> {
        self.exports.clone().ok_or_else(|| {
            Status::failed_precondition(format!("node {} serves no NBD exports (started without --nbd-listen)", self.node_id))
        })
    }

    pub fn new(pool: Arc<Pool>, node_id: String, fence: Arc<Fence>) -> Self {
        Self::with_limits(pool, node_id, fence, WorkLimits::default())
    }

    pub fn with_limits(pool: Arc<Pool>, node_id: String, fence: Arc<Fence>, limits: WorkLimits) -> Self {
        let workers = Workers::new("agent-worker", limits.threads).expect("starting the agent's worker threads");
        let heavy = HeavyGate::new(limits.heavy, limits.heavy_wait);
        AgentService { pool, node_id, fence, workers: Arc::new(workers), heavy: Arc::new(heavy), exports: None, copier: None, attach: None }
    }

    fn identity(&self) -> Option<pb::AgentIdentity> {
        Some(pb::AgentIdentity {
            node_id: self.node_id.clone(),
            pool_uuid: self.pool.uuid().to_string(),
            fencing_token: self.fence.highest(),
        })
    }

    /// Only the controller may call, and only over a verified connection.
    fn authorize<T>(request: &Request<T>) -> Result<(), Status> {
        match request.extensions().get::<PeerInfo>() {
            Some(p) if p.peers.contains(&Peer::Controller) => Ok(()),
            Some(p) => {
                Err(Status::permission_denied(format!("the agent API answers the controller only; this certificate names {:?}", p.peers)))
            }
            None => Err(Status::permission_denied("the agent API answers only over mutual TLS with the controller's certificate")),
        }
    }

    /// A call that changes data: authorize; a call that may copy or
    /// allocate a whole volume (`heavy`) waits for its turn first
    /// (RESOURCE_EXHAUSTED when that takes too long) and holds it until the
    /// work ends, even if the caller goes away; then the fence, whose guard
    /// is held while `f` runs.
    async fn run_fenced<R, T, F>(&self, request: &Request<R>, method: &'static str, heavy: bool, f: F) -> Result<Response<T>, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Pool) -> Result<T, VolumeError> + Send + 'static,
    {
        Self::authorize(request)?;
        let token = fence::token_of(request)?;
        let turn = if heavy {
            Some(self.heavy.enter().await.map_err(|busy| {
                warn!(method, %busy, "agent call refused");
                Status::resource_exhausted(busy.to_string())
            })?)
        } else {
            None
        };
        let _admitted = self.fence.admit(token).await?;
        self.run(method, move |pool| {
            let _turn = turn;
            f(pool)
        })
        .await
    }

    async fn run<T, F>(&self, method: &'static str, f: F) -> Result<Response<T>, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Pool) -> Result<T, VolumeError> + Send + 'static,
    {
        let pool = self.pool.clone();
        let out =
            self.workers.run(move || f(&pool)).await.map_err(|e| Status::internal(format!("{method} failed inside the agent: {e}")))?;
        match out {
            Ok(v) => Ok(Response::new(v)),
            Err(e) => {
                let status = Status::from(e);
                warn!(method, code = ?status.code(), message = status.message(), "agent call failed");
                Err(status)
            }
        }
    }
}

pub fn provisioning_from_pb(p: i32) -> Result<Provisioning, VolumeError> {
    match pb::Provisioning::try_from(p) {
        Ok(pb::Provisioning::Unspecified) | Ok(pb::Provisioning::Thin) => Ok(Provisioning::Thin),
        Ok(pb::Provisioning::Thick) => Ok(Provisioning::Thick),
        Err(_) => Err(VolumeError::Invalid { what: "provisioning", reason: format!("unknown value {p}") }),
    }
}

pub fn provisioning_to_pb(p: Provisioning) -> pb::Provisioning {
    match p {
        Provisioning::Thin => pb::Provisioning::Thin,
        Provisioning::Thick => pb::Provisioning::Thick,
    }
}

fn state_to_pb(s: State) -> pb::ImageState {
    match s {
        State::Creating => pb::ImageState::Creating,
        State::Available => pb::ImageState::Available,
        State::Deleting => pb::ImageState::Deleting,
    }
}

fn age_ms(created_at_ms: i64) -> u64 {
    (crate::volume::records::now_ms() - created_at_ms).max(0) as u64
}

fn volume_to_pb(pool: &Pool, v: VolumeRecord) -> pb::Volume {
    volume_seen_by(&pool.image_looker(), v)
}

/// A volume as the agent tells it, its image looked at by `looker` (one per
/// answer, however many volumes it holds).
fn volume_seen_by(looker: &ImageLooker<'_>, v: VolumeRecord) -> pb::Volume {
    let look = looker.look(&v.id);
    let problem = look.problem;
    let (copied_bytes, copy_total_bytes) = v.copy.as_ref().map(|c| (c.copied_bytes, c.total_bytes)).unwrap_or((0, 0));
    pb::Volume {
        copy_pass: v.copy.as_ref().map(|c| c.pass).unwrap_or(0),
        copy_pass_done: v.copy.as_ref().is_some_and(|c| c.pass_done),
        abnormal: problem.is_some(),
        condition: problem.unwrap_or_default(),
        copied_bytes,
        copy_total_bytes,
        allocated_bytes: look.allocated_bytes,
        image_path: look.image.display().to_string(),
        state: state_to_pb(v.state) as i32,
        age_ms: age_ms(v.created_at_ms),
        problem: String::new(),
        volume_id: v.id,
        size_bytes: v.size_bytes,
        provisioning: provisioning_to_pb(v.provisioning) as i32,
        source: v.source.map(|s| match s {
            VolumeSource::Snapshot(id) => pb::volume::Source::SnapshotId(id),
            VolumeSource::Volume(id) => pb::volume::Source::SourceVolumeId(id),
        }),
        metadata: v.metadata.into_iter().collect(),
        created_at_ms: v.created_at_ms,
    }
}

/// A listing's page size: `max_entries`, or no limit when 0.
fn page_limit(max_entries: u32) -> usize {
    if max_entries == 0 {
        usize::MAX
    } else {
        max_entries as usize
    }
}

/// I/O errors its NBD exports answered make an exported volume abnormal.
fn export_health(exports: Option<&exports::Exports>, v: &mut pb::Volume) {
    if v.abnormal || exports.is_none_or(|e| e.consumers_of(false, &v.volume_id).is_empty()) {
        return;
    }
    let errors = crate::export::METRICS.for_volume(&v.volume_id).errors();
    if errors > 0 {
        v.abnormal = true;
        v.condition = format!("its NBD export answered {errors} request(s) with an error; see the owner node's log and its pool's disk");
    }
}

fn snapshot_to_pb(pool: &Pool, s: SnapshotRecord) -> pb::Snapshot {
    pb::Snapshot {
        allocated_bytes: pool.allocated_bytes(&pool.snapshot_image(&s.id)),
        state: state_to_pb(s.state) as i32,
        age_ms: age_ms(s.created_at_ms),
        snapshot_id: s.id,
        source_volume_id: s.source_volume_id,
        size_bytes: s.size_bytes,
        metadata: s.metadata.into_iter().collect(),
        created_at_ms: s.created_at_ms,
    }
}

fn orphan_to_pb(o: Orphan) -> pb::Orphan {
    pb::Orphan {
        name: o.name,
        kind: o.kind,
        id: o.id,
        reason: o.reason,
        age_ms: o.age_ms,
        size_bytes: o.size_bytes,
        allocated_bytes: o.allocated_bytes,
    }
}

pub fn status_to_pb(node_id: &str, pool: &Pool) -> Result<pb::PoolStatus, VolumeError> {
    let st = pool.status()?;
    let orphans = pool.list_orphans().unwrap_or_default();
    Ok(pb::PoolStatus {
        node_id: node_id.to_string(),
        total_bytes: st.capacity.total,
        free_bytes: st.capacity.free,
        provisioned_bytes: st.capacity.provisioned,
        volume_count: st.volume_count,
        snapshot_count: st.snapshot_count,
        reflink: st.reflink,
        max_over_subscription_ratio: st.capacity.max_over_subscription_ratio,
        reserved_percentage: st.capacity.reserved_percentage,
        max_thin_volume_bytes: st.capacity.max_volume(Provisioning::Thin),
        max_thick_volume_bytes: st.capacity.max_volume(Provisioning::Thick),
        filesystem: st.filesystem,
        pool_uuid: pool.uuid().to_string(),
        broken_count: pool.broken().len() as u32,
        orphan_count: orphans.len() as u32,
        orphan_bytes: orphans.iter().map(|o| o.allocated_bytes).sum(),
        // The node's process fills these in (`with_attach`).
        attach_engine: String::new(),
        attach_tls: String::new(),
    })
}

#[tonic::async_trait]
impl VolumeManager for AgentService {
    async fn create_volume(&self, request: Request<pb::CreateVolumeRequest>) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        let identity = self.identity();
        let r = request.get_ref().clone();
        if let Some(remote) = r.remote.clone() {
            return self.create_by_copy(&request, r, remote).await;
        }
        let heavy = r.provisioning == pb::Provisioning::Thick as i32 || (r.source.is_some() && !self.pool.reflink());
        self.run_fenced(&request, "CreateVolume", heavy, move |pool| {
            let v = pool.create_volume(create_of(r)?)?;
            Ok(pb::CreateVolumeResponse { volume: Some(volume_to_pb(pool, v)), identity })
        })
        .await
    }

    async fn delete_volume(&self, request: Request<pb::DeleteVolumeRequest>) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let identity = self.identity();
        let id = request.get_ref().volume_id.clone();
        if let Some(ex) = &self.exports {
            let consumers = ex.consumers_of(false, &id);
            if !consumers.is_empty() {
                return Err(Status::failed_precondition(format!(
                    "volume {id} is exported to node(s) {}; unpublish it first",
                    consumers.join(", ")
                )));
            }
        }
        if let Some(c) = &self.copier {
            Self::authorize(&request)?;
            let _admitted = self.fence.admit(fence::token_of(&request)?).await?;
            c.cancel(&id).await;
        }
        self.run_fenced(&request, "DeleteVolume", false, move |pool| pool.delete_volume(&id).map(|_| pb::DeleteVolumeResponse { identity }))
            .await
    }

    async fn create_snapshot(&self, request: Request<pb::CreateSnapshotRequest>) -> Result<Response<pb::CreateSnapshotResponse>, Status> {
        let identity = self.identity();
        let r = request.get_ref().clone();
        let thick = self.pool.get_volume(&r.source_volume_id).is_ok_and(|v| v.provisioning == Provisioning::Thick);
        let heavy = !r.migration_pass && (thick || !self.pool.reflink());
        self.run_fenced(&request, "CreateSnapshot", heavy, move |pool| {
            let group = Some(r.group_id.as_str()).filter(|g| !g.is_empty());
            let s = if r.migration_pass {
                pool.create_pass_snapshot(&r.snapshot_id, &r.source_volume_id)?
            } else {
                pool.create_snapshot_in_group(&r.snapshot_id, &r.source_volume_id, r.metadata.into_iter().collect(), group)?
            };
            Ok(pb::CreateSnapshotResponse { snapshot: Some(snapshot_to_pb(pool, s)), identity })
        })
        .await
    }

    async fn delete_snapshot(&self, request: Request<pb::DeleteSnapshotRequest>) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        let identity = self.identity();
        let id = request.get_ref().snapshot_id.clone();
        if let Some(ex) = &self.exports {
            let consumers = ex.consumers_of(true, &id);
            if !consumers.is_empty() {
                return Err(Status::failed_precondition(format!(
                    "snapshot {id} is being copied to node(s) {}; delete the volumes restored from it first, or wait",
                    consumers.join(", ")
                )));
            }
        }
        self.run_fenced(&request, "DeleteSnapshot", false, move |pool| {
            pool.delete_snapshot(&id).map(|_| pb::DeleteSnapshotResponse { identity })
        })
        .await
    }

    async fn expand_volume(&self, request: Request<pb::ExpandVolumeRequest>) -> Result<Response<pb::ExpandVolumeResponse>, Status> {
        let identity = self.identity();
        let r = request.get_ref().clone();
        let heavy = self.pool.get_volume(&r.volume_id).is_ok_and(|v| v.provisioning == Provisioning::Thick);
        let grown = self
            .run_fenced(&request, "ExpandVolume", heavy, move |pool| {
                let v = pool.expand_volume(&r.volume_id, r.size_bytes)?;
                Ok(pb::ExpandVolumeResponse { volume: Some(volume_to_pb(pool, v)), identity })
            })
            .await?;
        if let Some(ex) = &self.exports {
            ex.refresh(&request.get_ref().volume_id);
        }
        Ok(grown)
    }

    async fn get_volume(&self, request: Request<pb::GetVolumeRequest>) -> Result<Response<pb::GetVolumeResponse>, Status> {
        Self::authorize(&request)?;
        let identity = self.identity();
        let id = request.into_inner().volume_id;
        let exports = self.exports.clone();
        let mut answer = self
            .run("GetVolume", move |pool| {
                let v = pool.get_volume(&id)?;
                let mut v = volume_to_pb(pool, v);
                export_health(exports.as_deref(), &mut v);
                Ok(pb::GetVolumeResponse { volume: Some(v), identity })
            })
            .await?;
        answer.get_mut().volume = answer.get_mut().volume.take().map(|v| self.with_progress(v));
        Ok(answer)
    }

    async fn get_snapshot(&self, request: Request<pb::GetSnapshotRequest>) -> Result<Response<pb::GetSnapshotResponse>, Status> {
        Self::authorize(&request)?;
        let identity = self.identity();
        let id = request.into_inner().snapshot_id;
        self.run("GetSnapshot", move |pool| {
            let s = pool.get_snapshot(&id)?;
            Ok(pb::GetSnapshotResponse { snapshot: Some(snapshot_to_pb(pool, s)), identity })
        })
        .await
    }

    async fn list_volumes(&self, request: Request<pb::ListVolumesRequest>) -> Result<Response<pb::ListVolumesResponse>, Status> {
        Self::authorize(&request)?;
        let identity = self.identity();
        let exports = self.exports.clone();
        let r = request.into_inner();
        self.run("ListVolumes", move |pool| {
            let limit = page_limit(r.max_entries);
            let after = (!r.after.is_empty()).then_some(r.after.as_str());
            // Broken volumes are listed too, so nothing on the node is
            // invisible; in a page, those whose IDs fall within it.
            let (records, broken) = if r.volume_ids.is_empty() {
                let page = pool.volumes_after(after, limit);
                let through = if page.len() == limit { page.last().map(|v| v.id.clone()) } else { None };
                let broken = pool.broken_between("volume", after, through.as_deref());
                (page, broken)
            } else {
                let named: HashSet<&str> = r.volume_ids.iter().map(String::as_str).collect();
                let broken = pool.broken_between("volume", None, None).into_iter().filter(|b| named.contains(b.id.as_str())).collect();
                (pool.volumes_named(&r.volume_ids), broken)
            };
            let looker = pool.image_looker();
            let mut volumes: Vec<pb::Volume> = records.into_iter().map(|v| volume_seen_by(&looker, v)).collect();
            volumes.iter_mut().for_each(|v| export_health(exports.as_deref(), v));
            volumes.extend(broken.into_iter().map(|b| pb::Volume {
                volume_id: b.id,
                state: pb::ImageState::Broken as i32,
                abnormal: true,
                condition: format!("its image is broken on this node: {}", b.reason),
                problem: b.reason,
                ..Default::default()
            }));
            if r.volume_ids.is_empty() {
                // What a full page leaves out comes in the next one.
                volumes.sort_by(|a, b| a.volume_id.cmp(&b.volume_id));
                volumes.truncate(limit);
            }
            Ok(pb::ListVolumesResponse { volumes, identity })
        })
        .await
    }

    async fn list_snapshots(&self, request: Request<pb::ListSnapshotsRequest>) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        Self::authorize(&request)?;
        let identity = self.identity();
        let r = request.into_inner();
        self.run("ListSnapshots", move |pool| {
            let source = (!r.source_volume_id.is_empty()).then_some(r.source_volume_id.as_str());
            let after = (!r.after.is_empty()).then_some(r.after.as_str());
            let page = pool.snapshots_after(source, after, page_limit(r.max_entries));
            let snapshots = page.into_iter().map(|s| snapshot_to_pb(pool, s)).collect();
            Ok(pb::ListSnapshotsResponse { snapshots, identity })
        })
        .await
    }

    async fn get_pool_status(&self, request: Request<pb::GetPoolStatusRequest>) -> Result<Response<pb::GetPoolStatusResponse>, Status> {
        Self::authorize(&request)?;
        let identity = self.identity();
        let node_id = self.node_id.clone();
        let attach = self.attach;
        self.run("GetPoolStatus", move |pool| {
            let mut status = status_to_pb(&node_id, pool)?;
            if let Some((engine, tls)) = attach {
                (status.attach_engine, status.attach_tls) = (engine.to_string(), tls.to_string());
            }
            Ok(pb::GetPoolStatusResponse { status: Some(status), identity })
        })
        .await
    }

    async fn fence(&self, request: Request<pb::FenceRequest>) -> Result<Response<pb::FenceResponse>, Status> {
        Self::authorize(&request)?;
        let token = fence::token_of(&request)?;
        drop(self.fence.admit(token).await?);
        Ok(Response::new(pb::FenceResponse { identity: self.identity() }))
    }

    async fn quarantine_volume(&self, request: Request<pb::QuarantineRequest>) -> Result<Response<pb::QuarantineResponse>, Status> {
        self.quarantine(request, ImageKind::Volume).await
    }

    async fn quarantine_snapshot(&self, request: Request<pb::QuarantineRequest>) -> Result<Response<pb::QuarantineResponse>, Status> {
        self.quarantine(request, ImageKind::Snapshot).await
    }

    async fn list_orphans(&self, request: Request<pb::ListOrphansRequest>) -> Result<Response<pb::ListOrphansResponse>, Status> {
        Self::authorize(&request)?;
        let identity = self.identity();
        self.run("ListOrphans", move |pool| {
            Ok(pb::ListOrphansResponse { orphans: pool.list_orphans()?.into_iter().map(orphan_to_pb).collect(), identity })
        })
        .await
    }

    async fn create_export(&self, request: Request<pb::CreateExportRequest>) -> Result<Response<pb::CreateExportResponse>, Status> {
        let identity = self.identity();
        let r = request.get_ref().clone();
        let mut of = exports::ExportOf::from_request(&r.volume_id, &r.snapshot_id, &r.consumer_node, &r.copy_for);
        of.base = r.base_snapshot_id.clone();
        self.export_call(&request, move |ex| {
            Ok(pb::CreateExportResponse { export: Some(ex.create(&of, r.read_only, &r.plain_from)?), identity })
        })
        .await
    }

    async fn delete_export(&self, request: Request<pb::DeleteExportRequest>) -> Result<Response<pb::DeleteExportResponse>, Status> {
        let identity = self.identity();
        let r = request.get_ref().clone();
        let of = exports::ExportOf::from_request(&r.volume_id, &r.snapshot_id, &r.consumer_node, &r.copy_for);
        self.export_call(&request, move |ex| {
            ex.delete(&of, r.force)?;
            Ok(pb::DeleteExportResponse { identity })
        })
        .await
    }

    async fn freeze_volumes(&self, request: Request<pb::FreezeVolumesRequest>) -> Result<Response<pb::FreezeVolumesResponse>, Status> {
        let identity = self.identity();
        let r = request.get_ref().clone();
        self.run_fenced(&request, "FreezeVolumes", false, move |pool| {
            let max = std::time::Duration::from_millis(r.max_ms.max(1000));
            let volume_ids = pool.freeze_group(&r.group_id, &r.volume_ids, &r.consumed_volume_ids, max)?;
            Ok(pb::FreezeVolumesResponse { volume_ids, identity })
        })
        .await
    }

    /// Not fenced: thawing is always safe, whoever asks.
    async fn thaw_volumes(&self, request: Request<pb::ThawVolumesRequest>) -> Result<Response<pb::ThawVolumesResponse>, Status> {
        Self::authorize(&request)?;
        let identity = self.identity();
        let group = request.into_inner().group_id;
        self.run("ThawVolumes", move |pool| {
            let early = pool.thaw_group(&group)?;
            let thawed_early = early.into_iter().map(|(v, why)| format!("{v}: {why}")).collect();
            Ok(pb::ThawVolumesResponse { thawed_early, identity })
        })
        .await
    }

    async fn list_exports(&self, request: Request<pb::ListExportsRequest>) -> Result<Response<pb::ListExportsResponse>, Status> {
        Self::authorize(&request)?;
        let exports = self.exports.as_ref().map(|e| e.list()).unwrap_or_default();
        Ok(Response::new(pb::ListExportsResponse { exports, identity: self.identity() }))
    }

    async fn purge_orphans(&self, request: Request<pb::PurgeOrphansRequest>) -> Result<Response<pb::PurgeOrphansResponse>, Status> {
        let identity = self.identity();
        let r = *request.get_ref();
        self.run_fenced(&request, "PurgeOrphans", false, move |pool| {
            let purged = pool.purge_orphans(r.older_than_ms, r.dry_run)?;
            Ok(pb::PurgeOrphansResponse { purged: purged.into_iter().map(orphan_to_pb).collect(), identity })
        })
        .await
    }
}

fn create_of(r: pb::CreateVolumeRequest) -> Result<CreateVolume, VolumeError> {
    Ok(CreateVolume {
        id: r.volume_id,
        size_bytes: r.size_bytes,
        provisioning: provisioning_from_pb(r.provisioning)?,
        source: r.source.map(|s| match s {
            pb::create_volume_request::Source::SnapshotId(id) => VolumeSource::Snapshot(id),
            pb::create_volume_request::Source::SourceVolumeId(id) => VolumeSource::Volume(id),
        }),
        metadata: r.metadata.into_iter().collect::<BTreeMap<_, _>>(),
    })
}

impl AgentService {
    /// A volume copied from another node's export: recorded and started at
    /// once; the answer says CREATING with the progress until it is done.
    async fn create_by_copy(
        &self,
        request: &Request<pb::CreateVolumeRequest>,
        r: pb::CreateVolumeRequest,
        remote: pb::RemoteSource,
    ) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        let copier = self.copier.clone().ok_or_else(|| {
            Status::failed_precondition(format!("node {} makes no copies from other nodes (no TLS for NBD)", self.node_id))
        })?;
        if r.source.is_none() && remote.pass == 0 {
            return Err(Status::invalid_argument("a copy from another node needs its source snapshot or volume"));
        }
        crate::tls::node_dns_name(&remote.server_node).map_err(|e| Status::invalid_argument(format!("remote.server_node: {e}")))?;
        let identity = self.identity();
        let from = crate::volume::records::CopyState {
            address: remote.address,
            export_name: remote.export_name,
            server_node: remote.server_node,
            resume_at: 0,
            copied_bytes: 0,
            total_bytes: 0,
            pass: remote.pass,
            more_passes: remote.more_passes,
            pass_done: false,
        };
        let mut answer = self
            .run_fenced(request, "CreateVolume", false, move |pool| {
                let v = pool.begin_copy(create_of(r)?, from)?;
                Ok(pb::CreateVolumeResponse { volume: Some(volume_to_pb(pool, v)), identity })
            })
            .await?;
        let v = answer.get_mut().volume.take().unwrap_or_default();
        copier.ensure(&v.volume_id);
        answer.get_mut().volume = Some(self.with_progress(v));
        Ok(answer)
    }

    /// An export call, on the blocking pool: it writes and syncs records,
    /// and a migration pass's export maps two snapshots' extents first.
    async fn export_call<R, T, F>(&self, request: &Request<R>, f: F) -> Result<Response<T>, Status>
    where
        T: Send + 'static,
        F: FnOnce(&exports::Exports) -> Result<T, Status> + Send + 'static,
    {
        Self::authorize(request)?;
        let token = fence::token_of(request)?;
        let _admitted = self.fence.admit(token).await?;
        let ex = self.exports()?;
        tokio::task::spawn_blocking(move || f(&ex))
            .await
            .map_err(|e| Status::internal(format!("export call failed inside the agent: {e}")))?
            .map(Response::new)
            .inspect_err(|s| warn!(code = ?s.code(), message = s.message(), "export call failed"))
    }

    async fn quarantine(
        &self,
        request: Request<pb::QuarantineRequest>,
        kind: ImageKind,
    ) -> Result<Response<pb::QuarantineResponse>, Status> {
        let identity = self.identity();
        let r = request.get_ref().clone();
        self.run_fenced(&request, "Quarantine", false, move |pool| {
            let orphan = pool.quarantine(kind, &r.id, &r.reason, r.min_age_ms)?;
            Ok(pb::QuarantineResponse { moved: orphan.is_some(), orphan: orphan.unwrap_or_default(), identity })
        })
        .await
    }
}
