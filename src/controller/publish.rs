//! Publishing a volume to a node (CSI ControllerPublish/Unpublish; Cinder's
//! `create_export` + `initialize_connection`): on its own node nothing is
//! exported and `publish_context` says so; on another node of its zone (a
//! volume with `accessibility: zone`) the owner's agent exports it over NBD
//! to that node only, and `publish_context` carries where and what. Each
//! publication is a record (`ExportRec`, the BlockExport resource), written
//! before the owner acts, so a controller restart finds it, and removed
//! only after the owner stopped serving.
//!
//! An export admits the consumer's certificate over TLS. A consumer whose
//! StorageNode says its kernel NBD engine has no kernel TLS (`attach_tls:
//! plain`) cannot speak TLS on that path: its export also admits the
//! consumer's address (from its agent address) in plain text, and
//! `publish_context` says so (docs/nbd.md).

use std::collections::BTreeMap;

use tracing::info;

use super::error::ControllerError;
use super::manager::Manager;
use super::records::*;
use crate::agent_proto as pb;
use crate::attach::nbd::{
    CONTEXT_ADDRESS, CONTEXT_EXPORT, CONTEXT_OWNER, CONTEXT_TLS, CONTEXT_TLS_PLAIN_ALLOWED, CONTEXT_TRANSPORT, ENGINE_KERNEL, TLS_PLAIN,
    TRANSPORT_NBD,
};
use crate::store::{self, Kind};

/// `publish_context` transport value for a volume used on its own node.
pub const TRANSPORT_LOCAL: &str = "local";

/// What ControllerPublishVolume asks.
#[derive(Debug, Clone)]
pub struct Publish {
    pub volume_id: String,
    pub node_id: String,
    pub read_only: bool,
    /// A single-node access mode: the volume may be published to one node at a time.
    pub single_node: bool,
}

fn context_of(rec: &ExportRec) -> BTreeMap<String, String> {
    let mut c = BTreeMap::new();
    if rec.protocol == TRANSPORT_NBD {
        c.insert(CONTEXT_TRANSPORT.to_string(), TRANSPORT_NBD.to_string());
        c.insert(CONTEXT_ADDRESS.to_string(), rec.address.clone());
        c.insert(CONTEXT_EXPORT.to_string(), rec.export_name.clone());
        c.insert(CONTEXT_OWNER.to_string(), rec.owner_node.clone());
        if rec.plain_text {
            c.insert(CONTEXT_TLS.to_string(), CONTEXT_TLS_PLAIN_ALLOWED.to_string());
        }
    } else {
        c.insert(CONTEXT_TRANSPORT.to_string(), TRANSPORT_LOCAL.to_string());
    }
    c
}

/// The address a consumer without kernel TLS connects from, when it needs
/// one: `None` for a consumer that speaks TLS.
fn plain_text_address(consumer: &NodeRec) -> Result<Option<std::net::IpAddr>, ControllerError> {
    if consumer.attach_engine != ENGINE_KERNEL || consumer.attach_tls != TLS_PLAIN {
        return Ok(None);
    }
    let host = consumer.agent_address.split("://").last().unwrap_or_default();
    let host = host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host).trim_start_matches('[').trim_end_matches(']');
    host.parse().map(Some).map_err(|_| ControllerError::NodeUnfit {
        node: consumer.id.clone(),
        why: format!(
            "attaches with kernel NBD without kernel TLS, so its export must admit its address in plain text, \
             but its agent address {:?} names no IP address; advertise the agent by IP (--agent-advertise) or load the \
             tls module on that node",
            consumer.agent_address
        ),
    })
}

impl Manager {
    /// Every publication of a volume.
    pub async fn publications(&self, volume_id: &str) -> Result<Vec<ExportRec>, ControllerError> {
        Ok(self.publications_versioned(volume_id).await?.into_iter().map(|(e, _)| e).collect())
    }

    /// Every publication of a volume, as stored, with its version (to
    /// change it): the IDs from the publications index
    /// (`Publications::read`), each record then read from the store.
    async fn publications_versioned(&self, volume_id: &str) -> Result<Vec<(ExportRec, u64)>, ControllerError> {
        let mut out = Vec::new();
        for e in self.publication_index.read(&*self.store, Some(&[volume_id])).await?.remove(volume_id).unwrap_or_default() {
            if let Some(stored) = store::get_json::<ExportRec>(&*self.store, Kind::Export, &e.id).await? {
                out.push(stored);
            }
        }
        Ok(out)
    }

    pub async fn publish_volume(&self, p: Publish) -> Result<BTreeMap<String, String>, ControllerError> {
        self.wait_leader().await?;
        let m = self.clone();
        self.detached(async move { m.publish_now(p).await }).await
    }

