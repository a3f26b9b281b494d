//! The CSI Node service of a real `cinderblock node` process, over its unix
//! socket, with real loop devices, mkfs and mounts (root only). Volumes are
//! made through the agent API as the controller would. Every test works in
//! its own temporary folder, which is also the node's only allowed root,
//! and `Env` unmounts and detaches whatever is left there even when a test
//! fails.

mod common;

use std::io::Write;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cinderblock::agent_proto as pb;
use cinderblock::attach::loopdev::{self, LoopDevice};
use cinderblock::attach::mount::{self, MountInfo};
use cinderblock::csi;
use cinderblock::csi::node_client::NodeClient;
use cinderblock::csi::volume_capability::access_mode::Mode;
use cinderblock::csi::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use common::*;
use tonic::transport::Channel;
use tonic::Code;

const MIB: u64 = 1 << 20;
/// mkfs.xfs refuses anything smaller than 300 MiB.
const XFS_MIN: u64 = 320 * MIB;
const CAP_SYS_RESOURCE: u32 = 24;

// ------------------------------------------------------------------ fixture

/// A node process with its pool and a kubelet-like folder (the only allowed
/// root) in one temporary folder.
struct Env {
    node: Option<NodeProcess>,
    root: PathBuf,
    pool: PathBuf,
    kubelet: PathBuf,
    sock: PathBuf,
    extra: Vec<String>,
    /// The kubelet folder is an extra allowed root (`--allowed-root`), or,
    /// when false, the node gets only what `--kubelet-dir` allows.
    whole_kubelet_allowed: bool,
    _dir: tempfile::TempDir,
}

impl Env {
    fn new(extra: &[&str]) -> Env {
        Env::with_pool(None, extra)
    }

    /// With the pool at `pool` (e.g. on a filesystem made for the test)
    /// instead of in the test's folder.
    fn with_pool(pool: Option<&Path>, extra: &[&str]) -> Env {
        let dir = tempfile::Builder::new().prefix("cb-node-").tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        let kubelet = root.join("kubelet");
        std::fs::create_dir_all(kubelet.join("staging")).unwrap();
        std::fs::create_dir_all(kubelet.join("pods")).unwrap();
        let mut env = Env {
            node: None,
            pool: pool.map(Path::to_path_buf).unwrap_or_else(|| root.join("pool")),
            sock: root.join("csi.sock"),
            kubelet,
            root,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            whole_kubelet_allowed: true,
            _dir: dir,
        };
        env.start();
        env
    }

    /// As a node in a cluster: the kubelet folder's own roots only.
    fn kubelet_only() -> Env {
        let mut env = Env::with_pool(None, &[]);
        env.kill9();
        env.whole_kubelet_allowed = false;
        env.start();
        env
    }

    fn start(&mut self) {
        let allow = if self.whole_kubelet_allowed { "--allowed-root" } else { "--kubelet-dir" };
        let mut args = vec![allow.to_string(), self.kubelet.display().to_string()];
        args.extend(self.extra.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.node = Some(NodeProcess::start(&self.pool, &self.sock, "node-1", &args));
    }

    fn kill9(&mut self) {
        if let Some(mut n) = self.node.take() {
            n.kill9();
        }
    }

    async fn agent(&self) -> AgentClient {
        self.node.as_ref().unwrap().client().await
    }

    /// The CSI socket is bound just after the agent port: retry briefly.
    async fn csi(&self) -> NodeClient<Channel> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match NodeClient::connect(format!("unix://{}", self.sock.display())).await {
                Ok(c) => return c,
                Err(e) if Instant::now() > deadline => panic!("connecting to {}: {e}", self.sock.display()),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    fn k(&self, rel: &str) -> PathBuf {
        self.kubelet.join(rel)
    }

    fn image(&self, id: &str) -> PathBuf {
        self.pool.join("volumes").join(format!("{id}.img"))
    }

    /// Mounts anywhere under this test's folder.
    fn mounts(&self) -> Vec<MountInfo> {
        mount::mount_table().unwrap().into_iter().filter(|m| m.mount_point.starts_with(&self.root)).collect()
    }

    /// Loop devices bound to any file under this test's folder.
    fn loops(&self) -> Vec<LoopDevice> {
        let mut loops = loops_under(&self.root);
        if !self.pool.starts_with(&self.root) {
            loops.extend(loops_under(&self.pool));
        }
        loops
    }

    fn assert_clean(&self, what: &str) {
        let mounts: Vec<_> = self.mounts().into_iter().map(|m| m.mount_point).collect();
        assert!(mounts.is_empty(), "{what}: mounts left behind: {mounts:?}");
        // A loop device set to clear itself on its last close (the tests'
        // own read-only checks) lets go once every opener has closed it,
        // and udev's probe may still hold it a moment after an unmount: give
        // that a few seconds; a device the driver leaked stays.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut loops = self.loops();
        while !loops.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
            loops = self.loops();
        }
        assert!(loops.is_empty(), "{what}: loop devices left behind: {loops:?}");
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.kill9();
        for _ in 0..5 {
            let mounts = self.mounts();
            if mounts.is_empty() {
                break;
            }
            for m in mounts.iter().rev() {
                if mount::unmount(&m.mount_point).is_err() {
                    let _ = rustix::mount::unmount(&m.mount_point, rustix::mount::UnmountFlags::DETACH);
                }
            }
        }
        for dev in self.loops() {
            let _ = loopdev::detach(&dev);
        }
    }
}

fn loops_under(dir: &Path) -> Vec<LoopDevice> {
    loopdev::bound_devices().unwrap().into_iter().filter(|d| d.backing_file.starts_with(dir)).collect()
}

fn loops_of(image: &Path) -> usize {
    loops_under(image.parent().unwrap()).iter().filter(|d| d.backing_file == image).count()
}

fn mount_at(path: &Path) -> Option<MountInfo> {
    mount::find_by_target(path).unwrap()
}

// ------------------------------------------------------------------ requests

fn mount_cap(fs: &str, flags: &[&str], mode: Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            mount_flags: flags.iter().map(|s| s.to_string()).collect(),
            volume_mount_group: String::new(),
        })),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

fn ext4() -> csi::VolumeCapability {
    mount_cap("ext4", &[], Mode::SingleNodeMultiWriter)
}

fn xfs() -> csi::VolumeCapability {
    mount_cap("xfs", &[], Mode::SingleNodeMultiWriter)
}

fn block(mode: Mode) -> csi::VolumeCapability {
    csi::VolumeCapability { access_type: Some(AccessType::Block(BlockVolume {})), access_mode: Some(AccessMode { mode: mode as i32 }) }
}

fn stage_req(id: &str, staging: &Path, cap: Option<csi::VolumeCapability>) -> csi::NodeStageVolumeRequest {
    csi::NodeStageVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.display().to_string(),
        volume_capability: cap,
        ..Default::default()
    }
}

fn unstage_req(id: &str, staging: &Path) -> csi::NodeUnstageVolumeRequest {
    csi::NodeUnstageVolumeRequest { volume_id: id.into(), staging_target_path: staging.display().to_string() }
}

