//! `cinderblock standalone`: a controller and N nodes in one process on one
//! machine, each node with its own pool folder and zone, embedded store.
//! The nodes' agents still listen on loopback TCP and the controller still
//! reaches them over gRPC with mutual TLS, exactly as across machines: a CA
//! and the certificates are made under `<data-dir>/tls/` at first start.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use tracing::info;

use crate::agent::fence::Fence;
use crate::agent::AgentService;
use crate::agent_proto::volume_manager_server::VolumeManagerServer;
use crate::controller::{ControllerConfig, ControllerService, GroupControllerService, Manager};
use crate::csi::controller_server::ControllerServer;
use crate::csi::group_controller_server::GroupControllerServer;
use crate::csi::identity_server::IdentityServer;
use crate::csi::node_server::NodeServer;
use crate::identity::IdentityService;
use crate::node::registration::Registration;
use crate::node::{NodeConfig, NodeService};
use crate::server;
use crate::store::embedded::EmbeddedStore;
use crate::store::Store;
use crate::tls::{self, Peer, PeerRule, ServerTls, TlsDir};
use crate::volume::{Pool, PoolConfig};

pub struct StandaloneConfig {
    pub data_dir: PathBuf,
    pub nodes: u32,
    pub zones: u32,
    pub endpoint: String,
    pub pool: PoolConfig,
    pub controller: ControllerConfig,
    pub heartbeat_interval: Duration,
    pub reconcile_interval: Duration,
    pub extra_allowed_roots: Vec<PathBuf>,
    pub max_volumes: u32,
    pub metrics_addr: Option<std::net::SocketAddr>,
}

pub fn node_name(i: u32) -> String {
    format!("node-{i}")
}

pub fn zone_name(i: u32, zones: u32) -> String {
    if zones == 0 {
        String::new()
    } else {
        format!("zone-{}", (i - 1) % zones + 1)
    }
}

