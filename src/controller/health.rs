//! Volume health as the controller sees it (CSI VolumeCondition in
//! ControllerGetVolume and ListVolumes): the record's phase, what the
//! owner's agent says of the image (missing, broken, pool read-only, I/O
//! errors on its NBD export), whether the owner answers at all, and whether
//! each NBD publication is still served. One agent call per node for any
//! number of volumes, about those volumes only. A volume that turns
//! abnormal gets a Warning event on its PVC (`VolumeAbnormal`), once per
//! turn; a recovery a Normal one.
//!
//! ControllerGetVolume asks the nodes at each call. ListVolumes, which a
//! health monitor calls over every volume again and again, answers from the
//! reconciler's last pass (`LastPass`), which looked at every Available
//! volume a moment ago: a page is then a read of the store, not a question
//! to each node. The nodes are still asked about the volumes that pass did
//! not see as they are (made or changed since it began), about those with
//! an NBD publication (whose exports it did not keep), and about every
//! volume when no pass is recent or this replica does not lead.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use futures::future::join_all;
use tracing::{info, warn};

use super::error::{ControllerError, Failure};
use super::manager::Manager;
use super::records::*;
use crate::agent_proto as pb;
use crate::store::{self, Kind};

/// How long a health look waits for a node: a stats or list call must not hang on one node.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub abnormal: bool,
    pub message: String,
}

impl Health {
    fn ok(message: impl Into<String>) -> Health {
        Health { abnormal: false, message: message.into() }
    }
    fn bad(message: impl Into<String>) -> Health {
        Health { abnormal: true, message: message.into() }
    }
}

/// What one node told about its volumes and exports.
struct NodeView {
    /// Volume ID -> the agent's record of it.
    volumes: Result<HashMap<String, pb::Volume>, String>,
    /// (volume, consumer) pairs it serves.
    exports: Option<BTreeSet<(String, String)>>,
}

/// What the controller says of one volume in ControllerGetVolume and
/// ListVolumes.
pub struct VolumeStatus {
    pub health: Health,
    /// The nodes it is published to.
    pub published: Vec<String>,
}

use super::publications::ByVolume as ExportsByVolume;

/// What the reconciler's last health pass found: when it began, until when
/// its findings stand in for asking the nodes, and the volumes it judged
/// abnormal, with why. Only the abnormal are kept: the memory grows with
/// the volumes in trouble, not with every volume.
#[derive(Debug)]
pub struct LastPass {
    began_ms: i64,
    good_until_ms: i64,
    /// Each abnormal volume's health, and whether the verdict looked at
    /// its NBD publications (then it may be stale once one is removed).
    abnormal: HashMap<String, (Health, bool)>,
}

impl LastPass {
    /// `v`'s health as this pass judged it, when the pass can speak for
    /// it at `now_ms`: still good, `v` Available and unchanged since the pass
    /// began (so the pass read it as it is), and without an NBD publication
    /// (whose export the pass did not keep). None: ask its node.
    fn health_of(&self, v: &VolumeRec, exports: &[ExportRec], now_ms: i64) -> Option<Health> {
        let seen_as_is = v.created_ms.max(v.updated_ms) < self.began_ms;
        if now_ms > self.good_until_ms || !seen_as_is || v.phase != Phase::Available || exports.iter().any(serves_nbd) {
            return None;
        }
        if let Some((h, looked_at_exports)) = self.abnormal.get(&v.id) {
            return (!looked_at_exports).then(|| h.clone());
        }
        let node = v.node.as_deref()?;
        let ago = (now_ms - self.began_ms).max(0) / 1000;
        Some(Health::ok(format!("available on node {node}; its image was present at the health check {ago} s ago")))
    }
}

impl Manager {
    /// The health and publications of each volume, by ID: one read of the
    /// publications and one question to each node holding one of them.
    pub async fn volumes_status(&self, volumes: &[VolumeRec]) -> Result<HashMap<String, VolumeStatus>, ControllerError> {
        self.statuses(volumes, false).await
    }

