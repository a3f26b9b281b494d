//! The `cinderblock` binary: one program, a subcommand per role.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tracing::info;

// The binary's own parts: a client for people and the benchmarks (not the library's).
mod bench;
mod ctl;

use cinderblock::agent::fence::Fence;
use cinderblock::agent::AgentService;
use cinderblock::agent_proto::volume_manager_server::VolumeManagerServer;
use cinderblock::csi::identity_server::IdentityServer;
use cinderblock::csi::node_server::NodeServer;
use cinderblock::identity::IdentityService;
use cinderblock::node::{NodeConfig, NodeService};
use cinderblock::server;
use cinderblock::volume::{Pool, PoolConfig};

/// Said once in the help of the commands that log, instead of a global flag in every subcommand's help.
const LOG_HELP: &str = "Logging: --log-format text|json (env CINDERBLOCK_LOG_FORMAT, default text) to stderr, \
coloured only when stderr is a terminal; RUST_LOG sets the level (default info).";

#[derive(Parser)]
#[command(name = "cinderblock", version, about = "CSI driver for node-local block volumes with a Cinder-style control plane", after_help = LOG_HELP)]
struct Cli {
    /// Log format: text for people, json for log collectors. Accepted before or after the subcommand.
    #[arg(long, env = "CINDERBLOCK_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"], global = true, hide = true)]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node plugin: the volume manager of this node's pool (agent API
    /// on TCP) and CSI Identity on a unix socket.
    #[command(after_help = LOG_HELP)]
    Node(NodeArgs),
    /// Run a controller and N nodes in one process on this machine (embedded
    /// store, one pool folder per node): for trying cinderblock out, for demos
    /// and for conformance tests. Serves Identity, Controller and node 1's Node
    /// service on the endpoint.
    #[command(after_help = LOG_HELP)]
    Standalone(StandaloneArgs),
    /// A client for people: volumes and snapshots by name, nodes and their
    /// pools, capacity. Talks to the socket of a standalone or controller.
    Ctl(ctl::CtlArgs),
    /// Run the cluster controller: CSI Identity + Controller on a unix socket,
    /// records in the cinderblock.dev custom resources, leader election on a Lease.
    #[command(after_help = LOG_HELP)]
    Controller(ControllerArgs),
    /// Print the CustomResourceDefinitions (YAML) the cluster mode needs.
    Crds,
    /// Certificates for mutual TLS without a cluster (the controller makes
    /// and signs them itself in a cluster): a CA, and certificate folders for
    /// the controller and for nodes.
    #[command(subcommand)]
    Tls(TlsCommand),
    /// Measure and print figures (not a test: nothing is asserted).
    #[command(subcommand)]
    Bench(BenchCommand),
    /// NBD export and attach on their own (serve an image, attach an export).
    #[command(subcommand)]
    Nbd(cinderblock::attach::nbd::cli::NbdCommand),
}

#[derive(clap::Args)]
struct StandaloneArgs {
    /// Folder for everything: the store (store.redb) and node-N/pool for each node.
    #[arg(long, env = "CINDERBLOCK_DATA_DIR")]
    data_dir: PathBuf,
    /// How many nodes to run.
    #[arg(long, default_value_t = 3)]
    nodes: u32,
    /// Spread the nodes over this many zones (zone-1..zone-Z); 0 for none.
    #[arg(long, default_value_t = 1)]
    zones: u32,
    /// CSI endpoint, a unix socket: unix:///path/to/csi.sock
    #[arg(long, env = "CSI_ENDPOINT")]
    endpoint: String,
    /// More folders (besides --data-dir) where staging and target paths may lie.
    #[arg(long = "allowed-root", value_delimiter = ',')]
    allowed_roots: Vec<PathBuf>,
    /// Seconds between each node's capacity report.
    #[arg(long, default_value_t = 2.0)]
    heartbeat_interval: f64,
    /// A node silent for this many seconds is not scheduled.
    #[arg(long, default_value_t = 15.0)]
    heartbeat_timeout: f64,
    /// Seconds between reconciler passes (stuck records, orphaned images).
    #[arg(long, default_value_t = 30.0)]
    reconcile_interval: f64,
    /// Seconds a record may sit in Creating, or an image without a record, before the reconciler acts.
    #[arg(long, default_value_t = 120.0)]
    stuck_grace: f64,
    /// Most volumes per node (scheduler filter and NodeGetInfo); 0 for no limit.
    #[arg(long, default_value_t = 0)]
    max_volumes: u32,
    /// Serve Prometheus metrics on http://ADDR/metrics (e.g. 0.0.0.0:9820).
    #[arg(long, env = "CINDERBLOCK_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// Deadline in seconds of one call to a node agent; a call past it is
    /// followed by asking the node what it did.
    #[arg(long, default_value_t = 120.0)]
    agent_timeout: f64,
    #[command(flatten)]
    pool_opts: PoolOpts,
}

