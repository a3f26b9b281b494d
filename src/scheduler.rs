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

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

use crate::units::format_bytes;
use crate::volume::{PoolCapacity, Provisioning, Shortfall};
use crate::{TOPOLOGY_NODE_KEY, TOPOLOGY_ZONE_KEY};

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
    pub requisite: Vec<Segments>,
    /// Earlier = better.
    pub preferred: Vec<Segments>,
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
        !self.rejections.is_empty()
            && self
                .rejections
                .iter()
                .all(|(name, _, _)| *name == CAPACITY || *name == VOLUME_LIMIT)
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
        let mut hints = self.rejections.iter().filter_map(|(name, _, _)| {
            FILTERS
                .iter()
                .find(|flt| flt.name == *name)
                .map(|flt| flt.hint)
        });
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

/// The node's own topology: the node key always, the zone key when it has one.
pub fn node_segments(node: &NodeState) -> Segments {
    let mut segments = Segments::new();
    segments.insert(TOPOLOGY_NODE_KEY.to_string(), node.id.clone());
    if !node.zone.is_empty() {
        segments.insert(TOPOLOGY_ZONE_KEY.to_string(), node.zone.clone());
    }
    segments
}

/// Every key of `topology` equals the node's segment; a key the node does
/// not have (an unknown key, or the zone key on a node without a zone) is no
/// match. An empty topology matches every node.
pub fn matches(node: &NodeState, topology: &Segments) -> bool {
    topology.iter().all(|(key, value)| match key.as_str() {
        TOPOLOGY_NODE_KEY => *value == node.id,
        TOPOLOGY_ZONE_KEY => !node.zone.is_empty() && *value == node.zone,
        _ => false,
    })
}

/// Every node that passes all filters, best first; ties go to the smaller
/// node ID. When none passes, why each node was turned away.
///
/// A caller that only wants the winner should use [`schedule_best`]: the
/// same answer as this list's first entry, without the sort.
pub fn schedule(nodes: &[NodeState], req: &ScheduleRequest) -> Result<Vec<Candidate>, NoValidNode> {
    let passing = filter_and_score(nodes, req)?;

    // Sort plain integer keys rather than the scored rows: 16 bytes a row,
    // and the node IDs are read only to break a tie.
    let mut ranking: Vec<(u64, u32)> = weigh(&passing)
        .zip(&passing)
        .map(|(w, s)| (descending(w), s.index))
        .collect();
    ranking.sort_unstable_by(|a, b| {
        a.0.cmp(&b.0)
            .then_with(|| nodes[a.1 as usize].id.cmp(&nodes[b.1 as usize].id))
    });
    Ok(ranking
        .iter()
        .map(|&(key, index)| Candidate {
            node_id: nodes[index as usize].id.clone(),
            weight: weight_of(key),
        })
        .collect())
}

/// The best node only: exactly `schedule(nodes, req)?[0]` (same filters,
/// weights and tie-break, the same error when nothing fits), found in one
/// pass over the weighed nodes instead of a sort, with one node ID copied.
pub fn schedule_best(nodes: &[NodeState], req: &ScheduleRequest) -> Result<Candidate, NoValidNode> {
    let passing = filter_and_score(nodes, req)?;

    // The smallest (sort key, node ID), as the ranking in `schedule` orders
    // them; IDs are compared only when the keys tie.
    let mut weights = weigh(&passing).zip(&passing);
    let (w, s) = weights
        .next()
        .expect("filter_and_score returns at least one node");
    let mut best = (descending(w), s.index as usize);
    for (w, s) in weights {
        let key = descending(w);
        let index = s.index as usize;
        if key < best.0 || (key == best.0 && nodes[index].id < nodes[best.1].id) {
            best = (key, index);
        }
    }
    Ok(Candidate {
        node_id: nodes[best.1].id.clone(),
        weight: weight_of(best.0),
    })
}

/// Every node that passes all filters with its raw weigher figures, in
/// `nodes` order and never empty; when none passes, why each node was
/// turned away.
fn filter_and_score(
    nodes: &[NodeState],
    req: &ScheduleRequest,
) -> Result<Vec<Scored>, NoValidNode> {
    let ctx = Context::new(nodes, req);

    let mut tallies: [Tally; FILTERS.len()] = std::array::from_fn(|_| Tally::default());
    let mut passing: Vec<Scored> = Vec::with_capacity(nodes.len());
    'nodes: for (index, node) in nodes.iter().enumerate() {
        for (filter, tally) in FILTERS.iter().zip(tallies.iter_mut()) {
            if let Err(why) = (filter.check)(node, index, &ctx) {
                // The tallies explain an empty result only: once a node
                // has passed, finding each filter's example is waste.
                if passing.is_empty() {
                    tally.record(nodes, index, why);
                }
                continue 'nodes;
            }
        }
        let raw = std::array::from_fn(|w| sane((WEIGHERS[w].raw)(node, index, &ctx)));
        passing.push(Scored {
            index: index as u32,
            raw,
        });
    }

    if passing.is_empty() {
        Err(explain(nodes, req, tallies))
    } else {
        Ok(passing)
    }
}

// ---------------------------------------------------------------- filters

const AFFINITY: &str = "affinity";
const TRIED: &str = "tried";
const TOPOLOGY: &str = "topology";
const HEALTHY: &str = "healthy";
const VOLUME_LIMIT: &str = "volume-limit";
const CAPACITY: &str = "capacity";

/// One filter: a name, a check, what it says of the nodes it turns away
/// (one, many), and what to do about it.
struct Filter {
    name: &'static str,
    one: &'static str,
    many: &'static str,
    /// The node, its place in `nodes`, the request.
    check: fn(&NodeState, usize, &Context) -> Result<(), Why>,
    hint: &'static str,
}

/// The filters, in order; a node is charged to the first that rejects it.
/// Whether a node is a candidate at all (affinity, tried, topology) comes
/// before its state (health), and resources come last, so that a capacity
/// rejection means "the right node, but full" (what `only_capacity` needs).
const FILTERS: [Filter; 6] = [
    Filter {
        name: AFFINITY,
        one: "is not the source's node",
        many: "are not the source's node",
        check: pinned_node,
        hint: "the source volume's node must have room; free space there",
    },
    Filter {
        name: TRIED,
        one: "was tried already",
        many: "were tried already",
        check: not_yet_tried,
        hint: "earlier attempts failed on the tried nodes; see the volume's events for why",
    },
    Filter {
        name: TOPOLOGY,
        one: "is outside the allowed topology",
        many: "are outside the allowed topology",
        check: in_requisite_topology,
        hint: "check the StorageClass allowedTopologies and the nodes' zone labels",
    },
    Filter {
        name: HEALTHY,
        one: "is not reporting",
        many: "are not reporting",
        check: healthy,
        hint: "check that the cinderblock node plugin runs on the stale nodes",
    },
    Filter {
        name: VOLUME_LIMIT,
        one: "is at its volume limit",
        many: "are at their volume limit",
        check: below_volume_limit,
        hint: "delete unused volumes or raise the nodes' volume limit",
    },
    Filter {
        name: CAPACITY,
        one: "has too little room",
        many: "have too little room",
        check: has_room,
        hint: "free space in a pool, add a node, or request a smaller volume",
    },
];

