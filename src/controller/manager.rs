//! The controller's domain, shared by its flows: the store, the node agents,
//! leadership and fencing, and what the controller tells people. The flows
//! live beside it: `create.rs` (Cinder's create-volume flow), `snapshot.rs`,
//! `delete.rs`, `expand.rs`, and the reconciler (`reconciler.rs`). They fail
//! with `ControllerError` (`error.rs`); the CSI layer (`service.rs`) only
//! maps requests, answers and errors onto these.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::warn;

use super::agents::{Agents, MismatchSink, NodeAgent};
use super::error::ControllerError;
use super::inflight::Inflight;
use super::records::*;
use crate::keyed_locks::KeyedLocks;
use crate::scheduler::{NodeView, Placement, Segments, TopologyList};
use crate::store::{self, Kind, Store, StoreError};
use crate::tls::TlsDir;
use crate::volume::Provisioning;

#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// A node whose last report is older than this is not scheduled.
    pub heartbeat_timeout: Duration,
    /// Cinder's scheduler_max_attempts.
    pub max_attempts: usize,
    /// Records stuck in Creating longer than this (and not being worked on)
    /// are resolved; images without a record younger than this are left alone.
    pub stuck_grace: Duration,
    /// Per-call deadline towards node agents. A call that exceeds it is
    /// followed by asking the node what it did, before anything else.
    pub agent_timeout: Duration,
    /// The reconciler's circuit breaker: a pass that would quarantine more
    /// than this many of a node's images, or more than `orphan_breaker_percent`
    /// of them, quarantines none and raises an alarm instead.
    pub orphan_breaker_count: usize,
    pub orphan_breaker_percent: u32,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            heartbeat_timeout: Duration::from_secs(15),
            max_attempts: 3,
            stuck_grace: Duration::from_secs(120),
            agent_timeout: Duration::from_secs(120),
            orphan_breaker_count: 5,
            orphan_breaker_percent: 10,
        }
    }
}

/// A validated CreateVolume.
#[derive(Debug, Clone)]
pub struct CreateVolumeSpec {
    pub name: String,
    pub size_bytes: u64,
    pub provisioning: Provisioning,
    pub placement: Placement,
    pub source: Option<SourceRef>,
    pub requisite: TopologyList,
    pub preferred: TopologyList,
    pub parameters: BTreeMap<String, String>,
    pub metadata: BTreeMap<String, String>,
    pub fingerprint: String,
    pub accessibility: Accessibility,
}

/// Whether this replica leads, and its fencing token (the Lease's
/// transition count when it won it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Leadership {
    pub leading: bool,
    pub token: u64,
}

/// Where the controller tells people what it decided (Kubernetes Events in
/// a cluster; nothing in standalone).
#[tonic::async_trait]
pub trait EventSink: Send + Sync {
    async fn volume_event(&self, volume: &VolumeRec, warning: bool, reason: &str, note: String);
    /// An event about a node (its StorageNode in a cluster).
    async fn node_event(&self, _node: &str, _warning: bool, _reason: &str, _note: String) {}
}

#[derive(Clone)]
pub struct Manager {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) agents: Arc<Agents>,
    pub(crate) config: ControllerConfig,
    pub(crate) inflight: Arc<Inflight>,
    pub(crate) events: Option<Arc<dyn EventSink>>,
    /// Every node in memory, kept current from the store's changes; the
    /// scheduler places volumes on it (with reservations).
    pub(crate) view: NodeView,
    /// Every publication in memory, by volume, kept current from the
    /// store's changes; status reads look a volume's up there.
    pub(crate) publication_index: super::publications::Publications,
    /// Images the reconciler found without a record, per node, with when it
    /// first saw each (see reconciler.rs: an image is quarantined only after
    /// it has been a candidate for the grace period).
    pub(crate) orphan_candidates:
        Arc<std::sync::Mutex<std::collections::HashMap<String, std::collections::HashMap<String, std::time::Instant>>>>,
    /// Volumes a delete asked to stop copying from another node: the
    /// create flow that copies gives up (and cleans up) when it sees its ID.
    pub(crate) copy_cancels: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    /// Volumes whose migration a driver task of this controller runs: the
    /// task holds the volume's key for as long as it runs.
    pub(crate) migrations: KeyedLocks,
    /// With leader election: this replica's leadership. Without: None.
    leader: Option<watch::Receiver<Leadership>>,
    /// The volumes last seen abnormal (health.rs), with when (ms), so an
    /// event marks each turn once.
    pub(crate) health_seen: Arc<std::sync::Mutex<std::collections::HashMap<String, i64>>>,
    /// What the reconciler's last health pass found (health.rs); ListVolumes
    /// answers from it.
    pub(crate) last_health_pass: Arc<std::sync::Mutex<Option<super::health::LastPass>>>,
}

