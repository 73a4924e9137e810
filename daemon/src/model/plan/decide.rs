//! Which profile a pod's annotations select, and the decision: a plan, or why the pod is
//! left alone.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

/// Whether a profile's trigger annotation is present, and its gate and plan from its own
/// configuration annotation (Kuma, Consul).
type Gate = fn(&BTreeMap<String, String>) -> bool;
type MeshFn = fn(&BTreeMap<String, String>) -> Result<MeshPlan, PlanError>;

use super::{
    Families, MeshPlan, PlanDefaults, PlanError, REDIRECT, RedirectPlan, annotations, consul,
    istio, kuma, linkerd,
};

/// Which annotation set a plan came from (shown by `sluicectl explain` and recorded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// `sluice.dev/*` annotations.
    Native,
    /// Istio's sidecar annotations (`sidecar.istio.io/*`, `traffic.sidecar.istio.io/*`).
    Istio,
    /// Linkerd's proxy annotations (`linkerd.io/*`, `config.linkerd.io/*`).
    Linkerd,
    /// Kuma's transparent-proxy configuration (`traffic.kuma.io/transparent-proxy-config`).
    Kuma,
    /// Consul's redirect configuration (`consul.hashicorp.com/redirect-traffic-config`).
    Consul,
}

impl Profile {
    /// The annotation a profile's plan comes from (shown by `sluicectl explain`), by the
    /// profile's name as [`Profile`] displays it.
    pub fn source_annotation(name: &str) -> Option<&'static str> {
        Some(match name {
            "native" => REDIRECT,
            "istio" => istio::STATUS,
            "linkerd" => sluice_proto::annotations::LINKERD_PROXY_VERSION,
            "kuma" => kuma::CONFIG,
            "consul" => consul::CONFIG,
            _ => return None,
        })
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Profile::Native => "native",
            Profile::Istio => "istio",
            Profile::Linkerd => "linkerd",
            Profile::Kuma => "kuma",
            Profile::Consul => "consul",
        })
    }
}

/// What to do with a pod.
// One Decision exists per request and is matched right away; boxing the plan would only add
// an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Program this plan.
    Capture {
        plan: RedirectPlan,
        profile: Profile,
        /// Native `sluice.dev/*` annotations present on a mesh pod and not applied (see
        /// [`PlanDefaults::native_overrides_on_mesh_pods`]); empty otherwise.
        ignored: Vec<String>,
    },
    /// Leave the pod alone, for this reason.
    Skip { reason: String },
}

/// Decides a pod's capture from its annotations and addresses. Pure: same input, same output.
/// See [`decide_for`]; the families are those of `pod_ips` (both when there are none).
pub fn decide(
    annotations: &BTreeMap<String, String>,
    pod_ips: &[IpAddr],
    defaults: &PlanDefaults,
) -> Result<Decision, PlanError> {
    decide_for(annotations, Families::of(pod_ips), defaults)
}

/// Decides a pod's capture from its annotations and the IP families of its addresses (of all
/// its attachments). Pure: same input, same output.
///
/// The captured IP families are `families` unless `sluice.dev/ip-families` names them.
///
/// `sluice.dev/redirect: disabled` always skips. Otherwise a pod injected by a mesh whose
/// profile is enabled gets that mesh's plan, and a pod with `sluice.dev/redirect: enabled`
/// gets the native defaults. Every other `sluice.dev/*` annotation present overrides the
/// corresponding field of a native plan; on a mesh pod only where the node allows it
/// ([`PlanDefaults::native_overrides_on_mesh_pods`]), and otherwise they are listed as ignored.
pub fn decide_for(
    annotations: &BTreeMap<String, String>,
    families: Families,
    defaults: &PlanDefaults,
) -> Result<Decision, PlanError> {
    let opted_in = match annotations::redirect(annotations)? {
        Some(false) => {
            return Ok(Decision::Skip {
                reason: format!("{REDIRECT} is disabled"),
            });
        }
        Some(true) => true,
        None => false,
    };
    // Kuma's `ipFamilyMode: ipv4` and a Consul pod that is not dual-stack leave IPv6 alone
    // whatever the pod's addresses.
    let mut ipv4_only = false;
    let base = if istio::injected(annotations) {
        if !defaults.istio {
            return Ok(Decision::Skip {
                reason: "istio profile is disabled in the agent configuration".into(),
            });
        }
        if let Some(reason) = istio::gate(annotations)? {
            return Ok(Decision::Skip { reason });
        }
        istio::plan(annotations, defaults)?.map(|p| (p, Profile::Istio))
    } else if linkerd::injected(annotations) {
        if !defaults.linkerd {
            return Ok(Decision::Skip {
                reason: "linkerd profile is disabled in the agent configuration".into(),
            });
        }
        Some((linkerd::plan(annotations)?, Profile::Linkerd))
    } else if let Some((profile, enabled, plan)) = [
        (
            Profile::Kuma,
            kuma::injected as Gate,
            defaults.kuma,
            kuma::plan as MeshFn,
        ),
        (
            Profile::Consul,
            consul::injected,
            defaults.consul,
            consul::plan,
        ),
    ]
    .into_iter()
    .find(|(_, injected, ..)| injected(annotations))
    .map(|(profile, _, enabled, plan)| (profile, enabled, plan))
    {
        if !enabled {
            return Ok(Decision::Skip {
                reason: format!("{profile} profile is disabled in the agent configuration"),
            });
        }
        match plan(annotations)? {
            MeshPlan::Skip(reason) => return Ok(Decision::Skip { reason }),
            MeshPlan::Capture { plan, ipv6 } => {
                ipv4_only = !ipv6;
                Some((plan, profile))
            }
        }
    } else if opted_in {
        Some((annotations::native_defaults(defaults), Profile::Native))
    } else {
        return Ok(Decision::Skip {
            reason: format!("no {REDIRECT} annotation and no enabled mesh profile matches"),
        });
    };
    let Some((mut plan, profile)) = base else {
        return Ok(Decision::Skip {
            reason: "the mesh's interception mode is NONE".into(),
        });
    };
    plan.families = families;
    if ipv4_only {
        plan.families.ipv6 = false;
    }
    let ignored = if profile == Profile::Native || defaults.native_overrides_on_mesh_pods {
        annotations::apply_overrides(annotations, defaults, &mut plan)?;
        Vec::new()
    } else {
        annotations::overrides_present(annotations)
    };
    Ok(Decision::Capture {
        plan,
        profile,
        ignored,
    })
}
