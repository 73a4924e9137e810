//! The `sluice.v1.Agent` gRPC service: an adapter from tonic to the agent's verbs. It takes
//! each call's deadline from `grpc-timeout`, turns an [`AgentError`] into a status naming the
//! field it is about (bounded in size), and labels the attach metrics with the CNI code the
//! plugin will answer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_proto::FIELD_METADATA_KEY;
use sluice_proto::deadlines;
use sluice_proto::v1::agent_server::Agent as AgentApi;
use sluice_proto::v1::{
    AttachRequest, AttachResponse, CheckRequest, CheckResponse, DetachRequest, DetachResponse,
    ExplainRequest, ExplainResponse, ListRequest, ListResponse, Outcome, StatusRequest,
    StatusResponse,
};
use tonic::{Request, Response, Status};

use crate::agent::{Agent, AgentError};
use crate::metrics::Metrics;

/// The gRPC face of an [`Agent`].
#[derive(Debug)]
pub struct GrpcService {
    agent: Arc<Agent>,
    metrics: Arc<Metrics>,
}

impl GrpcService {
    pub fn new(agent: Arc<Agent>, metrics: Arc<Metrics>) -> Self {
        GrpcService { agent, metrics }
    }
}

/// Longest message a status carries: inputs are echoed only as bounded excerpts, so a hostile
/// request can never grow a reply past HTTP/2's header limits (the message travels in a header).
const MAX_STATUS_MESSAGE: usize = 1024;

fn bounded_message(message: String) -> String {
    if message.len() <= MAX_STATUS_MESSAGE {
        return message;
    }
    let mut cut = MAX_STATUS_MESSAGE - 3;
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}…", &message[..cut])
}

/// The status for an agent error: its code says who can fix it, `sluice-field` names the
/// input it is about.
pub fn status_of(e: AgentError) -> Status {
    let field = e.field();
    let message = bounded_message(e.to_string());
    let mut status = match e {
        AgentError::Invalid { .. } | AgentError::Annotation(_) => Status::invalid_argument(message),
        AgentError::NotFound { .. } => Status::not_found(message),
        AgentError::Deadline(_) => Status::deadline_exceeded(message),
        AgentError::Saturated(_) => Status::resource_exhausted(message),
        AgentError::Unavailable(_) => Status::unavailable(message),
        AgentError::Internal(_) => Status::internal(message),
    };
    if let Some(v) = field.and_then(|f| f.parse().ok()) {
        status.metadata_mut().insert(FIELD_METADATA_KEY, v);
    }
    status
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
/// `agent::work`), so a retry finds it done (every verb is idempotent), and work that had not
/// started never will.
async fn within<T>(
    limit: Duration,
    verb: &str,
    call: impl std::future::Future<Output = Result<T, AgentError>>,
) -> Result<Response<T>, Status> {
    match tokio::time::timeout(limit, call).await {
        Ok(r) => r.map(Response::new).map_err(status_of),
        Err(_) => Err(Status::deadline_exceeded(format!(
            "the {verb} did not finish within the agent's deadline of {} ms (from the caller's timeout); try again",
            limit.as_millis()
        ))),
    }
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
    } else if reason.starts_with("mesh gate:") {
        "mesh_gate"
    } else {
        "not_selected"
    }
}

#[tonic::async_trait]
impl AgentApi for GrpcService {
    async fn attach(
        &self,
        req: Request<AttachRequest>,
    ) -> Result<Response<AttachResponse>, Status> {
        let start = Instant::now();
        let limit = deadline(&req);
        let result = within(limit, "attach", self.agent.attach(req.into_inner(), limit)).await;
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
                    .get(FIELD_METADATA_KEY)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                let code = sluice_proto::cni_code::of_status(s.code(), field);
                m.attach("error", error_reason(s), Some(code));
            }
        }
        self.agent.refresh_attached_gauge();
        result
    }

    async fn detach(
        &self,
        req: Request<DetachRequest>,
    ) -> Result<Response<DetachResponse>, Status> {
        let limit = deadline(&req);
        let result = within(limit, "detach", self.agent.detach(req.into_inner(), limit)).await;
        self.metrics.detach(match &result {
            Ok(r) if r.get_ref().removed => "removed",
            Ok(_) => "absent",
            Err(_) => "error",
        });
        self.agent.refresh_attached_gauge();
        result
    }

    async fn check(&self, req: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        let limit = deadline(&req);
        let result = within(limit, "check", self.agent.check(req.into_inner(), limit)).await;
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
        Ok(Response::new(self.agent.status()))
    }

    async fn list(&self, _req: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        Ok(Response::new(self.agent.list()))
    }

    async fn explain(
        &self,
        req: Request<ExplainRequest>,
    ) -> Result<Response<ExplainResponse>, Status> {
        self.agent
            .explain(req.into_inner())
            .map(Response::new)
            .map_err(status_of)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    use sluice_proto::v1::PodRef;

    use super::*;
    use crate::kernel::netns;
    use crate::model::plan::PlanDefaults;

    /// An agent whose only netns root does not exist: nothing an arbitrary request names can
    /// be entered, so validation is all that runs.
    fn service() -> GrpcService {
        service_over(netns::Root::Dir("/nonexistent/sluice-proptest".into()))
    }

    fn service_over(root: netns::Root) -> GrpcService {
        let metrics = Arc::new(Metrics::new());
        let agent = Agent::new(
            PlanDefaults::default(),
            netns::Policy {
                roots: vec![root],
                host: netns::NsId { dev: 0, ino: 0 },
            },
            metrics.clone(),
            Arc::new(std::sync::Mutex::new(Ok(()))),
        );
        GrpcService::new(Arc::new(agent), metrics)
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
        let svc = Arc::new(service_over(netns::Root::Proc));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let (release, held) = tokio::sync::oneshot::channel::<()>();
            let (started, holding) = tokio::sync::oneshot::channel::<()>();
            let busy = svc.clone();
            let holder = tokio::spawn(async move {
                busy.agent
                    .run_for("busy", async move {
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
            while svc.agent.load() != (1, 0) && polls < 1000 {
                tokio::time::sleep(Duration::from_millis(10)).await;
                polls += 1;
            }
            assert_eq!(
                svc.agent.load(),
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
                prop::sample::select(crate::model::plan::all_annotation_keys())
                    .prop_map(str::to_owned),
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
