//! The admin API (`proto/admin.proto`): what `cinderblock ctl` shows people
//! beyond CSI: nodes and pools, records in every phase with names and
//! errors, lookups by name, and the nodes' quarantined images (listed, and
//! purged only on an operator's request). Over the controller's `Manager`;
//! a new operator action is a new method here and in the proto.

use tonic::{Request, Response, Status};

use std::sync::Arc;

use crate::admin_proto as pb;
use crate::admin_proto::admin_client::AdminClient;
use crate::controller::forward::LeaderRoute;
use crate::controller::migrate::MigrateRequest;
use crate::controller::records::{snapshot_id_for, volume_id_for, NodeRec, Phase, SnapshotRec, SourceRef, VolumeRec};
use crate::controller::Manager;
use crate::volume::Provisioning;

pub use pb::admin_server::AdminServer;

pub struct AdminService {
    manager: Manager,
    /// Where a standby hands the calls that change something (migrations,
    /// evacuations) to the leader; None: they run here.
    route: Option<Arc<LeaderRoute>>,
}

impl AdminService {
    pub fn new(manager: Manager) -> Self {
        AdminService { manager, route: None }
    }

    pub fn server(manager: Manager) -> AdminServer<AdminService> {
        AdminServer::new(AdminService::new(manager))
    }

    /// The admin API of a replica that hands changes to the leader.
    pub fn server_with_route(manager: Manager, route: Option<Arc<LeaderRoute>>) -> AdminServer<AdminService> {
        AdminServer::new(AdminService { manager, route })
    }

    /// A client of the leader's admin API when another replica leads.
    fn leader(&self) -> Result<Option<AdminClient<tonic::transport::Channel>>, Status> {
        Ok(self.route.as_ref().map(|r| r.leader_channel()).transpose()?.flatten().map(|(_, c)| AdminClient::new(c)))
    }

    /// By ID when `r` is one of ours, else by name (the ID derives from it).
    async fn find_volume(&self, r: &str) -> Result<Option<VolumeRec>, Status> {
        if r.is_empty() {
            return Err(Status::invalid_argument("name a volume by its ID or its name"));
        }
        if is_id("vol-", r) {
            if let Some((v, _)) = self.manager.volume(r).await? {
                return Ok(Some(v));
            }
        }
        Ok(self.manager.volume(&volume_id_for(r)).await?.map(|(v, _)| v))
    }

    async fn find_snapshot(&self, r: &str) -> Result<Option<SnapshotRec>, Status> {
        if r.is_empty() {
            return Err(Status::invalid_argument("name a snapshot by its ID or its name"));
        }
        if is_id("snap-", r) {
            if let Some((s, _)) = self.manager.snapshot(r).await? {
                return Ok(Some(s));
            }
        }
        Ok(self.manager.snapshot(&snapshot_id_for(r)).await?.map(|(s, _)| s))
    }
}

fn is_id(prefix: &str, s: &str) -> bool {
    s.strip_prefix(prefix).is_some_and(|u| uuid::Uuid::parse_str(u).is_ok())
}

pub fn phase_to_pb(p: Phase) -> pb::Phase {
    match p {
        Phase::Creating => pb::Phase::Creating,
        Phase::Available => pb::Phase::Available,
        Phase::Deleting => pb::Phase::Deleting,
        Phase::Error => pb::Phase::Error,
    }
}

fn wanted(phases: &[i32], p: Phase) -> bool {
    phases.is_empty() || phases.contains(&(phase_to_pb(p) as i32))
}

fn node_to_pb(n: &NodeRec, healthy: bool, now_ms: i64) -> pb::Node {
    pb::Node {
        id: n.id.clone(),
        zone: n.zone.clone(),
        healthy,
        heartbeat_age_ms: now_ms.saturating_sub(n.heartbeat_ms),
        pool: Some(pb::Pool {
            total_bytes: n.capacity.total,
            free_bytes: n.capacity.free,
            provisioned_bytes: n.capacity.provisioned,
            max_over_subscription_ratio: n.capacity.max_over_subscription_ratio,
            reserved_percentage: n.capacity.reserved_percentage,
            max_thin_volume_bytes: n.capacity.max_volume(Provisioning::Thin),
            max_thick_volume_bytes: n.capacity.max_volume(Provisioning::Thick),
            filesystem: n.filesystem.clone(),
            reflink: n.reflink,
        }),
        volume_count: n.volume_count,
        snapshot_count: n.snapshot_count,
        max_volumes: n.max_volumes,
        agent_address: n.agent_address.clone(),
        evacuating: n.evacuating,
    }
}

