//! CSI Node service: make a volume of this node's pool a block device, give
//! it a filesystem when it has none, mount it for a pod, and undo it all.
//!
//! The handlers here only validate and map errors; the work is in
//! `stage` (NodeStage/NodeUnstage), `publish` (NodePublish/NodeUnpublish)
//! and `usage` (NodeGetVolumeStats, NodeExpandVolume), on top of the
//! `attach` module. Every step inspects the host first (mount table, loop
//! devices in sysfs) and then acts, so a repeated call gives the same answer
//! and a restarted plugin carries on where the last one stopped: nothing
//! about volumes is kept in memory.
//!
//! How a volume looks on the host:
//! - filesystem: a loop device (direct I/O, autoclear) mounted at the
//!   staging path; each target is a bind mount of the staging mount.
//! - raw block: a loop device (direct I/O, no autoclear: a bind mount of a
//!   device node does not hold the device open) whose node is bind-mounted
//!   on the file `<staging path>/<volume id>`, so the mount table records
//!   the staging; each target is a file with the device node bound on it.
//!   A read-only bind of a device node does not stop writes, so a read-only
//!   target gets its own read-only loop device on the same image.

mod capability;
mod error;
pub mod freeze;
mod host;
mod inflight;
mod paths;
mod publish;
pub mod registration;
pub mod remote;
mod stage;
mod usage;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use tonic::{Code, Request, Response, Status};
use tracing::{debug, info, warn};

use crate::csi;
use crate::csi::node_service_capability::rpc::Type as Rpc;
use crate::volume::{validate_id, Pool};

pub use error::NodeError;
use inflight::InFlight;
pub use paths::kubelet_roots;
use paths::AllowedRoots;

/// What the node plugin needs to know about its host.
#[derive(Clone)]
pub struct NodeConfig {
    pub node_id: String,
    /// Empty when the node has no zone.
    pub zone: String,
    /// The local pool: volumes on this node are attached from its images.
    pub pool: Arc<Pool>,
    /// Staging and target paths must lie under one of these folders.
    pub allowed_roots: Vec<PathBuf>,
    /// NodeGetInfo max_volumes_per_node; 0 for no limit.
    pub max_volumes: i64,
    /// How volumes of other nodes are attached here (None: only local ones).
    pub remote: Option<remote::RemoteConfig>,
}

pub struct NodeService {
    node: Arc<Node>,
}

/// The state the operations share: configuration and the in-flight set.
struct Node {
    config: NodeConfig,
    roots: AllowedRoots,
    inflight: InFlight,
    remote: Option<Arc<remote::Remote>>,
}

impl NodeService {
    pub fn new(config: NodeConfig) -> Self {
        let remote = config.remote.clone().map(|c| Arc::new(remote::Remote::new(c)));
        // Snapshots of volumes staged here are cut with their filesystem
        // frozen; so are group members of other nodes staged here.
        config.pool.set_freezer(Arc::new(freeze::MountedFilesystems { remote: remote.clone() }));
        let roots = AllowedRoots::new(config.allowed_roots.clone());
        NodeService { node: Arc::new(Node { config, roots, inflight: InFlight::default(), remote }) }
    }

    /// Run one call as its own task, so that a caller giving up (a dropped
    /// RPC) cannot stop a mkfs or a mount halfway and free the volume's
    /// in-flight slot while that work still runs. Failures are logged here,
    /// where the node's operator will look for them.
    async fn call<T, F>(&self, rpc: &'static str, volume_id: &str, work: F) -> Result<Response<T>, Status>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, NodeError>> + Send + 'static,
    {
        let started = Instant::now();
        let out = match tokio::spawn(work).await {
            Ok(out) => out,
            Err(e) => Err(NodeError::Internal { detail: format!("{rpc} failed inside the node plugin: {e}") }),
        };
        let elapsed_ms = started.elapsed().as_millis() as u64;
        match out {
            Ok(v) => {
                debug!(rpc, volume.id = %volume_id, elapsed_ms, "CSI call done");
                Ok(Response::new(v))
            }
            Err(e) => {
                let code = e.code();
                if code == Code::Aborted {
                    info!(rpc, volume.id = %volume_id, code = ?code, elapsed_ms, error = %e, "CSI call refused");
                } else {
                    warn!(rpc, volume.id = %volume_id, code = ?code, elapsed_ms, error = %e, "CSI call failed");
                }
                Err(e.into())
            }
        }
    }
}

/// A volume ID from a request: present, and one the pool could hold.
fn check_id(id: &str) -> Result<String, NodeError> {
    if id.is_empty() {
        return Err(NodeError::Missing { field: "volume_id", hint: "" });
    }
    validate_id("volume_id", id)?;
    Ok(id.to_string())
}

/// Syscalls (mount table, sysfs, ioctls, mount(2)) run off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T, NodeError> + Send + 'static) -> Result<T, NodeError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| NodeError::Internal { detail: format!("node plugin worker failed: {e}") })?
}