    /// Like `volumes_status`, for ListVolumes: the health of each volume the
    /// last health pass can speak for comes from it (see `LastPass`); only
    /// the nodes of the others are asked.
    pub async fn listed_volumes_status(&self, volumes: &[VolumeRec]) -> Result<HashMap<String, VolumeStatus>, ControllerError> {
        self.statuses(volumes, true).await
    }

    async fn statuses(&self, volumes: &[VolumeRec], from_pass: bool) -> Result<HashMap<String, VolumeStatus>, ControllerError> {
        let mut exports = self.exports_by_volume(Some(volumes)).await?;
        let now = now_ms();
        // A replica that no longer leads keeps no pass current (its
        // reconciler stopped): it asks, as one that never led.
        let use_pass = from_pass && self.is_leader();
        let mut health: HashMap<String, Health> = HashMap::new();
        let to_ask: Vec<VolumeRec> = {
            let pass = self.last_health_pass.lock().unwrap_or_else(|p| p.into_inner());
            let pass = pass.as_ref().filter(|_| use_pass);
            volumes
                .iter()
                .filter(|v| {
                    let on_record = exports.get(&v.id).map(Vec::as_slice).unwrap_or_default();
                    match pass.and_then(|p| p.health_of(v, on_record, now)) {
                        Some(h) => {
                            health.insert(v.id.clone(), h);
                            false
                        }
                        None => true,
                    }
                })
                .cloned()
                .collect()
        };
        if !to_ask.is_empty() {
            let views = self.ask_nodes_of(&to_ask, &exports).await;
            for v in &to_ask {
                let (h, _) = self.judge(v, &views, &exports).await;
                health.insert(v.id.clone(), h);
            }
        }
        Ok(health
            .into_iter()
            .map(|(id, health)| {
                let published = exports.remove(&id).unwrap_or_default().into_iter().map(|e| e.node_id).collect();
                (id, VolumeStatus { health, published })
            })
            .collect())
    }

