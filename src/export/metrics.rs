//! Per-export metrics: requests by command and result, bytes read and
//! written, request latency, open connections. Labelled by volume, never by
//! export name (the name is the capability that opens the export).
//!
//! Each export resolves its series once at registration, so a request costs
//! a few atomic adds, and removes them when it goes away.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::proto;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VolumeLabels {
    pub volume: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLabels {
    pub volume: String,
    pub command: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub volume: String,
    pub command: String,
    pub result: String,
}

fn latency_histogram() -> Histogram {
    // 10 µs .. ~5 s
    Histogram::new(exponential_buckets(0.000_01, 2.0, 20))
}

#[derive(Clone)]
pub struct ExportMetrics {
    requests: Family<ResultLabels, Counter>,
    seconds: Family<CommandLabels, Histogram, fn() -> Histogram>,
    read_bytes: Family<VolumeLabels, Counter>,
    written_bytes: Family<VolumeLabels, Counter>,
    connections: Family<VolumeLabels, Gauge>,
}

/// Commands counted separately; anything else counts as "other".
const COMMANDS: [u16; 6] =
    [proto::CMD_READ, proto::CMD_WRITE, proto::CMD_FLUSH, proto::CMD_TRIM, proto::CMD_WRITE_ZEROES, proto::CMD_BLOCK_STATUS];

impl ExportMetrics {
    /// Register the families in `registry` (the process's, under a prefix).
    pub fn register(registry: &mut Registry) -> ExportMetrics {
        let m = ExportMetrics {
            requests: Family::default(),
            seconds: Family::new_with_constructor(latency_histogram),
            read_bytes: Family::default(),
            written_bytes: Family::default(),
            connections: Family::default(),
        };
        registry.register("export_requests", "NBD requests served, by volume, command and result", m.requests.clone());
        registry.register("export_request_seconds", "Time from an NBD request's arrival to its reply", m.seconds.clone());
        registry.register("export_read_bytes", "Bytes read by NBD clients", m.read_bytes.clone());
        registry.register("export_written_bytes", "Bytes written by NBD clients (WRITE payloads)", m.written_bytes.clone());
        registry.register("export_connections", "Open NBD connections in transmission, by volume", m.connections.clone());
        m
    }

    /// Series for one export.
    pub fn for_volume(&self, volume: &str) -> VolumeStats {
        let v = VolumeLabels { volume: volume.to_string() };
        let per = |cmd: u16| {
            let command = proto::command_name(cmd).to_string();
            let r = |result: &str| {
                self.requests
                    .get_or_create(&ResultLabels { volume: volume.to_string(), command: command.clone(), result: result.into() })
                    .clone()
            };
            CommandStats {
                ok: r("ok"),
                error: r("error"),
                seconds: self.seconds.get_or_create(&CommandLabels { volume: volume.to_string(), command: command.clone() }).clone(),
            }
        };
        VolumeStats {
            commands: COMMANDS.map(per),
            read_bytes: self.read_bytes.get_or_create(&v).clone(),
            written_bytes: self.written_bytes.get_or_create(&v).clone(),
            connections: self.connections.get_or_create(&v).clone(),
        }
    }

    /// Drop an export's series once it is gone.
    pub fn forget(&self, volume: &str) {
        let v = VolumeLabels { volume: volume.to_string() };
        self.read_bytes.remove(&v);
        self.written_bytes.remove(&v);
        self.connections.remove(&v);
        for cmd in COMMANDS {
            let command = proto::command_name(cmd).to_string();
            for result in ["ok", "error"] {
                self.requests.remove(&ResultLabels { volume: volume.into(), command: command.clone(), result: result.into() });
            }
            self.seconds.remove(&CommandLabels { volume: volume.into(), command });
        }
    }
}

#[derive(Clone)]
pub struct CommandStats {
    pub ok: Counter,
    pub error: Counter,
    pub seconds: Histogram,
}

#[derive(Clone)]
pub struct VolumeStats {
    commands: [CommandStats; 6],
    pub read_bytes: Counter,
    pub written_bytes: Counter,
    pub connections: Gauge,
}

impl VolumeStats {
    pub fn command(&self, kind: u16) -> Option<&CommandStats> {
        COMMANDS.iter().position(|&c| c == kind).map(|i| &self.commands[i])
    }

    /// Requests answered with an error, every command.
    pub fn errors(&self) -> u64 {
        self.commands.iter().map(|c| c.error.get()).sum()
    }

    pub fn observe(&self, kind: u16, ok: bool, seconds: f64) {
        if let Some(c) = self.command(kind) {
            if ok {
                c.ok.inc()
            } else {
                c.error.inc()
            };
            c.seconds.observe(seconds);
        }
    }
}
