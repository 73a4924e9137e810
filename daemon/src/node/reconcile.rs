//! The reconciler: with the container runtime (CRI) and the kernel as the truth, every
//! `interval` (and once at start-up) it walks the node's READY sandboxes and, for each whose
//! annotations ask for capture, compares the pod's namespace with the plan — the same
//! comparison `Check` makes (table, device state, sysctls) — and repairs what is missing or
//! drifted through the same code path as `Attach` (`capture::attach`, under the container's
//! lock, so it never interleaves with the plugin's ADD or DEL of that pod), or, in report mode,
//! only reports it. What it finds rebuilds the agent's records, so after a restart `List`,
//! metrics and `sluicectl check` are complete again.
//!
//! Never captured on its own initiative: a pod whose annotations do not ask for capture
//! (including `sluice.dev/redirect: disabled`), a host-network pod, a sandbox that is not READY,
//! a namespace the netns policy refuses. Records of sandboxes that are gone are forgotten only
//! after two consecutive passes that do not list them (a sandbox whose ADD is still running is
//! not READY yet); their kernel state went with their namespace.
//!
//! Order and crashes: a repair is `capture::attach` — the nftables table in one transaction,
//! then device state. A crash between the two leaves the table without TPROXY routing only for
//! a pod that had no capture at all (the table is the first thing a pod gets); the next pass
//! finds the missing rule or route and completes it. Working capture is never removed on
//! failure: a repair of an existing table is a repair in place (nothing removed when a step
//! fails).

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::agent::Agent;
use crate::agent::registry::Record;
use crate::kernel::capture::{self, Want};
use crate::model::plan::Families;
use crate::model::ruleset::Attached;
use crate::node::discovery::{Cri, Sandbox};

/// What the reconciler does about a pod that lacks its capture or has drifted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Repair {
    /// Re-program it (the default).
    #[default]
    Apply,
    /// Only report it (log, `sluice_uncaptured_pods`, `sluicectl list`).
    Report,
}

pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(15);

/// What one sandbox came to in a pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// Not asked for capture, host network, no netns, refused by the netns policy.
    NotOurs,
    /// Captured as planned.
    Ok,
    /// Re-programmed; `reason` is `missing` or `drift`.
    Repaired { reason: &'static str },
    /// Needs repair and was left alone (report mode), or the repair failed.
    Uncaptured { reason: &'static str },
    /// A DEL of the pod came after the pass's snapshot: it is going away; left alone.
    Deleting,
}

/// Runs passes until the task is dropped.
pub async fn run(service: Arc<Agent>, mut cri: Cri, repair: Repair, interval: Duration) {
    let mut state = PassState::default();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        pass(&service, &mut cri, repair, &mut state).await;
    }
}

/// What passes carry from one to the next.
#[derive(Debug, Default)]
pub struct PassState {
    /// Containers recorded but not listed by the last pass (forgotten on a second miss).
    unseen_once: HashSet<String>,
    /// Since when passes fail (listing or some sandboxes), and how many in a row.
    failing: Option<(std::time::SystemTime, u32)>,
}

