//! Shared test fixtures: real filesystems on loop devices, real node
//! processes, and a way to see every file of a pool.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// True when running in CI (`CI=true`), where nothing may be skipped.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// A test that cannot run here: under `CI=true` that is a failure, never a
/// pass; elsewhere it says so loudly and returns, so `cargo test` stays
/// usable for unit work on a laptop.
pub fn cannot_run(test: &str, why: &str) {
    if in_ci() {
        panic!("{test} cannot run: {why} (CI=true: a test that cannot run fails)");
    }
    eprintln!("SKIPPED {test}: {why}");
}

/// Storage tests need root (loop devices, mkfs, mount).
#[macro_export]
macro_rules! require_root {
    () => {
        if !common::is_root() {
            common::cannot_run(module_path!(), "needs root for loop devices and mounts");
            return;
        }
    };
}

/// Tests that run a tool (mkfs.xfs, fio, ...) need it on PATH.
#[macro_export]
macro_rules! require_tools {
    ($($tool:expr),+) => {
        for tool in [$($tool),+] {
            if !common::have_tool(tool) {
                common::cannot_run(module_path!(), &format!("needs {tool} on PATH (scripts/test-all.sh installs it)"));
                return;
            }
        }
    };
}

/// Tests of the remote attach engine's FUSE file need /dev/fuse.
#[macro_export]
macro_rules! require_fuse {
    () => {
        if !std::path::Path::new("/dev/fuse").exists() {
            common::cannot_run(module_path!(), "needs /dev/fuse (modprobe fuse)");
            return;
        }
    };
}

pub fn have_tool(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
}

pub fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    assert!(out.status.success(), "{cmd} {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// A filesystem made for one test: an image file in a temporary folder,
/// formatted and loop-mounted; unmounted and removed on drop, even when the
/// test fails.
pub struct TestFs {
    pub dir: tempfile::TempDir,
    pub mount: PathBuf,
    /// The loop device of a disk with 4096-byte sectors ("xfs-4k-sectors").
    disk: Option<String>,
}

impl TestFs {
    /// `kind`: "xfs-reflink", "xfs-noreflink", "ext4", or "xfs-4k-sectors"
    /// (xfs on a loop device with 4096-byte logical sectors, as on a 4Kn disk).
    pub fn new(kind: &str, size: &str) -> TestFs {
        let dir = tempfile::Builder::new().prefix("cinderblock-fs-").tempdir().unwrap();
        let image = dir.path().join("fs.img");
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).unwrap();
        run("truncate", &["-s", size, image.to_str().unwrap()]);
        if kind == "xfs-4k-sectors" {
            let out = Command::new("losetup").args(["--find", "--show", "--sector-size", "4096"]).arg(&image).output().unwrap();
            assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
            let disk = String::from_utf8(out.stdout).unwrap().trim().to_string();
            let fs = TestFs { dir, mount, disk: Some(disk.clone()) };
            run("mkfs.xfs", &["-q", "-f", &disk]);
            run("mount", &[&disk, fs.mount.to_str().unwrap()]);
            return fs;
        }
        match kind {
            "xfs-reflink" => run("mkfs.xfs", &["-q", "-f", "-m", "reflink=1", image.to_str().unwrap()]),
            "xfs-noreflink" => run("mkfs.xfs", &["-q", "-f", "-m", "reflink=0", image.to_str().unwrap()]),
            "ext4" => run("mkfs.ext4", &["-q", "-F", "-E", "nodiscard", image.to_str().unwrap()]),
            other => panic!("unknown test filesystem {other}"),
        }
        run("mount", &["-o", "loop", image.to_str().unwrap(), mount.to_str().unwrap()]);
        TestFs { dir, mount, disk: None }
    }
}

impl TestFs {
    /// A power cut, for real: XFS is shut down without writing its log
    /// (`xfs_io -x -c shutdown`, the way xfstests makes its crash tests),
    /// so whatever was not fsynced is lost as a crash would lose it, and
    /// every later write or sync fails. Only for the loop-mounted XFS kinds
    /// ("xfs-reflink", "xfs-noreflink"). `mount_again` after it.
    pub fn crash(&self) {
        assert!(self.disk.is_none(), "crash is for the loop-mounted XFS kinds");
        run("xfs_io", &["-x", "-c", "shutdown", self.mount.to_str().unwrap()]);
    }

