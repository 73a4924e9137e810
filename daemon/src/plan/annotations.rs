//! The native `sluice.dev/*` annotations, and the value grammar every profile shares.

use std::collections::BTreeMap;
use std::str::FromStr;

use ipnet::IpNet;

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
        mode: CaptureMode::Redirect,
        outbound_port: d.outbound_port,
        inbound_port: d.inbound_port,
        proxy_uid: d.proxy_uid,
        proxy_gid: Some(d.proxy_gid),
        include_inbound_ports: Ports::All,
        exclude_inbound_ports: d.exclude_inbound_ports.clone(),
        exclude_inbound_sources: Vec::new(),
        exclude_outbound_ports: Vec::new(),
        include_outbound_ports: Vec::new(),
        include_outbound_cidrs: Cidrs::All,
        exclude_outbound_cidrs: Vec::new(),
        exclude_interfaces: Vec::new(),
        dns_port: None,
        loopback: Loopback::istio(),
    }
}

/// Applies every `sluice.dev/*` annotation present over `plan`. An unknown `sluice.dev/` key
/// is an error rather than being ignored: a typo must not silently leave a pod with a capture
/// it did not ask for.
pub(super) fn apply_overrides(
    ann: &BTreeMap<String, String>,
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

pub(super) fn invalid(annotation: &str, value: &str, reason: impl Into<String>) -> PlanError {
    PlanError {
        annotation: annotation.to_owned(),
        value: value.to_owned(),
        reason: reason.into(),
    }
}

/// Parses one annotation if present, attaching the key and value to any error.
pub(super) fn get<T>(
    ann: &BTreeMap<String, String>,
    key: &str,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Option<T>, PlanError> {
    ann.get(key)
        .map(|v| parse(v).map_err(|reason| invalid(key, v, reason)))
        .transpose()
}

/// `enabled` or `disabled`.
pub(super) fn switch(s: &str) -> Result<bool, String> {
    match s.trim() {
        "enabled" => Ok(true),
        "disabled" => Ok(false),
        other => Err(format!("{other:?}: expected enabled or disabled")),
    }
}

pub(super) fn port(s: &str) -> Result<u16, String> {
    match u16::from_str(s.trim()) {
        Ok(0) | Err(_) => Err(format!("{:?} is not a port (1-65535)", s.trim())),
        Ok(p) => Ok(p),
    }
}

/// Largest `a-b` port range expanded into single ports (Linkerd allows ranges).
const MAX_RANGE: u16 = 256;

/// A port or an inclusive range `a-b`, expanded.
pub(super) fn ports_or_range(s: &str) -> Result<Vec<u16>, String> {
    match s.trim().split_once('-') {
        None => port(s).map(|p| vec![p]),
        Some((a, b)) => {
            let (a, b) = (port(a)?, port(b)?);
            if a > b || b - a >= MAX_RANGE {
                return Err(format!(
                    "{:?} is not a range of at most {MAX_RANGE} ports",
                    s.trim()
                ));
            }
            Ok((a..=b).collect())
        }
    }
}

pub(super) fn id(s: &str) -> Result<u32, String> {
    u32::from_str(s.trim()).map_err(|_| format!("{:?} is not a numeric id", s.trim()))
}

pub(super) fn cidr(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    let net = IpNet::from_str(s)
        .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{s:?} is not a CIDR"))?;
    Ok(net.trunc())
}

/// A Linux interface name (at most 15 bytes, no `/`, whitespace or NUL).
pub(super) fn interface(s: &str) -> Result<String, String> {
    let s = s.trim();
    let ok = !s.is_empty()
        && s.len() < 16
        && s != "."
        && s != ".."
        && !s
            .bytes()
            .any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace());
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!("{s:?} is not an interface name"))
    }
}

/// A comma-separated list. The empty string is the empty list; an empty item (`80,,90`,
/// `80,`) is an error because it is almost always a templating mistake.
pub(super) fn list<T>(s: &str, item: impl Fn(&str) -> Result<T, String>) -> Result<Vec<T>, String> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    s.split(',')
        .map(|part| {
            if part.trim().is_empty() {
                Err("empty list item".to_owned())
            } else {
                item(part)
            }
        })
        .collect()
}

/// `*` (everything, `None`) or a list (`Some`, possibly empty: nothing).
pub(super) fn star_or<T>(
    s: &str,
    item: impl Fn(&str) -> Result<T, String>,
) -> Result<Option<Vec<T>>, String> {
    if s.trim() == "*" {
        Ok(None)
    } else {
        list(s, item).map(Some)
    }
}
