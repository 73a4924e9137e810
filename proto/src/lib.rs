//! The `sluice.v1` gRPC API, generated from `sluice/v1/agent.proto` at build time.
#![forbid(unsafe_code)]
#![allow(missing_debug_implementations, clippy::all)]

/// Generated types and the tonic client/server for `sluice.v1.Agent`.
pub mod v1 {
    tonic::include_proto!("sluice.v1");
}

/// A CRI v1 client (`runtime.v1.RuntimeService` / `ImageService`), generated from the vendored
/// Kubernetes CRI API; only with feature `cri` (tests and benchmark drive containerd with it).
#[cfg(feature = "cri")]
pub mod cri {
    tonic::include_proto!("runtime.v1");
}

/// Response metadata key naming the input an `InvalidArgument` status is about, e.g.
/// `annotation:sluice.dev/outbound-port` or `netns`.
pub const FIELD_METADATA_KEY: &str = "sluice-field";

/// The annotation keys both sides must agree on: the plugin forwards a pod to the agent only
/// when one of these says so, and the agent plans from them.
pub mod annotations {
    /// Native opt-in (`enabled` / `disabled`).
    pub const REDIRECT: &str = "sluice.dev/redirect";
    /// Set by the Istio injector on every sidecar pod.
    pub const ISTIO_STATUS: &str = "sidecar.istio.io/status";
    /// Set by the Linkerd injector on every meshed pod.
    pub const LINKERD_PROXY_VERSION: &str = "linkerd.io/proxy-version";
    /// Mesh annotations whose presence forwards a pod (the agent decides whether the profile
    /// is enabled).
    pub const PROFILE_TRIGGERS: [&str; 2] = [ISTIO_STATUS, LINKERD_PROXY_VERSION];
}
