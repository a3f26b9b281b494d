//! Three hosts on one machine, each in its own network namespace joined by
//! a bridge (in a fourth namespace, the "switch"): the controller, the node
//! that owns a zone volume, and the node that uses it. Nothing is reachable
//! on loopback across them: the controller reaches the agents, and the
//! consumer reaches the owner's NBD server, only over the veth links.
//!
//! - The controller runs in this process, on a thread moved into its
//!   namespace, with an embedded store; it registers the two nodes from
//!   their agents' pool status (as a registrar would) and serves CSI
//!   Controller on a unix socket.
//! - Each node is a real `cinderblock node` process started in its
//!   namespace (network only: mounts stay in this mount namespace, so the
//!   test sees what the consumer staged).
//!
//! A file-system volume and a raw block volume on the owner are published to
//! the consumer, staged there with the FUSE engine and used; the owner's image
//! holds the data. While fio writes and then verifies on the consumer, the
//! owner's agent is killed and started again: I/O pauses and resumes, fio
//! reports no error and every checksum holds. Nothing is left behind.
//! Needs root (namespaces, FUSE, loop devices, mounts) and fio.
//!
//! A second test checks the access rules of an export that admits a
//! consumer in plain text (a consumer whose kernel NBD engine has no kernel
//! TLS): only from the consumer's address, never from a fourth host, never
//! to another node's certificate, never under a guessed name.

mod common;

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cinderblock::csi;
use cinderblock::csi::controller_client::ControllerClient;
use cinderblock::csi::node_client::NodeClient;
use cinderblock::tls::{authority, Peer};
use common::*;

const MIB: i64 = 1 << 20;
const SUBNET: &str = "10.231.7";

fn ip(args: &[&str]) {
    run("ip", args);
}

/// The namespaces, links and bridge; removed on drop (after the processes in
/// them, which are dropped first).
struct Network {
    prefix: String,
    namespaces: Vec<String>,
}

