//! `cinderblock ctl`: a CSI client for people. Tables by default, JSON for scripts.

use std::collections::HashMap;

use serde_json::json;
use tonic::transport::{Channel, Endpoint};

use crate::csi;
use crate::csi::controller_client::ControllerClient;

#[derive(clap::Subcommand)]
pub enum CtlCommand {
    /// Volumes: create, list, get, delete, expand.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Snapshots: create, list, delete.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Largest volume that fits now (GetCapacity), optionally in one zone or node.
    Capacity {
        /// StorageClass-style parameters, k=v (e.g. provisioning=thick).
        #[arg(long = "param", value_parser = parse_kv)]
        params: Vec<(String, String)>,
        /// Only nodes of this zone.
        #[arg(long)]
        zone: Option<String>,
        /// Only this node.
        #[arg(long)]
        node: Option<String>,
    },
}

#[derive(clap::Subcommand)]
pub enum VolumeCmd {
    /// Create a volume (blank, from a snapshot, or as a clone).
    Create {
        /// The volume's name (the idempotency key: the same name is the same volume).
        name: String,
        /// Size, e.g. 10Gi, 512Mi, or bytes. A restore or clone defaults to its source's size.
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Restore from this snapshot ID.
        #[arg(long, conflicts_with = "clone")]
        from_snapshot: Option<String>,
        /// Clone this volume ID.
        #[arg(long)]
        clone: Option<String>,
        /// Parameters as a StorageClass gives them: provisioning=thin|thick, placement=spread|stack.
        #[arg(long = "param", value_parser = parse_kv)]
        params: Vec<(String, String)>,
        /// Request a raw block volume instead of a filesystem one.
        #[arg(long)]
        block: bool,
    },
    /// List volumes.
    List,
    /// Show one volume (ControllerGetVolume).
    Get { id: String },
    /// Delete a volume (gone already is fine).
    Delete { id: String },
    /// Grow a volume.
    Expand {
        id: String,
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
}

#[derive(clap::Subcommand)]
pub enum SnapshotCmd {
    /// Snapshot a volume.
    Create {
        /// The snapshot's name (the idempotency key).
        name: String,
        /// ID of the volume to snapshot.
        #[arg(long)]
        volume: String,
    },
    /// List snapshots, optionally of one volume.
    List {
        #[arg(long)]
        volume: Option<String>,
    },
    /// Delete a snapshot (gone already is fine).
    Delete { id: String },
}

pub fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())).ok_or_else(|| format!("{s:?} is not k=v"))
}

/// "10Gi", "512Mi", "4Ki", "1G", "1M", or plain bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("{s:?} is not a size like 10Gi, 512Mi or 1048576"))?;
    let mult: u64 = match unit {
        "" => 1,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "K" | "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        _ => return Err(format!("unknown unit {unit:?} in {s:?}; use Ki, Mi, Gi, Ti (or K, M, G, T)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("{s:?} is too large"))
}

pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

async fn connect(endpoint: &str) -> Result<Channel, String> {
    crate::server::unix_endpoint_path(endpoint)?;
    Endpoint::from_shared(endpoint.to_string())
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("cannot reach {endpoint}: {e}; is cinderblock running there?"))
}

fn status_msg(s: tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

fn capability(block: bool) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(if block {
            csi::volume_capability::AccessType::Block(csi::volume_capability::BlockVolume {})
        } else {
            csi::volume_capability::AccessType::Mount(csi::volume_capability::MountVolume::default())
        }),
        access_mode: Some(csi::volume_capability::AccessMode {
            mode: csi::volume_capability::access_mode::Mode::SingleNodeWriter as i32,
        }),
    }
}

fn volume_json(v: &csi::Volume) -> serde_json::Value {
    let source = v.content_source.as_ref().and_then(|s| s.r#type.as_ref()).map(|t| match t {
        csi::volume_content_source::Type::Snapshot(s) => json!({"snapshot": s.snapshot_id}),
        csi::volume_content_source::Type::Volume(v) => json!({"volume": v.volume_id}),
    });
    json!({
        "id": v.volume_id,
        "capacity_bytes": v.capacity_bytes,
        "node": v.volume_context.get("cinderblock.dev/node"),
        "provisioning": v.volume_context.get("cinderblock.dev/provisioning"),
        "source": source,
        "topology": v.accessible_topology.iter().map(|t| &t.segments).collect::<Vec<_>>(),
    })
}

