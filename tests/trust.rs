//! Trust and data safety, over real gRPC with real mutual TLS on loopback,
//! real pools in temporary folders and the real embedded store:
//! - the agent API answers only the controller's certificate from the
//!   cluster CA, and the controller talks only to the node it meant;
//! - certificates replaced on disk are used without a restart;
//! - the reconciler never destroys data: an emptied store, a renamed node
//!   or an agent address pointing at another node's agent loses nothing;
//! - the fence refuses a deposed leader's calls, also after a restart.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cinderblock::agent::fence::Fence;
use cinderblock::agent::AgentService;
use cinderblock::agent_proto as pb;
use cinderblock::agent_proto::volume_manager_server::VolumeManagerServer;
use cinderblock::controller::manager::{CreateVolumeSpec, EventSink};
use cinderblock::controller::records::{NodeRec, VolumeRec};
use cinderblock::controller::{ControllerConfig, Manager};
use cinderblock::node::registration::Registration;
use cinderblock::scheduler::Placement;
use cinderblock::store::{self, EmbeddedStore, Kind, Store};
use cinderblock::tls::{authority, Authority, Peer, PeerRule, ServerTls, TlsDir};
use cinderblock::volume::{Pool, PoolConfig, Provisioning};
use common::*;
use tonic::Code;

const MIB: u64 = 1 << 20;

/// A node inside the test process: a real pool and a real agent server
/// with mutual TLS on a loopback port.
struct InNode {
    id: String,
    pool_dir: PathBuf,
    pool: Arc<Pool>,
    addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl InNode {
    async fn start(pki: &Path, id: &str, pool_dir: &Path) -> InNode {
        let (pool, _) = Pool::open(pool_dir, PoolConfig::default()).expect("pool opens");
        let pool = Arc::new(pool);
        let fence = Arc::new(Fence::open(pool.root()).unwrap());
        let tls = TlsDir::open(&authority::local_peer_dir(pki, &Peer::Node(id.to_string()))).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let incoming = cinderblock::tls::serve_incoming(listener, ServerTls::new(tls, PeerRule::Controller, vec![b"h2".to_vec()]));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let svc = VolumeManagerServer::new(AgentService::new(pool.clone(), id.to_string(), fence));
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = rx.await;
                })
                .await;
        });
        InNode { id: id.to_string(), pool_dir: pool_dir.to_path_buf(), pool, addr, stop: Some(tx), task: Some(task) }
    }

    fn address(&self) -> String {
        format!("https://{}", self.addr)
    }

    async fn register(&self, store: &dyn Store) {
        let mut reg = Registration::new(self.id.clone(), "zone-1".into(), self.address(), 0);
        reg.report(store, &self.pool).await.expect("registration");
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

#[derive(Default)]
struct RecordedEvents(Mutex<Vec<(String, String, String)>>);

#[tonic::async_trait]
impl EventSink for RecordedEvents {
    async fn volume_event(&self, v: &VolumeRec, _warning: bool, reason: &str, note: String) {
        self.0.lock().unwrap().push((v.id.clone(), reason.into(), note));
    }
    async fn node_event(&self, node: &str, _warning: bool, reason: &str, note: String) {
        self.0.lock().unwrap().push((node.into(), reason.into(), note));
    }
}

struct Cluster {
    dir: tempfile::TempDir,
    pki: PathBuf,
    store: Arc<dyn Store>,
    manager: Manager,
    events: Arc<RecordedEvents>,
    nodes: Vec<InNode>,
}

impl Cluster {
    async fn start(names: &[&str], grace: Duration) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let pki = dir.path().join("tls");
        let mut peers = vec![Peer::Controller];
        peers.extend(names.iter().map(|n| Peer::Node(n.to_string())).chain([Peer::Node("node-renamed".into())]));
        authority::ensure_local_pki(&pki, &peers).unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.path().join("store.redb")).unwrap());
        let config = ControllerConfig { stuck_grace: grace, agent_timeout: Duration::from_secs(5), ..Default::default() };
        let events = Arc::new(RecordedEvents::default());
        let tls = TlsDir::open(&authority::local_peer_dir(&pki, &Peer::Controller)).unwrap();
        let manager = Manager::new(store.clone(), config, tls).with_events(events.clone());
        let mut nodes = vec![];
        for n in names {
            let node = InNode::start(&pki, n, &dir.path().join(n).join("pool")).await;
            node.register(&*store).await;
            nodes.push(node);
        }
        Cluster { dir, pki, store, manager, events, nodes }
    }

    async fn create(&self, name: &str, pinned_zone_node: Option<&str>) -> Result<VolumeRec, tonic::Status> {
        let mut requisite = vec![];
        if let Some(n) = pinned_zone_node {
            requisite.push(BTreeMap::from([(cinderblock::TOPOLOGY_NODE_KEY.to_string(), n.to_string())]));
        }
        self.manager
            .create_volume(CreateVolumeSpec {
                name: name.into(),
                size_bytes: 4 * MIB,
                provisioning: Provisioning::Thin,
                placement: Placement::Spread,
                source: None,
                requisite: requisite.into(),
                preferred: Default::default(),
                parameters: BTreeMap::new(),
                metadata: BTreeMap::new(),
                fingerprint: format!("{name}/4MiB"),
                accessibility: Default::default(),
            })
            .await
            // As a CSI caller would see it.
            .map_err(tonic::Status::from)
    }

    /// Every file of every pool with its size and checksum.
    fn pools(&self) -> BTreeMap<String, (u64, u64)> {
        let mut all = BTreeMap::new();
        for n in &self.nodes {
            for (k, v) in tree(&n.pool_dir) {
                all.insert(format!("{}/{k}", n.id), v);
            }
        }
        all
    }

    /// The volume and snapshot images (with content), wherever in the pool they are.
    fn image_contents(&self) -> BTreeMap<String, (u64, u64)> {
        self.pools()
            .into_iter()
            .filter(|(k, _)| k.ends_with(".img"))
            .map(|(k, v)| {
                let id = k.rsplit('/').next().unwrap().trim_end_matches(".img").to_string();
                // orphaned/<ms>-<id>.img is the same image as volumes/<id>.img
                let id = match id.split_once('-') {
                    Some((ms, rest)) if ms.parse::<u64>().is_ok() => rest.to_string(),
                    _ => id,
                };
                (id, v)
            })
            .collect()
    }

    fn event_reasons(&self) -> Vec<String> {
        self.events.0.lock().unwrap().iter().map(|(_, r, _)| r.clone()).collect()
    }
}