fn publish_req(id: &str, staging: &Path, target: &Path, cap: csi::VolumeCapability, readonly: bool) -> csi::NodePublishVolumeRequest {
    csi::NodePublishVolumeRequest {
        volume_id: id.into(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(cap),
        readonly,
        ..Default::default()
    }
}

fn unpublish_req(id: &str, target: &Path) -> csi::NodeUnpublishVolumeRequest {
    csi::NodeUnpublishVolumeRequest { volume_id: id.into(), target_path: target.display().to_string() }
}

fn stats_req(id: &str, path: &Path) -> csi::NodeGetVolumeStatsRequest {
    csi::NodeGetVolumeStatsRequest { volume_id: id.into(), volume_path: path.display().to_string(), ..Default::default() }
}

fn expand_req(id: &str, path: &Path, staging: &Path, required: u64) -> csi::NodeExpandVolumeRequest {
    csi::NodeExpandVolumeRequest {
        volume_id: id.into(),
        volume_path: path.display().to_string(),
        staging_target_path: staging.display().to_string(),
        capacity_range: Some(csi::CapacityRange { required_bytes: required as i64, limit_bytes: 0 }),
        ..Default::default()
    }
}

async fn create_volume(agent: &mut AgentClient, id: &str, size: u64, source: Option<pb::create_volume_request::Source>) {
    agent
        .create_volume(pb::CreateVolumeRequest {
            volume_id: id.into(),
            size_bytes: size,
            provisioning: 0,
            source,
            metadata: Default::default(),
            remote: None,
        })
        .await
        .unwrap_or_else(|e| panic!("creating {id}: {e}"));
}

fn expect_code<T: std::fmt::Debug>(what: &str, r: Result<T, tonic::Status>, code: Code) -> tonic::Status {
    let e = r.expect_err(what);
    assert_eq!(e.code(), code, "{what}: {}", e.message());
    assert!(!e.message().is_empty(), "{what}: empty message");
    e
}

/// Deterministic bytes that differ per seed.
fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn write_synced(path: &Path, bytes: &[u8]) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(bytes).unwrap();
    f.sync_all().unwrap();
}

fn fs_bytes(path: &Path) -> u64 {
    let s = rustix::fs::statvfs(path).unwrap();
    s.f_blocks * s.f_frsize
}

fn is_read_only_error(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EROFS) | Some(libc::EPERM) | Some(libc::EACCES))
}

// ------------------------------------------------------------------ tests