#[tonic::async_trait]
impl csi::node_server::Node for NodeService {
    async fn node_stage_volume(&self, r: Request<csi::NodeStageVolumeRequest>) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        let req = r.into_inner();
        let (node, id) = (self.node.clone(), req.volume_id.clone());
        self.call("NodeStageVolume", &id, async move { node.stage(req).await.map(|()| csi::NodeStageVolumeResponse {}) }).await
    }

    async fn node_unstage_volume(
        &self,
        r: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        let req = r.into_inner();
        let (node, id) = (self.node.clone(), req.volume_id.clone());
        self.call("NodeUnstageVolume", &id, async move { node.unstage(req).await.map(|()| csi::NodeUnstageVolumeResponse {}) }).await
    }

    async fn node_publish_volume(
        &self,
        r: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        let req = r.into_inner();
        let (node, id) = (self.node.clone(), req.volume_id.clone());
        self.call("NodePublishVolume", &id, async move { node.publish(req).await.map(|()| csi::NodePublishVolumeResponse {}) }).await
    }

    async fn node_unpublish_volume(
        &self,
        r: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        let req = r.into_inner();
        let (node, id) = (self.node.clone(), req.volume_id.clone());
        self.call("NodeUnpublishVolume", &id, async move { node.unpublish(req).await.map(|()| csi::NodeUnpublishVolumeResponse {}) }).await
    }

    async fn node_get_volume_stats(
        &self,
        r: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        let req = r.into_inner();
        let (node, id) = (self.node.clone(), req.volume_id.clone());
        self.call("NodeGetVolumeStats", &id, async move { node.stats(req).await }).await
    }

    async fn node_expand_volume(
        &self,
        r: Request<csi::NodeExpandVolumeRequest>,
    ) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        let req = r.into_inner();
        let (node, id) = (self.node.clone(), req.volume_id.clone());
        self.call("NodeExpandVolume", &id, async move { node.expand(req).await }).await
    }

    async fn node_get_capabilities(
        &self,
        _r: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        let rpc = |t: Rpc| csi::NodeServiceCapability {
            r#type: Some(csi::node_service_capability::Type::Rpc(csi::node_service_capability::Rpc { r#type: t as i32 })),
        };
        Ok(Response::new(csi::NodeGetCapabilitiesResponse {
            capabilities: vec![
                rpc(Rpc::StageUnstageVolume),
                rpc(Rpc::GetVolumeStats),
                rpc(Rpc::ExpandVolume),
                rpc(Rpc::VolumeCondition),
                rpc(Rpc::SingleNodeMultiWriter),
            ],
        }))
    }

    async fn node_get_info(&self, _r: Request<csi::NodeGetInfoRequest>) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        let c = &self.node.config;
        let mut segments = std::collections::HashMap::new();
        segments.insert(crate::TOPOLOGY_NODE_KEY.to_string(), c.node_id.clone());
        if !c.zone.is_empty() {
            segments.insert(crate::TOPOLOGY_ZONE_KEY.to_string(), c.zone.clone());
        }
        Ok(Response::new(csi::NodeGetInfoResponse {
            node_id: c.node_id.clone(),
            // The spec forbids negative values; treat them as "no limit".
            max_volumes_per_node: c.max_volumes.max(0),
            accessible_topology: Some(csi::Topology { segments }),
        }))
    }
}