#[derive(clap::Args)]
struct ControllerArgs {
    /// Serve Prometheus metrics on http://ADDR/metrics (e.g. 0.0.0.0:9820).
    #[arg(long, env = "CINDERBLOCK_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// CSI endpoint, a unix socket: unix:///path/to/csi.sock
    #[arg(long, env = "CSI_ENDPOINT")]
    endpoint: String,
    /// Kubeconfig to use; in a pod, leave it out to use the in-cluster config.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Elect a leader among replicas on a Lease; only the leader changes records.
    #[arg(long, default_value_t = false)]
    leader_election: bool,
    /// Namespace of the leader election Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "kube-system")]
    leader_election_namespace: String,
    /// Namespace of the nodes' liveness Leases (cinderblock-node-NODE), as the node plugins are told.
    #[arg(long, env = "POD_NAMESPACE", default_value = "kube-system")]
    node_lease_namespace: String,
    /// Name of the Lease.
    #[arg(long, default_value = "cinderblock-controller")]
    leader_election_lease: String,
    /// This replica's identity in the Lease (defaults to the host name and process ID).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Seconds a leader's Lease lasts without renewal before a standby takes over.
    #[arg(long, default_value_t = 15.0)]
    lease_duration: f64,
    /// With --leader-election: serve the other replicas here (TCP, mutual
    /// TLS, the controller's certificate only). A standby hands the calls
    /// that change something to the leader, since each CSI sidecar elects
    /// its own leader and may sit beside a standby.
    #[arg(long)]
    peer_listen: Option<SocketAddr>,
    /// The address other replicas dial to reach this one's --peer-listen
    /// (in a pod: $(POD_IP):PORT); written on the Lease while leading.
    /// Defaults to --peer-listen when that names a specific address.
    #[arg(long)]
    peer_advertise: Option<String>,
    /// A node silent for this many seconds is not scheduled.
    #[arg(long, default_value_t = 15.0)]
    heartbeat_timeout: f64,
    /// Seconds between reconciler passes.
    #[arg(long, default_value_t = 30.0)]
    reconcile_interval: f64,
    /// Seconds a record may sit in Creating, or an image without a record, before the reconciler acts.
    #[arg(long, default_value_t = 120.0)]
    stuck_grace: f64,
    /// Deadline in seconds of one call to a node agent; a call past it is
    /// followed by asking the node what it did.
    #[arg(long, default_value_t = 120.0)]
    agent_timeout: f64,
    /// The controller's certificate folder (ca.crt, tls.crt, tls.key) for
    /// calling node agents over mutual TLS; read again when files change.
    #[arg(long, env = "CINDERBLOCK_TLS_DIR")]
    tls_dir: PathBuf,
    /// Keep the cluster CA in this Secret (in --leader-election-namespace),
    /// created at first start when missing; then the controller issues its
    /// own certificate into --tls-dir, publishes the CA certificate in a
    /// ConfigMap of the same name, and signs the nodes' certificate requests.
    /// Leave empty when certificates come from elsewhere (cert-manager).
    #[arg(long, env = "CINDERBLOCK_TLS_CA_SECRET", default_value = "")]
    tls_ca_secret: String,
    /// The CA Secret is made by someone else (cert-manager): wait for it, never make one.
    #[arg(long, default_value_t = false)]
    tls_ca_external: bool,
    /// Namespace of the CA Secret and ConfigMap.
    #[arg(long, env = "POD_NAMESPACE", default_value = "kube-system")]
    tls_namespace: String,
    /// The service account the node plugins run as (system:serviceaccount:NS:NAME):
    /// only its certificate requests are signed, each for the node its token is bound to.
    #[arg(long, env = "CINDERBLOCK_NODE_SERVICE_ACCOUNT", default_value = "")]
    node_service_account: String,
    /// Reconciler circuit breaker: hold a node's pass that would quarantine more than this many images.
    #[arg(long, default_value_t = 5)]
    orphan_breaker_count: usize,
    /// Reconciler circuit breaker: ...or more than this share (percent) of a node's images.
    #[arg(long, default_value_t = 10)]
    orphan_breaker_percent: u32,
}

