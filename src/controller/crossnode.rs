//! Cross-node restore and clone. A volume from a snapshot or a volume is
//! made on the source's node when it fits there (a reflink: constant time);
//! when that node cannot take it (full, excluded by the requisite topology,
//! not taking new volumes), the scheduler may place it on another node,
//! unless the StorageClass says `crossNodeSources: "false"`. Then the
//! source's node exports the source read-only to the new node only (one
//! export per copy), the new node's agent copies the allocated ranges
//! (`agent::copier`), and this flow follows its progress into the record
//! (`VolumeRec::copy`) until the volume is whole, then removes the export.

use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::create::CreateCtx;
use super::error::{ControllerError, Failure};
use super::manager::Manager;
use super::records::*;
use crate::agent_proto as pb;

/// StorageClass parameter: "false" forbids copying a source from another node.
pub const CROSS_NODE_SOURCES: &str = "crossNodeSources";

/// How often the flow asks the new node how far its copy got.
const POLL: Duration = Duration::from_millis(500);
/// How often the record takes the progress (one store write).
const RECORD_EVERY: Duration = Duration::from_secs(2);
/// A copy that copies nothing for this long (the new node or the source
/// node gone) is given up: its volume is cleaned up and the call fails.
const STALL: Duration = Duration::from_secs(300);

pub(super) fn allowed(parameters: &std::collections::BTreeMap<String, String>) -> bool {
    parameters.get(CROSS_NODE_SOURCES).map(String::as_str) != Some("false")
}

/// (volume_id, snapshot_id) of an export request for `source`.
fn export_fields(source: &SourceRef) -> (String, String) {
    match source {
        SourceRef::Snapshot(s) => (String::new(), s.clone()),
        SourceRef::Volume(v) => (v.clone(), String::new()),
    }
}

/// The agent's CreateVolumeRequest source for a record's source.
pub(super) fn source_of(source: &Option<SourceRef>) -> Option<pb::create_volume_request::Source> {
    match source {
        Some(SourceRef::Snapshot(s)) => Some(pb::create_volume_request::Source::SnapshotId(s.clone())),
        Some(SourceRef::Volume(v)) => Some(pb::create_volume_request::Source::SourceVolumeId(v.clone())),
        None => None,
    }
}

/// A copy's target answered with a refusal (capacity, arguments, the
/// fence), not with a passing trouble: waiting does not help.
pub(super) fn copy_refused(failure: Failure) -> bool {
    matches!(
        failure,
        Failure::Invalid | Failure::AlreadyExists | Failure::Refused | Failure::NoSpace | Failure::OutOfRange | Failure::Denied
    )
}

impl Manager {
    /// Ask a copy of `volume_id` to stop (its volume is being deleted).
    pub(super) fn cancel_copy(&self, volume_id: &str) {
        self.copy_cancels.lock().unwrap_or_else(|p| p.into_inner()).insert(volume_id.to_string());
    }

    pub(super) fn forget_copy_cancel(&self, volume_id: &str) {
        self.copy_cancels.lock().unwrap_or_else(|p| p.into_inner()).remove(volume_id);
    }

    fn copy_cancelled(&self, volume_id: &str) -> bool {
        self.copy_cancels.lock().unwrap_or_else(|p| p.into_inner()).contains(volume_id)
    }

    /// Remove the export that fed `volume_id`'s copy from `source` on
    /// `source_node` to `node`. A source node that is gone has nothing to remove.
    pub(super) async fn drop_copy_export(
        &self,
        volume_id: &str,
        source: &SourceRef,
        source_node: &str,
        node: &str,
    ) -> Result<(), ControllerError> {
        if self.node_in_view(source_node).await?.is_none() {
            return Ok(());
        }
        let mut agent = self.agent_for(source_node).await?;
        let (v, s) = export_fields(source);
        agent
            .delete_export(pb::DeleteExportRequest {
                volume_id: v,
                snapshot_id: s,
                consumer_node: node.to_string(),
                force: true,
                copy_for: volume_id.to_string(),
            })
            .await
            .map_err(ControllerError::during(format!("node {source_node} still exports the source of volume {volume_id}")))?;
        info!(volume.id = %volume_id, source_node, node, "copy export removed");
        Ok(())
    }
}

