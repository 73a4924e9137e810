//! Detach: remove an attachment, and the capture with the pod's last one.

use std::time::{Duration, Instant};

use sluice_proto::v1::{DetachRequest, DetachResponse};

use super::{Agent, AgentError, required};
use crate::kernel::capture::{self, Want};
use crate::kernel::netns::NetnsError;

impl Agent {
    pub async fn detach(
        &self,
        req: DetachRequest,
        limit: Duration,
    ) -> Result<DetachResponse, AgentError> {
        let until = Instant::now() + limit;
        required("container_id", &req.container_id)?;
        self.note_detach(&req.container_id);
        let ns = if req.netns.is_empty() {
            None
        } else {
            match self.policy.open(&req.netns) {
                Ok(ns) => Some(ns),
                Err(NetnsError::Gone(_)) => None,
                Err(e) => return Err(AgentError::netns(e)),
            }
        };
        let registry = self.registry.clone();
        let defaults = self.defaults.clone();
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
                        .run(until, move || capture::detach_for(&if_, want.as_ref()))
                        .await
                        .map_err(AgentError::netns)?
                        .map_err(|e| {
                            tracing::warn!(container = %id, %netns, error = %e, "detach failed");
                            AgentError::program(
                                &e,
                                format!(
                                    "removing sluice from container {id} in netns {netns}: {e}"
                                ),
                            )
                        })?;
                    match done {
                        capture::Detached::Removed(true) => (true, String::new(), true),
                        capture::Detached::Removed(false) => {
                            (false, "no sluice table in the netns".to_owned(), true)
                        }
                        capture::Detached::Kept {
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
            Ok(DetachResponse { removed, reason })
        };
        self.work
            .run_within(&key, limit, work)
            .await
            .map_err(AgentError::work)?
    }
}
