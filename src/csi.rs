//! Types and service stubs generated from `proto/csi.proto` (CSI v1.12).
#![allow(clippy::all, clippy::pedantic, missing_docs)]
tonic::include_proto!("csi.v1");