    /// Unmount and mount again (after `crash`, XFS replays its log as at
    /// boot). Nothing may hold a file open in it.
    pub fn mount_again(&self) {
        let mount = self.mount.to_str().unwrap();
        run("umount", &[mount]);
        run("mount", &["-o", "loop", self.dir.path().join("fs.img").to_str().unwrap(), mount]);
    }
}

/// Remove a pool's journal segments, as its checkpoints do once the records
/// they hold are on disk: a record damaged after that is not written back
/// at the next open (the pool marks it broken), which is what tests of
/// damaged records look at. Call it with the pool closed.
pub fn checkpoint_pool_journal(pool: &Path) {
    for segment in std::fs::read_dir(pool.join("journal")).unwrap() {
        std::fs::remove_file(segment.unwrap().path()).unwrap();
    }
}

impl Drop for TestFs {
    fn drop(&mut self) {
        let m = self.mount.to_str().unwrap().to_string();
        let ok = Command::new("umount").arg(&m).status().map(|s| s.success()).unwrap_or(false);
        if !ok {
            let _ = Command::new("umount").args(["-l", &m]).status();
        }
        if let Some(disk) = &self.disk {
            let _ = Command::new("losetup").args(["-d", disk]).status();
        }
    }
}

/// Every file under `root` with its size and content hash, for "nothing changed" checks.
pub fn tree(root: &Path) -> BTreeMap<String, (u64, u64)> {
    let mut out = BTreeMap::new();
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (u64, u64)>) {
        let Ok(rd) = std::fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            if p.is_dir() {
                out.insert(rel + "/", (0, 0));
                walk(root, &p, out);
            } else {
                let len = p.metadata().map(|m| m.len()).unwrap_or(0);
                out.insert(rel, (len, checksum(&p)));
            }
        }
    }
    walk(root, root, &mut out);
    out
}

/// FNV-1a over the whole file: enough to tell contents apart in tests.
pub fn checksum(path: &Path) -> u64 {
    let mut f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut h: u64 = 0xcbf29ce484222325;
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        for b in &buf[..n] {
            h ^= *b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    }
    h
}

/// Write `len` bytes of a pattern seeded by `seed` at `offset`.
pub fn write_pattern(path: &Path, offset: u64, len: usize, seed: u8) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let buf: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
    f.write_all_at(&buf, offset).unwrap();
    f.sync_all().unwrap();
}

/// The data segments of a file, as (start, end) pairs, from SEEK_DATA/SEEK_HOLE.
pub fn data_segments(path: &Path) -> Vec<(i64, i64)> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len() as i64;
    let mut out = vec![];
    let mut pos = 0;
    while pos < len {
        let d = unsafe { libc::lseek(f.as_raw_fd(), pos, libc::SEEK_DATA) };
        if d < 0 {
            break;
        }
        let h = unsafe { libc::lseek(f.as_raw_fd(), d, libc::SEEK_HOLE) };
        out.push((d, h));
        pos = h;
    }
    out
}

pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// A port nothing listened on a moment ago, never the same one twice in
/// this process: tests run in parallel, and two servers given one port
/// would leave one of them talking to the other's listener.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// A CA and certificates for a controller and one node, made once in
/// `<dir>/tls` (kept across restarts of the node): the controller's and
/// the node's certificate folders.
pub fn test_pki(dir: &Path, node_id: &str) -> (PathBuf, PathBuf) {
    use cinderblock::tls::{authority, Peer};
    let tls = dir.join("tls");
    let peers = [Peer::Controller, Peer::Node(node_id.to_string())];
    authority::ensure_local_pki(&tls, &peers).expect("making test certificates");
    (authority::local_peer_dir(&tls, &peers[0]), authority::local_peer_dir(&tls, &peers[1]))
}

