use super::filters::*;
use super::topology::TopologyIndex;
use super::weighers::*;
use super::*;
use crate::{TOPOLOGY_NODE_KEY, TOPOLOGY_ZONE_KEY};

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
    ScheduleRequest { size_bytes: size_gb * GB, now_ms: NOW, heartbeat_timeout_ms: 30_000, ..Default::default() }
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
    assert_eq!(only_rejection(&err), (HEALTHY, 1, "node-c: last heartbeat 40s ago, the limit is 30s"));
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
    let off = ScheduleRequest { heartbeat_timeout_ms: 0, ..req(1) };
    assert!(schedule(&[n], &off).is_ok());
}

#[test]
fn topology_keeps_only_requisite_matches() {
    let nodes = [node("node-a", "z1", 50), node("node-b", "z2", 50), node("node-c", "", 50)];
    let r = ScheduleRequest { requisite: vec![zone("z2")].into(), ..req(1) };
    assert_eq!(ids(&schedule(&nodes, &r).unwrap()), ["node-b"]);

    // Any one entry is enough; a node entry matches by ID.
    let r = ScheduleRequest { requisite: vec![zone("z2"), on_node("node-c")].into(), ..req(1) };
    let got = schedule(&nodes, &r).unwrap();
    let mut got = ids(&got);
    got.sort();
    assert_eq!(got, ["node-b", "node-c"]);

    // All keys of an entry must match.
    let mut both = zone("z1");
    both.insert(TOPOLOGY_NODE_KEY.to_string(), "node-b".to_string());
    let r = ScheduleRequest { requisite: vec![both].into(), ..req(1) };
    let err = schedule(&nodes, &r).unwrap_err();
    assert_eq!(only_rejection(&err).0, TOPOLOGY);
    assert_eq!(only_rejection(&err).1, 3);
    assert_eq!(only_rejection(&err).2, "node-a (zone z1) matches none of the 1 requisite topology");
    assert!(!err.only_capacity());
}

#[test]
fn topology_with_an_unknown_key_matches_nothing() {
    let nodes = [node("node-a", "z1", 50)];
    let mut foreign = zone("z1");
    foreign.insert("topology.kubernetes.io/region".to_string(), "r1".to_string());
    let r = ScheduleRequest { requisite: vec![foreign].into(), ..req(1) };
    let err = schedule(&nodes, &r).unwrap_err();
    assert_eq!(only_rejection(&err).2, "node-a (zone z1) matches none of the 1 requisite topology");
}

#[test]
fn capacity_rejects_a_full_pool_with_the_shortfall() {
    let nodes = [node("node-a", "z1", 5), node("node-b", "z1", 20)];
    assert_eq!(ids(&schedule(&nodes, &req(10)).unwrap()), ["node-b"]);

    let r = ScheduleRequest { provisioning: Provisioning::Thick, ..req(30) };
    let err = schedule(&nodes, &r).unwrap_err();
    let (name, count, example) = only_rejection(&err);
    assert_eq!((name, count), (CAPACITY, 2));
    assert_eq!(example, "node-a: 5.0 GiB free");
    assert_eq!(err.rejections[0].2[1], "node-b: 20.0 GiB free");
    assert!(err.only_capacity());
    let text = err.to_string();
    assert!(
        text.starts_with(
            "no node can take a 30.0 GiB thick volume. Of 2 nodes, 2 have too little room (node-a: 5.0 GiB free; node-b: 20.0 GiB free)"
        ),
        "{text}"
    );
}

#[test]
fn capacity_uses_the_thin_formula() {
    // free 10 of 100, ratio 3: thin 25 GB fits (provisioned 90 + 25 <= 300).
    let mut n = node("node-a", "", 10);
    n.capacity.max_over_subscription_ratio = 3.0;
    assert!(schedule(std::slice::from_ref(&n), &req(25)).is_ok());
    let thick = ScheduleRequest { provisioning: Provisioning::Thick, ..req(25) };
    assert_eq!(only_rejection(&schedule(&[n], &thick).unwrap_err()).0, CAPACITY);
}

