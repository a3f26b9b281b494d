//! The node view: every node as the controller last heard of it, in
//! memory, kept current from the store's change feed (node registrations,
//! liveness, and in a cluster the watches), so that a scheduling decision
//! reads no store at all.
//!
//! Cinder's `consume_from_volume`: a placement takes its size from the
//! chosen node in the view at once, under the same lock as the decision,
//! so concurrent creates see each other and a burst spreads instead of
//! landing on the node that looked emptiest a moment ago. The reservation
//! stays until the create ends: a failed one gives it back; a finished one
//! keeps it until the node's next report (which then counts the volume),
//! or at most `settle_timeout`.
//!
//! The nodes the scheduler sees are kept sorted by ID (whatever order they
//! registered in), so every decision gets the fast, ordered lookups, and
//! mismatched nodes are left out entirely.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tracing::warn;

use super::{schedule_best_sorted, Candidate, Names, NoValidNode, NodeState, ScheduleRequest};
use crate::controller::records::NodeRec;
use crate::store::follow::{self, Follower, Progress};
use crate::store::{self, Change, Kind, Store, StoreError};
use crate::volume::{PoolCapacity, Provisioning};

/// Nodes as the controller knows them; cheap to clone (shared).
#[derive(Clone)]
pub struct NodeView {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<ViewState>,
    /// How far the view has followed the store (`store::follow`).
    progress: Arc<Progress>,
    /// A finished create's reservation is dropped at the node's next
    /// report, or after this long if none comes.
    settle_timeout: Duration,
}

#[derive(Default)]
struct ViewState {
    /// Every node, mismatched ones too, by ID.
    records: BTreeMap<String, NodeRec>,
    /// Last liveness per node, by this process's clock (ms).
    alive: HashMap<String, i64>,
    /// The nodes the scheduler considers (not mismatched, not being
    /// evacuated), sorted by ID,
    /// with the reservations on them taken off.
    nodes: Vec<NodeState>,
    /// Reservations by volume ID.
    held: HashMap<String, Held>,
    /// Nodes added to `nodes` one at a time since it was last laid out.
    added: usize,
    /// The IDs and zones of `nodes`, flat, for the decisions' lookups;
    /// made again before a decision when `names_stale` (a node came, went
    /// or changed zone), not on every report.
    names: Names,
    names_stale: bool,
}

/// Each node's ID and zone live in allocations of their own. Laid out in
/// ID order (a full rebuild clones them in that order), a decision reads
/// them front to back; nodes that registered one by one in any order
/// scatter them. Before `names` existed, a decision at 10,000 nodes with a
/// topology entry per node cost about a third more that way
/// (docs/benchmarks.md); entries that name nodes now read `names`, but a
/// zone list still reads each node's zone string. So once this share of
/// the list was added since the last layout, it is laid out again: a copy
/// of the list, amortized over the additions.
const ADDED_BEFORE_LAYOUT: usize = 8; // 1/8 of the list

struct Held {
    node: String,
    size: u64,
    provisioning: Provisioning,
    /// Set when the create finished: the reservation waits for the node's
    /// next report.
    settled: Option<Instant>,
}

/// A placement's claim on a node's capacity in the view. Dropping it
/// without `settle` gives the capacity back (the create failed or moved on).
#[must_use]
pub struct Reservation {
    view: NodeView,
    volume_id: String,
    pub node_id: String,
    pub weight: f64,
    settled: bool,
}

impl Reservation {
    /// The volume now exists on the node: keep the reservation until the
    /// node's next report counts it.
    pub fn settle(mut self) {
        self.settled = true;
        let mut s = self.view.lock();
        if let Some(h) = s.held.get_mut(&self.volume_id) {
            h.settled = Some(Instant::now());
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if !self.settled {
            self.view.release(&self.volume_id);
        }
    }
}

/// What a reservation takes from a node: Cinder's consume_from_volume.
fn consume(c: &mut PoolCapacity, size: u64, provisioning: Provisioning) {
    c.provisioned = c.provisioned.saturating_add(size);
    if provisioning == Provisioning::Thick {
        c.free = c.free.saturating_sub(size);
    }
}

#[tonic::async_trait]
impl Follower for NodeView {
    fn what(&self) -> &'static str {
        "node view"
    }

