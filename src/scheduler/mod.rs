//! The scheduler: which node should hold a new volume.
//!
//! Cinder's FilterScheduler, reduced to a pure function: node states and a
//! request in, every node that can take the volume out, best first. Filters
//! and weighers are small named pieces applied as lists (`FILTERS`,
//! `WEIGHERS`); the controller owns retries (the `tried` list) and I/O.
//!
//! `schedule` ranks every node that can take the volume: one pass over the
//! nodes, then a sort of the survivors. `schedule_best`, what the controller
//! calls, wants the winner only: the same pass, then one more over the
//! survivors instead of the sort. Topology lists are resolved against the
//! nodes once per request, because the external provisioner can send one
//! entry per node in the cluster (non-strict topology), and matching every
//! node against every entry would be quadratic.

mod filters;
#[cfg(test)]
mod tests;
mod topology;
pub mod view;
mod weighers;

use std::collections::BTreeMap;

use crate::units::format_bytes;
use crate::volume::{PoolCapacity, Provisioning};

use filters::{explain, Tally, CAPACITY, FILTERS, VOLUME_LIMIT};
pub(crate) use topology::Names;
use topology::TopologyIndex;
pub use topology::{matches, node_segments, Entry, TopologyList};
pub use view::{NodeView, Reservation};
use weighers::{descending, sane, weigh, weight_of, Passing, WEIGHERS};

/// Topology segments of one CSI Topology, e.g. {"topology.cinderblock.dev/zone": "zone-1"}.
pub type Segments = BTreeMap<String, String>;

/// What a node last reported, as the scheduler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeState {
    pub id: String,
    /// "" when the node has no zone.
    pub zone: String,
    pub capacity: PoolCapacity,
    pub volume_count: u32,
    /// 0 = no limit.
    pub max_volumes: u32,
    /// Unix time in ms.
    pub last_heartbeat_ms: i64,
    pub reflink: bool,
}

/// How the capacity weigher ranks pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Placement {
    /// Most virtual free capacity first: wear and load even out.
    #[default]
    Spread,
    /// Least virtual free capacity first: keeps whole nodes empty.
    Stack,
}

#[derive(Debug, Clone, Default)]
pub struct ScheduleRequest {
    pub size_bytes: u64,
    pub provisioning: Provisioning,
    /// The node must match at least one entry (all its keys) when non-empty.
    pub requisite: TopologyList,
    /// Earlier = better.
    pub preferred: TopologyList,
    /// Source affinity: only this node.
    pub pinned_node: Option<String>,
    /// Nodes already tried for this request.
    pub tried: Vec<String>,
    pub placement: Placement,
    pub now_ms: i64,
    /// A node whose last heartbeat is older than this is skipped; 0 (or
    /// less) turns the check off, like `max_volumes = 0`.
    pub heartbeat_timeout_ms: i64,
}

/// One node that can take the volume, with its total weight (higher = better).
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub node_id: String,
    pub weight: f64,
}

/// Why nothing fits: per filter, how many nodes it turned away and why, for the user.
///
/// `rejections` holds `(filter name, nodes rejected, reasons)`, the largest
/// group first; the reasons each name their node, the smallest node IDs of
/// the group first (so the message is stable), at most `LISTED` of them.
#[derive(Debug, Clone, PartialEq)]
pub struct NoValidNode {
    pub considered: usize,
    /// What was asked, for the message.
    pub size_bytes: u64,
    pub provisioning: Provisioning,
    pub rejections: Vec<(&'static str, usize, Vec<String>)>,
}

/// Reasons listed per filter in the message; the rest are counted.
pub const LISTED: usize = 10;

impl NoValidNode {
    /// True when every rejection was capacity or volume-limit: the cluster is
    /// full rather than misconfigured, so the controller answers
    /// RESOURCE_EXHAUSTED. False when there was nothing to reject.
    pub fn only_capacity(&self) -> bool {
        !self.rejections.is_empty() && self.rejections.iter().all(|(name, _, _)| *name == CAPACITY || *name == VOLUME_LIMIT)
    }