#[derive(Subcommand)]
enum TlsCommand {
    /// Make a new CA in DIR (ca.crt, and ca.key readable by the owner only).
    InitCa {
        /// Folder for the CA.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a certificate folder (ca.crt, tls.crt, tls.key) for the
    /// controller or for one node, signed by the CA in --ca-dir.
    Issue {
        /// Folder holding ca.crt and ca.key.
        #[arg(long)]
        ca_dir: PathBuf,
        /// For the controller (client certificate for the agent API).
        #[arg(long, conflicts_with = "node")]
        controller: bool,
        /// For this node ID (agent API server, and NBD client).
        #[arg(long)]
        node: Option<String>,
        /// Where to write the folder.
        #[arg(long)]
        out: PathBuf,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 90)]
        days: u64,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Time snapshot and clone of a volume filled with data, for each size.
    /// Point --pool at a folder on the filesystem to measure (XFS with
    /// reflink for constant time, ext4 for the copy path).
    Pool {
        /// Pool folder to use (created; bench volumes are removed afterwards).
        #[arg(long)]
        pool: PathBuf,
        /// Data sizes in GiB to fill the source volume with.
        #[arg(long, value_delimiter = ',', default_value = "1,16")]
        sizes_gib: Vec<u64>,
        /// Snapshots and clones timed per size (the median is reported).
        #[arg(long, default_value_t = 7)]
        runs: usize,
        /// Force the copy path even where reflinks work.
        #[arg(long)]
        no_reflink: bool,
    },
    /// CreateVolume end to end: throughput and p50/p99 latency at each
    /// concurrency, through a standalone started for the purpose, or any
    /// CSI controller at --endpoint (another driver, to compare).
    Create {
        /// Concurrency levels.
        #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
        concurrency: Vec<usize>,
        /// Volumes created per level (at least 4 per concurrent caller are made).
        #[arg(long, default_value_t = 1024)]
        count: usize,
        /// Nodes of the standalone.
        #[arg(long, default_value_t = 3)]
        nodes: u32,
        /// Data folder (a temporary one by default).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Measure this CSI endpoint (unix:///path) instead of starting a standalone.
        #[arg(long)]
        endpoint: Option<String>,
        /// Name for this driver in the output.
        #[arg(long, default_value = "cinderblock")]
        label: String,
        /// Print comma-separated rows (label,concurrency,volumes,per_second,p50_ms,p99_ms,load) instead of a table.
        #[arg(long)]
        csv: bool,
        /// Bytes per volume.
        #[arg(long, default_value_t = 64 << 20)]
        size: u64,
    },
    /// Many volumes in the embedded store: fills a standalone with
    /// --volumes volumes (through CSI), then prints its memory (RSS), the
    /// time a restart takes to answer again, and ListVolumes page times
    /// (asked of the nodes before the restarted controller's first health
    /// pass, and answered from that pass after it); with --publications,
    /// with that many volumes published.
    Scale {
        /// Volumes to hold (made if the data folder has fewer).
        #[arg(long, default_value_t = 100_000)]
        volumes: usize,
        /// Data folder, kept between runs (filling 100k takes minutes).
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Publications to hold (local ones, written into the store while
        /// the standalone is stopped, if it has fewer): a page's cost with
        /// that many attached volumes in the cluster.
        #[arg(long, default_value_t = 0)]
        publications: usize,
    },
    /// Start-up of the controller's store on a real API server: makes
    /// --objects BlockVolume objects (if fewer exist), then times filling
    /// the watch caches from nothing, as a controller does when it starts.
    KubeStart {
        /// Kubeconfig of the cluster (a test bed: scripts/k8s/testbed.sh).
        #[arg(long, env = "KUBECONFIG")]
        kubeconfig: PathBuf,
        #[arg(long, default_value_t = 10_000)]
        objects: usize,
    },
}

#[derive(clap::Args)]
struct NodeArgs {
    /// Folder that holds this node's pool (volume and snapshot images). Created if missing.
    #[arg(long, env = "CINDERBLOCK_POOL")]
    pool: PathBuf,
    /// This node's ID, as reported to Kubernetes (usually the node name).
    #[arg(long, env = "CINDERBLOCK_NODE_ID")]
    node_id: String,
    /// Zone of this node (topology.cinderblock.dev/zone); empty for none.
    #[arg(long, env = "CINDERBLOCK_ZONE", default_value = "")]
    zone: String,
    /// TCP address the agent API (the controller's volume manager calls) listens on.
    #[arg(long, env = "CINDERBLOCK_AGENT_LISTEN", default_value = "127.0.0.1:9810")]
    agent_listen: SocketAddr,
    /// CSI endpoint, a unix socket: unix:///path/to/csi.sock
    #[arg(long, env = "CSI_ENDPOINT")]
    endpoint: String,
    /// The kubelet's root folder (its --root-dir). Staging and target paths
    /// may lie in its pods/ and plugins/kubernetes.io/csi/ folders only.
    #[arg(long, env = "CINDERBLOCK_KUBELET_DIR", default_value = "/var/lib/kubelet")]
    kubelet_dir: PathBuf,
    /// More folders where staging and target paths may lie (repeatable; for
    /// tests and setups without a kubelet).
    #[arg(long = "allowed-root", env = "CINDERBLOCK_ALLOWED_ROOTS", value_delimiter = ',')]
    allowed_roots: Vec<PathBuf>,
    /// Most volumes this node attaches at once (NodeGetInfo); 0 for no limit.
    #[arg(long, env = "CINDERBLOCK_MAX_VOLUMES", default_value_t = 0)]
    max_volumes: i64,
    /// Register this node (a StorageNode record) in the Kubernetes API and renew it.
    #[arg(long, default_value_t = false)]
    register: bool,
    /// Kubeconfig for --register; in a pod, leave it out to use the in-cluster config.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Address the controller uses to reach this agent (default: http://<--agent-listen>).
    #[arg(long, env = "CINDERBLOCK_AGENT_ADVERTISE")]
    agent_advertise: Option<String>,
    /// Seconds between registrations (and pool metric updates).
    #[arg(long, default_value_t = 5.0)]
    heartbeat_interval: f64,
    /// Certificate folder of this node (ca.crt, tls.crt, tls.key): the agent
    /// API serves mutual TLS only, to the controller's certificate; files
    /// replaced on disk are used without a restart.
    #[arg(long, env = "CINDERBLOCK_TLS_DIR")]
    tls_dir: PathBuf,
    /// Obtain and renew this node's certificate from the controller through
    /// a Kubernetes CertificateSigningRequest (needs --register's API access).
    #[arg(long, default_value_t = false)]
    tls_bootstrap: bool,
    /// ConfigMap (in --tls-namespace) where the controller publishes the cluster CA.
    #[arg(long, default_value = "cinderblock-ca")]
    tls_ca_configmap: String,
    /// Namespace of the CA ConfigMap.
    #[arg(long, env = "POD_NAMESPACE", default_value = "kube-system")]
    tls_namespace: String,
    /// Serve this pool's volumes over NBD on this TCP address to other nodes
    /// of their zone (remote attach); only over TLS, only to the node each
    /// export names. Unset: this node exports nothing.
    #[arg(long, env = "CINDERBLOCK_NBD_LISTEN")]
    nbd_listen: Option<SocketAddr>,
    /// Where remote volumes are attached (FUSE engine mounts, one folder per volume).
    #[arg(long, env = "CINDERBLOCK_ATTACH_STATE_DIR", default_value = "/run/cinderblock/attach")]
    attach_state_dir: PathBuf,
    /// host:port other nodes reach the NBD server at (default: --nbd-listen's).
    #[arg(long, env = "CINDERBLOCK_NBD_ADVERTISE")]
    nbd_advertise: Option<String>,
    /// Namespace of this node's liveness Lease (cinderblock-node-NODE), renewed every --heartbeat-interval.
    #[arg(long, env = "POD_NAMESPACE", default_value = "kube-system")]
    node_lease_namespace: String,
    /// Delete quarantined images (orphaned/) older than this many seconds, by
    /// this node's clock; 0 keeps them until an operator purges them.
    #[arg(long, env = "CINDERBLOCK_ORPHAN_RETENTION", default_value_t = 0.0)]
    orphan_retention: f64,
    /// Serve Prometheus metrics on http://ADDR/metrics (e.g. 0.0.0.0:9821).
    #[arg(long, env = "CINDERBLOCK_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// Refuse to start when the pool is on the filesystem of / or of
    /// --kubelet-dir: a full pool would fill that disk.
    #[arg(long, env = "CINDERBLOCK_REFUSE_SYSTEM_FILESYSTEM")]
    refuse_system_filesystem: bool,
    #[command(flatten)]
    pool_opts: PoolOpts,
}

#[derive(clap::Args, Clone)]
struct PoolOpts {
    /// Cinder's max_over_subscription_ratio: how far thin volumes may
    /// over-commit the pool (provisioned / total). Below 1, thin counts as thick.
    #[arg(long, env = "CINDERBLOCK_MAX_OVER_SUBSCRIPTION_RATIO", default_value_t = 20.0)]
    max_over_subscription_ratio: f64,
    /// Cinder's reserved_percentage: share of the pool's total kept free, 0 to 100.
    #[arg(long, env = "CINDERBLOCK_RESERVED_PERCENTAGE", default_value_t = 0)]
    reserved_percentage: u32,
    /// Never use reflinks; snapshots and clones always copy (for comparison).
    #[arg(long)]
    no_reflink: bool,
}

impl PoolOpts {
    fn config(&self) -> PoolConfig {
        PoolConfig {
            max_over_subscription_ratio: self.max_over_subscription_ratio,
            reserved_percentage: self.reserved_percentage,
            allow_reflink: !self.no_reflink,
        }
    }
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(std::io::stderr().is_terminal());
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> std::process::ExitCode {
    cinderblock::memory::limit_arenas();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cinderblock: starting the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(run())
}

async fn run() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    let result = match cli.command {
        Command::Node(args) => run_node(args).await,
        Command::Bench(b) => bench::run(b).await,
        Command::Standalone(a) => run_standalone(a).await,
        Command::Controller(a) => run_controller(a).await,
        Command::Crds => {
            print!("{}", cinderblock::kube::crds::all_yaml());
            Ok(())
        }
        Command::Tls(t) => run_tls(t),
        Command::Ctl(a) => ctl::run(a).await,
        Command::Nbd(c) => cinderblock::attach::nbd::cli::run(c).await,
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cinderblock: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run_node(args: NodeArgs) -> Result<(), String> {
    use cinderblock::tls::{self, PeerRule, ServerTls, TlsDir};
    cinderblock::volume::validate_id("node id", &args.node_id).map_err(|e| e.to_string())?;
    tls::node_dns_name(&args.node_id).map_err(|e| e.to_string())?;
    let socket = server::unix_endpoint_path(&args.endpoint)?;
    server::refuse_if_live(&socket)?;
    if args.refuse_system_filesystem {
        let system: Vec<&std::path::Path> = vec![std::path::Path::new("/"), args.kubelet_dir.as_path()];
        cinderblock::pool_placement::refuse_system_filesystem(&args.pool, &system)?;
    }
    let kube = if args.register || args.tls_bootstrap { Some(cinderblock::kube::client(args.kubeconfig.as_deref()).await?) } else { None };
    if args.tls_bootstrap {
        let client = kube.as_ref().expect("client made above");
        cinderblock::kube::certs::bootstrap_node(client, &args.node_id, &args.tls_dir, &args.tls_namespace, &args.tls_ca_configmap).await?;
        tokio::spawn(cinderblock::kube::certs::renew_node_forever(
            client.clone(),
            args.node_id.clone(),
            args.tls_dir.clone(),
            args.tls_namespace.clone(),
            args.tls_ca_configmap.clone(),
            std::time::Duration::from_secs(3600),
        ));
    }
    let tls_dir = TlsDir::open(&args.tls_dir).map_err(|e| format!("certificate folder {}: {e}", args.tls_dir.display()))?;
    let pool_dir = args.pool.clone();
    let config = args.pool_opts.config();
    let (pool, _report) = tokio::task::spawn_blocking(move || Pool::open(&pool_dir, config))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("opening pool {}: {e}", args.pool.display()))?;
    let pool = Arc::new(pool);
    let fence = Arc::new(Fence::open(pool.root()).map_err(|e| format!("fencing state: {e}"))?);
    let ready = Arc::new(AtomicBool::new(true));

    let agent_listener = tokio::net::TcpListener::bind(args.agent_listen)
        .await
        .map_err(|e| format!("agent API cannot listen on {}: {e}", args.agent_listen))?;
    let agent_addr = agent_listener.local_addr().map_err(|e| e.to_string())?;

    // Volumes of other nodes attach here over NBD (kernel engine where the
    // nbd module answers, FUSE otherwise).
    let engine = Arc::new(cinderblock::attach::nbd::Engine::detect(&args.attach_state_dir).await);
    info!(engine = engine.name(), tls = engine.tls_mode(), "remote attach engine");
    // The CSI socket appears only once the node knows how it attaches
    // (what a caller waiting for the socket may then rely on).
    let csi_incoming = server::bind_unix(&socket).map_err(|e| format!("CSI endpoint {}: {e}", socket.display()))?;
    let remote =
        cinderblock::node::remote::RemoteConfig { engine: engine.clone(), tls: tls_dir.clone(), state_root: args.attach_state_dir.clone() };
    let copier = cinderblock::agent::copier::Copier::new(pool.clone(), tls_dir.clone(), args.node_id.clone());
    let mut agent_service =
        AgentService::new(pool.clone(), args.node_id.clone(), fence).with_copier(copier).with_attach(engine.name(), engine.tls_mode());
    if let Some(listen) = args.nbd_listen {
        let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| format!("NBD server cannot listen on {listen}: {e}"))?;
        let bound = listener.local_addr().map_err(|e| e.to_string())?;
        let address = args.nbd_advertise.clone().unwrap_or_else(|| bound.to_string());
        let exports = cinderblock::export::serve_pool(pool.clone(), tls_dir.clone(), listener, address.clone())
            .map_err(|e| format!("NBD exports of {}: {e}", args.pool.display()))?;
        info!(nbd = %bound, advertised = %address, "NBD server ready");
        agent_service = agent_service.with_exports(exports);
    }
    let agent_incoming = tls::serve_incoming(agent_listener, ServerTls::new(tls_dir, PeerRule::Controller, vec![b"h2".to_vec()]));
    let agent = tonic::transport::Server::builder()
        .layer(cinderblock::metrics::CallMetricsLayer)
        .add_service(VolumeManagerServer::new(agent_service))
        .serve_with_incoming_shutdown(agent_incoming, server::shutdown_signal());
    let csi = tonic::transport::Server::builder()
        .layer(cinderblock::metrics::CallMetricsLayer)
        .add_service(IdentityServer::new(IdentityService::new(false, ready.clone())))
        .add_service(NodeServer::new(NodeService::new(NodeConfig {
            node_id: args.node_id.clone(),
            zone: args.zone.clone(),
            pool: pool.clone(),
            allowed_roots: cinderblock::node::kubelet_roots(&args.kubelet_dir).into_iter().chain(args.allowed_roots.clone()).collect(),
            max_volumes: args.max_volumes,
            remote: Some(remote),
        })))
        .serve_with_incoming_shutdown(csi_incoming, server::shutdown_signal());
    if let Some(addr) = args.metrics_addr {
        spawn_metrics(addr);
    }
    if args.orphan_retention > 0.0 {
        let retention = seconds(args.orphan_retention, "orphan-retention")?;
        let p = pool.clone();
        tokio::spawn(async move {
            loop {
                let p2 = p.clone();
                let ms = retention.as_millis() as u64;
                match tokio::task::spawn_blocking(move || p2.purge_orphans(ms, false)).await {
                    Ok(Ok(purged)) if !purged.is_empty() => info!(count = purged.len(), "orphan retention: purged quarantined images"),
                    Ok(Err(e)) => tracing::warn!(error = %e, "orphan retention pass failed"),
                    _ => {}
                }
                tokio::time::sleep(std::time::Duration::from_secs(600)).await;
            }
        });
    }
    let mut zone = args.zone.clone();
    if !args.register {
        // Without registration, still keep the pool gauges current.
        let (p, id) = (pool.clone(), args.node_id.clone());
        let every = std::time::Duration::try_from_secs_f64(args.heartbeat_interval).map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            loop {
                if let Ok(st) = p.status() {
                    cinderblock::metrics::METRICS.set_pool(&id, st.capacity.total, st.capacity.free, st.capacity.provisioned);
                }
                tokio::time::sleep(every).await;
            }
        });
    }
    if let (true, Some(client)) = (args.register, kube) {
        if zone.is_empty() {
            zone = cinderblock::kube::node_zone(&client, &args.node_id).await?.unwrap_or_default();
        }
        let store: Arc<dyn cinderblock::store::Store> =
            Arc::new(cinderblock::kube::KubeStore::with_lease_namespace(client, &args.node_lease_namespace));
        let mut reg = cinderblock::node::registration::Registration::new(
            args.node_id.clone(),
            zone.clone(),
            args.agent_advertise.clone().unwrap_or_else(|| format!("https://{agent_addr}")),
            args.max_volumes.max(0) as u32,
        )
        .with_attach(engine.name(), engine.tls_mode());
        reg.report(&*store, &pool).await.map_err(|e| format!("registering node {}: {e}", args.node_id))?;
        let every = std::time::Duration::try_from_secs_f64(args.heartbeat_interval).map_err(|e| e.to_string())?;
        tokio::spawn(reg.run(store, pool.clone(), every));
    }
    info!(node.id = %args.node_id, zone = %zone, agent = %agent_addr, endpoint = %socket.display(), "node ready");
    let (a, c) = tokio::join!(agent, csi);
    a.map_err(|e| format!("agent server: {e}"))?;
    c.map_err(|e| format!("CSI server: {e}"))?;
    info!("node stopped");
    Ok(())
}