// ------------------------------------------------------------- who may call

/// A channel over TLS with whatever client identity (or none) a test wants.
async fn raw_channel(
    addr: std::net::SocketAddr,
    ca_pem: &str,
    client: Option<(&str, &str)>,
    server_name: &str,
) -> Result<tonic::transport::Channel, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder =
        rustls::ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions().unwrap().with_root_certificates(roots);
    let mut cfg = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert.as_bytes()).map(|c| c.unwrap()).collect();
            builder.with_client_auth_cert(chain, PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap()).unwrap()
        }
    };
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let cfg = Arc::new(cfg);
    let name = ServerName::try_from(server_name.to_string()).unwrap();
    let connector = tower::service_fn(move |_uri: http::Uri| {
        let (cfg, name) = (cfg.clone(), name.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let tls = tokio_rustls::TlsConnector::from(cfg).connect(name, tcp).await?;
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .timeout(Duration::from_secs(5))
        .connect_with_connector(connector)
        .await
        .map_err(|e| e.to_string())
}

fn create_req(id: &str) -> tonic::Request<pb::CreateVolumeRequest> {
    let mut r = tonic::Request::new(pb::CreateVolumeRequest {
        volume_id: id.into(),
        size_bytes: MIB,
        provisioning: 0,
        source: None,
        metadata: Default::default(),
        remote: None,
    });
    cinderblock::agent::fence::attach(&mut r, 0);
    r
}

#[tokio::test]
async fn the_agent_answers_only_the_controllers_certificate() {
    let c = Cluster::start(&["node-1"], Duration::from_secs(60)).await;
    let node = &c.nodes[0];
    let ca = std::fs::read_to_string(c.pki.join("ca.crt")).unwrap();
    let read = |who: &str, f: &str| std::fs::read_to_string(c.pki.join(who).join(f)).unwrap();
    let other_ca = Authority::generate("somebody else's CA").unwrap();
    let (foreign_cert, foreign_key) = other_ca.issue(&Peer::Controller, authority::LEAF_VALIDITY).unwrap();
    let server_name = cinderblock::tls::node_dns_name("node-1").unwrap();
    let before = c.pools();

    // Plain text: no TLS at all.
    let plain = tonic::transport::Endpoint::from_shared(format!("http://{}", node.addr)).unwrap().timeout(Duration::from_secs(5));
    if let Ok(ch) = plain.connect().await {
        let mut cl = pb::volume_manager_client::VolumeManagerClient::new(ch);
        assert!(cl.create_volume(create_req("vol-plain")).await.is_err(), "a plain-text call was answered");
    }
    // TLS, but no client certificate / one from another CA / the node's own certificate.
    let node_cert = read("node-1", "tls.crt");
    let node_key = read("node-1", "tls.key");
    let cases: Vec<(&str, Option<(&str, &str)>)> = vec![
        ("no client certificate", None),
        ("a certificate from another CA naming the controller", Some((&foreign_cert, &foreign_key))),
        ("a node's certificate instead of the controller's", Some((&node_cert, &node_key))),
    ];
    for (what, client) in cases {
        let refused = match raw_channel(node.addr, &ca, client, &server_name).await {
            Err(_) => true,
            Ok(ch) => {
                let mut cl = pb::volume_manager_client::VolumeManagerClient::new(ch);
                let r = cl.create_volume(create_req("vol-intruder")).await;
                let listed = cl.list_volumes(pb::ListVolumesRequest::default()).await;
                r.is_err() && listed.is_err()
            }
        };
        assert!(refused, "{what}: the agent answered");
    }
    assert_eq!(c.pools(), before, "a refused caller changed the pool");

    // The controller's certificate works, and the answer says who answered.
    let ctl = (read("controller", "tls.crt"), read("controller", "tls.key"));
    let ch = raw_channel(node.addr, &ca, Some((&ctl.0, &ctl.1)), &server_name).await.expect("the controller connects");
    let mut cl = pb::volume_manager_client::VolumeManagerClient::new(ch);
    let made = cl.create_volume(create_req("vol-allowed")).await.expect("the controller's call is answered").into_inner();
    let who = made.identity.unwrap();
    assert_eq!(who.node_id, "node-1");
    assert_eq!(who.pool_uuid, node.pool.uuid());
    // A call that changes data without a fencing token is refused.
    let mut bare = tonic::Request::new(pb::DeleteVolumeRequest { volume_id: "vol-allowed".into() });
    bare.metadata_mut().remove(cinderblock::agent::fence::FENCING_METADATA);
    assert_eq!(cl.delete_volume(bare).await.unwrap_err().code(), Code::InvalidArgument);
}

#[tokio::test]
async fn the_controller_talks_only_to_the_node_it_meant() {
    let c = Cluster::start(&["node-1", "node-2"], Duration::from_millis(200)).await;
    // Straight: a connector for node-2 pointed at node-1's agent fails the handshake.
    let tls = TlsDir::open(&authority::local_peer_dir(&c.pki, &Peer::Controller)).unwrap();
    let wrong = cinderblock::tls::AgentConnector::new(tls, &Peer::Node("node-2".into()), vec![b"h2".to_vec()]).unwrap();
    let err = wrong.connect(&c.nodes[0].addr.to_string()).await.expect_err("node-1 accepted as node-2");
    assert!(err.to_string().contains("certificate"), "{err}");

    // Through the controller: node-2's record now points at node-1's agent.
    for i in 0..3 {
        c.create(&format!("on-node-1-{i}"), Some("node-1")).await.unwrap();
    }
    let (mut rec, v): (NodeRec, u64) = store::get_json(&*c.store, Kind::Node, "node-2").await.unwrap().unwrap();
    rec.agent_address = c.nodes[0].address();
    store::update_json(&*c.store, Kind::Node, "node-2", &rec, v).await.unwrap();
    let before = c.pools();
    let err = c.create("meant-for-node-2", Some("node-2")).await.expect_err("created through an impostor");
    assert!(matches!(err.code(), Code::Unavailable | Code::ResourceExhausted | Code::Internal), "{err:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..3 {
        c.manager.reconcile_once().await.unwrap();
    }
    assert_eq!(c.pools(), before, "something was written on node-1 through node-2's record");
}

#[tokio::test]
async fn certificates_replaced_on_disk_are_used_without_a_restart() {
    let c = Cluster::start(&["node-1"], Duration::from_secs(60)).await;
    let node_dir = authority::local_peer_dir(&c.pki, &Peer::Node("node-1".into()));
    let ctl_dir = authority::local_peer_dir(&c.pki, &Peer::Controller);
    let old = agent_client(&c.nodes[0].address(), "node-1", &ctl_dir, 0).await;
    let mut old2 = old.clone();
    old2.list_volumes(pb::ListVolumesRequest::default()).await.expect("works before the rotation");

    // A new CA: the node's and a new controller's certificates, written over the old files.
    let new_ca = Authority::generate("rotated CA").unwrap();
    let rotated_ctl = c.dir.path().join("rotated-controller");
    new_ca.issue_into(&Peer::Controller, authority::LEAF_VALIDITY, &rotated_ctl).unwrap();
    new_ca.issue_into(&Peer::Node("node-1".into()), authority::LEAF_VALIDITY, &node_dir).unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await; // the agent looks at its files at most every second

    // New connections: the old controller certificate is refused, the new one accepted.
    let stale = TlsDir::open(&ctl_dir).unwrap();
    let stale = cinderblock::tls::AgentConnector::new(stale, &Peer::Node("node-1".into()), vec![b"h2".to_vec()]).unwrap();
    let refused = match stale.connect(&c.nodes[0].addr.to_string()).await {
        Err(_) => true,
        Ok(mut s) => {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
            let mut buf = [0u8; 16];
            !matches!(s.read(&mut buf).await, Ok(n) if n > 0)
        }
    };
    assert!(refused, "the rotated agent still accepts the old CA");
    let mut fresh = agent_client(&c.nodes[0].address(), "node-1", &rotated_ctl, 0).await;
    fresh.list_volumes(pb::ListVolumesRequest::default()).await.expect("the rotated certificates work without a restart");
}

// ------------------------------------------------------------- nothing lost

fn snapshot_req(id: &str, source: &str) -> pb::CreateSnapshotRequest {
    pb::CreateSnapshotRequest {
        snapshot_id: id.into(),
        source_volume_id: source.into(),
        metadata: Default::default(),
        ..Default::default()
    }
}

#[tokio::test]
async fn an_emptied_store_loses_nothing_and_holds_the_breaker() {
    let c = Cluster::start(&["node-1", "node-2"], Duration::from_millis(200)).await;
    let mut ids = vec![];
    for i in 0..12 {
        ids.push(c.create(&format!("pvc-{i}"), None).await.unwrap().id);
        for n in &c.nodes {
            n.register(&*c.store).await; // fresh figures, so the volumes spread
        }
    }
    for (i, id) in ids.iter().take(3).enumerate() {
        c.manager.create_snapshot(&format!("snap-{i}"), id, BTreeMap::new()).await.unwrap();
    }
    // Data in every image, so "byte for byte" means something.
    for n in &c.nodes {
        for e in std::fs::read_dir(n.pool_dir.join("volumes")).unwrap().flatten() {
            if e.path().extension().is_some_and(|x| x == "img") {
                write_pattern(&e.path(), 12345, 70_000, e.file_name().len() as u8);
            }
        }
    }
    let images_before = c.image_contents();
    assert_eq!(images_before.len(), 15);

    // Someone empties the store: every volume and snapshot record is gone.
    for kind in [Kind::Volume, Kind::Snapshot] {
        for (id, _) in c.store.list(kind).await.unwrap() {
            c.store.delete(kind, &id, None).await.unwrap();
        }
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut held = vec![];
    for _ in 0..4 {
        held.extend(c.manager.reconcile_once().await.unwrap().breaker_held);
    }
    assert_eq!(c.image_contents(), images_before, "an image changed or vanished");
    for n in &c.nodes {
        assert!(std::fs::read_dir(n.pool_dir.join("orphaned")).unwrap().next().is_none(), "{} quarantined images", n.id);
    }
    let nodes_held: BTreeSet<&str> = held.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(nodes_held, BTreeSet::from(["node-1", "node-2"]), "the breaker did not hold both nodes: {held:?}");
    assert!(c.event_reasons().iter().filter(|r| *r == "QuarantineHeld").count() >= 2, "{:?}", c.event_reasons());
    let metrics = cinderblock::metrics::METRICS.encode();
    for n in ["node-1", "node-2"] {
        let line = metrics
            .lines()
            .find(|l| l.starts_with("cinderblock_reconciler_breaker_held_total") && l.contains(&format!("node=\"{n}\"")))
            .unwrap_or_else(|| panic!("no breaker metric for {n}"));
        assert!(line.split_whitespace().last().unwrap().parse::<f64>().unwrap() >= 4.0, "{line}");
    }
}

/// A store emptied one object at a time (as `kubectl delete --all` does,
/// seen through a watch as a stream of deletions) never looks like a
/// trickle of single strays: every image that lost its record within the
/// grace period counts against the breaker together.
#[tokio::test]
async fn records_deleted_one_by_one_between_passes_still_hold_the_breaker() {
    let grace = Duration::from_secs(2);
    let c = Cluster::start(&["node-1"], grace).await;
    let mut ids = vec![];
    for i in 0..12 {
        ids.push(c.create(&format!("pvc-{i}"), None).await.unwrap().id);
    }
    tokio::time::sleep(grace + Duration::from_millis(200)).await;
    let before = images_of(&c.nodes[0].pool_dir);
    for id in &ids {
        c.store.delete(Kind::Volume, id, None).await.unwrap();
        let r = c.manager.reconcile_once().await.unwrap();
        assert!(r.quarantined.is_empty(), "quarantined while the records were going: {r:?}");
    }
    tokio::time::sleep(grace + Duration::from_millis(200)).await;
    let r = c.manager.reconcile_once().await.unwrap();
    assert!(r.quarantined.is_empty(), "{r:?}");
    assert_eq!(r.breaker_held, vec![("node-1".to_string(), 12)]);
    assert_eq!(images_of(&c.nodes[0].pool_dir), before, "an image moved or changed");
}

fn images_of(pool: &std::path::Path) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = std::fs::read_dir(pool.join("volumes"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "img"))
        .map(|p| (p.file_name().unwrap().to_string_lossy().to_string(), checksum(&p)))
        .collect();
    out.sort();
    out
}

#[tokio::test]
async fn a_single_stray_image_is_quarantined_whole_and_purged_only_on_request() {
    let c = Cluster::start(&["node-1"], Duration::from_millis(200)).await;
    for i in 0..12 {
        c.create(&format!("pvc-{i}"), None).await.unwrap();
    }
    // One image whose record is gone (a crash between cleanup steps).
    let victim = c.create("pvc-stray", None).await.unwrap().id;
    let image = c.nodes[0].pool_dir.join("volumes").join(format!("{victim}.img"));
    write_pattern(&image, 4096, 10_000, 7);
    let content = checksum(&image);
    c.store.delete(Kind::Volume, &victim, None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Old enough, but only just seen without a record: it waits a grace period.
    let first = c.manager.reconcile_once().await.unwrap();
    assert!(first.quarantined.is_empty(), "moved on the pass that first saw it: {first:?}");
    assert!(checksum(&image) == content);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let report = c.manager.reconcile_once().await.unwrap();
    assert_eq!(report.quarantined, vec![format!("node-1/{victim}")]);
    assert!(report.breaker_held.is_empty());
    let mut agent = agent_client(&c.nodes[0].address(), "node-1", &authority::local_peer_dir(&c.pki, &Peer::Controller), 0).await;
    let orphans = agent.list_orphans(pb::ListOrphansRequest {}).await.unwrap().into_inner().orphans;
    assert_eq!(orphans.len(), 1);
    assert_eq!(orphans[0].id, victim);
    assert!(orphans[0].reason.contains("no record"), "{}", orphans[0].reason);
    let kept = c.nodes[0].pool_dir.join("orphaned").join(format!("{}.img", orphans[0].name));
    assert_eq!(checksum(&kept), content, "the quarantined image changed");
    // More reconcile passes never delete it.
    for _ in 0..3 {
        c.manager.reconcile_once().await.unwrap();
    }
    assert!(kept.exists());
    // A purge of orphans older than an hour keeps it; a dry run says what would go; a purge takes it.
    let young = agent.purge_orphans(pb::PurgeOrphansRequest { older_than_ms: 3_600_000, dry_run: false }).await.unwrap().into_inner();
    assert!(young.purged.is_empty() && kept.exists());
    let dry = agent.purge_orphans(pb::PurgeOrphansRequest { older_than_ms: 0, dry_run: true }).await.unwrap().into_inner();
    assert_eq!(dry.purged.len(), 1);
    assert!(kept.exists(), "a dry run deleted");
    let done = agent.purge_orphans(pb::PurgeOrphansRequest { older_than_ms: 0, dry_run: false }).await.unwrap().into_inner();
    assert_eq!(done.purged.len(), 1);
    assert!(std::fs::read_dir(c.nodes[0].pool_dir.join("orphaned")).unwrap().next().is_none());
}

#[tokio::test]
async fn a_renamed_node_is_held_as_mismatched_and_loses_nothing() {
    let mut c = Cluster::start(&["node-1", "node-2"], Duration::from_millis(200)).await;
    for i in 0..6 {
        c.create(&format!("pvc-{i}"), Some("node-1")).await.unwrap();
    }
    let before = c.image_contents();
    // node-1's pool comes back under another name.
    let old = c.nodes.remove(0);
    let pool_dir = old.pool_dir.clone();
    let uuid = old.pool.uuid().to_string();
    old.stop().await;
    let renamed = InNode::start(&c.pki, "node-renamed", &pool_dir).await;
    renamed.register(&*c.store).await;
    c.nodes.push(renamed);
    let (rec, _): (NodeRec, u64) = store::get_json(&*c.store, Kind::Node, "node-renamed").await.unwrap().unwrap();
    let why = rec.mismatch.expect("the renamed node is marked mismatched");
    assert!(why.contains(&uuid) && why.contains("node-1"), "{why}");
    tokio::time::sleep(Duration::from_millis(400)).await;
    for _ in 0..3 {
        c.manager.reconcile_once().await.unwrap();
    }
    assert_eq!(c.image_contents(), before, "an image changed or vanished");
    // Nothing is scheduled there either.
    let v = c.create("after-rename", None).await.unwrap();
    assert_eq!(v.node.as_deref(), Some("node-2"));
}

#[tokio::test]
async fn a_new_pool_under_an_old_name_is_held_as_mismatched() {
    let mut c = Cluster::start(&["node-1", "node-2"], Duration::from_millis(200)).await;
    c.create("pvc-a", Some("node-1")).await.unwrap();
    let old = c.nodes.remove(0);
    let fresh_dir = c.dir.path().join("node-1-rebuilt");
    old.stop().await;
    let rebuilt = InNode::start(&c.pki, "node-1", &fresh_dir).await;
    rebuilt.register(&*c.store).await;
    let (rec, _): (NodeRec, u64) = store::get_json(&*c.store, Kind::Node, "node-1").await.unwrap().unwrap();
    assert!(rec.mismatch.as_deref().is_some_and(|m| m.contains("registered with pool")), "{:?}", rec.mismatch);
    assert_ne!(rec.pool_uuid, rebuilt.pool.uuid(), "the record kept the first pool's identity");
    // The controller writes nothing there.
    let err = c.create("pvc-b", Some("node-1")).await.expect_err("scheduled on a mismatched node");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    c.nodes.push(rebuilt);
}

#[tokio::test]
async fn the_fence_refuses_a_deposed_leader_also_after_a_restart() {
    let c = Cluster::start(&["node-1"], Duration::from_secs(60)).await;
    let ctl = authority::local_peer_dir(&c.pki, &Peer::Controller);
    let addr = c.nodes[0].address();
    let mut new_leader = agent_client(&addr, "node-1", &ctl, 7).await;
    let mut old_leader = agent_client(&addr, "node-1", &ctl, 6).await;
    old_leader
        .create_volume(pb::CreateVolumeRequest { volume_id: "vol-early".into(), size_bytes: MIB, ..Default::default() })
        .await
        .unwrap();
    let fenced = new_leader.fence(pb::FenceRequest {}).await.unwrap().into_inner();
    assert_eq!(fenced.identity.unwrap().fencing_token, 7);
    let before = c.pools();
    for (what, r) in [
        ("delete", old_leader.delete_volume(pb::DeleteVolumeRequest { volume_id: "vol-early".into() }).await.map(|_| ())),
        (
            "create",
            old_leader
                .create_volume(pb::CreateVolumeRequest { volume_id: "vol-late".into(), size_bytes: MIB, ..Default::default() })
                .await
                .map(|_| ()),
        ),
        ("snapshot", old_leader.create_snapshot(snapshot_req("snap-late", "vol-early")).await.map(|_| ())),
    ] {
        let e = r.expect_err(what);
        assert_eq!(e.code(), Code::FailedPrecondition, "{what}: {e:?}");
        assert!(e.message().contains("fenced"), "{what}: {}", e.message());
    }
    assert_eq!(c.pools(), before);
    // Reads still work for anyone holding the controller's certificate.
    old_leader.get_volume(pb::GetVolumeRequest { volume_id: "vol-early".into() }).await.unwrap();

    // The token survives the agent's restart.
    let mut c = c;
    let node = c.nodes.remove(0);
    let dir = node.pool_dir.clone();
    node.stop().await;
    let node = InNode::start(&c.pki, "node-1", &dir).await;
    let mut old_again = agent_client(&node.address(), "node-1", &ctl, 6).await;
    let e =
        old_again.delete_volume(pb::DeleteVolumeRequest { volume_id: "vol-early".into() }).await.expect_err("forgotten after a restart");
    assert_eq!(e.code(), Code::FailedPrecondition);
    c.nodes.push(node);
}
