//! What the loop device costs: fio sequential and random, read and write,
//! with direct I/O, on a raw block volume published by a real
//! `cinderblock node` (a loop device with direct I/O on the volume's image)
//! against the same I/O on the image file itself. Target: the loop device
//! within 10% of the file.
//!
//! Needs root and fio. `cargo bench --bench loop_io`; tune with
//! CINDERBLOCK_BENCH_DIR (where the pool goes; default a temporary folder
//! under /var/tmp), CINDERBLOCK_BENCH_SIZE_MIB (image size, default 2048),
//! CINDERBLOCK_BENCH_RUNTIME (seconds per fio run, default 10) and
//! CINDERBLOCK_BENCH_ROUNDS (runs per figure, alternating file and loop;
//! the median is shown; default 3).

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use cinderblock::agent_proto as pb;
use cinderblock::attach::loopdev;
use cinderblock::attach::mount;
use cinderblock::csi;
use cinderblock::csi::node_client::NodeClient;
use cinderblock::csi::volume_capability::access_mode::Mode;
use cinderblock::csi::volume_capability::{AccessMode, AccessType, BlockVolume};
use common::NodeProcess;

const MIB: u64 = 1 << 20;

struct Workload {
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    iodepth: u32,
}

const WORKLOADS: [Workload; 4] = [
    Workload { name: "sequential read", rw: "read", bs: "1M", iodepth: 16 },
    Workload { name: "sequential write", rw: "write", bs: "1M", iodepth: 16 },
    Workload { name: "random read", rw: "randread", bs: "4k", iodepth: 32 },
    Workload { name: "random write", rw: "randwrite", bs: "4k", iodepth: 32 },
];