/// One pass over the runtime's READY sandboxes that ask for capture. It survives any one
/// sandbox: one whose status cannot be read is counted and skipped (the pass is `partial`);
/// only a runtime that cannot be listed at all fails it (`error`). Either is visible in
/// `sluicectl status` (with the first error and since when) and in
/// `sluice_reconcile_passes_total{result}` (alert `SluiceReconcileFailing`).
pub async fn pass(service: &Arc<Agent>, cri: &mut Cri, repair: Repair, state: &mut PassState) {
    let socket = cri.socket().display().to_string();
    let started = Instant::now();
    let listing = match cri.ready_sandboxes().await {
        Ok(l) => l,
        Err(e) => {
            // Once per change, not once per pass: a node without that runtime would log it
            // every interval.
            if state.failing.is_none() {
                tracing::warn!(error = %e, "sandbox discovery failed; will retry every interval");
            }
            let (since, n) = failing(state);
            service.set_discovery(format!(
                "FAILING since {} ({n} passes in a row): cri {socket}: {e}",
                unix_of(since)
            ));
            service.metrics().reconcile_pass("error");
            return;
        }
    };
    let sandboxes = listing.sandboxes;
    service.set_sandboxes(&sandboxes, &listing.not_asking);
    let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
    counts.insert("not_asking", listing.not_asking.len());
    let mut uncaptured = 0i64;
    for sb in &sandboxes {
        let found = reconcile_sandbox(service, sb, repair, started).await;
        let key = match &found {
            Found::NotOurs => "not_ours",
            Found::Ok => "ok",
            Found::Repaired { .. } => "repaired",
            Found::Uncaptured { .. } => "uncaptured",
            Found::Deleting => "deleting",
        };
        *counts.entry(key).or_default() += 1;
        if matches!(found, Found::Uncaptured { .. }) {
            uncaptured += 1;
        }
    }
    service.metrics().uncaptured_pods.set(uncaptured);
    // Forget records of sandboxes the runtime no longer lists, on the second miss; a sandbox
    // whose status could not be read is still listed.
    let listed: HashSet<&str> = sandboxes
        .iter()
        .map(|s| s.id.as_str())
        .chain(listing.failed.iter().map(|(id, _)| id.as_str()))
        .collect();
    let recorded: HashSet<String> = service
        .registry()
        .list()
        .into_iter()
        .map(|a| a.container_id)
        .collect();
    let missing: HashSet<String> = recorded
        .into_iter()
        .filter(|id| !listed.contains(id.as_str()))
        .collect();
    for id in missing.intersection(&state.unseen_once) {
        let n = service.registry().remove(id, "");
        tracing::info!(container = %id, forgotten = n, "sandbox gone from the runtime; records forgotten");
    }
    state.unseen_once = missing;
    service.refresh_attached_gauge();
    if let Some((id, e)) = listing.failed.first() {
        tracing::warn!(failed = listing.failed.len(), first = %id, error = %e, "the status of some sandboxes could not be read; they were skipped this pass");
        let (since, n) = failing(state);
        service.metrics().reconcile_pass("partial");
        service.set_discovery(format!(
            "INCOMPLETE since {} ({n} passes in a row): cri {socket}: {} sandboxes asking for capture, {} could not be read (first {id}: {e}); last pass {counts:?}",
            unix_of(since),
            sandboxes.len() + listing.failed.len(),
            listing.failed.len()
        ));
    } else {
        if state.failing.take().is_some() {
            tracing::info!("sandbox discovery works again");
        }
        service.metrics().reconcile_pass("ok");
        service.set_discovery(format!(
            "cri {socket}: {} ready sandboxes asking for capture; last pass {counts:?}",
            sandboxes.len()
        ));
    }
    service
        .metrics()
        .reconcile_pass_duration
        .observe(started.elapsed().as_secs_f64());
    tracing::debug!(sandboxes = sandboxes.len(), ?counts, "reconcile pass");
}

/// Counts one more failing pass; since when passes fail, and how many in a row.
fn failing(state: &mut PassState) -> (std::time::SystemTime, u32) {
    let (since, n) = state
        .failing
        .get_or_insert((std::time::SystemTime::now(), 0));
    *n += 1;
    (*since, *n)
}

