//! The controller's records: what Cinder keeps in its database.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::scheduler::{NodeState, Segments};
use crate::volume::{PoolCapacity, Provisioning};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum Phase {
    Creating,
    Available,
    Deleting,
    Error,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SourceRef {
    Snapshot(String),
    Volume(String),
}

/// One try on one node, kept so a user sees every reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Attempt {
    pub node: String,
    pub error: String,
    pub at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct VolumeRec {
    pub id: String,
    /// The CSI name; the ID is derived from it, so one name is one record.
    pub name: String,
    pub size_bytes: u64,
    pub node: Option<String>,
    pub phase: Phase,
    pub source: Option<SourceRef>,
    pub provisioning: Provisioning,
    pub parameters: BTreeMap<String, String>,
    /// The request's arguments in canonical form: a repeat must match it.
    pub fingerprint: String,
    pub accessible_topology: Vec<Segments>,
    pub attempts: Vec<Attempt>,
    pub error: Option<String>,
    /// User metadata (e.g. the PVC's name), carried to snapshots and restores.
    pub metadata: BTreeMap<String, String>,
    pub created_ms: i64,
    pub updated_ms: i64,
    /// From which nodes a pod may use the volume (StorageClass parameter
    /// `accessibility`): its own node, or any node of its zone over NBD.
    #[serde(default)]
    pub accessibility: Accessibility,
    /// A volume copied from its source on another node (a cross-node
    /// restore or clone): how far the copy got, and whether it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy: Option<CopyRec>,
    /// A migration to another node under way (`controller/migrate.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationRec>,
}

/// Where a migration is. `Copying`: passes copy the volume to the target
/// while it may be in use; `Switching`: the last pass, with the volume
/// unpublished and publications held off, then the record's node changes
/// to the target in one write; `CleaningUp`: the record names the target,
/// and the source's image and pass snapshots are being removed;
/// `Cancelling`: the target's copy and the pass snapshots are being
/// removed, the volume stays where it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum MigrationPhase {
    Copying,
    Switching,
    CleaningUp,
    Cancelling,
}

/// A volume moving from one node's pool to another's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct MigrationRec {
    pub from: String,
    pub to: String,
    pub phase: MigrationPhase,
    /// The source's pool reflinks: passes copy from successive snapshots,
    /// each after the first only what changed, while the volume stays in
    /// use. Without, the single pass reads the unpublished volume itself.
    pub live: bool,
    /// The pass under way (1, 2, ...).
    pub pass: u32,
    /// Allocated bytes copied by the passes finished so far, and by the
    /// pass under way, of what it has to copy.
    pub copied_bytes: u64,
    pub pass_copied_bytes: u64,
    pub pass_total_bytes: u64,
    pub started_ms: i64,
    /// Started by the evacuation of the source node.
    #[serde(default)]
    pub evacuation: bool,
    /// The last thing that held the migration up (it retries), or None.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

impl MigrationRec {
    /// The ID of pass `pass`'s snapshot on the source node.
    pub fn pass_snapshot(&self, volume_id: &str, pass: u32) -> String {
        format!(
            "snap-{}",
            uuid::Uuid::new_v5(&NAMESPACE, format!("migration/{volume_id}/{}/{}/{pass}", self.to, self.started_ms).as_bytes())
        )
    }
}

/// A cross-node copy: which node exports the source to the volume's node,
/// and how far the copy got (allocated bytes; the source's holes are not
/// copied).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CopyRec {
    pub source_node: String,
    /// The node the volume is copied to (the export's consumer).
    pub node: String,
    pub copied_bytes: u64,
    /// Allocated bytes of the source (0 until the copy has mapped it).
    pub total_bytes: u64,
    /// The copy is complete and its export removed; the figures stay.
    #[serde(default)]
    pub finished: bool,
}