/// How long a caller waits for the node view's first read of the store.
const VIEW_PATIENCE: Duration = Duration::from_secs(30);

impl Manager {
    /// `tls`: the controller's certificate folder (its client certificate
    /// and the cluster CA) for calling node agents.
    pub fn new(store: Arc<dyn Store>, config: ControllerConfig, tls: Arc<TlsDir>) -> Self {
        Manager {
            agents: Arc::new(Agents::new(config.agent_timeout, tls)),
            view: NodeView::follow(store.clone(), config.heartbeat_timeout),
            publication_index: super::publications::Publications::follow(&store),
            store,
            config,
            inflight: Arc::new(Inflight::default()),
            orphan_candidates: Default::default(),
            copy_cancels: Default::default(),
            migrations: Default::default(),
            events: None,
            leader: None,
            health_seen: Default::default(),
            last_health_pass: Default::default(),
        }
    }

    pub fn with_events(mut self, events: Arc<dyn EventSink>) -> Self {
        self.events = Some(events);
        self
    }

    pub fn with_leader(mut self, leader: watch::Receiver<Leadership>) -> Self {
        self.leader = Some(leader);
        self
    }

    /// On every new term, raise the fencing token on every node's agent
    /// before (or while) the new leader acts, so a deposed leader's late
    /// calls are refused even on nodes the new leader has not touched yet.
    pub fn fence_nodes_on_each_term(&self) {
        let Some(mut rx) = self.leader.clone() else { return };
        let m = self.clone();
        tokio::spawn(async move {
            let mut fenced: Option<u64> = None;
            loop {
                let l = *rx.borrow_and_update();
                if l.leading && fenced != Some(l.token) {
                    fenced = Some(l.token);
                    m.fence_all().await;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
    }

    async fn fence_all(&self) {
        let Ok(nodes) = self.nodes().await else { return };
        let calls = nodes.into_iter().filter(|n| n.mismatch.is_none()).map(|n| {
            let m = self.clone();
            async move {
                let id = n.id.clone();
                let Ok(mut agent) = m.agent_of(n) else { return };
                match tokio::time::timeout(Duration::from_secs(10), agent.fence(crate::agent_proto::FenceRequest {})).await {
                    Ok(Ok(r)) => {
                        tracing::info!(node = %id, token = r.identity.map(|i| i.fencing_token).unwrap_or(0), "node fenced for this term")
                    }
                    Ok(Err(e)) => warn!(node = %id, error = %e, "could not fence the node (its next call from us will)"),
                    Err(_) => warn!(node = %id, "fencing the node timed out (its next call from us will)"),
                }
            }
        });
        futures::future::join_all(calls).await;
    }

    pub fn is_leader(&self) -> bool {
        self.leader.as_ref().is_none_or(|l| l.borrow().leading)
    }

    /// The fencing token for calls that change data, while this replica leads.
    pub fn fencing_token(&self) -> Option<u64> {
        match &self.leader {
            None => Some(0),
            Some(l) => {
                let l = *l.borrow();
                l.leading.then_some(l.token)
            }
        }
    }

    /// Only the leader changes records; a standby waits a little (a
    /// takeover may be under way), then asks the caller to retry.
    pub async fn wait_leader(&self) -> Result<(), ControllerError> {
        let Some(mut rx) = self.leader.clone() else { return Ok(()) };
        let wait = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|l| l.leading)).await;
        match wait {
            Ok(Ok(_)) => Ok(()),
            _ => Err(ControllerError::NotLeader),
        }
    }

    /// Run an operation in its own task: it runs to its end (done, or
    /// reverted) even when the CSI call that started it is cancelled by the
    /// caller's timeout. A retry waits for it on the record's key and then
    /// sees what it left.
    pub(crate) async fn detached<T, F>(&self, op: F) -> Result<T, ControllerError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, ControllerError>> + Send + 'static,
    {
        tokio::spawn(op).await.map_err(|e| ControllerError::Internal(format!("controller operation failed: {e}")))?
    }

    pub(crate) async fn event(&self, volume: &VolumeRec, warning: bool, reason: &str, note: String) {
        if let Some(e) = &self.events {
            e.volume_event(volume, warning, reason, note).await;
        }
    }

    pub(crate) async fn node_event(&self, node: &str, warning: bool, reason: &str, note: String) {
        if let Some(e) = &self.events {
            e.node_event(node, warning, reason, note).await;
        }
    }

    pub fn store(&self) -> &dyn Store {
        &*self.store
    }

    pub async fn volume(&self, id: &str) -> Result<Option<(VolumeRec, u64)>, ControllerError> {
        store::get_json(&*self.store, Kind::Volume, id).await.map_err(ControllerError::from)
    }
    pub async fn snapshot(&self, id: &str) -> Result<Option<(SnapshotRec, u64)>, ControllerError> {
        store::get_json(&*self.store, Kind::Snapshot, id).await.map_err(ControllerError::from)
    }
    /// A node's record as stored, with its version (to change it).
    pub async fn node(&self, id: &str) -> Result<Option<(NodeRec, u64)>, ControllerError> {
        store::get_json(&*self.store, Kind::Node, id).await.map_err(ControllerError::from)
    }
    /// Every node as the node view has it (no store read), with its latest
    /// liveness as the heartbeat.
    pub async fn nodes(&self) -> Result<Vec<NodeRec>, ControllerError> {
        self.view_ready().await?;
        Ok(self.view.nodes())
    }
    /// One node as the node view has it.
    pub async fn node_in_view(&self, id: &str) -> Result<Option<NodeRec>, ControllerError> {
        self.view_ready().await?;
        Ok(self.view.node(id))
    }
    pub(crate) async fn view_ready(&self) -> Result<(), ControllerError> {
        if self.view.caught_up(self.store.change_seq(), VIEW_PATIENCE).await {
            Ok(())
        } else {
            Err(ControllerError::ViewNotReady)
        }
    }
    /// The largest volume the scheduler would place now, on a node inside
    /// `topology` when given (GetCapacity).
    pub async fn largest_volume(&self, provisioning: Provisioning, topology: Option<Segments>) -> Result<u64, ControllerError> {
        self.view_ready().await?;
        let req = crate::scheduler::ScheduleRequest {
            provisioning,
            requisite: topology.into_iter().collect(),
            now_ms: now_ms(),
            heartbeat_timeout_ms: self.config.heartbeat_timeout.as_millis() as i64,
            ..Default::default()
        };
        Ok(self.view.largest_volume(&req))
    }

    pub fn view(&self) -> &NodeView {
        &self.view
    }
    pub async fn volumes(&self) -> Result<Vec<VolumeRec>, ControllerError> {
        Ok(store::list_json::<VolumeRec>(&*self.store, Kind::Volume).await?.into_iter().map(|(v, _)| v).collect())
    }
    pub async fn snapshots(&self) -> Result<Vec<SnapshotRec>, ControllerError> {
        Ok(store::list_json::<SnapshotRec>(&*self.store, Kind::Snapshot).await?.into_iter().map(|(s, _)| s).collect())
    }

    pub fn node_is_healthy(&self, n: &NodeRec) -> bool {
        n.mismatch.is_none() && now_ms() - n.heartbeat_ms <= self.config.heartbeat_timeout.as_millis() as i64
    }

    /// The agent of a node, as its record names it. A mismatched node is
    /// refused: nothing is written there until an operator resolves it.
    pub(crate) fn agent_of(&self, node: NodeRec) -> Result<NodeAgent, ControllerError> {
        if let Some(m) = &node.mismatch {
            return Err(ControllerError::Mismatch { node: node.id.clone(), reason: m.clone() });
        }
        let client = self.agents.client(&node)?;
        let sink: Arc<dyn MismatchSink> = Arc::new(self.clone());
        Ok(NodeAgent::new(node, client, self.fencing_token(), sink))
    }

    pub(crate) async fn agent_for(&self, node_id: &str) -> Result<NodeAgent, ControllerError> {
        let node = self.node_in_view(node_id).await?.ok_or_else(|| ControllerError::NodeNotRegistered { node: node_id.to_string() })?;
        self.agent_of(node)
    }

    /// Record that `node`'s agent answered as another node or pool: the
    /// node's record says so (the scheduler and reconciler skip it), with a
    /// Warning event and a metric.
    pub(crate) async fn mark_mismatch(&self, node_id: &str, reason: String) {
        crate::metrics::METRICS.node_mismatched.get_or_create(&crate::metrics::PoolLabels { node: node_id.to_string() }).set(1);
        for _ in 0..5 {
            let Ok(Some((mut rec, version))) = self.node(node_id).await else { return };
            if rec.mismatch.as_deref() == Some(reason.as_str()) {
                return;
            }
            rec.mismatch = Some(reason.clone());
            match store::update_json(&*self.store, Kind::Node, node_id, &rec, version).await {
                Ok(_) => break,
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => {
                    warn!(node = %node_id, error = %e, "could not mark the node mismatched");
                    return;
                }
            }
        }
        warn!(node = %node_id, reason = %reason, "node marked mismatched: nothing is written there until an operator resolves it");
        self.node_event(
            node_id,
            true,
            "AgentMismatch",
            format!("{reason}; the controller writes nothing on this node until an operator resolves it"),
        )
        .await;
    }
}

impl MismatchSink for Manager {
    fn mismatch(&self, node: &NodeRec, reason: String) {
        let (m, id) = (self.clone(), node.id.clone());
        tokio::spawn(async move { m.mark_mismatch(&id, reason).await });
    }
}
