//! Explain: what an Attach with these annotations would program, touching nothing.

use std::collections::BTreeMap;
use std::net::IpAddr;

use sluice_proto::v1::{ExplainResponse, Outcome};

use sluice_proto::v1::ExplainRequest;

use super::{Agent, AgentError, DEFAULT_IFNAME, pod_ips, to_map};
use crate::model::plan::{self, Decision, Families, PlanError};
use crate::model::ruleset::{Attached, Owner, Ruleset};

/// Renders what an Attach with these annotations would program under `defaults` (the node's
/// configuration). Shared by the Explain RPC and `sluicectl explain`.
pub fn explain_under(
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
                device: crate::kernel::device::DeviceSetup::from_plan(&plan).describe(),
                plan: format!("{plan:#?}"),
                notes,
            }
        }
    })
}

impl Agent {
    /// Explain under this node's defaults.
    pub fn explain(&self, req: ExplainRequest) -> Result<ExplainResponse, AgentError> {
        let ips = pod_ips(&req.pod_ips)?;
        explain_under(&to_map(req.annotations), &ips, self.defaults()).map_err(AgentError::plan)
    }
}
