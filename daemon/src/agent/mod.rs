//! What the agent decides: the verbs — attach, detach, check, explain — as plain Rust over
//! [`AgentError`], with the records of what is attached (`registry`) and the admission and
//! per-container ordering of kernel work (`work`). The gRPC service (`api::grpc`) and the
//! reconciler (`node::reconcile`) both call these; neither is called from here.

mod attach;
mod check;
mod detach;
mod error;
mod explain;
pub mod registry;
pub mod work;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use sluice_proto::v1::{ListResponse, StatusResponse};

pub use error::AgentError;
pub use explain::explain_under;

use crate::kernel::capture::Want;
use crate::kernel::netns::{self, PodNetns};
use crate::metrics::Metrics;
use crate::model::plan::{Families, PlanDefaults};
use crate::model::ruleset::Attached;
use registry::{Record, Registry};

/// The running agent: its records, the admission of kernel work, and what discovery found.
#[derive(Debug)]
pub struct Agent {
    /// The node's plan defaults (ports, profiles, sysctl consent, override policy).
    defaults: PlanDefaults,
    policy: netns::Policy,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    install: InstallState,
    /// Admission and per-container ordering of kernel work.
    work: work::Work,
    /// How sandbox discovery is doing (see `reconcile`), for Status.
    discovery: std::sync::Mutex<String>,
    /// The runtime's READY sandboxes as of the last discovery pass, by id (Check of a pod
    /// that was never captured).
    sandboxes: std::sync::Mutex<std::collections::HashMap<String, Sandbox>>,
    /// When the last DEL of each container arrived (recent ones only): the reconciler never
    /// re-captures a pod whose DEL came after its snapshot.
    detached: std::sync::Mutex<std::collections::HashMap<String, Instant>>,
    /// The ids of READY sandboxes that do not ask for capture, as of the last pass.
    not_asking: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// One READY pod sandbox with its own network namespace, as the container runtime reports it
/// (`node::discovery` finds them; Check of a pod never captured looks here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sandbox {
    pub id: String,
    pub pod: sluice_proto::v1::PodRef,
    pub annotations: BTreeMap<String, String>,
    /// The netns path; `None` when the runtime does not say (the sandbox is then skipped).
    pub netns: Option<String>,
    /// The pod's addresses.
    pub ips: Vec<String>,
}

/// Whether the node install (binary + chained config) is in place: `Err(why)` until it is.
/// Always `Ok` when the agent was not asked to install.
pub type InstallState = Arc<std::sync::Mutex<Result<(), String>>>;

impl Agent {
    pub fn new(
        defaults: PlanDefaults,
        policy: netns::Policy,
        metrics: Arc<Metrics>,
        install: InstallState,
    ) -> Self {
        Self {
            defaults,
            policy,
            registry: Arc::default(),
            metrics,
            install,
            work: work::Work::default(),
            sandboxes: std::sync::Mutex::default(),
            detached: std::sync::Mutex::default(),
            not_asking: std::sync::Mutex::default(),
            discovery: std::sync::Mutex::new(
                "off: no CRI socket configured; the agent works from the plugin's calls alone"
                    .to_owned(),
            ),
        }
    }

    pub fn defaults(&self) -> &PlanDefaults {
        &self.defaults
    }

