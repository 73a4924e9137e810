//! Check: compare a pod's namespace with its plan, changing nothing.

use std::time::{Duration, Instant};

use sluice_proto::v1::{Attachment, CheckRequest, CheckResponse};

use super::registry::Record;
use super::{Agent, AgentError, DEFAULT_IFNAME, attached, pod_ips, required, to_map};
use crate::kernel::capture::{self};
use crate::model::plan::Families;
use crate::model::ruleset::Attached;

impl Agent {
    pub async fn check(
        &self,
        req: CheckRequest,
        limit: Duration,
    ) -> Result<CheckResponse, AgentError> {
        let until = Instant::now() + limit;
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
            return Ok(CheckResponse {
                ok: true,
                ..Default::default()
            });
        }
        let record = records.first();
        let netns = if req.netns.is_empty() {
            record
                .map(|r| r.attachment.netns.clone())
                .ok_or_else(|| AgentError::NotFound {
                    field: "container_id",
                    message: format!(
                        "container_id: no attachment recorded for {} and no netns given",
                        req.container_id
                    ),
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
        want.plan(want.owner(&fallback, 0))
            .map_err(AgentError::plan)?;
        let ns = self.open(&netns)?;
        let r = self
            .work
            .run_within(&req.container_id, limit, async move {
                ns.run(until, move || {
                    capture::reconcile(&want, &fallback, capture::Act::Diff, 0)
                })
                .await
                .map_err(AgentError::netns)
            })
            .await
            .map_err(AgentError::work)??
            .map_err(|e| AgentError::program(&e, format!("reading the capture in {netns}: {e}")))?;
        if !r.drift.is_empty() {
            tracing::warn!(container = %req.container_id, %netns, drift = ?r.drift, "drift detected");
        }
        Ok(CheckResponse {
            ok: r.drift.is_empty(),
            drift: r.drift,
            expected_fingerprint: r
                .planned
                .map(|p| p.ruleset.owner.fingerprint)
                .unwrap_or_default(),
            live_fingerprint: r.live.map(|o| o.fingerprint).unwrap_or_default(),
        })
    }
}
