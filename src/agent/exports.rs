//! The node's exports (Cinder's `create_export`): which of its volumes it
//! serves over NBD, to which consuming node, under which export name. Each
//! export is kept as a small record in `<pool>/exports/<name>.json`
//! (written crash-safely before the export is served), so an agent restart
//! serves the same exports under the same names again and a consumer's
//! attachment reconnects to them.
//!
//! Besides a volume published to a node, an export may feed a cross-node
//! copy (`copy_for`: the new volume on the consumer): of a volume or of a
//! snapshot (always read-only), one export per copy, removed when it ends.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tonic::Status;
use tracing::{info, warn};

use crate::agent_proto as pb;
use crate::export::{Access, ExportName, ExportServer, ExportSpec, ImageSource};
use crate::volume::{records, Pool};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct ExportRecord {
    /// The volume, or the snapshot when `snapshot`.
    volume_id: String,
    consumer_node: String,
    export_name: String,
    read_only: bool,
    #[serde(default)]
    snapshot: bool,
    /// The volume on the consumer a copy export feeds; empty for a publication.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    copy_for: String,
    /// Addresses admitted in plain text (a consumer without kernel TLS).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    plain_from: Vec<IpAddr>,
    /// A migration pass's export of a snapshot: served as a layer of what
    /// changed since this older snapshot (recomputed when served again).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    base_snapshot: String,
}

/// What an export serves, to whom, for what: (snapshot?, source ID, consumer, copy_for).
type Key = (bool, String, String, String);

/// Which export a call means.
#[derive(Debug, Clone, Default)]
pub struct ExportOf {
    /// The volume, or the snapshot when `snapshot`.
    pub id: String,
    pub snapshot: bool,
    pub consumer: String,
    /// The volume on the consumer a copy feeds; empty for a publication.
    pub copy_for: String,
    /// A migration pass's snapshot export: the previous pass's snapshot.
    pub base: String,
}

impl ExportOf {
    fn key(&self) -> Key {
        (self.snapshot, self.id.clone(), self.consumer.clone(), self.copy_for.clone())
    }

    /// From a request's fields: a snapshot when `snapshot_id` is set.
    pub fn from_request(volume_id: &str, snapshot_id: &str, consumer: &str, copy_for: &str) -> ExportOf {
        let snapshot = !snapshot_id.is_empty();
        let id = if snapshot { snapshot_id } else { volume_id };
        ExportOf { id: id.to_string(), snapshot, consumer: consumer.to_string(), copy_for: copy_for.to_string(), base: String::new() }
    }
}

impl ExportRecord {
    fn key(&self) -> Key {
        (self.snapshot, self.volume_id.clone(), self.consumer_node.clone(), self.copy_for.clone())
    }

    fn what(&self) -> &'static str {
        if self.snapshot {
            "snapshot"
        } else {
            "volume"
        }
    }
}

pub struct Exports {
    pool: Arc<Pool>,
    server: ExportServer,
    dir: PathBuf,
    /// host:port consumers reach this node's NBD server at.
    address: String,
    /// key -> record; one lock for the whole registry (exports change
    /// rarely, and never in bulk).
    records: Mutex<BTreeMap<Key, ExportRecord>>,
}

impl Exports {
    /// Load the export records of `pool` and serve each again. A record of
    /// a volume that is gone is dropped.
    pub fn open(pool: Arc<Pool>, server: ExportServer, address: String) -> std::io::Result<Exports> {
        let dir = pool.root().join("exports");
        std::fs::create_dir_all(&dir)?;
        let exports = Exports { pool, server, dir, address, records: Mutex::new(BTreeMap::new()) };
        for entry in std::fs::read_dir(&exports.dir)? {
            let path = entry?.path();
            if path.extension().is_none_or(|e| e != "json") {
                let _ = std::fs::remove_file(&path); // a temporary file of an interrupted write
                continue;
            }
            let rec: ExportRecord = match records::read_record(&path) {
                Ok(r) => r,
                Err(e) => {
                    warn!(record = %path.display(), error = %e, "unreadable export record: not served");
                    continue;
                }
            };
            match exports.serve(&rec) {
                Ok(()) => {
                    exports.records().insert(rec.key(), rec);
                }
                Err(e) if e.code() == tonic::Code::NotFound => {
                    warn!(volume = %rec.volume_id, "export of a volume that is gone: dropped");
                    let _ = records::remove_if_exists(&path);
                }
                Err(e) => warn!(volume = %rec.volume_id, error = %e.message(), "export not served again"),
            }
        }
        let n = exports.records().len();
        if n > 0 {
            info!(exports = n, "exports served again after start");
        }
        Ok(exports)
    }

