//! The `sluice.v1` gRPC API, generated from `sluice/v1/agent.proto` at build time.
#![forbid(unsafe_code)]
#![allow(missing_debug_implementations, clippy::all)]

/// Generated types and the tonic client/server for `sluice.v1.Agent`.
pub mod v1 {
    tonic::include_proto!("sluice.v1");
}

/// Response metadata key naming the input an `InvalidArgument` status is about, e.g.
/// `annotation:sluice.dev/outbound-port` or `netns`.
pub const FIELD_METADATA_KEY: &str = "sluice-field";
