//! Prometheus metrics (OpenMetrics text on `/metrics`): CSI and agent calls
//! by method and code with latency, flow reverts and reschedules, scheduler
//! decision time, pool capacity per node, records by phase.
//!
//! One process-wide registry: metrics are the process's own state, not
//! configuration, and every service of the process reports into it.

use std::sync::LazyLock;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub service: String,
    pub method: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub service: String,
    pub method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FlowLabels {
    pub flow: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RecordLabels {
    pub kind: String,
    pub phase: String,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 18))
}

pub struct Metrics {
    registry: Registry,
    pub calls: Family<CallLabels, Counter>,
    pub call_seconds: Family<MethodLabels, Histogram, fn() -> Histogram>,
    pub flow_reverts: Family<FlowLabels, Counter>,
    pub reschedules: Counter,
    pub scheduler_seconds: Histogram,
    pub pool_total_bytes: Family<PoolLabels, Gauge>,
    pub pool_free_bytes: Family<PoolLabels, Gauge>,
    pub pool_provisioned_bytes: Family<PoolLabels, Gauge>,
    pub records: Family<RecordLabels, Gauge>,
    /// 1 while a node's agent answered as another node or pool.
    pub node_mismatched: Family<PoolLabels, Gauge>,
    /// Images on a node that no record places there (last reconciler pass).
    pub orphan_candidates: Family<PoolLabels, Gauge>,
    /// Reconciler passes the circuit breaker held, per node.
    pub breaker_held: Family<PoolLabels, Counter>,
    /// Images in a node's orphaned/ folder.
    pub pool_orphans: Family<PoolLabels, Gauge>,
    /// The NBD server's per-export series (`crate::export::metrics`).
    pub export: crate::export::metrics::ExportMetrics,
    /// Durable transactions of the embedded store, and the writes they
    /// carried (group commit: writes / commits is the batch size).
    pub store_commits: Counter,
    pub store_writes: Counter,
    /// Folder fsyncs a pool asked for, and those it really made (the rest
    /// rode on a sync that started after them).
    pub folder_sync_requests: Counter,
    pub folder_syncs: Counter,
    pub journal_appends: Counter,
    pub journal_syncs: Counter,
    /// CSI calls a standby controller replica handed to the leader, by
    /// method (a sidecar leading beside a standby; controller/forward.rs).
    pub forwarded_calls: Family<MethodLabels, Counter>,
    /// Bytes a node's cross-node copies (restore or clone from another
    /// node's export) wrote into their new volumes, by the copying node.
    pub volume_copy_bytes: Family<PoolLabels, Counter>,
}

pub static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    let mut registry = Registry::with_prefix("cinderblock");
    let calls = Family::<CallLabels, Counter>::default();
    registry.register("grpc_calls", "gRPC calls served, by service, method and status code", calls.clone());
    let call_seconds = Family::<MethodLabels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
    registry.register("grpc_call_seconds", "Time to answer a gRPC call", call_seconds.clone());
    let flow_reverts = Family::<FlowLabels, Counter>::default();
    registry.register("flow_reverts", "Flows that failed and reverted their finished tasks", flow_reverts.clone());
    let reschedules = Counter::default();
    registry.register("reschedules", "Volume creations moved to another node after a node failed", reschedules.clone());
    let scheduler_seconds = Histogram::new(exponential_buckets(0.000_001, 2.0, 22));
    registry.register("scheduler_decision_seconds", "Time the scheduler takes to pick a node", scheduler_seconds.clone());
    let pool_total_bytes = Family::<PoolLabels, Gauge>::default();
    registry.register("pool_total_bytes", "Size of a node's pool filesystem", pool_total_bytes.clone());
    let pool_free_bytes = Family::<PoolLabels, Gauge>::default();
    registry.register("pool_free_bytes", "Free bytes in a node's pool", pool_free_bytes.clone());
    let pool_provisioned_bytes = Family::<PoolLabels, Gauge>::default();
    registry.register("pool_provisioned_bytes", "Sum of volume and snapshot sizes in a node's pool", pool_provisioned_bytes.clone());
    let records = Family::<RecordLabels, Gauge>::default();
    registry.register("records", "Volume and snapshot records by phase (controller)", records.clone());
    let node_mismatched = Family::<PoolLabels, Gauge>::default();
    registry.register(
        "node_mismatched",
        "1 while a node's agent answered as another node or pool; nothing is written there",
        node_mismatched.clone(),
    );
    let orphan_candidates = Family::<PoolLabels, Gauge>::default();
    registry.register(
        "reconciler_orphan_candidates",
        "Images on a node that no record places there, at the last reconciler pass",
        orphan_candidates.clone(),
    );
    let forwarded_calls = Family::<MethodLabels, Counter>::default();
    registry.register(
        "controller_forwarded_calls",
        "CSI calls a standby controller replica handed to the leader (its sidecar leads beside a standby)",
        forwarded_calls.clone(),
    );
    let volume_copy_bytes = Family::<PoolLabels, Counter>::default();
    registry.register(
        "volume_copy_bytes",
        "Allocated bytes copied from another node's export into new volumes (cross-node restore and clone), by the copying node",
        volume_copy_bytes.clone(),
    );
    let breaker_held = Family::<PoolLabels, Counter>::default();
    registry.register(
        "reconciler_breaker_held",
        "Reconciler passes on a node that the circuit breaker held (too many images without a record)",
        breaker_held.clone(),
    );
    let pool_orphans = Family::<PoolLabels, Gauge>::default();
    registry.register("pool_orphans", "Images kept in a node's orphaned/ folder", pool_orphans.clone());
    let export = crate::export::metrics::ExportMetrics::register(&mut registry);
    let store_commits = Counter::default();
    registry.register("store_commits", "Durable write transactions of the embedded store", store_commits.clone());
    let store_writes = Counter::default();
    registry.register("store_writes", "Writes committed by the embedded store (several share a transaction)", store_writes.clone());
    let folder_sync_requests = Counter::default();
    registry.register("pool_folder_sync_requests", "Folder fsyncs the pools asked for", folder_sync_requests.clone());
    let folder_syncs = Counter::default();
    registry.register(
        "pool_folder_syncs",
        "Folder fsyncs the pools made (one covers every request made before it started)",
        folder_syncs.clone(),
    );
    let journal_appends = Counter::default();
    registry.register(
        "pool_journal_appends",
        "Records of new volumes and snapshots appended to the pools' journals",
        journal_appends.clone(),
    );
    let journal_syncs = Counter::default();
    registry.register(
        "pool_journal_syncs",
        "Journal fdatasyncs the pools made (one covers every append made before it started)",
        journal_syncs.clone(),
    );
    Metrics {
        registry,
        volume_copy_bytes,
        store_commits,
        store_writes,
        folder_sync_requests,
        folder_syncs,
        journal_appends,
        journal_syncs,
        calls,
        call_seconds,
        flow_reverts,
        reschedules,
        scheduler_seconds,
        pool_total_bytes,
        pool_free_bytes,
        pool_provisioned_bytes,
        records,
        node_mismatched,
        orphan_candidates,
        breaker_held,
        pool_orphans,
        export,
        forwarded_calls,
    }
});

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("metrics encode to a String");
        out
    }

    pub fn observe_call(&self, path: &str, code: &str, started: Instant) {
        // "/csi.v1.Controller/CreateVolume" -> ("csi.v1.Controller", "CreateVolume")
        let mut parts = path.trim_start_matches('/').splitn(2, '/');
        let service = parts.next().unwrap_or_default().to_string();
        let method = parts.next().unwrap_or_default().to_string();
        self.calls.get_or_create(&CallLabels { service: service.clone(), method: method.clone(), code: code.to_string() }).inc();
        self.call_seconds.get_or_create(&MethodLabels { service, method }).observe(started.elapsed().as_secs_f64());
    }

    pub fn set_pool(&self, node: &str, total: u64, free: u64, provisioned: u64) {
        let l = PoolLabels { node: node.to_string() };
        self.pool_total_bytes.get_or_create(&l).set(total as i64);
        self.pool_free_bytes.get_or_create(&l).set(free as i64);
        self.pool_provisioned_bytes.get_or_create(&l).set(provisioned as i64);
    }
}

