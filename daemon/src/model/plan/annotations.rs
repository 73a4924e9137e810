//! The native `sluice.dev/*` annotations, and the value grammar every profile shares.

use std::collections::BTreeMap;
use std::str::FromStr;

use ipnet::IpNet;

use super::{CaptureMode, Cidrs, Families, Loopback, PlanDefaults, PlanError, Ports, RedirectPlan};

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

/// The sysctls a pod may ask for, each with the values it accepts and whether Kubernetes
/// counts it as safe. All are per network namespace, so writing them inside the pod's netns
/// cannot touch the node. The safe ones are those of Kubernetes' safe list (kubelet allows
/// them for any pod, PodSecurity "baseline" admits them); the others need the node's consent
/// (`allowed-unsafe-sysctls` in the agent config), as kubelet needs `--allowed-unsafe-sysctls`.
pub const SYSCTL_ALLOW_LIST: &[(&str, SysctlValue, Safety)] = &[
    (
        "net.ipv4.ip_local_port_range",
        SysctlValue::Pair(1, 65535),
        Safety::Safe,
    ),
    ("net.ipv4.tcp_syncookies", SysctlValue::Bool, Safety::Safe),
    (
        "net.ipv4.ping_group_range",
        SysctlValue::Pair(0, 2_147_483_647),
        Safety::Safe,
    ),
    (
        "net.ipv4.ip_unprivileged_port_start",
        SysctlValue::Range(0, 65535),
        Safety::Safe,
    ),
    (
        "net.ipv4.tcp_keepalive_time",
        SysctlValue::Range(1, 32767),
        Safety::Safe,
    ),
    (
        "net.ipv4.tcp_keepalive_intvl",
        SysctlValue::Range(1, 32767),
        Safety::Safe,
    ),
    (
        "net.ipv4.tcp_keepalive_probes",
        SysctlValue::Range(1, 127),
        Safety::Safe,
    ),
    (
        "net.ipv4.tcp_fin_timeout",
        SysctlValue::Range(1, 3600),
        Safety::Safe,
    ),
    (
        "net.ipv4.conf.all.route_localnet",
        SysctlValue::Bool,
        Safety::NodeConsent,
    ),
    (
        "net.ipv4.conf.lo.route_localnet",
        SysctlValue::Bool,
        Safety::NodeConsent,
    ),
    (
        "net.ipv4.conf.eth0.route_localnet",
        SysctlValue::Bool,
        Safety::NodeConsent,
    ),
    (
        "net.ipv6.conf.all.disable_ipv6",
        SysctlValue::Bool,
        Safety::NodeConsent,
    ),
];

/// Whether a pod may set a sysctl on its own say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Safety {
    /// On Kubernetes' safe list.
    Safe,
    /// Kubernetes calls it unsafe: only where the node's agent config allows it.
    NodeConsent,
}

/// What values an allow-listed sysctl takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SysctlValue {
    /// 0 or 1.
    Bool,
    /// One integer in the inclusive range.
    Range(u32, u32),
    /// Two integers `a b` with a <= b, both in the inclusive range.
    Pair(u32, u32),
}

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

/// Longest excerpt of an annotation value an error quotes (annotations may be 256 KiB).
const MAX_EXCERPT: usize = 120;

pub(super) fn invalid(annotation: &str, value: &str, reason: impl Into<String>) -> PlanError {
    let mut excerpt = value.to_owned();
    if excerpt.len() > MAX_EXCERPT {
        let mut cut = MAX_EXCERPT;
        while !excerpt.is_char_boundary(cut) {
            cut -= 1;
        }
        excerpt.truncate(cut);
        excerpt.push('…');
    }
    PlanError {
        annotation: annotation.to_owned(),
        value: excerpt,
        reason: reason.into(),
    }
}

/// Longest value of an annotation sluice reads. 1,024 ports or CIDRs fit several times over;
/// anything longer is refused before it is parsed, so parsing work is bounded by it.
pub const MAX_VALUE_LEN: usize = 16 * 1024;

