//! The Consul profile: a pod consul-k8s injected with transparent proxy, on a cluster where
//! consul-k8s runs its CNI plugin, is captured as consul-cni captures it, from the
//! `consul.hashicorp.com/redirect-traffic-config` JSON the webhook writes for the plugin (the
//! Go struct `iptables.Config` without json tags: Go field names, ports as strings).
//! Reference: hashicorp/consul-k8s `control-plane/cni/main.go` (the gate) and hashicorp/consul
//! `sdk/iptables` (the rules): nat table only, the proxy's and the listed uids, CIDRs and ports
//! return, 127.0.0.1 returns, the rest of TCP goes to the outbound port; no special case for
//! `lo` ([`Loopback::Consul`]); DNS only to Consul's DNS address, by DNAT.
//!
//! Without its CNI, consul-k8s captures the pod with its own init container and writes no
//! such annotation: those pods never reach the agent.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use serde::Deserialize;

use super::values::invalid;
use super::{ConsulDns, Loopback, MeshPlan, PlanError, RedirectPlan};

/// The rules' configuration, written for the CNI plugin: the profile's trigger.
pub const CONFIG: &str = sluice_proto::annotations::CONSUL_CONFIG;
const CONNECT_INJECT_STATUS: &str = "consul.hashicorp.com/connect-inject-status";
const MESH_INJECT_STATUS: &str = "consul.hashicorp.com/mesh-inject-status";
const TPROXY_STATUS: &str = "consul.hashicorp.com/transparent-proxy-status";
const DUAL_STACK: &str = "consul.hashicorp.com/dual-stack";

/// Most ports a range (`a:b`) may expand to: the same bound as any list.
const MAX_PORTS: usize = super::MAX_LIST_ITEMS;

pub fn injected(ann: &BTreeMap<String, String>) -> bool {
    ann.contains_key(CONFIG)
}

/// Every annotation key this profile reads.
pub fn keys() -> &'static [&'static str] {
    &[
        CONFIG,
        CONNECT_INJECT_STATUS,
        MESH_INJECT_STATUS,
        TPROXY_STATUS,
        DUAL_STACK,
    ]
}

/// `iptables.Config` as consul-k8s marshals it (no json tags: Go field names).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Config {
    #[serde(rename = "ConsulDNSIP", default)]
    consul_dns_ip: Option<String>,
    #[serde(rename = "ConsulDNSPort", default)]
    consul_dns_port: Option<u16>,
    #[serde(rename = "ProxyUserID")]
    proxy_user_id: String,
    proxy_inbound_port: u16,
    proxy_outbound_port: u16,
    #[serde(default)]
    exclude_inbound_ports: Option<Vec<String>>,
    #[serde(default)]
    exclude_outbound_ports: Option<Vec<String>>,
    #[serde(rename = "ExcludeOutboundCIDRs", default)]
    exclude_outbound_cidrs: Option<Vec<String>>,
    #[serde(rename = "ExcludeUIDs", default)]
    exclude_uids: Option<Vec<String>>,
}

