//! The Kuma profile: a pod injected by Kuma ≥ 2.9 in CNI mode is captured as kuma-cni
//! captures it, from the transparent-proxy configuration its webhook writes into
//! `traffic.kuma.io/transparent-proxy-config` (YAML, loaded on top of Kuma's defaults, field by
//! field). Reference: kumahq/kuma `pkg/transparentproxy/config/config.go` (the schema),
//! `app/cni/pkg/cni/kubernetes_linux.go` (the gate) and its golden rule files
//! (shared/reference/upstream/kuma-*).
//!
//! Kuma's rules have Istio's shape (a passthrough source over `lo`, the proxy calling its own
//! pod over `lo` looped to inbound, the proxy's uid returning), without a tunnel port or a gid,
//! and its OUTPUT chain puts the outbound IP exclusions and DNS before the jump to the mesh
//! chain, capturing DNS over UDP only ([`Loopback::Kuma`]).
//!
//! Pods of Kuma ≤ 2.8 carry per-field annotations instead of the YAML and are not read: they
//! do not reach the agent (the YAML is the profile's trigger) and keep what captures them
//! today (`kuma-init`, or kuma-cni). Fields whose rules sluice does not write yet are refused
//! (code 7, naming the field), never ignored: a pod never starts captured differently from
//! what its mesh configured.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use serde::Deserialize;

use super::values::invalid;
use super::{Cidrs, Loopback, MeshPlan, PlanError, Ports, Proto, RedirectPlan, UidPorts};

/// The transparent-proxy configuration (Kuma ≥ 2.9): the profile's trigger.
pub const CONFIG: &str = sluice_proto::annotations::KUMA_CONFIG;
/// `"true"` on every pod the webhook injected a sidecar into.
const SIDECAR_INJECTED: &str = "kuma.io/sidecar-injected";

/// Kuma's defaults (config.go).
const DEFAULT_UID: u32 = 5678;
const DEFAULT_INBOUND: u16 = 15006;
const DEFAULT_OUTBOUND: u16 = 15001;
const DEFAULT_DNS: u16 = 15053;

pub fn injected(ann: &BTreeMap<String, String>) -> bool {
    ann.contains_key(CONFIG)
}