    /// Why one node was turned away: each reason, and whether every one
    /// was capacity or the volume limit (a request pinned to that node).
    pub fn why_not(&self, node: &str) -> (Vec<String>, bool) {
        let prefix = format!("{node}: ");
        let mine: Vec<(&str, &String)> = self
            .rejections
            .iter()
            .flat_map(|(name, _, reasons)| reasons.iter().filter(|r| r.starts_with(&prefix)).map(move |r| (*name, r)))
            .collect();
        let capacity = !mine.is_empty() && mine.iter().all(|(name, _)| *name == CAPACITY || *name == VOLUME_LIMIT);
        (mine.into_iter().map(|(_, r)| r.clone()).collect(), capacity)
    }
}

impl std::fmt::Display for NoValidNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.considered == 0 {
            return write!(
                f,
                "no node can take the volume: no nodes have registered; check that the cinderblock node plugin runs and reaches the controller"
            );
        }
        write!(
            f,
            "no node can take a {} {} volume. Of {} node{}, ",
            format_bytes(self.size_bytes),
            self.provisioning.as_str(),
            self.considered,
            if self.considered == 1 { "" } else { "s" }
        )?;
        for (i, (name, count, reasons)) in self.rejections.iter().enumerate() {
            let says = FILTERS.iter().find(|flt| flt.name == *name).map_or(*name, |flt| if *count == 1 { flt.one } else { flt.many });
            let sep = if i == 0 { "" } else { ", " };
            write!(f, "{sep}{count} {says} ({}", reasons.join("; "))?;
            if *count > reasons.len() {
                write!(f, "; and {} more", count - reasons.len())?;
            }
            write!(f, ")")?;
        }
        let mut hints = self.rejections.iter().filter_map(|(name, _, _)| FILTERS.iter().find(|flt| flt.name == *name).map(|flt| flt.hint));
        if let Some(first) = hints.next() {
            write!(f, ". Next: {first}")?;
            for hint in hints {
                write!(f, "; {hint}")?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for NoValidNode {}

/// Every node that passes all filters, best first; ties go to the smaller
/// node ID. When none passes, why each node was turned away.
///
/// A caller that only wants the winner should use [`schedule_best`]: the
/// same answer as this list's first entry, without the sort.
pub fn schedule(nodes: &[NodeState], req: &ScheduleRequest) -> Result<Vec<Candidate>, NoValidNode> {
    let passing = filter_and_score(nodes, req, Order::Unknown)?;

    // Sort plain integer keys rather than the scored rows: 16 bytes a row,
    // and the node IDs are read only to break a tie.
    let mut ranking: Vec<(u64, u32)> = weigh(&passing).zip(&passing.rows).map(|(w, s)| (descending(w), s.index)).collect();
    ranking.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| nodes[a.1 as usize].id.cmp(&nodes[b.1 as usize].id)));
    Ok(ranking.iter().map(|&(key, index)| Candidate { node_id: nodes[index as usize].id.clone(), weight: weight_of(key) }).collect())
}

/// The best node only: exactly `schedule(nodes, req)?[0]` (same filters,
/// weights and tie-break, the same error when nothing fits), found in one
/// pass over the weighed nodes instead of a sort, with one node ID copied.
pub fn schedule_best(nodes: &[NodeState], req: &ScheduleRequest) -> Result<Candidate, NoValidNode> {
    best_of(nodes, req, Order::Unknown)
}

/// `schedule_best` for nodes the caller keeps sorted by ID, with their
/// names laid out flat (`Names::of(nodes)`; the node view keeps both): the
/// lookups by node ID skip checking the order and read the flat names.
pub(crate) fn schedule_best_sorted(nodes: &[NodeState], names: &Names, req: &ScheduleRequest) -> Result<Candidate, NoValidNode> {
    debug_assert!(nodes.windows(2).all(|w| w[0].id < w[1].id));
    best_of(nodes, req, Order::Sorted(names))
}

/// The largest volume the scheduler would place now (GetCapacity): the
/// most any node that passes every filter but capacity can take, 0 when
/// none passes. `req.size_bytes` is ignored.
pub fn largest_volume(nodes: &[NodeState], req: &ScheduleRequest) -> u64 {
    largest_of(nodes, req, Order::Unknown)
}

fn largest_of(nodes: &[NodeState], req: &ScheduleRequest, order: Order) -> u64 {
    let ctx = Context::new(nodes, req, order);
    let others = || FILTERS.iter().filter(|f| f.name != CAPACITY);
    nodes
        .iter()
        .enumerate()
        .filter(|(at, node)| others().all(|f| (f.check)(node, *at, &ctx).is_ok()))
        .map(|(_, node)| node.capacity.max_volume(req.provisioning))
        .max()
        .unwrap_or(0)
}

pub(crate) fn largest_volume_sorted(nodes: &[NodeState], names: &Names, req: &ScheduleRequest) -> u64 {
    largest_of(nodes, req, Order::Sorted(names))
}

/// What the caller knows of the nodes' order.
#[derive(Clone, Copy)]
enum Order<'n> {
    Unknown,
    /// Strictly ascending IDs, and their names laid out flat.
    Sorted(&'n Names),
}

fn best_of(nodes: &[NodeState], req: &ScheduleRequest, order: Order) -> Result<Candidate, NoValidNode> {
    let passing = filter_and_score(nodes, req, order)?;

    // The smallest (sort key, node ID), as the ranking in `schedule` orders
    // them; IDs are compared only when the keys tie.
    let mut weights = weigh(&passing).zip(&passing.rows);
    let (w, s) = weights.next().expect("filter_and_score returns at least one node");
    let mut best = (descending(w), s.index as usize);
    for (w, s) in weights {
        let key = descending(w);
        let index = s.index as usize;
        if key < best.0 || (key == best.0 && nodes[index].id < nodes[best.1].id) {
            best = (key, index);
        }
    }
    Ok(Candidate { node_id: nodes[best.1].id.clone(), weight: weight_of(best.0) })
}

/// Every node that passes all filters with its raw weigher figures, in
/// `nodes` order and never empty; when none passes, why each node was
/// turned away.
fn filter_and_score(nodes: &[NodeState], req: &ScheduleRequest, order: Order) -> Result<Passing, NoValidNode> {
    let ctx = Context::new(nodes, req, order);

    let mut tallies: [Tally; FILTERS.len()] = std::array::from_fn(|_| Tally::default());
    let mut passing = Passing::with_capacity(nodes.len());
    'nodes: for (index, node) in nodes.iter().enumerate() {
        for (filter, tally) in FILTERS.iter().zip(tallies.iter_mut()) {
            if let Err(why) = (filter.check)(node, index, &ctx) {
                // The tallies explain an empty result only: once a node
                // has passed, finding each filter's example is waste.
                if passing.rows.is_empty() {
                    tally.record(nodes, index, why);
                }
                continue 'nodes;
            }
        }
        let raw = std::array::from_fn(|w| sane((WEIGHERS[w].raw)(node, index, &ctx)));
        passing.push(index, raw);
    }

