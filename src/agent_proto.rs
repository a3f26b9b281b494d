//! Types and service stubs generated from `proto/agent.proto`.
#![allow(clippy::all, clippy::pedantic, missing_docs)]
tonic::include_proto!("cinderblock.agent.v1");