    /// Forgets the last health pass (this replica no longer leads).
    pub(crate) fn forget_health_pass(&self) {
        *self.last_health_pass.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    pub async fn volume_status(&self, v: &VolumeRec) -> Result<VolumeStatus, ControllerError> {
        let mut all = self.volumes_status(std::slice::from_ref(v)).await?;
        Ok(all.remove(&v.id).unwrap_or_else(|| VolumeStatus { health: Health::bad("unknown"), published: vec![] }))
    }

    /// The publications of `volumes` (of every volume when None), from the
    /// publications index (`Publications::read`).
    async fn exports_by_volume(&self, volumes: Option<&[VolumeRec]>) -> Result<ExportsByVolume, ControllerError> {
        let ids: Option<Vec<&str>> = volumes.map(|vs| vs.iter().map(|v| v.id.as_str()).collect());
        Ok(self.publication_index.read(&*self.store, ids.as_deref()).await?)
    }

    /// Asks each node holding one of `volumes` about those volumes only (a
    /// page of them costs the page, not every volume the node holds), and
    /// each node serving one of their NBD publications which exports it
    /// serves; no other node, nothing else.
    async fn ask_nodes_of(&self, volumes: &[VolumeRec], exports: &ExportsByVolume) -> BTreeMap<String, NodeView> {
        join_all(whom_to_ask(volumes, exports).into_iter().map(|(n, (ids, with_exports))| async move {
            let view = self.ask_node(&n, ids, with_exports).await;
            (n, view)
        }))
        .await
        .into_iter()
        .collect()
    }

    /// A volume's health from what its node said, with its event; and
    /// whether it was noted (not when its record changed meanwhile).
    async fn judge(&self, v: &VolumeRec, views: &BTreeMap<String, NodeView>, exports: &ExportsByVolume) -> (Health, bool) {
        let h = health_of(v, views, exports.get(&v.id).map(Vec::as_slice).unwrap_or_default());
        if h.abnormal && self.changed_since(v).await {
            // The node answered after the record was read: a volume being
            // deleted, or switched to another node by a migration, is
            // missing there, which says nothing of its health. No turn is
            // noted; the next look judges the record as it is then.
            let h =
                Health::ok("its record changed while it was looked at (deleted, or moved to another node); judged again at the next look");
            return (h, false);
        }
        self.note_health(v, &h).await;
        (h, true)
    }

    /// Whether `v`'s record is gone, or names another phase or node than
    /// `v` does. A store that cannot say leaves the judgement as it is.
    async fn changed_since(&self, v: &VolumeRec) -> bool {
        match store::get_json::<VolumeRec>(&*self.store, Kind::Volume, &v.id).await {
            Ok(None) => true,
            Ok(Some((now, _))) => now.phase != v.phase || now.node != v.node,
            Err(_) => false,
        }
    }

    /// What `node` says of the volumes `ids` (none: not asked) and, when
    /// `with_exports`, of the exports it serves (otherwise None, which no
    /// judgement reads: the node serves none of the volumes' publications).
    async fn ask_node(&self, node: &str, ids: Vec<String>, with_exports: bool) -> NodeView {
        let agent = match self.agent_for(node).await {
            Ok(a) => a,
            Err(e) => return NodeView { volumes: Err(e.to_string()), exports: None },
        };
        let volumes = async {
            if ids.is_empty() {
                return Ok(HashMap::new());
            }
            let asked = pb::ListVolumesRequest { volume_ids: ids, ..Default::default() };
            match tokio::time::timeout(ASK_TIMEOUT, agent.clone().list_volumes(asked)).await {
                Ok(Ok(r)) => Ok(r.volumes.into_iter().map(|v| (v.volume_id.clone(), v)).collect()),
                Ok(Err(e)) => Err(e.message),
                Err(_) => Err(format!("no answer within {} s", ASK_TIMEOUT.as_secs())),
            }
        };
        let exports = async {
            if !with_exports {
                return None;
            }
            match tokio::time::timeout(ASK_TIMEOUT, agent.clone().list_exports(pb::ListExportsRequest {})).await {
                Ok(Ok(r)) => Some(r.exports.into_iter().map(|e| (e.volume_id, e.consumer_node)).collect()),
                // A node without NBD exports serves none: only local publications there.
                Ok(Err(e)) if e.failure == Failure::Refused => Some(BTreeSet::new()),
                _ => None,
            }
        };
        let (volumes, exports) = futures::join!(volumes, exports);
        NodeView { volumes, exports }
    }

    /// A Warning event when a volume turns abnormal, a Normal one when it
    /// recovers; nothing while it stays as it was. The leader only.
    async fn note_health(&self, v: &VolumeRec, h: &Health) {
        // One voice: a standby answering a read does not raise events too.
        if !self.is_leader() {
            return;
        }
        // Only the abnormal are noted: the notes grow with the volumes in
        // trouble, not with every volume.
        let was_abnormal = {
            let mut abnormal = self.health_seen.lock().unwrap_or_else(|p| p.into_inner());
            if h.abnormal {
                abnormal.insert(v.id.clone(), now_ms()).is_some()
            } else {
                abnormal.remove(&v.id).is_some()
            }
        };
        match (was_abnormal, h.abnormal) {
            (false, true) => {
                warn!(volume.id = %v.id, condition = %h.message, "volume turned abnormal");
                self.event(v, true, "VolumeAbnormal", h.message.clone()).await;
            }
            (true, false) => {
                info!(volume.id = %v.id, "volume is healthy again");
                self.event(v, false, "VolumeHealthy", h.message.clone()).await;
            }
            _ => {}
        }
    }

    /// Look at every Available volume (the reconciler calls it every pass),
    /// so a volume that turns abnormal gets its event even when no CO asks.
    /// What it finds answers ListVolumes for `good_for` after it ends.
    pub async fn check_health(&self, good_for: Duration) -> Result<(), ControllerError> {
        let began = std::time::Instant::now();
        let began_ms = now_ms();
        let mut abnormal: HashMap<String, (Health, bool)> = HashMap::new();
        // Volumes whose record changed while they were looked at: judged
        // at the next look, their notes kept meanwhile.
        let mut unjudged: HashSet<String> = HashSet::new();
        // One read of the publications for the whole pass; for each page of
        // volumes, one question to each node holding some of them, about
        // those only (so no answer grows with the node's whole pool).
        let exports = self.exports_by_volume(None).await?;
        let mut after: Option<String> = None;
        let mut judged = 0usize;
        loop {
            let page = store::list_page_json::<VolumeRec>(&*self.store, Kind::Volume, after.as_deref(), store::PAGE).await?;
            let done = page.len() < store::PAGE;
            after = page.last().map(|(id, _, _)| id.clone());
            let vols: Vec<VolumeRec> = page.into_iter().map(|(_, v, _)| v).filter(|v| v.phase == Phase::Available).collect();
            let views = self.ask_nodes_of(&vols, &exports).await;
            for v in &vols {
                let (h, noted) = self.judge(v, &views, &exports).await;
                if !noted {
                    unjudged.insert(v.id.clone());
                } else if h.abnormal {
                    let looked_at_exports = exports.get(&v.id).is_some_and(|e| e.iter().any(serves_nbd));
                    abnormal.insert(v.id.clone(), (h, looked_at_exports));
                }
                judged += 1;
            }
            if done {
                break;
            }
        }
        // The pass judged every Available volume, and each judgement noted
        // or cleared its own. A note made before the pass began that it
        // neither found abnormal nor left unjudged is of a volume no longer
        // Available (deleted, failed): it is forgotten, so the notes do not
        // keep every one ever made. Notes made since it began stay.
        self.health_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|id, noted_ms| abnormal.contains_key(id) || unjudged.contains(id) || *noted_ms >= began_ms);
        info!(
            volumes = judged,
            abnormal = abnormal.len(),
            seconds = format!("{:.2}", began.elapsed().as_secs_f64()),
            "volume health checked"
        );
        let good_until_ms = now_ms() + good_for.as_millis() as i64;
        *self.last_health_pass.lock().unwrap_or_else(|p| p.into_inner()) = Some(LastPass { began_ms, good_until_ms, abnormal });
        Ok(())
    }
}