/// gRPC status code names as the spec writes them.
pub fn code_name(code: &str) -> &'static str {
    match code.parse::<i32>().map(tonic::Code::from) {
        Ok(tonic::Code::Ok) => "OK",
        Ok(tonic::Code::Cancelled) => "CANCELLED",
        Ok(tonic::Code::Unknown) => "UNKNOWN",
        Ok(tonic::Code::InvalidArgument) => "INVALID_ARGUMENT",
        Ok(tonic::Code::DeadlineExceeded) => "DEADLINE_EXCEEDED",
        Ok(tonic::Code::NotFound) => "NOT_FOUND",
        Ok(tonic::Code::AlreadyExists) => "ALREADY_EXISTS",
        Ok(tonic::Code::PermissionDenied) => "PERMISSION_DENIED",
        Ok(tonic::Code::ResourceExhausted) => "RESOURCE_EXHAUSTED",
        Ok(tonic::Code::FailedPrecondition) => "FAILED_PRECONDITION",
        Ok(tonic::Code::Aborted) => "ABORTED",
        Ok(tonic::Code::OutOfRange) => "OUT_OF_RANGE",
        Ok(tonic::Code::Unimplemented) => "UNIMPLEMENTED",
        Ok(tonic::Code::Internal) => "INTERNAL",
        Ok(tonic::Code::Unavailable) => "UNAVAILABLE",
        Ok(tonic::Code::DataLoss) => "DATA_LOSS",
        Ok(tonic::Code::Unauthenticated) => "UNAUTHENTICATED",
        Err(_) => "UNKNOWN",
    }
}

/// A tower layer for tonic servers that counts every call by method and
/// code and times it. Errors travel as trailers-only responses (the status
/// in the headers); a response without grpc-status in its headers succeeded.
#[derive(Clone, Default)]
pub struct CallMetricsLayer;

impl<S> tower::Layer<S> for CallMetricsLayer {
    type Service = CallMetrics<S>;
    fn layer(&self, inner: S) -> Self::Service {
        CallMetrics { inner }
    }
}

#[derive(Clone)]
pub struct CallMetrics<S> {
    inner: S,
}

impl<S, B, RB> tower::Service<http::Request<B>> for CallMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>> + Send,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path().to_string();
        let started = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await;
            let code = match &res {
                Ok(r) => r.headers().get("grpc-status").and_then(|v| v.to_str().ok()).map(code_name).unwrap_or("OK"),
                Err(_) => "UNAVAILABLE",
            };
            METRICS.observe_call(&path, code, started);
            res
        })
    }
}

/// Serve `/metrics` on `addr` until the process stops.
pub async fn serve(addr: std::net::SocketAddr) -> Result<(), String> {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(|| async { ([(http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], METRICS.encode()) }),
    );
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("metrics cannot listen on {addr}: {e}"))?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    tracing::info!("metrics on http://{bound}/metrics");
    axum::serve(listener, app).with_graceful_shutdown(crate::server::shutdown_signal()).await.map_err(|e| format!("metrics server: {e}"))
}
