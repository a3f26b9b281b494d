//! The controller: records, Cinder's flows over the scheduler, the CSI
//! Controller service, node registration and the reconciler.

pub mod agents;
pub mod inflight;
pub mod manager;
pub mod records;
pub mod registration;
pub mod service;

pub use manager::{ControllerConfig, Manager};
pub use service::ControllerService;
