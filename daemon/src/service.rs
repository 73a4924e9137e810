//! The `sluice.v1.Agent` gRPC service: validate → plan (pure) → render → netns worker →
//! kernel → reply. Every error names the input it is about.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ipnet::IpNet;
use sluice_proto::FIELD_METADATA_KEY;
use sluice_proto::v1::agent_server::Agent;
use sluice_proto::v1::{
    AttachRequest, AttachResponse, AttachTiming, Attachment, CheckRequest, CheckResponse,
    DetachRequest, DetachResponse, ExplainRequest, ExplainResponse, ListRequest, ListResponse,
    Outcome, StatusRequest, StatusResponse,
};
use tonic::{Request, Response, Status};

use sluice_proto::deadlines;

use crate::config::AgentConfig;
use crate::metrics::Metrics;
use crate::netns::{self, NetnsError, PodNetns};
use crate::plan::{self, Decision, Families, PlanError};
use crate::program::Want;
use crate::registry::{Record, Registry, pod_or_default};
use crate::ruleset::{Attached, Owner, Ruleset};
use crate::{nft, program};

/// Shared state of the running agent.
#[derive(Debug)]
pub struct AgentService {
    config: AgentConfig,
    policy: netns::Policy,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    install: InstallState,
    /// Admission and per-container ordering of kernel work.
    work: crate::work::Work,
    /// How sandbox discovery is doing (see `reconcile`), for Status.
    discovery: std::sync::Mutex<String>,
    /// The runtime's READY sandboxes as of the last discovery pass, by id (Check of a pod
    /// that was never captured).
    sandboxes: std::sync::Mutex<std::collections::HashMap<String, crate::discovery::Sandbox>>,
    /// When the last DEL of each container arrived (recent ones only): the reconciler never
    /// re-captures a pod whose DEL came after its snapshot.
    detached: std::sync::Mutex<std::collections::HashMap<String, Instant>>,
    /// The ids of READY sandboxes that do not ask for capture, as of the last pass.
    not_asking: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// Whether the node install (binary + chained config) is in place: `Err(why)` until it is.
/// Always `Ok` when the agent was not asked to install.
pub type InstallState = Arc<std::sync::Mutex<Result<(), String>>>;

impl AgentService {
    pub fn new(
        config: AgentConfig,
        policy: netns::Policy,
        metrics: Arc<Metrics>,
        install: InstallState,
    ) -> Self {
        Self {
            config,
            policy,
            registry: Arc::default(),
            metrics,
            install,
            work: crate::work::Work::default(),
            sandboxes: std::sync::Mutex::default(),
            detached: std::sync::Mutex::default(),
            not_asking: std::sync::Mutex::default(),
            discovery: std::sync::Mutex::new(
                "off: no CRI socket configured; the agent works from the plugin's calls alone"
                    .to_owned(),
            ),
        }
    }

