//! Topology: the node's segments, matching, topology lists in the compact
//! form the scheduler reads, and those lists resolved against the nodes
//! once per request.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use super::{NodeState, Segments};
use crate::{TOPOLOGY_NODE_KEY, TOPOLOGY_ZONE_KEY};

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

/// A topology list (a request's requisite or preferred terms) as the
/// scheduler reads it: each entry cut down to the two keys nodes report,
/// every value in one shared string. Made once where the request comes in.
///
/// The external provisioner can send an entry per node of the cluster
/// (non-strict topology); as one map per entry, reading 10,000 of them is
/// a walk through 10,000 scattered allocations, which alone cost more than
/// the rest of a decision. Here it is two flat arrays, and a clone (one per
/// scheduling attempt) shares them.
#[derive(Clone, Default)]
pub struct TopologyList {
    terms: Arc<[Term]>,
    text: Arc<str>,
}

/// One entry; its values are byte ranges of the list's text.
#[derive(Clone, Copy, Debug)]
enum Term {
    /// No keys: every node matches.
    Any,
    /// A key no node reports, or an empty zone: no node matches.
    Never,
    Node(Span),
    Zone(Span),
    NodeInZone {
        node: Span,
        zone: Span,
    },
}

#[derive(Clone, Copy, Debug)]
struct Span {
    start: u32,
    end: u32,
}

/// One entry of a [`TopologyList`], its values borrowed from the list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry<'a> {
    Any,
    Never,
    Node(&'a str),
    Zone(&'a str),
    NodeInZone { node: &'a str, zone: &'a str },
}

impl TopologyList {
    /// From entries of (key, value) pairs, as CSI's `Topology.segments`
    /// holds them. A key other than the node and zone keys makes its entry
    /// match no node, as [`matches`] says.
    pub fn build<'s, E, P>(entries: E) -> TopologyList
    where
        E: IntoIterator<Item = P>,
        P: IntoIterator<Item = (&'s str, &'s str)>,
    {
        entries.into_iter().map(Entry::of).collect()
    }

    pub fn len(&self) -> usize {
        self.terms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = Entry<'_>> + '_ {
        self.terms.iter().map(|t| self.entry(*t))
    }

    fn value(&self, span: Span) -> &str {
        &self.text[span.start as usize..span.end as usize]
    }

    fn entry(&self, term: Term) -> Entry<'_> {
        match term {
            Term::Any => Entry::Any,
            Term::Never => Entry::Never,
            Term::Node(n) => Entry::Node(self.value(n)),
            Term::Zone(z) => Entry::Zone(self.value(z)),
            Term::NodeInZone { node, zone } => Entry::NodeInZone { node: self.value(node), zone: self.value(zone) },
        }
    }

    /// The list for a zone volume: an entry that names a zone stops naming
    /// a node (the volume may live on any pool of the zone). Positions stay.
    pub fn zones_only(&self) -> TopologyList {
        self.iter()
            .map(|entry| match entry {
                Entry::NodeInZone { zone, .. } => Entry::Zone(zone),
                other => other,
            })
            .collect()
    }
}

impl<'a> Entry<'a> {
    /// One entry's (key, value) pairs, cut down to what a node can match.
    fn of(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Entry<'a> {
        let (mut node, mut zone, mut unknown) = (None, None, false);
        for (key, value) in pairs {
            match key {
                TOPOLOGY_NODE_KEY => node = Some(value),
                TOPOLOGY_ZONE_KEY => zone = Some(value),
                _ => unknown = true,
            }
        }
        match (node, zone) {
            // A node without a zone has no zone key, so an empty zone
            // value, like an unknown key, matches nothing.
            _ if unknown || zone == Some("") => Entry::Never,
            (None, None) => Entry::Any,
            (Some(node), None) => Entry::Node(node),
            (None, Some(zone)) => Entry::Zone(zone),
            (Some(node), Some(zone)) => Entry::NodeInZone { node, zone },
        }
    }

    /// The (key, value) pairs this entry stands for; `Never` stands for
    /// many entries, and is shown with a key no node reports.
    fn pairs(self) -> Vec<(&'static str, &'a str)> {
        match self {
            Entry::Any => vec![],
            Entry::Never => vec![("(a key no node reports)", "")],
            Entry::Node(n) => vec![(TOPOLOGY_NODE_KEY, n)],
            Entry::Zone(z) => vec![(TOPOLOGY_ZONE_KEY, z)],
            Entry::NodeInZone { node, zone } => vec![(TOPOLOGY_NODE_KEY, node), (TOPOLOGY_ZONE_KEY, zone)],
        }
    }
}

impl<'a> FromIterator<Entry<'a>> for TopologyList {
    fn from_iter<I: IntoIterator<Item = Entry<'a>>>(entries: I) -> Self {
        let mut text = String::new();
        let mut span = |value: &str| {
            let start = text.len() as u32;
            text.push_str(value);
            Span { start, end: text.len() as u32 }
        };
        let terms: Vec<Term> = entries
            .into_iter()
            .map(|entry| match entry {
                Entry::Any => Term::Any,
                Entry::Never => Term::Never,
                Entry::Node(n) => Term::Node(span(n)),
                Entry::Zone(z) => Term::Zone(span(z)),
                Entry::NodeInZone { node, zone } => Term::NodeInZone { node: span(node), zone: span(zone) },
            })
            .collect();
        TopologyList { terms: terms.into(), text: text.into() }
    }
}

