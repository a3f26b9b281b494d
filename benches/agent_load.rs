//! Does the node plugin stay responsive while its agent is busy? A real
//! `cinderblock node` gets N concurrent CreateVolume calls (clones of a
//! volume filled with data, which copy where the pool has no reflink, and
//! thick volumes, which allocate), while a prober calls Identity Probe and
//! Node NodeGetInfo on the CSI socket every 20 ms, as kubelet and the
//! livenessprobe sidecar do. Prints the probe latencies and the creates'
//! wall time. Nothing is asserted.
//!
//! `cargo bench --bench agent_load`; tune with CINDERBLOCK_BENCH_DIR (where
//! the pool goes; default a temporary folder under /var/tmp),
//! CINDERBLOCK_BENCH_CREATES (default 64) and CINDERBLOCK_BENCH_SIZE_MIB
//! (data per clone and size of each thick volume, default 16).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use cinderblock::agent_proto as pb;
use cinderblock::csi;
use cinderblock::csi::identity_client::IdentityClient;
use cinderblock::csi::node_client::NodeClient;
use common::NodeProcess;

const MIB: u64 = 1 << 20;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[derive(Default)]
struct Samples {
    probe: Vec<Duration>,
    info: Vec<Duration>,
    failures: usize,
}

/// Probe and NodeGetInfo every 20 ms until `stop` says so.
async fn probe_until(endpoint: String, stop: tokio::sync::watch::Receiver<bool>) -> Samples {
    let channel = common::csi_channel(&endpoint).await;
    let mut identity = IdentityClient::new(channel.clone());
    let mut node = NodeClient::new(channel);
    let mut s = Samples::default();
    while !*stop.borrow() {
        let t = Instant::now();
        match identity.probe(csi::ProbeRequest {}).await {
            Ok(_) => s.probe.push(t.elapsed()),
            Err(_) => s.failures += 1,
        }
        let t = Instant::now();
        match node.node_get_info(csi::NodeGetInfoRequest {}).await {
            Ok(_) => s.info.push(t.elapsed()),
            Err(_) => s.failures += 1,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s
}

fn row(what: &str, v: &[Duration]) {
    if v.is_empty() {
        println!("{what:<14} no samples");
        return;
    }
    println!(
        "{what:<14} {:>6} {:>9.2} {:>9.2} {:>9.2}",
        v.len(),
        ms(percentile(v, 0.5)),
        ms(percentile(v, 0.99)),
        ms(*v.iter().max().unwrap())
    );
}

async fn round(node: &NodeProcess, label: &str, requests: Vec<pb::CreateVolumeRequest>) {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let prober = tokio::spawn(probe_until(node.endpoint.clone(), rx));
    tokio::time::sleep(Duration::from_millis(200)).await; // a few idle samples first
    let started = Instant::now();
    let mut tasks = vec![];
    let client = node.client().await;
    for r in requests {
        let mut c = client.clone();
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let ok = c.create_volume(r).await.map_err(|e| e.code());
            (t.elapsed(), ok)
        }));
    }
    let mut durations = vec![];
    let mut errors = std::collections::BTreeMap::new();
    for t in tasks {
        let (d, ok) = t.await.unwrap();
        durations.push(d);
        if let Err(code) = ok {
            *errors.entry(format!("{code:?}")).or_insert(0) += 1;
        }
    }
    let wall = started.elapsed();
    tx.send(true).unwrap();
    let s = prober.await.unwrap();
    println!(
        "\n{label}: {} creates in {:.2} s (each: p50 {:.0} ms, max {:.0} ms){}",
        durations.len(),
        wall.as_secs_f64(),
        ms(percentile(&durations, 0.5)),
        ms(*durations.iter().max().unwrap()),
        if errors.is_empty() { String::new() } else { format!(", errors {errors:?}") }
    );
    println!("{:<14} {:>6} {:>9} {:>9} {:>9}", "call", "count", "p50 ms", "p99 ms", "max ms");
    row("Probe", &s.probe);
    row("NodeGetInfo", &s.info);
    if s.failures > 0 {
        println!("{} probe calls failed", s.failures);
    }
}

#[tokio::main]
async fn main() {
    let creates = env_u64("CINDERBLOCK_BENCH_CREATES", 64) as usize;
    let size = env_u64("CINDERBLOCK_BENCH_SIZE_MIB", 16) * MIB;
    let base = std::env::var_os("CINDERBLOCK_BENCH_DIR").map(std::path::PathBuf::from).unwrap_or_else(|| "/var/tmp".into());
    let dir = tempfile::Builder::new().prefix("cinderblock-agent-load-").tempdir_in(&base).unwrap();
    let pool = dir.path().join("pool");
    let node = NodeProcess::start(&pool, &dir.path().join("csi.sock"), "node-bench", &["--allowed-root", dir.path().to_str().unwrap()]);
    let mut agent = node.client().await;
    agent.create_volume(pb::CreateVolumeRequest { volume_id: "vol-src".into(), size_bytes: size, ..Default::default() }).await.unwrap();
    let status = agent.get_pool_status(pb::GetPoolStatusRequest {}).await.unwrap().into_inner().status.unwrap();
    common::write_pattern(&pool.join("volumes/vol-src.img"), 0, size as usize, 7);
    println!(
        "pool on {} ({}), {} CPUs, load average {}",
        status.filesystem,
        if status.reflink { "reflink" } else { "no reflink: clones copy" },
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );

    use pb::create_volume_request::Source;
    let clones = (0..creates)
        .map(|i| pb::CreateVolumeRequest {
            volume_id: format!("vol-clone-{i}"),
            size_bytes: size,
            source: Some(Source::SourceVolumeId("vol-src".into())),
            ..Default::default()
        })
        .collect();
    round(&node, &format!("{creates} clones of {} MiB", size / MIB), clones).await;
    let thick = (0..creates)
        .map(|i| pb::CreateVolumeRequest {
            volume_id: format!("vol-thick-{i}"),
            size_bytes: size,
            provisioning: pb::Provisioning::Thick as i32,
            ..Default::default()
        })
        .collect();
    round(&node, &format!("{creates} thick volumes of {} MiB", size / MIB), thick).await;
    let thin = (0..creates)
        .map(|i| pb::CreateVolumeRequest { volume_id: format!("vol-thin-{i}"), size_bytes: size, ..Default::default() })
        .collect();
    round(&node, &format!("{creates} thin volumes of {} MiB", size / MIB), thin).await;
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn percentile(v: &[std::time::Duration], p: f64) -> std::time::Duration {
    let mut s = v.to_vec();
    s.sort();
    if s.is_empty() {
        return std::time::Duration::ZERO;
    }
    s[((s.len() as f64 - 1.0) * p).round() as usize]
}
