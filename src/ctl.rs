//! `cinderblock ctl`: a client for people. Volumes and snapshots go through
//! CSI, exactly as Kubernetes calls them; names, phases, nodes and pools come
//! from the admin API (`proto/admin.proto`) on the same socket. Tables by
//! default, JSON with `-o json`. Volumes and snapshots are named by ID or by
//! name everywhere.

use std::collections::HashMap;

use serde_json::{json, Value};
use tonic::transport::{Channel, Endpoint};
use tonic::Code;

use cinderblock::admin_proto as admin;
use cinderblock::admin_proto::admin_client::AdminClient;
use cinderblock::csi;
use cinderblock::csi::controller_client::ControllerClient;
use cinderblock::csi::node_client::NodeClient;
use cinderblock::units::{format_bytes, parse_size};

mod show;

use show::*;

/// Smallest size `ctl` asks for: the controller rounds every size up to a whole MiB.
const MIN_SIZE: u64 = 1 << 20;

#[derive(clap::Args)]
pub struct CtlArgs {
    /// Socket of a cinderblock standalone or controller, unix:///path/to/csi.sock
    #[arg(long, env = "CSI_ENDPOINT", global = true)]
    pub endpoint: Option<String>,
    /// Output: table for people, json for scripts.
    #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"], global = true)]
    pub output: String,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(clap::Subcommand)]
pub enum CtlCommand {
    /// Volumes: create, list, get, delete, expand.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Snapshots: create, list, get, delete.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Nodes: their pools, capacity, health and zone.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Call a node plugin's CSI Node service as the kubelet does (then
    /// --endpoint is the node plugin's socket): stage, unstage, expand. For
    /// test beds and for looking into a node by hand.
    #[command(subcommand)]
    Kubelet(KubeletCmd),
    /// The largest volume that fits now (CSI GetCapacity), optionally in one zone or on one node.
    Capacity {
        /// StorageClass-style parameters, k=v (e.g. provisioning=thick); repeatable.
        #[arg(long = "param", value_name = "K=V", value_parser = parse_kv)]
        params: Vec<(String, String)>,
        /// Only nodes of this zone (see `ctl node list`).
        #[arg(long)]
        zone: Option<String>,
        /// Only this node (see `ctl node list`).
        #[arg(long)]
        node: Option<String>,
    },
}

#[derive(clap::Subcommand)]
pub enum VolumeCmd {
    /// Create a volume: blank, restored from a snapshot, or a clone of a volume.
    Create {
        /// The volume's name. The same name is the same volume: repeating a
        /// create (after a crash, say) never makes a second one.
        name: String,
        /// Size with a unit: 10Gi, 1.5Gi, 512Mi (at least 1Mi; rounded up to
        /// a whole MiB). Plain numbers are refused: write 4096B for bytes.
        /// [default: 1Gi; a restore or clone: its source's size]
        #[arg(long, value_parser = parse_volume_size)]
        size: Option<u64>,
        /// Restore this snapshot (its name or ID). The volume lands on the snapshot's node.
        #[arg(long, value_name = "SNAPSHOT", conflicts_with = "clone")]
        from_snapshot: Option<String>,
        /// Clone this volume (its name or ID). The clone lands on the source's node.
        #[arg(long, value_name = "VOLUME")]
        clone: Option<String>,
        /// StorageClass parameters, k=v: provisioning=thin|thick, placement=spread|stack; repeatable.
        #[arg(long = "param", value_name = "K=V", value_parser = parse_kv)]
        params: Vec<(String, String)>,
        /// Ask for a raw block volume instead of one to be formatted and mounted.
        #[arg(long)]
        block: bool,
    },
    /// List volumes. Without --all, only Available ones.
    List {
        /// Also volumes being created, being deleted, or whose creation failed (phase Error).
        #[arg(long)]
        all: bool,
    },
    /// Show one volume: phase, node, size, source, snapshots, and why it failed if it did.
    Get {
        /// The volume's name or ID.
        volume: String,
    },
    /// Delete a volume and its data. Its snapshots and the volumes cloned or
    /// restored from it stay: they are independent copies, and are deleted
    /// on their own.
    Delete {
        /// The volume's name or ID.
        volume: String,
    },
    /// Move a volume to another node (docs/migration.md). Where the pool
    /// reflinks it is copied while in use, and switched once unpublished;
    /// elsewhere it must be unpublished first. Answers once started; `volume
    /// get` shows the progress.
    Migrate {
        /// The volume's name or ID.
        volume: String,
        /// The node to move it to (see `ctl node list`).
        #[arg(long, required_unless_present = "cancel")]
        to: Option<String>,
        /// Stop the migration under way (before its switch) instead.
        #[arg(long, conflicts_with = "to")]
        cancel: bool,
        /// Let a volume pinned to its node (StorageClass accessibility: node) move.
        #[arg(long)]
        allow_topology_change: bool,
        /// Wait until the migration has ended (switched and cleaned up, or cancelled).
        #[arg(long)]
        wait: bool,
    },
    /// Grow a volume (volumes never shrink). A mounted filesystem grows the next time its node stages it.
    Expand {
        /// The volume's name or ID.
        volume: String,
        /// The new size, with a unit (e.g. 20Gi); not below the current size.
        #[arg(long, value_parser = parse_volume_size)]
        size: u64,
    },
}