fn pinned_node(node: &NodeState, _at: usize, ctx: &Context) -> Result<(), Why> {
    match &ctx.req.pinned_node {
        Some(pinned) if *pinned != node.id => Err(Why::NotPinned),
        _ => Ok(()),
    }
}

fn not_yet_tried(node: &NodeState, _at: usize, ctx: &Context) -> Result<(), Why> {
    if ctx.req.tried.contains(&node.id) {
        Err(Why::Tried)
    } else {
        Ok(())
    }
}

fn in_requisite_topology(node: &NodeState, at: usize, ctx: &Context) -> Result<(), Why> {
    if ctx.req.requisite.is_empty() || ctx.requisite.first_match(node, at).is_some() {
        Ok(())
    } else {
        Err(Why::OutsideRequisite)
    }
}

fn healthy(node: &NodeState, _at: usize, ctx: &Context) -> Result<(), Why> {
    let timeout = ctx.req.heartbeat_timeout_ms;
    let age_ms = ctx.req.now_ms.saturating_sub(node.last_heartbeat_ms);
    if timeout > 0 && age_ms > timeout {
        Err(Why::Stale { age_ms })
    } else {
        Ok(())
    }
}

fn below_volume_limit(node: &NodeState, _at: usize, _ctx: &Context) -> Result<(), Why> {
    if node.max_volumes > 0 && node.volume_count >= node.max_volumes {
        Err(Why::AtVolumeLimit)
    } else {
        Ok(())
    }
}

fn has_room(node: &NodeState, _at: usize, ctx: &Context) -> Result<(), Why> {
    node.capacity
        .fits(ctx.req.size_bytes, ctx.req.provisioning)
        .map_err(Why::NoRoom)
}

/// Why a filter turned a node away; cheap to make (no allocation), worded
/// only for the one example per filter that reaches the user.
#[derive(Debug, Clone)]
enum Why {
    NotPinned,
    Tried,
    OutsideRequisite,
    Stale { age_ms: i64 },
    AtVolumeLimit,
    NoRoom(Shortfall),
}

impl Why {
    fn describe(&self, node: &NodeState, req: &ScheduleRequest) -> String {
        let id = &node.id;
        match self {
            Why::NotPinned => format!(
                "{id}: the source lives on {}, and the volume must be made there",
                req.pinned_node.as_deref().unwrap_or("another node")
            ),
            Why::Tried => format!("{id}: an attempt there failed already"),
            Why::OutsideRequisite => {
                let zone = if node.zone.is_empty() {
                    "no zone".to_string()
                } else {
                    format!("zone {}", node.zone)
                };
                let n = req.requisite.len();
                let plural = if n == 1 { "y" } else { "ies" };
                format!("{id} ({zone}) matches none of the {n} requisite topolog{plural}")
            }
            Why::Stale { age_ms } => {
                if node.last_heartbeat_ms <= 0 {
                    format!("{id}: no heartbeat yet")
                } else {
                    format!(
                        "{id}: last heartbeat {} ago, the limit is {}",
                        seconds(*age_ms),
                        seconds(req.heartbeat_timeout_ms)
                    )
                }
            }
            Why::AtVolumeLimit => format!(
                "{id}: holds {} volumes, its limit is {}",
                node.volume_count, node.max_volumes
            ),
            Why::NoRoom(shortfall) => no_room(node, req, shortfall),
        }
    }
}

/// A capacity shortfall in GiB and plain words: how much fits, and why.
fn no_room(node: &NodeState, req: &ScheduleRequest, shortfall: &Shortfall) -> String {
    let c = &node.capacity;
    let id = &node.id;
    let fits = format_bytes(c.max_volume(req.provisioning));
    let usable = format_bytes(c.free.saturating_sub(c.reserved()));
    let reserve = if c.reserved_percentage > 0 {
        format!(" after keeping {}% in reserve", c.reserved_percentage)
    } else {
        String::new()
    };
    // Over-committed thin volumes are bounded twice (Cinder's formula): by
    // the ratio over the pool's size, and by the ratio over what is free;
    // say both. At a ratio of 1 that is simply what is free.
    let thin = req.provisioning == Provisioning::Thin && c.max_over_subscription_ratio > 1.0;
    match shortfall {
        Shortfall::NoCapacity => format!("{id}: its pool reports no space at all; is the pool's filesystem there?"),
        _ if thin => format!(
            "{id}: room for {fits} at most: {usable} free{reserve}, and thin volumes may add up to {} times its {} pool ({})",
            c.max_over_subscription_ratio,
            format_bytes(c.total),
            if c.provisioned == 0 { "none promised yet".to_string() } else { format!("{} promised already", format_bytes(c.provisioned)) }
        ),
        _ => format!("{id}: {usable} free{reserve}"),
    }
}

fn seconds(ms: i64) -> String {
    if ms % 1000 == 0 {
        format!("{}s", ms / 1000)
    } else {
        format!("{:.1}s", ms as f64 / 1000.0)
    }
}

/// Rejections by one filter: how many, and the `LISTED` with the smallest node IDs.
#[derive(Default)]
struct Tally {
    count: usize,
    examples: Vec<(usize, Why)>,
}

impl Tally {
    fn record(&mut self, nodes: &[NodeState], index: usize, why: Why) {
        self.count += 1;
        if self.examples.len() < LISTED {
            self.examples.push((index, why));
            return;
        }
        let largest = (0..self.examples.len())
            .max_by(|a, b| nodes[self.examples[*a].0].id.cmp(&nodes[self.examples[*b].0].id))
            .expect("LISTED > 0");
        if nodes[index].id < nodes[self.examples[largest].0].id {
            self.examples[largest] = (index, why);
        }
    }
}