pub async fn run(cfg: StandaloneConfig) -> Result<(), String> {
    if cfg.nodes == 0 {
        return Err("--nodes must be at least 1".into());
    }
    let socket = server::unix_endpoint_path(&cfg.endpoint)?;
    server::refuse_if_live(&socket)?;
    std::fs::create_dir_all(&cfg.data_dir).map_err(|e| format!("creating {}: {e}", cfg.data_dir.display()))?;
    let data_dir = cfg.data_dir.canonicalize().map_err(|e| e.to_string())?;
    let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&data_dir.join("store.redb")).map_err(|e| format!("opening the store: {e}"))?);
    let tls_dir = data_dir.join("tls");
    let mut peers = vec![Peer::Controller];
    peers.extend((1..=cfg.nodes).map(|i| Peer::Node(node_name(i))));
    tls::authority::ensure_local_pki(&tls_dir, &peers).map_err(|e| format!("making certificates in {}: {e}", tls_dir.display()))?;
    let mut tasks = tokio::task::JoinSet::new();
    let mut first_pool = None;
    for i in 1..=cfg.nodes {
        let id = node_name(i);
        let node_tls = TlsDir::open(&tls::authority::local_peer_dir(&tls_dir, &Peer::Node(id.clone()))).map_err(|e| e.to_string())?;
        let zone = zone_name(i, cfg.zones);
        let dir = data_dir.join(&id).join("pool");
        let pc = cfg.pool.clone();
        let (pool, _) = tokio::task::spawn_blocking(move || Pool::open(&dir, pc))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("opening the pool of {id}: {e}"))?;
        let pool = Arc::new(pool);
        // Every node's snapshots freeze what is mounted from its images
        // (all nodes share this host's mount table), not only node 1's.
        pool.set_freezer(Arc::new(crate::node::freeze::MountedFilesystems::default()));
        let fence = Arc::new(Fence::open(pool.root()).map_err(|e| format!("fencing state of {id}: {e}"))?);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let nbd = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
        let nbd_addr = nbd.local_addr().map_err(|e| e.to_string())?.to_string();
        let exports =
            crate::export::serve_pool(pool.clone(), node_tls.clone(), nbd, nbd_addr).map_err(|e| format!("NBD exports of {id}: {e}"))?;
        let incoming = tls::serve_incoming(listener, ServerTls::new(node_tls.clone(), PeerRule::Controller, vec![b"h2".to_vec()]));
        let agent =
            tonic::transport::Server::builder()
                .layer(crate::metrics::CallMetricsLayer)
                .add_service(VolumeManagerServer::new(
                    AgentService::new(pool.clone(), id.clone(), fence)
                        .with_exports(exports)
                        .with_copier(crate::agent::copier::Copier::new(pool.clone(), node_tls.clone(), id.clone())),
                ))
                .serve_with_incoming_shutdown(incoming, server::shutdown_signal());
        tasks.spawn(async move { agent.await.map_err(|e| format!("agent server: {e}")) });
        let mut reg = Registration::new(id.clone(), zone.clone(), format!("https://{addr}"), cfg.max_volumes);
        reg.report(&*store, &pool).await?;
        let (s, p, every) = (store.clone(), pool.clone(), cfg.heartbeat_interval);
        tokio::spawn(reg.run(s, p, every));
        info!(node = %id, zone = %zone, agent = %addr, pool = %pool.root().display(), "node started");
        if i == 1 {
            first_pool = Some((pool, id, zone));
        }
    }
    let (pool, node_id, zone) = first_pool.expect("at least one node");
    // Node 1's Node service attaches the other nodes' volumes over NBD.
    let attach_root = data_dir.join(&node_id).join("attach");
    let remote = crate::node::remote::RemoteConfig {
        engine: Arc::new(crate::attach::nbd::Engine::detect(&attach_root).await),
        tls: TlsDir::open(&tls::authority::local_peer_dir(&tls_dir, &Peer::Node(node_id.clone()))).map_err(|e| e.to_string())?,
        state_root: attach_root,
    };
    if let Some(addr) = cfg.metrics_addr {
        tasks.spawn(crate::metrics::serve(addr));
    }
    let controller_tls = TlsDir::open(&tls::authority::local_peer_dir(&tls_dir, &Peer::Controller)).map_err(|e| e.to_string())?;
    let manager = Manager::new(store.clone(), cfg.controller.clone(), controller_tls);
    tokio::spawn(manager.clone().run_reconciler(cfg.reconcile_interval));

    let mut allowed_roots = vec![data_dir.clone()];
    allowed_roots.extend(cfg.extra_allowed_roots.iter().cloned());
    let incoming = server::bind_unix(&socket).map_err(|e| format!("CSI endpoint {}: {e}", socket.display()))?;
    let ready = Arc::new(AtomicBool::new(true));
    let csi = tonic::transport::Server::builder()
        .layer(crate::metrics::CallMetricsLayer)
        .add_service(IdentityServer::new(IdentityService::new(true, ready)))
        .add_service(ControllerServer::new(ControllerService::new(manager.clone())))
        .add_service(GroupControllerServer::new(GroupControllerService::new(manager.clone())))
        .add_service(crate::admin::AdminService::server(manager))
        .add_service(NodeServer::new(NodeService::new(NodeConfig {
            node_id,
            zone,
            pool,
            allowed_roots,
            max_volumes: cfg.max_volumes as i64,
            remote: Some(remote),
        })))
        .serve_with_incoming_shutdown(incoming, server::shutdown_signal());
    tasks.spawn(async move { csi.await.map_err(|e| format!("CSI server: {e}")) });
    info!(endpoint = %socket.display(), nodes = cfg.nodes, zones = cfg.zones, data_dir = %data_dir.display(), "cinderblock standalone ready");
    let mut result = Ok(());
    while let Some(r) = tasks.join_next().await {
        if let Ok(Err(e)) = r {
            result = Err(e);
        }
    }
    info!("cinderblock standalone stopped");
    result
}
