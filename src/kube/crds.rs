//! The custom resources that hold the controller's records in a cluster,
//! in group `cinderblock.dev`: what Cinder's database would show, for
//! `kubectl get blockvolumes`. The spec is the record itself (generated from
//! the Rust record types); the printer columns read phase and node from it.
//! There is no status: one write per change, never a second request to
//! mirror the record into a status.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::controller::records::{ExportRec, GroupSnapshotRec, NodeRec, SnapshotRec, VolumeRec};

pub const GROUP: &str = "cinderblock.dev";
pub const VERSION: &str = "v1alpha1";

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "cinderblock.dev",
    version = "v1alpha1",
    kind = "BlockVolume",
    plural = "blockvolumes",
    shortname = "bvol",
    printcolumn = r#"{"name":"Volume Name","type":"string","jsonPath":".spec.name"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".spec.phase"}"#,
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.node"}"#,
    printcolumn = r#"{"name":"Size","type":"integer","jsonPath":".spec.size_bytes"}"#,
    printcolumn = r#"{"name":"Copied","type":"integer","jsonPath":".spec.copy.copied_bytes"}"#,
    printcolumn = r#"{"name":"To Copy","type":"integer","jsonPath":".spec.copy.total_bytes"}"#,
    printcolumn = r#"{"name":"Migrating To","type":"string","jsonPath":".spec.migration.to"}"#,
    printcolumn = r#"{"name":"Migration","type":"string","jsonPath":".spec.migration.phase"}"#,
    printcolumn = r#"{"name":"Pass","type":"integer","jsonPath":".spec.migration.pass","priority":1}"#,
    printcolumn = r#"{"name":"Migrated","type":"integer","jsonPath":".spec.migration.copied_bytes","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct BlockVolumeSpec {
    #[serde(flatten)]
    pub record: VolumeRec,
}

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "cinderblock.dev",
    version = "v1alpha1",
    kind = "BlockSnapshot",
    plural = "blocksnapshots",
    shortname = "bsnap",
    printcolumn = r#"{"name":"Snapshot Name","type":"string","jsonPath":".spec.name"}"#,
    printcolumn = r#"{"name":"Volume","type":"string","jsonPath":".spec.source_volume_id"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".spec.phase"}"#,
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.node"}"#,
    printcolumn = r#"{"name":"Size","type":"integer","jsonPath":".spec.size_bytes"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct BlockSnapshotSpec {
    #[serde(flatten)]
    pub record: SnapshotRec,
}

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "cinderblock.dev",
    version = "v1alpha1",
    kind = "StorageNode",
    plural = "storagenodes",
    shortname = "snode",
    printcolumn = r#"{"name":"Zone","type":"string","jsonPath":".spec.zone"}"#,
    printcolumn = r#"{"name":"Total","type":"integer","jsonPath":".spec.capacity.total"}"#,
    printcolumn = r#"{"name":"Free","type":"integer","jsonPath":".spec.capacity.free"}"#,
    printcolumn = r#"{"name":"Provisioned","type":"integer","jsonPath":".spec.capacity.provisioned"}"#,
    printcolumn = r#"{"name":"Volumes","type":"integer","jsonPath":".spec.volume_count"}"#,
    printcolumn = r#"{"name":"Orphans","type":"integer","jsonPath":".spec.orphan_count"}"#,
    printcolumn = r#"{"name":"Attach","type":"string","jsonPath":".spec.attach_engine"}"#,
    printcolumn = r#"{"name":"Attach TLS","type":"string","jsonPath":".spec.attach_tls"}"#,
    printcolumn = r#"{"name":"Mismatch","type":"string","jsonPath":".spec.mismatch","priority":1}"#,
    printcolumn = r#"{"name":"Evacuating","type":"boolean","jsonPath":".spec.evacuating"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct StorageNodeSpec {
    #[serde(flatten)]
    pub record: NodeRec,
}

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "cinderblock.dev",
    version = "v1alpha1",
    kind = "BlockExport",
    plural = "blockexports",
    shortname = "bexp",
    printcolumn = r#"{"name":"Volume","type":"string","jsonPath":".spec.volume_id"}"#,
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.node_id"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".spec.phase"}"#,
    printcolumn = r#"{"name":"Plain Text","type":"boolean","jsonPath":".spec.plain_text","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct BlockExportSpec {
    #[serde(flatten)]
    pub record: ExportRec,
}

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, JsonSchema)]
#[kube(
    group = "cinderblock.dev",
    version = "v1alpha1",
    kind = "BlockGroupSnapshot",
    plural = "blockgroupsnapshots",
    shortname = "bgsnap",
    printcolumn = r#"{"name":"Group Name","type":"string","jsonPath":".spec.name"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".spec.phase"}"#,
    printcolumn = r#"{"name":"Volumes","type":"string","jsonPath":".spec.source_volume_ids","priority":1}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
pub struct BlockGroupSnapshotSpec {
    #[serde(flatten)]
    pub record: GroupSnapshotRec,
}

/// Every CRD as one multi-document YAML, as `cinderblock crds` prints them.
pub fn all_yaml() -> String {
    use kube::CustomResourceExt;
    let crds = [BlockVolume::crd(), BlockSnapshot::crd(), StorageNode::crd(), BlockExport::crd(), BlockGroupSnapshot::crd()];
    let mut out = String::from("# Generated by `cinderblock crds`; do not edit by hand.\n");
    for crd in crds {
        let mut value = serde_json::to_value(&crd).expect("CRDs serialize");
        drop_unknown_formats(&mut value);
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&value).expect("CRDs serialize to YAML"));
    }
    out
}

/// The API server knows int32/int64 but not the unsigned formats schemars
/// writes for u32/u64 (it warns on every apply); `minimum: 0` already says it.
fn drop_unknown_formats(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            if matches!(m.get("format").and_then(|f| f.as_str()), Some("uint32" | "uint64" | "uint8" | "uint16")) {
                m.remove("format");
            }
            m.values_mut().for_each(drop_unknown_formats);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(drop_unknown_formats),
        _ => {}
    }
}