fn explain(
    nodes: &[NodeState],
    req: &ScheduleRequest,
    tallies: [Tally; FILTERS.len()],
) -> NoValidNode {
    let mut rejections: Vec<(&'static str, usize, Vec<String>)> = FILTERS
        .iter()
        .zip(tallies)
        .filter(|(_, tally)| tally.count > 0)
        .map(|(filter, mut tally)| {
            tally.examples.sort_by(|a, b| nodes[a.0].id.cmp(&nodes[b.0].id));
            let reasons = tally.examples.iter().map(|(index, why)| why.describe(&nodes[*index], req)).collect();
            (filter.name, tally.count, reasons)
        })
        .collect();
    // Stable: equal counts keep filter order.
    rejections.sort_by_key(|r| std::cmp::Reverse(r.1));
    NoValidNode {
        considered: nodes.len(),
        size_bytes: req.size_bytes,
        provisioning: req.provisioning,
        rejections,
    }
}

// ---------------------------------------------------------------- weighers

/// One weigher: a raw figure per node (higher = better), scaled to 0..1 over
/// the passing nodes, times the multiplier.
struct Weigher {
    #[allow(dead_code)] // for reading the list, and for debugging
    name: &'static str,
    multiplier: f64,
    /// The node, its place in `nodes`, the request.
    raw: fn(&NodeState, usize, &Context) -> f64,
}

/// The preferred-topology multiplier outweighs the other two together
/// (each at most 1): the first preferred entry is the node the pod was
/// scheduled to (WaitForFirstConsumer), and a node-local volume anywhere
/// else is useless to it. Its raw figure is 1/(1 + position), so the gap
/// between the best and any other position is at least half the scale.
const WEIGHERS: [Weigher; 3] = [
    Weigher {
        name: "preferred-topology",
        multiplier: 5.0,
        raw: preferred_order,
    },
    Weigher {
        name: "capacity",
        multiplier: 1.0,
        raw: virtual_free,
    },
    Weigher {
        name: "volume-count",
        multiplier: 1.0,
        raw: fewer_volumes,
    },
];

fn preferred_order(node: &NodeState, at: usize, ctx: &Context) -> f64 {
    match ctx.preferred.first_match(node, at) {
        Some(position) => 1.0 / (1.0 + position as f64),
        None => 0.0,
    }
}

fn virtual_free(node: &NodeState, _at: usize, ctx: &Context) -> f64 {
    let free = node.capacity.virtual_free(ctx.req.provisioning);
    match ctx.req.placement {
        Placement::Spread => free,
        Placement::Stack => -free,
    }
}

fn fewer_volumes(node: &NodeState, _at: usize, _ctx: &Context) -> f64 {
    -f64::from(node.volume_count)
}

/// A pool can report an infinite or NaN ratio; keep one bad figure from
/// turning every weight into NaN.
fn sane(x: f64) -> f64 {
    if x.is_nan() {
        0.0
    } else {
        x.clamp(-1e300, 1e300)
    }
}

struct Scored {
    /// Into `nodes`; u32 keeps the rows small (no cluster has 4 billion nodes).
    index: u32,
    raw: [f64; WEIGHERS.len()],
}

/// Each passing node's total weight, in `passing` order: per weigher,
/// min-max normalization as Cinder does it (all equal: 0), times the multiplier.
fn weigh(passing: &[Scored]) -> impl Iterator<Item = f64> + '_ {
    let mut scale = [(0.0, 0.0, 0.0); WEIGHERS.len()];
    for (w, weigher) in WEIGHERS.iter().enumerate() {
        let (mut min, mut max) = (f64::INFINITY, f64::NEG_INFINITY);
        for s in passing {
            min = min.min(s.raw[w]);
            max = max.max(s.raw[w]);
        }
        let range = max - min;
        scale[w] = (min, range, weigher.multiplier);
    }
    passing.iter().map(move |s| {
        let mut total = 0.0;
        for (raw, (min, range, multiplier)) in s.raw.iter().zip(scale) {
            if range > 0.0 {
                total += (raw - min) / range * multiplier;
            }
        }
        total
    })
}

/// An integer key that sorts higher weights first (the IEEE-754 bit trick:
/// flip the sign bit of positives, all bits of negatives, then invert).
fn descending(weight: f64) -> u64 {
    let bits = (weight + 0.0).to_bits(); // + 0.0: -0.0 becomes 0.0, a tie
    let ascending = if bits >> 63 == 1 {
        !bits
    } else {
        bits | 1 << 63
    };
    !ascending
}

fn weight_of(key: u64) -> f64 {
    let ascending = !key;
    f64::from_bits(if ascending >> 63 == 1 {
        ascending & !(1 << 63)
    } else {
        !ascending
    })
}

// ---------------------------------------------------------------- topology

struct Context<'a> {
    req: &'a ScheduleRequest,
    requisite: TopologyIndex<'a>,
    preferred: TopologyIndex<'a>,
}

impl<'a> Context<'a> {
    fn new(nodes: &[NodeState], req: &'a ScheduleRequest) -> Self {
        let mut ids = None;
        let requisite = TopologyIndex::new(&req.requisite, nodes, &mut ids);
        let preferred = TopologyIndex::new(&req.preferred, nodes, &mut ids);
        Context {
            req,
            requisite,
            preferred,
        }
    }
}

/// A word-at-a-time multiplicative hash (the Fx scheme): node IDs and
/// zones are short, and SipHash's flood resistance buys nothing for lists
/// the external provisioner builds from our own nodes' topology.
#[derive(Default)]
struct Fx(u64);

impl Fx {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

impl Hasher for Fx {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, mut bytes: &[u8]) {
        while let Some((word, rest)) = bytes.split_first_chunk::<8>() {
            self.add(u64::from_le_bytes(*word));
            bytes = rest;
        }
        if let Some((word, rest)) = bytes.split_first_chunk::<4>() {
            self.add(u64::from(u32::from_le_bytes(*word)));
            bytes = rest;
        }
        for b in bytes {
            self.add(u64::from(*b));
        }
    }
    fn write_u8(&mut self, b: u8) {
        self.add(u64::from(b));
    }
}

type FastMap<K> = HashMap<K, u32, BuildHasherDefault<Fx>>;

const NONE: u32 = u32::MAX;

/// Every node with a given ID, by place in `nodes`; made once per request
/// and only when a topology list names nodes.
///
/// The store lists nodes in ID order, and the external provisioner sorts
/// its topology terms (by their keys and values, the node key first, so by
/// node ID) and sends the preferred list rotated to start at the selected
/// node. A list with an entry per node therefore usually names the nodes
/// in their order: each lookup first tries where the caller expects the ID
/// (after the node of the entry before), one string comparison. A miss
/// goes to a binary search while the IDs ascend and the misses are few,
/// else to a hash map built on first need. Any order gives the same
/// answer; only the cost differs.
struct NodeIds<'n> {
    nodes: &'n [NodeState],
    /// Strictly ascending IDs: each ID is on one node, found by binary search.
    ascending: bool,
    /// Binary searches so far; past `SEARCHES` the list is not in node
    /// order, and the map pays off.
    searches: usize,
    map: Option<IdMap<'n>>,
}

/// Misses looked up by binary search before the hash map is built, and
/// wrong guesses in one list before it stops guessing.
const SEARCHES: usize = 16;

impl<'n> NodeIds<'n> {
    fn new(nodes: &'n [NodeState]) -> Self {
        NodeIds {
            nodes,
            ascending: nodes.windows(2).all(|w| w[0].id < w[1].id),
            searches: 0,
            map: None,
        }
    }

