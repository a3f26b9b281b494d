//! cinderblock: a CSI driver for node-local block volumes with a
//! Cinder-style control plane. See docs/design.md.

pub mod admin;
pub mod admin_proto;
pub mod agent;
pub mod agent_proto;
pub mod attach;
pub mod controller;
pub mod csi;
pub mod export;
pub mod flow;
pub mod identity;
pub mod keyed_locks;
pub mod kube;
pub mod memory;
pub mod metrics;
pub mod node;
pub mod pool_placement;
pub mod reconcile_report;
pub mod scheduler;
pub mod server;
pub mod standalone;
pub mod store;
pub mod tls;
pub mod units;
pub mod volume;

/// The CSI driver name (GetPluginInfo, StorageClass provisioner).
pub const DRIVER_NAME: &str = "cinderblock.dev";
pub const DRIVER_VERSION: &str = env!("CARGO_PKG_VERSION");
/// Topology keys this driver reports and honours.
pub const TOPOLOGY_NODE_KEY: &str = "topology.cinderblock.dev/node";
pub const TOPOLOGY_ZONE_KEY: &str = "topology.cinderblock.dev/zone";