    pub fn policy(&self) -> &netns::Policy {
        &self.policy
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Records how sandbox discovery is doing (Status shows it).
    pub fn set_discovery(&self, status: String) {
        *self.discovery.lock().unwrap_or_else(|p| p.into_inner()) = status;
    }

    pub fn discovery_status(&self) -> String {
        self.discovery
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Keeps the runtime's READY sandboxes of the last pass: those asking for capture, and
    /// the ids of the others (what Check needs to answer for them).
    pub fn set_sandboxes(&self, list: &[Sandbox], not_asking: &[String]) {
        *self.sandboxes.lock().unwrap_or_else(|p| p.into_inner()) =
            list.iter().map(|s| (s.id.clone(), s.clone())).collect();
        *self.not_asking.lock().unwrap_or_else(|p| p.into_inner()) =
            not_asking.iter().cloned().collect();
    }

    /// Whether the last pass listed `id` as a READY sandbox that does not ask for capture.
    fn does_not_ask(&self, id: &str) -> bool {
        self.not_asking
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(id)
    }

    fn sandbox(&self, id: &str) -> Option<Sandbox> {
        self.sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// Sets the attached-pods gauge from the records.
    pub fn refresh_attached_gauge(&self) {
        self.metrics.attached_pods.set(self.registry.pods() as i64);
    }

    /// Runs `work` for container `id` under the same admission and per-container lock as the
    /// RPCs (the reconciler's repairs never interleave with the plugin's verbs on that pod).
    pub async fn run_for<T, F>(&self, id: &str, work: F) -> Result<T, work::WorkError>
    where
        T: Send + 'static,
        F: std::future::Future<Output = T> + Send + 'static,
    {
        self.work.run(id, work).await
    }

    /// Ready to program new pods: the install is in place and the kernel path works.
    pub fn readiness(&self) -> Result<(), String> {
        let install = self
            .install
            .lock()
            .map_or_else(|p| p.into_inner().clone(), |g| g.clone());
        install.map_err(|why| format!("install not done: {why}"))?;
        readiness()
    }

    /// Kernel work running and waiting now.
    pub fn load(&self) -> (usize, usize) {
        self.work.load()
    }

    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// What the agent says of itself (`sluicectl status`, CNI STATUS with statusRequiresAgent).
    pub fn status(&self) -> StatusResponse {
        let (ready, reason) = match self.readiness() {
            Ok(()) => (true, String::new()),
            Err(reason) => (false, reason),
        };
        StatusResponse {
            ready,
            reason,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            attached: self.registry.len() as u32,
            discovery: self.discovery_status(),
        }
    }

    pub fn list(&self) -> ListResponse {
        ListResponse {
            attachments: self.registry.list(),
        }
    }

    fn open(&self, path: &str) -> Result<PodNetns, AgentError> {
        self.policy.open(path).map_err(AgentError::netns)
    }
}

impl Agent {
    /// What the pod asks for, under this node's defaults.
    fn want(&self, annotations: BTreeMap<String, String>, pod_uid: &str, id: &str) -> Want {
        Want {
            annotations,
            defaults: self.defaults.clone(),
            pod_uid: pod_uid.to_owned(),
            container_id: id.to_owned(),
        }
    }

    /// Marks that a DEL of `id` arrived (see [`Agent::detached_since`]).
    fn note_detach(&self, id: &str) {
        let mut tombs = self.detached.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        // Bounded: a DEL older than any pass still running is of no use.
        tombs.retain(|_, at| now.duration_since(*at) < DETACH_MEMORY);
        tombs.insert(id.to_owned(), now);
    }

    /// Whether a DEL of `id` arrived at or after `since`: the reconciler, holding the pod's
    /// lock, then leaves the pod alone (it is being deleted; its snapshot is stale).
    pub fn detached_since(&self, id: &str, since: Instant) -> bool {
        self.detached
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .is_some_and(|at| *at >= since)
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn required(field: &str, value: &str) -> Result<(), AgentError> {
    if value.is_empty() {
        Err(AgentError::invalid(field, "is required"))
    } else {
        Ok(())
    }
}

/// The pod's addresses, given as `10.1.0.5/24` (prevResult form) or `10.1.0.5`.
pub(crate) fn pod_ips(ips: &[String]) -> Result<Vec<IpAddr>, AgentError> {
    ips.iter()
        .map(|s| {
            s.parse::<IpNet>()
                .map(|n| n.addr())
                .or_else(|_| s.parse::<IpAddr>())
                .map_err(|_| {
                    let excerpt: String = s.chars().take(64).collect();
                    AgentError::invalid(
                        "pod_ips",
                        format!("{excerpt:?} is not an IP address or CIDR"),
                    )
                })
        })
        .collect()
}

/// A recorded attachment as the kernel's owner counts it.
pub fn attached(record: &Record) -> Attached {
    let ips: Vec<IpAddr> = pod_ips(&record.pod_ips).unwrap_or_default();
    Attached::new(
        &record.attachment.ifname,
        &record.attachment.network,
        Families::present(&ips),
    )
}

fn to_map(m: std::collections::HashMap<String, String>) -> BTreeMap<String, String> {
    m.into_iter().collect()
}

/// A metrics label for a failed call.
/// The interface a sandbox's primary network is attached on when nothing says otherwise.
const DEFAULT_IFNAME: &str = "eth0";

/// How long the agent remembers that a DEL arrived (see [`Agent::detached_since`]):
/// longer than any reconcile pass.
const DETACH_MEMORY: Duration = Duration::from_secs(600);

/// Whether this agent can program new pods: it holds the capabilities its hot path needs and
/// nf_tables answers.
pub fn readiness() -> Result<(), String> {
    use caps::{CapSet, Capability};
    for cap in [Capability::CAP_NET_ADMIN, Capability::CAP_SYS_ADMIN] {
        if !caps::has_cap(None, CapSet::Effective, cap).unwrap_or(false) {
            return Err(format!("missing capability {cap}"));
        }
    }
    match crate::kernel::probe::get() {
        None => return Err("probing the kernel (started with the agent)".to_owned()),
        Some(Err(e)) => return Err(format!("probing the kernel failed: {e}")),
        Some(Ok(features)) => features.required()?,
    }
    crate::kernel::nft::probe().map_err(|e| e.to_string())
}
