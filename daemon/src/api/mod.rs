//! How the outside reaches the agent: the gRPC service (`grpc`), the unix socket server with
//! the health service and the metrics endpoint (`server`), and the bounded TCP ports
//! (`ports`).

pub mod grpc;
pub mod ports;
pub mod server;
