//! The reconciler: with the container runtime (CRI) and the kernel as the truth, every
//! `interval` (and once at start-up) it walks the node's READY sandboxes and, for each whose
//! annotations ask for capture, compares the pod's namespace with the plan — the same
//! comparison `Check` makes (table, device state, sysctls) — and repairs what is missing or
//! drifted through the same code path as `Attach` (`program::attach`, under the container's
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
//! Order and crashes: a repair is `program::attach` — the nftables table in one transaction,
//! then device state. A crash between the two leaves the table without TPROXY routing only for
//! a pod that had no capture at all (the table is the first thing a pod gets); the next pass
//! finds the missing rule or route and completes it. Working capture is never removed on
//! failure: a repair of an existing table is a repair in place (nothing removed when a step
//! fails).

use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::discovery::{Cri, Sandbox};
use crate::plan::{self, Decision};
use crate::program;
use crate::registry::Record;
use crate::ruleset::{Owner, Ruleset};
use crate::service::AgentService;

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
}

/// One visit's result, inside the namespace.
struct Visit {
    found: Found,
    /// Attach time to record (from the table, or now for a repair).
    at: u64,
    ifnames: Vec<String>,
    drift: Vec<String>,
    rule_count: u32,
}

/// Runs passes until the task is dropped.
pub async fn run(service: Arc<AgentService>, mut cri: Cri, repair: Repair, interval: Duration) {
    let mut unseen_once: HashSet<String> = HashSet::new();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        pass(&service, &mut cri, repair, &mut unseen_once).await;
    }
}

/// One pass over the runtime's READY sandboxes.
pub async fn pass(
    service: &Arc<AgentService>,
    cri: &mut Cri,
    repair: Repair,
    unseen_once: &mut HashSet<String>,
) {
    let socket = cri.socket().display().to_string();
    let sandboxes = match cri.ready_sandboxes().await {
        Ok(s) => s,
        Err(e) => {
            let status = format!("cri {socket}: {e}");
            // Once per change, not once per pass: a node without that runtime would log it
            // every interval.
            if service.discovery_status() != status {
                tracing::warn!(error = %e, "sandbox discovery failed; will retry every interval");
            }
            service.set_discovery(status);
            service.metrics().reconcile_pass("error");
            return;
        }
    };
    service.set_sandboxes(&sandboxes);
    let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut uncaptured = 0i64;
    // The interfaces recorded per container, read once per pass.
    let mut recorded_ifnames: std::collections::HashMap<String, Vec<String>> = Default::default();
    for a in service.registry().list() {
        if !a.ifname.is_empty() {
            recorded_ifnames
                .entry(a.container_id)
                .or_default()
                .push(a.ifname);
        }
    }
    for sb in &sandboxes {
        let known = recorded_ifnames.remove(&sb.id).unwrap_or_default();
        let found = reconcile_sandbox(service, sb, repair, known).await;
        let key = match &found {
            Found::NotOurs => "not_ours",
            Found::Ok => "ok",
            Found::Repaired { .. } => "repaired",
            Found::Uncaptured { .. } => "uncaptured",
        };
        *counts.entry(key).or_default() += 1;
        if matches!(found, Found::Uncaptured { .. }) {
            uncaptured += 1;
        }
    }
    service.metrics().uncaptured_pods.set(uncaptured);
    // Forget records of sandboxes the runtime no longer lists, on the second miss.
    let listed: HashSet<&str> = sandboxes.iter().map(|s| s.id.as_str()).collect();
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
    for id in missing.intersection(unseen_once) {
        let n = service.registry().remove(id, "");
        tracing::info!(container = %id, forgotten = n, "sandbox gone from the runtime; records forgotten");
    }
    *unseen_once = missing;
    service.refresh_attached_gauge();
    service.metrics().reconcile_pass("ok");
    service.set_discovery(format!(
        "cri {socket}: {} ready sandboxes; last pass {counts:?}",
        sandboxes.len()
    ));
    tracing::debug!(sandboxes = sandboxes.len(), ?counts, "reconcile pass");
}

