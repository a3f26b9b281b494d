//! The node's exports (Cinder's `create_export`): which of its volumes it
//! serves over NBD, to which consuming node, under which export name. Each
//! export is kept as a small record in `<pool>/exports/<name>.json`
//! (written crash-safely before the export is served), so an agent restart
//! serves the same exports under the same names again and a consumer's
//! attachment reconnects to them.

use std::collections::BTreeMap;
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
    volume_id: String,
    consumer_node: String,
    export_name: String,
    read_only: bool,
}

pub struct Exports {
    pool: Arc<Pool>,
    server: ExportServer,
    dir: PathBuf,
    /// host:port consumers reach this node's NBD server at.
    address: String,
    /// (volume, consumer) -> record; one lock for the whole registry (exports
    /// change rarely, and never in bulk).
    records: Mutex<BTreeMap<(String, String), ExportRecord>>,
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
                    exports.records().insert((rec.volume_id.clone(), rec.consumer_node.clone()), rec);
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

    fn records(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, String), ExportRecord>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn serve(&self, rec: &ExportRecord) -> Result<(), Status> {
        let name = ExportName::parse(&rec.export_name).ok_or_else(|| Status::internal("an export record holds a malformed name"))?;
        let file = if rec.read_only {
            // Read-only exports are served read-only (the server never writes them).
            self.pool.get_volume(&rec.volume_id).map_err(Status::from)?;
            std::fs::File::open(self.pool.volume_image(&rec.volume_id)).map_err(|e| Status::internal(format!("opening volume {}: {e}", rec.volume_id)))?
        } else {
            self.pool.open_volume_image(&rec.volume_id).map_err(Status::from)?
        };
        let spec = ExportSpec {
            name,
            volume: rec.volume_id.clone(),
            image: ImageSource::File(file),
            read_only: rec.read_only,
            access: Access { node: rec.consumer_node.clone(), plain_from: vec![] },
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
        }
    }

    /// Serve `volume` to `consumer` (the same export when it exists already).
    pub fn create(&self, volume: &str, consumer: &str, read_only: bool) -> Result<pb::Export, Status> {
        crate::volume::validate_id("volume id", volume).map_err(Status::from)?;
        crate::tls::node_dns_name(consumer).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let key = (volume.to_string(), consumer.to_string());
        if let Some(rec) = self.records().get(&key).cloned() {
            if rec.read_only != read_only {
                return Err(Status::already_exists(format!(
                    "volume {volume} is exported to node {consumer} {}; unpublish it first",
                    if rec.read_only { "read-only" } else { "read-write" }
                )));
            }
            return Ok(self.to_pb(&rec));
        }
        self.pool.get_volume(volume).map_err(Status::from)?;
        let rec = ExportRecord {
            volume_id: volume.to_string(),
            consumer_node: consumer.to_string(),
            export_name: ExportName::random().to_string(),
            read_only,
        };
        // Durable before it is served: a restart serves it again.
        let path = self.dir.join(format!("{}.json", rec.export_name));
        records::write_record(&path, &rec).map_err(|e| Status::internal(format!("writing export record: {e}")))?;
        if let Err(e) = self.serve(&rec) {
            let _ = records::remove_if_exists(&path);
            return Err(e);
        }
        info!(volume, consumer, "volume exported");
        let out = self.to_pb(&rec);
        self.records().insert(key, rec);
        Ok(out)
    }

    /// Stop serving `volume` to `consumer`.
    pub fn delete(&self, volume: &str, consumer: &str, force: bool) -> Result<(), Status> {
        let key = (volume.to_string(), consumer.to_string());
        let Some(rec) = self.records().get(&key).cloned() else { return Ok(()) };
        let current = self.to_pb(&rec);
        if current.connections > 0 && !force {
            return Err(Status::failed_precondition(format!(
                "node {consumer} is still connected to volume {volume} ({} connection(s)); unstage it there first",
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
        info!(volume, consumer, forced = force, "export removed");
        Ok(())
    }

    pub fn list(&self) -> Vec<pb::Export> {
        let recs: Vec<ExportRecord> = self.records().values().cloned().collect();
        recs.iter().map(|r| self.to_pb(r)).collect()
    }

    /// Nodes `volume` is exported to (a volume being exported is not deleted).
    pub fn consumers_of(&self, volume: &str) -> Vec<String> {
        self.records().keys().filter(|(v, _)| v == volume).map(|(_, c)| c.clone()).collect()
    }

    /// The volume grew: serve its new size.
    pub fn refresh(&self, volume: &str) {
        let names: Vec<String> = self.records().values().filter(|r| r.volume_id == volume).map(|r| r.export_name.clone()).collect();
        for n in names.iter().filter_map(|n| ExportName::parse(n)) {
            self.server.refresh_size(&n);
        }
    }

    pub fn server(&self) -> &ExportServer {
        &self.server
    }
}