#[test]
fn affinity_keeps_only_the_pinned_node() {
    let nodes = [node("node-a", "z1", 90), node("node-b", "z1", 10)];
    let r = ScheduleRequest { pinned_node: Some("node-b".into()), ..req(1) };
    assert_eq!(ids(&schedule(&nodes, &r).unwrap()), ["node-b"]);

    let r = ScheduleRequest { pinned_node: Some("node-b".into()), ..req(50) };
    let err = schedule(&nodes, &r).unwrap_err();
    assert_eq!(err.considered, 2);
    assert_eq!(err.rejections[0].0, AFFINITY);
    assert_eq!(err.rejections[0].2, ["node-a: the source lives on node-b, and the volume must be made there"]);
    assert_eq!(err.rejections[1].0, CAPACITY);
    assert_eq!(err.rejections[1].2, ["node-b: 10.0 GiB free"]);
    assert!(!err.only_capacity());
}

#[test]
fn tried_nodes_are_excluded() {
    let nodes = [node("node-a", "z1", 90), node("node-b", "z1", 50), node("node-c", "z1", 10)];
    let r = ScheduleRequest { tried: vec!["node-a".into()], ..req(1) };
    assert_eq!(ids(&schedule(&nodes, &r).unwrap()), ["node-b", "node-c"]);

    let r = ScheduleRequest { tried: vec!["node-a".into(), "node-b".into(), "node-c".into()], ..req(1) };
    let err = schedule(&nodes, &r).unwrap_err();
    assert_eq!(only_rejection(&err), (TRIED, 3, "node-a: an attempt there failed already"));
}

#[test]
fn volume_limit_rejects_a_full_node_and_zero_means_no_limit() {
    let mut full = node("node-a", "", 50);
    full.volume_count = 10;
    full.max_volumes = 10;
    let mut unlimited = node("node-b", "", 50);
    unlimited.volume_count = 10_000;
    assert_eq!(ids(&schedule(&[full.clone(), unlimited], &req(1)).unwrap()), ["node-b"]);

    let err = schedule(&[full], &req(1)).unwrap_err();
    assert_eq!(only_rejection(&err), (VOLUME_LIMIT, 1, "node-a: holds 10 volumes, its limit is 10"));
    assert!(err.only_capacity());
}

#[test]
fn first_preferred_wins_and_no_match_comes_last() {
    // node-c has by far the most room and fewest volumes, yet preference rules.
    let mut nodes = vec![node("node-a", "z1", 10), node("node-b", "z2", 20), node("node-c", "z3", 90)];
    nodes[0].volume_count = 50;
    let r = ScheduleRequest { preferred: vec![on_node("node-a"), zone("z2")].into(), ..req(1) };
    let got = schedule(&nodes, &r).unwrap();
    assert_eq!(ids(&got), ["node-a", "node-b", "node-c"]);
    assert!(got.windows(2).all(|w| w[0].weight > w[1].weight));
}

#[test]
fn preferred_is_a_preference_not_a_filter() {
    let nodes = [node("node-a", "z1", 5), node("node-b", "z2", 50)];
    let r = ScheduleRequest { preferred: vec![zone("z1")].into(), ..req(10) };
    assert_eq!(ids(&schedule(&nodes, &r).unwrap()), ["node-b"]);
}

#[test]
fn requisite_and_preferred_together() {
    let nodes = [node("node-a", "z1", 90), node("node-b", "z2", 20), node("node-c", "z2", 30)];
    let r =
        ScheduleRequest { requisite: vec![zone("z2"), zone("z3")].into(), preferred: vec![on_node("node-b"), zone("z2")].into(), ..req(1) };
    assert_eq!(ids(&schedule(&nodes, &r).unwrap()), ["node-b", "node-c"]);
}

#[test]
fn spread_takes_the_most_virtual_free_and_stack_the_least() {
    let nodes = [node("node-a", "", 30), node("node-b", "", 80), node("node-c", "", 50)];
    let spread = schedule(&nodes, &req(1)).unwrap();
    assert_eq!(ids(&spread), ["node-b", "node-c", "node-a"]);
    let stack = schedule(&nodes, &ScheduleRequest { placement: Placement::Stack, ..req(1) }).unwrap();
    assert_eq!(ids(&stack), ["node-a", "node-c", "node-b"]);
}