    async fn publish_now(&self, p: Publish) -> Result<BTreeMap<String, String>, ControllerError> {
        let _guard = self.inflight.acquire(&p.volume_id).await;
        let (vol, _) = self.volume(&p.volume_id).await?.ok_or_else(|| ControllerError::not_found("volume", &p.volume_id))?;
        // A volume coming back into use while a live migration has a full
        // copy on its target (a drain: the pod was evicted, its volume
        // released, and its new pod wants it): refused until the switch,
        // which the migration makes at the end of its current pass because
        // nothing is published, so the new pod uses the new node rather than
        // the old one (which would hold the migration off while it runs).
        // A migration that is held up (a problem noted) does not hold the
        // volume back.
        if let Some(m) =
            vol.migration.as_ref().filter(|m| m.phase == MigrationPhase::Copying && m.live && m.pass > 1 && m.problem.is_none())
        {
            if self.publications(&vol.id).await?.is_empty() {
                self.ensure_migration_driver(&vol.id);
                let (volume, to, phase) = (vol.id.clone(), m.to.clone(), m.phase);
                return Err(ControllerError::Migrating { volume, to, phase, then: "it switches at the end of its current pass" });
            }
        }
        if let Some(m) = vol.migration.as_ref().filter(|m| m.phase == MigrationPhase::Switching) {
            // The last pass is being copied (or a restarted controller has
            // not resumed it yet): a write to the source now would be lost.
            let (volume, to, phase) = (vol.id.clone(), m.to.clone(), m.phase);
            return Err(ControllerError::Migrating { volume, to, phase, then: "its last pass is being copied, then it switches" });
        }
        let (Phase::Available, Some(owner)) = (vol.phase, vol.node.clone()) else {
            let what = format!("volume {}", vol.id);
            return Err(ControllerError::NotAvailable { what, phase: vol.phase, then: "only an Available volume can be published" });
        };
        let (consumer, _) = self.node(&p.node_id).await?.ok_or_else(|| ControllerError::NodeNotFound { node: p.node_id.clone() })?;
        // Where it may go at all comes first: a node it can never reach is
        // told so, whoever holds the volume now.
        if p.node_id != owner {
            let owner_zone = self.node(&owner).await?.map(|(n, _)| n.zone).unwrap_or_default();
            let reachable = vol.accessibility == Accessibility::Zone && !owner_zone.is_empty() && consumer.zone == owner_zone;
            if !reachable {
                let why = match vol.accessibility {
                    Accessibility::Node => format!("its StorageClass gives it accessibility: node, so only node {owner} can use it"),
                    Accessibility::Zone => {
                        format!("it is accessible from zone {owner_zone:?} only, and node {} is in zone {:?}", p.node_id, consumer.zone)
                    }
                };
                return Err(ControllerError::TopologyUnmet(format!("volume {} cannot be published to node {}: {why}", vol.id, p.node_id)));
            }
        }
        let id = export_id_for(&p.volume_id, &p.node_id);
        let others: Vec<ExportRec> = self.publications(&p.volume_id).await?.into_iter().filter(|e| e.node_id != p.node_id).collect();
        if p.single_node {
            if let Some(o) = others.first() {
                let why = "its access mode allows one node at a time".into();
                return Err(ControllerError::InUse { volume: vol.id.clone(), nodes: vec![o.node_id.clone()], why });
            }
        }
        if let Some((rec, version)) = store::get_json::<ExportRec>(&*self.store, Kind::Export, &id).await? {
            if rec.read_only != p.read_only {
                return Err(ControllerError::PublishedOtherwise { volume: vol.id, node: p.node_id, read_only: rec.read_only });
            }
            if rec.phase == Phase::Available {
                return Ok(context_of(&rec));
            }
            // Creating (interrupted) or Deleting: finish the export below.
            return self.export(rec, version).await;
        }
        let rec = ExportRec {
            id: id.clone(),
            volume_id: vol.id.clone(),
            node_id: p.node_id.clone(),
            protocol: if p.node_id == owner { TRANSPORT_LOCAL.into() } else { TRANSPORT_NBD.into() },
            address: String::new(),
            export_name: String::new(),
            phase: if p.node_id == owner { Phase::Available } else { Phase::Creating },
            owner_node: owner.clone(),
            read_only: p.read_only,
            plain_text: p.node_id != owner && plain_text_address(&consumer)?.is_some(),
        };
        // The record first: a controller restart then knows an export may exist.
        let version = store::create_json(&*self.store, Kind::Export, &id, &rec).await?;
        if rec.protocol == TRANSPORT_LOCAL {
            info!(volume.id = %vol.id, node = %p.node_id, "volume published on its own node");
            return Ok(context_of(&rec));
        }
        self.export(rec, version).await
    }

