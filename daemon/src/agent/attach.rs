//! Attach: program a pod's capture for one of its attachments, and record it.

use std::time::{Duration, Instant};

use sluice_proto::v1::{AttachRequest, AttachResponse, AttachTiming, Attachment, Outcome};

use super::registry::{Record, pod_or_default};
use super::{Agent, AgentError, attached, pod_ips, required, to_map, unix_now};
use crate::kernel::capture::{self, Want};
use crate::model::plan::{self, Decision, Families};
use crate::model::ruleset::Attached;

impl Agent {
    pub async fn attach(
        &self,
        req: AttachRequest,
        limit: Duration,
    ) -> Result<AttachResponse, AgentError> {
        let start = Instant::now();
        let until = start + limit;
        let received_ns = capture::now_ns();
        required("container_id", &req.container_id)?;
        required("netns", &req.netns)?;
        let ips = pod_ips(&req.pod_ips)?;
        let pod = pod_or_default(req.pod);
        let want = self.want(to_map(req.annotations), &pod.uid, &req.container_id);
        // This attachment, and the pod's others the agent knows: the plan covers the families
        // of all of them (the kernel's own count decides once inside, see `capture::attach`).
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
        let Some(first) = want.plan(want.owner(&all, at)).map_err(AgentError::plan)? else {
            let reason = match plan::decide(&want.annotations, &ips, &want.defaults) {
                Ok(Decision::Skip { reason }) => reason,
                _ => "the pod does not ask for capture".to_owned(),
            };
            tracing::debug!(container = %req.container_id, %reason, "attach skipped");
            return Ok(AttachResponse {
                outcome: Outcome::Skipped.into(),
                reason,
                ..Default::default()
            });
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
            let started_ns = capture::now_ns();
            let restore = registry.get(&req.container_id).map(|r| Want {
                annotations: r.annotations,
                ..want.clone()
            });
            let annotations = want.annotations.clone();
            let (in_netns_ns, done) = ns
                .run(until, move || {
                    let in_netns_ns = capture::now_ns();
                    capture::attach(&want, this, &known, at, restore.as_ref())
                        .map(|done| (in_netns_ns, done))
                })
                .await
                .map_err(AgentError::netns)?
                .map_err(|e| {
                    let pod = format!("{}/{}", pod.namespace, pod.name);
                    tracing::warn!(container = %req.container_id, %pod, netns = %req.netns, error = %e, "attach failed");
                    AgentError::program(
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
            metrics.programmed(done.planned.profile);
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
                r.attachment.attached_at_unix = owner.attached_at as i64;
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
                    attached_at_unix: owner.attached_at as i64,
                },
                annotations,
                pod_ips: req.pod_ips,
            });
            Ok(AttachResponse {
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
                    replied_ns: capture::now_ns(),
                }),
            })
        };
        self.work
            .run_within(&key, limit, work)
            .await
            .map_err(AgentError::work)?
    }
}