#[test]
fn spread_weighs_thin_by_virtual_free() {
    // Same free space; node-b may over-subscribe 4x, so it has more virtual free.
    let mut b = node("node-b", "", 40);
    b.capacity.max_over_subscription_ratio = 4.0;
    let nodes = [node("node-a", "", 40), b];
    assert_eq!(ids(&schedule(&nodes, &req(1)).unwrap()), ["node-b", "node-a"]);
    let thick = ScheduleRequest { provisioning: Provisioning::Thick, ..req(1) };
    // Thick ignores the ratio: a tie, broken by ID.
    assert_eq!(ids(&schedule(&nodes, &thick).unwrap()), ["node-a", "node-b"]);
}

#[test]
fn fewer_volumes_break_an_even_capacity() {
    let mut a = node("node-a", "", 50);
    a.volume_count = 7;
    let b = node("node-b", "", 50);
    assert_eq!(ids(&schedule(&[a, b], &req(1)).unwrap()), ["node-b", "node-a"]);
}

#[test]
fn ties_go_to_the_smaller_id_whatever_the_input_order() {
    let names = ["n-07", "n-03", "n-10", "n-01", "n-05", "n-02", "n-09", "n-04", "n-08", "n-06"];
    let mut nodes: Vec<NodeState> = names.iter().map(|n| node(n, "z1", 50)).collect();
    let first = schedule(&nodes, &req(1)).unwrap();
    assert_eq!(ids(&first), ["n-01", "n-02", "n-03", "n-04", "n-05", "n-06", "n-07", "n-08", "n-09", "n-10"]);
    assert!(first.iter().all(|c| c.weight == 0.0), "all-equal weighers normalize to 0");
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
    let r = ScheduleRequest { preferred: vec![zone("z2"), zone("z0")].into(), ..req(1) };
    let got = schedule(&nodes, &r).unwrap();
    assert_eq!(got.len(), 50);
    let max: f64 = WEIGHERS.iter().map(|w| w.multiplier).sum();
    assert!(got.iter().all(|c| (0.0..=max).contains(&c.weight)));
    assert!(got.windows(2).all(|w| w[0].weight >= w[1].weight));
    assert!(got[..12].iter().all(|c| nodes.iter().any(|n| n.id == c.node_id && n.zone == "z2")));
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
    assert_eq!(err, NoValidNode { considered: 0, size_bytes: GB, provisioning: Provisioning::Thin, rejections: vec![] });
    assert!(!err.only_capacity());
    assert!(err.to_string().contains("no nodes have registered"), "{err}");
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
    assert!(text.contains(", 1 is not reporting (node-c: last heartbeat 40s ago, the limit is 30s). Next: free space"), "{text}");
    assert!(!text.contains("bytes"), "{text}");
    assert!(text.ends_with("check that the cinderblock node plugin runs on the stale nodes"), "{text}");
}