    pub fn config(&self) -> &AgentConfig {
        &self.config
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
    pub fn set_sandboxes(&self, list: &[crate::discovery::Sandbox], not_asking: &[String]) {
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

    fn sandbox(&self, id: &str) -> Option<crate::discovery::Sandbox> {
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
    pub async fn run_for<T, F>(&self, id: &str, work: F) -> Result<T, crate::work::WorkError>
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

    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    fn open(&self, path: &str) -> Result<PodNetns, Status> {
        self.policy.open(path).map_err(netns_status)
    }
}

/// Longest message a status carries: inputs are echoed only as bounded excerpts, so a hostile
/// request can never grow a reply past HTTP/2's header limits (the message travels in a header).
const MAX_STATUS_MESSAGE: usize = 1024;

fn bounded(message: String) -> String {
    if message.len() <= MAX_STATUS_MESSAGE {
        return message;
    }
    let mut cut = MAX_STATUS_MESSAGE - 3;
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}…", &message[..cut])
}

/// An `InvalidArgument` naming the field in the message and in `sluice-field` metadata.
pub fn invalid(field: &str, message: impl std::fmt::Display) -> Status {
    with_field(
        Status::invalid_argument(bounded(format!("{field}: {message}"))),
        field,
    )
}

fn with_field(mut status: Status, field: &str) -> Status {
    if let Ok(v) = field.parse() {
        status.metadata_mut().insert(FIELD_METADATA_KEY, v);
    }
    status
}

fn plan_status(e: PlanError) -> Status {
    let field = format!("annotation:{}", e.annotation);
    with_field(Status::invalid_argument(bounded(e.to_string())), &field)
}

fn netns_status(e: NetnsError) -> Status {
    match e {
        NetnsError::Gone(_) => with_field(Status::not_found(bounded(e.to_string())), "netns"),
        e if e.is_invalid_input() => invalid("netns", e),
        // Short of threads or file descriptors: it comes back, and the runtime retries 11.
        e if e.is_transient() => Status::unavailable(bounded(e.to_string())),
        e => Status::internal(bounded(e.to_string())),
    }
}

/// Saturation and queue waits are transient (CNI code 11 at the plugin).
fn work_status(e: crate::work::WorkError) -> Status {
    match e {
        crate::work::WorkError::Saturated { .. } => Status::resource_exhausted(e.to_string()),
        // The wait is bounded by the call's deadline: running out of it is the deadline.
        crate::work::WorkError::WaitedTooLong(_) => Status::deadline_exceeded(e.to_string()),
        _ => Status::unavailable(e.to_string()),
    }
}

/// A kernel step that got no answer in time is the deadline, a resource the agent ran short
/// of is unavailability (both CNI code 11 at the plugin: the runtime retries); an annotation
/// the plan refuses is invalid input; any other kernel failure is internal.
fn program_status(e: &program::ProgramError, message: String) -> Status {
    if let program::ProgramError::Plan(p) = e {
        return plan_status(p.clone());
    }
    if e.is_timeout() {
        Status::deadline_exceeded(bounded(message))
    } else if e.is_transient() {
        Status::unavailable(bounded(message))
    } else {
        Status::internal(bounded(message))
    }
}

/// The server-side deadline of a call: [`deadlines::agent_deadline`] of the caller's
/// `grpc-timeout` (so the agent's own answer, saying what took too long, reaches the caller
/// first), or [`deadlines::MAX_AGENT_DEADLINE`] for a caller that sets none (`sluicectl`; the
/// plugin always sends one). Waiting for a worker counts against it (see `Work::run_within`),
/// and so does every kernel step (see `netns::step_timeout`).
pub fn deadline<T>(req: &Request<T>) -> Duration {
    req.metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        .map_or(deadlines::MAX_AGENT_DEADLINE, deadlines::agent_deadline)
}

/// `grpc-timeout` per the gRPC HTTP/2 protocol: at most 8 digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Runs one verb under its deadline. Past it the caller is told to try again (the plugin's
/// code 11); kernel work that had started still runs to completion and is recorded (see
/// `work`), so a retry finds it done (every verb is idempotent), and work that had not started
/// never will.
async fn within<T>(
    limit: Duration,
    verb: &str,
    call: impl std::future::Future<Output = Result<T, Status>>,
) -> Result<T, Status> {
    tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
        Err(Status::deadline_exceeded(format!(
            "the {verb} did not finish within the agent's deadline of {} ms (from the caller's timeout); try again",
            limit.as_millis()
        )))
    })
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn required(field: &str, value: &str) -> Result<(), Status> {
    if value.is_empty() {
        Err(invalid(field, "is required"))
    } else {
        Ok(())
    }
}

/// The pod's addresses, given as `10.1.0.5/24` (prevResult form) or `10.1.0.5`.
fn pod_ips(ips: &[String]) -> Result<Vec<IpAddr>, Status> {
    ips.iter()
        .map(|s| {
            s.parse::<IpNet>()
                .map(|n| n.addr())
                .or_else(|_| s.parse::<IpAddr>())
                .map_err(|_| {
                    let excerpt: String = s.chars().take(64).collect();
                    invalid(
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
fn error_reason(s: &Status) -> &'static str {
    match s.code() {
        tonic::Code::InvalidArgument => "invalid_argument",
        tonic::Code::NotFound => "not_found",
        tonic::Code::DeadlineExceeded => "deadline",
        tonic::Code::ResourceExhausted => "saturated",
        // Short of threads or file descriptors, or shutting down.
        tonic::Code::Unavailable => "unavailable",
        _ => "kernel",
    }
}

/// A metrics label for a skip reason.
fn skip_reason(reason: &str) -> &'static str {
    if reason.contains("agent configuration") {
        "profile_disabled"
    } else if reason.contains("is disabled") {
        "opted_out"
    } else if reason.contains("NONE") {
        "interception_none"
    } else {
        "not_selected"
    }
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn attach(
        &self,
        req: Request<AttachRequest>,
    ) -> Result<Response<AttachResponse>, Status> {
        let start = Instant::now();
        let limit = deadline(&req);
        let result = within(limit, "attach", self.attach_inner(req, limit)).await;
        let m = &self.metrics;
        match &result {
            Ok(r) if r.get_ref().outcome == Outcome::Skipped as i32 => {
                m.attach("skipped", skip_reason(&r.get_ref().reason), None);
            }
            Ok(_) => {
                m.attach("programmed", "", None);
                m.attach_duration.observe(start.elapsed().as_secs_f64());
            }
            Err(s) => {
                let field = s
                    .metadata()
                    .get(sluice_proto::FIELD_METADATA_KEY)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                let code = sluice_proto::cni_code::of_status(s.code(), field);
                m.attach("error", error_reason(s), Some(code));
            }
        }
        m.attached_pods.set(self.registry.pods() as i64);
        result
    }

    async fn detach(
        &self,
        req: Request<DetachRequest>,
    ) -> Result<Response<DetachResponse>, Status> {
        let limit = deadline(&req);
        let result = within(limit, "detach", self.detach_inner(req, limit)).await;
        self.metrics.detach(match &result {
            Ok(r) if r.get_ref().removed => "removed",
            Ok(_) => "absent",
            Err(_) => "error",
        });
        self.metrics.attached_pods.set(self.registry.pods() as i64);
        result
    }

    async fn check(&self, req: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        let limit = deadline(&req);
        let result = within(limit, "check", self.check_inner(req, limit)).await;
        match &result {
            Ok(r) if r.get_ref().ok => self.metrics.check("ok"),
            Ok(_) => {
                self.metrics.check("drift");
                self.metrics.drift_detected.inc();
            }
            Err(_) => self.metrics.check("error"),
        }
        result
    }

    async fn status(
        &self,
        _req: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let (ready, reason) = match self.readiness() {
            Ok(()) => (true, String::new()),
            Err(reason) => (false, reason),
        };
        Ok(Response::new(StatusResponse {
            ready,
            reason,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            attached: self.registry.len() as u32,
            discovery: self.discovery_status(),
        }))
    }

    async fn list(&self, _req: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        Ok(Response::new(ListResponse {
            attachments: self.registry.list(),
        }))
    }

    async fn explain(
        &self,
        req: Request<ExplainRequest>,
    ) -> Result<Response<ExplainResponse>, Status> {
        let req = req.into_inner();
        let ips = pod_ips(&req.pod_ips)?;
        Ok(Response::new(
            explain(&to_map(req.annotations), &ips, &self.config.plan).map_err(plan_status)?,
        ))
    }
}

impl AgentService {
    /// What the pod asks for, under this node's defaults.
    fn want(&self, annotations: BTreeMap<String, String>, pod_uid: &str, id: &str) -> Want {
        Want {
            annotations,
            defaults: self.config.plan.clone(),
            pod_uid: pod_uid.to_owned(),
            container_id: id.to_owned(),
        }
    }

    /// Marks that a DEL of `id` arrived (see [`AgentService::detached_since`]).
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

    async fn attach_inner(
        &self,
        req: Request<AttachRequest>,
        limit: Duration,
    ) -> Result<Response<AttachResponse>, Status> {
        let start = Instant::now();
        let until = start + limit;
        let received_ns = program::now_ns();
        let req = req.into_inner();
        required("container_id", &req.container_id)?;
        required("netns", &req.netns)?;
        let ips = pod_ips(&req.pod_ips)?;
        let pod = pod_or_default(req.pod);
        let want = self.want(to_map(req.annotations), &pod.uid, &req.container_id);
        // This attachment, and the pod's others the agent knows: the plan covers the families
        // of all of them (the kernel's own count decides once inside, see `program::attach`).
        let this = Attached::new(&req.ifname, &req.network, Families::present(&ips));
        let known: Vec<Attached> = self
            .registry
            .of(&req.container_id)
            .iter()
            .filter(|r| r.attachment.ifname != req.ifname)
            .map(attached)
            .collect();
        let at = unix_now();
        let mut all = known.clone();
        all.push(this.clone());
        // Decided before any namespace is entered: a pod that does not ask never reaches one,
        // and a refused annotation leaves everything untouched.
        let Some(first) = want.plan(want.owner(&all, at)).map_err(plan_status)? else {
            let reason = match plan::decide(&want.annotations, &ips, &want.defaults) {
                Ok(Decision::Skip { reason }) => reason,
                _ => "the pod does not ask for capture".to_owned(),
            };
            tracing::debug!(container = %req.container_id, %reason, "attach skipped");
            return Ok(Response::new(AttachResponse {
                outcome: Outcome::Skipped.into(),
                reason,
                ..Default::default()
            }));
        };
        if !first.ignored.is_empty() {
            tracing::warn!(container = %req.container_id, pod = %format!("{}/{}", pod.namespace, pod.name), profile = %first.profile, ignored = ?first.ignored, "native sluice.dev annotations on a mesh pod not applied (native-overrides-on-mesh-pods is off)");
            self.metrics.native_overrides_ignored(first.profile);
        }
        drop(first);
        let ns = self.open(&req.netns)?;
        let (registry, metrics) = (self.registry.clone(), self.metrics.clone());
        let key = req.container_id.clone();
        // Under the container's lock: read what an earlier ADD recorded (to restore it if this
        // one fails), program, and record, as one unit that a departing caller cannot cut.
        let work = async move {
            let started_ns = program::now_ns();
            let restore = registry.get(&req.container_id).map(|r| Want {
                annotations: r.annotations,
                ..want.clone()
            });
            let annotations = want.annotations.clone();
            let (in_netns_ns, done) = ns
                .run(until, move || {
                    let in_netns_ns = program::now_ns();
                    program::attach(&want, this, &known, at, restore.as_ref())
                        .map(|done| (in_netns_ns, done))
                })
                .await
                .map_err(netns_status)?
                .map_err(|e| {
                    let pod = format!("{}/{}", pod.namespace, pod.name);
                    tracing::warn!(container = %req.container_id, %pod, netns = %req.netns, error = %e, "attach failed");
                    program_status(
                        &e,
                        format!(
                            "programming pod {pod} (container {}) in netns {}: {e}",
                            req.container_id, req.netns
                        ),
                    )
                })?;
            let duration_us = start.elapsed().as_micros() as u64;
            if done.replaced {
                metrics.drift_repaired.inc();
            }
            let owner = &done.planned.ruleset.owner;
            let (fingerprint, profile) = (owner.fingerprint.clone(), done.planned.profile);
            let rule_count = done.planned.ruleset.rule_count() as u32;
            tracing::info!(
                container = %req.container_id, pod = %format!("{}/{}", pod.namespace, pod.name),
                netns = %req.netns, ifname = %req.ifname, network = %req.network, %fingerprint,
                %profile, rules = rule_count, attachments = ?owner.ifnames(), duration_us,
                nft_us = done.timings.nft_us, device_us = done.timings.device_us, "attached"
            );
            // Every attachment of the pod shares the capture just programmed.
            for mut r in registry.of(&req.container_id) {
                r.attachment.fingerprint = fingerprint.clone();
                r.attachment.rule_count = rule_count;
                r.attachment.profile = profile.to_string();
                r.attachment.attached_at_unix = at as i64;
                r.annotations = annotations.clone();
                registry.insert(r);
            }
            registry.insert(Record {
                attachment: Attachment {
                    container_id: req.container_id,
                    ifname: req.ifname,
                    network: sluice_proto::network_name(&req.network),
                    state: "ok".to_owned(),
                    netns: req.netns,
                    pod: Some(pod),
                    fingerprint: fingerprint.clone(),
                    profile: profile.to_string(),
                    rule_count,
                    attached_at_unix: at as i64,
                },
                annotations,
                pod_ips: req.pod_ips,
            });
            Ok(Response::new(AttachResponse {
                outcome: Outcome::Programmed.into(),
                reason: String::new(),
                fingerprint,
                profile: profile.to_string(),
                rule_count,
                duration_us,
                timing: Some(AttachTiming {
                    received_ns,
                    started_ns,
                    in_netns_ns,
                    nft_ns: done.timings.nft_at_ns,
                    device_ns: done.timings.device_at_ns,
                    replied_ns: program::now_ns(),
                }),
            }))
        };
        self.work
            .run_within(&key, limit, work)
            .await
            .map_err(work_status)?
    }

    async fn detach_inner(
        &self,
        req: Request<DetachRequest>,
        limit: Duration,
    ) -> Result<Response<DetachResponse>, Status> {
        let until = Instant::now() + limit;
        let req = req.into_inner();
        required("container_id", &req.container_id)?;
        self.note_detach(&req.container_id);
        let ns = if req.netns.is_empty() {
            None
        } else {
            match self.policy.open(&req.netns) {
                Ok(ns) => Some(ns),
                Err(NetnsError::Gone(_)) => None,
                Err(e) => return Err(netns_status(e)),
            }
        };
        let registry = self.registry.clone();
        let defaults = self.config.plan.clone();
        let key = req.container_id.clone();
        // Under the container's lock, so a racing Attach runs wholly before or after: the
        // kernel and the record end as the last verb left them. A record is forgotten only
        // once the kernel side is gone or no longer counts it.
        let work = async move {
            let (id, ifname) = (req.container_id.clone(), req.ifname.clone());
            let (removed, reason, forget_all) = match ns {
                None if req.netns.is_empty() => (
                    false,
                    "no netns given; rules go away with the namespace".to_owned(),
                    false,
                ),
                None => (false, "netns is gone".to_owned(), true),
                Some(ns) => {
                    let netns = req.netns.clone();
                    // What the pod asks for, to narrow the capture to the attachments left.
                    let want = registry.get(&id).map(|r| Want {
                        annotations: r.annotations,
                        defaults,
                        pod_uid: r.attachment.pod.map(|p| p.uid).unwrap_or_default(),
                        container_id: id.clone(),
                    });
                    let if_ = ifname.clone();
                    let done = ns
                        .run(until, move || program::detach_for(&if_, want.as_ref()))
                        .await
                        .map_err(netns_status)?
                        .map_err(|e| {
                            tracing::warn!(container = %id, %netns, error = %e, "detach failed");
                            program_status(
                                &e,
                                format!(
                                    "removing sluice from container {id} in netns {netns}: {e}"
                                ),
                            )
                        })?;
                    match done {
                        program::Detached::Removed(true) => (true, String::new(), true),
                        program::Detached::Removed(false) => {
                            (false, "no sluice table in the netns".to_owned(), true)
                        }
                        program::Detached::Kept {
                            attached,
                            recounted,
                        } => {
                            tracing::info!(container = %id, %ifname, ?attached, recounted, "detach of one of several interfaces: capture kept");
                            (
                                false,
                                format!(
                                    "the capture is kept for the pod's other attachments ({})",
                                    attached.join(", ")
                                ),
                                false,
                            )
                        }
                    }
                }
            };
            // Once the capture is gone, no attachment of the pod has one.
            let forgotten = registry.remove(&id, if forget_all { "" } else { &ifname });
            tracing::info!(container = %id, %ifname, netns = %req.netns, removed, forgotten, %reason, "detached");
            Ok(Response::new(DetachResponse { removed, reason }))
        };
        self.work
            .run_within(&key, limit, work)
            .await
            .map_err(work_status)?
    }

    async fn check_inner(
        &self,
        req: Request<CheckRequest>,
        limit: Duration,
    ) -> Result<Response<CheckResponse>, Status> {
        let until = Instant::now() + limit;
        let req = req.into_inner();
        required("container_id", &req.container_id)?;
        // What the agent knows of the container: its attachments, or else the runtime's
        // sandbox as of the last discovery pass (a pod that was never captured).
        let mut records = self.registry.of(&req.container_id);
        if records.is_empty()
            && let Some(sb) = self.sandbox(&req.container_id)
            && let Some(netns) = sb.netns
        {
            records.push(Record {
                attachment: Attachment {
                    container_id: sb.id,
                    netns,
                    ifname: DEFAULT_IFNAME.to_owned(),
                    pod: Some(sb.pod),
                    ..Default::default()
                },
                annotations: sb.annotations,
                pod_ips: sb.ips,
            });
        }
        // A sandbox the runtime lists that does not ask for capture: nothing is expected of it
        // (the plugin's CHECK, which names the netns, still finds a stray table).
        if records.is_empty() && req.netns.is_empty() && self.does_not_ask(&req.container_id) {
            return Ok(Response::new(CheckResponse {
                ok: true,
                ..Default::default()
            }));
        }
        let record = records.first();
        let netns = if req.netns.is_empty() {
            record.map(|r| r.attachment.netns.clone()).ok_or_else(|| {
                with_field(
                    Status::not_found(bounded(format!(
                        "container_id: no attachment recorded for {} and no netns given",
                        req.container_id
                    ))),
                    "container_id",
                )
            })?
        } else {
            req.netns.clone()
        };
        let annotations = if req.annotations.is_empty() {
            record.map(|r| r.annotations.clone()).unwrap_or_default()
        } else {
            to_map(req.annotations)
        };
        let pod = req
            .pod
            .or_else(|| record.and_then(|r| r.attachment.pod.clone()))
            .unwrap_or_default();
        // Without a table counting attachments, the plan counts what the agent recorded, or
        // the addresses given.
        let ips = pod_ips(&req.pod_ips)?;
        let fallback: Vec<Attached> = if records.is_empty() {
            vec![Attached::new(DEFAULT_IFNAME, "", Families::present(&ips))]
        } else {
            records.iter().map(attached).collect()
        };
        let want = self.want(annotations, &pod.uid, &req.container_id);
        // Refuse bad annotations before entering the namespace.
        want.plan(want.owner(&fallback, 0)).map_err(plan_status)?;
        let ns = self.open(&netns)?;
        let r = self
            .work
            .run_within(&req.container_id, limit, async move {
                ns.run(until, move || {
                    program::reconcile(&want, &fallback, program::Act::Diff, 0)
                })
                .await
                .map_err(netns_status)
            })
            .await
            .map_err(work_status)??
            .map_err(|e| program_status(&e, format!("reading the capture in {netns}: {e}")))?;
        if !r.drift.is_empty() {
            tracing::warn!(container = %req.container_id, %netns, drift = ?r.drift, "drift detected");
        }
        Ok(Response::new(CheckResponse {
            ok: r.drift.is_empty(),
            drift: r.drift,
            expected_fingerprint: r
                .planned
                .map(|p| p.ruleset.owner.fingerprint)
                .unwrap_or_default(),
            live_fingerprint: r.live.map(|o| o.fingerprint).unwrap_or_default(),
        }))
    }
}

/// The interface a sandbox's primary network is attached on when nothing says otherwise.
const DEFAULT_IFNAME: &str = "eth0";

/// How long the agent remembers that a DEL arrived (see [`AgentService::detached_since`]):
/// longer than any reconcile pass.
const DETACH_MEMORY: Duration = Duration::from_secs(600);

/// Renders what an Attach with these annotations would program under `defaults` (the node's
/// configuration). Shared by the Explain RPC and `sluicectl explain`.
pub fn explain(
    annotations: &BTreeMap<String, String>,
    pod_ips: &[IpAddr],
    defaults: &plan::PlanDefaults,
) -> Result<ExplainResponse, PlanError> {
    Ok(match plan::decide(annotations, pod_ips, defaults)? {
        Decision::Skip { reason } => ExplainResponse {
            outcome: Outcome::Skipped.into(),
            reason,
            ..Default::default()
        },
        Decision::Capture {
            plan,
            profile,
            ignored,
        } => {
            let fingerprint = plan.fingerprint();
            let rs = Ruleset::from_plan(
                &plan,
                Owner::new(&fingerprint, "", "").on(Attached::new(
                    DEFAULT_IFNAME,
                    "",
                    Families::present(pod_ips),
                )),
            );
            if rs.rule_count() > plan::MAX_RULES {
                return Err(plan::too_many_rules(annotations, rs.rule_count()));
            }
            let notes = if ignored.is_empty() {
                Vec::new()
            } else {
                vec![format!(
                    "not applied on a {profile} pod (the node's native-overrides-on-mesh-pods is off): {}",
                    ignored.join(", ")
                )]
            };
            ExplainResponse {
                outcome: Outcome::Programmed.into(),
                reason: String::new(),
                profile: profile.to_string(),
                fingerprint,
                nft: rs.to_nft_script(),
                device: crate::device::DeviceSetup::from_plan(&plan).describe(),
                plan: format!("{plan:#?}"),
                notes,
            }
        }
    })
}

/// Whether this agent can program new pods: it holds the capabilities its hot path needs and
/// nf_tables answers.
pub fn readiness() -> Result<(), String> {
    use caps::{CapSet, Capability};
    for cap in [Capability::CAP_NET_ADMIN, Capability::CAP_SYS_ADMIN] {
        if !caps::has_cap(None, CapSet::Effective, cap).unwrap_or(false) {
            return Err(format!("missing capability {cap}"));
        }
    }
    match crate::probe::get() {
        None => return Err("probing the kernel (started with the agent)".to_owned()),
        Some(Err(e)) => return Err(format!("probing the kernel failed: {e}")),
        Some(Ok(features)) => features.required()?,
    }
    nft::probe().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    use sluice_proto::v1::PodRef;

    use super::*;

    /// An agent whose only netns root does not exist: nothing an arbitrary request names can
    /// be entered, so validation is all that runs.
    fn service() -> AgentService {
        AgentService::new(
            AgentConfig::default(),
            netns::Policy {
                roots: vec![netns::Root::Dir("/nonexistent/sluice-proptest".into())],
                host: netns::NsId { dev: 0, ino: 0 },
            },
            Arc::new(Metrics::new()),
            Arc::new(std::sync::Mutex::new(Ok(()))),
        )
    }

    #[test]
    fn grpc_timeout_values_are_parsed_per_the_protocol() {
        let ms = |v: &str| parse_grpc_timeout(v).map(|d| d.as_millis());
        assert_eq!(ms("1999m"), Some(1999));
        assert_eq!(ms("2S"), Some(2000));
        assert_eq!(ms("1M"), Some(60_000));
        assert_eq!(ms("1500000u"), Some(1500));
        for bad in ["", "m", "123456789m", "12x", "-1m", "1.5S", "１m"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
        let mut req = Request::new(());
        assert_eq!(
            deadline(&req),
            deadlines::MAX_AGENT_DEADLINE,
            "no deadline given"
        );
        req.metadata_mut()
            .insert("grpc-timeout", "2000m".parse().expect("ascii"));
        assert_eq!(deadline(&req), Duration::from_millis(1800));
        req.metadata_mut()
            .insert("grpc-timeout", "5H".parse().expect("ascii"));
        assert_eq!(deadline(&req), deadlines::MAX_AGENT_DEADLINE, "capped");
    }

    /// A call whose container is busy waits no longer than its caller's deadline (from
    /// `grpc-timeout`) and is told so: DEADLINE_EXCEEDED, the plugin's code 11, instead of
    /// waiting out the agent's own queue limit; the abandoned work never starts.
    #[test]
    fn a_call_stuck_behind_its_containers_lock_ends_at_the_callers_deadline() {
        let svc = Arc::new(AgentService::new(
            AgentConfig::default(),
            netns::Policy {
                roots: vec![netns::Root::Proc],
                host: netns::NsId { dev: 0, ino: 0 },
            },
            Arc::new(Metrics::new()),
            Arc::new(std::sync::Mutex::new(Ok(()))),
        ));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let (release, held) = tokio::sync::oneshot::channel::<()>();
            let (started, holding) = tokio::sync::oneshot::channel::<()>();
            let busy = svc.clone();
            let holder = tokio::spawn(async move {
                busy.work
                    .run("busy", async move {
                        let _ = started.send(());
                        let _ = held.await;
                    })
                    .await
            });
            holding.await.expect("the holder runs");
            let mut req = Request::new(CheckRequest {
                container_id: "busy".into(),
                netns: format!("/proc/{}/ns/net", std::process::id()),
                ..Default::default()
            });
            req.metadata_mut()
                .insert("grpc-timeout", "300m".parse().expect("ascii"));
            let answer = tokio::time::timeout(Duration::from_secs(120), svc.check(req))
                .await
                .expect("an answer");
            let status = answer.expect_err("the container is busy");
            assert_eq!(status.code(), tonic::Code::DeadlineExceeded, "{status:?}");
            // Its waiter leaves the queue at the same deadline, never later than the queue limit.
            let mut polls = 0;
            while svc.work.load() != (1, 0) && polls < 1000 {
                tokio::time::sleep(Duration::from_millis(10)).await;
                polls += 1;
            }
            assert_eq!(
                svc.work.load(),
                (1, 0),
                "the abandoned check left the queue"
            );
            let _ = release.send(());
            holder
                .await
                .expect("joined")
                .expect("the holder's work ran");
        });
    }

    /// Arbitrary Attach, Detach and Check requests: never a panic; every refusal is a status
    /// with a bounded message, and an InvalidArgument names its field in `sluice-field`.
    #[test]
    fn arbitrary_requests_get_a_status_naming_the_field() {
        let svc = service();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        let text = prop_oneof![
            prop::sample::select(vec![
                "",
                "/nonexistent/sluice-proptest/ns1",
                "/var/run/netns/../x",
                "relative",
                "/proc/1/ns/net",
                "10.99.0.2/24",
                "fd00::2",
                "sluice.dev/redirect",
                "enabled",
            ])
            .prop_map(str::to_owned),
            ".{0,24}",
            "[0-9a-f:./]{0,1500}",
        ];
        let annotations = prop::collection::hash_map(
            prop_oneof![
                prop::sample::select(crate::plan::all_annotation_keys()).prop_map(str::to_owned),
                ".{0,12}"
            ],
            text.clone(),
            0..5,
        );
        let request = (
            text.clone(),
            text.clone(),
            annotations,
            prop::collection::vec(text.clone(), 0..3),
            prop::option::of((text.clone(), text.clone(), text)),
        );
        let cases = std::cell::Cell::new(0usize);
        let mut runner = TestRunner::new(Config {
            cases: 600,
            failure_persistence: None,
            ..Config::default()
        });
        let check = |r: Result<(), Status>| -> Result<(), TestCaseError> {
            if let Err(s) = r {
                prop_assert!(
                    s.message().len() <= MAX_STATUS_MESSAGE,
                    "{}",
                    s.message().len()
                );
                if s.code() == tonic::Code::InvalidArgument {
                    let field = s.metadata().get(FIELD_METADATA_KEY);
                    prop_assert!(field.is_some(), "no field named: {}", s.message());
                }
                prop_assert!(
                    s.code() != tonic::Code::Internal && s.code() != tonic::Code::Unknown,
                    "{:?}: {}",
                    s.code(),
                    s.message()
                );
            }
            Ok(())
        };
        runner
            .run(
                &request,
                |(id, ns, ann, ips, pod): (
                    String,
                    String,
                    HashMap<String, String>,
                    Vec<String>,
                    _,
                )| {
                    cases.set(cases.get() + 1);
                    let pod = pod.map(|(namespace, name, uid)| PodRef {
                        namespace,
                        name,
                        uid,
                    });
                    let attach = rt.block_on(svc.attach(Request::new(AttachRequest {
                        container_id: id.clone(),
                        netns: ns.clone(),
                        ifname: "eth0".into(),
                        pod: pod.clone(),
                        annotations: ann.clone(),
                        pod_ips: ips.clone(),
                        network: "net".into(),
                    })));
                    check(attach.map(drop))?;
                    let detach = rt.block_on(svc.detach(Request::new(DetachRequest {
                        container_id: id.clone(),
                        netns: ns.clone(),
                        ifname: "eth0".into(),
                    })));
                    check(detach.map(drop))?;
                    let chk = rt.block_on(svc.check(Request::new(CheckRequest {
                        container_id: id,
                        netns: ns,
                        annotations: ann,
                        pod_ips: ips,
                        pod,
                    })));
                    check(chk.map(drop))
                },
            )
            .expect("property");
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            format!(
                "proptest: agent service, arbitrary Attach/Detach/Check: {} cases\n",
                cases.get()
            )
            .as_bytes(),
        );
    }
}
