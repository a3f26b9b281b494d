//! The weighers: how the nodes that pass every filter are ranked.

use super::{Context, NodeState, Placement};

/// One weigher: a raw figure per node (higher = better), scaled to 0..1 over
/// the passing nodes, times the multiplier.
pub(super) struct Weigher {
    #[allow(dead_code)] // for reading the list, and for debugging
    name: &'static str,
    pub(super) multiplier: f64,
    /// The node, its place in `nodes`, the request.
    pub(super) raw: fn(&NodeState, usize, &Context) -> f64,
}

/// The preferred-topology multiplier outweighs the other two together
/// (each at most 1): the first preferred entry is the node the pod was
/// scheduled to (WaitForFirstConsumer), and a node-local volume anywhere
/// else is useless to it. Its raw figure is 1/(1 + position), so the gap
/// between the best and any other position is at least half the scale.
pub(super) const WEIGHERS: [Weigher; 3] = [
    Weigher { name: "preferred-topology", multiplier: 5.0, raw: preferred_order },
    Weigher { name: "capacity", multiplier: 1.0, raw: virtual_free },
    Weigher { name: "volume-count", multiplier: 1.0, raw: fewer_volumes },
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
pub(super) fn sane(x: f64) -> f64 {
    if x.is_nan() {
        0.0
    } else {
        x.clamp(-1e300, 1e300)
    }
}

pub(super) struct Scored {
    /// Into `nodes`; u32 keeps the rows small (no cluster has 4 billion nodes).
    pub(super) index: u32,
    pub(super) raw: [f64; WEIGHERS.len()],
}

/// The nodes that pass every filter, with each weigher's smallest and
/// largest raw figure among them, gathered in the same pass.
pub(super) struct Passing {
    pub(super) rows: Vec<Scored>,
    /// Per weigher, (min, max).
    bounds: [(f64, f64); WEIGHERS.len()],
}

impl Passing {
    pub(super) fn with_capacity(n: usize) -> Passing {
        Passing { rows: Vec::with_capacity(n), bounds: [(f64::INFINITY, f64::NEG_INFINITY); WEIGHERS.len()] }
    }

    /// `raw` has been through `sane`: no NaN, so plain comparisons agree
    /// with `f64::min` and `max`.
    pub(super) fn push(&mut self, index: usize, raw: [f64; WEIGHERS.len()]) {
        for (x, (min, max)) in raw.iter().zip(self.bounds.iter_mut()) {
            if *x < *min {
                *min = *x;
            }
            if *x > *max {
                *max = *x;
            }
        }
        self.rows.push(Scored { index: index as u32, raw });
    }
}

/// Each passing node's total weight, in `passing.rows` order: per weigher,
/// min-max normalization as Cinder does it (all equal: 0), times the multiplier.
pub(super) fn weigh(passing: &Passing) -> impl Iterator<Item = f64> + '_ {
    let mut scale = [(0.0, 0.0, 0.0); WEIGHERS.len()];
    for ((w, weigher), (min, max)) in WEIGHERS.iter().enumerate().zip(passing.bounds) {
        scale[w] = (min, max - min, weigher.multiplier);
    }
    passing.rows.iter().map(move |s| {
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
pub(super) fn descending(weight: f64) -> u64 {
    let bits = (weight + 0.0).to_bits(); // + 0.0: -0.0 becomes 0.0, a tie
    let ascending = if bits >> 63 == 1 { !bits } else { bits | 1 << 63 };
    !ascending
}

pub(super) fn weight_of(key: u64) -> f64 {
    let ascending = !key;
    f64::from_bits(if ascending >> 63 == 1 { ascending & !(1 << 63) } else { !ascending })
}