/// Make the volume on `node` by copying its source from `source_node`, and
/// follow the copy to its end. Fails (after removing the export) when the
/// volume is deleted meanwhile, when the copy stalls, or when a node refuses.
pub(super) async fn copy_on(ctx: &mut CreateCtx, node: &str, source_node: &str) -> Result<pb::Volume, ControllerError> {
    let m = ctx.m.clone();
    let source = ctx.spec.source.clone().ok_or_else(|| ControllerError::Internal("a copy without a source".into()))?;
    let id = ctx.rec.id.clone();
    let (volume_id, snapshot_id) = export_fields(&source);
    let mut src = m.agent_for(source_node).await?;
    let export = src
        .create_export(pb::CreateExportRequest {
            volume_id,
            snapshot_id,
            consumer_node: node.to_string(),
            read_only: true,
            copy_for: id.clone(),
            ..Default::default()
        })
        .await
        .map_err(ControllerError::during(format!("node {source_node} could not export the source to node {node}")))?
        .export
        .ok_or(ControllerError::IncompleteAnswer("an export"))?;
    if ctx.rec.copy.as_ref().is_none_or(|c| c.source_node != source_node || c.node != node) {
        ctx.rec.copy = Some(CopyRec {
            source_node: source_node.to_string(),
            node: node.to_string(),
            copied_bytes: 0,
            total_bytes: 0,
            finished: false,
        });
        ctx.save().await.map_err(|t| t.error)?;
    }
    info!(volume.id = %id, source_node, node, "copying the source from another node");
    let result = follow(ctx, node, source_node, export).await;
    // The export goes whatever happened: a failed copy's volume is deleted.
    if let Err(e) = m.drop_copy_export(&id, &source, source_node, node).await {
        warn!(volume.id = %id, error = %e, "the copy's export could not be removed now; deleting the volume removes it");
        return result;
    }
    if let (Ok(v), Some(c)) = (&result, ctx.rec.copy.as_mut()) {
        (c.copied_bytes, c.total_bytes, c.finished) = (v.copied_bytes, v.copy_total_bytes, true);
    }
    result
}

async fn follow(ctx: &mut CreateCtx, node: &str, source_node: &str, export: pb::Export) -> Result<pb::Volume, ControllerError> {
    let m = ctx.m.clone();
    let id = ctx.rec.id.clone();
    let source = source_of(&ctx.spec.source);
    let req = pb::CreateVolumeRequest {
        volume_id: id.clone(),
        size_bytes: ctx.spec.size_bytes,
        provisioning: crate::agent::provisioning_to_pb(ctx.spec.provisioning) as i32,
        source,
        metadata: ctx.rec.metadata.clone().into_iter().collect(),
        remote: Some(pb::RemoteSource {
            address: export.address,
            export_name: export.export_name,
            server_node: source_node.to_string(),
            ..Default::default()
        }),
    };
    let (mut seen, mut moved_at, mut recorded_at) = (None, Instant::now(), Instant::now());
    loop {
        if m.copy_cancelled(&id) {
            return Err(ControllerError::CopyGivenUp(format!(
                "volume {id} is being deleted; its copy from node {source_node} was stopped"
            )));
        }
        let answer = match m.agent_for(node).await {
            Ok(mut agent) => agent.create_volume(req.clone()).await.map(|r| r.volume.unwrap_or_default()).map_err(ControllerError::Agent),
            Err(e) => Err(e),
        };
        match answer {
            Ok(v) if v.state == pb::ImageState::Available as i32 => return Ok(v),
            Ok(v) => {
                if seen != Some(v.copied_bytes) {
                    (seen, moved_at) = (Some(v.copied_bytes), Instant::now());
                }
                let now = CopyRec {
                    source_node: source_node.to_string(),
                    node: node.to_string(),
                    copied_bytes: v.copied_bytes,
                    total_bytes: v.copy_total_bytes,
                    finished: false,
                };
                if ctx.rec.copy.as_ref() != Some(&now) && recorded_at.elapsed() >= RECORD_EVERY {
                    ctx.rec.copy = Some(now);
                    ctx.save().await.map_err(|t| t.error)?;
                    recorded_at = Instant::now();
                }
            }
            // The node refused (capacity, arguments, the fence): no waiting helps.
            Err(e) if copy_refused(e.failure()) => return Err(e),
            // Restarting, unreachable: the copy resumes there; wait.
            Err(e) => warn!(volume.id = %id, node, error = %e, "cannot ask the node about its copy now"),
        }
        if moved_at.elapsed() > STALL {
            return Err(ControllerError::CopyGivenUp(format!(
                "the copy of volume {id} from node {source_node} to node {node} made no progress for {} s; retry",
                STALL.as_secs()
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}