    if passing.rows.is_empty() {
        Err(explain(nodes, req, tallies))
    } else {
        Ok(passing)
    }
}

/// A request resolved against the nodes: its topology lists, and the nodes
/// it names (tried, pinned) as places in `nodes`, so that no filter
/// compares a node's ID string per node.
struct Context<'a> {
    req: &'a ScheduleRequest,
    requisite: TopologyIndex<'a>,
    preferred: TopologyIndex<'a>,
    tried: Vec<usize>,
    /// None: not pinned.
    pinned: Option<Vec<usize>>,
}

impl<'a> Context<'a> {
    fn new(nodes: &[NodeState], req: &'a ScheduleRequest, order: Order) -> Self {
        let mut ids = match order {
            Order::Unknown => None,
            Order::Sorted(names) => Some(topology::NodeIds::sorted(topology::Lookup::named(nodes, names))),
        };
        let requisite = TopologyIndex::new(&req.requisite, nodes, &mut ids);
        let preferred = TopologyIndex::new(&req.preferred, nodes, &mut ids);
        let tried = places_of(nodes, &req.tried, order);
        let pinned = req.pinned_node.as_ref().map(|id| places_of(nodes, std::slice::from_ref(id), order));
        Context { req, requisite, preferred, tried, pinned }
    }
}

/// Every place in `nodes` whose node has one of `ids`: a binary search per
/// ID on sorted nodes, else one pass (the IDs are few, often none).
fn places_of(nodes: &[NodeState], ids: &[String], order: Order) -> Vec<usize> {
    match order {
        _ if ids.is_empty() => Vec::new(),
        Order::Sorted(_) => ids.iter().filter_map(|id| nodes.binary_search_by(|n| n.id.as_str().cmp(id)).ok()).collect(),
        Order::Unknown => (0..nodes.len()).filter(|at| ids.contains(&nodes[*at].id)).collect(),
    }
}
