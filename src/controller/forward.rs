//! Controller replicas behind one set of CSI sidecars.
//!
//! Each CSI sidecar (provisioner, attacher, snapshotter, resizer) elects its
//! own leader among the controller pods, and so does cinderblock: a
//! sidecar's leader may well sit beside a cinderblock standby. A standby
//! therefore hands every call that changes something to the leader, over
//! mutual TLS to the leader's peer server (the address the leader writes on
//! its Lease); reads it answers itself from its own watch caches. The
//! leader's peer server admits only the controller's certificate and runs
//! the calls locally, never forwarding again, so a call makes at most one
//! hop; a leadership change in between ends in UNAVAILABLE, which the
//! sidecar retries.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};
use tracing::debug;

use super::group_service::GroupControllerService;
use super::manager::Leadership;
use super::service::ControllerService;
use crate::csi;
use crate::csi::controller_client::ControllerClient;
use crate::csi::controller_server::Controller;
use crate::csi::group_controller_client::GroupControllerClient;
use crate::csi::group_controller_server::GroupController;
use crate::tls::{AgentConnector, Peer, TlsDir};

/// Where this replica's mutating calls go.
pub struct LeaderRoute {
    leadership: watch::Receiver<Leadership>,
    leader_peer: watch::Receiver<Option<String>>,
    connector: AgentConnector,
    /// One channel to the current leader, reused while it leads.
    channel: Mutex<Option<(String, Channel)>>,
}

impl LeaderRoute {
    pub fn new(
        leadership: watch::Receiver<Leadership>,
        leader_peer: watch::Receiver<Option<String>>,
        tls: Arc<TlsDir>,
    ) -> Result<LeaderRoute, String> {
        let connector = AgentConnector::new(tls, &Peer::Controller, vec![b"h2".to_vec()]).map_err(|e| e.to_string())?;
        Ok(LeaderRoute { leadership, leader_peer, connector, channel: Mutex::new(None) })
    }

    /// A channel to the leader when another replica leads and says where it
    /// serves; None when this replica leads or no leader is known (the call
    /// then runs here and waits for leadership as before).
    pub(crate) fn leader_channel(&self) -> Result<Option<(String, Channel)>, Status> {
        if self.leadership.borrow().leading {
            return Ok(None);
        }
        let Some(address) = self.leader_peer.borrow().clone() else { return Ok(None) };
        let mut cached = self.channel.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((a, c)) = cached.as_ref() {
            if *a == address {
                return Ok(Some((a.clone(), c.clone())));
            }
        }
        let endpoint = Endpoint::from_shared(format!("http://{address}"))
            .map_err(|e| Status::internal(format!("the leader's peer address {address:?} is not usable: {e}")))?
            .connect_timeout(Duration::from_secs(5));
        let channel = endpoint.connect_with_connector_lazy(self.connector.clone());
        *cached = Some((address.clone(), channel.clone()));
        Ok(Some((address, channel)))
    }
}