impl FromIterator<Segments> for TopologyList {
    fn from_iter<I: IntoIterator<Item = Segments>>(lists: I) -> Self {
        let lists: Vec<Segments> = lists.into_iter().collect();
        TopologyList::from(lists.as_slice())
    }
}

impl From<&[Segments]> for TopologyList {
    fn from(lists: &[Segments]) -> Self {
        TopologyList::build(lists.iter().map(|s| s.iter().map(|(k, v)| (k.as_str(), v.as_str()))))
    }
}

impl From<Vec<Segments>> for TopologyList {
    fn from(lists: Vec<Segments>) -> Self {
        TopologyList::from(lists.as_slice())
    }
}

/// Equal when every entry matches the same nodes.
impl PartialEq for TopologyList {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl std::fmt::Debug for TopologyList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter().map(|e| DebugEntry(e.pairs()))).finish()
    }
}

struct DebugEntry<'a>(Vec<(&'static str, &'a str)>);

impl std::fmt::Debug for DebugEntry<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.0.iter().map(|(k, v)| (k, v))).finish()
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
pub(super) struct NodeIds<'n> {
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
    /// For nodes known to be in strictly ascending ID order.
    pub(super) fn sorted(nodes: &'n [NodeState]) -> Self {
        NodeIds { nodes, ascending: true, searches: 0, map: None }
    }

    fn new(nodes: &'n [NodeState]) -> Self {
        NodeIds { nodes, ascending: nodes.windows(2).all(|w| w[0].id < w[1].id), searches: 0, map: None }
    }

    /// Calls `visit` with the place of every node whose ID is `id`, and
    /// returns the last place visited. `guess` is where the caller expects
    /// the ID; any value is correct, a good one is faster.
    fn each(&mut self, id: &str, guess: Option<usize>, mut visit: impl FnMut(usize)) -> Option<usize> {
        let nodes = self.nodes;
        let unique = self.ascending || self.map.as_ref().is_some_and(IdMap::unique);
        // With unique IDs, a node found at the guess is the only one.
        let hit = |at: &usize| unique && nodes.get(*at).is_some_and(|n| same(&n.id, id));
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
        self.map.get_or_insert_with(|| IdMap::new(nodes)).each(id, visit)
    }
}

/// `a == b` for short strings such as node IDs, 8 bytes at a time and
/// inline: a list with an entry per node makes one such check per entry,
/// and a call into libc's memcmp for each cost more than the comparing.
pub(super) fn same(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let word = |chunk: &[u8]| u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
    let (mut wa, mut wb) = (a.chunks_exact(8), b.chunks_exact(8));
    if !(&mut wa).zip(&mut wb).all(|(x, y)| word(x) == word(y)) {
        return false;
    }
    wa.remainder().iter().zip(wb.remainder()).all(|(x, y)| x == y)
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
pub(super) struct TopologyIndex<'a> {
    /// The first entry without keys (it matches every node).
    any: Option<u32>,
    by_zone: FastMap<&'a str>,
    /// Per node, the first entry naming it (NONE: none); empty when no
    /// entry names a node.
    by_node: Vec<u32>,
}

impl<'a> TopologyIndex<'a> {
    pub(super) fn new<'n>(list: &'a TopologyList, nodes: &'n [NodeState], ids: &mut Option<NodeIds<'n>>) -> Self {
        let mut index = TopologyIndex::default();
        // Where the next entry naming a node most likely finds it: after the
        // node of the entry before. None once the list has shown it is not
        // in node order, so that a wrong guess does not cost a read per entry.
        let mut guess = Some(0);
        let mut misses = 0;
        for (position, entry) in list.iter().enumerate() {
            let position = position as u32;
            // Entries come in order: the first one to land is the best.
            let (id, zone) = match entry {
                Entry::Never => continue,
                Entry::Any => {
                    index.any.get_or_insert(position);
                    continue;
                }
                Entry::Zone(zone) => {
                    index.by_zone.entry(zone).or_insert(position);
                    continue;
                }
                Entry::Node(id) => (id, None),
                Entry::NodeInZone { node, zone } => (node, Some(zone)),
            };
            if index.by_node.is_empty() {
                index.by_node = vec![NONE; nodes.len()];
            }
            let by_node = &mut index.by_node;
            let ids = ids.get_or_insert_with(|| NodeIds::new(nodes));
            let found = ids.each(id, guess, |at| {
                if by_node[at] == NONE && zone.is_none_or(|z| same(z, &nodes[at].zone)) {
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
        index
    }

    /// `at` is the node's place in the `nodes` the index was built for.
    pub(super) fn first_match(&self, node: &NodeState, at: usize) -> Option<u32> {
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
