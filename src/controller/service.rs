//! CSI Controller: validate, map to the manager, map the answer. Thin: a
//! gRPC edge, where the manager's `ControllerError` becomes a `Status`
//! (`controller/error.rs` picks the code).

use std::collections::BTreeMap;

use tonic::{Request, Response, Status};
use tracing::warn;

use super::error::ControllerError;
use super::manager::{CreateVolumeSpec, Manager};
use super::publish::Publish;
use super::records::{Accessibility, Phase, SnapshotRec, SourceRef, VolumeRec};
use crate::csi;
use crate::csi::volume_capability::access_mode::Mode;
use crate::scheduler::{Placement, Segments, TopologyList};
use crate::volume::Provisioning;

/// Size given when the request names none (and there is no source).
pub const DEFAULT_VOLUME_BYTES: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
const MAX_NAME_LEN: usize = 128;
/// Parameters the provisioner adds (PVC name and namespace, ...); kept as metadata.
const K8S_PREFIX: &str = "csi.storage.k8s.io/";

pub struct ControllerService {
    manager: Manager,
}

impl ControllerService {
    pub fn new(manager: Manager) -> Self {
        ControllerService { manager }
    }
}

pub(crate) fn logged<T>(method: &'static str, r: Result<T, Status>) -> Result<Response<T>, Status> {
    match r {
        Ok(v) => Ok(Response::new(v)),
        Err(s) => {
            warn!(method, code = ?s.code(), message = s.message(), "CSI call failed");
            Err(s)
        }
    }
}

fn invalid(msg: impl Into<String>) -> Status {
    Status::invalid_argument(msg.into())
}

pub(crate) fn require(what: &str, v: &str) -> Result<(), Status> {
    if v.is_empty() {
        Err(invalid(format!("{what} is required")))
    } else if v.len() > MAX_NAME_LEN {
        Err(invalid(format!("{what} is {} bytes long; the limit is {MAX_NAME_LEN}", v.len())))
    } else {
        Ok(())
    }
}

/// An ID from the CO must name one of ours; anything else is unknown.
pub(crate) fn is_our_id(prefix: &str, id: &str) -> bool {
    id.strip_prefix(prefix).is_some_and(|u| uuid::Uuid::parse_str(u).is_ok())
}

/// Check capabilities; returns the reason one is not supported.
pub fn check_capabilities(caps: &[csi::VolumeCapability]) -> Result<(), String> {
    if caps.is_empty() {
        return Err("volume_capabilities is required".into());
    }
    for c in caps {
        let mode = c.access_mode.as_ref().map(|m| m.mode).ok_or("a capability has no access_mode")?;
        match Mode::try_from(mode) {
            Ok(Mode::SingleNodeWriter | Mode::SingleNodeReaderOnly | Mode::SingleNodeSingleWriter | Mode::SingleNodeMultiWriter) => {}
            Ok(m) => return Err(format!("access mode {} is not supported: volumes are attached on one node at a time", m.as_str_name())),
            Err(_) => return Err(format!("unknown access mode {mode}")),
        }
        match &c.access_type {
            Some(csi::volume_capability::AccessType::Block(_)) => {}
            Some(csi::volume_capability::AccessType::Mount(m)) => {
                if !matches!(m.fs_type.as_str(), "" | "ext4" | "xfs") {
                    return Err(format!("fs_type {:?} is not supported; use ext4 or xfs", m.fs_type));
                }
            }
            None => return Err("a capability has neither block nor mount access type".into()),
        }
    }
    Ok(())
}

struct Params {
    provisioning: Provisioning,
    placement: Placement,
    accessibility: Accessibility,
    own: BTreeMap<String, String>,
    metadata: BTreeMap<String, String>,
}