/// consul-cni's gate and the plan from the pod's configuration.
pub(super) fn plan(ann: &BTreeMap<String, String>) -> Result<MeshPlan, PlanError> {
    let Some(text) = ann.get(CONFIG) else {
        return Ok(MeshPlan::Skip(format!("mesh gate: no {CONFIG}")));
    };
    let set = |k: &str| ann.get(k).is_some_and(|v| !v.trim().is_empty());
    if !set(CONNECT_INJECT_STATUS) && !set(MESH_INJECT_STATUS) {
        return Ok(MeshPlan::Skip(format!(
            "mesh gate: neither {CONNECT_INJECT_STATUS} nor {MESH_INJECT_STATUS} is set"
        )));
    }
    if !set(TPROXY_STATUS) {
        return Ok(MeshPlan::Skip(format!(
            "mesh gate: {TPROXY_STATUS} is not set (transparent proxy is off)"
        )));
    }
    // Injectors before consul-k8s's dual-stack support write no `dual-stack`: their pods
    // were IPv4-only (consul-cni then wrote iptables rules only), and stay so.
    let ipv6 = match ann.get(DUAL_STACK).map(|v| v.trim()) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => return Err(invalid(DUAL_STACK, other, "expected \"true\" or \"false\"")),
    };
    let bad = |reason: String| invalid(CONFIG, text, reason);
    let config: Config = serde_json::from_str(text).map_err(|e| bad(format!("{e}")))?;
    let uid = |field: &str, s: &str| -> Result<u32, PlanError> {
        s.trim()
            .parse()
            .map_err(|_| bad(format!("{field}: {s:?} is not a uid")))
    };
    let port = |field: &str, p: u16| {
        if p == 0 {
            Err(bad(format!("{field} 0 is not a port")))
        } else {
            Ok(p)
        }
    };
    // Ports are strings; `a:b` is a range (iptables' syntax, passed through upstream).
    let ports = |field: &str, list: &Option<Vec<String>>| -> Result<Vec<u16>, PlanError> {
        let mut out = Vec::new();
        for item in list.iter().flatten() {
            let parse = |s: &str| {
                s.trim()
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| bad(format!("{field}: {item:?} is not a port or a:b range")))
            };
            match item.split_once(':') {
                Some((a, b)) => {
                    let (a, b) = (parse(a)?, parse(b)?);
                    if b < a {
                        return Err(bad(format!("{field}: {item:?} is an empty range")));
                    }
                    out.extend(a..=b);
                }
                None => out.push(parse(item)?),
            }
            if out.len() > MAX_PORTS {
                return Err(bad(format!("{field}: more than {MAX_PORTS} ports")));
            }
        }
        Ok(out)
    };
    let proxy_uid = uid("ProxyUserID", &config.proxy_user_id)?;
    let exclude_outbound_uids = config
        .exclude_uids
        .iter()
        .flatten()
        .map(|s| uid("ExcludeUIDs", s))
        .collect::<Result<Vec<_>, _>>()?;
    let exclude_outbound_cidrs = config
        .exclude_outbound_cidrs
        .iter()
        .flatten()
        .map(|s| {
            s.trim()
                .parse::<IpNet>()
                .or_else(|_| s.trim().parse::<IpAddr>().map(IpNet::from))
                .map(|n| n.trunc())
                .map_err(|_| bad(format!("ExcludeOutboundCIDRs: {s:?} is not a CIDR")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    // DNS, only when Consul's DNS address or port is set: with a port, traffic to that
    // address's port 53 goes to the port (the address defaults to 127.0.0.1); with an address
    // alone, every port-53 query goes to that address.
    let dns_ip = config
        .consul_dns_ip
        .as_deref()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<Ipv4Addr>()
                .map_err(|_| bad(format!("ConsulDNSIP: {s:?} is not an IPv4 address")))
        })
        .transpose()?;
    let dns_port = config.consul_dns_port.filter(|p| *p != 0);
    let consul_dns = match (dns_ip, dns_port) {
        (None, None) => None,
        (ip, Some(port)) => Some(ConsulDns {
            ip: ip.unwrap_or(Ipv4Addr::LOCALHOST),
            port: Some(port),
        }),
        (Some(ip), None) => Some(ConsulDns { ip, port: None }),
    };
    Ok(MeshPlan::Capture {
        plan: RedirectPlan {
            exclude_inbound_ports: ports("ExcludeInboundPorts", &config.exclude_inbound_ports)?,
            exclude_outbound_ports: ports("ExcludeOutboundPorts", &config.exclude_outbound_ports)?,
            exclude_outbound_cidrs,
            exclude_outbound_uids,
            consul_dns,
            ..RedirectPlan::capture_all(
                port("ProxyOutboundPort", config.proxy_outbound_port)?,
                port("ProxyInboundPort", config.proxy_inbound_port)?,
                proxy_uid,
                Loopback::Consul,
            )
        },
        ipv6,
    })
}

/// Where IPv6 DNS goes in a dual-stack pod: Consul's ip6tables pass uses `::1`.
pub const DNS6: Ipv6Addr = Ipv6Addr::LOCALHOST;