/// Node -> (the volumes of `volumes` to ask it about, whether to ask it
/// for the exports it serves): the nodes holding Available volumes, and the
/// nodes serving their NBD publications.
fn whom_to_ask(volumes: &[VolumeRec], exports: &ExportsByVolume) -> BTreeMap<String, (Vec<String>, bool)> {
    let mut wanted: BTreeMap<String, (Vec<String>, bool)> = BTreeMap::new();
    for v in volumes.iter().filter(|v| v.phase == Phase::Available) {
        let Some(node) = &v.node else { continue };
        wanted.entry(node.clone()).or_default().0.push(v.id.clone());
        for e in exports.get(&v.id).into_iter().flatten().filter(|e| serves_nbd(e)) {
            wanted.entry(owner_of(e, node).to_string()).or_default().1 = true;
        }
    }
    wanted
}

/// A publication an NBD export serves (one the owner must still serve).
fn serves_nbd(e: &ExportRec) -> bool {
    e.protocol == "nbd" && e.phase == Phase::Available
}

/// The node serving publication `e` of a volume held by `node`.
fn owner_of<'a>(e: &'a ExportRec, node: &'a str) -> &'a str {
    if e.owner_node.is_empty() {
        node
    } else {
        &e.owner_node
    }
}

fn health_of(v: &VolumeRec, views: &BTreeMap<String, NodeView>, exports: &[ExportRec]) -> Health {
    if v.phase != Phase::Available {
        return Health::bad(format!("{:?}{}", v.phase, v.error.as_ref().map(|e| format!(": {e}")).unwrap_or_default()));
    }
    let Some(node) = &v.node else {
        return Health::bad("the record names no node");
    };
    let Some(view) = views.get(node) else {
        return Health::bad(format!("node {node} was not asked"));
    };
    let on_node = match &view.volumes {
        Err(e) => {
            return Health::bad(format!(
                "node {node}, which holds its image, does not answer ({e}); pods elsewhere cannot reach its export, and its own pods may be affected"
            ))
        }
        Ok(vols) => vols.get(&v.id),
    };
    let Some(on_node) = on_node else {
        return Health::bad(format!("its image is missing on node {node} (the node has no such volume); restore it from a snapshot"));
    };
    if on_node.abnormal {
        return Health::bad(format!("on node {node}: {}", on_node.condition));
    }
    for e in exports.iter().filter(|e| serves_nbd(e)) {
        let owner = owner_of(e, node);
        let served = views.get(owner).and_then(|w| w.exports.as_ref()).map(|s| s.contains(&(e.volume_id.clone(), e.node_id.clone())));
        match served {
            Some(true) => {}
            Some(false) => {
                return Health::bad(format!(
                    "its export to node {} is not served by node {owner}; node {} cannot reach it until it is published again",
                    e.node_id, e.node_id
                ))
            }
            None => return Health::bad(format!("node {owner} could not say whether it still serves the export to node {}", e.node_id)),
        }
    }
    Health::ok(format!("available on node {node}; its image is present"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol(id: &str, node: &str) -> VolumeRec {
        VolumeRec {
            id: id.into(),
            name: id.into(),
            size_bytes: 1 << 20,
            node: Some(node.into()),
            phase: Phase::Available,
            source: None,
            provisioning: crate::volume::Provisioning::Thin,
            parameters: Default::default(),
            fingerprint: String::new(),
            accessible_topology: vec![],
            attempts: vec![],
            error: None,
            metadata: Default::default(),
            created_ms: 0,
            updated_ms: 0,
            accessibility: Accessibility::Zone,
            copy: None,
            migration: None,
        }
    }

    #[test]
    fn only_the_holders_are_asked_and_only_about_their_volumes() {
        let export = |vol: &str, to: &str, protocol: &str, owner: &str| ExportRec {
            id: export_id_for(vol, to),
            volume_id: vol.into(),
            node_id: to.into(),
            protocol: protocol.into(),
            address: String::new(),
            export_name: String::new(),
            phase: Phase::Available,
            owner_node: owner.into(),
            read_only: false,
            plain_text: false,
        };
        let mut failed = vol("vol-err", "node-4");
        failed.phase = Phase::Error;
        let volumes = [vol("vol-a", "node-1"), vol("vol-b", "node-2"), vol("vol-c", "node-1"), failed];
        let exports: ExportsByVolume = [
            ("vol-a".to_string(), vec![export("vol-a", "node-2", "local", "")]),
            // Served by its holder (owner left empty by older records) and,
            // during a migration, by another node.
            ("vol-b".to_string(), vec![export("vol-b", "node-3", "nbd", ""), export("vol-b", "node-1", "nbd", "node-5")]),
        ]
        .into();
        let asked = whom_to_ask(&volumes, &exports);
        let expected: BTreeMap<String, (Vec<String>, bool)> =
            [("node-1", (vec!["vol-a", "vol-c"], false)), ("node-2", (vec!["vol-b"], true)), ("node-5", (vec![], true))]
                .into_iter()
                .map(|(n, (ids, ex))| (n.to_string(), (ids.into_iter().map(String::from).collect(), ex)))
                .collect();
        assert_eq!(asked, expected, "no node holding nothing Available, no export list where no NBD publication is served");
    }

    #[test]
    fn each_fault_has_its_own_message() {
        let agent_vol = |id: &str, condition: &str| pb::Volume {
            volume_id: id.into(),
            abnormal: !condition.is_empty(),
            condition: condition.into(),
            ..Default::default()
        };
        let n1 = NodeView {
            volumes: Ok([("vol-ok", ""), ("vol-ro", "the pool's filesystem is read-only")]
                .map(|(id, c)| (id.to_string(), agent_vol(id, c)))
                .into()),
            exports: Some([("vol-ok".to_string(), "node-2".to_string())].into()),
        };
        let n2 = NodeView { volumes: Err("connection refused".into()), exports: None };
        let views: BTreeMap<String, NodeView> = [("node-1".to_string(), n1), ("node-2".to_string(), n2)].into();
        let export = |vol: &str, to: &str| ExportRec {
            id: export_id_for(vol, to),
            volume_id: vol.into(),
            node_id: to.into(),
            protocol: "nbd".into(),
            address: String::new(),
            export_name: String::new(),
            phase: Phase::Available,
            owner_node: "node-1".into(),
            read_only: false,
            plain_text: false,
        };
        assert!(!health_of(&vol("vol-ok", "node-1"), &views, &[export("vol-ok", "node-2")]).abnormal);
        let h = health_of(&vol("vol-gone", "node-1"), &views, &[]);
        assert!(h.abnormal && h.message.contains("missing"), "{h:?}");
        let h = health_of(&vol("vol-ro", "node-1"), &views, &[]);
        assert!(h.abnormal && h.message.contains("read-only"), "{h:?}");
        let h = health_of(&vol("vol-x", "node-2"), &views, &[]);
        assert!(h.abnormal && h.message.contains("does not answer"), "{h:?}");
        let h = health_of(&vol("vol-ok", "node-1"), &views, &[export("vol-ok", "node-3")]);
        assert!(h.abnormal && h.message.contains("not served"), "{h:?}");
        let mut failed = vol("vol-e", "node-1");
        failed.phase = Phase::Error;
        failed.error = Some("no node fits".into());
        assert_eq!(health_of(&failed, &views, &[]), Health::bad("Error: no node fits"));
    }

    #[test]
    fn the_last_pass_speaks_only_for_volumes_it_saw_as_they_are() {
        let pass = LastPass {
            began_ms: 1_000,
            good_until_ms: 60_000,
            abnormal: [
                ("vol-bad".to_string(), (Health::bad("on node node-1: the pool's filesystem is read-only"), false)),
                ("vol-unserved".to_string(), (Health::bad("its export to node node-2 is not served by node node-1"), true)),
            ]
            .into(),
        };
        let seen = |id: &str| {
            let mut v = vol(id, "node-1");
            (v.created_ms, v.updated_ms) = (500, 900);
            v
        };
        let h = pass.health_of(&seen("vol-ok"), &[], 31_000).unwrap();
        assert!(!h.abnormal && h.message.contains("at the health check 30 s ago"), "{h:?}");
        assert_eq!(pass.health_of(&seen("vol-bad"), &[], 31_000), Some(Health::bad("on node node-1: the pool's filesystem is read-only")));

        assert_eq!(pass.health_of(&seen("vol-unserved"), &[], 31_000), None, "a verdict on exports that may be gone is asked again");

        let mut changed = seen("vol-ok");
        changed.updated_ms = 1_000;
        assert_eq!(pass.health_of(&changed, &[], 31_000), None, "changed as the pass began: its node is asked");
        let mut made = seen("vol-new");
        made.created_ms = 2_000;
        assert_eq!(pass.health_of(&made, &[], 31_000), None, "made after the pass began");
        assert_eq!(pass.health_of(&seen("vol-ok"), &[], 60_001), None, "the pass is too old");
        let nbd = ExportRec {
            id: export_id_for("vol-ok", "node-2"),
            volume_id: "vol-ok".into(),
            node_id: "node-2".into(),
            protocol: "nbd".into(),
            address: String::new(),
            export_name: String::new(),
            phase: Phase::Available,
            owner_node: String::new(),
            read_only: false,
            plain_text: false,
        };
        assert_eq!(pass.health_of(&seen("vol-ok"), std::slice::from_ref(&nbd), 31_000), None, "its export is asked about");
        let local = ExportRec { protocol: "local".into(), node_id: "node-1".into(), ..nbd };
        assert!(pass.health_of(&seen("vol-ok"), &[local], 31_000).is_some(), "a local publication needs no export");
    }
}
