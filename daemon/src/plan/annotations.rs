//! The native `sluice.dev/*` annotations and the value grammar they share.

use std::collections::BTreeMap;
use std::str::FromStr;

use ipnet::IpNet;

use super::{CaptureMode, Cidrs, Decision, PlanDefaults, PlanError, Ports, Profile, RedirectPlan};

/// Every native annotation starts with this.
pub const ANNOTATION_PREFIX: &str = "sluice.dev/";

/// Opt-in switch: `enabled` or `disabled`.
pub const REDIRECT: &str = "sluice.dev/redirect";
const OUTBOUND_PORT: &str = "sluice.dev/outbound-port";
const INBOUND_PORT: &str = "sluice.dev/inbound-port";
const PROXY_UID: &str = "sluice.dev/proxy-uid";
const PROXY_GID: &str = "sluice.dev/proxy-gid";
const INCLUDE_INBOUND_PORTS: &str = "sluice.dev/include-inbound-ports";
const EXCLUDE_INBOUND_PORTS: &str = "sluice.dev/exclude-inbound-ports";
const EXCLUDE_OUTBOUND_PORTS: &str = "sluice.dev/exclude-outbound-ports";
const INCLUDE_OUTBOUND_CIDRS: &str = "sluice.dev/include-outbound-cidrs";
const EXCLUDE_OUTBOUND_CIDRS: &str = "sluice.dev/exclude-outbound-cidrs";

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
    ]
}

/// Plans from `sluice.dev/*`. An unknown `sluice.dev/` key is an error rather than being
/// ignored: a typo must not silently leave a pod with a capture it did not ask for.
pub(super) fn native(
    ann: &BTreeMap<String, String>,
    defaults: &PlanDefaults,
) -> Result<Decision, PlanError> {
    match ann.get(REDIRECT).map(String::as_str) {
        None => {
            return Ok(Decision::Skip {
                reason: format!("no {REDIRECT} annotation"),
            });
        }
        Some("enabled") => {}
        Some("disabled") => {
            return Ok(Decision::Skip {
                reason: format!("{REDIRECT} is disabled"),
            });
        }
        Some(other) => return Err(invalid(REDIRECT, other, "expected enabled or disabled")),
    }
    if let Some((key, value)) = ann
        .iter()
        .find(|(k, _)| k.starts_with(ANNOTATION_PREFIX) && !native_keys().contains(&k.as_str()))
    {
        return Err(invalid(key, value, "unknown sluice.dev annotation"));
    }

    let plan = RedirectPlan {
        mode: CaptureMode::Redirect,
        outbound_port: get(ann, OUTBOUND_PORT, port)?.unwrap_or(defaults.outbound_port),
        inbound_port: get(ann, INBOUND_PORT, port)?.unwrap_or(defaults.inbound_port),
        proxy_uid: get(ann, PROXY_UID, id)?.unwrap_or(defaults.proxy_uid),
        proxy_gid: get(ann, PROXY_GID, id)?.unwrap_or(defaults.proxy_gid),
        include_inbound_ports: get(ann, INCLUDE_INBOUND_PORTS, |v| star_or(v, port))?
            .map_or(Ports::All, |p| p.map_or(Ports::All, Ports::Only)),
        exclude_inbound_ports: get(ann, EXCLUDE_INBOUND_PORTS, |v| list(v, port))?
            .unwrap_or_else(|| defaults.exclude_inbound_ports.clone()),
        exclude_outbound_ports: get(ann, EXCLUDE_OUTBOUND_PORTS, |v| list(v, port))?
            .unwrap_or_default(),
        include_outbound_cidrs: get(ann, INCLUDE_OUTBOUND_CIDRS, |v| star_or(v, cidr))?
            .map_or(Cidrs::All, |c| c.map_or(Cidrs::All, Cidrs::Only)),
        exclude_outbound_cidrs: get(ann, EXCLUDE_OUTBOUND_CIDRS, |v| list(v, cidr))?
            .unwrap_or_default(),
        tunnel_port: 15008,
        passthrough_source: std::net::Ipv4Addr::new(127, 0, 0, 6),
    };
    Ok(Decision::Capture {
        plan,
        profile: Profile::Native,
    })
}

fn invalid(annotation: &str, value: &str, reason: impl Into<String>) -> PlanError {
    PlanError {
        annotation: annotation.to_owned(),
        value: value.to_owned(),
        reason: reason.into(),
    }
}

/// Parses one annotation if present, attaching the key and value to any error.
fn get<T>(
    ann: &BTreeMap<String, String>,
    key: &str,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Option<T>, PlanError> {
    ann.get(key)
        .map(|v| parse(v).map_err(|reason| invalid(key, v, reason)))
        .transpose()
}

fn port(s: &str) -> Result<u16, String> {
    match u16::from_str(s.trim()) {
        Ok(0) | Err(_) => Err(format!("{:?} is not a port (1-65535)", s.trim())),
        Ok(p) => Ok(p),
    }
}

fn id(s: &str) -> Result<u32, String> {
    u32::from_str(s.trim()).map_err(|_| format!("{:?} is not a numeric id", s.trim()))
}

fn cidr(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    let net = IpNet::from_str(s)
        .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{s:?} is not a CIDR"))?;
    Ok(net.trunc())
}

/// A comma-separated list. The empty string is the empty list; an empty item (`80,,90`,
/// `80,`) is an error because it is almost always a templating mistake.
fn list<T>(s: &str, item: impl Fn(&str) -> Result<T, String>) -> Result<Vec<T>, String> {
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
fn star_or<T>(s: &str, item: impl Fn(&str) -> Result<T, String>) -> Result<Option<Vec<T>>, String> {
    if s.trim() == "*" {
        Ok(None)
    } else {
        list(s, item).map(Some)
    }
}
