//! CSI Node service: attach, format, mount and publish volumes of this
//! node's pool. (Being written: see issue "Node service".)

use std::path::PathBuf;
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::csi;
use crate::volume::Pool;

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
}

pub struct NodeService {
    #[allow(dead_code)]
    config: NodeConfig,
}

impl NodeService {
    pub fn new(config: NodeConfig) -> Self {
        NodeService { config }
    }
}

#[tonic::async_trait]
impl csi::node_server::Node for NodeService {
    async fn node_stage_volume(
        &self,
        _r: Request<csi::NodeStageVolumeRequest>,
    ) -> Result<Response<csi::NodeStageVolumeResponse>, Status> {
        Err(Status::unimplemented("NodeStageVolume"))
    }
    async fn node_unstage_volume(
        &self,
        _r: Request<csi::NodeUnstageVolumeRequest>,
    ) -> Result<Response<csi::NodeUnstageVolumeResponse>, Status> {
        Err(Status::unimplemented("NodeUnstageVolume"))
    }
    async fn node_publish_volume(
        &self,
        _r: Request<csi::NodePublishVolumeRequest>,
    ) -> Result<Response<csi::NodePublishVolumeResponse>, Status> {
        Err(Status::unimplemented("NodePublishVolume"))
    }
    async fn node_unpublish_volume(
        &self,
        _r: Request<csi::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<csi::NodeUnpublishVolumeResponse>, Status> {
        Err(Status::unimplemented("NodeUnpublishVolume"))
    }
    async fn node_get_volume_stats(
        &self,
        _r: Request<csi::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<csi::NodeGetVolumeStatsResponse>, Status> {
        Err(Status::unimplemented("NodeGetVolumeStats"))
    }
    async fn node_expand_volume(
        &self,
        _r: Request<csi::NodeExpandVolumeRequest>,
    ) -> Result<Response<csi::NodeExpandVolumeResponse>, Status> {
        Err(Status::unimplemented("NodeExpandVolume"))
    }
    async fn node_get_capabilities(
        &self,
        _r: Request<csi::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<csi::NodeGetCapabilitiesResponse>, Status> {
        Ok(Response::new(csi::NodeGetCapabilitiesResponse { capabilities: vec![] }))
    }
    async fn node_get_info(
        &self,
        _r: Request<csi::NodeGetInfoRequest>,
    ) -> Result<Response<csi::NodeGetInfoResponse>, Status> {
        Err(Status::unimplemented("NodeGetInfo"))
    }
}
