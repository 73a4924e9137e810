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

/// Longest CNI network name the agent records for an attachment.
pub const MAX_NETWORK_NAME: usize = 80;

/// A CNI network name (the conflist's `name`) as the agent records it with an attachment and
/// as GC compares it: the characters the CNI spec allows in a name (`[A-Za-z0-9_.-]`) and at
/// most [`MAX_NETWORK_NAME`] of them. Both sides call this, so a name outside the spec's
/// grammar still matches itself.
pub fn network_name(raw: &str) -> String {
    raw.chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        .take(MAX_NETWORK_NAME)
        .collect()
}

/// Response metadata key naming the input an `InvalidArgument` status is about, e.g.
/// `annotation:sluice.dev/outbound-port` or `netns`.
pub const FIELD_METADATA_KEY: &str = "sluice-field";

/// Every time limit on a pod's path, in one place and derived from one another, so that the
/// component that gives up first is the one that can say why:
///
/// ```text
/// plugin timeout (conflist timeoutMs, default PLUGIN_TIMEOUT = 5 s; the installer writes it)
///  └─ sent as grpc-timeout → agent deadline = 9/10 of it (agent_deadline; ≤ MAX_AGENT_DEADLINE)
///      ├─ waiting for a worker: counts against the agent deadline
///      └─ each kernel step (one netlink answer): ≤ KERNEL_STEP, and never past the agent
///         deadline less KERNEL_MARGIN, so a hung step is reported naming the step, inside the
///         agent's answer, inside the plugin's timeout
/// ```
pub mod deadlines {
    use std::time::Duration;

    /// How long one plugin call to the agent may take, connecting included, when the
    /// conflist's `timeoutMs` does not say; the installer writes this value too. Long enough
    /// for a node starting many pods at once (the agent queues them), short enough that a
    /// runtime retrying code 11 starts the pod soon after the agent is back.
    pub const PLUGIN_TIMEOUT: Duration = Duration::from_millis(5000);

    /// The longest a plugin call waits, whatever `timeoutMs` says: the agent never works on a
    /// call longer than [`MAX_AGENT_DEADLINE`], so waiting past a minute only holds the
    /// runtime's CNI lock. (A huge value once reached tonic, which panics on a `grpc-timeout`
    /// it cannot encode, and the plugin died instead of answering.)
    pub const MAX_PLUGIN_TIMEOUT: Duration = Duration::from_secs(60);

    /// The plugin's timeout for a conflist's `timeoutMs`: absent or 0 is the default,
    /// anything above [`MAX_PLUGIN_TIMEOUT`] is that.
    pub fn plugin_timeout(timeout_ms: Option<u64>) -> Duration {
        match timeout_ms {
            None | Some(0) => PLUGIN_TIMEOUT,
            Some(ms) => Duration::from_millis(ms).min(MAX_PLUGIN_TIMEOUT),
        }
    }

    /// The longest the agent works on a call whose caller sets no deadline (`sluicectl`).
    pub const MAX_AGENT_DEADLINE: Duration = Duration::from_secs(30);

    /// The agent's deadline for a caller that gives up after `caller`: nine tenths of it, so
    /// the agent's own answer, saying what took too long, arrives before the caller's timer
    /// fires; never more than [`MAX_AGENT_DEADLINE`].
    pub fn agent_deadline(caller: Duration) -> Duration {
        (caller * 9 / 10).min(MAX_AGENT_DEADLINE)
    }

    /// The longest one kernel step (one netlink answer) may take. The kernel answers nf_tables
    /// batches and rtnetlink requests inside the `sendmsg` call, so waiting longer means no
    /// answer is coming, never that the kernel is slow.
    pub const KERNEL_STEP: Duration = Duration::from_secs(2);

    /// Time kept back from the agent deadline when bounding a kernel step: enough to report
    /// the step (and roll back) before the deadline passes.
    pub const KERNEL_MARGIN: Duration = Duration::from_millis(200);

    /// The bound on a kernel step when `left` remains of the call's deadline.
    pub fn kernel_step(left: Duration) -> Duration {
        left.saturating_sub(KERNEL_MARGIN)
            .min(KERNEL_STEP)
            .max(Duration::from_millis(1))
    }

    // With the default timeout a hung step is always reported by the agent, naming it, with
    // room left for the rollback step that follows it.
    const _: () = assert!(
        2 * KERNEL_STEP.as_millis() + KERNEL_MARGIN.as_millis()
            < PLUGIN_TIMEOUT.as_millis() * 9 / 10
    );

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn each_bound_sits_inside_the_one_above_it() {
            let agent = agent_deadline(PLUGIN_TIMEOUT);
            assert_eq!(agent, Duration::from_millis(4500));
            assert!(KERNEL_STEP < agent);
            assert_eq!(kernel_step(agent), KERNEL_STEP);
            // A short caller timeout shrinks the step instead of outliving the deadline.
            let short = agent_deadline(Duration::from_millis(1000));
            assert_eq!(kernel_step(short), Duration::from_millis(700));
            assert_eq!(kernel_step(Duration::ZERO), Duration::from_millis(1));
            assert_eq!(
                agent_deadline(Duration::from_secs(3600)),
                MAX_AGENT_DEADLINE
            );
            assert!(agent_deadline(MAX_PLUGIN_TIMEOUT) <= MAX_AGENT_DEADLINE);
        }

        #[test]
        fn a_conflist_timeout_is_read_within_bounds() {
            assert_eq!(plugin_timeout(None), PLUGIN_TIMEOUT);
            assert_eq!(plugin_timeout(Some(0)), PLUGIN_TIMEOUT);
            assert_eq!(plugin_timeout(Some(250)), Duration::from_millis(250));
            assert_eq!(plugin_timeout(Some(u64::MAX)), MAX_PLUGIN_TIMEOUT);
        }
    }
}

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

    /// The code for an agent status: its gRPC code and the field it names
    /// ([`super::FIELD_METADATA_KEY`]). Transient conditions (unavailable, deadline, saturation,
    /// the agent short of threads or file descriptors) are 11, which runtimes retry.
    pub fn of_status(code: tonic::Code, field: &str) -> u32 {
        use tonic::Code;
        match code {
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
    /// Written by Kuma's webhook (≥ 2.9) on every pod it injects: the transparent-proxy
    /// configuration, YAML.
    pub const KUMA_CONFIG: &str = "traffic.kuma.io/transparent-proxy-config";
    /// Written by consul-k8s's webhook for its CNI plugin on every transparent-proxy pod: the
    /// redirect configuration, JSON.
    pub const CONSUL_CONFIG: &str = "consul.hashicorp.com/redirect-traffic-config";
    /// Mesh annotations whose presence forwards a pod (the agent decides whether the profile
    /// is enabled).
    pub const PROFILE_TRIGGERS: [&str; 4] = [
        ISTIO_STATUS,
        LINKERD_PROXY_VERSION,
        KUMA_CONFIG,
        CONSUL_CONFIG,
    ];

    /// Whether these pod annotations ask for sluice: `sluice.dev/redirect` with any value but
    /// `disabled` (a typo in the value is then rejected by the agent instead of silently
    /// leaving the pod uncaptured), or a mesh injector's annotation while not explicitly
    /// disabled. The plugin's gate (which pods reach the agent at all) and the reconciler's
    /// (which sandboxes it looks at) are this one function.
    pub fn opted_in<'a>(get: impl Fn(&str) -> Option<&'a str>) -> bool {
        match get(REDIRECT) {
            Some("disabled") => false,
            Some(_) => true,
            None => PROFILE_TRIGGERS.iter().any(|k| get(k).is_some()),
        }
    }
}
