//! Types and service stubs generated from `proto/admin.proto`.
#![allow(clippy::all, clippy::pedantic, missing_docs)]
tonic::include_proto!("cinderblock.admin.v1");