impl Network {
    fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    fn build(prefix: &str, hosts: &[&str]) -> Network {
        let mut net = Network { prefix: prefix.to_string(), namespaces: vec![] };
        let sw = net.ns("sw");
        ip(&["netns", "add", &sw]);
        net.namespaces.push(sw.clone());
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &sw, "link", "set", "br0", "up"]);
        for (i, host) in hosts.iter().enumerate() {
            let ns = net.ns(host);
            ip(&["netns", "add", &ns]);
            net.namespaces.push(ns.clone());
            let (inside, outside) = (format!("{prefix}h{i}"), format!("{prefix}s{i}"));
            ip(&["link", "add", &inside, "netns", &ns, "type", "veth", "peer", "name", &outside, "netns", &sw]);
            ip(&["-n", &ns, "addr", "add", &format!("{SUBNET}.{}/24", i + 1), "dev", &inside]);
            ip(&["-n", &ns, "link", "set", &inside, "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&["-n", &sw, "link", "set", &outside, "master", "br0"]);
            ip(&["-n", &sw, "link", "set", &outside, "up"]);
        }
        net
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of each veth, and so the pair.
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A `cinderblock node` in a network namespace, killed on drop.
struct NodeProc {
    child: Option<Child>,
    ns: String,
    args: Vec<String>,
    log: PathBuf,
}

impl NodeProc {
    fn start(ns: &str, args: Vec<String>, log: PathBuf) -> NodeProc {
        let mut n = NodeProc { child: None, ns: ns.to_string(), args, log };
        n.spawn();
        n
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        // nsenter execs the node after joining the network namespace only.
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns))
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_cinderblock"))
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting cinderblock node under nsenter");
        self.child = Some(child);
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// What the registrars saw of each node's remote attach (engine, TLS mode),
/// and what they record instead where a test says so.
#[derive(Default)]
struct AttachReports {
    reported: std::sync::Mutex<std::collections::HashMap<String, (String, String)>>,
    /// node -> (engine, TLS mode) to record instead of the agent's report.
    instead: std::sync::Mutex<std::collections::HashMap<String, (String, String)>>,
}

/// The controller, on its own thread inside the controller's namespace:
/// an embedded store, a registrar per node asking the node's agent for its
/// pool status every second, and CSI Controller on a unix socket.
struct ControllerHost {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// How many nodes have had their first status recorded.
    registered: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl ControllerHost {
    fn start(
        ns: &str,
        dir: &Path,
        pki: &Path,
        nodes: Vec<(String, String, String)>,
        attach: std::sync::Arc<AttachReports>,
    ) -> ControllerHost {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ns, dir, pki) = (ns.to_string(), dir.to_path_buf(), pki.to_path_buf());
        let registered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let registered_count = registered.clone();
        let thread = std::thread::spawn(move || {
            let f = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
            // SAFETY: setns on a namespace file we opened; it moves only this thread.
            let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns into {ns}: {}", std::io::Error::last_os_error());
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                use cinderblock::node::registration::Registration;
                use cinderblock::store::Store;
                let store: std::sync::Arc<dyn Store> =
                    std::sync::Arc::new(cinderblock::store::embedded::EmbeddedStore::open(&dir.join("store.redb")).unwrap());
                let ctl_tls = authority::local_peer_dir(&pki, &Peer::Controller);
                for (id, zone, address) in nodes {
                    let (store, ctl_tls, registered, attach) = (store.clone(), ctl_tls.clone(), registered_count.clone(), attach.clone());
                    tokio::spawn(async move {
                        let mut first = true;
                        let mut reg = Registration::new(id.clone(), zone, format!("https://{address}"), 0);
                        let connector = cinderblock::tls::AgentConnector::new(
                            cinderblock::tls::TlsDir::open(&ctl_tls).unwrap(),
                            &Peer::Node(id.clone()),
                            vec![b"h2".to_vec()],
                        )
                        .unwrap();
                        // Lazy: the agent may not listen yet; each call tries again.
                        let channel = tonic::transport::Endpoint::from_shared(format!("https://{address}"))
                            .unwrap()
                            .connect_timeout(Duration::from_secs(2))
                            .connect_with_connector_lazy(connector);
                        let mut agent = cinderblock::agent_proto::volume_manager_client::VolumeManagerClient::new(channel);
                        loop {
                            if let Ok(r) = agent.get_pool_status(cinderblock::agent_proto::GetPoolStatusRequest {}).await {
                                if let Some(mut status) = r.into_inner().status {
                                    let seen = (status.attach_engine.clone(), status.attach_tls.clone());
                                    attach.reported.lock().unwrap().insert(id.clone(), seen);
                                    if let Some((engine, tls)) = attach.instead.lock().unwrap().get(&id).cloned() {
                                        (status.attach_engine, status.attach_tls) = (engine, tls);
                                    }
                                    if reg.report_status(&*store, status).await.is_ok() && first {
                                        first = false;
                                        registered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                    }
                                }
                            }
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    });
                }
                let tls = cinderblock::tls::TlsDir::open(&ctl_tls).unwrap();
                let config = cinderblock::controller::ControllerConfig { heartbeat_timeout: Duration::from_secs(30), ..Default::default() };
                let manager = cinderblock::controller::Manager::new(store, config, tls);
                let socket = dir.join("controller.sock");
                let incoming = cinderblock::server::bind_unix(&socket).unwrap();
                tonic::transport::Server::builder()
                    .add_service(cinderblock::csi::controller_server::ControllerServer::new(
                        cinderblock::controller::ControllerService::new(manager),
                    ))
                    .serve_with_incoming_shutdown(incoming, async {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
            });
        });
        ControllerHost { stop: Some(stop), thread: Some(thread), registered }
    }

    /// Waits until every node has been recorded once, so that calls naming
    /// either node find it.
    async fn wait_for_nodes(&self, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.registered.load(std::sync::atomic::Ordering::SeqCst) < count {
            assert!(
                Instant::now() < deadline,
                "only {} of {count} nodes registered",
                self.registered.load(std::sync::atomic::Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for ControllerHost {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `cinderblock node` arguments for node `id` at `addr`, its files under `d`.
fn node_args(d: &Path, pki: &Path, id: &str, addr: &str) -> Vec<String> {
    let home = d.join(id);
    [
        "node",
        "--pool",
        home.join("pool").to_str().unwrap(),
        "--node-id",
        id,
        "--zone",
        "zone-1",
        "--agent-listen",
        &format!("{addr}:9810"),
        "--endpoint",
        &format!("unix://{}", d.join(format!("{id}.sock")).display()),
        "--allowed-root",
        d.to_str().unwrap(),
        "--tls-dir",
        authority::local_peer_dir(pki, &Peer::Node(id.into())).to_str().unwrap(),
        "--nbd-listen",
        &format!("{addr}:10809"),
        "--attach-state-dir",
        home.join("attach").to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

async fn unix_channel(socket: &Path) -> tonic::transport::Channel {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::os::unix::net::UnixStream::connect(socket).is_err() {
        assert!(Instant::now() < deadline, "{} did not come up", socket.display());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    csi_channel(&format!("unix://{}", socket.display())).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hosts_in_network_namespaces_attach_over_nbd_through_an_owner_restart() {
    require_root!();
    require_tools!("ip", "nsenter", "fio", "mkfs.ext4", "mount", "losetup");
    require_fuse!();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().canonicalize().unwrap();
    let _leftovers = Leftovers(d.clone());
    let prefix = format!("cb{}", std::process::id() % 100_000);
    let net = Network::build(&prefix, &["ctl", "own", "con"]);
    let pki = d.join("tls");
    authority::ensure_local_pki(&pki, &[Peer::Controller, Peer::Node("own".into()), Peer::Node("con".into())]).unwrap();

    let own_addr = format!("{SUBNET}.2");
    let con_addr = format!("{SUBNET}.3");
    let mut owner = NodeProc::start(&net.ns("own"), node_args(&d, &pki, "own", &own_addr), d.join("own.log"));
    let _consumer = NodeProc::start(&net.ns("con"), node_args(&d, &pki, "con", &con_addr), d.join("con.log"));
    let nodes = vec![
        ("own".to_string(), "zone-1".to_string(), format!("{own_addr}:9810")),
        ("con".to_string(), "zone-1".to_string(), format!("{con_addr}:9810")),
    ];
    let controller = ControllerHost::start(&net.ns("ctl"), &d, &pki, nodes, Default::default());

    let mut ctl = ControllerClient::new(unix_channel(&d.join("controller.sock")).await);
    let mut node = NodeClient::new(unix_channel(&d.join("con.sock")).await);
    let create = |name: &str, size: i64, block: bool| zone_volume_on(name, "own", size, block);
    // The registrars need a moment to report both nodes.
    controller.wait_for_nodes(2).await;
    let fs_vol = ctl.create_volume(create("fs-data", 64 * MIB, false)).await.unwrap().into_inner().volume.unwrap();
    let publish = |vol: &str, block: bool| csi::ControllerPublishVolumeRequest {
        volume_id: vol.into(),
        node_id: "con".into(),
        volume_capability: Some(rwo_capability(block)),
        ..Default::default()
    };

    // 1. A file system, written on the consumer, kept on the owner.
    let ctx = ctl.controller_publish_volume(publish(&fs_vol.volume_id, false)).await.unwrap().into_inner().publish_context;
    assert_eq!(ctx.get("cinderblock.dev/nbd-address").map(String::as_str), Some(format!("{own_addr}:10809").as_str()), "{ctx:?}");
    let staging = d.join("kubelet").join("fs-staging");
    let target = d.join("kubelet").join("fs-target");
    stage_and_publish_rwo(&mut node, &fs_vol.volume_id, &staging, &target, false, &ctx).await;
    std::fs::write(target.join("note.txt"), b"written on con, kept on own").unwrap();
    std::fs::File::open(target.join("note.txt")).unwrap().sync_all().unwrap();
    node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
        volume_id: fs_vol.volume_id.clone(),
        target_path: target.display().to_string(),
    })
    .await
    .unwrap();
    node.node_unstage_volume(csi::NodeUnstageVolumeRequest {
        volume_id: fs_vol.volume_id.clone(),
        staging_target_path: staging.display().to_string(),
    })
    .await
    .unwrap();
    ctl.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
        volume_id: fs_vol.volume_id.clone(),
        node_id: "con".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let image = d.join("own").join("pool").join("volumes").join(format!("{}.img", fs_vol.volume_id));
    let m = tempfile::tempdir().unwrap();
    run("mount", &["-o", "loop,ro,noload", image.to_str().unwrap(), m.path().to_str().unwrap()]);
    let text = std::fs::read_to_string(m.path().join("note.txt"));
    run("umount", &[m.path().to_str().unwrap()]);
    assert_eq!(text.unwrap(), "written on con, kept on own");

    // 2. A raw block volume under fio (write, then verify every block) while
    // the owner's agent is killed and started again.
    let blk = ctl.create_volume(create("blk-data", 128 * MIB, true)).await.unwrap().into_inner().volume.unwrap();
    let ctx = ctl.controller_publish_volume(publish(&blk.volume_id, true)).await.unwrap().into_inner().publish_context;
    let staging = d.join("kubelet").join("blk-staging");
    let target = d.join("kubelet").join("blk-target");
    stage_and_publish_rwo(&mut node, &blk.volume_id, &staging, &target, true, &ctx).await;
    let fio_out = d.join("fio.json");
    let mut fio = Command::new("fio")
        .args([
            "--name=through-a-restart",
            "--ioengine=psync",
            "--direct=1",
            "--rw=randwrite",
            "--bs=4k",
            "--size=48M",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--randrepeat=1",
            "--output-format=json",
        ])
        .arg(format!("--filename={}", target.display()))
        .arg(format!("--output={}", fio_out.display()))
        // fio writes its verify state file into its working folder: the test's.
        .current_dir(&d)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting fio");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(fio.try_wait().unwrap().is_none(), "fio ended before the owner was killed; make its job longer");
    owner.kill9();
    let down_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    owner.spawn();
    let fio_deadline = Instant::now() + Duration::from_secs(600);
    let status = loop {
        if let Some(s) = fio.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < fio_deadline, "fio did not finish within 10 minutes of the owner's restart");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut err = String::new();
    std::io::Read::read_to_string(fio.stderr.as_mut().unwrap(), &mut err).unwrap();
    let report = std::fs::read_to_string(&fio_out).unwrap_or_default();
    if !status.success() {
        // What the consumer's NBD client and the owner said, to tell a slow
        // restart from an error answer.
        let tail = |name: &str| {
            let text = std::fs::read_to_string(d.join(name)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("NBD")).collect();
            lines[lines.len().saturating_sub(30)..].join("\n")
        };
        panic!(
            "fio failed across the owner's restart ({status}): {err}\n--- consumer's log (warnings, NBD) ---\n{}\n--- owner's log ---\n{}\n{report}",
            tail("con.log"),
            tail("own.log")
        );
    }
    let job: serde_json::Value = serde_json::from_str(&report[report.find('{').unwrap_or(0)..]).expect("fio's JSON report");
    assert_eq!(job["jobs"][0]["error"], 0, "fio saw an I/O error: {report}");
    eprintln!("fio finished {:?} after the owner went down", down_at.elapsed());
    // The consumer's attachment lost its connection and got it back (it did
    // not just run between the kill and the restart).
    let con_log = std::fs::read_to_string(d.join("con.log")).unwrap();
    let restored = con_log
        .lines()
        .find(|l| l.contains("NBD connection restored"))
        .unwrap_or_else(|| panic!("the consumer never reconnected:\n{con_log}"));
    eprintln!("consumer: {restored}");

    node.node_unpublish_volume(csi::NodeUnpublishVolumeRequest {
        volume_id: blk.volume_id.clone(),
        target_path: target.display().to_string(),
    })
    .await
    .unwrap();
    node.node_unstage_volume(csi::NodeUnstageVolumeRequest {
        volume_id: blk.volume_id.clone(),
        staging_target_path: staging.display().to_string(),
    })
    .await
    .unwrap();
    ctl.controller_unpublish_volume(csi::ControllerUnpublishVolumeRequest {
        volume_id: blk.volume_id.clone(),
        node_id: "con".into(),
        ..Default::default()
    })
    .await
    .unwrap();

    // Nothing left: no FUSE mount or loop device of an attachment, no export.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let attach = d.join("con").join("attach");
    assert!(mounted_under(&attach).is_empty(), "mounts left: {:?}", mounted_under(&attach));
    assert!(loops_on(&attach).is_empty(), "loop devices left: {:?}", loops_on(&attach));
    let exports: Vec<_> = std::fs::read_dir(d.join("own").join("pool").join("exports")).map(|r| r.flatten().collect()).unwrap_or_default();
    assert!(exports.is_empty(), "export records left on the owner: {:?}", exports.iter().map(|e| e.file_name()).collect::<Vec<_>>());
    let _ = &net;
}

/// Runs `f` on a thread inside network namespace `ns` (with its own
/// runtime), so the connections it opens come from that host's address.
fn in_netns<T: Send, Fut: std::future::Future<Output = T>>(ns: &str, f: impl FnOnce() -> Fut + Send) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let file = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
                // SAFETY: setns on a namespace file we opened; it moves only this thread.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns into {ns}: {}", std::io::Error::last_os_error());
                tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f())
            })
            .join()
            .unwrap()
    })
}

/// What the owner's NBD server answers a handshake for `export` from host
/// `ns`, in plain text or with `node`'s certificate: the export's size, or
/// the refusal.
fn open_export(ns: &str, pki: &Path, address: &str, export: &str, tls_as: Option<&str>) -> Result<u64, String> {
    use cinderblock::attach::nbd::{tls_to_node, Client, NbdError, Target};
    let tls = tls_as.map(|node| {
        let dir = cinderblock::tls::TlsDir::open(&authority::local_peer_dir(pki, &Peer::Node(node.into()))).unwrap();
        tls_to_node(dir, "own").unwrap()
    });
    let target = Target { address: address.to_string(), export: export.to_string(), tls };
    in_netns(ns, || async move {
        match Client::connect(&target, Duration::from_secs(10)).await {
            Ok(client) => {
                // Served for real: a read goes through.
                let data = client.read(0, 4096).await.map_err(|e| e.to_string())?;
                assert_eq!(data.len(), 4096);
                let size = client.info().size;
                client.disconnect().await.map_err(|e| e.to_string())?;
                Ok(size)
            }
            Err(NbdError::Refused { reply, .. }) => Err(format!("refused {reply:#x}")),
            Err(e) => Err(e.to_string()),
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_text_export_admits_only_the_consumers_address() {
    use cinderblock::export::proto::{REP_ERR_POLICY, REP_ERR_TLS_REQD, REP_ERR_UNKNOWN};
    require_root!();
    require_tools!("ip", "nsenter");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().canonicalize().unwrap();
    let _leftovers = Leftovers(d.clone());
    let prefix = format!("cp{}", std::process::id() % 100_000);
    let net = Network::build(&prefix, &["ctl", "own", "con", "oth"]);
    let pki = d.join("tls");
    let peers = [Peer::Controller, Peer::Node("own".into()), Peer::Node("con".into()), Peer::Node("oth".into())];
    authority::ensure_local_pki(&pki, &peers).unwrap();
    let (own_addr, con_addr) = (format!("{SUBNET}.2"), format!("{SUBNET}.3"));
    let _owner = NodeProc::start(&net.ns("own"), node_args(&d, &pki, "own", &own_addr), d.join("own.log"));
    let _consumer = NodeProc::start(&net.ns("con"), node_args(&d, &pki, "con", &con_addr), d.join("con.log"));
    let nodes = vec![
        ("own".to_string(), "zone-1".to_string(), format!("{own_addr}:9810")),
        ("con".to_string(), "zone-1".to_string(), format!("{con_addr}:9810")),
    ];
    // This machine's kernel has no nbd module, so no node here can attach
    // with the kernel engine: the registrar records the consumer as one
    // without kernel TLS (what such a node's agent reports) in place of its
    // real report. Everything after the record is real.
    let attach = std::sync::Arc::new(AttachReports::default());
    attach.instead.lock().unwrap().insert("con".into(), ("kernel-nbd".into(), "plain".into()));
    let controller = ControllerHost::start(&net.ns("ctl"), &d, &pki, nodes, attach.clone());
    let mut ctl = ControllerClient::new(unix_channel(&d.join("controller.sock")).await);
    controller.wait_for_nodes(2).await;
    // The agents report what they have: FUSE with TLS in userspace here.
    let reported = attach.reported.lock().unwrap().clone();
    assert_eq!(reported.get("own"), Some(&("fuse-nbd".to_string(), "userspace-tls".to_string())), "{reported:?}");

    let publish = |vol: &str| csi::ControllerPublishVolumeRequest {
        volume_id: vol.into(),
        node_id: "con".into(),
        volume_capability: Some(rwo_capability(true)),
        ..Default::default()
    };
    let unpublish =
        |vol: &str| csi::ControllerUnpublishVolumeRequest { volume_id: vol.into(), node_id: "con".into(), ..Default::default() };
    let vol = ctl.create_volume(zone_volume_on("plain-data", "own", 16 * MIB, true)).await.unwrap().into_inner().volume.unwrap();
    let ctx = ctl.controller_publish_volume(publish(&vol.volume_id)).await.unwrap().into_inner().publish_context;
    assert_eq!(ctx.get("cinderblock.dev/nbd-tls").map(String::as_str), Some("plain-allowed"), "{ctx:?}");
    let address = ctx["cinderblock.dev/nbd-address"].clone();
    let export = ctx["cinderblock.dev/nbd-export"].clone();
    let guessed = format!("{:032x}", u128::from_str_radix(&export, 16).unwrap() ^ 1);
    let refused = |code: u32| Err(format!("refused {code:#x}"));

    // The consumer's address, in plain text: served; with its certificate too.
    assert_eq!(open_export(&net.ns("con"), &pki, &address, &export, None), Ok(16u64 << 20));
    assert_eq!(open_export(&net.ns("con"), &pki, &address, &export, Some("con")), Ok(16u64 << 20));
    // A guessed name from the consumer's address: in plain text the server
    // does not even say whether it exists (TLS required); over TLS with the
    // consumer's certificate, no such export.
    assert_eq!(open_export(&net.ns("con"), &pki, &address, &guessed, None), refused(REP_ERR_TLS_REQD));
    assert_eq!(open_export(&net.ns("con"), &pki, &address, &guessed, Some("con")), refused(REP_ERR_UNKNOWN));
    // Another host in plain text: TLS required; with its own node's
    // certificate: not the node this export is for.
    assert_eq!(open_export(&net.ns("oth"), &pki, &address, &export, None), refused(REP_ERR_TLS_REQD));
    assert_eq!(open_export(&net.ns("oth"), &pki, &address, &export, Some("oth")), refused(REP_ERR_POLICY));
    // The controller's host, which reaches the owner too, is no consumer either.
    assert_eq!(open_export(&net.ns("ctl"), &pki, &address, &export, None), refused(REP_ERR_TLS_REQD));

    // Unpublished (once the owner has seen our connections close), the
    // export is gone; published again to a consumer that now reports kernel
    // TLS, it admits no plain text at all.
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = ctl.controller_unpublish_volume(unpublish(&vol.volume_id)).await {
        assert!(Instant::now() < deadline, "unpublish: {e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(open_export(&net.ns("con"), &pki, &address, &export, None), refused(REP_ERR_TLS_REQD));
    attach.instead.lock().unwrap().insert("con".into(), ("kernel-nbd".into(), "kernel-tls".into()));
    tokio::time::sleep(Duration::from_secs(2)).await; // a registrar round
    let ctx = ctl.controller_publish_volume(publish(&vol.volume_id)).await.unwrap().into_inner().publish_context;
    assert_eq!(ctx.get("cinderblock.dev/nbd-tls"), None, "{ctx:?}");
    let export = ctx["cinderblock.dev/nbd-export"].clone();
    assert_eq!(open_export(&net.ns("con"), &pki, &address, &export, None), refused(REP_ERR_TLS_REQD));
    assert_eq!(open_export(&net.ns("con"), &pki, &address, &export, Some("con")), Ok(16u64 << 20));
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = ctl.controller_unpublish_volume(unpublish(&vol.volume_id)).await {
        assert!(Instant::now() < deadline, "unpublish: {e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let exports: Vec<_> = std::fs::read_dir(d.join("own").join("pool").join("exports")).map(|r| r.flatten().collect()).unwrap_or_default();
    assert!(exports.is_empty(), "export records left on the owner: {:?}", exports.iter().map(|e| e.file_name()).collect::<Vec<_>>());
    drop(controller);
    let _ = &net;
}