/// Reconciles one sandbox; see the module docs.
pub async fn reconcile_sandbox(
    service: &Arc<AgentService>,
    sb: &Sandbox,
    repair: Repair,
    known_ifnames: Vec<String>,
) -> Found {
    let Some(netns) = sb.netns.clone() else {
        return Found::NotOurs;
    };
    let ips: Vec<IpAddr> = sb
        .ips
        .iter()
        .filter_map(|s| s.parse::<IpAddr>().ok())
        .collect();
    let (plan, profile) = match plan::decide(&sb.annotations, &ips, &service.config().plan) {
        Ok(Decision::Capture { plan, profile }) => (plan, profile),
        Ok(Decision::Skip { .. }) => return Found::NotOurs,
        Err(e) => {
            tracing::warn!(container = %sb.id, pod = %format!("{}/{}", sb.pod.namespace, sb.pod.name), error = %e, "sandbox asks for capture with an invalid annotation; left alone");
            return Found::NotOurs;
        }
    };
    let ns = match service.policy().open(&netns) {
        Ok(ns) => ns,
        Err(e) => {
            tracing::debug!(container = %sb.id, %netns, error = %e, "sandbox netns not usable; skipped");
            return Found::NotOurs;
        }
    };
    let fingerprint = plan.fingerprint();
    let fingerprint_out = fingerprint.clone();
    let (svc, sb2, plan2) = (service.clone(), sb.clone(), plan.clone());
    let id = sb.id.clone();
    let uid = sb.pod.uid.clone();
    let work = async move {
        let pod = format!("{}/{}", sb2.pod.namespace, sb2.pod.name);
        // Inspect, compare and (in apply mode) repair in one visit to the namespace.
        let visit = ns
            .run(move || -> Result<Visit, program::ProgramError> {
                let default_ifnames = if known_ifnames.is_empty() {
                    vec!["eth0".to_owned()]
                } else {
                    known_ifnames
                };
                let rs = Ruleset::from_plan(&plan2, Owner::new(&fingerprint, &uid, &id));
                let act = match repair {
                    Repair::Apply => program::Act::Repair,
                    Repair::Report => program::Act::Diff,
                };
                let now = crate::service::unix_now();
                let r = program::reconcile(&rs, &plan2, &default_ifnames, act, now)?;
                let reason = if r.missing { "missing" } else { "drift" };
                let rule_count = rs.rule_count() as u32;
                let (found, at) = match r.repaired {
                    None if r.drift.is_empty() => {
                        (Found::Ok, r.live.as_ref().map_or(0, |o| o.attached_at))
                    }
                    None => (Found::Uncaptured { reason }, 0),
                    Some(Ok(_)) => (Found::Repaired { reason }, now),
                    Some(Err(e)) => {
                        tracing::error!(error = %e, reason, "repairing the capture failed");
                        (Found::Uncaptured { reason }, 0)
                    }
                };
                Ok(Visit {
                    found,
                    at,
                    ifnames: r.ifnames,
                    drift: r.drift,
                    rule_count,
                })
            })
            .await;
        let visit = match visit {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                tracing::warn!(container = %sb2.id, %pod, error = %e, "reading the capture failed");
                return Found::Uncaptured { reason: "error" };
            }
            Err(e) => {
                tracing::debug!(container = %sb2.id, error = %e, "sandbox netns went away");
                return Found::NotOurs;
            }
        };
        match &visit.found {
            Found::Repaired { reason } => {
                tracing::warn!(container = %sb2.id, %pod, %netns, reason, drift = ?visit.drift, "capture repaired");
                svc.metrics().repair(reason);
            }
            Found::Uncaptured { reason } => {
                tracing::warn!(container = %sb2.id, %pod, %netns, reason, drift = ?visit.drift, repair = ?repair, "pod lacks its capture");
            }
            _ => {}
        }
        let state = match &visit.found {
            Found::Ok => "ok",
            Found::Repaired { .. } => "repaired",
            Found::Uncaptured { reason: "drift" } => "drifted",
            _ => "uncaptured",
        };
        for ifname in visit.ifnames {
            svc.registry().insert(Record {
                attachment: sluice_proto::v1::Attachment {
                    container_id: sb2.id.clone(),
                    netns: netns.clone(),
                    pod: Some(sb2.pod.clone()),
                    fingerprint: fingerprint_out.clone(),
                    profile: profile.to_string(),
                    rule_count: visit.rule_count,
                    attached_at_unix: visit.at as i64,
                    ifname,
                    state: state.to_owned(),
                },
                annotations: sb2.annotations.clone(),
                pod_ips: sb2.ips.clone(),
            });
        }
        visit.found
    };
    service
        .run_for(&sb.id, work)
        .await
        .unwrap_or(Found::Uncaptured { reason: "busy" })
}