/// Parses one annotation if present, attaching the key and value to any error.
pub(super) fn get<T>(
    ann: &BTreeMap<String, String>,
    key: &str,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Option<T>, PlanError> {
    ann.get(key)
        .map(|v| {
            if v.len() > MAX_VALUE_LEN {
                return Err(invalid(
                    key,
                    v,
                    format!(
                        "{} bytes, longer than the {MAX_VALUE_LEN} an annotation may be",
                        v.len()
                    ),
                ));
            }
            parse(v).map_err(|reason| invalid(key, v, reason))
        })
        .transpose()
}

/// `name=value` with `name` on the allow-list — and, if Kubernetes calls it unsafe, among the
/// node's `allowed_unsafe` — and `value` of its kind (`a b` pairs may be written `a b` or
/// `a-b`).
pub(super) fn sysctl(s: &str, allowed_unsafe: &[String]) -> Result<(String, String), String> {
    let (name, value) = s
        .trim()
        .split_once('=')
        .ok_or_else(|| format!("{:?} is not name=value", s.trim()))?;
    let (name, value) = (name.trim(), value.trim());
    let Some((_, kind, safety)) = SYSCTL_ALLOW_LIST.iter().find(|(n, ..)| *n == name) else {
        return Err(format!(
            "sysctl {name:?} is not one sluice sets (per network namespace, on its allow-list)"
        ));
    };
    if *safety == Safety::NodeConsent && !allowed_unsafe.iter().any(|a| a == name) {
        return Err(format!(
            "sysctl {name} is not on Kubernetes' safe list; the node allows it with allowed-unsafe-sysctls = [\"{name}\"] in the agent config"
        ));
    }
    let int = |v: &str, lo: u32, hi: u32| {
        v.parse::<u32>()
            .ok()
            .filter(|n| (lo..=hi).contains(n))
            .ok_or_else(|| format!("sysctl {name}: {v:?} is not in {lo}..={hi}"))
    };
    let value = match *kind {
        SysctlValue::Bool => int(value, 0, 1)?.to_string(),
        SysctlValue::Range(lo, hi) => int(value, lo, hi)?.to_string(),
        SysctlValue::Pair(lo, hi) => {
            let parts: Vec<&str> = value
                .split(|c: char| c == '-' || c.is_whitespace())
                .filter(|p| !p.is_empty())
                .collect();
            let [a, b] = parts.as_slice() else {
                return Err(format!("sysctl {name}: {value:?} is not two numbers"));
            };
            let (a, b) = (int(a, lo, hi)?, int(b, lo, hi)?);
            if a > b {
                return Err(format!("sysctl {name}: {a} > {b}"));
            }
            format!("{a} {b}")
        }
    };
    Ok((name.to_owned(), value))
}

/// `redirect` (false) or `tproxy` (true).
pub(super) fn mode(s: &str) -> Result<bool, String> {
    match s.trim() {
        "redirect" => Ok(false),
        "tproxy" => Ok(true),
        other => Err(format!("{other:?}: expected redirect or tproxy")),
    }
}

/// `ipv4`, `ipv6` or `dual`.
pub(super) fn families(s: &str) -> Result<Families, String> {
    match s.trim() {
        "ipv4" => Ok(Families::IPV4),
        "ipv6" => Ok(Families::IPV6),
        "dual" => Ok(Families::DUAL),
        other => Err(format!("{other:?}: expected ipv4, ipv6 or dual")),
    }
}

/// A packet mark: non-zero (0 is "unmarked") and below u32::MAX, since `mark + 1` marks the
/// proxy's own connections over `lo`.
pub(super) fn tproxy_mark(s: &str) -> Result<u32, String> {
    let s = s.trim();
    let n = if let Some(hex) = s.strip_prefix("0x") {
        u32::from_str_radix(hex, 16).ok()
    } else {
        s.parse::<u32>().ok()
    };
    n.filter(|n| *n != 0 && *n != u32::MAX)
        .ok_or_else(|| format!("{s:?} is not a mark (1 to 4294967294, decimal or 0x hex)"))
}

/// A routing table id other than the kernel's own (0 unspec, 253 default, 254 main,
/// 255 local): the TPROXY local route must not land in a table the node uses.
pub(super) fn route_table(s: &str) -> Result<u32, String> {
    let s = s.trim();
    s.parse::<u32>()
        .ok()
        .filter(|n| !matches!(n, 0 | 253..=255))
        .ok_or_else(|| format!("{s:?} is not a usable routing table (1-4294967295 except 253-255)"))
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

/// A port or an inclusive range `a-b` (at most [`MAX_RANGE`] ports), as its bounds.
pub(super) fn port_range(s: &str) -> Result<(u16, u16), String> {
    match s.trim().split_once('-') {
        None => port(s).map(|p| (p, p)),
        Some((a, b)) => {
            let (a, b) = (port(a)?, port(b)?);
            if a > b || b - a >= MAX_RANGE {
                return Err(format!(
                    "{:?} is not a range of at most {MAX_RANGE} ports",
                    s.trim()
                ));
            }
            Ok((a, b))
        }
    }
}

/// A list of ports and ranges, expanded in order with repeats dropped. Expansion stops as soon
/// as the list passes [`MAX_LIST_ITEMS`] ports, so memory stays bounded whatever the input.
pub(super) fn port_ranges(s: &str) -> Result<Vec<u16>, String> {
    let mut seen = vec![false; usize::from(u16::MAX) + 1];
    let mut out = Vec::new();
    for (a, b) in list(s, port_range)? {
        for p in a..=b {
            if !std::mem::replace(&mut seen[usize::from(p)], true) {
                out.push(p);
                if out.len() > MAX_LIST_ITEMS {
                    return Err(format!(
                        "more than the {MAX_LIST_ITEMS} ports a list may hold once ranges are expanded"
                    ));
                }
            }
        }
    }
    Ok(out)
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

/// Most items one list annotation may hold (ports after expanding ranges, CIDRs, names).
/// Each item becomes a rule per captured family, so this bounds a plan before anything is
/// rendered; [`super::MAX_RULES`] bounds the sum over all lists.
pub const MAX_LIST_ITEMS: usize = 1024;

/// Drops repeated items (keeping the first), then refuses a list longer than
/// [`MAX_LIST_ITEMS`]: `80,80` is one rule, not two.
pub(super) fn bounded<T: PartialEq>(mut items: Vec<T>) -> Result<Vec<T>, String> {
    let mut seen = 0;
    for i in 0..items.len() {
        if !items[..seen].contains(&items[i]) {
            items.swap(seen, i);
            seen += 1;
        }
    }
    items.truncate(seen);
    if items.len() > MAX_LIST_ITEMS {
        Err(format!(
            "{} items, more than the {MAX_LIST_ITEMS} a list may hold",
            items.len()
        ))
    } else {
        Ok(items)
    }
}

/// A comma-separated list. The empty string is the empty list; an empty item (`80,,90`,
/// `80,`) is an error because it is almost always a templating mistake.
pub(super) fn list<T: PartialEq>(
    s: &str,
    item: impl Fn(&str) -> Result<T, String>,
) -> Result<Vec<T>, String> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    let count = s.split(',').count();
    if count > MAX_LIST_ITEMS {
        return Err(format!(
            "{count} items, more than the {MAX_LIST_ITEMS} a list may hold"
        ));
    }
    let items = s
        .split(',')
        .map(|part| {
            if part.trim().is_empty() {
                Err("empty list item".to_owned())
            } else {
                item(part)
            }
        })
        .collect::<Result<Vec<T>, String>>()?;
    bounded(items)
}

/// `*` (everything, `None`) or a list (`Some`, possibly empty: nothing).
pub(super) fn star_or<T: PartialEq>(
    s: &str,
    item: impl Fn(&str) -> Result<T, String>,
) -> Result<Option<Vec<T>>, String> {
    if s.trim() == "*" {
        Ok(None)
    } else {
        list(s, item).map(Some)
    }
}