fn parse_parameters(p: &std::collections::HashMap<String, String>) -> Result<Params, Status> {
    let mut out = Params {
        provisioning: Provisioning::Thin,
        placement: Placement::Spread,
        accessibility: Accessibility::Node,
        own: BTreeMap::new(),
        metadata: BTreeMap::new(),
    };
    for (k, v) in p {
        if k.starts_with(K8S_PREFIX) {
            out.metadata.insert(k.clone(), v.clone());
            continue;
        }
        match k.as_str() {
            "provisioning" => {
                out.provisioning =
                    Provisioning::parse(v).ok_or_else(|| invalid(format!("parameter provisioning={v:?}: use thin or thick")))?
            }
            "placement" => {
                out.placement = match v.as_str() {
                    "spread" => Placement::Spread,
                    "stack" => Placement::Stack,
                    _ => return Err(invalid(format!("parameter placement={v:?}: use spread or stack"))),
                }
            }
            "accessibility" => {
                out.accessibility = Accessibility::parse(v).ok_or_else(|| {
                    invalid(format!("parameter accessibility={v:?}: use node (its own node) or zone (any node of its zone, over NBD)"))
                })?
            }
            super::crossnode::CROSS_NODE_SOURCES => {
                if v != "true" && v != "false" {
                    return Err(invalid(format!(
                        "parameter crossNodeSources={v:?}: use true (a restore or clone may be copied to another node) or false (only the source's node)"
                    )));
                }
            }
            _ => {
                return Err(invalid(format!(
                    "unknown parameter {k:?}; cinderblock understands provisioning, placement, accessibility and crossNodeSources"
                )))
            }
        }
        out.own.insert(k.clone(), v.clone());
    }
    Ok(out)
}

/// Pick the size for a capacity range: required (or `default`) rounded up to
/// a MiB, or to 4 KiB when the limit is tighter.
pub fn pick_size(range: Option<&csi::CapacityRange>, default: u64) -> Result<u64, Status> {
    let (required, limit) = range.map(|r| (r.required_bytes, r.limit_bytes)).unwrap_or((0, 0));
    if required < 0 || limit < 0 {
        return Err(invalid("capacity_range bytes must not be negative"));
    }
    let (required, limit) = (required as u64, limit as u64);
    if limit > 0 && limit < required {
        return Err(invalid(format!("limit_bytes {limit} is below required_bytes {required}")));
    }
    let want = if required > 0 {
        required
    } else if limit > 0 {
        default.min(limit)
    } else {
        default
    };
    let mut size = want.div_ceil(MIB) * MIB;
    if limit > 0 && size > limit {
        size = want.div_ceil(4096) * 4096;
        if size > limit {
            return Err(Status::out_of_range(format!("no size in 4 KiB steps fits between {required} and {limit} bytes")));
        }
    }
    Ok(size)
}

fn topology_list(t: &[csi::Topology]) -> TopologyList {
    TopologyList::build(t.iter().map(|t| t.segments.iter().map(|(k, v)| (k.as_str(), v.as_str()))))
}

fn to_csi_volume(v: &VolumeRec) -> csi::Volume {
    let mut context = std::collections::HashMap::new();
    if let Some(n) = &v.node {
        context.insert("cinderblock.dev/node".to_string(), n.clone());
    }
    context.insert("cinderblock.dev/provisioning".to_string(), v.provisioning.as_str().to_string());
    csi::Volume {
        capacity_bytes: v.size_bytes as i64,
        volume_id: v.id.clone(),
        volume_context: context,
        content_source: v.source.as_ref().map(|s| csi::VolumeContentSource {
            r#type: Some(match s {
                SourceRef::Snapshot(id) => {
                    csi::volume_content_source::Type::Snapshot(csi::volume_content_source::SnapshotSource { snapshot_id: id.clone() })
                }
                SourceRef::Volume(id) => {
                    csi::volume_content_source::Type::Volume(csi::volume_content_source::VolumeSource { volume_id: id.clone() })
                }
            }),
        }),
        accessible_topology: v
            .accessible_topology
            .iter()
            .map(|s| csi::Topology { segments: s.iter().map(|(k, v)| (k.clone(), v.clone())).collect() })
            .collect(),
    }
}

pub(crate) fn to_csi_snapshot(s: &SnapshotRec) -> csi::Snapshot {
    csi::Snapshot {
        size_bytes: s.size_bytes as i64,
        snapshot_id: s.id.clone(),
        source_volume_id: s.source_volume_id.clone(),
        creation_time: Some(prost_types::Timestamp {
            seconds: s.created_ms.div_euclid(1000),
            nanos: (s.created_ms.rem_euclid(1000) * 1_000_000) as i32,
        }),
        ready_to_use: s.phase == Phase::Available,
        group_snapshot_id: s.group_id.clone().unwrap_or_default(),
    }
}

