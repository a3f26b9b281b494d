//! Cross-node copy throughput: a snapshot on node-1 of a thin volume holding
//! CINDERBLOCK_BENCH_DATA_MIB (default 1024) in 64 MiB pieces spread over
//! four times that size, restored onto node-2 of a `cinderblock standalone`
//! (the agent's copier over NBD with mutual TLS), in GiB/s of allocated
//! data; beside it, nbdcopy (libnbd-bin, 4 connections) copying the same
//! snapshot image from our NBD server (`cinderblock nbd serve`, plain text)
//! into a file in node-2's pool. Both skip holes. Figures only.
//! `cargo bench --bench crossnode_copy`; CINDERBLOCK_BENCH_DIR (default a
//! temporary folder under /var/tmp).

#[path = "../tests/common/mod.rs"]
#[allow(unused_macros)]
mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cinderblock::csi;
use cinderblock::csi::controller_client::ControllerClient;
use common::*;

const MIB: u64 = 1 << 20;

fn gib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1u64 << 30) as f64 / d.as_secs_f64()
}

fn on(node: &str, name: &str, size: u64) -> csi::CreateVolumeRequest {
    let segments = [(cinderblock::TOPOLOGY_NODE_KEY.to_string(), node.to_string())].into();
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange { required_bytes: size as i64, limit_bytes: 0 }),
        volume_capabilities: vec![rwo_capability(false)],
        accessibility_requirements: Some(csi::TopologyRequirement { requisite: vec![csi::Topology { segments }], preferred: vec![] }),
        ..Default::default()
    }
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let data_mib = std::env::var("CINDERBLOCK_BENCH_DATA_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024u64);
    let base = std::env::var("CINDERBLOCK_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let dir = tempfile::Builder::new().prefix("cinderblock-bench-copy").tempdir_in(&base).unwrap();
    let port = free_port();
    let s = Standalone::start(dir.path(), 2, 1, &["--metrics-addr", &format!("127.0.0.1:{port}")]);
    let mut c = ControllerClient::new(csi_channel(&s.endpoint).await);
    let size = 4 * data_mib * MIB;
    let src = c.create_volume(on("node-1", "src", size)).await.unwrap().into_inner().volume.unwrap();
    let img = s.pool(1).join("volumes").join(format!("{}.img", src.volume_id));
    for i in 0..data_mib / 64 {
        write_pattern(&img, i * 256 * MIB + 4097, 64 * MIB as usize, i as u8);
    }
    let snap = c
        .create_snapshot(csi::CreateSnapshotRequest { name: "snap".into(), source_volume_id: src.volume_id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .snapshot
        .unwrap()
        .snapshot_id;
    let snap_img = s.pool(1).join("snapshots").join(format!("{snap}.img"));
    let allocated: u64 = data_segments(&snap_img).iter().map(|(a, b)| (b - a) as u64).sum();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "source: {} MiB allocated in {} MiB; load average {}",
        allocated / MIB,
        size / MIB,
        load.split(' ').take(3).collect::<Vec<_>>().join(" ")
    );

    // Ours: CreateVolume from the snapshot onto node-2 (schedule, export, copy, finish).
    let mut r = on("node-2", "restored", size);
    r.volume_content_source = Some(csi::VolumeContentSource {
        r#type: Some(csi::volume_content_source::Type::Snapshot(csi::volume_content_source::SnapshotSource { snapshot_id: snap.clone() })),
    });
    let t = Instant::now();
    c.create_volume(r).await.unwrap();
    let ours = t.elapsed();
    let text = http_get(&format!("127.0.0.1:{port}"), "/metrics");
    let copied = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("cinderblock_volume_copy_bytes_total{node=\"node-2\"} ").map(|v| v.trim().parse::<f64>().unwrap() as u64)
        })
        .unwrap_or(0);

    // nbdcopy from our server on the same image, into node-2's pool folder.
    let nbd_port = free_port();
    let name = "0123456789abcdef0123456789abcdef";
    let mut server = Command::new(env!("CARGO_BIN_EXE_cinderblock"))
        .args(["nbd", "serve", "--image", snap_img.to_str().unwrap(), "--listen", &format!("127.0.0.1:{nbd_port}"), "--name", name])
        .args(["--plain-from", "127.0.0.1", "--read-only"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    while !listening_on(nbd_port) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = s.pool(2).join("nbdcopy-out.img");
    std::fs::File::create(&out).unwrap().set_len(size).unwrap();
    let t = Instant::now();
    let st = Command::new("nbdcopy")
        .args(["--connections=4", "--requests=16", "--flush", &format!("nbd://127.0.0.1:{nbd_port}/{name}"), out.to_str().unwrap()])
        .status()
        .expect("nbdcopy (apt-get install libnbd-bin)");
    let theirs = t.elapsed();
    let _ = server.kill();
    let _ = server.wait();
    assert!(st.success());
    assert_eq!(checksum(&out), checksum(&snap_img));

    println!("| copy of {} MiB allocated | seconds | GiB/s of allocated data |", allocated / MIB);
    println!("|---|---|---|");
    println!(
        "| cinderblock cross-node restore (TLS, 1 connection, copied {} MiB) | {:.2} | {:.2} |",
        copied / MIB,
        ours.as_secs_f64(),
        gib_s(allocated, ours)
    );
    println!("| nbdcopy from our server (plain, 4 connections) | {:.2} | {:.2} |", theirs.as_secs_f64(), gib_s(allocated, theirs));
}