#[test]
fn a_large_cluster_lists_the_first_nodes_and_counts_the_rest() {
    // Descending, and mixed (7 steps around 25), so the examples get replaced.
    for order in [(0..25).rev().collect::<Vec<u32>>(), (0..25).map(|i| i * 7 % 25).collect()] {
        let nodes: Vec<NodeState> = order.iter().map(|i| node(&format!("node-{i:02}"), "", 1)).collect();
        let r = ScheduleRequest { provisioning: Provisioning::Thick, ..req(10) };
        let err = schedule(&nodes, &r).unwrap_err();
        let (_, count, reasons) = &err.rejections[0];
        assert_eq!(*count, 25);
        let listed: Vec<String> = (0..LISTED).map(|i| format!("node-{i:02}: 1.0 GiB free")).collect();
        assert_eq!(*reasons, listed, "{order:?}");
        assert!(err.to_string().contains("node-09: 1.0 GiB free; and 15 more)"), "{err}");
    }
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
    assert!(!matches(&bare, &[("other".to_string(), "x".to_string())].into()));
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
            let compact = TopologyList::from(list);
            let index = TopologyIndex::new(&compact, &nodes, &mut None);
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
    let nodes: Vec<NodeState> = (0..200).map(|i| node(&format!("node-{i:03}"), &format!("z{}", i % 3), 20 + i % 50)).collect();
    let all: Vec<Segments> = nodes.iter().map(node_segments).collect();
    let mut preferred = all.clone();
    preferred.swap(0, 117);
    let r = ScheduleRequest { requisite: all.into(), preferred: preferred.into(), ..req(1) };
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
            let id = if ascending { format!("node-{i:03}") } else { format!("n{}", rng.below(count + count / 4 + 1)) };
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
            entry.insert("topology.kubernetes.io/region".to_string(), "r1".to_string());
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
        1 => (0..rng.below(12)).map(|_| random_entry(rng, nodes)).collect(),
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
        requisite: random_list(rng, nodes).into(),
        preferred: random_list(rng, nodes).into(),
        pinned_node: rng.chance(10).then(|| random_id(rng, nodes)),
        tried: (0..rng.pick(&[0, 0, 1, 3])).map(|_| random_id(rng, nodes)).collect(),
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
    assert!(chosen > 1000 && tied > 200 && refused > 500, "{chosen} chosen ({tied} tied), {refused} refused");
}

