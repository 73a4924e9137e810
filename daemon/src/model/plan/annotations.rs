//! The native `sluice.dev/*` annotations.

use std::collections::BTreeMap;

use super::sysctls::sysctl;
use super::values::{
    cidr, families, get, id, interface, invalid, list, mode, port, route_table, star_or, switch,
    tproxy_mark,
};
use super::{CaptureMode, Cidrs, Loopback, PlanDefaults, PlanError, Ports, RedirectPlan};

/// Every native annotation starts with this.
pub const ANNOTATION_PREFIX: &str = "sluice.dev/";

/// Opt-in switch: `enabled` or `disabled`.
pub const REDIRECT: &str = sluice_proto::annotations::REDIRECT;
const OUTBOUND_PORT: &str = "sluice.dev/outbound-port";
const INBOUND_PORT: &str = "sluice.dev/inbound-port";
const PROXY_UID: &str = "sluice.dev/proxy-uid";
const PROXY_GID: &str = "sluice.dev/proxy-gid";
const INCLUDE_INBOUND_PORTS: &str = "sluice.dev/include-inbound-ports";
const EXCLUDE_INBOUND_PORTS: &str = "sluice.dev/exclude-inbound-ports";
const EXCLUDE_OUTBOUND_PORTS: &str = "sluice.dev/exclude-outbound-ports";
const INCLUDE_OUTBOUND_CIDRS: &str = "sluice.dev/include-outbound-cidrs";
const EXCLUDE_OUTBOUND_CIDRS: &str = "sluice.dev/exclude-outbound-cidrs";
const EXCLUDE_INTERFACES: &str = "sluice.dev/exclude-interfaces";
const DNS_CAPTURE: &str = "sluice.dev/dns-capture";
const DNS_PORT: &str = "sluice.dev/dns-port";
const SYSCTLS: &str = "sluice.dev/sysctls";
const MODE: &str = "sluice.dev/mode";
const TPROXY_MARK: &str = "sluice.dev/tproxy-mark";
const TPROXY_TABLE: &str = "sluice.dev/tproxy-table";
const IP_FAMILIES: &str = "sluice.dev/ip-families";

/// Where captured DNS goes unless `sluice.dev/dns-port` says otherwise (Istio's DNS proxy).
const DEFAULT_DNS_PORT: u16 = 15053;

/// All native annotation keys this agent understands.
pub fn native_keys() -> &'static [&'static str] {
    &[
        REDIRECT,
        OUTBOUND_PORT,
        INBOUND_PORT,
        PROXY_UID,
        PROXY_GID,
        INCLUDE_INBOUND_PORTS,
        EXCLUDE_INBOUND_PORTS,
        EXCLUDE_OUTBOUND_PORTS,
        INCLUDE_OUTBOUND_CIDRS,
        EXCLUDE_OUTBOUND_CIDRS,
        EXCLUDE_INTERFACES,
        DNS_CAPTURE,
        DNS_PORT,
        SYSCTLS,
        MODE,
        TPROXY_MARK,
        TPROXY_TABLE,
        IP_FAMILIES,
    ]
}

/// `Some(true)` enabled, `Some(false)` disabled, `None` absent; anything else is an error.
pub(super) fn redirect(ann: &BTreeMap<String, String>) -> Result<Option<bool>, PlanError> {
    match ann.get(REDIRECT).map(String::as_str) {
        None => Ok(None),
        Some("enabled") => Ok(Some(true)),
        Some("disabled") => Ok(Some(false)),
        Some(other) => Err(invalid(REDIRECT, other, "expected enabled or disabled")),
    }
}

/// The native plan before overrides: Istio's sidecar capture with the node's defaults.
pub(super) fn native_defaults(d: &PlanDefaults) -> RedirectPlan {
    RedirectPlan {
        proxy_gid: Some(d.proxy_gid),
        exclude_inbound_ports: d.exclude_inbound_ports.clone(),
        ..RedirectPlan::capture_all(
            d.outbound_port,
            d.inbound_port,
            d.proxy_uid,
            Loopback::istio(),
        )
    }
}

/// The `sluice.dev/*` annotations present that would override a plan (all but the opt-in
/// switch), in key order.
pub(super) fn overrides_present(ann: &BTreeMap<String, String>) -> Vec<String> {
    ann.keys()
        .filter(|k| k.starts_with(ANNOTATION_PREFIX) && k.as_str() != REDIRECT)
        .cloned()
        .collect()
}

