//! The filters: which nodes can take the volume at all, and in words why
//! the others cannot.

use super::{Context, NoValidNode, NodeState, ScheduleRequest, LISTED};
use crate::units::format_bytes;
use crate::volume::{Provisioning, Shortfall};

pub(super) const AFFINITY: &str = "affinity";
pub(super) const TRIED: &str = "tried";
pub(super) const TOPOLOGY: &str = "topology";
pub(super) const HEALTHY: &str = "healthy";
pub(super) const VOLUME_LIMIT: &str = "volume-limit";
pub(super) const CAPACITY: &str = "capacity";

/// One filter: a name, a check, what it says of the nodes it turns away
/// (one, many), and what to do about it.
pub(super) struct Filter {
    pub(super) name: &'static str,
    pub(super) one: &'static str,
    pub(super) many: &'static str,
    /// The node, its place in `nodes`, the request.
    pub(super) check: fn(&NodeState, usize, &Context) -> Result<(), Why>,
    pub(super) hint: &'static str,
}

/// The filters, in order; a node is charged to the first that rejects it.
/// Whether a node is a candidate at all (affinity, tried, topology) comes
/// before its state (health), and resources come last, so that a capacity
/// rejection means "the right node, but full" (what `only_capacity` needs).
pub(super) const FILTERS: [Filter; 6] = [
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

fn pinned_node(_node: &NodeState, at: usize, ctx: &Context) -> Result<(), Why> {
    match &ctx.pinned {
        Some(places) if !places.contains(&at) => Err(Why::NotPinned),
        _ => Ok(()),
    }
}

fn not_yet_tried(_node: &NodeState, at: usize, ctx: &Context) -> Result<(), Why> {
    if ctx.tried.contains(&at) {
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
    node.capacity.fits(ctx.req.size_bytes, ctx.req.provisioning).map_err(Why::NoRoom)
}

/// Why a filter turned a node away; cheap to make (no allocation), worded
/// only for the one example per filter that reaches the user.
#[derive(Debug, Clone)]
pub(super) enum Why {
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
                let zone = if node.zone.is_empty() { "no zone".to_string() } else { format!("zone {}", node.zone) };
                let n = req.requisite.len();
                let plural = if n == 1 { "y" } else { "ies" };
                format!("{id} ({zone}) matches none of the {n} requisite topolog{plural}")
            }
            Why::Stale { age_ms } => {
                if node.last_heartbeat_ms <= 0 {
                    format!("{id}: no heartbeat yet")
                } else {
                    format!("{id}: last heartbeat {} ago, the limit is {}", seconds(*age_ms), seconds(req.heartbeat_timeout_ms))
                }
            }
            Why::AtVolumeLimit => format!("{id}: holds {} volumes, its limit is {}", node.volume_count, node.max_volumes),
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
    let reserve = if c.reserved_percentage > 0 { format!(" after keeping {}% in reserve", c.reserved_percentage) } else { String::new() };
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
pub(super) struct Tally {
    count: usize,
    examples: Vec<(usize, Why)>,
    /// Once `examples` is full: which of them has the largest ID, the one a
    /// smaller ID replaces. Kept, so that a node costs one ID comparison.
    largest: usize,
}

impl Tally {
    pub(super) fn record(&mut self, nodes: &[NodeState], index: usize, why: Why) {
        self.count += 1;
        if self.examples.len() < LISTED {
            self.examples.push((index, why));
            if self.examples.len() == LISTED {
                self.largest = self.find_largest(nodes);
            }
            return;
        }
        if nodes[index].id < nodes[self.examples[self.largest].0].id {
            self.examples[self.largest] = (index, why);
            self.largest = self.find_largest(nodes);
        }
    }

    fn find_largest(&self, nodes: &[NodeState]) -> usize {
        (0..self.examples.len()).max_by(|a, b| nodes[self.examples[*a].0].id.cmp(&nodes[self.examples[*b].0].id)).expect("LISTED > 0")
    }
}

pub(super) fn explain(nodes: &[NodeState], req: &ScheduleRequest, tallies: [Tally; FILTERS.len()]) -> NoValidNode {
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
    NoValidNode { considered: nodes.len(), size_bytes: req.size_bytes, provisioning: req.provisioning, rejections }
}
