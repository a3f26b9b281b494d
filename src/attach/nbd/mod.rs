//! Remote attach over NBD: our protocol client, and the engines that turn an
//! export into a local block device (see docs/nbd.md).

pub mod cli;
pub mod client;

pub use client::{Client, ClientTls, ExportInfo, NbdError, Target};