fn snapshot_json(s: &csi::Snapshot) -> serde_json::Value {
    json!({
        "id": s.snapshot_id,
        "source_volume_id": s.source_volume_id,
        "size_bytes": s.size_bytes,
        "ready_to_use": s.ready_to_use,
        "created_unix": s.creation_time.as_ref().map(|t| t.seconds),
    })
}

fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        cells.iter().enumerate().map(|(i, c)| format!("{:<w$}", c, w = widths[i])).collect::<Vec<_>>().join("  ").trim_end().to_string()
    };
    println!("{}", line(headers.iter().map(|h| h.to_string()).collect()));
    for r in rows {
        println!("{}", line(r.clone()));
    }
}

fn volume_row(v: &serde_json::Value) -> Vec<String> {
    let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
    let source = match &v["source"] {
        serde_json::Value::Object(m) => m.iter().map(|(k, v)| format!("{k}:{}", v.as_str().unwrap_or(""))).collect(),
        _ => "-".to_string(),
    };
    vec![s("id"), human(v["capacity_bytes"].as_u64().unwrap_or(0)), s("node"), s("provisioning"), source]
}

fn snapshot_row(s: &serde_json::Value) -> Vec<String> {
    vec![
        s["id"].as_str().unwrap_or("").to_string(),
        s["source_volume_id"].as_str().unwrap_or("").to_string(),
        human(s["size_bytes"].as_u64().unwrap_or(0)),
        s["ready_to_use"].to_string(),
    ]
}

const VOLUME_HEADERS: [&str; 5] = ["ID", "SIZE", "NODE", "PROVISIONING", "SOURCE"];
const SNAPSHOT_HEADERS: [&str; 4] = ["ID", "VOLUME", "SIZE", "READY"];

