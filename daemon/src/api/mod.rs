//! How the outside reaches the agent: the gRPC service (`grpc`), the unix socket (`server`), the
//! metrics endpoint (`http`), and the bounded TCP ports the metrics and health services use
//! (`ports`).

pub mod grpc;
pub mod http;
pub mod ports;
pub mod server;
