//! The `cinderblock` binary: one program, a subcommand per role.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tracing::info;

use cinderblock::agent::AgentService;
use cinderblock::agent_proto::volume_manager_server::VolumeManagerServer;
use cinderblock::csi::identity_server::IdentityServer;
use cinderblock::identity::IdentityService;
use cinderblock::csi::node_server::NodeServer;
use cinderblock::node::{NodeConfig, NodeService};
use cinderblock::server;
use cinderblock::volume::{Pool, PoolConfig};

#[derive(Parser)]
#[command(name = "cinderblock", version, about = "CSI driver for node-local block volumes with a Cinder-style control plane")]
struct Cli {
    /// Log format: text for people, json for log collectors.
    #[arg(long, env = "CINDERBLOCK_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"], global = true)]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node plugin: the volume manager of this node's pool (agent API
    /// on TCP) and CSI Identity on a unix socket.
    Node(NodeArgs),
    /// Run a controller and N nodes in one process on this machine (embedded
    /// store, one pool folder per node): for trying cinderblock out, for demos
    /// and for conformance tests. Serves Identity, Controller and node 1's Node
    /// service on the endpoint.
    Standalone(StandaloneArgs),
    /// A CSI client for people: volumes, snapshots, capacity.
    Ctl(CtlArgs),
    /// Run the cluster controller: CSI Identity + Controller on a unix socket,
    /// records in the cinderblock.dev custom resources, leader election on a Lease.
    Controller(ControllerArgs),
    /// Print the CustomResourceDefinitions (YAML) the cluster mode needs.
    Crds,
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
    /// Name of the Lease.
    #[arg(long, default_value = "cinderblock-controller")]
    leader_election_lease: String,
    /// This replica's identity in the Lease (defaults to the host name and process ID).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Seconds a leader's Lease lasts without renewal before a standby takes over.
    #[arg(long, default_value_t = 15.0)]
    lease_duration: f64,
    /// A node silent for this many seconds is not scheduled.
    #[arg(long, default_value_t = 15.0)]
    heartbeat_timeout: f64,
    /// Seconds between reconciler passes.
    #[arg(long, default_value_t = 30.0)]
    reconcile_interval: f64,
    /// Seconds a record may sit in Creating, or an image without a record, before the reconciler acts.
    #[arg(long, default_value_t = 120.0)]
    stuck_grace: f64,
}