#[derive(clap::Subcommand)]
pub enum KubeletCmd {
    /// NodeStageVolume: attach the volume (loop device, or its owner's NBD
    /// export when --context names one) and, unless --block, format it when
    /// blank and mount it at --staging-path.
    Stage {
        /// The volume's ID.
        volume: String,
        /// Folder to mount the filesystem at (it must exist).
        #[arg(long)]
        staging_path: String,
        /// publish_context entries, k=v, as ControllerPublishVolume returned them; repeatable.
        #[arg(long = "context", value_name = "K=V", value_parser = parse_kv)]
        context: Vec<(String, String)>,
        /// Filesystem to make on a blank volume: ext4 or xfs.
        #[arg(long, default_value = "ext4")]
        fs_type: String,
        /// Stage as a raw block device (no filesystem).
        #[arg(long)]
        block: bool,
    },
    /// NodeUnstageVolume: unmount and detach.
    Unstage {
        /// The volume's ID.
        volume: String,
        /// The folder it was staged at.
        #[arg(long)]
        staging_path: String,
    },
    /// NodeExpandVolume: make the node's device and filesystem show the
    /// volume's new size (after ControllerExpandVolume); prints the bytes.
    Expand {
        /// The volume's ID.
        volume: String,
        /// Where the volume is mounted (its staging or publish path).
        #[arg(long)]
        path: String,
        /// The new size with a unit (e.g. 2Gi); left out: whatever it is now.
        #[arg(long, value_parser = parse_volume_size)]
        size: Option<u64>,
    },
}

#[derive(clap::Subcommand)]
pub enum SnapshotCmd {
    /// Snapshot a volume (instant where the pool's filesystem shares blocks: XFS with reflink, btrfs).
    Create {
        /// The snapshot's name; the same name is the same snapshot.
        name: String,
        /// The volume to snapshot (its name or ID).
        #[arg(long)]
        volume: String,
    },
    /// List snapshots. Without --all, only ready ones.
    List {
        /// Only snapshots of this volume (its name or ID).
        #[arg(long)]
        volume: Option<String>,
        /// Also snapshots being made, being deleted, or failed.
        #[arg(long)]
        all: bool,
    },
    /// Show one snapshot.
    Get {
        /// The snapshot's name or ID.
        snapshot: String,
    },
    /// Delete a snapshot. Volumes restored from it stay.
    Delete {
        /// The snapshot's name or ID.
        snapshot: String,
    },
}