pub async fn run(endpoint: &str, json_out: bool, cmd: CtlCommand) -> Result<(), String> {
    let mut c = ControllerClient::new(connect(endpoint).await?);
    let out = |value: serde_json::Value, table: &dyn Fn(&serde_json::Value)| {
        if json_out {
            println!("{}", serde_json::to_string_pretty(&value).unwrap_or_default());
        } else {
            table(&value);
        }
    };
    match cmd {
        CtlCommand::Volume(VolumeCmd::Create { name, size, from_snapshot, clone, params, block }) => {
            let source = match (from_snapshot, clone) {
                (Some(s), _) => Some(csi::VolumeContentSource {
                    r#type: Some(csi::volume_content_source::Type::Snapshot(csi::volume_content_source::SnapshotSource { snapshot_id: s })),
                }),
                (None, Some(v)) => Some(csi::VolumeContentSource {
                    r#type: Some(csi::volume_content_source::Type::Volume(csi::volume_content_source::VolumeSource { volume_id: v })),
                }),
                _ => None,
            };
            let r = c
                .create_volume(csi::CreateVolumeRequest {
                    name,
                    capacity_range: size.map(|s| csi::CapacityRange { required_bytes: s as i64, limit_bytes: 0 }),
                    volume_capabilities: vec![capability(block)],
                    parameters: params.into_iter().collect::<HashMap<_, _>>(),
                    volume_content_source: source,
                    ..Default::default()
                })
                .await
                .map_err(status_msg)?
                .into_inner();
            let v = volume_json(&r.volume.unwrap_or_default());
            out(v, &|v| print_table(&VOLUME_HEADERS, &[volume_row(v)]));
        }
        CtlCommand::Volume(VolumeCmd::List) => {
            let mut all = vec![];
            let mut token = String::new();
            loop {
                let r = c
                    .list_volumes(csi::ListVolumesRequest { max_entries: 100, starting_token: token.clone() })
                    .await
                    .map_err(status_msg)?
                    .into_inner();
                all.extend(r.entries.iter().filter_map(|e| e.volume.as_ref()).map(volume_json));
                if r.next_token.is_empty() {
                    break;
                }
                token = r.next_token;
            }
            out(json!(all), &|v| {
                let rows: Vec<_> = v.as_array().map(|a| a.iter().map(volume_row).collect()).unwrap_or_default();
                print_table(&VOLUME_HEADERS, &rows)
            });
        }
        CtlCommand::Volume(VolumeCmd::Get { id }) => {
            let r = c.controller_get_volume(csi::ControllerGetVolumeRequest { volume_id: id }).await.map_err(status_msg)?.into_inner();
            let mut v = volume_json(&r.volume.unwrap_or_default());
            if let Some(cond) = r.status.and_then(|s| s.volume_condition) {
                v["condition"] = json!({"abnormal": cond.abnormal, "message": cond.message});
            }
            out(v, &|v| {
                print_table(&VOLUME_HEADERS, &[volume_row(v)]);
                if let Some(m) = v["condition"]["message"].as_str() {
                    println!("condition: {m}");
                }
            });
        }
        CtlCommand::Volume(VolumeCmd::Delete { id }) => {
            c.delete_volume(csi::DeleteVolumeRequest { volume_id: id.clone(), ..Default::default() }).await.map_err(status_msg)?;
            out(json!({"deleted": id}), &|_| println!("volume {id} deleted"));
        }
        CtlCommand::Volume(VolumeCmd::Expand { id, size }) => {
            let r = c
                .controller_expand_volume(csi::ControllerExpandVolumeRequest {
                    volume_id: id.clone(),
                    capacity_range: Some(csi::CapacityRange { required_bytes: size as i64, limit_bytes: 0 }),
                    ..Default::default()
                })
                .await
                .map_err(status_msg)?
                .into_inner();
            out(json!({"id": id, "capacity_bytes": r.capacity_bytes}), &|_| println!("volume {id} is now {}", human(r.capacity_bytes as u64)));
        }
        CtlCommand::Snapshot(SnapshotCmd::Create { name, volume }) => {
            let r = c
                .create_snapshot(csi::CreateSnapshotRequest { source_volume_id: volume, name, ..Default::default() })
                .await
                .map_err(status_msg)?
                .into_inner();
            let s = snapshot_json(&r.snapshot.unwrap_or_default());
            out(s, &|s| print_table(&SNAPSHOT_HEADERS, &[snapshot_row(s)]));
        }
        CtlCommand::Snapshot(SnapshotCmd::List { volume }) => {
            let mut all = vec![];
            let mut token = String::new();
            loop {
                let r = c
                    .list_snapshots(csi::ListSnapshotsRequest {
                        max_entries: 100,
                        starting_token: token.clone(),
                        source_volume_id: volume.clone().unwrap_or_default(),
                        ..Default::default()
                    })
                    .await
                    .map_err(status_msg)?
                    .into_inner();
                all.extend(r.entries.iter().filter_map(|e| e.snapshot.as_ref()).map(snapshot_json));
                if r.next_token.is_empty() {
                    break;
                }
                token = r.next_token;
            }
            out(json!(all), &|v| {
                let rows: Vec<_> = v.as_array().map(|a| a.iter().map(snapshot_row).collect()).unwrap_or_default();
                print_table(&SNAPSHOT_HEADERS, &rows)
            });
        }
        CtlCommand::Snapshot(SnapshotCmd::Delete { id }) => {
            c.delete_snapshot(csi::DeleteSnapshotRequest { snapshot_id: id.clone(), ..Default::default() }).await.map_err(status_msg)?;
            out(json!({"deleted": id}), &|_| println!("snapshot {id} deleted"));
        }
        CtlCommand::Capacity { params, zone, node } => {
            let mut segments = HashMap::new();
            if let Some(z) = zone {
                segments.insert(crate::TOPOLOGY_ZONE_KEY.to_string(), z);
            }
            if let Some(n) = node {
                segments.insert(crate::TOPOLOGY_NODE_KEY.to_string(), n);
            }
            let r = c
                .get_capacity(csi::GetCapacityRequest {
                    parameters: params.into_iter().collect(),
                    accessible_topology: (!segments.is_empty()).then_some(csi::Topology { segments }),
                    ..Default::default()
                })
                .await
                .map_err(status_msg)?
                .into_inner();
            out(json!({"available_capacity": r.available_capacity, "maximum_volume_size": r.maximum_volume_size}), &|_| {
                println!("largest volume that fits now: {}", human(r.available_capacity as u64))
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn sizes_parse_like_kubernetes_quantities() {
        assert_eq!(parse_size("10Gi").unwrap(), 10 << 30);
        assert_eq!(parse_size("512Mi").unwrap(), 512 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1_000_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("ten").is_err());
        assert!(parse_size("1Qi").is_err());
        assert!(parse_size("99999999999Ti").is_err());
    }
}