/// The incoming call's deadline (gRPC's `grpc-timeout` header), to carry
/// on to the leader.
fn deadline_of(metadata: &tonic::metadata::MetadataMap) -> Option<Duration> {
    let v = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The CSI Controller a sidecar talks to: the local service, with calls
/// that change something handed to the leader while this replica stands by.
/// Without a route (one replica, or no peer server) every call runs here.
pub struct ForwardingController {
    local: ControllerService,
    route: Option<Arc<LeaderRoute>>,
}

impl ForwardingController {
    pub fn new(local: ControllerService, route: Option<Arc<LeaderRoute>>) -> Self {
        ForwardingController { local, route }
    }
}

/// Forward `$request` to the leader with `$method` when a standby, else run it here.
macro_rules! to_leader_or_local {
    ($self:ident, $request:ident, $method:ident, $name:literal) => {
        to_leader_or_local!($self, $request, $method, $name, ControllerClient, "csi.v1.Controller")
    };
    ($self:ident, $request:ident, $method:ident, $name:literal, $client:ident, $service:literal) => {{
        match $self.route.as_ref().map(|r| r.leader_channel()).transpose()?.flatten() {
            Some((address, channel)) => {
                let deadline = deadline_of($request.metadata());
                let mut forwarded = Request::new($request.into_inner());
                if let Some(d) = deadline {
                    forwarded.set_timeout(d);
                }
                debug!(method = $name, leader = %address, "a standby hands the call to the leader");
                crate::metrics::METRICS
                    .forwarded_calls
                    .get_or_create(&crate::metrics::MethodLabels { service: $service.into(), method: $name.into() })
                    .inc();
                $client::new(channel).$method(forwarded).await.map_err(|s| {
                    if crate::tls::client::never_sent(&s) {
                        Status::unavailable(format!("this controller replica stands by and could not reach the leader at {address}: {}; retry", s.message()))
                    } else {
                        s
                    }
                })
            }
            None => $self.local.$method($request).await,
        }
    }};
}

#[tonic::async_trait]
impl Controller for ForwardingController {
    async fn create_volume(&self, request: Request<csi::CreateVolumeRequest>) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        to_leader_or_local!(self, request, create_volume, "CreateVolume")
    }

    async fn delete_volume(&self, request: Request<csi::DeleteVolumeRequest>) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        to_leader_or_local!(self, request, delete_volume, "DeleteVolume")
    }

    async fn controller_publish_volume(
        &self,
        request: Request<csi::ControllerPublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerPublishVolumeResponse>, Status> {
        to_leader_or_local!(self, request, controller_publish_volume, "ControllerPublishVolume")
    }

    async fn controller_unpublish_volume(
        &self,
        request: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerUnpublishVolumeResponse>, Status> {
        to_leader_or_local!(self, request, controller_unpublish_volume, "ControllerUnpublishVolume")
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        self.local.validate_volume_capabilities(request).await
    }

    async fn list_volumes(&self, request: Request<csi::ListVolumesRequest>) -> Result<Response<csi::ListVolumesResponse>, Status> {
        self.local.list_volumes(request).await
    }

    async fn get_capacity(&self, request: Request<csi::GetCapacityRequest>) -> Result<Response<csi::GetCapacityResponse>, Status> {
        self.local.get_capacity(request).await
    }

    async fn controller_get_capabilities(
        &self,
        request: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        self.local.controller_get_capabilities(request).await
    }

    async fn create_snapshot(&self, request: Request<csi::CreateSnapshotRequest>) -> Result<Response<csi::CreateSnapshotResponse>, Status> {
        to_leader_or_local!(self, request, create_snapshot, "CreateSnapshot")
    }

    async fn delete_snapshot(&self, request: Request<csi::DeleteSnapshotRequest>) -> Result<Response<csi::DeleteSnapshotResponse>, Status> {
        to_leader_or_local!(self, request, delete_snapshot, "DeleteSnapshot")
    }

    async fn list_snapshots(&self, request: Request<csi::ListSnapshotsRequest>) -> Result<Response<csi::ListSnapshotsResponse>, Status> {
        self.local.list_snapshots(request).await
    }

    async fn get_snapshot(&self, request: Request<csi::GetSnapshotRequest>) -> Result<Response<csi::GetSnapshotResponse>, Status> {
        self.local.get_snapshot(request).await
    }

    async fn controller_expand_volume(
        &self,
        request: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        to_leader_or_local!(self, request, controller_expand_volume, "ControllerExpandVolume")
    }

    async fn controller_get_volume(
        &self,
        request: Request<csi::ControllerGetVolumeRequest>,
    ) -> Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        self.local.controller_get_volume(request).await
    }

    async fn controller_modify_volume(
        &self,
        request: Request<csi::ControllerModifyVolumeRequest>,
    ) -> Result<Response<csi::ControllerModifyVolumeResponse>, Status> {
        self.local.controller_modify_volume(request).await
    }
}

/// The CSI GroupController a sidecar talks to: group snapshots are made
/// and deleted by the leader, read here.
pub struct ForwardingGroupController {
    local: GroupControllerService,
    route: Option<Arc<LeaderRoute>>,
}

impl ForwardingGroupController {
    pub fn new(local: GroupControllerService, route: Option<Arc<LeaderRoute>>) -> Self {
        ForwardingGroupController { local, route }
    }
}

#[tonic::async_trait]
impl GroupController for ForwardingGroupController {
    async fn group_controller_get_capabilities(
        &self,
        request: Request<csi::GroupControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::GroupControllerGetCapabilitiesResponse>, Status> {
        self.local.group_controller_get_capabilities(request).await
    }

    async fn create_volume_group_snapshot(
        &self,
        request: Request<csi::CreateVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::CreateVolumeGroupSnapshotResponse>, Status> {
        to_leader_or_local!(
            self,
            request,
            create_volume_group_snapshot,
            "CreateVolumeGroupSnapshot",
            GroupControllerClient,
            "csi.v1.GroupController"
        )
    }

    async fn delete_volume_group_snapshot(
        &self,
        request: Request<csi::DeleteVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::DeleteVolumeGroupSnapshotResponse>, Status> {
        to_leader_or_local!(
            self,
            request,
            delete_volume_group_snapshot,
            "DeleteVolumeGroupSnapshot",
            GroupControllerClient,
            "csi.v1.GroupController"
        )
    }

    async fn get_volume_group_snapshot(
        &self,
        request: Request<csi::GetVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::GetVolumeGroupSnapshotResponse>, Status> {
        self.local.get_volume_group_snapshot(request).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_in_every_grpc_unit() {
        let md = |v: &str| {
            let mut m = tonic::metadata::MetadataMap::new();
            m.insert("grpc-timeout", v.parse().unwrap());
            m
        };
        assert_eq!(deadline_of(&md("60S")), Some(Duration::from_secs(60)));
        assert_eq!(deadline_of(&md("2M")), Some(Duration::from_secs(120)));
        assert_eq!(deadline_of(&md("1H")), Some(Duration::from_secs(3600)));
        assert_eq!(deadline_of(&md("250m")), Some(Duration::from_millis(250)));
        assert_eq!(deadline_of(&md("7u")), Some(Duration::from_micros(7)));
        assert_eq!(deadline_of(&md("9n")), Some(Duration::from_nanos(9)));
        assert_eq!(deadline_of(&md("12x")), None);
        assert_eq!(deadline_of(&md("S")), None);
        assert_eq!(deadline_of(&tonic::metadata::MetadataMap::new()), None);
    }
}