#[derive(clap::Subcommand)]
pub enum NodeCmd {
    /// Every node with its zone, health, pool size, free and promised space, and the largest volume it takes now.
    List,
    /// Move every volume off a node: it takes no new volumes, and the
    /// controller migrates its zone volumes, a few at a time, to nodes it
    /// picks (each switches once its pod has left and it is unpublished).
    Evacuate {
        /// The node (see `ctl node list`).
        node: String,
        /// Stop evacuating: the node takes volumes again.
        #[arg(long)]
        stop: bool,
    },
    /// Images quarantined in a node's orphaned/ folder: what the reconciler
    /// found without a record (never deleted automatically), with why and how old.
    Orphans {
        /// The node (see `ctl node list`).
        node: String,
    },
    /// Delete a node's quarantined images older than --older-than (by the
    /// node's own clock). Check `ctl node orphans NODE` first: this is the one
    /// command that deletes data nobody holds a record of.
    PurgeOrphans {
        /// The node (see `ctl node list`).
        node: String,
        /// Only images quarantined at least this long ago: 7d, 12h, 30m, 0 (all).
        #[arg(long, value_parser = parse_age)]
        older_than: u64,
        /// Only show what would be deleted.
        #[arg(long)]
        dry_run: bool,
    },
}

/// `ctl kubelet ...`: one CSI Node call.
async fn kubelet(endpoint: Option<&str>, cmd: KubeletCmd, out: &Out) -> Result<(), String> {
    let mut node = NodeClient::new(channel(endpoint).await?);
    let answer = match cmd {
        KubeletCmd::Stage { volume, staging_path, context, fs_type, block } => {
            let mut capability = capability(block);
            if let Some(csi::volume_capability::AccessType::Mount(m)) = &mut capability.access_type {
                m.fs_type = fs_type;
            }
            let req = csi::NodeStageVolumeRequest {
                volume_id: volume.clone(),
                publish_context: context.into_iter().collect(),
                staging_target_path: staging_path.clone(),
                volume_capability: Some(capability),
                ..Default::default()
            };
            node.node_stage_volume(req).await.map_err(|e| format!("volume {volume:?} was not staged: {}", status_msg(&e)))?;
            json!({"volume": volume, "staged": staging_path})
        }
        KubeletCmd::Unstage { volume, staging_path } => {
            let req = csi::NodeUnstageVolumeRequest { volume_id: volume.clone(), staging_target_path: staging_path.clone() };
            node.node_unstage_volume(req).await.map_err(|e| format!("volume {volume:?} was not unstaged: {}", status_msg(&e)))?;
            json!({"volume": volume, "unstaged": staging_path})
        }
        KubeletCmd::Expand { volume, path, size } => {
            let req = csi::NodeExpandVolumeRequest {
                volume_id: volume.clone(),
                volume_path: path,
                capacity_range: size.map(|s| csi::CapacityRange { required_bytes: s as i64, limit_bytes: 0 }),
                ..Default::default()
            };
            let r = node.node_expand_volume(req).await.map_err(|e| format!("volume {volume:?} was not expanded: {}", status_msg(&e)))?;
            json!({"volume": volume, "capacity_bytes": r.into_inner().capacity_bytes})
        }
    };
    out.show(&answer, |v| {
        let fields: Vec<String> = v
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| format!("{k}: {}", v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())))
            .collect();
        println!("{}", fields.join(", "));
    });
    Ok(())
}

/// An age: a number with a unit (s, m, h, d), or 0. In seconds.
pub fn parse_age(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t == "0" {
        return Ok(0);
    }
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).ok_or_else(|| format!("{s:?} needs a unit: 7d, 12h, 30m or 90s"))?);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not an age like 7d, 12h, 30m or 90s"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("{s:?}: the unit must be s, m, h or d")),
    };
    Ok(n * mult)
}

pub fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| format!("{s:?} is not k=v"))
}

/// A volume size: with a unit, at least 1 MiB.
pub fn parse_volume_size(s: &str) -> Result<u64, String> {
    if s.trim().parse::<f64>().is_ok_and(|n| n == 0.0) {
        return Err("a volume needs a size; the smallest is 1Mi".into());
    }
    let n = parse_size(s)?;
    if n == 0 {
        return Err("a volume needs a size; the smallest is 1Mi".into());
    }
    if n < MIN_SIZE {
        return Err(format!("{s} is below the smallest volume, 1Mi (sizes are whole MiB)"));
    }
    Ok(n)
}

