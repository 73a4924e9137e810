//! The Istio profile: a pod injected by Istio (`sidecar.istio.io/status` present) that
//! istio-cni would capture (see [`gate`]) is captured as istio-cni captures a sidecar pod, honouring Istio's own annotations with Istio's
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

/// The init container the injector adds when Istio runs without its CNI: it captures the pod
/// itself, with iptables.
const INIT_CONTAINER: &str = "istio-init";
/// The sidecar, under `containers`, or under `initContainers` as a native sidecar (Istio's
/// default since 1.28).
const PROXY_CONTAINER: &str = "istio-proxy";

/// Whether istio-cni would capture an injected pod, from what the injector recorded in its
/// status (`initContainers`, `containers`): not when `istio-init` was injected (the pod
/// captures itself; capturing it too would capture it twice), and only when `istio-proxy` is
/// among either list. A status with neither list (no injector writes one; earlier sluice
/// releases were tested with `{}`) is taken as a sidecar pod. A status that is not a JSON
/// object, or whose lists are not lists of names, is an invalid annotation: the pod asked for
/// a mesh and must not start uncaptured for a typo.
pub(super) fn gate(ann: &BTreeMap<String, String>) -> Result<Option<String>, PlanError> {
    let Some(value) = ann.get(STATUS) else {
        return Ok(Some(format!("mesh gate: no {STATUS}")));
    };
    let status: serde_json::Value = serde_json::from_str(value)
        .map_err(|e| invalid(STATUS, value, format!("not JSON: {e}")))?;
    let Some(status) = status.as_object() else {
        return Err(invalid(STATUS, value, "not a JSON object"));
    };
    let names = |key: &str| -> Result<Option<Vec<&str>>, PlanError> {
        match status.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .map(|i| {
                    i.as_str().ok_or_else(|| {
                        invalid(STATUS, value, format!("{key} is not a list of names"))
                    })
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(_) => Err(invalid(STATUS, value, format!("{key} is not a list"))),
        }
    };
    let init = names("initContainers")?;
    let containers = names("containers")?;
    if init.as_ref().is_some_and(|i| i.contains(&INIT_CONTAINER)) {
        return Ok(Some(format!(
            "mesh gate: {INIT_CONTAINER} was injected (Istio without its CNI) and captures the pod itself"
        )));
    }
    if init.is_none() && containers.is_none() {
        return Ok(None);
    }
    let proxy = [&init, &containers]
        .into_iter()
        .flatten()
        .any(|l| l.contains(&PROXY_CONTAINER));
    if proxy {
        Ok(None)
    } else {
        Ok(Some(format!(
            "mesh gate: no {PROXY_CONTAINER} container in {STATUS}"
        )))
    }
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