/// Puts a fencing token on every call, as the controller does.
#[derive(Clone)]
pub struct FencingToken(pub u64);

impl tonic::service::Interceptor for FencingToken {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        cinderblock::agent::fence::attach(&mut req, self.0);
        Ok(req)
    }
}

pub type AgentClient = cinderblock::agent_proto::volume_manager_client::VolumeManagerClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, FencingToken>,
>;

/// A client for the agent at `address` (https://host:port) that presents
/// the certificate in `client_tls` and accepts only `node_id`'s.
pub async fn agent_client(address: &str, node_id: &str, client_tls: &Path, token: u64) -> AgentClient {
    use cinderblock::tls::{AgentConnector, Peer, TlsDir};
    let dir = TlsDir::open(client_tls).expect("client certificates");
    let connector = AgentConnector::new(dir, &Peer::Node(node_id.to_string()), vec![b"h2".to_vec()]).unwrap();
    let channel = tonic::transport::Endpoint::from_shared(address.to_string())
        .unwrap()
        .connect_with_connector(connector)
        .await
        .expect("connecting to the agent");
    cinderblock::agent_proto::volume_manager_client::VolumeManagerClient::with_interceptor(channel, FencingToken(token))
}

/// A real `cinderblock node` process; killed on drop.
pub struct NodeProcess {
    pub child: Child,
    pub agent: String,
    pub endpoint: String,
    pub node_id: String,
    /// The controller's certificate folder, for calling this agent.
    pub controller_tls: PathBuf,
}

impl NodeProcess {
    /// A client that calls this agent as the controller does (fencing token 0).
    pub async fn client(&self) -> AgentClient {
        agent_client(&self.agent, &self.node_id, &self.controller_tls, 0).await
    }