fn volume_to_pb(v: &VolumeRec) -> pb::Volume {
    let (source_snapshot_id, source_volume_id) = match &v.source {
        Some(SourceRef::Snapshot(s)) => (s.clone(), String::new()),
        Some(SourceRef::Volume(s)) => (String::new(), s.clone()),
        None => (String::new(), String::new()),
    };
    pb::Volume {
        id: v.id.clone(),
        name: v.name.clone(),
        phase: phase_to_pb(v.phase) as i32,
        size_bytes: v.size_bytes,
        node: v.node.clone().unwrap_or_default(),
        zone: v.accessible_topology.first().and_then(|t| t.get(crate::TOPOLOGY_ZONE_KEY)).cloned().unwrap_or_default(),
        provisioning: v.provisioning.as_str().to_string(),
        source_snapshot_id,
        source_volume_id,
        parameters: v.parameters.clone().into_iter().collect(),
        metadata: v.metadata.clone().into_iter().collect(),
        error: v.error.clone().unwrap_or_default(),
        attempts: v.attempts.iter().map(|a| pb::Attempt { node: a.node.clone(), error: a.error.clone(), at_ms: a.at_ms }).collect(),
        created_ms: v.created_ms,
        updated_ms: v.updated_ms,
        copy_source_node: v.copy.as_ref().map(|c| c.source_node.clone()).unwrap_or_default(),
        copied_bytes: v.copy.as_ref().map(|c| c.copied_bytes).unwrap_or(0),
        copy_total_bytes: v.copy.as_ref().map(|c| c.total_bytes).unwrap_or(0),
        copy_finished: v.copy.as_ref().is_some_and(|c| c.finished),
        migration: v.migration.as_ref().map(|m| pb::Migration {
            from_node: m.from.clone(),
            to_node: m.to.clone(),
            phase: format!("{:?}", m.phase),
            pass: m.pass,
            copied_bytes: m.copied_bytes + m.pass_copied_bytes,
            pass_copied_bytes: m.pass_copied_bytes,
            pass_total_bytes: m.pass_total_bytes,
            live: m.live,
            evacuation: m.evacuation,
            problem: m.problem.clone().unwrap_or_default(),
            started_ms: m.started_ms,
        }),
    }
}

