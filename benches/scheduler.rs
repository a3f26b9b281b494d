//! How long one scheduling decision takes at 100, 1,000 and 10,000 nodes.
//!
//! `cargo bench --bench scheduler [-- FILTER]`. Plain `Instant` timing, no
//! framework: each size runs a few warm-up decisions, then times each
//! decision on its own and prints the median and p99, for `schedule` (the
//! ranked list) and `schedule_best` (the winner only) on a node list in ID
//! order, and for what the controller calls: a placement through the node
//! view (which keeps its nodes sorted whatever order they registered in,
//! and reserves the size), with the nodes registered in ID order and
//! shuffled, and `schedule_best` on the shuffled list itself for contrast.
//! With FILTER, only the requests whose name contains it run (for a
//! profiler).

use std::hint::black_box;
use std::time::{Duration, Instant};

use cinderblock::controller::records::NodeRec;
use cinderblock::csi;
use cinderblock::scheduler::{
    node_segments, schedule, schedule_best, Entry, NodeState, NodeView, Placement, ScheduleRequest, Segments, TopologyList,
};
use cinderblock::store::follow::Follower;
use cinderblock::store::{Change, Kind, Versioned};
use cinderblock::volume::{PoolCapacity, Provisioning};
use cinderblock::{TOPOLOGY_NODE_KEY, TOPOLOGY_ZONE_KEY};

const GB: u64 = 1 << 30;
const NOW: i64 = 1_700_000_000_000;
const ZONES: u64 = 8;

/// A small fixed-seed generator, so every run sees the same cluster.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn cluster(n: usize) -> Vec<NodeState> {
    let mut rng = SplitMix(n as u64);
    (0..n)
        .map(|i| {
            let total = (500 + rng.below(3500)) * GB;
            let free = total / 100 * rng.below(101);
            let ratio = [1.0, 1.0, 2.0, 5.0][rng.below(4) as usize];
            let zone = match rng.below(ZONES + 1) {
                ZONES => String::new(), // a few nodes without a zone
                z => format!("zone-{z}"),
            };
            let stale = rng.below(100) == 0;
            NodeState {
                id: format!("node-{i:05}"),
                zone,
                capacity: PoolCapacity {
                    total,
                    free,
                    provisioned: (total - free) + total / 100 * rng.below(50),
                    max_over_subscription_ratio: ratio,
                    reserved_percentage: [0, 5, 10][rng.below(3) as usize],
                },
                volume_count: rng.below(300) as u32,
                max_volumes: if rng.below(2) == 0 { 0 } else { 256 },
                last_heartbeat_ms: if stale { NOW - 120_000 } else { NOW - rng.below(10_000) as i64 },
                reflink: rng.below(2) == 0,
            }
        })
        .collect()
}

fn zone(z: u64) -> Segments {
    [(TOPOLOGY_ZONE_KEY.to_string(), format!("zone-{z}"))].into()
}

fn base() -> ScheduleRequest {
    ScheduleRequest {
        size_bytes: 100 * GB,
        provisioning: Provisioning::Thin,
        tried: vec!["node-00003".into()],
        now_ms: NOW,
        heartbeat_timeout_ms: 30_000,
        ..Default::default()
    }
}

const PER_NODE: &str = "per-node lists, sorted";

/// The requests timed at each size.
fn scenarios(nodes: &[NodeState]) -> Vec<(&'static str, ScheduleRequest)> {
    // Non-strict topology with WaitForFirstConsumer: the external provisioner
    // lists every node's topology, the selected node first.
    let every_node: Vec<Segments> = nodes.iter().map(node_segments).collect();
    let mut selected_first = every_node.clone();
    selected_first.swap(0, nodes.len() / 2);
    // The same lists in no order: not what the external provisioner sends
    // (it sorts them), but what the scheduler pays when the order gives
    // its lookups nothing to go on.
    let mut rng = SplitMix(!(nodes.len() as u64));
    let mut shuffled = [every_node.clone(), every_node.clone()];
    for list in &mut shuffled {
        for i in (1..list.len()).rev() {
            list.swap(i, rng.below(i as u64 + 1) as usize);
        }
    }
    let [any_order, any_order_preferred] = shuffled;
    vec![
        (
            "zones, spread",
            ScheduleRequest { requisite: vec![zone(1), zone(3), zone(5)].into(), preferred: vec![zone(3), zone(1)].into(), ..base() },
        ),
        ("no topology, stack", ScheduleRequest { placement: Placement::Stack, ..base() }),
        (PER_NODE, ScheduleRequest { requisite: every_node.into(), preferred: selected_first.into(), ..base() }),
        ("per-node lists, shuffled", ScheduleRequest { requisite: any_order.into(), preferred: any_order_preferred.into(), ..base() }),
        ("nothing fits", ScheduleRequest { size_bytes: 1 << 60, provisioning: Provisioning::Thick, ..base() }),
    ]
}