impl ControllerService {
    async fn do_create_volume(&self, r: csi::CreateVolumeRequest) -> Result<csi::CreateVolumeResponse, Status> {
        require("name", &r.name)?;
        check_capabilities(&r.volume_capabilities).map_err(invalid)?;
        let params = parse_parameters(&r.parameters)?;
        let source = match r.volume_content_source.as_ref().and_then(|s| s.r#type.as_ref()) {
            Some(csi::volume_content_source::Type::Snapshot(s)) => {
                require("volume_content_source.snapshot.snapshot_id", &s.snapshot_id)?;
                Some(SourceRef::Snapshot(s.snapshot_id.clone()))
            }
            Some(csi::volume_content_source::Type::Volume(v)) => {
                require("volume_content_source.volume.volume_id", &v.volume_id)?;
                Some(SourceRef::Volume(v.volume_id.clone()))
            }
            None => None,
        };
        // A restore or clone defaults to its source's size.
        let default = match &source {
            Some(SourceRef::Snapshot(id)) => {
                let s = if is_our_id("snap-", id) { self.manager.snapshot(id).await? } else { None };
                s.ok_or_else(|| Status::not_found(format!("source snapshot {id} does not exist")))?.0.size_bytes
            }
            Some(SourceRef::Volume(id)) => {
                let v = if is_our_id("vol-", id) { self.manager.volume(id).await? } else { None };
                v.ok_or_else(|| Status::not_found(format!("source volume {id} does not exist")))?.0.size_bytes
            }
            None => DEFAULT_VOLUME_BYTES,
        };
        let size = pick_size(r.capacity_range.as_ref(), default)?;
        let (mut requisite, mut preferred) =
            r.accessibility_requirements.as_ref().map(|t| (topology_list(&t.requisite), topology_list(&t.preferred))).unwrap_or_default();
        if params.accessibility == Accessibility::Zone {
            // A zone volume may live on any pool of the requested zones (its
            // pod's node comes first, through the preferred list).
            requisite = requisite.zones_only();
            preferred = preferred.zones_only();
        }
        let fingerprint = format!(
            "size={size} provisioning={} source={} parameters={:?}",
            params.provisioning.as_str(),
            match &source {
                Some(SourceRef::Snapshot(s)) => format!("snapshot:{s}"),
                Some(SourceRef::Volume(v)) => format!("volume:{v}"),
                None => "none".into(),
            },
            params.own
        );
        let spec = CreateVolumeSpec {
            name: r.name.clone(),
            size_bytes: size,
            provisioning: params.provisioning,
            placement: params.placement,
            source,
            requisite,
            preferred,
            parameters: params.own,
            metadata: params.metadata,
            fingerprint,
            accessibility: params.accessibility,
        };
        let v = self.manager.create_volume(spec).await?;
        Ok(csi::CreateVolumeResponse { volume: Some(to_csi_volume(&v)) })
    }

    async fn known_volume(&self, id: &str) -> Result<VolumeRec, Status> {
        require("volume_id", id)?;
        let v = if is_our_id("vol-", id) { self.manager.volume(id).await? } else { None };
        v.map(|(v, _)| v).ok_or_else(|| Status::not_found(format!("volume {id} does not exist")))
    }
}

#[tonic::async_trait]
impl csi::controller_server::Controller for ControllerService {
    async fn create_volume(&self, request: Request<csi::CreateVolumeRequest>) -> Result<Response<csi::CreateVolumeResponse>, Status> {
        logged("CreateVolume", self.do_create_volume(request.into_inner()).await)
    }

    async fn delete_volume(&self, request: Request<csi::DeleteVolumeRequest>) -> Result<Response<csi::DeleteVolumeResponse>, Status> {
        let r = request.into_inner();
        let result = async {
            require("volume_id", &r.volume_id)?;
            if is_our_id("vol-", &r.volume_id) {
                self.manager.delete_volume(&r.volume_id).await?;
            }
            Ok(csi::DeleteVolumeResponse {})
        }
        .await;
        logged("DeleteVolume", result)
    }

