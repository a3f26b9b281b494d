//! CSI Identity: who we are, what we offer, and whether we are ready.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::csi;
use crate::csi::identity_server::Identity;
use crate::csi::plugin_capability;

pub struct IdentityService {
    /// True when this endpoint also serves the Controller service.
    controller: bool,
    ready: Arc<AtomicBool>,
}

impl IdentityService {
    pub fn new(controller: bool, ready: Arc<AtomicBool>) -> Self {
        IdentityService { controller, ready }
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(&self, _request: Request<csi::GetPluginInfoRequest>) -> Result<Response<csi::GetPluginInfoResponse>, Status> {
        Ok(Response::new(csi::GetPluginInfoResponse {
            name: crate::DRIVER_NAME.to_string(),
            vendor_version: crate::DRIVER_VERSION.to_string(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _request: Request<csi::GetPluginCapabilitiesRequest>,
    ) -> Result<Response<csi::GetPluginCapabilitiesResponse>, Status> {
        use plugin_capability::service::Type as S;
        use plugin_capability::volume_expansion::Type as E;
        let service = |t: S| csi::PluginCapability {
            r#type: Some(plugin_capability::Type::Service(plugin_capability::Service { r#type: t as i32 })),
        };
        let mut caps = vec![service(S::VolumeAccessibilityConstraints)];
        if self.controller {
            caps.push(service(S::ControllerService));
            caps.push(service(S::GroupControllerService));
            caps.push(csi::PluginCapability {
                r#type: Some(plugin_capability::Type::VolumeExpansion(plugin_capability::VolumeExpansion { r#type: E::Online as i32 })),
            });
        }
        Ok(Response::new(csi::GetPluginCapabilitiesResponse { capabilities: caps }))
    }

    async fn probe(&self, _request: Request<csi::ProbeRequest>) -> Result<Response<csi::ProbeResponse>, Status> {
        Ok(Response::new(csi::ProbeResponse { ready: Some(self.ready.load(Ordering::SeqCst)) }))
    }
}
