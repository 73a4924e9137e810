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

/// CNI error codes: the spec's, and sluice's own (100+). The plugin answers with them; the
/// agent labels its failure metrics with the one the runtime will see.
pub mod cni_code {
    /// CNI spec: the config's cniVersion is not one we support.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// CNI spec: the container (its netns) is unknown or does not exist.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// CNI spec: a required environment variable is missing or malformed.
    pub const INVALID_ENV: u32 = 4;
    /// CNI spec: stdin could not be decoded.
    pub const DECODE_FAILURE: u32 = 6;
    /// CNI spec: the network config (here: a pod annotation) is invalid.
    pub const INVALID_CONFIG: u32 = 7;
    /// CNI spec: transient; the runtime should retry (the agent is unreachable or timed out).
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// CNI spec (STATUS): the plugin cannot serve new pods.
    pub const NOT_AVAILABLE: u32 = 50;
    /// sluice: CHECK found our table missing or different from the plan.
    pub const DRIFT: u32 = 100;
    /// sluice: the agent failed while programming the pod (see the message).
    pub const AGENT_FAILED: u32 = 101;
    /// sluice: the agent refused this plugin's credentials (SO_PEERCRED allow-list).
    pub const PERMISSION_DENIED: u32 = 102;

    /// The code for an agent status: its gRPC code, the field it names
    /// ([`super::FIELD_METADATA_KEY`]), and whether it was made on the client side from a
    /// broken connection (`transport`: the call may or may not have been applied).
    pub fn of_status(code: tonic::Code, field: &str, transport: bool) -> u32 {
        use tonic::Code;
        match code {
            Code::Unknown | Code::Cancelled | Code::Internal if transport => TRY_AGAIN_LATER,
            Code::InvalidArgument if matches!(field, "netns" | "container_id") => INVALID_ENV,
            Code::InvalidArgument => INVALID_CONFIG,
            Code::NotFound if field == "netns" => UNKNOWN_CONTAINER,
            Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted => TRY_AGAIN_LATER,
            Code::PermissionDenied => PERMISSION_DENIED,
            _ => AGENT_FAILED,
        }
    }
}

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