#[derive(clap::Args)]
struct CtlArgs {
    /// CSI endpoint of a controller (standalone or cluster), unix:///path/to/csi.sock
    #[arg(long, env = "CSI_ENDPOINT")]
    endpoint: String,
    /// Output: table for people, json for scripts.
    #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
    output: String,
    #[command(subcommand)]
    command: cinderblock::ctl::CtlCommand,
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
    /// concurrency, through a standalone started for the purpose.
    Create {
        /// Concurrency levels.
        #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
        concurrency: Vec<usize>,
        /// Volumes created per level.
        #[arg(long, default_value_t = 256)]
        count: usize,
        /// Nodes of the standalone.
        #[arg(long, default_value_t = 3)]
        nodes: u32,
        /// Data folder (a temporary one by default).
        #[arg(long)]
        data_dir: Option<PathBuf>,
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
    /// Folders under which staging and target paths may lie (repeatable).
    #[arg(long = "allowed-root", env = "CINDERBLOCK_ALLOWED_ROOTS", value_delimiter = ',', default_value = "/var/lib/kubelet")]
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
    /// Serve Prometheus metrics on http://ADDR/metrics (e.g. 0.0.0.0:9821).
    #[arg(long, env = "CINDERBLOCK_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
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
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    let result = match cli.command {
        Command::Node(args) => run_node(args).await,
        Command::Bench(b) => run_bench(b).await,
        Command::Standalone(a) => run_standalone(a).await,
        Command::Controller(a) => run_controller(a).await,
        Command::Crds => {
            print!("{}", cinderblock::kube::crds::all_yaml());
            Ok(())
        }
        Command::Ctl(a) => cinderblock::ctl::run(&a.endpoint, a.output == "json", a.command).await,
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
    cinderblock::volume::validate_id("node id", &args.node_id).map_err(|e| e.to_string())?;
    let socket = server::unix_endpoint_path(&args.endpoint)?;
    let pool_dir = args.pool.clone();
    let config = args.pool_opts.config();
    let (pool, _report) = tokio::task::spawn_blocking(move || Pool::open(&pool_dir, config))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("opening pool {}: {e}", args.pool.display()))?;
    let pool = Arc::new(pool);
    let ready = Arc::new(AtomicBool::new(true));

    let agent_listener = tokio::net::TcpListener::bind(args.agent_listen)
        .await
        .map_err(|e| format!("agent API cannot listen on {}: {e}", args.agent_listen))?;
    let agent_addr = agent_listener.local_addr().map_err(|e| e.to_string())?;
    let csi_incoming = server::bind_unix(&socket).map_err(|e| format!("CSI endpoint {}: {e}", socket.display()))?;

    let agent = tonic::transport::Server::builder().layer(cinderblock::metrics::CallMetricsLayer)
        .add_service(VolumeManagerServer::new(AgentService::new(pool.clone(), args.node_id.clone())))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::TcpListenerStream::new(agent_listener), server::shutdown_signal());
    let csi = tonic::transport::Server::builder().layer(cinderblock::metrics::CallMetricsLayer)
        .add_service(IdentityServer::new(IdentityService::new(false, ready.clone())))
        .add_service(NodeServer::new(NodeService::new(NodeConfig {
            node_id: args.node_id.clone(),
            zone: args.zone.clone(),
            pool: pool.clone(),
            allowed_roots: args.allowed_roots.clone(),
            max_volumes: args.max_volumes,
        })))
        .serve_with_incoming_shutdown(csi_incoming, server::shutdown_signal());
    if let Some(addr) = args.metrics_addr {
        spawn_metrics(addr);
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
    if args.register {
        let client = cinderblock::kube::client(args.kubeconfig.as_deref()).await?;
        if zone.is_empty() {
            zone = cinderblock::kube::node_zone(&client, &args.node_id).await?.unwrap_or_default();
        }
        let store: Arc<dyn cinderblock::store::Store> = Arc::new(cinderblock::kube::KubeStore::new(client));
        let reg = cinderblock::controller::registration::Registration {
            node_id: args.node_id.clone(),
            zone: zone.clone(),
            agent_address: args.agent_advertise.clone().unwrap_or_else(|| format!("http://{agent_addr}")),
            max_volumes: args.max_volumes.max(0) as u32,
        };
        reg.report(&*store, &pool).await.map_err(|e| format!("registering node {}: {e}", args.node_id))?;
        let every = std::time::Duration::try_from_secs_f64(args.heartbeat_interval).map_err(|e| e.to_string())?;
        tokio::spawn(reg.run(store, pool.clone(), every));
    }
    info!(node.id = %args.node_id, zone = %zone, agent = %agent_addr, endpoint = %socket.display(), "node ready");
    let (a, c) = tokio::join!(agent, csi);
    let _ = std::fs::remove_file(&socket);
    a.map_err(|e| format!("agent server: {e}"))?;
    c.map_err(|e| format!("CSI server: {e}"))?;
    info!("node stopped");
    Ok(())
}

async fn run_bench(cmd: BenchCommand) -> Result<(), String> {
    match cmd {
        BenchCommand::Create { concurrency, count, nodes, data_dir } => {
            let tmp = std::env::temp_dir().join(format!("cinderblock-bench-create-{}", std::process::id()));
            let dir = data_dir.unwrap_or_else(|| tmp.clone());
            let sock = dir.join("csi.sock");
            let exe = std::env::current_exe().map_err(|e| e.to_string())?;
            let mut child = tokio::process::Command::new(exe)
                .args(["standalone", "--data-dir"]).arg(&dir)
                .args(["--nodes", &nodes.to_string(), "--endpoint"]).arg(format!("unix://{}", sock.display()))
                .env("RUST_LOG", "warn")
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| e.to_string())?;
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while tokio::net::UnixStream::connect(&sock).await.is_err() {
                if std::time::Instant::now() > deadline {
                    return Err("standalone did not start".into());
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            println!("{:>11} {:>7} {:>12} {:>10} {:>10}", "concurrency", "volumes", "volumes/s", "p50 ms", "p99 ms");
            for c in concurrency {
                let r = cinderblock::bench::create_volumes(&format!("unix://{}", sock.display()), c, count, &format!("c{c}")).await?;
                println!(
                    "{:>11} {:>7} {:>12.1} {:>10.2} {:>10.2}",
                    r.concurrency, r.count, r.count as f64 / r.elapsed.as_secs_f64(),
                    cinderblock::bench::ms(r.p50), cinderblock::bench::ms(r.p99)
                );
            }
            let _ = child.kill().await;
            if dir == tmp {
                let _ = std::fs::remove_dir_all(&tmp);
            }
            Ok(())
        }
        BenchCommand::Pool { pool, sizes_gib, runs, no_reflink } => {
            println!("{:<10} {:>8} {:>10} {:>14} {:>14} {:>14} {:>14}", "filesystem", "data", "method", "snapshot p50", "snapshot max", "clone p50", "clone max");
            for gib in sizes_gib {
                let dir = pool.clone();
                let r = tokio::task::spawn_blocking(move || cinderblock::bench::snapshot_and_clone(&dir, gib << 30, runs, !no_reflink))
                    .await
                    .map_err(|e| e.to_string())??;
                let fs = cinderblock::volume::Pool::open(&pool, PoolConfig::default()).map(|(p, _)| p.status().map(|s| s.filesystem).unwrap_or_default()).unwrap_or_default();
                let max = |v: &[std::time::Duration]| v.iter().max().copied().unwrap_or_default();
                use cinderblock::bench::{median, ms};
                println!(
                    "{:<10} {:>6}Gi {:>10} {:>11.2} ms {:>11.2} ms {:>11.2} ms {:>11.2} ms",
                    fs, r.data_bytes >> 30, if r.reflink { "reflink" } else { "copy" },
                    ms(median(&r.snapshot)), ms(max(&r.snapshot)), ms(median(&r.clone)), ms(max(&r.clone))
                );
            }
            Ok(())
        }
    }
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
    use cinderblock::controller::{ControllerConfig, ControllerService, Manager};
    use cinderblock::csi::controller_server::ControllerServer;
    let secs = seconds;
    let socket = server::unix_endpoint_path(&a.endpoint)?;
    let client = cinderblock::kube::client(a.kubeconfig.as_deref()).await?;
    let identity = a.identity.clone().unwrap_or_else(|| {
        let host = rustix::system::uname().nodename().to_string_lossy().into_owned();
        format!("{host}-{}", std::process::id())
    });
    let store: Arc<dyn cinderblock::store::Store> = Arc::new(cinderblock::kube::KubeStore::new(client.clone()));
    let config = ControllerConfig {
        heartbeat_timeout: secs(a.heartbeat_timeout, "heartbeat-timeout")?,
        stuck_grace: secs(a.stuck_grace, "stuck-grace")?,
        ..Default::default()
    };
    let events = Arc::new(cinderblock::kube::events::PvcEvents::new(client.clone(), identity.clone()));
    let mut manager = Manager::new(store, config).with_events(events);
    if a.leader_election {
        let rx = cinderblock::kube::leader::campaign(
            client.clone(),
            cinderblock::kube::leader::LeaderConfig {
                namespace: a.leader_election_namespace.clone(),
                lease_name: a.leader_election_lease.clone(),
                identity: identity.clone(),
                lease_duration: secs(a.lease_duration, "lease-duration")?,
                renew_every: secs(a.lease_duration / 3.0, "lease-duration")?,
            },
        );
        manager = manager.with_leader(rx);
    }
    tokio::spawn(manager.clone().run_reconciler(secs(a.reconcile_interval, "reconcile-interval")?));
    if let Some(addr) = a.metrics_addr {
        spawn_metrics(addr);
    }
    let incoming = server::bind_unix(&socket).map_err(|e| format!("CSI endpoint {}: {e}", socket.display()))?;
    let ready = Arc::new(AtomicBool::new(true));
    info!(endpoint = %socket.display(), identity = %identity, leader_election = a.leader_election, "controller ready");
    tonic::transport::Server::builder().layer(cinderblock::metrics::CallMetricsLayer)
        .add_service(IdentityServer::new(IdentityService::new(true, ready)))
        .add_service(ControllerServer::new(ControllerService::new(manager)))
        .serve_with_incoming_shutdown(incoming, server::shutdown_signal())
        .await
        .map_err(|e| format!("CSI server: {e}"))?;
    let _ = std::fs::remove_file(&socket);
    Ok(())
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