    async fn load(&self, store: &dyn Store) -> Result<(), StoreError> {
        let nodes = store::list_json::<NodeRec>(store, Kind::Node).await?;
        let alive = store.liveness().await?;
        let mut s = self.lock();
        s.records = nodes.into_iter().map(|(n, _)| (n.id.clone(), n)).collect();
        for (node, at) in alive {
            let e = s.alive.entry(node).or_insert(at);
            *e = (*e).max(at);
        }
        s.rebuild_all();
        Ok(())
    }

    /// Applies one change of the store's feed (node records and liveness;
    /// other kinds are not the view's).
    fn apply(&self, change: Change) {
        let mut s = self.lock();
        match change {
            Change::Record { kind: Kind::Node, id, value: Some(v) } => {
                match store::decode_json::<NodeRec>(Kind::Node, &id, &v.value) {
                    Ok(rec) => {
                        // The node's report counts what finished before it.
                        s.held.retain(|_, h| h.node != id || h.settled.is_none());
                        s.records.insert(id.clone(), rec);
                        s.rebuild(&id);
                    }
                    Err(e) => warn!(node = %id, error = %e, "node view: a node record could not be read"),
                }
            }
            Change::Record { kind: Kind::Node, id, value: None } => {
                s.records.remove(&id);
                s.rebuild(&id);
            }
            Change::Alive { node, at_ms } => {
                let e = s.alive.entry(node.clone()).or_insert(at_ms);
                *e = (*e).max(at_ms);
                if let Ok(at) = s.nodes.binary_search_by(|n| n.id.as_str().cmp(&node)) {
                    s.nodes[at].last_heartbeat_ms = s.nodes[at].last_heartbeat_ms.max(at_ms);
                }
            }
            Change::Record { .. } => {}
        }
    }
}

impl NodeView {
    /// An empty view, not yet loaded; `follow` fills it and keeps it current.
    pub fn new(settle_timeout: Duration) -> NodeView {
        NodeView { inner: Arc::new(Inner { state: Mutex::new(ViewState::default()), progress: Default::default(), settle_timeout }) }
    }

    /// A view that follows `store` (`store::follow`): every node and their
    /// liveness read once, then each change applied as it comes.
    pub fn follow(store: Arc<dyn Store>, settle_timeout: Duration) -> NodeView {
        let view = NodeView::new(settle_timeout);
        follow::spawn(&store, Arc::new(view.clone()), view.inner.progress.clone());
        view
    }

    /// Waits (at most `patience`) until the first full read is in and
    /// every change up to the store's change `seq` is applied: then the view
    /// holds every write the store answered before `seq` was read.
    pub async fn caught_up(&self, seq: u64, patience: Duration) -> bool {
        self.inner.progress.caught_up(seq, patience).await
    }

    fn lock(&self) -> MutexGuard<'_, ViewState> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Picks a node for `volume_id` and reserves the request's size there
    /// at once (consume_from_volume), in one step under the view's lock.
    pub fn place(&self, volume_id: &str, req: &ScheduleRequest) -> Result<Reservation, NoValidNode> {
        let started = Instant::now();
        let mut s = self.lock();
        s.expire_settled(self.inner.settle_timeout);
        // A repeat for the same volume (a retry) gives back what it held.
        if s.held.contains_key(volume_id) {
            s.release(volume_id);
        }
        s.refresh_names();
        let best: Candidate = schedule_best_sorted(&s.nodes, &s.names, req)?;
        s.hold(volume_id, Held { node: best.node_id.clone(), size: req.size_bytes, provisioning: req.provisioning, settled: None });
        drop(s);
        crate::metrics::METRICS.scheduler_seconds.observe(started.elapsed().as_secs_f64());
        Ok(Reservation { view: self.clone(), volume_id: volume_id.to_string(), node_id: best.node_id, weight: best.weight, settled: false })
    }

    fn release(&self, volume_id: &str) {
        self.lock().release(volume_id);
    }

    /// Every node's record, mismatched ones too, by ID.
    pub fn nodes(&self) -> Vec<NodeRec> {
        let s = self.lock();
        s.records.values().map(|r| s.with_liveness(r)).collect()
    }

    pub fn node(&self, id: &str) -> Option<NodeRec> {
        let s = self.lock();
        s.records.get(id).map(|r| s.with_liveness(r))
    }