async fn run_standalone(a: StandaloneArgs) -> Result<(), String> {
    let secs = seconds;
    let cfg = cinderblock::standalone::StandaloneConfig {
        data_dir: a.data_dir,
        nodes: a.nodes,
        zones: a.zones,
        endpoint: a.endpoint,
        pool: a.pool_opts.config(),
        controller: cinderblock::controller::ControllerConfig {
            heartbeat_timeout: secs(a.heartbeat_timeout, "heartbeat-timeout")?,
            stuck_grace: secs(a.stuck_grace, "stuck-grace")?,
            agent_timeout: secs(a.agent_timeout, "agent-timeout")?,
            ..Default::default()
        },
        heartbeat_interval: secs(a.heartbeat_interval, "heartbeat-interval")?,
        reconcile_interval: secs(a.reconcile_interval, "reconcile-interval")?,
        extra_allowed_roots: a.allowed_roots,
        max_volumes: a.max_volumes,
        metrics_addr: a.metrics_addr,
    };
    cinderblock::standalone::run(cfg).await
}

async fn run_controller(a: ControllerArgs) -> Result<(), String> {
    use cinderblock::controller::forward::{ForwardingController, ForwardingGroupController};
    use cinderblock::controller::{ControllerConfig, ControllerService, GroupControllerService, Manager};
    use cinderblock::csi::controller_server::ControllerServer;
    use cinderblock::csi::group_controller_server::GroupControllerServer;
    use cinderblock::tls::{PeerRule, ServerTls};
    let secs = seconds;
    let socket = server::unix_endpoint_path(&a.endpoint)?;
    let client = cinderblock::kube::client(a.kubeconfig.as_deref()).await?;
    let identity = a.identity.clone().unwrap_or_else(|| {
        let host = rustix::system::uname().nodename().to_string_lossy().into_owned();
        format!("{host}-{}", std::process::id())
    });
    // Certificates: our own CA in a Secret, or files from elsewhere.
    let ca = if a.tls_ca_secret.is_empty() {
        None
    } else {
        let ns = &a.tls_namespace;
        let ca = cinderblock::kube::certs::ensure_ca(&client, ns, &a.tls_ca_secret, a.tls_ca_external).await?;
        cinderblock::kube::certs::publish_ca(&client, ns, &a.tls_ca_secret, ca.cert_pem()).await?;
        cinderblock::kube::certs::ensure_controller_certificate(&ca, &a.tls_dir)?;
        Some(Arc::new(ca))
    };
    let tls_dir = cinderblock::tls::TlsDir::open(&a.tls_dir).map_err(|e| format!("certificate folder {}: {e}", a.tls_dir.display()))?;
    // Every record is listed once and then watched: reads come from memory.
    let store = cinderblock::kube::KubeStore::watching(client.clone(), &a.node_lease_namespace, std::time::Duration::from_secs(300))
        .await
        .map_err(|e| e.to_string())?;
    let store: Arc<dyn cinderblock::store::Store> = Arc::new(store);
    let config = ControllerConfig {
        heartbeat_timeout: secs(a.heartbeat_timeout, "heartbeat-timeout")?,
        stuck_grace: secs(a.stuck_grace, "stuck-grace")?,
        agent_timeout: secs(a.agent_timeout, "agent-timeout")?,
        orphan_breaker_count: a.orphan_breaker_count,
        orphan_breaker_percent: a.orphan_breaker_percent,
        ..Default::default()
    };
    let events = Arc::new(cinderblock::kube::events::PvcEvents::new(client.clone(), identity.clone()));
    let mut manager = Manager::new(store, config, tls_dir.clone()).with_events(events);
    // With leader election and a peer server: the leader's peer listener,
    // and the route a standby hands its sidecars' calls along.
    let mut peers = None;
    if a.leader_election {
        let mut cfg = cinderblock::kube::leader::LeaderConfig::with_lease(
            a.leader_election_namespace.clone(),
            a.leader_election_lease.clone(),
            identity.clone(),
            secs(a.lease_duration, "lease-duration")?,
        );
        let listener = match a.peer_listen {
            Some(addr) => {
                let l = tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("--peer-listen {addr}: {e}"))?;
                let bound = l.local_addr().map_err(|e| e.to_string())?;
                cfg.peer_address = match &a.peer_advertise {
                    Some(adv) => Some(adv.clone()),
                    None if !bound.ip().is_unspecified() => Some(bound.to_string()),
                    None => {
                        return Err(format!(
                            "--peer-listen {addr} listens on every address: say which one the other replicas dial with --peer-advertise"
                        ))
                    }
                };
                Some(l)
            }
            None => None,
        };
        cfg.validate()?;
        let advertise = cfg.peer_address.clone();
        let campaign = cinderblock::kube::leader::campaign(client.clone(), cfg);
        manager = manager.with_leader(campaign.leadership.clone());
        manager.fence_nodes_on_each_term();
        if let Some(l) = listener {
            let route = cinderblock::controller::forward::LeaderRoute::new(campaign.leadership, campaign.leader_peer, tls_dir.clone())?;
            info!(listen = %l.local_addr().map_err(|e| e.to_string())?, advertise = ?advertise, "serving the other controller replicas");
            peers = Some((l, Arc::new(route)));
        }
    } else if a.peer_listen.is_some() {
        return Err("--peer-listen needs --leader-election (without it there is one replica and no one to serve)".into());
    }
    if let Some(ca) = ca {
        if a.node_service_account.is_empty() {
            return Err("--tls-ca-secret needs --node-service-account (system:serviceaccount:NAMESPACE:NAME of the node plugins)".into());
        }
        let (m, client, sa) = (manager.clone(), client.clone(), a.node_service_account.clone());
        let dir = a.tls_dir.clone();
        tokio::spawn(async move {
            // Only the leader signs; every replica keeps its own certificate fresh.
            loop {
                if let Err(e) = cinderblock::kube::certs::ensure_controller_certificate(&ca, &dir) {
                    tracing::warn!(error = %e, "renewing the controller's certificate failed");
                }
                if m.is_leader() {
                    let signer = cinderblock::kube::certs::sign_node_requests(
                        client.clone(),
                        ca.clone(),
                        sa.clone(),
                        std::time::Duration::from_secs(1),
                    );
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(60), signer).await;
                } else {
                    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                }
            }
        });
    }
    tokio::spawn(manager.clone().run_reconciler(secs(a.reconcile_interval, "reconcile-interval")?));
    if let Some(addr) = a.metrics_addr {
        spawn_metrics(addr);
    }
    let incoming = server::bind_unix(&socket).map_err(|e| format!("CSI endpoint {}: {e}", socket.display()))?;
    let ready = Arc::new(AtomicBool::new(true));
    info!(endpoint = %socket.display(), identity = %identity, leader_election = a.leader_election, "controller ready");
    let mut route = None;
    if let Some((listener, r)) = peers {
        // The peer server runs calls here and never hands them on.
        let incoming =
            cinderblock::tls::serve_incoming(listener, ServerTls::new(tls_dir.clone(), PeerRule::Controller, vec![b"h2".to_vec()]));
        let local = ControllerService::new(manager.clone());
        let local_group = GroupControllerService::new(manager.clone());
        let local_admin = manager.clone();
        tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .layer(cinderblock::metrics::CallMetricsLayer)
                .add_service(ControllerServer::new(local))
                .add_service(GroupControllerServer::new(local_group))
                .add_service(cinderblock::admin::AdminService::server(local_admin))
                .serve_with_incoming_shutdown(incoming, server::shutdown_signal())
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "the peer server stopped");
            }
        });
        route = Some(r);
    }
    let csi_controller = ControllerServer::new(ForwardingController::new(ControllerService::new(manager.clone()), route.clone()));
    let csi_group = GroupControllerServer::new(ForwardingGroupController::new(GroupControllerService::new(manager.clone()), route.clone()));
    tonic::transport::Server::builder()
        .layer(cinderblock::metrics::CallMetricsLayer)
        .add_service(IdentityServer::new(IdentityService::new(true, ready)))
        .add_service(csi_controller)
        .add_service(csi_group)
        .add_service(cinderblock::admin::AdminService::server_with_route(manager, route))
        .serve_with_incoming_shutdown(incoming, server::shutdown_signal())
        .await
        .map_err(|e| format!("CSI server: {e}"))?;
    Ok(())
}