fn unix_of(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Reconciles one sandbox; see the module docs. `snapshot` is when the runtime's listing
/// began: a DEL of the pod after it means the pod is going away, and it is left alone.
pub async fn reconcile_sandbox(
    service: &Arc<Agent>,
    sb: &Sandbox,
    repair: Repair,
    snapshot: Instant,
) -> Found {
    let Some(netns) = sb.netns.clone() else {
        return Found::NotOurs;
    };
    let ips: Vec<IpAddr> = sb
        .ips
        .iter()
        .filter_map(|s| s.parse::<IpAddr>().ok())
        .collect();
    let want = Want {
        annotations: sb.annotations.clone(),
        defaults: service.defaults().clone(),
        pod_uid: sb.pod.uid.clone(),
        container_id: sb.id.clone(),
    };
    let pod = format!("{}/{}", sb.pod.namespace, sb.pod.name);
    // The pod's primary attachment as the runtime reports it, when the kernel counts none.
    let primary = vec![Attached::new("eth0", "", Families::present(&ips))];
    match want.plan(want.owner(&primary, 0)) {
        Ok(Some(_)) => {}
        Ok(None) => return Found::NotOurs,
        Err(e) => {
            tracing::warn!(container = %sb.id, %pod, error = %e, "sandbox asks for capture with an invalid annotation; left alone");
            return Found::NotOurs;
        }
    }
    let (svc, sb2) = (service.clone(), sb.clone());
    let work = async move {
        // Under the pod's lock, the snapshot is checked again: a DEL that came after it
        // (the pod is being deleted) wins, and nothing is opened, programmed or recorded.
        if svc.detached_since(&sb2.id, snapshot) {
            tracing::debug!(container = %sb2.id, %pod, "a DEL came after the snapshot; left alone");
            return Found::Deleting;
        }
        let ns = match svc.policy().open(&netns) {
            Ok(ns) => ns,
            Err(e) => {
                tracing::debug!(container = %sb2.id, %netns, error = %e, "sandbox netns not usable; skipped");
                return Found::NotOurs;
            }
        };
        // The attachments the agent recorded, for a pod whose table counts none.
        let recorded: Vec<Attached> = svc
            .registry()
            .of(&sb2.id)
            .iter()
            .map(crate::agent::attached)
            .collect();
        let fallback = if recorded.is_empty() {
            primary
        } else {
            recorded
        };
        let act = match repair {
            Repair::Apply => capture::Act::Repair,
            Repair::Report => capture::Act::Diff,
        };
        let now = crate::agent::unix_now();
        let until = Instant::now() + crate::agent::work::DEFAULT_WAIT;
        let visit = ns
            .run(until, move || {
                capture::reconcile(&want, &fallback, act, now)
            })
            .await;
        let r = match visit {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::warn!(container = %sb2.id, %pod, error = %e, "reading the capture failed");
                return Found::Uncaptured { reason: "error" };
            }
            Err(e) => {
                tracing::debug!(container = %sb2.id, error = %e, "sandbox netns went away");
                return Found::NotOurs;
            }
        };
        let Some(planned) = r.planned else {
            return Found::NotOurs;
        };
        let reason = if r.missing { "missing" } else { "drift" };
        let (found, at) = match &r.repaired {
            None if r.drift.is_empty() => (Found::Ok, r.live.as_ref().map_or(0, |o| o.attached_at)),
            None => (Found::Uncaptured { reason }, 0),
            Some(Ok(_)) => (Found::Repaired { reason }, now),
            Some(Err(e)) => {
                tracing::error!(container = %sb2.id, %pod, error = %e, reason, "repairing the capture failed");
                (Found::Uncaptured { reason }, 0)
            }
        };
        match &found {
            Found::Repaired { reason } => {
                tracing::warn!(container = %sb2.id, %pod, %netns, reason, drift = ?r.drift, "capture repaired");
                svc.metrics().repair(reason);
            }
            Found::Uncaptured { reason } => {
                tracing::warn!(container = %sb2.id, %pod, %netns, reason, drift = ?r.drift, repair = ?repair, "pod lacks its capture");
            }
            _ => {}
        }
        let state = match &found {
            Found::Ok => "ok",
            Found::Repaired { .. } => "repaired",
            Found::Uncaptured { reason: "drift" } => "drifted",
            _ => "uncaptured",
        };
        let owner = &planned.ruleset.owner;
        let rule_count = planned.ruleset.rule_count() as u32;
        for a in &owner.attachments {
            // The runtime's addresses are the primary's; another attachment keeps what the
            // agent recorded for it.
            let pod_ips = svc
                .registry()
                .of(&sb2.id)
                .into_iter()
                .find(|r| r.attachment.ifname == a.ifname)
                .map_or_else(|| sb2.ips.clone(), |r| r.pod_ips);
            svc.registry().insert(Record {
                attachment: sluice_proto::v1::Attachment {
                    container_id: sb2.id.clone(),
                    netns: netns.clone(),
                    pod: Some(sb2.pod.clone()),
                    fingerprint: owner.fingerprint.clone(),
                    profile: planned.profile.to_string(),
                    rule_count,
                    attached_at_unix: at as i64,
                    ifname: a.ifname.clone(),
                    network: a.network.clone(),
                    state: state.to_owned(),
                },
                annotations: sb2.annotations.clone(),
                pod_ips,
            });
        }
        found
    };
    service
        .run_for(&sb.id, work)
        .await
        .unwrap_or(Found::Uncaptured { reason: "busy" })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use sluice_proto::cri::runtime_service_server::{RuntimeService, RuntimeServiceServer};
    use sluice_proto::cri::{
        ListPodSandboxRequest, ListPodSandboxResponse, PodSandbox, PodSandboxMetadata,
        PodSandboxState, PodSandboxStatus, PodSandboxStatusRequest, PodSandboxStatusResponse,
    };
    use tonic::{Request, Response, Status};

    use super::*;

    /// A runtime with `pods` READY sandboxes asking for capture, each carrying 200 KiB of
    /// annotations (Kubernetes allows 256 KiB), plus one that does not ask; the status of
    /// sandbox `broken` cannot be read.
    #[derive(Debug)]
    struct Runtime {
        pods: usize,
    }

    #[tonic::async_trait]
    impl RuntimeService for Runtime {
        async fn list_pod_sandbox(
            &self,
            _: Request<ListPodSandboxRequest>,
        ) -> Result<Response<ListPodSandboxResponse>, Status> {
            let big = "x".repeat(200 * 1024);
            let sandbox = |id: String, asks: bool| PodSandbox {
                metadata: Some(PodSandboxMetadata {
                    name: id.clone(),
                    namespace: "default".into(),
                    uid: format!("uid-{id}"),
                    attempt: 0,
                }),
                id,
                state: PodSandboxState::SandboxReady as i32,
                annotations: HashMap::from([
                    (
                        if asks { "sluice.dev/redirect" } else { "other" }.to_owned(),
                        "enabled".to_owned(),
                    ),
                    (
                        "kubectl.kubernetes.io/last-applied-configuration".into(),
                        big.clone(),
                    ),
                ]),
                ..Default::default()
            };
            let mut items: Vec<PodSandbox> = (0..self.pods)
                .map(|i| sandbox(format!("pod-{i}"), true))
                .collect();
            items.push(sandbox("broken".into(), true));
            items.push(sandbox("plain".into(), false));
            Ok(Response::new(ListPodSandboxResponse { items }))
        }

        async fn pod_sandbox_status(
            &self,
            req: Request<PodSandboxStatusRequest>,
        ) -> Result<Response<PodSandboxStatusResponse>, Status> {
            let id = req.into_inner().pod_sandbox_id;
            if id == "broken" {
                return Err(Status::internal("failed to read the sandbox's state"));
            }
            Ok(Response::new(PodSandboxStatusResponse {
                status: Some(PodSandboxStatus {
                    id,
                    state: PodSandboxState::SandboxReady as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }))
        }
    }

    /// One pass over a runtime whose list is past gRPC's default 4 MiB, with one sandbox whose
    /// status cannot be read: every other sandbox is looked at, the pass says it is
    /// incomplete (status and metric), and the next good pass says it works again.
    #[tokio::test]
    async fn a_pass_survives_a_large_list_and_a_failing_sandbox() {
        let dir = tempfile::tempdir().expect("tmp");
        let socket = dir.path().join("cri.sock");
        let listener = tokio::net::UnixListener::bind(&socket).expect("bind");
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(
                    RuntimeServiceServer::new(Runtime { pods: 25 })
                        .max_encoding_message_size(usize::MAX),
                )
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener)),
        );
        let mut cri = Cri::new(&socket);
        let listing = cri.ready_sandboxes().await.expect("a 5 MiB list is read");
        assert_eq!(listing.sandboxes.len(), 25);
        assert_eq!(listing.not_asking, ["plain"]);
        assert_eq!(listing.failed.len(), 1);
        assert_eq!(listing.failed[0].0, "broken");

        let service = Arc::new(Agent::new(
            crate::model::plan::PlanDefaults::default(),
            crate::kernel::netns::Policy {
                roots: vec![crate::kernel::netns::Root::Dir("/nonexistent".into())],
                host: crate::kernel::netns::NsId { dev: 0, ino: 0 },
            },
            Arc::new(crate::metrics::Metrics::new()),
            Arc::new(std::sync::Mutex::new(Ok(()))),
        ));
        let mut state = PassState::default();
        pass(&service, &mut cri, Repair::Apply, &mut state).await;
        let status = service.discovery_status();
        assert!(status.starts_with("INCOMPLETE since "), "{status}");
        assert!(
            status.contains("1 could not be read (first broken"),
            "{status}"
        );
        let metrics = service.metrics().render();
        assert!(
            metrics.contains("sluice_reconcile_passes_total{result=\"partial\",reason=\"\"} 1"),
            "{metrics}"
        );
    }
}