    /// The largest volume the scheduler would place now (GetCapacity), on
    /// the nodes it considers, with the reservations taken off.
    pub fn largest_volume(&self, req: &ScheduleRequest) -> u64 {
        let mut s = self.lock();
        s.refresh_names();
        super::largest_volume_sorted(&s.nodes, &s.names, req)
    }

    /// How many placements hold capacity right now (for tests and metrics).
    pub fn reservations(&self) -> usize {
        self.lock().held.len()
    }
}

impl ViewState {
    /// A record with the latest liveness in its heartbeat.
    fn with_liveness(&self, r: &NodeRec) -> NodeRec {
        let mut r = r.clone();
        if let Some(at) = self.alive.get(&r.id) {
            r.heartbeat_ms = r.heartbeat_ms.max(*at);
        }
        r
    }

    /// The scheduler's state of one node: its record, its liveness, and
    /// what is reserved on it.
    fn state_of(&self, rec: &NodeRec) -> NodeState {
        let mut n = rec.state();
        if let Some(at) = self.alive.get(&rec.id) {
            n.last_heartbeat_ms = n.last_heartbeat_ms.max(*at);
        }
        for h in self.held.values().filter(|h| h.node == rec.id) {
            consume(&mut n.capacity, h.size, h.provisioning);
            n.volume_count += 1;
        }
        n
    }

    fn rebuild_all(&mut self) {
        let nodes: Vec<NodeState> =
            self.records.values().filter(|r| r.mismatch.is_none() && !r.evacuating).map(|r| self.state_of(r)).collect();
        self.nodes = nodes; // BTreeMap order: sorted by ID, laid out in it
        self.added = 0;
        self.names_stale = true;
    }

    fn refresh_names(&mut self) {
        if self.names_stale || self.names.count() != self.nodes.len() {
            self.names = Names::of(&self.nodes);
            self.names_stale = false;
        }
    }

    /// Brings one node's place in `nodes` in line with its record.
    fn rebuild(&mut self, id: &str) {
        let at = self.nodes.binary_search_by(|n| n.id.as_str().cmp(id));
        let state = self.records.get(id).filter(|r| r.mismatch.is_none() && !r.evacuating).map(|r| self.state_of(r));
        match (at, state) {
            // A report: the node keeps its ID's and zone's allocations
            // (where the layout put them) unless the zone changed.
            (Ok(i), Some(n)) => {
                let old = &mut self.nodes[i];
                let zone = if old.zone == n.zone {
                    std::mem::take(&mut old.zone)
                } else {
                    self.names_stale = true;
                    n.zone
                };
                *old = NodeState { id: std::mem::take(&mut old.id), zone, ..n };
            }
            (Ok(i), None) => {
                self.nodes.remove(i);
                self.names_stale = true;
            }
            (Err(i), Some(n)) => {
                self.nodes.insert(i, n);
                self.names_stale = true;
                self.added += 1;
                if self.added * ADDED_BEFORE_LAYOUT > self.nodes.len() {
                    self.lay_out();
                }
            }
            (Err(_), None) => {}
        }
    }

    /// Copies the list, so that its IDs and zones are allocated in ID order.
    fn lay_out(&mut self) {
        self.nodes = self.nodes.to_vec();
        self.added = 0;
    }

    fn hold(&mut self, volume_id: &str, h: Held) {
        if let Ok(i) = self.nodes.binary_search_by(|n| n.id.as_str().cmp(&h.node)) {
            consume(&mut self.nodes[i].capacity, h.size, h.provisioning);
            self.nodes[i].volume_count += 1;
        }
        self.held.insert(volume_id.to_string(), h);
    }

    fn release(&mut self, volume_id: &str) {
        if let Some(h) = self.held.remove(volume_id) {
            self.rebuild(&h.node);
        }
    }

    /// Finished creates whose node has not reported since: after `timeout`
    /// the report is overdue and the reservation goes (the node's own
    /// check still refuses what does not fit).
    fn expire_settled(&mut self, timeout: Duration) {
        let stale: Vec<String> =
            self.held.iter().filter(|(_, h)| h.settled.is_some_and(|t| t.elapsed() > timeout)).map(|(id, _)| id.clone()).collect();
        for id in stale {
            self.release(&id);
        }
    }
}

impl std::fmt::Debug for NodeView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.lock();
        f.debug_struct("NodeView").field("nodes", &s.records.len()).field("reservations", &s.held.len()).finish()
    }
}
