//! The Linkerd profile: a pod injected by Linkerd (`linkerd.io/proxy-version` present) is
//! captured as linkerd-cni / proxy-init capture it, honouring Linkerd's config annotations.
//! Reference: linkerd2-proxy-init `pkg/iptables/iptables.go` and linkerd2's CNI chart
//! defaults (shared/reference/linkerd-default.rules).

use std::collections::BTreeMap;

use super::values::{cidr, get, id, list, port_ranges};
use super::{Loopback, PlanError, RedirectPlan};

/// Present on every pod the Linkerd injector has processed.
pub const PROXY_VERSION: &str = sluice_proto::annotations::LINKERD_PROXY_VERSION;
const SKIP_OUTBOUND_PORTS: &str = "config.linkerd.io/skip-outbound-ports";
const SKIP_INBOUND_PORTS: &str = "config.linkerd.io/skip-inbound-ports";
const SKIP_SUBNETS: &str = "config.linkerd.io/skip-subnets";
const PROXY_UID: &str = "config.linkerd.io/proxy-uid";
const PROXY_GID: &str = "config.linkerd.io/proxy-gid";

/// The proxy's control (4190) and admin (4191) ports, never redirected inbound.
const IGNORED_INBOUND: [u16; 2] = [4190, 4191];

pub fn injected(ann: &BTreeMap<String, String>) -> bool {
    ann.contains_key(PROXY_VERSION)
}

/// Every annotation key this profile reads.
pub fn keys() -> &'static [&'static str] {
    &[
        PROXY_VERSION,
        SKIP_OUTBOUND_PORTS,
        SKIP_INBOUND_PORTS,
        SKIP_SUBNETS,
        PROXY_UID,
        PROXY_GID,
    ]
}

pub(super) fn plan(ann: &BTreeMap<String, String>) -> Result<RedirectPlan, PlanError> {
    let mut exclude_inbound_ports = IGNORED_INBOUND.to_vec();
    // skip-inbound-ports appends to the defaults; skip-outbound-ports and skip-subnets replace
    // (empty in CNI mode).
    exclude_inbound_ports.extend(get(ann, SKIP_INBOUND_PORTS, port_ranges)?.unwrap_or_default());
    Ok(RedirectPlan {
        proxy_gid: get(ann, PROXY_GID, id)?,
        exclude_inbound_ports,
        exclude_inbound_sources: get(ann, SKIP_SUBNETS, |v| list(v, cidr))?.unwrap_or_default(),
        exclude_outbound_ports: get(ann, SKIP_OUTBOUND_PORTS, port_ranges)?.unwrap_or_default(),
        ..RedirectPlan::capture_all(
            4140,
            4143,
            get(ann, PROXY_UID, id)?.unwrap_or(2102),
            Loopback::IgnoreAll,
        )
    })
}
