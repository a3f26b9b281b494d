//! The node agent: the volume manager served over gRPC (proto/agent.proto).
//! Each call runs on the agent's own worker threads (`volume::workers`);
//! heavy ones (copies, thick allocations) wait for a turn first; the pool
//! serializes calls per ID.

use std::collections::BTreeMap;
use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::warn;

use crate::agent_proto as pb;
use crate::agent_proto::volume_manager_server::VolumeManager;
use crate::volume::pool::CreateVolume;
use crate::volume::workers::{HeavyGate, WorkLimits, Workers};
use crate::volume::{Pool, Provisioning, SnapshotRecord, VolumeError, VolumeRecord, VolumeSource};

pub struct AgentService {
    pool: Arc<Pool>,
    node_id: String,
    workers: Arc<Workers>,
    heavy: Arc<HeavyGate>,
}

impl AgentService {
    pub fn new(pool: Arc<Pool>, node_id: String) -> Self {
        Self::with_limits(pool, node_id, WorkLimits::default())
    }

    pub fn with_limits(pool: Arc<Pool>, node_id: String, limits: WorkLimits) -> Self {
        let workers = Workers::new("agent-worker", limits.threads).expect("starting the agent's worker threads");
        let heavy = HeavyGate::new(limits.heavy, limits.heavy_wait);
        AgentService { pool, node_id, workers: Arc::new(workers), heavy: Arc::new(heavy) }
    }