/// Every annotation key this profile reads.
pub fn keys() -> &'static [&'static str] {
    &[CONFIG, SIDECAR_INJECTED]
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct Config {
    #[serde(rename = "kumaDPUser")]
    kuma_dp_user: Option<serde_yaml_ng::Value>,
    ip_family_mode: Option<String>,
    redirect: Redirect,
    drop_invalid_packets: Option<bool>,
    cni_mode: Option<bool>,
    ebpf: Ebpf,
}

/// Kuma's eBPF mode (no iptables at all): not what sluice does.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Ebpf {
    enabled: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Redirect {
    inbound: Traffic,
    outbound: Traffic,
    dns: Dns,
    vnet: Vnet,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct Traffic {
    enabled: Option<bool>,
    port: Option<u16>,
    include_ports: Vec<u16>,
    exclude_ports: Vec<u16>,
    #[serde(rename = "excludePortsForIPs")]
    exclude_ports_for_ips: Vec<String>,
    #[serde(rename = "excludePortsForUIDs")]
    exclude_ports_for_uids: Vec<serde_yaml_ng::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct Dns {
    enabled: Option<bool>,
    port: Option<u16>,
    capture_all: Option<bool>,
    skip_conntrack_zone_split: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Vnet {
    networks: Vec<String>,
}

/// kuma-cni's gate and the plan from the pod's configuration.
pub(super) fn plan(ann: &BTreeMap<String, String>) -> Result<MeshPlan, PlanError> {
    let Some(text) = ann.get(CONFIG) else {
        return Ok(MeshPlan::Skip(format!("mesh gate: no {CONFIG}")));
    };
    let bad = |reason: String| invalid(CONFIG, text, reason);
    if ann.get(SIDECAR_INJECTED).map(|v| v.trim()) != Some("true") {
        return Ok(MeshPlan::Skip(format!(
            "mesh gate: {SIDECAR_INJECTED} is not \"true\""
        )));
    }
    let config: Config = serde_yaml_ng::from_str(text).map_err(|e| bad(format!("{e}")))?;
    if config.cni_mode == Some(false) {
        return Ok(MeshPlan::Skip(
            "mesh gate: cniMode is false, so kuma-init was injected and captures the pod itself"
                .to_owned(),
        ));
    }
    let unsupported = |field: &str| {
        bad(format!(
            "{field} is not supported by sluice yet; the pod needs kuma-init or kuma-cni"
        ))
    };
    if config.ebpf.enabled == Some(true) {
        return Err(unsupported("ebpf.enabled: true"));
    }
    if config.drop_invalid_packets == Some(true) {
        return Err(unsupported("dropInvalidPackets: true"));
    }
    if !config.redirect.vnet.networks.is_empty() {
        return Err(unsupported("redirect.vnet.networks (Kuma Universal only)"));
    }
    if !config.redirect.inbound.exclude_ports_for_uids.is_empty() {
        return Err(unsupported("redirect.inbound.excludePortsForUIDs"));
    }
    if config.redirect.outbound.enabled == Some(false) {
        return Err(unsupported("redirect.outbound.enabled: false"));
    }
    let uid = match &config.kuma_dp_user {
        None => DEFAULT_UID,
        Some(serde_yaml_ng::Value::Number(n)) => n
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| bad(format!("kumaDPUser {n} is not a uid")))?,
        Some(serde_yaml_ng::Value::String(s)) => s.trim().parse().map_err(|_| {
            bad(format!(
                "kumaDPUser {s:?} is not a numeric uid (a user name cannot be resolved in the pod)"
            ))
        })?,
        Some(other) => return Err(bad(format!("kumaDPUser {other:?} is not a uid"))),
    };
    let ipv6 = match config.ip_family_mode.as_deref().map(str::trim) {
        None | Some("dualstack") => true,
        Some("ipv4") => false,
        Some(other) => {
            return Err(bad(format!(
                "ipFamilyMode {other:?}: expected dualstack or ipv4"
            )));
        }
    };
    let port = |p: Option<u16>, default: u16, field: &str| match p {
        None => Ok(default),
        Some(0) => Err(bad(format!("{field} 0 is not a port"))),
        Some(p) => Ok(p),
    };
    let (inbound, outbound, dns) = (
        &config.redirect.inbound,
        &config.redirect.outbound,
        &config.redirect.dns,
    );
    let inbound_port = port(inbound.port, DEFAULT_INBOUND, "redirect.inbound.port")?;
    let outbound_port = port(outbound.port, DEFAULT_OUTBOUND, "redirect.outbound.port")?;
    let dns_port = if dns.enabled == Some(true) {
        if dns.capture_all != Some(true) {
            return Err(unsupported(
                "redirect.dns.captureAll: false (DNS to the pod's resolvers only)",
            ));
        }
        Some(port(dns.port, DEFAULT_DNS, "redirect.dns.port")?)
    } else {
        None
    };
    let nets = |entries: &[String], field: &str| -> Result<Vec<IpNet>, PlanError> {
        let mut out = Vec::new();
        for entry in entries {
            for item in entry.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                let net = item
                    .parse::<IpNet>()
                    .or_else(|_| item.parse::<std::net::IpAddr>().map(IpNet::from))
                    .map_err(|_| bad(format!("{field}: {item:?} is not an IP address or CIDR")))?;
                out.push(net.trunc());
            }
        }
        Ok(out)
    };
    let exclude_inbound_sources = nets(
        &inbound.exclude_ports_for_ips,
        "redirect.inbound.excludePortsForIPs",
    )?;
    let exclude_outbound_cidrs = nets(
        &outbound.exclude_ports_for_ips,
        "redirect.outbound.excludePortsForIPs",
    )?;
    // includePorts replaces the catch-all jump with one per port; Kuma's exclusions still come
    // first, so a port both included and excluded is not captured.
    let include_inbound_ports = if inbound.enabled == Some(false) {
        Ports::Only(Vec::new())
    } else if inbound.include_ports.is_empty() {
        Ports::All
    } else {
        Ports::Only(
            inbound
                .include_ports
                .iter()
                .copied()
                .filter(|p| !inbound.exclude_ports.contains(p))
                .collect(),
        )
    };
    let (include_outbound_ports, include_outbound_cidrs) = if outbound.include_ports.is_empty() {
        (Vec::new(), Cidrs::All)
    } else {
        (
            outbound
                .include_ports
                .iter()
                .copied()
                .filter(|p| !outbound.exclude_ports.contains(p))
                .collect(),
            Cidrs::Only(Vec::new()),
        )
    };
    let mut exclude_uid_ports = Vec::new();
    for entry in &outbound.exclude_ports_for_uids {
        let text = match entry {
            serde_yaml_ng::Value::String(s) => s.clone(),
            serde_yaml_ng::Value::Number(n) => n.to_string(),
            other => {
                return Err(bad(format!(
                    "redirect.outbound.excludePortsForUIDs: {other:?} is not an entry"
                )));
            }
        };
        exclude_uid_ports.extend(uid_ports(&text).map_err(|why| {
            bad(format!(
                "redirect.outbound.excludePortsForUIDs: {text:?}: {why} (expected [<proto>:][<ports>:]<uids>)"
            ))
        })?);
        if exclude_uid_ports.len() > MAX_UID_RULES {
            return Err(bad(format!(
                "redirect.outbound.excludePortsForUIDs: more than {MAX_UID_RULES} rules"
            )));
        }
    }
    // Kuma also splits DNS into two conntrack zones (unless `skipConntrackZoneSplit`); sluice
    // does not write those rules (docs/annotations.md, "Kuma profile"): the packets' fate is
    // the same, the DNS proxy's upstream queries share the app's conntrack zone.
    let _ = dns.skip_conntrack_zone_split;
    Ok(MeshPlan::Capture {
        plan: RedirectPlan {
            include_inbound_ports,
            exclude_inbound_ports: inbound.exclude_ports.clone(),
            exclude_inbound_sources,
            exclude_outbound_ports: outbound.exclude_ports.clone(),
            include_outbound_ports,
            include_outbound_cidrs,
            exclude_outbound_cidrs,
            dns_port,
            exclude_uid_ports,
            ..RedirectPlan::capture_all(outbound_port, inbound_port, uid, Loopback::kuma())
        },
        ipv6,
    })
}

/// Most rules the uid exclusions may expand to (protocols × port ranges × uids).
const MAX_UID_RULES: usize = 1024;

/// One `excludePortsForUIDs` entry, `[<proto>:][<ports>:]<uids>`: the protocol (`tcp`, `udp`,
/// `*` or missing for both), ports (`a,b,c-d`; `*` or missing for all), uids (`n` or `n-m`,
/// never `*`), expanded to one exclusion per protocol, port range and uid.
fn uid_ports(entry: &str) -> Result<Vec<UidPorts>, String> {
    let parts: Vec<&str> = entry.split(':').map(str::trim).collect();
    let is_proto = |s: &str| matches!(s, "tcp" | "udp" | "*");
    let (proto, ports, uids) = match parts.as_slice() {
        [uids] => ("*", "*", *uids),
        [first, uids] if is_proto(first) && *first != "*" => (*first, "*", *uids),
        [ports, uids] => ("*", *ports, *uids),
        [proto, ports, uids] => (*proto, *ports, *uids),
        _ => return Err("too many parts".into()),
    };
    let protos: &[Proto] = match proto {
        "tcp" => &[Proto::Tcp],
        "udp" => &[Proto::Udp],
        "*" | "" => &[Proto::Tcp, Proto::Udp],
        other => return Err(format!("{other:?} is not tcp, udp or *")),
    };
    let number = |s: &str, what: &str| -> Result<u32, String> {
        s.trim()
            .parse()
            .map_err(|_| format!("{s:?} is not a {what}"))
    };
    let range = |s: &str, what: &str| -> Result<(u32, u32), String> {
        let (a, b) = s.split_once('-').unwrap_or((s, s));
        let (a, b) = (number(a, what)?, number(b, what)?);
        if b < a {
            return Err(format!("{s:?} is an empty range"));
        }
        Ok((a, b))
    };
    let port_ranges: Vec<Option<(u16, u16)>> = if ports == "*" || ports.is_empty() {
        vec![None]
    } else {
        ports
            .split(',')
            .map(|p| {
                let (a, b) = range(p, "port")?;
                match (u16::try_from(a), u16::try_from(b)) {
                    (Ok(a), Ok(b)) if a > 0 => Ok(Some((a, b))),
                    _ => Err(format!("{p:?} is not a port range")),
                }
            })
            .collect::<Result<_, String>>()?
    };
    if uids == "*" {
        return Err("uids cannot be *".into());
    }
    let (lo, hi) = range(uids, "uid")?;
    if (hi - lo) as usize >= MAX_UID_RULES {
        return Err(format!("{uids:?}: more than {MAX_UID_RULES} uids"));
    }
    let mut out = Vec::new();
    for &proto in protos {
        for &ports in &port_ranges {
            for uid in lo..=hi {
                out.push(UidPorts { proto, ports, uid });
            }
        }
    }
    Ok(out)
}

impl Loopback {
    /// Kuma's values: the passthrough sources 127.0.0.6 and `::6`.
    pub fn kuma() -> Self {
        Loopback::Kuma {
            passthrough_source: Ipv4Addr::new(127, 0, 0, 6),
            passthrough_source6: Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6),
        }
    }
}
