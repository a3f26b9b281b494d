//! What NBD export costs: fio 4k random read and write at queue depth 32 on
//! one image, side by side in one run, over loopback:
//!   local   fio libaio with O_DIRECT on the image file itself
//!   ours    fio's nbd engine (libnbd) against our server (O_DIRECT)
//!   qemu    fio's nbd engine against qemu-nbd --cache=none --aio=native
//! and, when run as root, the whole FUSE-engine attach path (our client
//! behind a FUSE file, loop device with direct I/O) against a plain loop
//! device on the same image.
//!
//! Goals (issue 13): ours at least qemu-nbd's, and at least 70% of local.
//! `cargo bench --bench nbd_io`; tune with CINDERBLOCK_BENCH_DIR (default a
//! temporary folder under /var/tmp), CINDERBLOCK_BENCH_SIZE_MIB (default
//! 1024), CINDERBLOCK_BENCH_RUNTIME (seconds per run, default 10) and
//! CINDERBLOCK_BENCH_ROUNDS (runs per figure, median shown, default 3).

#[path = "../tests/nbd_support/mod.rs"]
mod nbd_support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cinderblock::export::Limits;
use nbd_support::{TestServer, LOOPBACK};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[derive(Clone, Copy)]
struct Workload {
    name: &'static str,
    rw: &'static str,
}

const WORKLOADS: [Workload; 2] =
    [Workload { name: "4k random read QD32", rw: "randread" }, Workload { name: "4k random write QD32", rw: "randwrite" }];

/// fio's JSON output, IOPS of the one job.
fn fio(target: &[String], size_mib: u64, w: Workload, runtime: u64) -> f64 {
    let out = Command::new("fio")
        .args(["--name=bench", "--bs=4k", "--iodepth=32", "--numjobs=1", "--output-format=json", "--randrepeat=0", "--norandommap"])
        .arg(format!("--rw={}", w.rw))
        .arg(format!("--size={size_mib}M"))
        .arg(format!("--runtime={runtime}"))
        .arg("--time_based")
        .args(target)
        .output()
        .expect("run fio");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "fio {target:?} failed: {}{}", text, String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_str(&text[text.find('{').expect("fio JSON")..]).expect("fio JSON");
    let job = &json["jobs"][0];
    let side = if w.rw.contains("read") { "read" } else { "write" };
    job[side]["iops"].as_f64().expect("iops")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn qemu_nbd(image: &Path) -> (Kill, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new("qemu-nbd")
        .args(["-f", "raw", "--cache=none", "--aio=native", "-x", "bench", "-b", "127.0.0.1", "--persistent", "--shared=8"])
        .args(["-p", &port.to_string()])
        .arg(image)
        .stdout(Stdio::null())
        .spawn()
        .expect("start qemu-nbd");
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(10), "qemu-nbd did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    (Kill(child), port)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    for tool in ["fio", "qemu-nbd"] {
        if Command::new(tool).arg("--version").output().is_err() {
            eprintln!("nbd_io: {tool} is missing; install fio and qemu-utils");
            std::process::exit(1);
        }
    }
    let size_mib = env_u64("CINDERBLOCK_BENCH_SIZE_MIB", 1024);
    let runtime = env_u64("CINDERBLOCK_BENCH_RUNTIME", 10);
    let rounds = env_u64("CINDERBLOCK_BENCH_ROUNDS", 3).max(1);
    let base = std::env::var("CINDERBLOCK_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let dir = tempfile::Builder::new().prefix("cinderblock-nbd-bench-").tempdir_in(&base).unwrap();
    let image = dir.path().join("volume.img");

    // A fully written image, so reads hit the disk rather than holes.
    let fill = Command::new("fio")
        .args(["--name=fill", "--rw=write", "--bs=1M", "--ioengine=libaio", "--direct=1", "--iodepth=8"])
        .arg(format!("--size={size_mib}M"))
        .arg(format!("--filename={}", image.display()))
        .output()
        .unwrap();
    assert!(fill.status.success(), "filling the image failed: {}", String::from_utf8_lossy(&fill.stderr));

    let ours = TestServer::start(None, Limits::default());
    let name = ours.export(&image, "bench", true);
    let (_qemu, qemu_port) = qemu_nbd(&image);
    let _ = LOOPBACK;

    let local = vec!["--ioengine=libaio".to_string(), "--direct=1".into(), format!("--filename={}", image.display())];
    let ours_t = vec!["--ioengine=nbd".to_string(), format!("--uri={}", ours.uri(&name))];
    let qemu_t = vec!["--ioengine=nbd".to_string(), format!("--uri=nbd://127.0.0.1:{qemu_port}/bench")];

    println!(
        "nbd_io: {size_mib} MiB image in {base}, {runtime}s per run, median of {rounds}; {} CPUs, load {}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    println!("{:<22} {:>12} {:>12} {:>12} {:>10} {:>10}", "workload (IOPS)", "local", "ours", "qemu-nbd", "ours/local", "ours/qemu");
    for w in WORKLOADS {
        let (mut l, mut o, mut q) = (vec![], vec![], vec![]);
        for _ in 0..rounds {
            l.push(fio(&local, size_mib, w, runtime));
            o.push(fio(&ours_t, size_mib, w, runtime));
            q.push(fio(&qemu_t, size_mib, w, runtime));
        }
        let (l, o, q) = (median(l), median(o), median(q));
        println!("{:<22} {:>12.0} {:>12.0} {:>12.0} {:>9.0}% {:>9.0}%", w.name, l, o, q, 100.0 * o / l, 100.0 * o / q);
    }

    if !rustix::process::geteuid().is_root() {
        println!("(FUSE-engine figures need root: loop devices and a FUSE mount)");
        return;
    }
    // The whole userspace attach path against a loop device on the image.
    use cinderblock::attach::loopdev::{self, AttachOptions};
    use cinderblock::attach::nbd::fuse::FuseAttachment;
    let local_loop = loopdev::attach(&image, AttachOptions::for_block(false)).expect("loop device");
    // Detached on every way out, a failed fio run included.
    struct Detach(loopdev::LoopDevice);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = loopdev::detach(&self.0);
        }
    }
    let local_loop = Detach(local_loop.release());
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let state = tempfile::tempdir().unwrap();
    let fuse = rt.block_on(FuseAttachment::attach(ours.target(&name, None), state.path(), Default::default(), false)).expect("FUSE attach");
    let dev = |p: &Path| vec!["--ioengine=libaio".to_string(), "--direct=1".into(), format!("--filename={}", p.display())];
    let loop_t = dev(&local_loop.0.path);
    let fuse_t = dev(&fuse.device.path);
    println!("{:<22} {:>12} {:>12} {:>10}", "workload (IOPS)", "loop", "FUSE+NBD", "FUSE/loop");
    for w in WORKLOADS {
        let (mut l, mut f) = (vec![], vec![]);
        for _ in 0..rounds {
            l.push(fio(&loop_t, size_mib, w, runtime));
            f.push(fio(&fuse_t, size_mib, w, runtime));
        }
        let (l, f) = (median(l), median(f));
        println!("{:<22} {:>12.0} {:>12.0} {:>9.0}%", w.name, l, f, 100.0 * f / l);
    }
    rt.block_on(fuse.detach()).expect("FUSE detach");
    drop(local_loop);
}