/// The failure of one command, as the user reads it.
fn status_msg(s: &tonic::Status) -> String {
    let code = match s.code() {
        Code::NotFound => "not found",
        Code::InvalidArgument => "invalid",
        Code::AlreadyExists => "already exists",
        Code::ResourceExhausted => "no room",
        Code::OutOfRange => "out of range",
        Code::FailedPrecondition => "not now",
        Code::Unavailable => "unavailable",
        Code::Aborted => "busy, retry",
        _ => "failed",
    };
    format!("{code}: {}", s.message())
}

/// The call may have reached the controller and may have finished there:
/// the connection broke, or the answer did not come in time.
fn outcome_unknown(s: &tonic::Status) -> bool {
    matches!(s.code(), Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded | Code::Internal)
        && (s.message().contains("transport")
            || s.message().contains("connection")
            || s.message().contains("broken pipe")
            || s.code() == Code::DeadlineExceeded
            || s.code() == Code::Cancelled)
}

/// What to say when a create's answer was lost: the volume may or may not exist.
pub fn create_interrupted(kind: &str, name: &str, s: &tonic::Status) -> String {
    format!(
        "the connection to cinderblock broke while creating {kind} {name:?} ({}). The {kind} may or may not exist: \
         check with `cinderblock ctl {kind} get {name}` once cinderblock answers again. Running the same create \
         again is safe: the name makes it idempotent, so it finishes or returns the one {kind}.",
        s.message()
    )
}

struct Clients {
    csi: ControllerClient<Channel>,
    admin: AdminClient<Channel>,
}

async fn connect(endpoint: Option<&str>) -> Result<Clients, String> {
    let channel = channel(endpoint).await?;
    Ok(Clients { csi: ControllerClient::new(channel.clone()), admin: AdminClient::new(channel) })
}

async fn channel(endpoint: Option<&str>) -> Result<Channel, String> {
    let endpoint = endpoint.ok_or("say where cinderblock listens: --endpoint unix:///path/to/csi.sock (or set CSI_ENDPOINT)")?;
    let path = cinderblock::server::unix_endpoint_path(endpoint)?;
    if !path.exists() {
        return Err(format!("no socket at {}; is cinderblock running with --endpoint {endpoint}?", path.display()));
    }
    let channel = Endpoint::from_shared(endpoint.to_string())
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("cannot reach {endpoint}: {e}; is cinderblock running there?"))?;
    Ok(channel)
}

fn capability(block: bool) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(if block {
            csi::volume_capability::AccessType::Block(csi::volume_capability::BlockVolume {})
        } else {
            csi::volume_capability::AccessType::Mount(csi::volume_capability::MountVolume::default())
        }),
        access_mode: Some(csi::volume_capability::AccessMode { mode: csi::volume_capability::access_mode::Mode::SingleNodeWriter as i32 }),
    }
}

impl Clients {
    async fn volume(&mut self, r: &str) -> Result<admin::GetVolumeResponse, String> {
        match self.admin.get_volume(admin::GetVolumeRequest { volume: r.to_string() }).await {
            Ok(v) => Ok(v.into_inner()),
            Err(e) if e.code() == Code::NotFound => Err(format!("no such volume {r:?}; `cinderblock ctl volume list --all` lists them")),
            Err(e) => Err(status_msg(&e)),
        }
    }

    async fn snapshot(&mut self, r: &str) -> Result<admin::Snapshot, String> {
        match self.admin.get_snapshot(admin::GetSnapshotRequest { snapshot: r.to_string() }).await {
            Ok(v) => v.into_inner().snapshot.ok_or_else(|| "the answer held no snapshot".into()),
            Err(e) if e.code() == Code::NotFound => {
                Err(format!("no such snapshot {r:?}; `cinderblock ctl snapshot list --all` lists them"))
            }
            Err(e) => Err(status_msg(&e)),
        }
    }

    /// ID → name of every volume and snapshot, to show sources by name.
    async fn names(&mut self) -> Result<HashMap<String, String>, String> {
        let vols = self.admin.list_volumes(admin::ListVolumesRequest::default()).await.map_err(|e| status_msg(&e))?.into_inner();
        let snaps = self.admin.list_snapshots(admin::ListSnapshotsRequest::default()).await.map_err(|e| status_msg(&e))?.into_inner();
        Ok(vols.volumes.into_iter().map(|v| (v.id, v.name)).chain(snaps.snapshots.into_iter().map(|s| (s.id, s.name))).collect())
    }

