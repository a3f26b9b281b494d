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

impl Span {
    fn range(self) -> std::ops::Range<usize> {
        self.start as usize..self.end as usize
    }
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
        &self.text[span.range()]
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

/// The nodes' IDs and zones, flat, in `nodes` order: every ID in one byte
/// array, each zone once. The node view keeps one beside its node list
/// (made again only when a node comes, goes or changes zone), because a
/// list with an entry per node compares every entry with a node's ID and
/// zone, and read from each node's own allocations those loads were most
/// of a decision's time (`perf`, docs/benchmarks.md).
#[derive(Debug, Default, Clone)]
pub struct Names {
    /// Every ID, one after the other.
    ids: Vec<u8>,
    /// ID `i` is `ids[id_ends[i]..id_ends[i + 1]]`; `nodes.len() + 1` entries.
    id_ends: Vec<u32>,
    /// Per node, its zone in `zones`.
    zone_of: Vec<u32>,
    /// The distinct zones; the first is "" (no zone).
    zones: Vec<Box<[u8]>>,
}

impl Names {
    pub fn of(nodes: &[NodeState]) -> Names {
        let mut names = Names {
            ids: Vec::with_capacity(nodes.iter().map(|n| n.id.len()).sum()),
            id_ends: Vec::with_capacity(nodes.len() + 1),
            zone_of: Vec::with_capacity(nodes.len()),
            zones: vec![Box::default()],
        };
        let mut known: FastMap<&str> = FastMap::default();
        known.insert("", 0);
        names.id_ends.push(0);
        for node in nodes {
            names.ids.extend_from_slice(node.id.as_bytes());
            names.id_ends.push(u32::try_from(names.ids.len()).expect("node IDs under 4 GiB in all"));
            let zones = &mut names.zones;
            let zone = *known.entry(node.zone.as_str()).or_insert_with(|| {
                zones.push(node.zone.as_bytes().into());
                (zones.len() - 1) as u32
            });
            names.zone_of.push(zone);
        }
        names
    }

    /// How many nodes.
    pub fn count(&self) -> usize {
        self.zone_of.len()
    }

    fn id(&self, at: usize) -> &[u8] {
        &self.ids[self.id_ends[at] as usize..self.id_ends[at + 1] as usize]
    }

    fn zone(&self, at: usize) -> &[u8] {
        &self.zones[self.zone_of[at] as usize]
    }
}

/// A node's ID and zone by its place: from the flat `Names` when the caller
/// keeps them, else from the node itself.
#[derive(Clone, Copy)]
pub(super) struct Lookup<'n> {
    nodes: &'n [NodeState],
    names: Option<&'n Names>,
}

impl<'n> Lookup<'n> {
    pub(super) fn of(nodes: &'n [NodeState]) -> Self {
        Lookup { nodes, names: None }
    }

    /// `names` must be `Names::of(nodes)`.
    pub(super) fn named(nodes: &'n [NodeState], names: &'n Names) -> Self {
        debug_assert_eq!(names.count(), nodes.len());
        Lookup { nodes, names: Some(names) }
    }

    fn len(&self) -> usize {
        self.nodes.len()
    }

    #[inline]
    fn id(&self, at: usize) -> &'n [u8] {
        match self.names {
            Some(names) => names.id(at),
            None => self.nodes[at].id.as_bytes(),
        }
    }

    #[inline]
    fn zone(&self, at: usize) -> &'n [u8] {
        match self.names {
            Some(names) => names.zone(at),
            None => self.nodes[at].zone.as_bytes(),
        }
    }
}

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
    nodes: Lookup<'n>,
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
    pub(super) fn sorted(nodes: Lookup<'n>) -> Self {
        NodeIds { nodes, ascending: true, searches: 0, map: None }
    }

    fn new(nodes: &'n [NodeState]) -> Self {
        let ascending = nodes.windows(2).all(|w| w[0].id < w[1].id);
        NodeIds { nodes: Lookup::of(nodes), ascending, searches: 0, map: None }
    }

    /// Whether each ID is on one node only.
    #[inline]
    fn unique(&self) -> bool {
        self.ascending || self.map.as_ref().is_some_and(IdMap::unique)
    }

    /// The place of a node whose ID is `id`, where the caller expects it;
    /// with unique IDs, the only one. One comparison.
    #[inline]
    fn at_guess(&self, id: &[u8], guess: Option<usize>) -> Option<usize> {
        guess.filter(|&at| self.unique() && at < self.nodes.len() && same(self.nodes.id(at), id))
    }

    /// Calls `visit` with the place of every node whose ID is `id`, and
    /// returns the last place visited: by binary search while the IDs
    /// ascend and the searches are few, else by the map.
    fn each(&mut self, id: &[u8], mut visit: impl FnMut(usize)) -> Option<usize> {
        let nodes = self.nodes;
        if self.ascending && self.map.is_none() && self.searches < SEARCHES {
            self.searches += 1;
            // Byte order is `str`'s order.
            let at = binary_search(nodes, id)?;
            visit(at);
            return Some(at);
        }
        self.map.get_or_insert_with(|| IdMap::new(nodes.nodes)).each(id, visit)
    }
}