#[derive(Clone, Copy, Default)]
struct Figure {
    bytes_per_sec: f64,
    iops: f64,
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn fio(filename: &Path, size: u64, w: &Workload, runtime: u64) -> Figure {
    let out = Command::new("fio")
        .args(["--name=bench", "--ioengine=libaio", "--direct=1", "--numjobs=1", "--group_reporting"])
        .arg(format!("--filename={}", filename.display()))
        .arg(format!("--size={size}"))
        .arg(format!("--rw={}", w.rw))
        .arg(format!("--bs={}", w.bs))
        .arg(format!("--iodepth={}", w.iodepth))
        .args(["--time_based", &format!("--runtime={runtime}"), "--ramp_time=1"])
        .args(["--randrepeat=0", "--norandommap", "--output-format=json"])
        .output()
        .expect("running fio");
    assert!(out.status.success(), "fio failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("fio JSON");
    let job = &v["jobs"][0];
    let side = if w.rw.contains("read") { &job["read"] } else { &job["write"] };
    Figure { bytes_per_sec: side["bw_bytes"].as_f64().unwrap_or(0.0), iops: side["iops"].as_f64().unwrap_or(0.0) }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

fn median(mut v: Vec<Figure>) -> Figure {
    v.sort_by(|a, b| a.bytes_per_sec.total_cmp(&b.bytes_per_sec));
    v[v.len() / 2]
}

/// Unmounts and detaches whatever is left under the bench folder, even on panic.
struct Cleanup {
    root: PathBuf,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Ok(table) = mount::mount_table() {
            for m in table.iter().rev().filter(|m| m.mount_point.starts_with(&self.root)) {
                let _ = mount::unmount(&m.mount_point);
            }
        }
        for dev in loopdev::bound_devices().unwrap_or_default() {
            if dev.backing_file.starts_with(&self.root) {
                let _ = loopdev::detach(&dev);
            }
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn block_cap() -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
    }
}

#[tokio::main]
async fn main() {
    if !common::is_root() {
        eprintln!("loop_io: skipped: needs root for loop devices and mounts");
        return;
    }
    if Command::new("fio").arg("--version").output().is_err() {
        eprintln!("loop_io: skipped: fio is not installed (apt-get install fio)");
        return;
    }
    let size = env_u64("CINDERBLOCK_BENCH_SIZE_MIB", 2048) * MIB;
    let runtime = env_u64("CINDERBLOCK_BENCH_RUNTIME", 10);
    let rounds = env_u64("CINDERBLOCK_BENCH_ROUNDS", 3).max(1);
    let base = std::env::var("CINDERBLOCK_BENCH_DIR").map(PathBuf::from).unwrap_or_else(|_| PathBuf::from("/var/tmp"));
    let dir = tempfile::Builder::new().prefix("cinderblock-loop-io.").tempdir_in(&base).expect("bench folder").keep();
    let root = dir.canonicalize().unwrap();
    let _cleanup = Cleanup { root: root.clone() };
    let kubelet = root.join("kubelet");
    std::fs::create_dir_all(&kubelet).unwrap();
    let pool = root.join("pool");
    let node = NodeProcess::start(&pool, &root.join("csi.sock"), "bench", &["--allowed-root", kubelet.to_str().unwrap()]);

    // The agent answers only over mutual TLS, as the controller calls it.
    let mut agent = node.client().await;
    let mut csi_client = {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match NodeClient::connect(node.endpoint.clone()).await {
                Ok(c) => break c,
                Err(e) if Instant::now() > deadline => panic!("CSI socket: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    };
    // Thick, so neither side pays for block allocation during the runs.
    agent
        .create_volume(pb::CreateVolumeRequest {
            volume_id: "vol-bench".into(),
            size_bytes: size,
            provisioning: pb::Provisioning::Thick as i32,
            source: None,
            metadata: Default::default(),
            remote: None,
        })
        .await
        .expect("creating the volume");
    let image = pool.canonicalize().unwrap().join("volumes/vol-bench.img");
    let staging = kubelet.join("staging");
    let target = kubelet.join("pods/bench/dev");
    csi_client
        .node_stage_volume(csi::NodeStageVolumeRequest {
            volume_id: "vol-bench".into(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(block_cap()),
            ..Default::default()
        })
        .await
        .expect("stage");
    csi_client
        .node_publish_volume(csi::NodePublishVolumeRequest {
            volume_id: "vol-bench".into(),
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(block_cap()),
            readonly: false,
            ..Default::default()
        })
        .await
        .expect("publish");

    let dev = loopdev::find_by_backing_file(&image).unwrap().expect("a loop device for the volume");
    let dio = match loopdev::direct_io(dev.number) {
        Ok(Some(true)) => "1",
        Ok(Some(false)) => "0",
        _ => "",
    };
    let fs = mount::mount_table()
        .unwrap()
        .into_iter()
        .filter(|m| root.starts_with(&m.mount_point))
        .max_by_key(|m| m.mount_point.as_os_str().len())
        .map(|m| format!("{} on {}", m.fs_type, m.source))
        .unwrap_or_default();
    println!(
        "loop_io: {} MiB thick image on {fs}; {} (direct I/O {}) published at {}",
        size / MIB,
        dev.path.display(),
        dio.trim(),
        target.display()
    );
    println!("loop_io: {} CPUs, load average at the start: {}", std::thread::available_parallelism().map_or(0, |n| n.get()), loadavg());
    println!("loop_io: fio libaio, direct=1, {runtime} s per run (+1 s ramp), median of {rounds} runs, file and loop alternating");

    // Write every block once so reads hit real data on both sides.
    let out = Command::new("fio")
        .args(["--name=fill", "--ioengine=libaio", "--direct=1", "--rw=write", "--bs=1M", "--iodepth=16"])
        .arg(format!("--filename={}", image.display()))
        .arg(format!("--size={size}"))
        .output()
        .expect("fio fill");
    assert!(out.status.success(), "fio fill failed: {}", String::from_utf8_lossy(&out.stderr));

    println!();
    println!("{:<18} {:>14} {:>10}   {:>14} {:>10}   {:>10}", "workload", "file MiB/s", "IOPS", "loop MiB/s", "IOPS", "loop/file");
    let mut worst: f64 = f64::INFINITY;
    for w in &WORKLOADS {
        let (mut file, mut lo) = (vec![], vec![]);
        for _ in 0..rounds {
            file.push(fio(&image, size, w, runtime));
            lo.push(fio(&target, size, w, runtime));
        }
        let (f, l) = (median(file), median(lo));
        let ratio = if f.bytes_per_sec > 0.0 { l.bytes_per_sec / f.bytes_per_sec } else { 0.0 };
        worst = worst.min(ratio);
        println!(
            "{:<18} {:>14.1} {:>10.0}   {:>14.1} {:>10.0}   {:>9.1}%{}",
            format!("{} {}", w.name, w.bs),
            f.bytes_per_sec / MIB as f64,
            f.iops,
            l.bytes_per_sec / MIB as f64,
            l.iops,
            ratio * 100.0,
            if ratio < 0.9 { "  (more than 10% behind)" } else { "" }
        );
    }
    println!();
    // Random 4k I/O is CPU-bound on small machines: anything else running
    // skews the loop side (which spends more CPU per I/O) the most.
    println!("loop_io: load average at the end: {}", loadavg());
    println!("loop_io: worst loop/file ratio {:.1}%: target (within 10%) {}", worst * 100.0, if worst >= 0.9 { "met" } else { "NOT met" });

    csi_client
        .node_unpublish_volume(csi::NodeUnpublishVolumeRequest { volume_id: "vol-bench".into(), target_path: target.display().to_string() })
        .await
        .expect("unpublish");
    csi_client
        .node_unstage_volume(csi::NodeUnstageVolumeRequest {
            volume_id: "vol-bench".into(),
            staging_target_path: staging.display().to_string(),
        })
        .await
        .expect("unstage");
    drop(node);
}