    /// Have the owner export the volume to the consumer and record where.
    async fn export(&self, mut rec: ExportRec, version: u64) -> Result<BTreeMap<String, String>, ControllerError> {
        if rec.protocol == TRANSPORT_LOCAL {
            rec.phase = Phase::Available;
            store::update_json(&*self.store, Kind::Export, &rec.id, &rec, version).await?;
            return Ok(context_of(&rec));
        }
        let plain_from = if rec.plain_text {
            let (consumer, _) =
                self.node(&rec.node_id).await?.ok_or_else(|| ControllerError::NodeNotFound { node: rec.node_id.clone() })?;
            let address = plain_text_address(&consumer)?.ok_or_else(|| ControllerError::NodeUnfit {
                node: rec.node_id.clone(),
                why: format!(
                    "was published to in plain text but now reports attach_tls {:?}; unpublish and publish again",
                    consumer.attach_tls
                ),
            })?;
            vec![address.to_string()]
        } else {
            vec![]
        };
        let mut agent = self.agent_for(&rec.owner_node).await?;
        let made = agent
            .create_export(pb::CreateExportRequest {
                volume_id: rec.volume_id.clone(),
                consumer_node: rec.node_id.clone(),
                read_only: rec.read_only,
                plain_from,
                ..Default::default()
            })
            .await
            .map_err(ControllerError::during(format!("node {} could not export volume {}", rec.owner_node, rec.volume_id)))?
            .export
            .ok_or(ControllerError::IncompleteAnswer("an export"))?;
        rec.address = made.address;
        rec.export_name = made.export_name;
        rec.phase = Phase::Available;
        store::update_json(&*self.store, Kind::Export, &rec.id, &rec, version).await?;
        if rec.plain_text {
            tracing::warn!(volume.id = %rec.volume_id, owner = %rec.owner_node, consumer = %rec.node_id, address = %rec.address, "volume exported over NBD admitting the consumer's address in PLAIN TEXT: its kernel has no kernel TLS");
        } else {
            info!(volume.id = %rec.volume_id, owner = %rec.owner_node, consumer = %rec.node_id, address = %rec.address, "volume exported over NBD");
        }
        Ok(context_of(&rec))
    }

    pub async fn unpublish_volume(&self, volume_id: &str, node_id: &str) -> Result<(), ControllerError> {
        self.wait_leader().await?;
        let (m, v, n) = (self.clone(), volume_id.to_string(), node_id.to_string());
        self.detached(async move { m.unpublish_now(&v, &n).await }).await
    }

    async fn unpublish_now(&self, volume_id: &str, node_id: &str) -> Result<(), ControllerError> {
        let _guard = self.inflight.acquire(volume_id).await;
        let targets: Vec<(ExportRec, u64)> = if node_id.is_empty() {
            // No node: unpublish everywhere (CSI allows it).
            self.publications_versioned(volume_id).await?
        } else {
            store::get_json::<ExportRec>(&*self.store, Kind::Export, &export_id_for(volume_id, node_id)).await?.into_iter().collect()
        };
        for (mut rec, mut version) in targets {
            if rec.phase != Phase::Deleting {
                rec.phase = Phase::Deleting;
                version = store::update_json(&*self.store, Kind::Export, &rec.id, &rec, version).await?;
            }
            if rec.protocol == TRANSPORT_NBD {
                let mut agent = self.agent_for(&rec.owner_node).await?;
                agent
                    .delete_export(pb::DeleteExportRequest {
                        volume_id: rec.volume_id.clone(),
                        consumer_node: rec.node_id.clone(),
                        force: false,
                        ..Default::default()
                    })
                    .await
                    .map_err(ControllerError::unfinished_unless_refused(format!(
                        "node {} still serves volume {} to node {}",
                        rec.owner_node, rec.volume_id, rec.node_id
                    )))?;
            }
            self.store.delete(Kind::Export, &rec.id, Some(version)).await?;
            info!(volume.id = %rec.volume_id, node = %rec.node_id, protocol = %rec.protocol, "volume unpublished");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn node(engine: &str, tls: &str, agent: &str) -> NodeRec {
        let mut n: NodeRec = serde_json::from_value(serde_json::json!({
            "id": "con", "zone": "z", "agent_address": agent,
            "capacity": {"total": 1, "free": 1, "provisioned": 0, "max_over_subscription_ratio": 1.0, "reserved_percentage": 0},
            "volume_count": 0, "snapshot_count": 0, "max_volumes": 0, "reflink": false, "filesystem": "ext4", "heartbeat_ms": 0
        }))
        .unwrap();
        (n.attach_engine, n.attach_tls) = (engine.into(), tls.into());
        n
    }

    #[test]
    fn only_a_kernel_engine_without_kernel_tls_gets_plain_text_from_its_agent_ip() {
        let ip = |n: &NodeRec| plain_text_address(n).map_err(|e| e.code());
        assert_eq!(ip(&node("kernel-nbd", "plain", "https://10.0.0.7:9810")), Ok(Some("10.0.0.7".parse().unwrap())));
        assert_eq!(ip(&node("kernel-nbd", "plain", "https://[fd00::7]:9810")), Ok(Some("fd00::7".parse().unwrap())));
        assert_eq!(ip(&node("kernel-nbd", "kernel-tls", "https://10.0.0.7:9810")), Ok(None));
        assert_eq!(ip(&node("fuse-nbd", "userspace-tls", "https://10.0.0.7:9810")), Ok(None));
        assert_eq!(ip(&node("", "", "https://10.0.0.7:9810")), Ok(None), "a node that reports nothing gets TLS");
        assert_eq!(
            ip(&node("kernel-nbd", "plain", "https://node-7.example:9810")),
            Err(Code::FailedPrecondition),
            "a host name is no address"
        );
    }
}