    async fn controller_publish_volume(
        &self,
        request: Request<csi::ControllerPublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerPublishVolumeResponse>, Status> {
        let r = request.into_inner();
        let result = async {
            require("volume_id", &r.volume_id)?;
            require("node_id", &r.node_id)?;
            let cap = r.volume_capability.as_ref().ok_or_else(|| invalid("volume_capability is required"))?;
            check_capabilities(std::slice::from_ref(cap)).map_err(invalid)?;
            let vol = self.known_volume(&r.volume_id).await?;
            let single_node = cap.access_mode.as_ref().is_some_and(|m| {
                matches!(
                    Mode::try_from(m.mode),
                    Ok(Mode::SingleNodeWriter | Mode::SingleNodeReaderOnly | Mode::SingleNodeSingleWriter | Mode::SingleNodeMultiWriter)
                )
            });
            let read_only = r.readonly || cap.access_mode.as_ref().is_some_and(|m| m.mode == Mode::SingleNodeReaderOnly as i32);
            let context =
                self.manager.publish_volume(Publish { volume_id: vol.id, node_id: r.node_id.clone(), read_only, single_node }).await?;
            Ok(csi::ControllerPublishVolumeResponse { publish_context: context.into_iter().collect() })
        }
        .await;
        logged("ControllerPublishVolume", result)
    }

    async fn controller_unpublish_volume(
        &self,
        request: Request<csi::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<csi::ControllerUnpublishVolumeResponse>, Status> {
        let r = request.into_inner();
        let result = async {
            require("volume_id", &r.volume_id)?;
            // An unknown volume is unpublished everywhere already (the spec's OK).
            if is_our_id("vol-", &r.volume_id) {
                self.manager.unpublish_volume(&r.volume_id, &r.node_id).await?;
            }
            Ok(csi::ControllerUnpublishVolumeResponse {})
        }
        .await;
        logged("ControllerUnpublishVolume", result)
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<csi::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<csi::ValidateVolumeCapabilitiesResponse>, Status> {
        let r = request.into_inner();
        let result = async {
            require("volume_id", &r.volume_id)?;
            if r.volume_capabilities.is_empty() {
                return Err(invalid("volume_capabilities is required"));
            }
            self.known_volume(&r.volume_id).await?;
            Ok(match check_capabilities(&r.volume_capabilities) {
                Ok(()) => csi::ValidateVolumeCapabilitiesResponse {
                    confirmed: Some(csi::validate_volume_capabilities_response::Confirmed {
                        volume_context: r.volume_context,
                        volume_capabilities: r.volume_capabilities,
                        parameters: r.parameters,
                        mutable_parameters: Default::default(),
                    }),
                    message: String::new(),
                },
                Err(why) => csi::ValidateVolumeCapabilitiesResponse { confirmed: None, message: why },
            })
        }
        .await;
        logged("ValidateVolumeCapabilities", result)
    }

    async fn list_volumes(&self, request: Request<csi::ListVolumesRequest>) -> Result<Response<csi::ListVolumesResponse>, Status> {
        let r = request.into_inner();
        let result = async {
            let page = self.manager.volume_page(r.max_entries, &r.starting_token).await?;
            let next_token = page.next_token;
            let mut status = self.manager.listed_volumes_status(&page.items).await?;
            Ok(csi::ListVolumesResponse {
                entries: page
                    .items
                    .iter()
                    .map(|v| {
                        let s = status.remove(&v.id);
                        csi::list_volumes_response::Entry {
                            volume: Some(to_csi_volume(v)),
                            status: Some(csi::list_volumes_response::VolumeStatus {
                                volume_condition: s
                                    .as_ref()
                                    .map(|s| csi::VolumeCondition { abnormal: s.health.abnormal, message: s.health.message.clone() }),
                                published_node_ids: s.map(|s| s.published).unwrap_or_default(),
                            }),
                        }
                    })
                    .collect(),
                next_token,
            })
        }
        .await;
        logged("ListVolumes", result)
    }

    async fn get_capacity(&self, request: Request<csi::GetCapacityRequest>) -> Result<Response<csi::GetCapacityResponse>, Status> {
        let r = request.into_inner();
        let result = async {
            if !r.volume_capabilities.is_empty() {
                if let Err(why) = check_capabilities(&r.volume_capabilities) {
                    // Capacity for capabilities we cannot serve is zero, not an error.
                    warn!(reason = %why, "GetCapacity for unsupported capabilities");
                    return Ok(csi::GetCapacityResponse { available_capacity: 0, maximum_volume_size: Some(0), minimum_volume_size: None });
                }
            }
            let params = parse_parameters(&r.parameters)?;
            let topology: Option<Segments> =
                r.accessible_topology.as_ref().map(|t| t.segments.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
            let best = self.manager.largest_volume(params.provisioning, topology).await?;
            let best = best.min(i64::MAX as u64) as i64;
            Ok(csi::GetCapacityResponse { available_capacity: best, maximum_volume_size: Some(best), minimum_volume_size: Some(4096) })
        }
        .await;
        logged("GetCapacity", result)
    }

    async fn controller_get_capabilities(
        &self,
        _request: Request<csi::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::ControllerGetCapabilitiesResponse>, Status> {
        use csi::controller_service_capability::rpc::Type as T;
        let caps = [
            T::CreateDeleteVolume,
            T::CreateDeleteSnapshot,
            T::CloneVolume,
            T::ListVolumes,
            T::ListVolumesPublishedNodes,
            T::ListSnapshots,
            T::GetCapacity,
            T::ExpandVolume,
            T::GetVolume,
            T::VolumeCondition,
            T::GetSnapshot,
            T::SingleNodeMultiWriter,
            T::PublishUnpublishVolume,
            T::PublishReadonly,
        ];
        Ok(Response::new(csi::ControllerGetCapabilitiesResponse {
            capabilities: caps
                .iter()
                .map(|t| csi::ControllerServiceCapability {
                    r#type: Some(csi::controller_service_capability::Type::Rpc(csi::controller_service_capability::Rpc {
                        r#type: *t as i32,
                    })),
                })
                .collect(),
        }))
    }

    async fn create_snapshot(&self, request: Request<csi::CreateSnapshotRequest>) -> Result<Response<csi::CreateSnapshotResponse>, Status> {
        let r = request.into_inner();
        let result = async {
            require("name", &r.name)?;
            require("source_volume_id", &r.source_volume_id)?;
            if !is_our_id("vol-", &r.source_volume_id) {
                // Same name with another source is a conflict even if that source is unknown.
                if let Some((s, _)) = self.manager.snapshot(&super::records::snapshot_id_for(&r.name)).await? {
                    let holder = format!("a snapshot of volume {}", s.source_volume_id);
                    return Err(ControllerError::NameTaken { kind: "snapshot", name: r.name.clone(), holder }.into());
                }
                return Err(Status::not_found(format!("source volume {} does not exist", r.source_volume_id)));
            }
            let s = self.manager.create_snapshot(&r.name, &r.source_volume_id, r.parameters.into_iter().collect()).await?;
            Ok(csi::CreateSnapshotResponse { snapshot: Some(to_csi_snapshot(&s)) })
        }
        .await;
        logged("CreateSnapshot", result)
    }

    async fn delete_snapshot(&self, request: Request<csi::DeleteSnapshotRequest>) -> Result<Response<csi::DeleteSnapshotResponse>, Status> {
        let r = request.into_inner();
        let result = async {
            require("snapshot_id", &r.snapshot_id)?;
            if is_our_id("snap-", &r.snapshot_id) {
                if let Some(group) = self.manager.snapshot(&r.snapshot_id).await?.and_then(|(s, _)| s.group_id) {
                    return Err(Status::failed_precondition(format!(
                        "snapshot {} belongs to group snapshot {group}; delete the group (DeleteVolumeGroupSnapshot)",
                        r.snapshot_id
                    )));
                }
                self.manager.delete_snapshot(&r.snapshot_id).await?;
            }
            Ok(csi::DeleteSnapshotResponse {})
        }
        .await;
        logged("DeleteSnapshot", result)
    }

    async fn list_snapshots(&self, request: Request<csi::ListSnapshotsRequest>) -> Result<Response<csi::ListSnapshotsResponse>, Status> {
        let r = request.into_inner();
        let result = async {
            if !r.snapshot_id.is_empty() {
                // One snapshot by ID: no paging (an unknown ID is an empty list).
                let s = if is_our_id("snap-", &r.snapshot_id) { self.manager.snapshot(&r.snapshot_id).await? } else { None };
                let s = s.map(|(s, _)| s).filter(|s| s.phase == Phase::Available);
                let s = s.filter(|s| r.source_volume_id.is_empty() || s.source_volume_id == r.source_volume_id);
                let entries = s.iter().map(|s| csi::list_snapshots_response::Entry { snapshot: Some(to_csi_snapshot(s)) }).collect();
                return Ok(csi::ListSnapshotsResponse { entries, next_token: String::new() });
            }
            let page = self.manager.snapshot_page(r.max_entries, &r.starting_token, &r.source_volume_id).await?;
            Ok(csi::ListSnapshotsResponse {
                entries: page.items.iter().map(|s| csi::list_snapshots_response::Entry { snapshot: Some(to_csi_snapshot(s)) }).collect(),
                next_token: page.next_token,
            })
        }
        .await;
        logged("ListSnapshots", result)
    }

    async fn get_snapshot(&self, request: Request<csi::GetSnapshotRequest>) -> Result<Response<csi::GetSnapshotResponse>, Status> {
        let r = request.into_inner();
        let result = async {
            require("snapshot_id", &r.snapshot_id)?;
            let s = if is_our_id("snap-", &r.snapshot_id) { self.manager.snapshot(&r.snapshot_id).await? } else { None };
            let s = s.map(|(s, _)| s).filter(|s| s.phase != Phase::Deleting);
            let s = s.ok_or_else(|| Status::not_found(format!("snapshot {} does not exist", r.snapshot_id)))?;
            Ok(csi::GetSnapshotResponse { snapshot: Some(to_csi_snapshot(&s)) })
        }
        .await;
        logged("GetSnapshot", result)
    }

    async fn controller_expand_volume(
        &self,
        request: Request<csi::ControllerExpandVolumeRequest>,
    ) -> Result<Response<csi::ControllerExpandVolumeResponse>, Status> {
        let r = request.into_inner();
        let result = async {
            require("volume_id", &r.volume_id)?;
            let range = r.capacity_range.as_ref().ok_or_else(|| invalid("capacity_range is required"))?;
            if let Some(cap) = &r.volume_capability {
                check_capabilities(std::slice::from_ref(cap)).map_err(invalid)?;
            }
            let current = self.known_volume(&r.volume_id).await?;
            let size = pick_size(Some(range), current.size_bytes)?;
            let v = self.manager.expand_volume(&r.volume_id, size).await?;
            Ok(csi::ControllerExpandVolumeResponse { capacity_bytes: v.size_bytes as i64, node_expansion_required: true })
        }
        .await;
        logged("ControllerExpandVolume", result)
    }

    async fn controller_get_volume(
        &self,
        request: Request<csi::ControllerGetVolumeRequest>,
    ) -> Result<Response<csi::ControllerGetVolumeResponse>, Status> {
        let r = request.into_inner();
        let result = async {
            let v = self.known_volume(&r.volume_id).await?;
            let s = self.manager.volume_status(&v).await?;
            let condition = csi::VolumeCondition { abnormal: s.health.abnormal, message: s.health.message };
            Ok(csi::ControllerGetVolumeResponse {
                volume: Some(to_csi_volume(&v)),
                status: Some(csi::controller_get_volume_response::VolumeStatus {
                    published_node_ids: s.published,
                    volume_condition: Some(condition),
                }),
            })
        }
        .await;
        logged("ControllerGetVolume", result)
    }

    async fn controller_modify_volume(
        &self,
        _request: Request<csi::ControllerModifyVolumeRequest>,
    ) -> Result<Response<csi::ControllerModifyVolumeResponse>, Status> {
        Err(Status::unimplemented("ControllerModifyVolume is not offered yet"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_up_to_a_mib_within_the_limit() {
        let r = |req, lim| csi::CapacityRange { required_bytes: req, limit_bytes: lim };
        assert_eq!(pick_size(None, DEFAULT_VOLUME_BYTES).unwrap(), DEFAULT_VOLUME_BYTES);
        assert_eq!(pick_size(Some(&r(1, 0)), 0).unwrap(), MIB);
        assert_eq!(pick_size(Some(&r(5000, 8192)), 0).unwrap(), 8192);
        assert_eq!(pick_size(Some(&r(0, 3 * MIB as i64)), DEFAULT_VOLUME_BYTES).unwrap(), 3 * MIB);
        assert_eq!(pick_size(Some(&r(-1, 0)), 0).unwrap_err().code(), tonic::Code::InvalidArgument);
        assert_eq!(pick_size(Some(&r(10, 5)), 0).unwrap_err().code(), tonic::Code::InvalidArgument);
        assert_eq!(pick_size(Some(&r(4097, 4100)), 0).unwrap_err().code(), tonic::Code::OutOfRange);
    }
}
