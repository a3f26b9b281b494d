//! CSI GroupController: group snapshots. Validate, map to the manager
//! (`group.rs`), map the answer.

use std::collections::BTreeSet;

use tonic::{Request, Response, Status};

use super::error::ControllerError;
use super::manager::Manager;
use super::records::{GroupSnapshotRec, Phase};
use super::service::{is_our_id, logged, require, to_csi_snapshot};
use crate::csi;

/// More members than this is a mistake, not a group.
const MAX_MEMBERS: usize = 64;

pub struct GroupControllerService {
    manager: Manager,
}

impl GroupControllerService {
    pub fn new(manager: Manager) -> Self {
        GroupControllerService { manager }
    }

    async fn answer(&self, g: &GroupSnapshotRec) -> Result<csi::VolumeGroupSnapshot, Status> {
        let members = self.manager.group_members(g).await?;
        Ok(csi::VolumeGroupSnapshot {
            group_snapshot_id: g.id.clone(),
            snapshots: members.iter().map(to_csi_snapshot).collect(),
            creation_time: Some(prost_types::Timestamp {
                seconds: g.created_ms.div_euclid(1000),
                nanos: (g.created_ms.rem_euclid(1000) * 1_000_000) as i32,
            }),
            ready_to_use: g.phase == Phase::Available,
        })
    }

    /// The group by ID; NOT_FOUND when unknown or being deleted, and
    /// INVALID_ARGUMENT when the caller names other members than it has.
    async fn known_group(&self, id: &str, snapshot_ids: &[String]) -> Result<GroupSnapshotRec, Status> {
        require("group_snapshot_id", id)?;
        let g = if is_our_id("group-", id) { self.manager.group_snapshot(id).await? } else { None };
        let g = g.map(|(g, _)| g).filter(|g| g.phase != Phase::Deleting);
        let g = g.ok_or_else(|| Status::not_found(format!("group snapshot {id} does not exist")))?;
        check_members(&g, snapshot_ids)?;
        Ok(g)
    }
}

fn check_members(g: &GroupSnapshotRec, snapshot_ids: &[String]) -> Result<(), Status> {
    if snapshot_ids.is_empty() {
        return Ok(());
    }
    let asked: BTreeSet<&String> = snapshot_ids.iter().collect();
    let has: BTreeSet<&String> = g.snapshot_ids.iter().collect();
    if asked != has {
        return Err(Status::invalid_argument(format!(
            "snapshot_ids do not match group snapshot {}: it holds {}",
            g.id,
            g.snapshot_ids.join(", ")
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl csi::group_controller_server::GroupController for GroupControllerService {
    async fn group_controller_get_capabilities(
        &self,
        _request: Request<csi::GroupControllerGetCapabilitiesRequest>,
    ) -> Result<Response<csi::GroupControllerGetCapabilitiesResponse>, Status> {
        use csi::group_controller_service_capability::rpc::Type as T;
        Ok(Response::new(csi::GroupControllerGetCapabilitiesResponse {
            capabilities: vec![csi::GroupControllerServiceCapability {
                r#type: Some(csi::group_controller_service_capability::Type::Rpc(csi::group_controller_service_capability::Rpc {
                    r#type: T::CreateDeleteGetVolumeGroupSnapshot as i32,
                })),
            }],
        }))
    }

    async fn create_volume_group_snapshot(
        &self,
        request: Request<csi::CreateVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::CreateVolumeGroupSnapshotResponse>, Status> {
        let r = request.into_inner();
        let result = async {
            require("name", &r.name)?;
            if r.source_volume_ids.is_empty() {
                return Err(Status::invalid_argument("source_volume_ids is required"));
            }
            if r.source_volume_ids.len() > MAX_MEMBERS {
                return Err(Status::invalid_argument(format!(
                    "{} source volumes; a group holds at most {MAX_MEMBERS}",
                    r.source_volume_ids.len()
                )));
            }
            for v in &r.source_volume_ids {
                require("source_volume_ids[]", v)?;
            }
            if let Some(k) = r.parameters.keys().find(|k| !k.starts_with("csi.storage.k8s.io/")) {
                return Err(Status::invalid_argument(format!("parameter {k:?} is not known; group snapshots take none")));
            }
            let sources: Vec<String> = r.source_volume_ids.iter().cloned().collect::<BTreeSet<_>>().into_iter().collect();
            // The same name with other sources conflicts even when a source is unknown.
            if let Some((g, _)) = self.manager.group_snapshot(&super::records::group_snapshot_id_for(&r.name)).await? {
                if g.source_volume_ids != sources {
                    let holder = format!("a group of volumes {}", g.source_volume_ids.join(", "));
                    return Err(ControllerError::NameTaken { kind: "group snapshot", name: r.name.clone(), holder }.into());
                }
            }
            if let Some(v) = sources.iter().find(|v| !is_our_id("vol-", v)) {
                return Err(Status::not_found(format!("source volume {v} does not exist")));
            }
            let g = self.manager.create_group_snapshot(&r.name, sources).await?;
            Ok(csi::CreateVolumeGroupSnapshotResponse { group_snapshot: Some(self.answer(&g).await?) })
        }
        .await;
        logged("CreateVolumeGroupSnapshot", result)
    }

    async fn delete_volume_group_snapshot(
        &self,
        request: Request<csi::DeleteVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::DeleteVolumeGroupSnapshotResponse>, Status> {
        let r = request.into_inner();
        let result = async {
            require("group_snapshot_id", &r.group_snapshot_id)?;
            if is_our_id("group-", &r.group_snapshot_id) {
                if let Some((g, _)) = self.manager.group_snapshot(&r.group_snapshot_id).await? {
                    check_members(&g, &r.snapshot_ids)?;
                    self.manager.delete_group_snapshot(&r.group_snapshot_id).await?;
                }
            }
            Ok(csi::DeleteVolumeGroupSnapshotResponse {})
        }
        .await;
        logged("DeleteVolumeGroupSnapshot", result)
    }

    async fn get_volume_group_snapshot(
        &self,
        request: Request<csi::GetVolumeGroupSnapshotRequest>,
    ) -> Result<Response<csi::GetVolumeGroupSnapshotResponse>, Status> {
        let r = request.into_inner();
        let result = async {
            let g = self.known_group(&r.group_snapshot_id, &r.snapshot_ids).await?;
            Ok(csi::GetVolumeGroupSnapshotResponse { group_snapshot: Some(self.answer(&g).await?) })
        }
        .await;
        logged("GetVolumeGroupSnapshot", result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_members_must_be_the_groups() {
        let g = GroupSnapshotRec {
            id: "group-1".into(),
            name: "g".into(),
            source_volume_ids: vec!["vol-a".into(), "vol-b".into()],
            snapshot_ids: vec!["snap-a".into(), "snap-b".into()],
            phase: Phase::Available,
            error: None,
            created_ms: 0,
        };
        assert!(check_members(&g, &[]).is_ok());
        assert!(check_members(&g, &["snap-b".into(), "snap-a".into()]).is_ok());
        let e = check_members(&g, &["snap-a".into()]).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("snap-a, snap-b"), "{}", e.message());
        assert_eq!(check_members(&g, &["snap-a".into(), "snap-c".into()]).unwrap_err().code(), tonic::Code::InvalidArgument);
    }
}
