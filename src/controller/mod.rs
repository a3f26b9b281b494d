//! The controller: records, Cinder's flows over the scheduler, the CSI
//! Controller service (with forwarding between replicas) and the reconciler.

pub mod agents;
mod create;
mod crossnode;
mod delete;
pub mod error;
pub mod evacuate;
mod expand;
pub mod forward;
mod group;
pub mod group_service;
pub mod health;
pub mod inflight;
pub mod listing;
pub mod manager;
pub mod migrate;
pub mod publications;
pub mod publish;
pub mod reconciler;
pub mod records;
pub mod service;
mod snapshot;

pub use error::ControllerError;
pub use group_service::GroupControllerService;
pub use manager::{ControllerConfig, Leadership, Manager};
pub use reconciler::ReconcileReport;
pub use service::ControllerService;