fn run_tls(cmd: TlsCommand) -> Result<(), String> {
    use cinderblock::tls::{Authority, Peer};
    match cmd {
        TlsCommand::InitCa { dir } => {
            if dir.join("ca.key").exists() {
                return Err(format!("{} already holds a CA; remove it first to make a new one", dir.display()));
            }
            Authority::generate("cinderblock CA").and_then(|ca| ca.save(&dir)).map_err(|e| e.to_string())?;
            println!("CA written to {}", dir.display());
            Ok(())
        }
        TlsCommand::Issue { ca_dir, controller, node, out, days } => {
            let peer = match (controller, node) {
                (true, None) => Peer::Controller,
                (false, Some(n)) => Peer::Node(n),
                _ => return Err("say who the certificate is for: --controller or --node NODE_ID".into()),
            };
            let ca = Authority::load(&ca_dir).map_err(|e| e.to_string())?;
            ca.issue_into(&peer, std::time::Duration::from_secs(days * 86400), &out).map_err(|e| e.to_string())?;
            println!("certificate for {peer} written to {}", out.display());
            Ok(())
        }
    }
}

fn seconds(s: f64, flag: &str) -> Result<std::time::Duration, String> {
    std::time::Duration::try_from_secs_f64(s).map_err(|_| format!("--{flag} must be a positive number of seconds"))
}

fn spawn_metrics(addr: SocketAddr) {
    tokio::spawn(async move {
        if let Err(e) = cinderblock::metrics::serve(addr).await {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
}