    pub fn start(pool: &Path, sock: &Path, node_id: &str, extra: &[&str]) -> NodeProcess {
        let port = free_port();
        let (controller_tls, node_tls) = test_pki(pool.parent().unwrap(), node_id);
        let mut child = Command::new(env!("CARGO_BIN_EXE_cinderblock"))
            .args(["node", "--pool", pool.to_str().unwrap(), "--node-id", node_id])
            .args(["--tls-dir", node_tls.to_str().unwrap()])
            .args(["--agent-listen", &format!("127.0.0.1:{port}")])
            .args(["--endpoint", &format!("unix://{}", sock.display())])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting cinderblock node");
        let agent = format!("https://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !listening_on(port) {
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                let _ = child.stderr.take().unwrap().read_to_string(&mut err);
                panic!("node exited with {status}: {err}");
            }
            assert!(Instant::now() < deadline, "node did not start listening");
            std::thread::sleep(Duration::from_millis(5));
        }
        NodeProcess { child, agent, endpoint: format!("unix://{}", sock.display()), node_id: node_id.to_string(), controller_tls }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn write_file(path: &Path, bytes: &[u8]) {
    std::fs::File::create(path).unwrap().write_all(bytes).unwrap();
}

/// A real `cinderblock standalone` process (controller + nodes); killed on drop.
pub struct Standalone {
    pub child: Child,
    pub data_dir: PathBuf,
    pub endpoint: String,
    pub log: PathBuf,
}

impl Standalone {
    pub fn start(data_dir: &Path, nodes: u32, zones: u32, extra: &[&str]) -> Standalone {
        let sock = data_dir.join("csi.sock");
        let _ = std::fs::remove_file(&sock);
        std::fs::create_dir_all(data_dir).unwrap();
        let log = data_dir
            .join(format!("standalone-{}.log", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()));
        let child = Command::new(env!("CARGO_BIN_EXE_cinderblock"))
            .args(["standalone", "--data-dir", data_dir.to_str().unwrap()])
            .args(["--nodes", &nodes.to_string(), "--zones", &zones.to_string()])
            .args(["--endpoint", &format!("unix://{}", sock.display())])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting cinderblock standalone");
        let mut s = Standalone { child, data_dir: data_dir.to_path_buf(), endpoint: format!("unix://{}", sock.display()), log };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            if let Ok(Some(status)) = s.child.try_wait() {
                panic!("standalone exited with {status}: {}", std::fs::read_to_string(&s.log).unwrap_or_default());
            }
            assert!(Instant::now() < deadline, "standalone did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        s
    }

    pub fn pool(&self, node: u32) -> PathBuf {
        self.data_dir.join(format!("node-{node}")).join("pool")
    }

    /// Every volume image in every pool, as "node-N/<id>".
    pub fn images(&self) -> Vec<String> {
        let mut out = vec![];
        for e in std::fs::read_dir(&self.data_dir).unwrap().flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if !name.starts_with("node-") {
                continue;
            }
            for sub in ["volumes", "snapshots"] {
                if let Ok(rd) = std::fs::read_dir(e.path().join("pool").join(sub)) {
                    for f in rd.flatten() {
                        let f = f.file_name().to_string_lossy().to_string();
                        if let Some(id) = f.strip_suffix(".img") {
                            out.push(format!("{name}/{id}"));
                        }
                    }
                }
            }
        }
        out.sort();
        out
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait: the clean stop a user gets.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let _ =
            rustix::process::kill_process(rustix::process::Pid::from_raw(self.child.id() as i32).unwrap(), rustix::process::Signal::TERM);
        self.child.wait().unwrap()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Standalone {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub async fn csi_channel(endpoint: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(endpoint.to_string()).unwrap().connect().await.expect("connecting to the CSI endpoint")
}

/// A plain HTTP/1.1 GET on loopback: the body (panics on anything but 200).
pub fn http_get(addr: &str, path: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

/// Mount points at or below `dir` (this mount namespace).
#[allow(dead_code)]
pub fn mounted_under(dir: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|m| m.starts_with(&dir.display().to_string()))
        .collect()
}

/// Loop devices whose backing file is below `dir`, as "/dev/loopN".
#[allow(dead_code)]
pub fn loops_on(dir: &Path) -> Vec<String> {
    cinderblock::attach::loopdev::bound_devices()
        .unwrap()
        .into_iter()
        .filter(|d| d.backing_file.starts_with(dir))
        .map(|d| d.path.display().to_string())
        .collect()
}

/// Unmounts whatever is still mounted below a test's folder and detaches
/// loop devices on its files, when dropped (also when the test fails).
#[allow(dead_code)]
pub struct Leftovers(pub PathBuf);

impl Drop for Leftovers {
    fn drop(&mut self) {
        // Found before the unmounts: a loop device on a file inside a FUSE
        // mount (the remote attach engine) names its backing file relative
        // to that mount once it is gone ("/disk"), no longer below our folder.
        let loops = loops_on(&self.0);
        let mut mounts = mounted_under(&self.0);
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = Command::new("umount").args(["-l", &m]).status();
        }
        for dev in loops {
            let _ = Command::new("losetup").args(["-d", &dev]).status();
        }
    }
}

/// Single-node-writer access, raw block or an ext4 mount.
#[allow(dead_code)]
pub fn rwo_capability(block: bool) -> cinderblock::csi::VolumeCapability {
    use cinderblock::csi::volume_capability::{access_mode::Mode, AccessMode, AccessType, BlockVolume, MountVolume};
    cinderblock::csi::VolumeCapability {
        access_mode: Some(AccessMode { mode: Mode::SingleNodeWriter as i32 }),
        access_type: Some(if block {
            AccessType::Block(BlockVolume {})
        } else {
            AccessType::Mount(MountVolume { fs_type: "ext4".into(), ..Default::default() })
        }),
    }
}

/// CreateVolume of a zone volume (`accessibility: zone`) whose image goes on `node`.
#[allow(dead_code)]
pub fn zone_volume_on(name: &str, node: &str, size: i64, block: bool) -> cinderblock::csi::CreateVolumeRequest {
    use cinderblock::csi;
    let seg: std::collections::HashMap<String, String> = [(cinderblock::TOPOLOGY_NODE_KEY.to_string(), node.to_string())].into();
    csi::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(csi::CapacityRange { required_bytes: size, limit_bytes: 0 }),
        volume_capabilities: vec![rwo_capability(block)],
        parameters: [("accessibility".to_string(), "zone".to_string())].into(),
        accessibility_requirements: Some(csi::TopologyRequirement { requisite: vec![csi::Topology { segments: seg }], preferred: vec![] }),
        ..Default::default()
    }
}

/// The address a process logged its metrics server on ("metrics on http://ADDR/...").
#[allow(dead_code)]
pub fn metrics_address_in_log(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines().find_map(|l| l.split("metrics on http://").nth(1).map(|r| r.split('/').next().unwrap().to_string()))
}

/// Something listens on 127.0.0.1:`port`. A connection to a port in the
/// ephemeral range where nothing listens yet can connect to itself (TCP
/// simultaneous open, when the kernel picks that same port as the source):
/// such a connection is not a listener.
#[allow(dead_code)]
pub fn listening_on(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok_and(|s| s.local_addr().ok() != s.peer_addr().ok())
}

/// What the kubelet does before a pod starts: NodeStageVolume, then
/// NodePublishVolume, of a single-node-writer volume (raw block or ext4),
/// with the `publish_context` ControllerPublishVolume gave.
pub async fn stage_and_publish_rwo(
    node: &mut cinderblock::csi::node_client::NodeClient<tonic::transport::Channel>,
    volume_id: &str,
    staging: &Path,
    target: &Path,
    block: bool,
    publish_context: &std::collections::HashMap<String, String>,
) {
    use cinderblock::csi;
    node.node_stage_volume(csi::NodeStageVolumeRequest {
        volume_id: volume_id.to_string(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(rwo_capability(block)),
        publish_context: publish_context.clone(),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("NodeStageVolume {volume_id}: {e}"));
    node.node_publish_volume(csi::NodePublishVolumeRequest {
        volume_id: volume_id.to_string(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(rwo_capability(block)),
        publish_context: publish_context.clone(),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("NodePublishVolume {volume_id}: {e}"));
}

/// Every file a pool keeps (volumes, snapshots, exports, orphans), as
/// "volumes/<file>" and so on, sorted: for a test's "nothing leaked".
pub fn pool_files(pool: &Path) -> Vec<String> {
    let mut out = vec![];
    for sub in ["volumes", "snapshots", "exports", "orphaned"] {
        if let Ok(rd) = std::fs::read_dir(pool.join(sub)) {
            out.extend(rd.flatten().map(|e| format!("{sub}/{}", e.file_name().to_string_lossy())));
        }
    }
    out.sort();
    out
}

/// A loop device on `image` with direct I/O, as a local publication stages it.
pub struct Loop(pub String);

impl Loop {
    pub fn attach(image: &Path) -> Loop {
        let out = Command::new("losetup").args(["--find", "--show", "--direct-io=on"]).arg(image).output().unwrap();
        assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
        Loop(String::from_utf8(out.stdout).unwrap().trim().to_string())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// fio's random writes of every 4 KiB block of the first `span` bytes
/// (each block once, in the order `seed` gives), with verification headers;
/// with `verify`, instead reads them back and checks every block.
pub fn fio(target: &str, span: u64, seed: u32, verify: bool, rate: &str) -> String {
    let mut cmd = Command::new("fio");
    cmd.args(["--name=migrate", "--rw=randwrite", "--bs=4k", "--ioengine=psync", "--verify=crc32c", "--verify_fatal=1"])
        // No verify state file in the working folder: the seed says what to verify.
        .arg("--verify_state_save=0")
        .arg(format!("--filename={target}"))
        .arg(format!("--size={span}"))
        .arg(format!("--randseed={seed}"));
    if verify {
        cmd.arg("--verify_only");
    } else {
        cmd.args(["--direct=1", "--do_verify=0"]).arg(format!("--rate={rate}"));
    }
    let out = cmd.output().expect("running fio");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "fio {}: {text}", if verify { "verify" } else { "write" });
    text
}