#[test]
fn the_topology_index_agrees_with_matches_on_random_lists() {
    let mut rng = Rng(0x70b0);
    for case in 0..3000 {
        let nodes = random_nodes(&mut rng);
        let lists = [random_list(&mut rng, &nodes), random_list(&mut rng, &nodes)];
        // Two lists share the node lookup, as in a request.
        let mut ids = None;
        let compact = lists.each_ref().map(|list| TopologyList::from(list.as_slice()));
        let indexes = compact.each_ref().map(|list| TopologyIndex::new(list, &nodes, &mut ids));
        for (list, index) in lists.iter().zip(&indexes) {
            for (at, n) in nodes.iter().enumerate() {
                let linear = list.iter().position(|s| matches(n, s)).map(|p| p as u32);
                assert_eq!(index.first_match(n, at), linear, "case {case}: {} in {list:?}", n.id);
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

#[test]
fn a_topology_list_keeps_only_what_a_node_can_match() {
    let mut both = zone("z1");
    both.insert(TOPOLOGY_NODE_KEY.to_string(), "node-a".to_string());
    let foreign: Segments = [("other".to_string(), "x".to_string())].into();
    let list = TopologyList::from(vec![on_node("node-a"), both, zone(""), foreign, Segments::new(), zone("z2")]);
    let entries: Vec<Entry> = list.iter().collect();
    assert_eq!(
        entries,
        [
            Entry::Node("node-a"),
            Entry::NodeInZone { node: "node-a", zone: "z1" },
            Entry::Never,
            Entry::Never,
            Entry::Any,
            Entry::Zone("z2")
        ]
    );
    // A zone volume's list: a zone entry stops naming its node; positions stay.
    let zoned = list.zones_only();
    let zones: Vec<Entry> = zoned.iter().collect();
    assert_eq!(zones[1], Entry::Zone("z1"));
    assert_eq!(zones[0], Entry::Node("node-a"));
    assert_eq!(zones.len(), entries.len());
    // Cloning shares the entries; equality is by what they match.
    assert_eq!(list.clone(), list);
    assert_ne!(list.zones_only(), list);
    assert_eq!(format!("{:?}", TopologyList::from(vec![zone("z1")])), format!("[{{{TOPOLOGY_ZONE_KEY:?}: \"z1\"}}]"));
}

#[test]
fn same_agrees_with_string_equality() {
    let words = [
        "",
        "a",
        "node-1",
        "node-2",
        "node-0001",
        "node-0002",
        "node-00001",
        "abcdefgh",
        "abcdefgi",
        "abcdefghabcdefgh",
        "abcdefghabcdefgx",
    ];
    for a in words {
        for b in words {
            assert_eq!(super::topology::same(a.as_bytes(), b.as_bytes()), a == b, "{a:?} {b:?}");
        }
    }
    // Every length up to 40, each differing in one byte at every position.
    for n in 0..=40usize {
        let a: Vec<u8> = (0..n).map(|i| b'a' + (i % 26) as u8).collect();
        assert!(super::topology::same(&a, &a.clone()), "length {n}");
        for at in 0..n {
            let mut b = a.clone();
            b[at] ^= 0x20;
            assert!(!super::topology::same(&a, &b), "length {n}, byte {at}");
        }
        if n > 0 {
            assert!(!super::topology::same(&a, &a[..n - 1]), "length {n} against {}", n - 1);
        }
    }
}

/// A node record as a registration or report writes it, for the view.
fn report(n: &NodeState) -> crate::store::Change {
    let value = serde_json::to_vec(&crate::controller::records::NodeRec::of_state(n)).unwrap();
    crate::store::Change::Record {
        kind: crate::store::Kind::Node,
        id: n.id.clone(),
        value: Some(crate::store::Versioned { version: 1, value }),
    }
}

#[test]
fn the_view_decides_as_the_sorted_list_whatever_order_nodes_register_and_report_in() {
    use crate::store::follow::Follower;
    let mut rng = Rng(0x71e3);
    let mut nodes: Vec<NodeState> =
        (0..300).map(|i| node(&format!("node-{i:03}"), &format!("z{}", i % 4), 5 + rng.below(90) as u64)).collect();
    // Register one by one in a mixed order: the view lays its list out
    // again several times on the way.
    let view = NodeView::new(std::time::Duration::from_secs(60));
    let mut order: Vec<usize> = (0..nodes.len()).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i + 1));
    }
    for &i in &order {
        view.apply(report(&nodes[i]));
    }
    // Reports: new capacity everywhere, a zone moved, a node gone.
    for n in nodes.iter_mut() {
        n.capacity = pool(100, 5 + rng.below(90) as u64);
    }
    nodes[17].zone = "z9".into();
    for &i in order.iter().rev() {
        view.apply(report(&nodes[i]));
    }
    let gone = nodes.remove(200);
    view.apply(crate::store::Change::Record { kind: crate::store::Kind::Node, id: gone.id, value: None });

    let listed: Vec<String> = view.nodes().into_iter().map(|r| r.id).collect();
    assert_eq!(listed, nodes.iter().map(|n| n.id.clone()).collect::<Vec<_>>());
    let every_node: Vec<Segments> = nodes.iter().map(node_segments).collect();
    // The same lists in no order, naming the node that went too.
    let mut any_order = every_node.clone();
    for i in (1..any_order.len()).rev() {
        any_order.swap(i, rng.below(i + 1));
    }
    any_order.insert(7, [(TOPOLOGY_NODE_KEY.to_string(), "node-200".to_string())].into());
    let requests = [
        req(1),
        ScheduleRequest { requisite: vec![zone("z9")].into(), ..req(1) },
        ScheduleRequest { requisite: every_node.clone().into(), preferred: every_node[150..].to_vec().into(), ..req(1) },
        ScheduleRequest { requisite: any_order[..200].to_vec().into(), preferred: any_order[100..].to_vec().into(), ..req(1) },
    ];
    for r in requests {
        let want = schedule_best(&nodes, &r).unwrap();
        let placed = view.place("vol-1", &r).unwrap();
        assert_eq!((placed.node_id.as_str(), placed.weight), (want.node_id.as_str(), want.weight), "{r:?}");
    }
    // A zone change alone, after decisions have read the view's names: an
    // entry naming the node in its new zone finds it there.
    nodes[17].zone = "z8".into();
    view.apply(report(&nodes[17]));
    let r = ScheduleRequest { requisite: vec![node_segments(&nodes[17])].into(), ..req(1) };
    assert_eq!(schedule_best(&nodes, &r).unwrap().node_id, nodes[17].id);
    assert_eq!(view.place("vol-2", &r).unwrap().node_id, nodes[17].id);
}