    /// Calls `visit` with the place of every node whose ID is `id`, and
    /// returns the last place visited. `guess` is where the caller expects
    /// the ID; any value is correct, a good one is faster.
    fn each(
        &mut self,
        id: &str,
        guess: Option<usize>,
        mut visit: impl FnMut(usize),
    ) -> Option<usize> {
        let nodes = self.nodes;
        let unique = self.ascending || self.map.as_ref().is_some_and(IdMap::unique);
        // With unique IDs, a node found at the guess is the only one.
        let hit = |at: &usize| unique && nodes.get(*at).is_some_and(|n| n.id == id);
        if let Some(at) = guess.filter(hit) {
            visit(at);
            return Some(at);
        }
        if self.ascending && self.map.is_none() && self.searches < SEARCHES {
            self.searches += 1;
            let at = nodes.binary_search_by(|n| n.id.as_str().cmp(id)).ok()?;
            visit(at);
            return Some(at);
        }
        self.map
            .get_or_insert_with(|| IdMap::new(nodes))
            .each(id, visit)
    }
}

/// Node ID to place in `nodes`, for IDs in any order, repeated or not.
struct IdMap<'n> {
    /// The last node with each ID.
    last: FastMap<&'n str>,
    /// The previous node with the same ID (NONE at the end); empty while the
    /// IDs are unique, as they are when nodes come from the store.
    previous: Vec<u32>,
}

impl<'n> IdMap<'n> {
    fn new(nodes: &'n [NodeState]) -> Self {
        let mut last = FastMap::with_capacity_and_hasher(nodes.len(), Default::default());
        let mut previous = Vec::new();
        for (at, node) in nodes.iter().enumerate() {
            if let Some(before) = last.insert(node.id.as_str(), at as u32) {
                if previous.is_empty() {
                    previous = vec![NONE; nodes.len()];
                }
                previous[at] = before;
            }
        }
        IdMap { last, previous }
    }

    fn unique(&self) -> bool {
        self.previous.is_empty()
    }

    /// The nodes with this ID, last first; returns the first node's place.
    fn each(&self, id: &str, mut visit: impl FnMut(usize)) -> Option<usize> {
        let mut at = self.last.get(id).copied().unwrap_or(NONE);
        let mut visited = None;
        while at != NONE {
            visit(at as usize);
            visited = Some(at as usize);
            at = self.previous.get(at as usize).copied().unwrap_or(NONE);
        }
        visited
    }
}

/// One topology list, resolved against the nodes: the position of the
/// first entry each node matches, the same answer as `matches` on each
/// entry in turn. Entries that name a node are placed on that node while
/// the list is read once, so a list with an entry per node costs one pass
/// over the list and one over the nodes, not their product.
#[derive(Default)]
struct TopologyIndex<'a> {
    /// The first entry without keys (it matches every node).
    any: Option<u32>,
    by_zone: FastMap<&'a str>,
    /// Per node, the first entry naming it (NONE: none); empty when no
    /// entry names a node.
    by_node: Vec<u32>,
}

impl<'a> TopologyIndex<'a> {
    fn new<'n>(
        list: &'a [Segments],
        nodes: &'n [NodeState],
        ids: &mut Option<NodeIds<'n>>,
    ) -> Self {
        let mut index = TopologyIndex::default();
        // Where the next entry naming a node most likely finds it: after the
        // node of the entry before. None once the list has shown it is not
        // in node order, so that a wrong guess does not cost a read per entry.
        let mut guess = Some(0);
        let mut misses = 0;
        for (position, segments) in list.iter().enumerate() {
            let position = position as u32;
            let Some((node, zone)) = known_keys(segments) else {
                continue;
            };
            // A node without a zone has no zone key, so an empty zone
            // value, like an unknown key, matches nothing.
            if zone == Some("") {
                continue;
            }
            // Entries come in order: the first one to land is the best.
            match (node, zone) {
                (None, None) => {
                    index.any.get_or_insert(position);
                }
                (None, Some(zone)) => {
                    index.by_zone.entry(zone).or_insert(position);
                }
                (Some(id), zone) => {
                    if index.by_node.is_empty() {
                        index.by_node = vec![NONE; nodes.len()];
                    }
                    let by_node = &mut index.by_node;
                    let ids = ids.get_or_insert_with(|| NodeIds::new(nodes));
                    let found = ids.each(id, guess, |at| {
                        if by_node[at] == NONE && zone.is_none_or(|z| z == nodes[at].zone) {
                            by_node[at] = position;
                        }
                    });
                    if guess.is_some() {
                        if found != guess {
                            misses += 1;
                        }
                        guess = match found {
                            _ if misses >= SEARCHES => None,
                            Some(at) if at + 1 < nodes.len() => Some(at + 1),
                            _ => Some(0),
                        };
                    }
                }
            }
        }
        index
    }

    /// `at` is the node's place in the `nodes` the index was built for.
    fn first_match(&self, node: &NodeState, at: usize) -> Option<u32> {
        let mut best = self.any.unwrap_or(NONE);
        if let Some(&position) = self.by_node.get(at) {
            best = best.min(position);
        }
        if !self.by_zone.is_empty() && !node.zone.is_empty() {
            if let Some(&position) = self.by_zone.get(node.zone.as_str()) {
                best = best.min(position);
            }
        }
        (best != NONE).then_some(best)
    }
}