impl VolumeRec {
    /// A copy from another node that is not finished (its export may exist).
    pub fn copy_under_way(&self) -> Option<&CopyRec> {
        self.copy.as_ref().filter(|c| !c.finished)
    }
}

/// StorageClass parameter `accessibility`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Accessibility {
    /// Only on the node whose pool holds it (a loop device on the image).
    #[default]
    Node,
    /// On any node of that node's zone: remote nodes attach it over NBD.
    Zone,
}

impl Accessibility {
    pub fn parse(s: &str) -> Option<Accessibility> {
        match s {
            "node" => Some(Accessibility::Node),
            "zone" => Some(Accessibility::Zone),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SnapshotRec {
    pub id: String,
    pub name: String,
    pub source_volume_id: String,
    pub node: String,
    pub size_bytes: u64,
    pub phase: Phase,
    pub error: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub created_ms: i64,
    /// Set for a member of a group snapshot: it is deleted with its group,
    /// never alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
}

/// A group snapshot (CSI GroupController): one snapshot per source volume,
/// all cut while every source's filesystem was frozen. Keyed by an ID
/// derived from the CSI name; the members' IDs are derived from the group's
/// ID and their volume (`group_member_id`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct GroupSnapshotRec {
    pub id: String,
    pub name: String,
    /// Sorted, without repeats: a repeat of the request must name the same set.
    pub source_volume_ids: Vec<String>,
    /// The members, in the order of `source_volume_ids`.
    pub snapshot_ids: Vec<String>,
    pub phase: Phase,
    pub error: Option<String>,
    pub created_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct NodeRec {
    pub id: String,
    pub zone: String,
    /// Where the controller reaches this node's agent: http://host:port
    pub agent_address: String,
    pub capacity: PoolCapacity,
    pub volume_count: u32,
    pub snapshot_count: u32,
    pub max_volumes: u32,
    pub reflink: bool,
    pub filesystem: String,
    pub heartbeat_ms: i64,
    /// The pool's identity, written when the pool was created. The
    /// controller acts on an agent's answer only when it names this pool.
    #[serde(default)]
    pub pool_uuid: String,
    /// Set when the node's agent answered as another node or pool: nothing
    /// is scheduled or written there until an operator resolves it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mismatch: Option<String>,
    /// Images in the node's orphaned/ folder, and what they hold.
    #[serde(default)]
    pub orphan_count: u32,
    #[serde(default)]
    pub orphan_bytes: u64,
    /// Images the pool found damaged when it opened.
    #[serde(default)]
    pub broken_count: u32,
    /// How the node attaches other nodes' volumes: "kernel-nbd" or
    /// "fuse-nbd" (empty: not reported).
    #[serde(default)]
    pub attach_engine: String,
    /// How those connections are protected: "kernel-tls", "userspace-tls",
    /// or "plain" (kernel NBD without kernel TLS: publications to it admit
    /// its address in plain text).
    #[serde(default)]
    pub attach_tls: String,
    /// An operator asked to move every volume off this node
    /// (`cinderblock ctl node evacuate`): nothing new is placed here, and
    /// the leader migrates its volumes to nodes the scheduler picks.
    #[serde(default)]
    pub evacuating: bool,
}

impl NodeRec {
    /// A record holding what the scheduler reads of `state` and nothing
    /// else (no agent address, no pool identity): for filling a node view
    /// in tests and benchmarks.
    pub fn of_state(state: &NodeState) -> NodeRec {
        NodeRec {
            id: state.id.clone(),
            zone: state.zone.clone(),
            agent_address: String::new(),
            capacity: state.capacity,
            volume_count: state.volume_count,
            snapshot_count: 0,
            max_volumes: state.max_volumes,
            reflink: state.reflink,
            filesystem: String::new(),
            heartbeat_ms: state.last_heartbeat_ms,
            pool_uuid: String::new(),
            mismatch: None,
            orphan_count: 0,
            orphan_bytes: 0,
            broken_count: 0,
            attach_engine: String::new(),
            attach_tls: String::new(),
            evacuating: false,
        }
    }

    pub fn state(&self) -> NodeState {
        NodeState {
            id: self.id.clone(),
            zone: self.zone.clone(),
            capacity: self.capacity,
            volume_count: self.volume_count,
            max_volumes: self.max_volumes,
            last_heartbeat_ms: self.heartbeat_ms,
            reflink: self.reflink,
        }
    }
}

/// A volume published to a node (ControllerPublishVolume): on its own node
/// (`protocol` "local"), or exported by its owner over NBD to another node
/// (Cinder's export). Keyed by `export_id_for(volume, node)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ExportRec {
    pub id: String,
    pub volume_id: String,
    /// The consuming node.
    pub node_id: String,
    /// "local" or "nbd".
    pub protocol: String,
    /// NBD: host:port of the owner's NBD server.
    pub address: String,
    /// NBD: the export's name (it opens nothing without the consumer's certificate).
    pub export_name: String,
    pub phase: Phase,
    /// The node whose pool holds the volume.
    #[serde(default)]
    pub owner_node: String,
    #[serde(default)]
    pub read_only: bool,
    /// NBD: the export also admits the consumer's address in plain text
    /// (its kernel NBD engine has no kernel TLS).
    #[serde(default)]
    pub plain_text: bool,
}

pub fn export_id_for(volume_id: &str, node_id: &str) -> String {
    format!("exp-{}", uuid::Uuid::new_v5(&NAMESPACE, format!("export/{volume_id}/{node_id}").as_bytes()))
}

pub fn now_ms() -> i64 {
    crate::volume::records::now_ms()
}

/// IDs are derived from CSI names (UUID v5), so a repeated CreateVolume
/// finds its record by key even across controller restarts.
pub fn volume_id_for(name: &str) -> String {
    format!("vol-{}", uuid::Uuid::new_v5(&NAMESPACE, format!("volume/{name}").as_bytes()))
}

pub fn snapshot_id_for(name: &str) -> String {
    format!("snap-{}", uuid::Uuid::new_v5(&NAMESPACE, format!("snapshot/{name}").as_bytes()))
}

pub fn group_snapshot_id_for(name: &str) -> String {
    format!("group-{}", uuid::Uuid::new_v5(&NAMESPACE, format!("group-snapshot/{name}").as_bytes()))
}

/// The member snapshot of group `group_id` taken from `volume_id`.
pub fn group_member_id(group_id: &str, volume_id: &str) -> String {
    format!("snap-{}", uuid::Uuid::new_v5(&NAMESPACE, format!("group-member/{group_id}/{volume_id}").as_bytes()))
}

const NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6369_6e64_6572_626c_6f63_6b2e_6465_7600);

pub fn pool_status_to_node(id: &str, zone: &str, agent_address: &str, max_volumes: u32, s: &crate::agent_proto::PoolStatus) -> NodeRec {
    NodeRec {
        id: id.to_string(),
        zone: zone.to_string(),
        agent_address: agent_address.to_string(),
        capacity: PoolCapacity {
            total: s.total_bytes,
            free: s.free_bytes,
            provisioned: s.provisioned_bytes,
            max_over_subscription_ratio: s.max_over_subscription_ratio,
            reserved_percentage: s.reserved_percentage,
        },
        volume_count: s.volume_count,
        snapshot_count: s.snapshot_count,
        max_volumes,
        reflink: s.reflink,
        filesystem: s.filesystem.clone(),
        heartbeat_ms: now_ms(),
        pool_uuid: s.pool_uuid.clone(),
        mismatch: None,
        orphan_count: s.orphan_count,
        orphan_bytes: s.orphan_bytes,
        broken_count: s.broken_count,
        attach_engine: s.attach_engine.clone(),
        attach_tls: s.attach_tls.clone(),
        evacuating: false,
    }
}