    fn records(&self) -> std::sync::MutexGuard<'_, BTreeMap<Key, ExportRecord>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn serve(&self, rec: &ExportRecord) -> Result<(), Status> {
        let name = ExportName::parse(&rec.export_name).ok_or_else(|| Status::internal("an export record holds a malformed name"))?;
        let file = if rec.snapshot {
            self.pool.get_snapshot(&rec.volume_id).map_err(Status::from)?;
            std::fs::File::open(self.pool.snapshot_image(&rec.volume_id))
                .map_err(|e| Status::internal(format!("opening snapshot {}: {e}", rec.volume_id)))?
        } else if rec.read_only {
            // Read-only exports are served read-only (the server never writes them).
            self.pool.get_volume(&rec.volume_id).map_err(Status::from)?;
            std::fs::File::open(self.pool.volume_image(&rec.volume_id))
                .map_err(|e| Status::internal(format!("opening volume {}: {e}", rec.volume_id)))?
        } else {
            self.pool.open_volume_image(&rec.volume_id).map_err(Status::from)?
        };
        let changes = if rec.base_snapshot.is_empty() {
            None
        } else {
            Some(Arc::new(self.pool.snapshot_changes(&rec.base_snapshot, &rec.volume_id).map_err(Status::from)?))
        };
        let spec = ExportSpec {
            name,
            volume: rec.volume_id.clone(),
            image: ImageSource::File(file),
            read_only: rec.read_only,
            access: Access { node: rec.consumer_node.clone(), plain_from: rec.plain_from.clone() },
            changes,
        };
        self.server.add(spec).map_err(|e| Status::internal(format!("serving volume {}: {e}", rec.volume_id)))?;
        Ok(())
    }

    fn to_pb(&self, rec: &ExportRecord) -> pb::Export {
        let live = ExportName::parse(&rec.export_name).and_then(|n| self.server.list().into_iter().find(|e| e.name == n));
        pb::Export {
            volume_id: rec.volume_id.clone(),
            consumer_node: rec.consumer_node.clone(),
            export_name: rec.export_name.clone(),
            address: self.address.clone(),
            read_only: rec.read_only,
            connections: live.as_ref().map(|e| e.connections as u32).unwrap_or(0),
            size_bytes: live.map(|e| e.size).unwrap_or(0),
            snapshot: rec.snapshot,
            copy_for: rec.copy_for.clone(),
            plain_from: rec.plain_from.iter().map(|a| a.to_string()).collect(),
        }
    }

    /// Serve the volume or snapshot `of` names to its consumer (the same
    /// export when it exists already). A snapshot is served read-only.
    /// `plain_from`: addresses also admitted without TLS (a publication to a
    /// consumer whose kernel has no kernel TLS).
    pub fn create(&self, of: &ExportOf, read_only: bool, plain_from: &[String]) -> Result<pb::Export, Status> {
        let what = if of.snapshot { "snapshot id" } else { "volume id" };
        crate::volume::validate_id(what, &of.id).map_err(Status::from)?;
        if !of.copy_for.is_empty() {
            crate::volume::validate_id("copy_for", &of.copy_for).map_err(Status::from)?;
        }
        crate::tls::node_dns_name(&of.consumer).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let read_only = read_only || of.snapshot;
        let mut plain: Vec<IpAddr> = plain_from
            .iter()
            .map(|a| a.parse().map_err(|_| Status::invalid_argument(format!("plain_from {a:?} is not an IP address"))))
            .collect::<Result<_, _>>()?;
        plain.sort();
        plain.dedup();
        if !plain.is_empty() && !of.copy_for.is_empty() {
            return Err(Status::invalid_argument("a copy export is read over TLS only; plain_from must be empty"));
        }
        let key = of.key();
        if !of.base.is_empty() {
            if !of.snapshot || of.copy_for.is_empty() {
                return Err(Status::invalid_argument("base_snapshot_id goes with a snapshot export that feeds a copy (a migration pass)"));
            }
            crate::volume::validate_id("base snapshot id", &of.base).map_err(Status::from)?;
        }
        if let Some(rec) = self.records().get(&key).cloned() {
            if rec.plain_from != plain {
                return Err(Status::already_exists(format!(
                    "{} {} is exported to node {} admitting {:?} in plain text; unpublish it first",
                    rec.what(),
                    of.id,
                    of.consumer,
                    rec.plain_from
                )));
            }
            if rec.base_snapshot != of.base {
                return Err(Status::already_exists(format!(
                    "snapshot {} is exported to node {} over base {:?} already",
                    of.id, of.consumer, rec.base_snapshot
                )));
            }
            if rec.read_only != read_only {
                return Err(Status::already_exists(format!(
                    "{} {} is exported to node {} {}; unpublish it first",
                    rec.what(),
                    of.id,
                    of.consumer,
                    if rec.read_only { "read-only" } else { "read-write" }
                )));
            }
            return Ok(self.to_pb(&rec));
        }
        if of.snapshot {
            self.pool.get_snapshot(&of.id).map_err(Status::from)?;
        } else {
            self.pool.get_volume(&of.id).map_err(Status::from)?;
        }
        let rec = ExportRecord {
            volume_id: of.id.clone(),
            consumer_node: of.consumer.clone(),
            export_name: ExportName::random().to_string(),
            read_only,
            snapshot: of.snapshot,
            copy_for: of.copy_for.clone(),
            plain_from: plain,
            base_snapshot: of.base.clone(),
        };
        // Durable before it is served: a restart serves it again.
        let path = self.dir.join(format!("{}.json", rec.export_name));
        records::write_record(&path, &rec).map_err(|e| Status::internal(format!("writing export record: {e}")))?;
        if let Err(e) = self.serve(&rec) {
            let _ = records::remove_if_exists(&path);
            return Err(e);
        }
        if rec.plain_from.is_empty() {
            info!(id = %of.id, snapshot = of.snapshot, consumer = %of.consumer, copy_for = %of.copy_for, "exported");
        } else {
            warn!(id = %of.id, consumer = %of.consumer, plain_from = ?rec.plain_from, "exported, admitting the consumer's address in PLAIN TEXT (its kernel has no kernel TLS)");
        }
        let out = self.to_pb(&rec);
        self.records().insert(key, rec);
        Ok(out)
    }

    /// Stop serving what `of` names to its consumer.
    pub fn delete(&self, of: &ExportOf, force: bool) -> Result<(), Status> {
        let key = of.key();
        let Some(rec) = self.records().get(&key).cloned() else { return Ok(()) };
        let current = self.to_pb(&rec);
        if current.connections > 0 && !force {
            return Err(Status::failed_precondition(format!(
                "node {} is still connected to {} {} ({} connection(s)); unstage it there first",
                of.consumer,
                rec.what(),
                of.id,
                current.connections
            )));
        }
        if let Some(name) = ExportName::parse(&rec.export_name) {
            self.server.remove(&name);
        }
        records::remove_if_exists(&self.dir.join(format!("{}.json", rec.export_name)))
            .and_then(|_| records::sync_dir(&self.dir))
            .map_err(|e| Status::internal(format!("removing export record: {e}")))?;
        self.records().remove(&key);
        info!(id = %of.id, snapshot = of.snapshot, consumer = %of.consumer, forced = force, "export removed");
        Ok(())
    }

    pub fn list(&self) -> Vec<pb::Export> {
        let recs: Vec<ExportRecord> = self.records().values().cloned().collect();
        recs.iter().map(|r| self.to_pb(r)).collect()
    }

    /// Nodes a volume (or a snapshot) is exported to (what is being exported
    /// is not deleted).
    pub fn consumers_of(&self, snapshot: bool, id: &str) -> Vec<String> {
        self.records().keys().filter(|(s, v, _, _)| *s == snapshot && v == id).map(|(_, _, c, _)| c.clone()).collect()
    }

    /// The volume grew: serve its new size.
    pub fn refresh(&self, volume: &str) {
        let names: Vec<String> =
            self.records().values().filter(|r| !r.snapshot && r.volume_id == volume).map(|r| r.export_name.clone()).collect();
        for n in names.iter().filter_map(|n| ExportName::parse(n)) {
            self.server.refresh_size(&n);
        }
    }

    pub fn server(&self) -> &ExportServer {
        &self.server
    }
}