/// Median and p99 of `runs` timed calls, after a few untimed ones.
fn time<T>(runs: usize, mut call: impl FnMut() -> T) -> (Duration, Duration) {
    for _ in 0..runs / 10 {
        black_box(call());
    }
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let start = Instant::now();
            let out = call();
            let took = start.elapsed();
            black_box(out);
            took
        })
        .collect();
    times.sort_unstable();
    (percentile(&times, 0.5), percentile(&times, 0.99))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn micros(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

/// What any reader of the per-node lists pays: every entry and the last
/// byte of its value touched, once. The floor under the "per-node lists" row.
fn read_lists(req: &ScheduleRequest) -> usize {
    req.requisite
        .iter()
        .chain(req.preferred.iter())
        .map(|entry| match entry {
            Entry::Node(v) | Entry::Zone(v) | Entry::NodeInZone { node: v, .. } => usize::from(v.as_bytes().last().copied().unwrap_or(0)),
            Entry::Any | Entry::Never => 0,
        })
        .sum()
}

/// The request's lists as CSI's CreateVolume carries them: one map per entry.
fn as_csi(list: &TopologyList) -> Vec<csi::Topology> {
    list.iter()
        .map(|entry| {
            let segments = match entry {
                Entry::Node(n) => vec![(TOPOLOGY_NODE_KEY, n)],
                Entry::NodeInZone { node, zone } => vec![(TOPOLOGY_NODE_KEY, node), (TOPOLOGY_ZONE_KEY, zone)],
                _ => unreachable!("the per-node lists name nodes"),
            };
            csi::Topology { segments: segments.into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() }
        })
        .collect()
}

/// What the controller does with each CreateVolume before it schedules:
/// both lists made from the message, as its gRPC service does.
fn make_lists(requisite: &[csi::Topology], preferred: &[csi::Topology]) -> (TopologyList, TopologyList) {
    let compact =
        |list: &[csi::Topology]| TopologyList::build(list.iter().map(|t| t.segments.iter().map(|(k, v)| (k.as_str(), v.as_str()))));
    (compact(requisite), compact(preferred))
}

/// A node view filled with `nodes` in the given order, as registrations
/// would fill it.
fn view_of(nodes: &[NodeState]) -> NodeView {
    let view = NodeView::new(Duration::from_secs(60));
    for n in nodes {
        let rec = NodeRec::of_state(n);
        let value = serde_json::to_vec(&rec).unwrap();
        view.apply(Change::Record { kind: Kind::Node, id: n.id.clone(), value: Some(Versioned { version: 1, value }) });
    }
    view
}

fn shuffled(nodes: &[NodeState]) -> Vec<NodeState> {
    let mut out = nodes.to_vec();
    let mut rng = SplitMix(0x5eed ^ nodes.len() as u64);
    for i in (1..out.len()).rev() {
        out.swap(i, rng.below(i as u64 + 1) as usize);
    }
    out
}

fn main() {
    // `cargo bench` passes `--bench`; the first other argument filters.
    let filter = std::env::args().skip(1).find(|a| !a.starts_with("--")).unwrap_or_default();
    println!("{:>7}  {:<24} {:>8} {:>6}  {:>23}  {:>23}", "nodes", "request", "passing", "runs", "schedule", "schedule_best");
    println!("{:>7}  {:<24} {:>8} {:>6}  {:>11} {:>11}  {:>11} {:>11}", "", "", "", "", "median", "p99", "median", "p99");
    for (size, runs) in [(100, 2000), (1_000, 1000), (10_000, 200)] {
        let nodes = cluster(size);
        for (name, req) in scenarios(&nodes) {
            if !name.contains(filter.as_str()) {
                continue;
            }
            let all = schedule(&nodes, &req);
            let best = schedule_best(&nodes, &req);
            assert_eq!(best, all.clone().map(|c| c[0].clone()), "{size} nodes, {name}");
            let passing = all.map_or(0, |c| c.len());
            let (median, p99) = time(runs, || schedule(black_box(&nodes), black_box(&req)).ok());
            let (best_median, best_p99) = time(runs, || schedule_best(black_box(&nodes), black_box(&req)).ok());
            println!(
                "{size:>7}  {name:<24} {passing:>8} {runs:>6}  {:>11} {:>11}  {:>11} {:>11}",
                micros(median),
                micros(p99),
                micros(best_median),
                micros(best_p99)
            );
            // Through the node view (place, then give the reservation
            // back), registered in ID order and shuffled; and the plain
            // function on the shuffled list.
            let mixed = shuffled(&nodes);
            for (order, view) in [("in ID order", view_of(&nodes)), ("shuffled", view_of(&mixed))] {
                let (median, p99) = time(runs, || view.place("vol-bench", black_box(&req)).ok().map(|r| r.node_id.clone()));
                let label = format!("  view, {order}");
                println!("{size:>7}  {label:<24} {:>8} {runs:>6}  {:>11} {:>11}  {:>11} {:>11}", "-", "", "", micros(median), micros(p99));
            }
            let (median, p99) = time(runs, || schedule_best(black_box(&mixed), black_box(&req)).ok());
            println!(
                "{size:>7}  {:<24} {:>8} {runs:>6}  {:>11} {:>11}  {:>11} {:>11}",
                "  list shuffled",
                "-",
                "",
                "",
                micros(median),
                micros(p99)
            );
            if name == PER_NODE {
                let (median, p99) = time(runs, || read_lists(black_box(&req)));
                let name = "  (reading them alone)";
                println!("{size:>7}  {name:<24} {:>8} {runs:>6}  {:>11} {:>11}", "-", micros(median), micros(p99));
                let (requisite, preferred) = (as_csi(&req.requisite), as_csi(&req.preferred));
                assert_eq!(make_lists(&requisite, &preferred), (req.requisite.clone(), req.preferred.clone()));
                let (median, p99) = time(runs, || make_lists(black_box(&requisite), black_box(&preferred)));
                let name = "  (made from CSI's maps)";
                println!("{size:>7}  {name:<24} {:>8} {runs:>6}  {:>11} {:>11}", "-", micros(median), micros(p99));
            }
        }
    }
}