/// The place of the node with this ID among nodes in ascending ID order
/// (byte order is `str`'s order).
fn binary_search(nodes: Lookup, id: &[u8]) -> Option<usize> {
    let (mut low, mut high) = (0, nodes.len());
    while low < high {
        let mid = low + (high - low) / 2;
        match nodes.id(mid).cmp(id) {
            std::cmp::Ordering::Less => low = mid + 1,
            std::cmp::Ordering::Greater => high = mid,
            std::cmp::Ordering::Equal => return Some(mid),
        }
    }
    None
}

/// `a == b` for short byte strings such as node IDs and zones, inline and
/// without a loop up to 16 bytes: two loads of each side that overlap in
/// the middle cover every byte. A list with an entry per node makes one or
/// two such checks per entry, and a call into libc's memcmp for each cost
/// more than the comparing.
#[inline(always)]
pub(super) fn same(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    let u64_at = |s: &[u8], at: usize| u64::from_le_bytes(s[at..at + 8].try_into().expect("8 bytes"));
    let u32_at = |s: &[u8], at: usize| u32::from_le_bytes(s[at..at + 4].try_into().expect("4 bytes"));
    match n {
        0 => true,
        // Bytes 0, n/2 and n-1 are every byte.
        1..=3 => a[0] == b[0] && a[n / 2] == b[n / 2] && a[n - 1] == b[n - 1],
        4..=7 => u32_at(a, 0) == u32_at(b, 0) && u32_at(a, n - 4) == u32_at(b, n - 4),
        8..=16 => u64_at(a, 0) == u64_at(b, 0) && u64_at(a, n - 8) == u64_at(b, n - 8),
        _ => a.chunks_exact(8).zip(b.chunks_exact(8)).all(|(x, y)| x == y) && u64_at(a, n - 8) == u64_at(b, n - 8),
    }
}

/// Node ID to place in `nodes`, for IDs in any order, repeated or not.
struct IdMap<'n> {
    /// The last node with each ID.
    last: FastMap<&'n [u8]>,
    /// The previous node with the same ID (NONE at the end); empty while the
    /// IDs are unique, as they are when nodes come from the store.
    previous: Vec<u32>,
}

impl<'n> IdMap<'n> {
    fn new(nodes: &'n [NodeState]) -> Self {
        let mut last = FastMap::with_capacity_and_hasher(nodes.len(), Default::default());
        let mut previous = Vec::new();
        for (at, node) in nodes.iter().enumerate() {
            if let Some(before) = last.insert(node.id.as_bytes(), at as u32) {
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
    fn each(&self, id: &[u8], mut visit: impl FnMut(usize)) -> Option<usize> {
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
        let lookup = ids.as_ref().map_or(Lookup::of(nodes), |ids| ids.nodes);
        let mut index = TopologyIndex::default();
        // Where the next entry naming a node most likely finds it: after the
        // node of the entry before. None once the list has shown it is not
        // in node order, so that a wrong guess does not cost a read per entry.
        let mut guess = Some(0);
        let mut misses = 0;
        // The entries' values as bytes: sliced without the check for a
        // character boundary (the list's own spans are whole values).
        let text = list.text.as_bytes();
        for (position, term) in list.terms.iter().enumerate() {
            let position = position as u32;
            // Entries come in order: the first one to land is the best.
            let (id, zone) = match *term {
                Term::Never => continue,
                Term::Any => {
                    index.any.get_or_insert(position);
                    continue;
                }
                Term::Zone(zone) => {
                    index.by_zone.entry(list.value(zone)).or_insert(position);
                    continue;
                }
                Term::Node(id) => (&text[id.range()], None),
                Term::NodeInZone { node, zone } => (&text[node.range()], Some(&text[zone.range()])),
            };
            if index.by_node.is_empty() {
                index.by_node = vec![NONE; nodes.len()];
            }
            let by_node = &mut index.by_node;
            let ids = ids.get_or_insert_with(|| NodeIds::new(nodes));
            // The usual case, inline: the entry names the node after the
            // last entry's, the only node with that ID. The two arms repeat
            // the same few lines on purpose: one closure shared by both was
            // compiled out of line, and the decision took 5 to 8% longer.
            let hit = ids.at_guess(id, guess);
            let found = match hit {
                Some(at) => {
                    if by_node[at] == NONE && zone.is_none_or(|z| same(z, lookup.zone(at))) {
                        by_node[at] = position;
                    }
                    hit
                }
                None => ids.each(id, |at| {
                    if by_node[at] == NONE && zone.is_none_or(|z| same(z, lookup.zone(at))) {
                        by_node[at] = position;
                    }
                }),
            };
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