/// Applies every `sluice.dev/*` annotation present over `plan`. An unknown `sluice.dev/` key
/// is an error rather than being ignored: a typo must not silently leave a pod with a capture
/// it did not ask for.
pub(super) fn apply_overrides(
    ann: &BTreeMap<String, String>,
    defaults: &PlanDefaults,
    plan: &mut RedirectPlan,
) -> Result<(), PlanError> {
    if let Some((key, value)) = ann
        .iter()
        .find(|(k, _)| k.starts_with(ANNOTATION_PREFIX) && !native_keys().contains(&k.as_str()))
    {
        return Err(invalid(key, value, "unknown sluice.dev annotation"));
    }
    if let Some(v) = get(ann, OUTBOUND_PORT, port)? {
        plan.outbound_port = v;
    }
    if let Some(v) = get(ann, INBOUND_PORT, port)? {
        plan.inbound_port = v;
    }
    if let Some(v) = get(ann, PROXY_UID, id)? {
        plan.proxy_uid = v;
    }
    if let Some(v) = get(ann, PROXY_GID, id)? {
        plan.proxy_gid = Some(v);
    }
    if let Some(v) = get(ann, INCLUDE_INBOUND_PORTS, |v| star_or(v, port))? {
        plan.include_inbound_ports = v.map_or(Ports::All, Ports::Only);
    }
    if let Some(v) = get(ann, EXCLUDE_INBOUND_PORTS, |v| list(v, port))? {
        plan.exclude_inbound_ports = v;
    }
    if let Some(v) = get(ann, EXCLUDE_OUTBOUND_PORTS, |v| list(v, port))? {
        plan.exclude_outbound_ports = v;
    }
    if let Some(v) = get(ann, INCLUDE_OUTBOUND_CIDRS, |v| star_or(v, cidr))? {
        plan.include_outbound_cidrs = v.map_or(Cidrs::All, Cidrs::Only);
    }
    if let Some(v) = get(ann, EXCLUDE_OUTBOUND_CIDRS, |v| list(v, cidr))? {
        plan.exclude_outbound_cidrs = v;
    }
    if let Some(v) = get(ann, EXCLUDE_INTERFACES, |v| list(v, interface))? {
        plan.exclude_interfaces = v;
    }
    if let Some(v) = get(ann, IP_FAMILIES, families)? {
        plan.families = v;
    }
    let mark = get(ann, TPROXY_MARK, tproxy_mark)?;
    let table = get(ann, TPROXY_TABLE, route_table)?;
    let tproxy = match get(ann, MODE, mode)? {
        Some(false) => false,
        Some(true) => true,
        None => matches!(plan.mode, CaptureMode::Tproxy { .. }),
    };
    plan.mode = if tproxy {
        let (mut m, mut t) = match plan.mode {
            CaptureMode::Tproxy { mark, table } => (mark, table),
            CaptureMode::Redirect => (defaults.tproxy_mark, defaults.tproxy_table),
        };
        m = mark.unwrap_or(m);
        t = table.unwrap_or(t);
        CaptureMode::Tproxy { mark: m, table: t }
    } else {
        if let Some((key, v)) = [TPROXY_MARK, TPROXY_TABLE]
            .into_iter()
            .find_map(|k| ann.get(k).map(|v| (k, v)))
        {
            return Err(invalid(
                key,
                v,
                "only meaningful with sluice.dev/mode: tproxy",
            ));
        }
        CaptureMode::Redirect
    };
    if let Some(v) = get(ann, SYSCTLS, |v| {
        list(v, |s| sysctl(s, &defaults.allowed_unsafe_sysctls))
    })? {
        plan.sysctls = v;
    }
    let dns_port = get(ann, DNS_PORT, port)?;
    match get(ann, DNS_CAPTURE, switch)? {
        Some(true) => plan.dns_port = Some(dns_port.unwrap_or(DEFAULT_DNS_PORT)),
        Some(false) => plan.dns_port = None,
        None => {
            if let (Some(p), Some(current)) = (dns_port, plan.dns_port.as_mut()) {
                *current = p;
            }
        }
    }
    Ok(())
}