#[tokio::test]
async fn info_and_capabilities() {
    require_root!();
    let env = Env::new(&["--zone", "zone-a", "--max-volumes", "12"]);
    let mut c = env.csi().await;
    let info = c.node_get_info(csi::NodeGetInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.node_id, "node-1");
    assert_eq!(info.max_volumes_per_node, 12);
    let seg = info.accessible_topology.unwrap().segments;
    assert_eq!(seg.get(cinderblock::TOPOLOGY_NODE_KEY).map(String::as_str), Some("node-1"));
    assert_eq!(seg.get(cinderblock::TOPOLOGY_ZONE_KEY).map(String::as_str), Some("zone-a"));

    use csi::node_service_capability::rpc::Type;
    let caps: Vec<i32> = c
        .node_get_capabilities(csi::NodeGetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .into_iter()
        .filter_map(|c| c.r#type.map(|csi::node_service_capability::Type::Rpc(r)| r.r#type))
        .collect();
    for t in [Type::StageUnstageVolume, Type::GetVolumeStats, Type::ExpandVolume, Type::VolumeCondition, Type::SingleNodeMultiWriter] {
        assert!(caps.contains(&(t as i32)), "{t:?} missing from {caps:?}");
    }
    assert!(!caps.contains(&(Type::VolumeMountGroup as i32)));

    // Without a zone, no zone key.
    drop(c);
    let env2 = Env::new(&[]);
    let info = env2.csi().await.node_get_info(csi::NodeGetInfoRequest {}).await.unwrap().into_inner();
    let seg = info.accessible_topology.unwrap().segments;
    assert_eq!(seg.len(), 1);
    assert_eq!(info.max_volumes_per_node, 0);
}

#[tokio::test]
async fn filesystem_stage_publish_write_unpublish_unstage() {
    require_root!();
    let env = Env::new(&[]);
    let (mut agent, mut c) = (env.agent().await, env.csi().await);
    create_volume(&mut agent, "vol-a", 64 * MIB, None).await;
    let staging = env.k("staging/vol-a");
    let target = env.k("pods/p1/volumes/vol-a");
    std::fs::create_dir(&staging).unwrap();

    c.node_stage_volume(stage_req("vol-a", &staging, Some(mount_cap("ext4", &["noatime"], Mode::SingleNodeWriter)))).await.unwrap();
    let m = mount_at(&staging).expect("staging is mounted");
    assert_eq!(m.fs_type, "ext4");
    assert!(m.source.starts_with("/dev/loop"), "{m:?}");
    assert!(m.mount_options.iter().any(|o| o == "noatime"), "{m:?}");
    assert_eq!(loops_of(&env.image("vol-a")), 1);
    // Direct I/O is on.
    let number: u32 = m.source.trim_start_matches("/dev/loop").parse().unwrap();
    assert_eq!(loopdev::direct_io(number).unwrap(), Some(true));

    // Idempotent; other capabilities on the same staging path are refused.
    c.node_stage_volume(stage_req("vol-a", &staging, Some(mount_cap("ext4", &["noatime"], Mode::SingleNodeWriter)))).await.unwrap();
    c.node_stage_volume(stage_req("vol-a", &staging, Some(mount_cap("", &[], Mode::SingleNodeWriter)))).await.unwrap();
    expect_code("stage as xfs", c.node_stage_volume(stage_req("vol-a", &staging, Some(xfs()))).await, Code::AlreadyExists);
    expect_code(
        "stage as block",
        c.node_stage_volume(stage_req("vol-a", &staging, Some(block(Mode::SingleNodeWriter)))).await,
        Code::AlreadyExists,
    );
    expect_code(
        "stage read-only",
        c.node_stage_volume(stage_req("vol-a", &staging, Some(mount_cap("ext4", &[], Mode::SingleNodeReaderOnly)))).await,
        Code::AlreadyExists,
    );
    let elsewhere = env.k("staging/other");
    expect_code(
        "stage at a second path",
        c.node_stage_volume(stage_req("vol-a", &elsewhere, Some(ext4()))).await,
        Code::FailedPrecondition,
    );
    assert!(!elsewhere.exists(), "a refused stage created its folder");
    assert_eq!(env.mounts().len(), 1);

    c.node_publish_volume(publish_req("vol-a", &staging, &target, ext4(), false)).await.unwrap();
    c.node_publish_volume(publish_req("vol-a", &staging, &target, ext4(), false)).await.unwrap();
    expect_code(
        "publish read-only over read-write",
        c.node_publish_volume(publish_req("vol-a", &staging, &target, ext4(), true)).await,
        Code::AlreadyExists,
    );
    expect_code(
        "publish block over a filesystem",
        c.node_publish_volume(publish_req("vol-a", &staging, &target, block(Mode::SingleNodeWriter), false)).await,
        Code::AlreadyExists,
    );
    assert_eq!(env.mounts().len(), 2, "a repeated publish stacked a mount");

    let bytes = data(3 * MIB as usize + 123, 1);
    write_synced(&target.join("hello.bin"), &bytes);
    assert_eq!(std::fs::read(staging.join("hello.bin")).unwrap(), bytes);

    let stats = c.node_get_volume_stats(stats_req("vol-a", &target)).await.unwrap().into_inner();
    let b = stats.usage.iter().find(|u| u.unit == csi::volume_usage::Unit::Bytes as i32).unwrap();
    let i = stats.usage.iter().find(|u| u.unit == csi::volume_usage::Unit::Inodes as i32).unwrap();
    assert!(b.total > 0 && b.total <= 64 * MIB as i64 && b.used >= 3 * MIB as i64 && b.available > 0, "{b:?}");
    assert!(i.total > 0 && i.used >= 1 && i.available > 0, "{i:?}");
    let cond = stats.volume_condition.unwrap();
    assert!(!cond.abnormal, "{cond:?}");
    c.node_get_volume_stats(stats_req("vol-a", &staging)).await.unwrap();

    c.node_unpublish_volume(unpublish_req("vol-a", &target)).await.unwrap();
    assert!(!target.exists(), "unpublish leaves the target folder");
    assert!(target.parent().unwrap().exists(), "unpublish removed the CO's folder");
    c.node_unpublish_volume(unpublish_req("vol-a", &target)).await.unwrap();
    expect_code("stats after unpublish", c.node_get_volume_stats(stats_req("vol-a", &target)).await, Code::NotFound);

    c.node_unstage_volume(unstage_req("vol-a", &staging)).await.unwrap();
    env.assert_clean("after unstage");
    assert!(staging.is_dir(), "the staging folder is the CO's; it stays");
    c.node_unstage_volume(unstage_req("vol-a", &staging)).await.unwrap();

    // Staged again, the filesystem is found, not formatted again.
    c.node_stage_volume(stage_req("vol-a", &staging, Some(mount_cap("", &[], Mode::SingleNodeWriter)))).await.unwrap();
    c.node_publish_volume(publish_req("vol-a", &staging, &target, ext4(), false)).await.unwrap();
    assert_eq!(std::fs::read(target.join("hello.bin")).unwrap(), bytes);
    c.node_unpublish_volume(unpublish_req("vol-a", &target)).await.unwrap();
    c.node_unstage_volume(unstage_req("vol-a", &staging)).await.unwrap();
    env.assert_clean("after the second unstage");
}

/// Stage and publish `id` as `cap` at fresh paths named after it.
async fn stage_and_publish(env: &Env, c: &mut NodeClient<Channel>, id: &str, cap: csi::VolumeCapability) -> (PathBuf, PathBuf) {
    let staging = env.k(&format!("staging/{id}"));
    let target = env.k(&format!("pods/{id}/mount"));
    c.node_stage_volume(stage_req(id, &staging, Some(cap.clone()))).await.unwrap();
    c.node_publish_volume(publish_req(id, &staging, &target, cap, false)).await.unwrap();
    (staging, target)
}

async fn unpublish_and_unstage(c: &mut NodeClient<Channel>, id: &str, staging: &Path, target: &Path) {
    c.node_unpublish_volume(unpublish_req(id, target)).await.unwrap();
    c.node_unstage_volume(unstage_req(id, staging)).await.unwrap();
}

#[tokio::test]
async fn snapshot_restore_gives_identical_files() {
    require_root!();
    let env = Env::new(&[]);
    let (mut agent, mut c) = (env.agent().await, env.csi().await);
    create_volume(&mut agent, "vol-src", XFS_MIN, None).await;
    let (s_staging, s_target) = stage_and_publish(&env, &mut c, "vol-src", xfs()).await;
    std::fs::create_dir(s_target.join("dir")).unwrap();
    write_synced(&s_target.join("dir/a.bin"), &data(5 * MIB as usize, 2));
    write_synced(&s_target.join("small.txt"), b"before the snapshot\n");
    rustix::fs::syncfs(std::fs::File::open(&s_target).unwrap()).unwrap();
    let before = tree(&s_target);

    agent
        .create_snapshot(pb::CreateSnapshotRequest {
            migration_pass: false,
            snapshot_id: "snap-1".into(),
            source_volume_id: "vol-src".into(),
            metadata: Default::default(),
            group_id: String::new(),
        })
        .await
        .unwrap();
    // Changes after the snapshot do not reach the restored volume.
    write_synced(&s_target.join("small.txt"), b"after the snapshot\n");
    write_synced(&s_target.join("later.txt"), b"later\n");

    use pb::create_volume_request::Source;
    create_volume(&mut agent, "vol-restored", XFS_MIN, Some(Source::SnapshotId("snap-1".into()))).await;
    // The source stays mounted: the copy has the same XFS UUID.
    let (r_staging, r_target) = stage_and_publish(&env, &mut c, "vol-restored", mount_cap("", &[], Mode::SingleNodeWriter)).await;
    assert_eq!(mount_at(&r_staging).unwrap().fs_type, "xfs");
    assert_eq!(tree(&r_target), before, "the restored volume differs from the snapshot");
    assert_eq!(std::fs::read(r_target.join("small.txt")).unwrap(), b"before the snapshot\n");

    unpublish_and_unstage(&mut c, "vol-restored", &r_staging, &r_target).await;
    unpublish_and_unstage(&mut c, "vol-src", &s_staging, &s_target).await;
    env.assert_clean("after both unstages");
}

#[tokio::test]
async fn clone_gives_identical_files() {
    require_root!();
    let env = Env::new(&[]);
    let (mut agent, mut c) = (env.agent().await, env.csi().await);
    create_volume(&mut agent, "vol-orig", 96 * MIB, None).await;
    let (o_staging, o_target) = stage_and_publish(&env, &mut c, "vol-orig", ext4()).await;
    for i in 0..20 {
        write_synced(&o_target.join(format!("f{i}.bin")), &data(100_000 + i * 4099, i as u64));
    }
    rustix::fs::syncfs(std::fs::File::open(&o_target).unwrap()).unwrap();
    let before = tree(&o_target);
    // Unpublished and unstaged first: the clone is then of a clean filesystem.
    unpublish_and_unstage(&mut c, "vol-orig", &o_staging, &o_target).await;

    use pb::create_volume_request::Source;
    create_volume(&mut agent, "vol-clone", 96 * MIB, Some(Source::SourceVolumeId("vol-orig".into()))).await;
    let (o_staging, o_target) = stage_and_publish(&env, &mut c, "vol-orig", ext4()).await;
    let (c_staging, c_target) = stage_and_publish(&env, &mut c, "vol-clone", ext4()).await;
    assert_eq!(tree(&c_target), before);
    // They are independent volumes.
    write_synced(&c_target.join("only-in-clone"), b"x");
    assert!(!o_target.join("only-in-clone").exists());
    assert_eq!(tree(&o_target), before);

    unpublish_and_unstage(&mut c, "vol-clone", &c_staging, &c_target).await;
    unpublish_and_unstage(&mut c, "vol-orig", &o_staging, &o_target).await;
    env.assert_clean("after both unstages");
}

#[tokio::test]
async fn block_volume_raw_bytes_round_trip() {
    require_root!();
    let env = Env::new(&[]);
    let (mut agent, mut c) = (env.agent().await, env.csi().await);
    create_volume(&mut agent, "vol-b", 32 * MIB, None).await;
    let image = env.image("vol-b");
    let staging = env.k("staging/vol-b");
    let target = env.k("pods/p1/dev/vol-b");
    let ro_target = env.k("pods/p2/dev/vol-b");
    let cap = block(Mode::SingleNodeMultiWriter);

    c.node_stage_volume(stage_req("vol-b", &staging, Some(cap.clone()))).await.unwrap();
    c.node_stage_volume(stage_req("vol-b", &staging, Some(cap.clone()))).await.unwrap();
    assert_eq!(loops_of(&image), 1);
    expect_code("stage as a filesystem", c.node_stage_volume(stage_req("vol-b", &staging, Some(ext4()))).await, Code::AlreadyExists);
    expect_code(
        "publish as a filesystem",
        c.node_publish_volume(publish_req("vol-b", &staging, &env.k("pods/p9/mnt"), ext4(), false)).await,
        Code::FailedPrecondition,
    );

    c.node_publish_volume(publish_req("vol-b", &staging, &target, cap.clone(), false)).await.unwrap();
    c.node_publish_volume(publish_req("vol-b", &staging, &target, cap.clone(), false)).await.unwrap();
    let meta = std::fs::metadata(&target).unwrap();
    assert!(meta.file_type().is_block_device());
    assert_eq!(loopdev::size_bytes(&target).unwrap(), 32 * MIB);

    // Raw bytes through the published device: back through it and in the image.
    let first = data(64 * 1024, 7);
    let last = data(4096, 8);
    {
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&target).unwrap();
        f.write_all_at(&first, 0).unwrap();
        f.write_all_at(&last, 32 * MIB - 4096).unwrap();
        f.sync_all().unwrap();
    }
    let read_at = |path: &Path, off: u64, len: usize| {
        let mut buf = vec![0u8; len];
        std::fs::File::open(path).unwrap().read_exact_at(&mut buf, off).unwrap();
        buf
    };
    assert_eq!(read_at(&target, 0, first.len()), first);
    assert_eq!(read_at(&image, 0, first.len()), first);
    assert_eq!(read_at(&image, 32 * MIB - 4096, 4096), last);

    let stats = c.node_get_volume_stats(stats_req("vol-b", &target)).await.unwrap().into_inner();
    assert_eq!(stats.usage.len(), 1);
    assert_eq!(stats.usage[0].total, 32 * MIB as i64);
    assert!(!stats.volume_condition.unwrap().abnormal);

    // Read-only: a device of its own that the kernel keeps read-only.
    c.node_publish_volume(publish_req("vol-b", &staging, &ro_target, cap.clone(), true)).await.unwrap();
    c.node_publish_volume(publish_req("vol-b", &staging, &ro_target, cap.clone(), true)).await.unwrap();
    assert_ne!(std::fs::metadata(&ro_target).unwrap().rdev(), meta.rdev());
    assert_eq!(read_at(&ro_target, 0, first.len()), first);
    let err = std::fs::OpenOptions::new()
        .write(true)
        .open(&ro_target)
        .and_then(|f| f.write_all_at(&[0u8; 4096], 0).and_then(|()| f.sync_all()))
        .expect_err("writing through a read-only block target");
    assert!(is_read_only_error(&err), "{err}");
    assert_eq!(read_at(&image, 0, first.len()), first, "the read-only target wrote to the image");
    expect_code(
        "the read-only target asked read-write",
        c.node_publish_volume(publish_req("vol-b", &staging, &ro_target, cap.clone(), false)).await,
        Code::AlreadyExists,
    );
    assert_eq!(loops_of(&image), 2);

    expect_code("unstage while published", c.node_unstage_volume(unstage_req("vol-b", &staging)).await, Code::FailedPrecondition);
    c.node_unpublish_volume(unpublish_req("vol-b", &ro_target)).await.unwrap();
    assert!(!ro_target.exists());
    assert_eq!(loops_of(&image), 1, "the read-only device outlived its target");
    c.node_unpublish_volume(unpublish_req("vol-b", &target)).await.unwrap();
    assert_eq!(loops_of(&image), 1, "unpublish detached the staged device");
    c.node_unstage_volume(unstage_req("vol-b", &staging)).await.unwrap();
    env.assert_clean("after unstage");
    assert!(staging.is_dir() && std::fs::read_dir(&staging).unwrap().next().is_none(), "staging folder not left empty");
    c.node_unstage_volume(unstage_req("vol-b", &staging)).await.unwrap();
}

#[tokio::test]
async fn read_only_publish_refuses_writes() {
    require_root!();
    let env = Env::new(&[]);
    let (mut agent, mut c) = (env.agent().await, env.csi().await);
    create_volume(&mut agent, "vol-r", 64 * MIB, None).await;
    let staging = env.k("staging/vol-r");
    let rw = env.k("pods/writer/mnt");
    let ro = env.k("pods/reader/mnt");
    c.node_stage_volume(stage_req("vol-r", &staging, Some(ext4()))).await.unwrap();
    c.node_publish_volume(publish_req("vol-r", &staging, &rw, ext4(), false)).await.unwrap();
    // SINGLE_NODE_MULTI_WRITER: a second target is fine.
    c.node_publish_volume(publish_req("vol-r", &staging, &ro, ext4(), true)).await.unwrap();
    assert!(mount_at(&ro).unwrap().is_read_only());

    write_synced(&rw.join("note"), b"from the writer");
    assert_eq!(std::fs::read(ro.join("note")).unwrap(), b"from the writer");
    let err = std::fs::write(ro.join("nope"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    let err = std::fs::remove_file(ro.join("note")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    assert!(!mount_at(&staging).unwrap().is_read_only(), "the staging mount must stay writable");

    // SINGLE_NODE_SINGLE_WRITER allows one target only.
    let one = mount_cap("ext4", &[], Mode::SingleNodeSingleWriter);
    expect_code(
        "a second target for a single writer",
        c.node_publish_volume(publish_req("vol-r", &staging, &env.k("pods/third/mnt"), one, false)).await,
        Code::FailedPrecondition,
    );
    assert!(!env.k("pods/third").exists());
    c.node_unpublish_volume(unpublish_req("vol-r", &ro)).await.unwrap();
    c.node_unpublish_volume(unpublish_req("vol-r", &rw)).await.unwrap();
    c.node_unstage_volume(unstage_req("vol-r", &staging)).await.unwrap();

    // A reader-only access mode stages read-only and publishes read-only
    // even when the flag says otherwise.
    let reader = mount_cap("", &[], Mode::SingleNodeReaderOnly);
    c.node_stage_volume(stage_req("vol-r", &staging, Some(reader.clone()))).await.unwrap();
    assert!(mount_at(&staging).unwrap().is_read_only());
    c.node_publish_volume(publish_req("vol-r", &staging, &rw, reader.clone(), false)).await.unwrap();
    assert_eq!(std::fs::read(rw.join("note")).unwrap(), b"from the writer");
    let err = std::fs::write(rw.join("nope"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    c.node_unpublish_volume(unpublish_req("vol-r", &rw)).await.unwrap();
    c.node_unstage_volume(unstage_req("vol-r", &staging)).await.unwrap();

    // So does an "ro" mount flag, and repeating the calls is OK.
    let ro_flag = mount_cap("ext4", &["noatime,ro"], Mode::SingleNodeWriter);
    for _ in 0..2 {
        c.node_stage_volume(stage_req("vol-r", &staging, Some(ro_flag.clone()))).await.unwrap();
        c.node_publish_volume(publish_req("vol-r", &staging, &rw, ro_flag.clone(), false)).await.unwrap();
    }
    let err = std::fs::write(rw.join("nope"), b"x").unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    c.node_unpublish_volume(unpublish_req("vol-r", &rw)).await.unwrap();
    c.node_unstage_volume(unstage_req("vol-r", &staging)).await.unwrap();

    // A blank volume cannot be formatted read-only.
    create_volume(&mut agent, "vol-blank", 64 * MIB, None).await;
    let staging2 = env.k("staging/vol-blank");
    expect_code(
        "reader-only stage of a blank volume",
        c.node_stage_volume(stage_req("vol-blank", &staging2, Some(reader))).await,
        Code::FailedPrecondition,
    );
    assert!(!staging2.exists());
    env.assert_clean("after the read-only checks");
}

/// Write data, grow the image through the agent, NodeExpandVolume on the
/// published path: the filesystem is bigger and the data unchanged.
async fn expand_mounted(fs: &str, size: u64, grown: u64) -> Result<(), tonic::Status> {
    let env = Env::new(&[]);
    let (mut agent, mut c) = (env.agent().await, env.csi().await);
    create_volume(&mut agent, "vol-x", size, None).await;
    let (staging, target) = stage_and_publish(&env, &mut c, "vol-x", mount_cap(fs, &[], Mode::SingleNodeWriter)).await;
    let bytes = data(8 * MIB as usize, 3);
    write_synced(&target.join("data.bin"), &bytes);
    let before = fs_bytes(&target);

    // Not grown by the controller yet.
    expect_code(
        "expand beyond the pool's size",
        c.node_expand_volume(expand_req("vol-x", &target, &staging, grown)).await,
        Code::OutOfRange,
    );
    agent.expand_volume(pb::ExpandVolumeRequest { volume_id: "vol-x".into(), size_bytes: grown }).await.unwrap();
    let result = c.node_expand_volume(expand_req("vol-x", &target, &staging, grown)).await;
    let device = mount_at(&staging).unwrap().source;
    assert_eq!(loopdev::size_bytes(Path::new(&device)).unwrap(), grown, "the loop device did not grow");
    assert_eq!(std::fs::read(target.join("data.bin")).unwrap(), bytes);
    let result = result.map(|r| r.into_inner().capacity_bytes);
    if let Ok(capacity) = &result {
        assert_eq!(*capacity, grown as i64);
        let after = fs_bytes(&target);
        assert!(after > before + (grown - size) * 8 / 10, "{fs}: {before} -> {after}");
        // Repeating it changes nothing.
        let again = c.node_expand_volume(expand_req("vol-x", &target, &staging, grown)).await.unwrap();
        assert_eq!(again.into_inner().capacity_bytes, grown as i64);
        assert_eq!(fs_bytes(&target), after);
        let stats = c.node_get_volume_stats(stats_req("vol-x", &target)).await.unwrap().into_inner();
        assert_eq!(stats.usage[0].total as u64, after);
    }
    unpublish_and_unstage(&mut c, "vol-x", &staging, &target).await;
    env.assert_clean("after expansion");
    result.map(|_| ())
}

#[tokio::test]
async fn expand_mounted_xfs_with_data() {
    require_root!();
    expand_mounted("xfs", XFS_MIN, 2 * XFS_MIN).await.unwrap();
}

#[tokio::test]
async fn expand_mounted_ext4_with_data() {
    require_root!();
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let cap_eff = status.lines().find_map(|l| l.strip_prefix("CapEff:")).map(str::trim).unwrap_or("0");
    let has_sys_resource = u64::from_str_radix(cap_eff, 16).unwrap_or(0) & (1 << CAP_SYS_RESOURCE) != 0;
    let result = expand_mounted("ext4", 64 * MIB, 192 * MIB).await;
    if has_sys_resource {
        result.unwrap();
    } else {
        // Online ext4 resize needs CAP_SYS_RESOURCE; the error must say so.
        let e = result.unwrap_err();
        assert!(e.message().contains("CAP_SYS_RESOURCE"), "{}", e.message());
        eprintln!(
            "note: expand_mounted_ext4_with_data: no CAP_SYS_RESOURCE here, so only the refusal (and the loop device growing) was checked"
        );
    }
}

/// The kubelet's order for a volume grown while no pod used it: the
/// controller grows the image, then NodeStage, then NodeExpandVolume. The
/// filesystem fills its device once staged (ext4 grown unmounted, where no
/// CAP_SYS_RESOURCE is needed; xfs right after its mount), and the
/// expansion after it has nothing left to do.
async fn grown_while_unstaged(fs: &str, size: u64, grown: u64) {
    let env = Env::new(&[]);
    let (mut agent, mut c) = (env.agent().await, env.csi().await);
    create_volume(&mut agent, "vol-off", size, None).await;
    let cap = mount_cap(fs, &[], Mode::SingleNodeWriter);
    let (staging, target) = stage_and_publish(&env, &mut c, "vol-off", cap.clone()).await;
    let bytes = data(8 * MIB as usize, 5);
    write_synced(&target.join("data.bin"), &bytes);
    let before = fs_bytes(&target);
    unpublish_and_unstage(&mut c, "vol-off", &staging, &target).await;

    agent.expand_volume(pb::ExpandVolumeRequest { volume_id: "vol-off".into(), size_bytes: grown }).await.unwrap();
    let (staging, target) = stage_and_publish(&env, &mut c, "vol-off", cap).await;
    let after = fs_bytes(&target);
    assert!(after > before + (grown - size) * 8 / 10, "{fs} did not grow at the stage: {before} -> {after}");
    assert_eq!(std::fs::read(target.join("data.bin")).unwrap(), bytes);
    let r = c.node_expand_volume(expand_req("vol-off", &target, &staging, grown)).await.unwrap().into_inner();
    assert_eq!(r.capacity_bytes, grown as i64);
    assert_eq!(fs_bytes(&target), after);
    unpublish_and_unstage(&mut c, "vol-off", &staging, &target).await;
    env.assert_clean("after growing at the stage");
}

#[tokio::test]
async fn ext4_grown_while_unstaged_fills_its_device_at_the_next_stage() {
    require_root!();
    grown_while_unstaged("ext4", 64 * MIB, 192 * MIB).await;
}

#[tokio::test]
async fn xfs_grown_while_unstaged_fills_its_device_at_the_next_stage() {
    require_root!();
    grown_while_unstaged("xfs", XFS_MIN, 2 * XFS_MIN).await;
}

#[tokio::test]
async fn expand_block_volume() {
    require_root!();
    let env = Env::new(&[]);
    let (mut agent, mut c) = (env.agent().await, env.csi().await);
    create_volume(&mut agent, "vol-bx", 16 * MIB, None).await;
    let cap = block(Mode::SingleNodeWriter);
    let (staging, target) = stage_and_publish(&env, &mut c, "vol-bx", cap.clone()).await;
    let ro_target = env.k("pods/vol-bx-ro/dev");
    c.node_publish_volume(publish_req("vol-bx", &staging, &ro_target, cap, true)).await.unwrap();
    agent.expand_volume(pb::ExpandVolumeRequest { volume_id: "vol-bx".into(), size_bytes: 48 * MIB }).await.unwrap();
    let r = c.node_expand_volume(expand_req("vol-bx", &target, &staging, 48 * MIB)).await.unwrap().into_inner();
    assert_eq!(r.capacity_bytes, 48 * MIB as i64);
    assert_eq!(loopdev::size_bytes(&target).unwrap(), 48 * MIB);
    assert_eq!(loopdev::size_bytes(&ro_target).unwrap(), 48 * MIB, "the read-only device was not refreshed");
    // By the staging path too.
    c.node_expand_volume(expand_req("vol-bx", &staging, &staging, 48 * MIB)).await.unwrap();
    c.node_unpublish_volume(unpublish_req("vol-bx", &ro_target)).await.unwrap();
    unpublish_and_unstage(&mut c, "vol-bx", &staging, &target).await;
    env.assert_clean("after block expansion");
}

#[tokio::test]
async fn unstage_after_kill9_and_restart_cleans_up() {
    require_root!();
    let mut env = Env::new(&[]);
    let (mut agent, mut c) = (env.agent().await, env.csi().await);
    create_volume(&mut agent, "vol-fs", 64 * MIB, None).await;
    create_volume(&mut agent, "vol-raw", 16 * MIB, None).await;
    let (fs_staging, fs_target) = stage_and_publish(&env, &mut c, "vol-fs", ext4()).await;
    write_synced(&fs_target.join("kept"), b"survives the plugin");
    let raw_staging = env.k("staging/vol-raw");
    c.node_stage_volume(stage_req("vol-raw", &raw_staging, Some(block(Mode::SingleNodeWriter)))).await.unwrap();
    drop((agent, c));

    env.kill9();
    env.start();
    let mut c = env.csi().await;
    // The new process sees what the old one did.
    c.node_stage_volume(stage_req("vol-fs", &fs_staging, Some(ext4()))).await.unwrap();
    c.node_publish_volume(publish_req("vol-fs", &fs_staging, &fs_target, ext4(), false)).await.unwrap();
    c.node_stage_volume(stage_req("vol-raw", &raw_staging, Some(block(Mode::SingleNodeWriter)))).await.unwrap();
    let stats = c.node_get_volume_stats(stats_req("vol-fs", &fs_target)).await.unwrap().into_inner();
    assert!(!stats.volume_condition.unwrap().abnormal);
    assert_eq!(std::fs::read(fs_target.join("kept")).unwrap(), b"survives the plugin");
    assert_eq!(env.mounts().len(), 3);

    unpublish_and_unstage(&mut c, "vol-fs", &fs_staging, &fs_target).await;
    c.node_unstage_volume(unstage_req("vol-raw", &raw_staging)).await.unwrap();
    env.assert_clean("after unstage by the restarted plugin");
    assert_eq!(loops_of(&env.image("vol-fs")), 0);
    assert_eq!(loops_of(&env.image("vol-raw")), 0);
}

/// Every folder under `dir`, for "nothing was created" checks.
fn folders(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            out.push(p.clone());
            if e.file_type().unwrap().is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn bad_input_gets_the_spec_code_and_leaves_nothing() {
    require_root!();
    let env = Env::new(&[]);
    let (mut agent, mut c) = (env.agent().await, env.csi().await);
    create_volume(&mut agent, "vol-ok", 64 * MIB, None).await;
    let outside = env.root.join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, env.k("escape")).unwrap();
    std::fs::write(env.k("staging/a-file"), b"not a folder").unwrap();
    let fresh = env.k("staging/fresh"); // does not exist: must not be created
    let before = (folders(&env.kubelet), folders(&outside));
    let check = |what: &str| {
        assert_eq!((folders(&env.kubelet), folders(&outside)), before, "{what} changed the folders");
        assert!(env.mounts().is_empty(), "{what} left a mount");
        assert!(env.loops().is_empty(), "{what} left a loop device");
    };

    let no_type = csi::VolumeCapability { access_type: None, ..ext4() };
    let no_mode = csi::VolumeCapability { access_mode: None, ..ext4() };
    let stage_cases: Vec<(&str, csi::NodeStageVolumeRequest, Code)> = vec![
        ("unknown volume", stage_req("vol-nope", &fresh, Some(ext4())), Code::NotFound),
        ("empty volume id", stage_req("", &fresh, Some(ext4())), Code::InvalidArgument),
        ("path-like volume id", stage_req("../pool", &fresh, Some(ext4())), Code::InvalidArgument),
        ("missing capability", stage_req("vol-ok", &fresh, None), Code::InvalidArgument),
        ("capability without access type", stage_req("vol-ok", &fresh, Some(no_type)), Code::InvalidArgument),
        ("capability without access mode", stage_req("vol-ok", &fresh, Some(no_mode)), Code::InvalidArgument),
        (
            "multi-node access mode",
            stage_req("vol-ok", &fresh, Some(mount_cap("ext4", &[], Mode::MultiNodeMultiWriter))),
            Code::InvalidArgument,
        ),
        (
            "unsupported filesystem",
            stage_req("vol-ok", &fresh, Some(mount_cap("btrfs", &[], Mode::SingleNodeWriter))),
            Code::InvalidArgument,
        ),
        (
            "mount flag that changes the mount",
            stage_req("vol-ok", &fresh, Some(mount_cap("ext4", &["bind"], Mode::SingleNodeWriter))),
            Code::InvalidArgument,
        ),
        ("empty staging path", stage_req("vol-ok", Path::new(""), Some(ext4())), Code::InvalidArgument),
        ("relative staging path", stage_req("vol-ok", Path::new("kubelet/staging/x"), Some(ext4())), Code::InvalidArgument),
        ("staging path outside the allowed roots", stage_req("vol-ok", &outside, Some(ext4())), Code::InvalidArgument),
        ("staging path with ..", stage_req("vol-ok", &env.k("staging/../../outside"), Some(ext4())), Code::InvalidArgument),
        ("staging path through a symlink out", stage_req("vol-ok", &env.k("escape/x"), Some(ext4())), Code::InvalidArgument),
        ("staging path that is a file", stage_req("vol-ok", &env.k("staging/a-file"), Some(ext4())), Code::InvalidArgument),
        (
            "staging path that is a file, block",
            stage_req("vol-ok", &env.k("staging/a-file"), Some(block(Mode::SingleNodeWriter))),
            Code::InvalidArgument,
        ),
        ("the allowed root itself", stage_req("vol-ok", &env.kubelet, Some(ext4())), Code::InvalidArgument),
    ];
    for (what, req, code) in stage_cases {
        expect_code(what, c.node_stage_volume(req).await, code);
        check(what);
    }

    let target = env.k("pods/p1/mnt");
    let publish_cases: Vec<(&str, csi::NodePublishVolumeRequest, Code)> = vec![
        ("publish of an unstaged volume", publish_req("vol-ok", &fresh, &target, ext4(), false), Code::FailedPrecondition),
        ("publish without staging path", publish_req("vol-ok", Path::new(""), &target, ext4(), false), Code::FailedPrecondition),
        ("publish of an unknown volume", publish_req("vol-nope", &fresh, &target, ext4(), false), Code::NotFound),
        (
            "publish without capability",
            csi::NodePublishVolumeRequest { volume_capability: None, ..publish_req("vol-ok", &fresh, &target, ext4(), false) },
            Code::InvalidArgument,
        ),
        ("publish to a relative target", publish_req("vol-ok", &fresh, Path::new("pods/x"), ext4(), false), Code::InvalidArgument),
        ("publish outside the allowed roots", publish_req("vol-ok", &fresh, &outside.join("t"), ext4(), false), Code::InvalidArgument),
        ("publish without target", publish_req("vol-ok", &fresh, Path::new(""), ext4(), false), Code::InvalidArgument),
    ];
    for (what, req, code) in publish_cases {
        expect_code(what, c.node_publish_volume(req).await, code);
        check(what);
    }

    expect_code("stats of a missing path", c.node_get_volume_stats(stats_req("vol-ok", &env.k("pods/none"))).await, Code::NotFound);
    expect_code("stats of an unpublished folder", c.node_get_volume_stats(stats_req("vol-ok", &env.k("staging"))).await, Code::NotFound);
    expect_code("stats without a path", c.node_get_volume_stats(stats_req("vol-ok", Path::new(""))).await, Code::InvalidArgument);
    // Looking where the plugin never publishes finds nothing.
    expect_code("stats outside the roots", c.node_get_volume_stats(stats_req("vol-ok", &outside)).await, Code::NotFound);
    expect_code("stats of a relative path", c.node_get_volume_stats(stats_req("vol-ok", Path::new("some/path"))).await, Code::NotFound);
    expect_code(
        "expand of a relative path",
        c.node_expand_volume(expand_req("vol-ok", Path::new("some/path"), &fresh, 0)).await,
        Code::NotFound,
    );
    expect_code(
        "expand of an unknown volume",
        c.node_expand_volume(expand_req("vol-nope", &env.k("staging"), &fresh, 0)).await,
        Code::NotFound,
    );
    expect_code(
        "expand of an unstaged volume",
        c.node_expand_volume(expand_req("vol-ok", &env.k("staging"), &fresh, 0)).await,
        Code::NotFound,
    );
    expect_code("unstage outside the roots", c.node_unstage_volume(unstage_req("vol-ok", &outside)).await, Code::InvalidArgument);
    expect_code("unpublish without volume id", c.node_unpublish_volume(unpublish_req("", &target)).await, Code::InvalidArgument);
    check("stats, expand and refused unstage");

    // Undoing what is not there is OK and creates nothing.
    c.node_unstage_volume(unstage_req("vol-ok", &fresh)).await.unwrap();
    c.node_unpublish_volume(unpublish_req("vol-ok", &target)).await.unwrap();
    c.node_unstage_volume(unstage_req("vol-nope", &fresh)).await.unwrap();
    check("unstage and unpublish of nothing");
    assert_eq!(std::fs::read(env.k("staging/a-file")).unwrap(), b"not a folder");
}

#[tokio::test]
async fn stats_report_abnormal_when_the_image_is_gone() {
    require_root!();
    let env = Env::new(&[]);
    let (mut agent, mut c) = (env.agent().await, env.csi().await);
    create_volume(&mut agent, "vol-gone", 64 * MIB, None).await;
    let (staging, target) = stage_and_publish(&env, &mut c, "vol-gone", ext4()).await;
    let cond = c.node_get_volume_stats(stats_req("vol-gone", &target)).await.unwrap().into_inner().volume_condition.unwrap();
    assert!(!cond.abnormal && !cond.message.is_empty(), "{cond:?}");

    // Deleted from the pool while in use (the controller should prevent it).
    agent.delete_volume(pb::DeleteVolumeRequest { volume_id: "vol-gone".into() }).await.unwrap();
    assert!(!env.image("vol-gone").exists());
    let stats = c.node_get_volume_stats(stats_req("vol-gone", &target)).await.unwrap().into_inner();
    let cond = stats.volume_condition.unwrap();
    assert!(cond.abnormal, "{cond:?}");
    assert!(cond.message.contains("deleted"), "{}", cond.message);
    assert!(!stats.usage.is_empty(), "usage is still reported");

    // The node still cleans up after it.
    unpublish_and_unstage(&mut c, "vol-gone", &staging, &target).await;
    env.assert_clean("after unstage of a deleted volume");
}

#[tokio::test]
async fn concurrent_calls_on_one_volume_are_aborted_not_raced() {
    require_root!();
    let env = Env::new(&[]);
    let (mut agent, c) = (env.agent().await, env.csi().await);
    create_volume(&mut agent, "vol-c", XFS_MIN, None).await;
    let staging = env.k("staging/vol-c");
    let calls = (0..6).map(|_| {
        let mut c = c.clone();
        let req = stage_req("vol-c", &staging, Some(xfs()));
        async move { c.node_stage_volume(req).await.map(|_| ()) }
    });
    let results = futures::future::join_all(calls).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let aborted = results.iter().filter(|r| matches!(r, Err(e) if e.code() == Code::Aborted)).count();
    assert_eq!(ok + aborted, results.len(), "{results:?}");
    assert!(ok >= 1 && aborted >= 1, "ok {ok}, aborted {aborted}");
    let m: Vec<_> = env.mounts().into_iter().map(|m| m.mount_point).collect();
    assert_eq!(m, std::slice::from_ref(&staging), "racing stages stacked mounts");
    assert_eq!(loops_of(&env.image("vol-c")), 1);
    // The retry a CO makes after ABORTED succeeds.
    let mut c2 = c.clone();
    c2.node_stage_volume(stage_req("vol-c", &staging, Some(xfs()))).await.unwrap();
    c2.node_unstage_volume(unstage_req("vol-c", &staging)).await.unwrap();
    env.assert_clean("after unstage");
}

/// A pool on a disk with 4096-byte sectors: every volume still shows
/// 512-byte sectors, whatever its loop device's direct I/O came to, so a
/// file system made on one attach mounts on every later one (a clone of an
/// xfs volume once failed: "device supports 4096 byte sectors (not 512)").
#[tokio::test]
async fn volumes_keep_512_byte_sectors_on_a_pool_with_4k_sectors() {
    require_root!();
    require_tools!("blockdev");
    let fs = TestFs::new("xfs-4k-sectors", "1G");
    let env = Env::with_pool(Some(&fs.mount.join("pool")), &[]);
    let (mut agent, mut c) = (env.agent().await, env.csi().await);
    create_volume(&mut agent, "vol-raw", 64 * MIB, None).await;
    let (staging, target) = stage_and_publish(&env, &mut c, "vol-raw", block(Mode::SingleNodeWriter)).await;
    let out = std::process::Command::new("blockdev").arg("--getss").arg(&target).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "512", "logical sector size of the volume's device");
    unpublish_and_unstage(&mut c, "vol-raw", &staging, &target).await;

    create_volume(&mut agent, "vol-x", 320 * MIB, None).await;
    let (staging, target) = stage_and_publish(&env, &mut c, "vol-x", xfs()).await;
    write_synced(&target.join("kept"), &data(70_000, 3));
    unpublish_and_unstage(&mut c, "vol-x", &staging, &target).await;
    use pb::create_volume_request::Source;
    create_volume(&mut agent, "vol-x-clone", 320 * MIB, Some(Source::SourceVolumeId("vol-x".into()))).await;
    for id in ["vol-x", "vol-x-clone"] {
        let (staging, target) = stage_and_publish(&env, &mut c, id, xfs()).await;
        assert_eq!(std::fs::read(target.join("kept")).unwrap(), data(70_000, 3), "{id}");
        unpublish_and_unstage(&mut c, id, &staging, &target).await;
    }
    env.assert_clean("after the unstages");
    drop(env);
}

/// The issue's scenario: a thick volume in use on a small pool; growing it
/// fails for lack of space; it stays usable at its old size with its data;
/// the node plugin restarts and serves; once space is freed, a retry grows it.
#[tokio::test]
async fn thick_expansion_out_of_space_keeps_the_volume_and_survives_a_restart() {
    require_root!();
    let fs = TestFs::new("xfs-noreflink", "320M");
    let mut env = Env::with_pool(Some(&fs.mount.join("pool")), &[]);
    let (mut agent, mut c) = (env.agent().await, env.csi().await);
    agent
        .create_volume(pb::CreateVolumeRequest {
            volume_id: "vol-t".into(),
            size_bytes: 64 * MIB,
            provisioning: pb::Provisioning::Thick as i32,
            source: None,
            metadata: Default::default(),
            remote: None,
        })
        .await
        .unwrap();
    let (staging, target) = stage_and_publish(&env, &mut c, "vol-t", ext4()).await;
    let bytes = data(8 * MIB as usize, 11);
    write_synced(&target.join("before.bin"), &bytes);

    // Leave the pool a little space; ask for exactly what it reports free:
    // the pool admits it, the filesystem cannot allocate it.
    let filler = fs.mount.join("filler");
    {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::create(&filler).unwrap();
        let st = rustix::fs::statvfs(&fs.mount).unwrap();
        let take = (st.f_bavail * st.f_frsize - 24 * MIB) as i64;
        assert_eq!(unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, take) }, 0);
        f.sync_all().unwrap();
    }
    // XFS's free count can move by a few MiB between the status call and the
    // expansion (a CI run saw 28 MiB, then 24): the pool then refuses before
    // it changes anything, and the test asks again with the new figure.
    let mut pool_refusals = 0;
    let (wanted, expand) = loop {
        let status = agent.get_pool_status(pb::GetPoolStatusRequest {}).await.unwrap().into_inner().status.unwrap();
        let wanted = 64 * MIB + status.free_bytes;
        let expand = pb::ExpandVolumeRequest { volume_id: "vol-t".into(), size_bytes: wanted };
        let e = expect_code("expansion without space", agent.expand_volume(expand.clone()).await, Code::ResourceExhausted);
        if e.message().contains("stays at") {
            break (wanted, expand);
        }
        assert!(e.message().contains("usable after the reserve"), "{}", e.message());
        pool_refusals += 1;
        assert!(pool_refusals < 10, "the pool refused what it reported free ten times: {}", e.message());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    let check_usable = |env: &Env, round: &str, len: u64| {
        assert_eq!(std::fs::metadata(env.image("vol-t")).unwrap().len(), len, "{round}");
        assert_eq!(std::fs::read(target.join("before.bin")).unwrap(), bytes, "{round}: data changed");
        write_synced(&target.join(format!("{round}.txt")), round.as_bytes());
    };
    let size = |v: pb::GetVolumeResponse| v.volume.unwrap().size_bytes;
    assert_eq!(size(agent.get_volume(pb::GetVolumeRequest { volume_id: "vol-t".into() }).await.unwrap().into_inner()), 64 * MIB);
    check_usable(&env, "after-failure", 64 * MIB);
    // A retry tries again rather than answering OK for a size it never reached.
    expect_code("retry without space", agent.expand_volume(expand.clone()).await, Code::ResourceExhausted);

    drop((agent, c));
    env.kill9();
    env.start();
    let (mut agent, mut c) = (env.agent().await, env.csi().await);
    let v = agent.get_volume(pb::GetVolumeRequest { volume_id: "vol-t".into() }).await.unwrap().into_inner();
    assert_eq!(size(v), 64 * MIB);
    let stats = c.node_get_volume_stats(stats_req("vol-t", &target)).await.unwrap().into_inner();
    assert!(!stats.volume_condition.unwrap().abnormal);
    check_usable(&env, "after-restart", 64 * MIB);

    std::fs::remove_file(&filler).unwrap();
    // XFS frees a deleted file's blocks in the background: wait until the
    // pool sees the space, as an operator's retry would.
    let deadline = Instant::now() + Duration::from_secs(20);
    while agent.get_pool_status(pb::GetPoolStatusRequest {}).await.unwrap().into_inner().status.unwrap().free_bytes < wanted {
        assert!(Instant::now() < deadline, "the freed space never showed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let grown = agent.expand_volume(expand).await.unwrap().into_inner().volume.unwrap().size_bytes;
    assert_eq!(grown, wanted.div_ceil(4096) * 4096);
    assert_eq!(std::fs::metadata(env.image("vol-t")).unwrap().len(), grown);
    let result = c.node_expand_volume(expand_req("vol-t", &target, &staging, grown)).await;
    let device = mount_at(&staging).unwrap().source;
    assert_eq!(loopdev::size_bytes(Path::new(&device)).unwrap(), grown, "the loop device did not grow");
    match result {
        Ok(r) => assert_eq!(r.into_inner().capacity_bytes, grown as i64),
        // Online ext4 resize needs CAP_SYS_RESOURCE, which this host may lack.
        Err(e) => assert!(e.message().contains("CAP_SYS_RESOURCE"), "{}", e.message()),
    }
    check_usable(&env, "after-growth", grown);
    unpublish_and_unstage(&mut c, "vol-t", &staging, &target).await;
    env.assert_clean("after the expansion test");
}

// ------------------------------------------------------- consistent snapshots

const RECORD: usize = 1024;

/// Record `seq`: its number, bytes that follow from it, and a checksum.
fn record(seq: u64) -> Vec<u8> {
    let mut r = seq.to_le_bytes().to_vec();
    r.extend(data(RECORD - 16, seq));
    let sum = fnv(&r);
    r.extend(sum.to_le_bytes());
    r
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, b| (h ^ *b as u64).wrapping_mul(0x100000001b3))
}

/// How many whole, valid records `bytes` holds, in order from 0; an error
/// for anything else (a torn or foreign record, a gap).
fn clean_prefix(bytes: &[u8]) -> Result<u64, String> {
    if !bytes.len().is_multiple_of(RECORD) {
        return Err(format!("{} bytes is not a whole number of records", bytes.len()));
    }
    for (i, r) in bytes.chunks(RECORD).enumerate() {
        let seq = u64::from_le_bytes(r[..8].try_into().unwrap());
        let sum = u64::from_le_bytes(r[RECORD - 8..].try_into().unwrap());
        if seq != i as u64 || sum != fnv(&r[..RECORD - 8]) {
            return Err(format!("record {i} is torn or out of order (it says {seq})"));
        }
    }
    Ok((bytes.len() / RECORD) as u64)
}

/// A writer appends checksummed records to a file on a staged ext4 volume
/// while `count` snapshots are taken through the agent. Each snapshot must
/// be a clean filesystem (no journal to replay: dumpe2fs shows no
/// needs_recovery, and a read-only device mounts) holding a clean prefix
/// of the records.
async fn snapshots_of_a_volume_in_use(pool: Option<&Path>, count: usize) {
    let env = Env::with_pool(pool, &[]);
    let (mut agent, mut c) = (env.agent().await, env.csi().await);
    create_volume(&mut agent, "vol-busy", 64 * MIB, None).await;
    let (staging, target) = stage_and_publish(&env, &mut c, "vol-busy", ext4()).await;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (stop, path) = (stop.clone(), target.join("records.log"));
        std::thread::spawn(move || {
            let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap();
            let mut seq = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && seq < 24 * 1024 {
                f.write_all(&record(seq)).unwrap(); // one write(2) per record
                seq += 1;
                if seq.is_multiple_of(8) {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            seq
        })
    };
    for i in 0..count {
        agent
            .create_snapshot(pb::CreateSnapshotRequest {
                migration_pass: false,
                snapshot_id: format!("snap-{i}"),
                source_volume_id: "vol-busy".into(),
                metadata: Default::default(),
                group_id: String::new(),
            })
            .await
            .unwrap_or_else(|e| panic!("snapshot {i}: {e}"));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.join().unwrap();

    let check = env.root.join("check");
    std::fs::create_dir(&check).unwrap();
    let mut seen = vec![];
    for i in 0..count {
        let image = env.pool.join("snapshots").join(format!("snap-{i}.img"));
        let out = std::process::Command::new("dumpe2fs").arg("-h").arg(&image).output().unwrap();
        let header = String::from_utf8_lossy(&out.stdout);
        let features = header.lines().find(|l| l.starts_with("Filesystem features:")).unwrap_or_default();
        assert!(!features.contains("needs_recovery"), "snapshot {i} has a journal to replay: {features}");
        assert!(header.lines().any(|l| l.starts_with("Filesystem state:") && l.ends_with(" clean")), "snapshot {i}:\n{header}");
        // ext4 refuses a read-only device whose journal needs replaying.
        let dev = loopdev::attach(&image, loopdev::AttachOptions::for_filesystem(true)).unwrap();
        mount::mount_fs(&dev.device.path, &check, "ext4", &[], true).unwrap_or_else(|e| panic!("snapshot {i}: {e}"));
        drop(dev);
        let bytes = std::fs::read(check.join("records.log")).unwrap_or_default();
        mount::unmount(&check).unwrap();
        let n = clean_prefix(&bytes).unwrap_or_else(|e| panic!("snapshot {i}: {e}"));
        seen.push(n);
    }
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "snapshots went back in time: {seen:?}");
    let distinct: std::collections::BTreeSet<_> = seen.iter().collect();
    assert!(distinct.len() > count / 5, "the writer hardly moved between snapshots: {seen:?} ({written} written)");
    eprintln!("{count} snapshots, records in each: {seen:?}; {written} written in all");
    unpublish_and_unstage(&mut c, "vol-busy", &staging, &target).await;
    env.assert_clean("after the snapshot test");
}

#[tokio::test]
async fn snapshots_of_a_volume_in_use_are_clean_with_reflink() {
    require_root!();
    require_tools!("mkfs.xfs", "dumpe2fs");
    let fs = TestFs::new("xfs-reflink", "512M");
    snapshots_of_a_volume_in_use(Some(&fs.mount.join("pool")), 50).await;
}

#[tokio::test]
async fn snapshots_of_a_volume_in_use_are_clean_when_copied() {
    require_root!();
    require_tools!("mkfs.xfs", "dumpe2fs");
    // The test folder's filesystem: no reflink here, so each snapshot copies
    // with the filesystem frozen.
    snapshots_of_a_volume_in_use(None, 10).await;
}

/// In a cluster the node may stage and publish only in the kubelet's CSI
/// plugin folder and pod folders, never through a symbolic link.
#[tokio::test]
async fn only_the_kubelet_csi_and_pod_folders_and_no_links() {
    require_root!();
    let env = Env::kubelet_only();
    let (mut agent, mut c) = (env.agent().await, env.csi().await);
    create_volume(&mut agent, "vol-k", 64 * MIB, None).await;
    let staging = env.k("plugins/kubernetes.io/csi/cinderblock.dev/abc/globalmount");
    let target = env.k("pods/uid-1/volumes/kubernetes.io~csi/pv-1/mount");
    std::fs::create_dir_all(env.k("plugins/kubernetes.io/csi")).unwrap();
    std::fs::create_dir_all(env.k("pki")).unwrap();
    let before = folders(&env.kubelet);
    for (what, path) in [
        ("a kubelet folder that is no CSI folder", env.k("pki/vol-k")),
        ("the kubelet folder's staging/", env.k("staging/vol-k")),
        ("outside the kubelet folder", env.root.join("elsewhere/vol-k")),
    ] {
        let e = expect_code(what, c.node_stage_volume(stage_req("vol-k", &path, Some(ext4()))).await, Code::InvalidArgument);
        assert!(e.message().contains("not below an allowed root"), "{what}: {}", e.message());
    }
    assert_eq!(folders(&env.kubelet), before, "a refused call created folders");
    // A link inside the pod folders, to a place inside them: still refused.
    std::fs::create_dir_all(env.k("pods/uid-2")).unwrap();
    std::os::unix::fs::symlink(env.k("pods/uid-1"), env.k("pods/uid-link")).unwrap();
    let linked = env.k("pods/uid-link/volumes/kubernetes.io~csi/pv-1/mount");
    c.node_stage_volume(stage_req("vol-k", &staging, Some(ext4()))).await.unwrap();
    let e = expect_code(
        "a target through a link",
        c.node_publish_volume(publish_req("vol-k", &staging, &linked, ext4(), false)).await,
        Code::InvalidArgument,
    );
    assert!(e.message().contains("symbolic link"), "{}", e.message());
    std::fs::remove_file(env.k("pods/uid-link")).unwrap();
    assert!(!env.k("pods/uid-1").exists(), "a refused call created folders");
    c.node_publish_volume(publish_req("vol-k", &staging, &target, ext4(), false)).await.unwrap();
    write_synced(&target.join("hello"), b"in a pod");
    unpublish_and_unstage(&mut c, "vol-k", &staging, &target).await;
    env.assert_clean("after the kubelet-only test");
}