    async fn nodes(&mut self) -> Result<Vec<admin::Node>, String> {
        Ok(self.admin.list_nodes(admin::ListNodesRequest {}).await.map_err(|e| status_msg(&e))?.into_inner().nodes)
    }
}

pub async fn run(args: CtlArgs) -> Result<(), String> {
    let out = Out { json: args.output == "json" };
    let command = match args.command {
        // The node plugin's socket serves no admin API: no `connect`.
        CtlCommand::Kubelet(cmd) => return kubelet(args.endpoint.as_deref(), cmd, &out).await,
        other => other,
    };
    let mut c = connect(args.endpoint.as_deref()).await?;
    match command {
        CtlCommand::Kubelet(_) => unreachable!("answered above"),
        CtlCommand::Volume(VolumeCmd::Create { name, size, from_snapshot, clone, params, block }) => {
            let source = match (from_snapshot, clone) {
                (Some(snap), _) => {
                    let id = c.snapshot(&snap).await?.id;
                    Some(csi::volume_content_source::Type::Snapshot(csi::volume_content_source::SnapshotSource { snapshot_id: id }))
                }
                (None, Some(vol)) => {
                    let id = c.volume(&vol).await?.volume.unwrap_or_default().id;
                    Some(csi::volume_content_source::Type::Volume(csi::volume_content_source::VolumeSource { volume_id: id }))
                }
                _ => None,
            };
            let req = csi::CreateVolumeRequest {
                name: name.clone(),
                capacity_range: size.map(|s| csi::CapacityRange { required_bytes: s as i64, limit_bytes: 0 }),
                volume_capabilities: vec![capability(block)],
                parameters: params.into_iter().collect::<HashMap<_, _>>(),
                volume_content_source: source.map(|t| csi::VolumeContentSource { r#type: Some(t) }),
                ..Default::default()
            };
            match c.csi.create_volume(req).await {
                Ok(_) => {}
                Err(e) if outcome_unknown(&e) => return Err(create_interrupted("volume", &name, &e)),
                Err(e) => return Err(format!("volume {name:?} was not created: {}", status_msg(&e))),
            }
            let v = c.volume(&name).await?.volume.unwrap_or_default();
            let names = c.names().await?;
            out.show(&volume_json(&v, &names), |v| print_table(&VOLUME_HEADERS, &[volume_row(v)]));
        }
        CtlCommand::Volume(VolumeCmd::List { all }) => {
            let phases = if all { vec![] } else { vec![admin::Phase::Available as i32] };
            let r = c.admin.list_volumes(admin::ListVolumesRequest { phases }).await.map_err(|e| status_msg(&e))?.into_inner();
            let names = c.names().await?;
            let list: Vec<Value> = r.volumes.iter().map(|v| volume_json(v, &names)).collect();
            out.show(&json!(list), |_| print_table(&VOLUME_HEADERS, &list.iter().map(volume_row).collect::<Vec<_>>()));
        }
        CtlCommand::Volume(VolumeCmd::Get { volume }) => {
            let r = c.volume(&volume).await?;
            let names = c.names().await?;
            let mut v = volume_json(&r.volume.unwrap_or_default(), &names);
            v["snapshots"] = json!(r.snapshot_ids.iter().map(|id| json!({"id": id, "name": names.get(id)})).collect::<Vec<_>>());
            out.show(&v, |v| {
                print_table(&VOLUME_HEADERS, &[volume_row(v)]);
                if let Some(z) = v["zone"].as_str() {
                    println!("zone: {z}");
                }
                for snap in v["snapshots"].as_array().into_iter().flatten() {
                    println!("snapshot: {} ({})", snap["name"].as_str().unwrap_or("?"), s(snap, "id"));
                }
                if let Some(e) = v["error"].as_str() {
                    println!("error: {e}");
                }
                for a in v["attempts"].as_array().into_iter().flatten() {
                    println!("attempt on {}: {}", s(a, "node"), s(a, "error"));
                }
                if v["migration"].is_object() {
                    println!("{}", migration_line(&v["migration"]));
                }
            });
        }
        CtlCommand::Volume(VolumeCmd::Migrate { volume, to, cancel, allow_topology_change, wait }) => {
            let req = admin::MigrateVolumeRequest {
                volume: volume.clone(),
                to_node: to.clone().unwrap_or_default(),
                cancel,
                allow_topology_change,
            };
            let what = if cancel { "cancelled" } else { "migrated" };
            let v = c
                .admin
                .migrate_volume(req)
                .await
                .map_err(|e| format!("volume {volume:?} was not {what}: {}", status_msg(&e)))?
                .into_inner()
                .volume
                .unwrap_or_default();
            let mut last = volume_json(&v, &HashMap::new());
            while wait && last["migration"].is_object() {
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                last = volume_json(&c.volume(&v.id).await?.volume.unwrap_or_default(), &HashMap::new());
            }
            out.show(&last, |v| match v["migration"].as_object() {
                Some(_) => println!("{}", migration_line(&v["migration"])),
                None => println!("volume {} ({}) is on node {}", s(v, "name"), s(v, "id"), s(v, "node")),
            });
        }
        CtlCommand::Volume(VolumeCmd::Delete { volume }) => {
            let r = match c.admin.get_volume(admin::GetVolumeRequest { volume: volume.clone() }).await {
                Ok(r) => r.into_inner(),
                Err(e) if e.code() == Code::NotFound => return Err(format!("no such volume {volume:?}; nothing to delete")),
                Err(e) => return Err(status_msg(&e)),
            };
            let v = r.volume.unwrap_or_default();
            c.csi
                .delete_volume(csi::DeleteVolumeRequest { volume_id: v.id.clone(), ..Default::default() })
                .await
                .map_err(|e| format!("volume {} ({}) was not deleted: {}", v.name, v.id, status_msg(&e)))?;
            let kept = r.snapshot_ids.len();
            out.show(&json!({"deleted": {"name": v.name, "id": v.id}, "snapshots_kept": r.snapshot_ids}), |_| {
                println!("volume {} ({}) deleted", v.name, v.id);
                if kept > 0 {
                    println!(
                        "its {kept} snapshot(s) stay: they are independent copies (`cinderblock ctl snapshot list --volume {}`)",
                        v.id
                    );
                }
            });
        }
        CtlCommand::Volume(VolumeCmd::Expand { volume, size }) => {
            let v = c.volume(&volume).await?.volume.unwrap_or_default();
            if size < v.size_bytes {
                return Err(format!(
                    "volume {} is {}; {} would shrink it, and volumes only grow",
                    v.name,
                    format_bytes(v.size_bytes),
                    format_bytes(size)
                ));
            }
            if size.div_ceil(MIN_SIZE) * MIN_SIZE == v.size_bytes {
                out.show(&json!({"name": v.name, "id": v.id, "size_bytes": v.size_bytes, "size": format_bytes(v.size_bytes)}), |_| {
                    println!("volume {} is {} already; nothing to do", v.name, format_bytes(v.size_bytes))
                });
                return Ok(());
            }
            let r = c
                .csi
                .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                    volume_id: v.id.clone(),
                    capacity_range: Some(csi::CapacityRange { required_bytes: size as i64, limit_bytes: 0 }),
                    ..Default::default()
                })
                .await
                .map_err(|e| {
                    format!(
                        "volume {} stays {}: growing it to {} failed: {}",
                        v.name,
                        format_bytes(v.size_bytes),
                        format_bytes(size),
                        status_msg(&e)
                    )
                })?
                .into_inner();
            let now = r.capacity_bytes as u64;
            out.show(&json!({"name": v.name, "id": v.id, "size_bytes": now, "size": format_bytes(now)}), |_| {
                println!("volume {} grew from {} to {}", v.name, format_bytes(v.size_bytes), format_bytes(now))
            });
        }
        CtlCommand::Snapshot(SnapshotCmd::Create { name, volume }) => {
            let v = c.volume(&volume).await?.volume.unwrap_or_default();
            match c
                .csi
                .create_snapshot(csi::CreateSnapshotRequest { source_volume_id: v.id, name: name.clone(), ..Default::default() })
                .await
            {
                Ok(_) => {}
                Err(e) if outcome_unknown(&e) => return Err(create_interrupted("snapshot", &name, &e)),
                Err(e) => return Err(format!("snapshot {name:?} was not created: {}", status_msg(&e))),
            }
            let snap = snapshot_json(&c.snapshot(&name).await?);
            out.show(&snap, |s| print_table(&SNAPSHOT_HEADERS, &[snapshot_row(s)]));
        }
        CtlCommand::Snapshot(SnapshotCmd::List { volume, all }) => {
            let volume = match volume {
                Some(v) => c.volume(&v).await.map(|r| r.volume.unwrap_or_default().id).unwrap_or(v),
                None => String::new(),
            };
            let phases = if all { vec![] } else { vec![admin::Phase::Available as i32] };
            let r = c.admin.list_snapshots(admin::ListSnapshotsRequest { phases, volume }).await.map_err(|e| status_msg(&e))?.into_inner();
            let list: Vec<Value> = r.snapshots.iter().map(snapshot_json).collect();
            out.show(&json!(list), |_| print_table(&SNAPSHOT_HEADERS, &list.iter().map(snapshot_row).collect::<Vec<_>>()));
        }
        CtlCommand::Snapshot(SnapshotCmd::Get { snapshot }) => {
            let snap = snapshot_json(&c.snapshot(&snapshot).await?);
            out.show(&snap, |s| {
                print_table(&SNAPSHOT_HEADERS, &[snapshot_row(s)]);
                if let Some(e) = s["error"].as_str() {
                    println!("error: {e}");
                }
            });
        }
        CtlCommand::Snapshot(SnapshotCmd::Delete { snapshot }) => {
            let snap = match c.admin.get_snapshot(admin::GetSnapshotRequest { snapshot: snapshot.clone() }).await {
                Ok(r) => r.into_inner().snapshot.unwrap_or_default(),
                Err(e) if e.code() == Code::NotFound => return Err(format!("no such snapshot {snapshot:?}; nothing to delete")),
                Err(e) => return Err(status_msg(&e)),
            };
            c.csi
                .delete_snapshot(csi::DeleteSnapshotRequest { snapshot_id: snap.id.clone(), ..Default::default() })
                .await
                .map_err(|e| format!("snapshot {} ({}) was not deleted: {}", snap.name, snap.id, status_msg(&e)))?;
            out.show(&json!({"deleted": {"name": snap.name, "id": snap.id}}), |_| println!("snapshot {} ({}) deleted", snap.name, snap.id));
        }
        CtlCommand::Node(NodeCmd::List) => {
            let list: Vec<Value> = c.nodes().await?.iter().map(node_json).collect();
            out.show(&json!(list), |_| {
                print_table(&NODE_HEADERS, &list.iter().map(node_row).collect::<Vec<_>>());
                if list.is_empty() {
                    println!("no node has registered yet");
                }
            });
        }
        CtlCommand::Node(NodeCmd::Evacuate { node, stop }) => {
            let n = c
                .admin
                .evacuate_node(admin::EvacuateNodeRequest { node: node.clone(), stop })
                .await
                .map_err(|e| status_msg(&e))?
                .into_inner()
                .node
                .unwrap_or_default();
            out.show(&node_json(&n), |_| {
                if stop {
                    println!("node {node} takes volumes again (migrations already started go on)");
                } else {
                    println!("node {node} is being evacuated: no new volumes; its zone volumes migrate away");
                }
            });
        }
        CtlCommand::Node(NodeCmd::Orphans { node }) => {
            let list = c
                .admin
                .list_orphans(admin::ListOrphansRequest { node: node.clone() })
                .await
                .map_err(|e| status_msg(&e))?
                .into_inner()
                .orphans;
            out.show(&json!(list.iter().map(orphan_json).collect::<Vec<_>>()), |_| {
                if list.is_empty() {
                    println!("node {node} keeps no quarantined images");
                } else {
                    print_orphans(&list);
                }
            });
        }
        CtlCommand::Node(NodeCmd::PurgeOrphans { node, older_than, dry_run }) => {
            let purged = c
                .admin
                .purge_orphans(admin::PurgeOrphansRequest { node: node.clone(), older_than_seconds: older_than, dry_run })
                .await
                .map_err(|e| status_msg(&e))?
                .into_inner()
                .purged;
            out.show(&json!({"dry_run": dry_run, "purged": purged.iter().map(orphan_json).collect::<Vec<_>>()}), |_| {
                let bytes: u64 = purged.iter().map(|o| o.allocated_bytes).sum();
                if purged.is_empty() {
                    println!("nothing on node {node} is older than {}", format_age(older_than));
                } else {
                    print_orphans(&purged);
                    let verb = if dry_run { "would delete" } else { "deleted" };
                    println!("{verb} {} quarantined image(s) holding {} on node {node}", purged.len(), format_bytes(bytes));
                }
            });
        }
        CtlCommand::Capacity { params, zone, node } => {
            let nodes = c.nodes().await?;
            let mut segments = HashMap::new();
            if let Some(z) = zone {
                if !nodes.iter().any(|n| n.zone == z) {
                    let mut zones: Vec<&str> = nodes.iter().map(|n| n.zone.as_str()).filter(|z| !z.is_empty()).collect();
                    zones.sort();
                    zones.dedup();
                    return Err(format!(
                        "no node is in zone {z:?}; zones: {}",
                        if zones.is_empty() { "none".into() } else { zones.join(", ") }
                    ));
                }
                segments.insert(cinderblock::TOPOLOGY_ZONE_KEY.to_string(), z);
            }
            if let Some(n) = node {
                if !nodes.iter().any(|x| x.id == n) {
                    return Err(format!("no node is called {n:?}; `cinderblock ctl node list` lists them"));
                }
                segments.insert(cinderblock::TOPOLOGY_NODE_KEY.to_string(), n);
            }
            let r = c
                .csi
                .get_capacity(csi::GetCapacityRequest {
                    parameters: params.into_iter().collect(),
                    accessible_topology: (!segments.is_empty()).then_some(csi::Topology { segments }),
                    ..Default::default()
                })
                .await
                .map_err(|e| status_msg(&e))?
                .into_inner();
            let bytes = r.available_capacity.max(0) as u64;
            out.show(
                &json!({"available_bytes": bytes, "available": format_bytes(bytes), "maximum_volume_size": r.maximum_volume_size}),
                |_| println!("largest volume that fits now: {}", format_bytes(bytes)),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_sizes_need_a_unit_and_at_least_a_mib() {
        assert!(parse_volume_size("0").unwrap_err().contains("smallest is 1Mi"));
        assert!(parse_volume_size("0Gi").unwrap_err().contains("smallest is 1Mi"));
        assert!(parse_volume_size("1").unwrap_err().contains("no unit"));
        assert!(parse_volume_size("4096B").unwrap_err().contains("below the smallest volume"));
        assert_eq!(parse_volume_size("1.5Gi").unwrap(), 3 << 29);
        assert_eq!(parse_volume_size("1Mi").unwrap(), 1 << 20);
    }

    #[test]
    fn every_argument_and_command_has_help() {
        use clap::Args;
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                if a.get_help().is_none() && !matches!(a.get_id().as_str(), "help" | "version") {
                    missing.push(format!("{path} {}", a.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() {
                    missing.push(format!("{path} {}", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let cmd = CtlArgs::augment_args(clap::Command::new("ctl"));
        let mut missing = vec![];
        walk(&cmd, "ctl", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:?}");
    }

    #[test]
    fn times_print_as_utc_dates() {
        assert_eq!(time_of(0), "1970-01-01 00:00:00Z");
        assert_eq!(time_of(1_700_000_000_000), "2023-11-14 22:13:20Z");
        assert_eq!(time_of(951_782_400_000), "2000-02-29 00:00:00Z");
    }

    #[test]
    fn a_broken_connection_during_create_says_the_volume_may_exist() {
        let s = tonic::Status::unknown("transport error");
        assert!(outcome_unknown(&s));
        let m = create_interrupted("volume", "data", &s);
        assert!(m.contains("may or may not exist") && m.contains("cinderblock ctl volume get data"), "{m}");
        assert!(!outcome_unknown(&tonic::Status::resource_exhausted("no node can take it")));
    }
}
