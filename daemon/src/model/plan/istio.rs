//! The Istio profile: a pod injected by Istio (`sidecar.istio.io/status` present) is captured
//! as istio-cni captures a sidecar pod, honouring Istio's own annotations with Istio's
//! meaning. Reference: istio/istio `cni/pkg/plugin/sidecar_redirect.go` and
//! `tools/istio-iptables/pkg/capture/run.go` (goldens in shared/reference/upstream).

use std::collections::BTreeMap;

use super::values::{cidr, get, interface, invalid, list, port, star_or};
use super::{CaptureMode, Cidrs, Loopback, PlanDefaults, PlanError, Ports, RedirectPlan};

/// Present on every pod the Istio injector has processed.
pub const STATUS: &str = sluice_proto::annotations::ISTIO_STATUS;
const INTERCEPTION_MODE: &str = "sidecar.istio.io/interceptionMode";
const INCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeInboundPorts";
const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
const INCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/includeOutboundIPRanges";
const EXCLUDE_OUTBOUND_IP_RANGES: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";
const INCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeOutboundPorts";
const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
const EXCLUDE_INTERFACES: &str = "traffic.sidecar.istio.io/excludeInterfaces";

/// The tunnel (HBONE) port, always excluded inbound, first.
const TUNNEL_PORT: u16 = 15008;
/// The proxy's own ports istio-cni always appends to the inbound exclusions.
const PROXY_PORTS: [u16; 3] = [15020, 15021, 15090];
/// istio-cni excludes the merged-metrics port outbound unless the pod says otherwise.
const DEFAULT_EXCLUDE_OUTBOUND: [u16; 1] = [15020];

pub fn injected(ann: &BTreeMap<String, String>) -> bool {
    ann.contains_key(STATUS)
}

/// Every annotation key this profile reads.
pub fn keys() -> &'static [&'static str] {
    &[
        STATUS,
        INTERCEPTION_MODE,
        INCLUDE_INBOUND_PORTS,
        EXCLUDE_INBOUND_PORTS,
        INCLUDE_OUTBOUND_IP_RANGES,
        EXCLUDE_OUTBOUND_IP_RANGES,
        INCLUDE_OUTBOUND_PORTS,
        EXCLUDE_OUTBOUND_PORTS,
        EXCLUDE_INTERFACES,
    ]
}

/// The plan for an Istio-injected pod; `None` for interception mode NONE. TPROXY uses the
/// agent's mark and table, Istio's 1337 and 133 unless the node configures others.
pub(super) fn plan(
    ann: &BTreeMap<String, String>,
    defaults: &PlanDefaults,
) -> Result<Option<RedirectPlan>, PlanError> {
    let mode = match ann.get(INTERCEPTION_MODE).map(|m| m.trim()) {
        None | Some("REDIRECT") => CaptureMode::Redirect,
        Some("TPROXY") => CaptureMode::Tproxy {
            mark: defaults.tproxy_mark,
            table: defaults.tproxy_table,
        },
        Some("NONE") => return Ok(None),
        Some(other) => {
            return Err(invalid(
                INTERCEPTION_MODE,
                other,
                "expected REDIRECT, TPROXY or NONE",
            ));
        }
    };
    // In REDIRECT mode the tunnel port is excluded first (nat ISTIO_INBOUND); istio-cni's
    // TPROXY rules exclude only the proxy ports in mangle (tproxy.txt.golden).
    let mut exclude_inbound_ports = match mode {
        CaptureMode::Redirect => vec![TUNNEL_PORT],
        CaptureMode::Tproxy { .. } => Vec::new(),
    };
    exclude_inbound_ports
        .extend(get(ann, EXCLUDE_INBOUND_PORTS, |v| list(v, port))?.unwrap_or_default());
    exclude_inbound_ports.extend(PROXY_PORTS);
    Ok(Some(RedirectPlan {
        mode,
        proxy_gid: Some(1337),
        include_inbound_ports: get(ann, INCLUDE_INBOUND_PORTS, |v| star_or(v, port))?
            .map_or(Ports::All, |p| p.map_or(Ports::All, Ports::Only)),
        exclude_inbound_ports,
        exclude_outbound_ports: get(ann, EXCLUDE_OUTBOUND_PORTS, |v| list(v, port))?
            .unwrap_or_else(|| DEFAULT_EXCLUDE_OUTBOUND.to_vec()),
        include_outbound_ports: get(ann, INCLUDE_OUTBOUND_PORTS, |v| list(v, port))?
            .unwrap_or_default(),
        include_outbound_cidrs: get(ann, INCLUDE_OUTBOUND_IP_RANGES, |v| star_or(v, cidr))?
            .map_or(Cidrs::All, |c| c.map_or(Cidrs::All, Cidrs::Only)),
        exclude_outbound_cidrs: get(ann, EXCLUDE_OUTBOUND_IP_RANGES, |v| list(v, cidr))?
            .unwrap_or_default(),
        exclude_interfaces: get(ann, EXCLUDE_INTERFACES, |v| list(v, interface))?
            .unwrap_or_default(),
        ..RedirectPlan::capture_all(15001, 15006, 1337, Loopback::istio())
    }))
}