fn snapshot_to_pb(s: &SnapshotRec, source_volume_name: String) -> pb::Snapshot {
    pb::Snapshot {
        id: s.id.clone(),
        name: s.name.clone(),
        phase: phase_to_pb(s.phase) as i32,
        source_volume_id: s.source_volume_id.clone(),
        source_volume_name,
        node: s.node.clone(),
        size_bytes: s.size_bytes,
        error: s.error.clone().unwrap_or_default(),
        created_ms: s.created_ms,
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn list_nodes(&self, _r: Request<pb::ListNodesRequest>) -> Result<Response<pb::ListNodesResponse>, Status> {
        let now = crate::controller::records::now_ms();
        let mut nodes: Vec<pb::Node> =
            self.manager.nodes().await?.iter().map(|n| node_to_pb(n, self.manager.node_is_healthy(n), now)).collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn list_volumes(&self, r: Request<pb::ListVolumesRequest>) -> Result<Response<pb::ListVolumesResponse>, Status> {
        let r = r.into_inner();
        let mut volumes: Vec<pb::Volume> =
            self.manager.volumes().await?.iter().filter(|v| wanted(&r.phases, v.phase)).map(volume_to_pb).collect();
        volumes.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.id.cmp(&b.id)));
        Ok(Response::new(pb::ListVolumesResponse { volumes }))
    }

    async fn get_volume(&self, r: Request<pb::GetVolumeRequest>) -> Result<Response<pb::GetVolumeResponse>, Status> {
        let r = r.into_inner();
        let v =
            self.find_volume(&r.volume).await?.ok_or_else(|| Status::not_found(format!("no volume has the ID or name {:?}", r.volume)))?;
        let mut snapshot_ids: Vec<String> =
            self.manager.snapshots().await?.into_iter().filter(|s| s.source_volume_id == v.id).map(|s| s.id).collect();
        snapshot_ids.sort();
        Ok(Response::new(pb::GetVolumeResponse { volume: Some(volume_to_pb(&v)), snapshot_ids }))
    }

    async fn list_snapshots(&self, r: Request<pb::ListSnapshotsRequest>) -> Result<Response<pb::ListSnapshotsResponse>, Status> {
        let r = r.into_inner();
        let volumes: std::collections::HashMap<String, String> =
            self.manager.volumes().await?.into_iter().map(|v| (v.id, v.name)).collect();
        let only = if r.volume.is_empty() {
            None
        } else {
            let v = self.find_volume(&r.volume).await?;
            // A snapshot outlives its volume: an unknown name may still be an old volume's ID.
            Some(v.map(|v| v.id).unwrap_or_else(|| r.volume.clone()))
        };
        let mut snapshots: Vec<pb::Snapshot> = self
            .manager
            .snapshots()
            .await?
            .iter()
            .filter(|s| wanted(&r.phases, s.phase))
            .filter(|s| only.as_ref().is_none_or(|id| s.source_volume_id == *id))
            .map(|s| snapshot_to_pb(s, volumes.get(&s.source_volume_id).cloned().unwrap_or_default()))
            .collect();
        snapshots.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.id.cmp(&b.id)));
        Ok(Response::new(pb::ListSnapshotsResponse { snapshots }))
    }

    async fn get_snapshot(&self, r: Request<pb::GetSnapshotRequest>) -> Result<Response<pb::GetSnapshotResponse>, Status> {
        let r = r.into_inner();
        let s = self
            .find_snapshot(&r.snapshot)
            .await?
            .ok_or_else(|| Status::not_found(format!("no snapshot has the ID or name {:?}", r.snapshot)))?;
        let name = self.manager.volume(&s.source_volume_id).await?.map(|(v, _)| v.name).unwrap_or_default();
        Ok(Response::new(pb::GetSnapshotResponse { snapshot: Some(snapshot_to_pb(&s, name)) }))
    }

    async fn migrate_volume(&self, r: Request<pb::MigrateVolumeRequest>) -> Result<Response<pb::MigrateVolumeResponse>, Status> {
        if let Some(mut leader) = self.leader()? {
            return leader.migrate_volume(r.into_inner()).await;
        }
        let r = r.into_inner();
        let v =
            self.find_volume(&r.volume).await?.ok_or_else(|| Status::not_found(format!("no volume has the ID or name {:?}", r.volume)))?;
        let rec = if r.cancel {
            self.manager.cancel_migration(&v.id).await?
        } else {
            if r.to_node.is_empty() {
                return Err(Status::invalid_argument("name the node to migrate the volume to"));
            }
            let req = MigrateRequest { volume_id: v.id, to: r.to_node, allow_topology_change: r.allow_topology_change, evacuation: false };
            self.manager.migrate_volume(req).await?
        };
        Ok(Response::new(pb::MigrateVolumeResponse { volume: Some(volume_to_pb(&rec)) }))
    }

    async fn evacuate_node(&self, r: Request<pb::EvacuateNodeRequest>) -> Result<Response<pb::EvacuateNodeResponse>, Status> {
        if let Some(mut leader) = self.leader()? {
            return leader.evacuate_node(r.into_inner()).await;
        }
        let r = r.into_inner();
        let n = self.manager.evacuate_node(&r.node, !r.stop).await?;
        let healthy = self.manager.node_is_healthy(&n);
        Ok(Response::new(pb::EvacuateNodeResponse { node: Some(node_to_pb(&n, healthy, crate::controller::records::now_ms())) }))
    }

    async fn list_orphans(&self, r: Request<pb::ListOrphansRequest>) -> Result<Response<pb::ListOrphansResponse>, Status> {
        let node = r.into_inner().node;
        let orphans = self.manager.list_orphans(&node).await?.into_iter().map(orphan_to_pb).collect();
        Ok(Response::new(pb::ListOrphansResponse { orphans }))
    }

    async fn purge_orphans(&self, r: Request<pb::PurgeOrphansRequest>) -> Result<Response<pb::PurgeOrphansResponse>, Status> {
        let r = r.into_inner();
        let older = std::time::Duration::from_secs(r.older_than_seconds);
        let purged = self.manager.purge_orphans(&r.node, older, r.dry_run).await?.into_iter().map(orphan_to_pb).collect();
        Ok(Response::new(pb::PurgeOrphansResponse { purged }))
    }
}

fn orphan_to_pb(o: crate::agent_proto::Orphan) -> pb::Orphan {
    pb::Orphan {
        name: o.name,
        kind: o.kind,
        id: o.id,
        reason: o.reason,
        age_seconds: o.age_ms / 1000,
        size_bytes: o.size_bytes,
        allocated_bytes: o.allocated_bytes,
    }
}