/// The node and zone values of one topology entry, None when it has a key
/// the nodes do not report (it matches no node).
fn known_keys(segments: &Segments) -> Option<(Option<&str>, Option<&str>)> {
    let (mut node, mut zone) = (None, None);
    for (key, value) in segments {
        match key.as_str() {
            TOPOLOGY_NODE_KEY => node = Some(value.as_str()),
            TOPOLOGY_ZONE_KEY => zone = Some(value.as_str()),
            _ => return None,
        }
    }
    Some((node, zone))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GB: u64 = 1 << 30;
    const NOW: i64 = 1_700_000_000_000;

    fn pool(total_gb: u64, free_gb: u64) -> PoolCapacity {
        PoolCapacity {
            total: total_gb * GB,
            free: free_gb * GB,
            provisioned: (total_gb - free_gb) * GB,
            max_over_subscription_ratio: 1.0,
            reserved_percentage: 0,
        }
    }

    fn node(id: &str, zone: &str, free_gb: u64) -> NodeState {
        NodeState {
            id: id.to_string(),
            zone: zone.to_string(),
            capacity: pool(100, free_gb),
            volume_count: 0,
            max_volumes: 0,
            last_heartbeat_ms: NOW - 1_000,
            reflink: true,
        }
    }

    fn req(size_gb: u64) -> ScheduleRequest {
        ScheduleRequest {
            size_bytes: size_gb * GB,
            now_ms: NOW,
            heartbeat_timeout_ms: 30_000,
            ..Default::default()
        }
    }

    fn zone(z: &str) -> Segments {
        [(TOPOLOGY_ZONE_KEY.to_string(), z.to_string())].into()
    }

    fn on_node(n: &str) -> Segments {
        [(TOPOLOGY_NODE_KEY.to_string(), n.to_string())].into()
    }

    fn ids(candidates: &[Candidate]) -> Vec<&str> {
        candidates.iter().map(|c| c.node_id.as_str()).collect()
    }

    /// The single rejection group of a failed schedule, with its first reason.
    fn only_rejection(err: &NoValidNode) -> (&'static str, usize, &str) {
        assert_eq!(err.rejections.len(), 1, "{err}");
        let (name, count, reasons) = &err.rejections[0];
        (name, *count, reasons[0].as_str())
    }

    #[test]
    fn healthy_rejects_a_stale_heartbeat_and_names_the_node() {
        let mut stale = node("node-c", "z1", 50);
        stale.last_heartbeat_ms = NOW - 40_000;
        let got = schedule(&[node("node-a", "z1", 50), stale.clone()], &req(1)).unwrap();
        assert_eq!(ids(&got), ["node-a"]);

        let err = schedule(&[stale], &req(1)).unwrap_err();
        assert_eq!(
            only_rejection(&err),
            (HEALTHY, 1, "node-c: last heartbeat 40s ago, the limit is 30s")
        );
        assert!(!err.only_capacity());
    }

    #[test]
    fn healthy_accepts_exactly_the_timeout_and_can_be_turned_off() {
        let mut n = node("node-a", "", 50);
        n.last_heartbeat_ms = NOW - 30_000;
        assert!(schedule(std::slice::from_ref(&n), &req(1)).is_ok());
        n.last_heartbeat_ms = 0;
        let err = schedule(std::slice::from_ref(&n), &req(1)).unwrap_err();
        assert_eq!(only_rejection(&err).2, "node-a: no heartbeat yet");
        let off = ScheduleRequest {
            heartbeat_timeout_ms: 0,
            ..req(1)
        };
        assert!(schedule(&[n], &off).is_ok());
    }

    #[test]
    fn topology_keeps_only_requisite_matches() {
        let nodes = [
            node("node-a", "z1", 50),
            node("node-b", "z2", 50),
            node("node-c", "", 50),
        ];
        let r = ScheduleRequest {
            requisite: vec![zone("z2")],
            ..req(1)
        };
        assert_eq!(ids(&schedule(&nodes, &r).unwrap()), ["node-b"]);

        // Any one entry is enough; a node entry matches by ID.
        let r = ScheduleRequest {
            requisite: vec![zone("z2"), on_node("node-c")],
            ..req(1)
        };
        let got = schedule(&nodes, &r).unwrap();
        let mut got = ids(&got);
        got.sort();
        assert_eq!(got, ["node-b", "node-c"]);

        // All keys of an entry must match.
        let mut both = zone("z1");
        both.insert(TOPOLOGY_NODE_KEY.to_string(), "node-b".to_string());
        let r = ScheduleRequest {
            requisite: vec![both],
            ..req(1)
        };
        let err = schedule(&nodes, &r).unwrap_err();
        assert_eq!(only_rejection(&err).0, TOPOLOGY);
        assert_eq!(only_rejection(&err).1, 3);
        assert_eq!(
            only_rejection(&err).2,
            "node-a (zone z1) matches none of the 1 requisite topology"
        );
        assert!(!err.only_capacity());
    }

    #[test]
    fn topology_with_an_unknown_key_matches_nothing() {
        let nodes = [node("node-a", "z1", 50)];
        let mut foreign = zone("z1");
        foreign.insert(
            "topology.kubernetes.io/region".to_string(),
            "r1".to_string(),
        );
        let r = ScheduleRequest {
            requisite: vec![foreign],
            ..req(1)
        };
        let err = schedule(&nodes, &r).unwrap_err();
        assert_eq!(
            only_rejection(&err).2,
            "node-a (zone z1) matches none of the 1 requisite topology"
        );
    }

    #[test]
    fn capacity_rejects_a_full_pool_with_the_shortfall() {
        let nodes = [node("node-a", "z1", 5), node("node-b", "z1", 20)];
        assert_eq!(ids(&schedule(&nodes, &req(10)).unwrap()), ["node-b"]);

        let r = ScheduleRequest {
            provisioning: Provisioning::Thick,
            ..req(30)
        };
        let err = schedule(&nodes, &r).unwrap_err();
        let (name, count, example) = only_rejection(&err);
        assert_eq!((name, count), (CAPACITY, 2));
        assert_eq!(example, "node-a: 5.0 GiB free");
        assert_eq!(err.rejections[0].2[1], "node-b: 20.0 GiB free");
        assert!(err.only_capacity());
        let text = err.to_string();
        assert!(text.starts_with("no node can take a 30.0 GiB thick volume. Of 2 nodes, 2 have too little room (node-a: 5.0 GiB free; node-b: 20.0 GiB free)"), "{text}");
    }

    #[test]
    fn capacity_uses_the_thin_formula() {
        // free 10 of 100, ratio 3: thin 25 GB fits (provisioned 90 + 25 <= 300).
        let mut n = node("node-a", "", 10);
        n.capacity.max_over_subscription_ratio = 3.0;
        assert!(schedule(std::slice::from_ref(&n), &req(25)).is_ok());
        let thick = ScheduleRequest {
            provisioning: Provisioning::Thick,
            ..req(25)
        };
        assert_eq!(
            only_rejection(&schedule(&[n], &thick).unwrap_err()).0,
            CAPACITY
        );
    }

    #[test]
    fn affinity_keeps_only_the_pinned_node() {
        let nodes = [node("node-a", "z1", 90), node("node-b", "z1", 10)];
        let r = ScheduleRequest {
            pinned_node: Some("node-b".into()),
            ..req(1)
        };
        assert_eq!(ids(&schedule(&nodes, &r).unwrap()), ["node-b"]);

        let r = ScheduleRequest {
            pinned_node: Some("node-b".into()),
            ..req(50)
        };
        let err = schedule(&nodes, &r).unwrap_err();
        assert_eq!(err.considered, 2);
        assert_eq!(err.rejections[0].0, AFFINITY);
        assert_eq!(
            err.rejections[0].2,
            ["node-a: the source lives on node-b, and the volume must be made there"]
        );
        assert_eq!(err.rejections[1].0, CAPACITY);
        assert_eq!(err.rejections[1].2, ["node-b: 10.0 GiB free"]);
        assert!(!err.only_capacity());
    }

    #[test]
    fn tried_nodes_are_excluded() {
        let nodes = [
            node("node-a", "z1", 90),
            node("node-b", "z1", 50),
            node("node-c", "z1", 10),
        ];
        let r = ScheduleRequest {
            tried: vec!["node-a".into()],
            ..req(1)
        };
        assert_eq!(ids(&schedule(&nodes, &r).unwrap()), ["node-b", "node-c"]);

        let r = ScheduleRequest {
            tried: vec!["node-a".into(), "node-b".into(), "node-c".into()],
            ..req(1)
        };
        let err = schedule(&nodes, &r).unwrap_err();
        assert_eq!(
            only_rejection(&err),
            (TRIED, 3, "node-a: an attempt there failed already")
        );
    }

    #[test]
    fn volume_limit_rejects_a_full_node_and_zero_means_no_limit() {
        let mut full = node("node-a", "", 50);
        full.volume_count = 10;
        full.max_volumes = 10;
        let mut unlimited = node("node-b", "", 50);
        unlimited.volume_count = 10_000;
        assert_eq!(
            ids(&schedule(&[full.clone(), unlimited], &req(1)).unwrap()),
            ["node-b"]
        );

        let err = schedule(&[full], &req(1)).unwrap_err();
        assert_eq!(
            only_rejection(&err),
            (VOLUME_LIMIT, 1, "node-a: holds 10 volumes, its limit is 10")
        );
        assert!(err.only_capacity());
    }

    #[test]
    fn first_preferred_wins_and_no_match_comes_last() {
        // node-c has by far the most room and fewest volumes, yet preference rules.
        let mut nodes = vec![
            node("node-a", "z1", 10),
            node("node-b", "z2", 20),
            node("node-c", "z3", 90),
        ];
        nodes[0].volume_count = 50;
        let r = ScheduleRequest {
            preferred: vec![on_node("node-a"), zone("z2")],
            ..req(1)
        };
        let got = schedule(&nodes, &r).unwrap();
        assert_eq!(ids(&got), ["node-a", "node-b", "node-c"]);
        assert!(got.windows(2).all(|w| w[0].weight > w[1].weight));
    }

    #[test]
    fn preferred_is_a_preference_not_a_filter() {
        let nodes = [node("node-a", "z1", 5), node("node-b", "z2", 50)];
        let r = ScheduleRequest {
            preferred: vec![zone("z1")],
            ..req(10)
        };
        assert_eq!(ids(&schedule(&nodes, &r).unwrap()), ["node-b"]);
    }

    #[test]
    fn requisite_and_preferred_together() {
        let nodes = [
            node("node-a", "z1", 90),
            node("node-b", "z2", 20),
            node("node-c", "z2", 30),
        ];
        let r = ScheduleRequest {
            requisite: vec![zone("z2"), zone("z3")],
            preferred: vec![on_node("node-b"), zone("z2")],
            ..req(1)
        };
        assert_eq!(ids(&schedule(&nodes, &r).unwrap()), ["node-b", "node-c"]);
    }

    #[test]
    fn spread_takes_the_most_virtual_free_and_stack_the_least() {
        let nodes = [
            node("node-a", "", 30),
            node("node-b", "", 80),
            node("node-c", "", 50),
        ];
        let spread = schedule(&nodes, &req(1)).unwrap();
        assert_eq!(ids(&spread), ["node-b", "node-c", "node-a"]);
        let stack = schedule(
            &nodes,
            &ScheduleRequest {
                placement: Placement::Stack,
                ..req(1)
            },
        )
        .unwrap();
        assert_eq!(ids(&stack), ["node-a", "node-c", "node-b"]);
    }

    #[test]
    fn spread_weighs_thin_by_virtual_free() {
        // Same free space; node-b may over-subscribe 4x, so it has more virtual free.
        let mut b = node("node-b", "", 40);
        b.capacity.max_over_subscription_ratio = 4.0;
        let nodes = [node("node-a", "", 40), b];
        assert_eq!(
            ids(&schedule(&nodes, &req(1)).unwrap()),
            ["node-b", "node-a"]
        );
        let thick = ScheduleRequest {
            provisioning: Provisioning::Thick,
            ..req(1)
        };
        // Thick ignores the ratio: a tie, broken by ID.
        assert_eq!(
            ids(&schedule(&nodes, &thick).unwrap()),
            ["node-a", "node-b"]
        );
    }

    #[test]
    fn fewer_volumes_break_an_even_capacity() {
        let mut a = node("node-a", "", 50);
        a.volume_count = 7;
        let b = node("node-b", "", 50);
        assert_eq!(
            ids(&schedule(&[a, b], &req(1)).unwrap()),
            ["node-b", "node-a"]
        );
    }

    #[test]
    fn ties_go_to_the_smaller_id_whatever_the_input_order() {
        let names = [
            "n-07", "n-03", "n-10", "n-01", "n-05", "n-02", "n-09", "n-04", "n-08", "n-06",
        ];
        let mut nodes: Vec<NodeState> = names.iter().map(|n| node(n, "z1", 50)).collect();
        let first = schedule(&nodes, &req(1)).unwrap();
        assert_eq!(
            ids(&first),
            ["n-01", "n-02", "n-03", "n-04", "n-05", "n-06", "n-07", "n-08", "n-09", "n-10"]
        );
        assert!(
            first.iter().all(|c| c.weight == 0.0),
            "all-equal weighers normalize to 0"
        );
        for _ in 0..5 {
            nodes.rotate_left(3);
            nodes.swap(0, 7);
            assert_eq!(schedule(&nodes, &req(1)).unwrap(), first);
        }
    }

    #[test]
    fn weights_stay_within_the_multipliers() {
        let nodes: Vec<NodeState> = (0..50u64)
            .map(|i| {
                let mut n = node(&format!("node-{i:02}"), &format!("z{}", i % 4), 10 + i);
                n.volume_count = (i * 7 % 13) as u32;
                n
            })
            .collect();
        let r = ScheduleRequest {
            preferred: vec![zone("z2"), zone("z0")],
            ..req(1)
        };
        let got = schedule(&nodes, &r).unwrap();
        assert_eq!(got.len(), 50);
        let max: f64 = WEIGHERS.iter().map(|w| w.multiplier).sum();
        assert!(got.iter().all(|c| (0.0..=max).contains(&c.weight)));
        assert!(got.windows(2).all(|w| w[0].weight >= w[1].weight));
        assert!(got[..12]
            .iter()
            .all(|c| nodes.iter().any(|n| n.id == c.node_id && n.zone == "z2")));
    }

    #[test]
    fn only_capacity_needs_every_rejection_to_be_about_room() {
        let mut limited = node("node-a", "", 50);
        limited.max_volumes = 1;
        limited.volume_count = 1;
        let full = node("node-b", "", 1);
        let err = schedule(&[limited.clone(), full.clone()], &req(10)).unwrap_err();
        assert_eq!(err.rejections.len(), 2);
        assert!(err.only_capacity());

        let mut stale = node("node-c", "", 50);
        stale.last_heartbeat_ms = NOW - 60_000;
        let err = schedule(&[limited, full, stale], &req(10)).unwrap_err();
        assert!(!err.only_capacity());
    }

    #[test]
    fn an_empty_node_list_says_so() {
        let err = schedule(&[], &req(1)).unwrap_err();
        assert_eq!(
            err,
            NoValidNode {
                considered: 0,
                size_bytes: GB,
                provisioning: Provisioning::Thin,
                rejections: vec![]
            }
        );
        assert!(!err.only_capacity());
        assert!(
            err.to_string().contains("no nodes have registered"),
            "{err}"
        );
    }

    #[test]
    fn the_message_lists_every_nodes_reason_in_plain_words_and_says_what_next() {
        let mut stale = node("node-c", "", 50);
        stale.last_heartbeat_ms = NOW - 40_000;
        let mut thin = node("node-b", "", 1);
        thin.capacity.max_over_subscription_ratio = 20.0;
        thin.capacity.reserved_percentage = 0;
        let nodes = [thin, stale, node("node-a", "", 2)];
        let err = schedule(&nodes, &req(100 * 1024)).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("no node can take a 100.0 TiB thin volume. Of 3 nodes, 2 have too little room (node-a: 2.0 GiB free; node-b: room for 20.0 GiB at most: 1.0 GiB free, and thin volumes may add up to 20 times its 100.0 GiB pool (99.0 GiB promised already)), "),
            "{text}"
        );
        assert!(
            text.contains(
                ", 1 is not reporting (node-c: last heartbeat 40s ago, the limit is 30s). Next: free space"
            ),
            "{text}"
        );
        assert!(!text.contains("bytes"), "{text}");
        assert!(
            text.ends_with("check that the cinderblock node plugin runs on the stale nodes"),
            "{text}"
        );
    }

    #[test]
    fn a_large_cluster_lists_the_first_nodes_and_counts_the_rest() {
        let nodes: Vec<NodeState> = (0..25).rev().map(|i| node(&format!("node-{i:02}"), "", 1)).collect();
        let r = ScheduleRequest { provisioning: Provisioning::Thick, ..req(10) };
        let err = schedule(&nodes, &r).unwrap_err();
        let (_, count, reasons) = &err.rejections[0];
        assert_eq!(*count, 25);
        assert_eq!(reasons.len(), LISTED);
        assert_eq!(reasons[0], "node-00: 1.0 GiB free");
        assert_eq!(reasons[LISTED - 1], "node-09: 1.0 GiB free");
        assert!(err.to_string().contains("node-09: 1.0 GiB free; and 15 more)"), "{err}");
    }

    #[test]
    fn the_sort_key_orders_weights_high_first_and_round_trips() {
        let weights = [7.0, 0.0, -0.0, 1e-300, 2.5, -3.0, 1e300, 0.75];
        for w in weights {
            assert_eq!(weight_of(descending(w)), w + 0.0);
        }
        assert_eq!(descending(0.0), descending(-0.0));
        let mut sorted = weights;
        sorted.sort_by_key(|w| descending(*w));
        assert_eq!(sorted, [1e300, 7.0, 2.5, 0.75, 1e-300, 0.0, -0.0, -3.0]);
    }

    #[test]
    fn node_segments_and_matches() {
        let zoned = node("node-a", "z1", 50);
        let bare = node("node-b", "", 50);
        let mut both = zone("z1");
        both.insert(TOPOLOGY_NODE_KEY.to_string(), "node-a".to_string());
        assert_eq!(node_segments(&zoned), both);
        assert_eq!(node_segments(&bare), on_node("node-b"));

        assert!(matches(&zoned, &both));
        assert!(matches(&zoned, &zone("z1")));
        assert!(matches(&zoned, &Segments::new()));
        assert!(!matches(&zoned, &zone("z2")));
        assert!(!matches(&bare, &zone("")));
        assert!(!matches(
            &bare,
            &[("other".to_string(), "x".to_string())].into()
        ));
        assert!(matches(&bare, &node_segments(&bare)));
    }

    #[test]
    fn the_topology_index_agrees_with_matches() {
        let nodes = [
            node("node-a", "z1", 50),
            node("node-b", "z2", 50),
            node("node-c", "", 50),
            node("node-d", "z1", 50),
            // The store never holds two nodes with one ID, but the index
            // should not depend on it.
            node("node-a", "z2", 50),
            node("node-c", "", 50),
        ];
        let mut a_in_z2 = zone("z2");
        a_in_z2.insert(TOPOLOGY_NODE_KEY.to_string(), "node-a".to_string());
        let mut d_in_z1 = zone("z1");
        d_in_z1.insert(TOPOLOGY_NODE_KEY.to_string(), "node-d".to_string());
        let entries = [
            on_node("node-c"),
            a_in_z2,
            zone(""),
            [("x".to_string(), "y".to_string())].into(),
            zone("z1"),
            d_in_z1,
            on_node("node-b"),
            Segments::new(),
            on_node("node-a"),
        ];
        // Every contiguous slice of the entries, so positions and the empty entry move around.
        for start in 0..entries.len() {
            for end in start..=entries.len() {
                let list = &entries[start..end];
                let index = TopologyIndex::new(list, &nodes, &mut None);
                for (at, n) in nodes.iter().enumerate() {
                    let linear = list.iter().position(|s| matches(n, s)).map(|p| p as u32);
                    assert_eq!(index.first_match(n, at), linear, "{} in {list:?}", n.id);
                }
            }
        }
    }

    #[test]
    fn a_node_per_entry_topology_list_schedules_the_selected_node() {
        // What the external provisioner sends with non-strict topology and
        // WaitForFirstConsumer: every node's topology, the selected one first.
        let nodes: Vec<NodeState> = (0..200)
            .map(|i| node(&format!("node-{i:03}"), &format!("z{}", i % 3), 20 + i % 50))
            .collect();
        let all: Vec<Segments> = nodes.iter().map(node_segments).collect();
        let mut preferred = all.clone();
        preferred.swap(0, 117);
        let r = ScheduleRequest {
            requisite: all,
            preferred,
            ..req(1)
        };
        let got = schedule(&nodes, &r).unwrap();
        assert_eq!(got.len(), 200);
        assert_eq!(got[0].node_id, "node-117");
    }

    /// A fixed-seed generator for the randomized tests (SplitMix64).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
        fn pick<T: Copy>(&mut self, items: &[T]) -> T {
            items[self.below(items.len())]
        }
        fn chance(&mut self, percent: usize) -> bool {
            self.below(100) < percent
        }
        fn shuffle<T>(&mut self, items: &mut [T]) {
            for i in (1..items.len()).rev() {
                items.swap(i, self.below(i + 1));
            }
        }
    }

    const ZONES: [&str; 4] = ["", "z1", "z2", "z3"];

    /// Up to 60 nodes: half the time with ascending unique IDs (what the
    /// store lists), else IDs in any order and sometimes repeated. Few
    /// distinct figures, so that weights often tie.
    fn random_nodes(rng: &mut Rng) -> Vec<NodeState> {
        let count = rng.below(61);
        let ascending = rng.chance(50);
        (0..count)
            .map(|i| {
                let id = if ascending {
                    format!("node-{i:03}")
                } else {
                    format!("n{}", rng.below(count + count / 4 + 1))
                };
                let free = rng.pick(&[0, 5, 20, 50, 50, 90]);
                let mut n = node(&id, rng.pick(&ZONES), free);
                n.capacity.provisioned += rng.pick(&[0, 10, 150]) * GB;
                n.capacity.max_over_subscription_ratio = rng.pick(&[1.0, 1.0, 2.0, 0.5]);
                n.capacity.reserved_percentage = rng.pick(&[0, 0, 10]);
                n.volume_count = rng.pick(&[0, 0, 3, 10]);
                n.max_volumes = rng.pick(&[0, 0, 10]);
                n.last_heartbeat_ms = rng.pick(&[NOW - 1_000, NOW, NOW - 60_000, 0]);
                n
            })
            .collect()
    }

    /// A node ID: usually one of the nodes', sometimes one no node has.
    fn random_id(rng: &mut Rng, nodes: &[NodeState]) -> String {
        if nodes.is_empty() || rng.chance(10) {
            format!("ghost-{}", rng.below(3))
        } else {
            nodes[rng.below(nodes.len())].id.clone()
        }
    }

    /// One entry of any kind: empty, node, zone (some no node is in, and
    /// the empty zone), node and zone (agreeing or not), an unknown key, or
    /// a node's own topology.
    fn random_entry(rng: &mut Rng, nodes: &[NodeState]) -> Segments {
        match rng.below(6) {
            0 => Segments::new(),
            1 => on_node(&random_id(rng, nodes)),
            2 => zone(rng.pick(&["z1", "z2", "z3", "z4", ""])),
            3 => {
                let mut entry = zone(rng.pick(&ZONES));
                entry.insert(TOPOLOGY_NODE_KEY.to_string(), random_id(rng, nodes));
                entry
            }
            4 => {
                let mut entry = on_node(&random_id(rng, nodes));
                entry.insert(
                    "topology.kubernetes.io/region".to_string(),
                    "r1".to_string(),
                );
                entry
            }
            _ => match nodes.len() {
                0 => Segments::new(),
                count => node_segments(&nodes[rng.below(count)]),
            },
        }
    }

    /// Empty, a few mixed entries, or an entry per node as the external
    /// provisioner sends it: in node order, rotated, shuffled, or with
    /// entries missing and others mixed in.
    fn random_list(rng: &mut Rng, nodes: &[NodeState]) -> Vec<Segments> {
        let mut per_node: Vec<Segments> = nodes.iter().map(node_segments).collect();
        match rng.below(6) {
            0 => Vec::new(),
            1 => (0..rng.below(12))
                .map(|_| random_entry(rng, nodes))
                .collect(),
            2 => per_node,
            3 => {
                per_node.rotate_left(rng.below(nodes.len().max(1)));
                per_node
            }
            4 => {
                rng.shuffle(&mut per_node);
                per_node
            }
            _ => {
                per_node.retain(|_| rng.chance(80));
                for _ in 0..rng.below(6) {
                    let at = rng.below(per_node.len() + 1);
                    per_node.insert(at, random_entry(rng, nodes));
                }
                per_node
            }
        }
    }

    fn random_request(rng: &mut Rng, nodes: &[NodeState]) -> ScheduleRequest {
        ScheduleRequest {
            size_bytes: rng.pick(&[1, 10, 30, 60]) * GB,
            provisioning: rng.pick(&[Provisioning::Thin, Provisioning::Thick]),
            requisite: random_list(rng, nodes),
            preferred: random_list(rng, nodes),
            pinned_node: rng.chance(10).then(|| random_id(rng, nodes)),
            tried: (0..rng.pick(&[0, 0, 1, 3]))
                .map(|_| random_id(rng, nodes))
                .collect(),
            placement: rng.pick(&[Placement::Spread, Placement::Stack]),
            heartbeat_timeout_ms: rng.pick(&[30_000, 0]),
            ..req(0)
        }
    }

    #[test]
    fn schedule_best_is_the_head_of_schedule() {
        let mut rng = Rng(0x5eed);
        let (mut chosen, mut tied, mut refused) = (0, 0, 0);
        for case in 0..5000 {
            let nodes = random_nodes(&mut rng);
            let r = random_request(&mut rng, &nodes);
            match (schedule(&nodes, &r), schedule_best(&nodes, &r)) {
                (Ok(all), Ok(best)) => {
                    assert_eq!(best, all[0], "case {case}: {nodes:?} {r:?}");
                    chosen += 1;
                    if all.len() > 1 && all[1].weight == best.weight {
                        tied += 1;
                    }
                }
                (Err(all), Err(best)) => {
                    assert_eq!(best, all, "case {case}: {nodes:?} {r:?}");
                    refused += 1;
                }
                (all, best) => panic!("case {case}: schedule {all:?}, schedule_best {best:?}"),
            }
        }
        // Both outcomes, and a best that only the ID picks, many times over.
        assert!(
            chosen > 1000 && tied > 200 && refused > 500,
            "{chosen} chosen ({tied} tied), {refused} refused"
        );
    }

    #[test]
    fn the_topology_index_agrees_with_matches_on_random_lists() {
        let mut rng = Rng(0x70b0);
        for case in 0..3000 {
            let nodes = random_nodes(&mut rng);
            let lists = [random_list(&mut rng, &nodes), random_list(&mut rng, &nodes)];
            // Two lists share the node lookup, as in a request.
            let mut ids = None;
            let indexes = lists
                .each_ref()
                .map(|list| TopologyIndex::new(list, &nodes, &mut ids));
            for (list, index) in lists.iter().zip(&indexes) {
                for (at, n) in nodes.iter().enumerate() {
                    let linear = list.iter().position(|s| matches(n, s)).map(|p| p as u32);
                    assert_eq!(
                        index.first_match(n, at),
                        linear,
                        "case {case}: {} in {list:?}",
                        n.id
                    );
                }
            }
        }
    }

    #[test]
    fn an_infinite_ratio_does_not_poison_the_weights() {
        let mut odd = node("node-a", "", 50);
        odd.capacity.max_over_subscription_ratio = f64::INFINITY;
        let nodes = [odd, node("node-b", "", 50), node("node-c", "", 10)];
        let got = schedule(&nodes, &req(1)).unwrap();
        assert!(got.iter().all(|c| c.weight.is_finite()), "{got:?}");
        assert_eq!(ids(&got), ["node-a", "node-b", "node-c"]);
    }
}