    /// `run` for a call that may copy or allocate a whole volume: it waits
    /// for its turn first (RESOURCE_EXHAUSTED when that takes too long), and
    /// holds the turn until the work ends, even if the caller goes away.
    async fn run_heavy<T, F>(&self, method: &'static str, heavy: bool, f: F) -> Result<Response<T>, Status>
    where
        T: Send + 'static,
        F: FnOnce(&Pool) -> Result<T, VolumeError> + Send + 'static,
    {
        if !heavy {
            return self.run(method, f).await;
        }
        let turn = self.heavy.enter().await.map_err(|busy| {
            warn!(method, %busy, "agent call refused");
            Status::resource_exhausted(busy.to_string())
        })?;
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
        let out = self
            .workers
            .run(move || f(&pool))
            .await
            .map_err(|e| Status::internal(format!("{method} failed inside the agent: {e}")))?;
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

fn volume_to_pb(pool: &Pool, v: VolumeRecord) -> pb::Volume {
    let image = pool.volume_image(&v.id);
    pb::Volume {
        allocated_bytes: pool.allocated_bytes(&image),
        image_path: image.display().to_string(),
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

fn snapshot_to_pb(pool: &Pool, s: SnapshotRecord) -> pb::Snapshot {
    pb::Snapshot {
        allocated_bytes: pool.allocated_bytes(&pool.snapshot_image(&s.id)),
        snapshot_id: s.id,
        source_volume_id: s.source_volume_id,
        size_bytes: s.size_bytes,
        metadata: s.metadata.into_iter().collect(),
        created_at_ms: s.created_at_ms,
    }
}

pub fn status_to_pb(node_id: &str, pool: &Pool) -> Result<pb::PoolStatus, VolumeError> {
    let st = pool.status()?;
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
    })
}

#[tonic::async_trait]
impl VolumeManager for AgentService {
    async fn create_volume(
        &self,
        request: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::CreateVolumeResponse>, Status> {
        let r = request.into_inner();
        let heavy = r.provisioning == pb::Provisioning::Thick as i32 || (r.source.is_some() && !self.pool.reflink());
        self.run_heavy("CreateVolume", heavy, move |pool| {
            let req = CreateVolume {
                id: r.volume_id,
                size_bytes: r.size_bytes,
                provisioning: provisioning_from_pb(r.provisioning)?,
                source: r.source.map(|s| match s {
                    pb::create_volume_request::Source::SnapshotId(id) => VolumeSource::Snapshot(id),
                    pb::create_volume_request::Source::SourceVolumeId(id) => VolumeSource::Volume(id),
                }),
                metadata: r.metadata.into_iter().collect::<BTreeMap<_, _>>(),
            };
            let v = pool.create_volume(req)?;
            Ok(pb::CreateVolumeResponse { volume: Some(volume_to_pb(pool, v)) })
        })
        .await
    }

    async fn delete_volume(
        &self,
        request: Request<pb::DeleteVolumeRequest>,
    ) -> Result<Response<pb::DeleteVolumeResponse>, Status> {
        let id = request.into_inner().volume_id;
        self.run("DeleteVolume", move |pool| pool.delete_volume(&id).map(|_| pb::DeleteVolumeResponse {}))
            .await
    }

    async fn create_snapshot(
        &self,
        request: Request<pb::CreateSnapshotRequest>,
    ) -> Result<Response<pb::CreateSnapshotResponse>, Status> {
        let r = request.into_inner();
        self.run_heavy("CreateSnapshot", !self.pool.reflink(), move |pool| {
            let s = pool.create_snapshot(&r.snapshot_id, &r.source_volume_id, r.metadata.into_iter().collect())?;
            Ok(pb::CreateSnapshotResponse { snapshot: Some(snapshot_to_pb(pool, s)) })
        })
        .await
    }

    async fn delete_snapshot(
        &self,
        request: Request<pb::DeleteSnapshotRequest>,
    ) -> Result<Response<pb::DeleteSnapshotResponse>, Status> {
        let id = request.into_inner().snapshot_id;
        self.run("DeleteSnapshot", move |pool| pool.delete_snapshot(&id).map(|_| pb::DeleteSnapshotResponse {}))
            .await
    }

    async fn expand_volume(
        &self,
        request: Request<pb::ExpandVolumeRequest>,
    ) -> Result<Response<pb::ExpandVolumeResponse>, Status> {
        let r = request.into_inner();
        let heavy = self.pool.get_volume(&r.volume_id).is_ok_and(|v| v.provisioning == Provisioning::Thick);
        self.run_heavy("ExpandVolume", heavy, move |pool| {
            let v = pool.expand_volume(&r.volume_id, r.size_bytes)?;
            Ok(pb::ExpandVolumeResponse { volume: Some(volume_to_pb(pool, v)) })
        })
        .await
    }

    async fn get_volume(&self, request: Request<pb::GetVolumeRequest>) -> Result<Response<pb::GetVolumeResponse>, Status> {
        let id = request.into_inner().volume_id;
        self.run("GetVolume", move |pool| {
            let v = pool.get_volume(&id)?;
            Ok(pb::GetVolumeResponse { volume: Some(volume_to_pb(pool, v)) })
        })
        .await
    }

    async fn get_snapshot(
        &self,
        request: Request<pb::GetSnapshotRequest>,
    ) -> Result<Response<pb::GetSnapshotResponse>, Status> {
        let id = request.into_inner().snapshot_id;
        self.run("GetSnapshot", move |pool| {
            let s = pool.get_snapshot(&id)?;
            Ok(pb::GetSnapshotResponse { snapshot: Some(snapshot_to_pb(pool, s)) })
        })
        .await
    }

    async fn list_volumes(
        &self,
        _request: Request<pb::ListVolumesRequest>,
    ) -> Result<Response<pb::ListVolumesResponse>, Status> {
        self.run("ListVolumes", move |pool| {
            let volumes = pool.list_volumes().into_iter().map(|v| volume_to_pb(pool, v)).collect();
            Ok(pb::ListVolumesResponse { volumes })
        })
        .await
    }

    async fn list_snapshots(
        &self,
        request: Request<pb::ListSnapshotsRequest>,
    ) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let source = request.into_inner().source_volume_id;
        self.run("ListSnapshots", move |pool| {
            let filter = (!source.is_empty()).then_some(source.as_str());
            let snapshots = pool.list_snapshots(filter).into_iter().map(|s| snapshot_to_pb(pool, s)).collect();
            Ok(pb::ListSnapshotsResponse { snapshots })
        })
        .await
    }

    async fn get_pool_status(
        &self,
        _request: Request<pb::GetPoolStatusRequest>,
    ) -> Result<Response<pb::GetPoolStatusResponse>, Status> {
        let node_id = self.node_id.clone();
        self.run("GetPoolStatus", move |pool| Ok(pb::GetPoolStatusResponse { status: Some(status_to_pb(&node_id, pool)?) }))
            .await
    }
}
