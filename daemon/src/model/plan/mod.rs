//! Pod annotations + node defaults → a [`RedirectPlan`]: a plain value describing the capture
//! a pod gets. No I/O happens here; rendering and applying live in `ruleset` and `nft`.

mod annotations;
mod canonical;
mod consul;
mod istio;
mod kuma;
mod linkerd;
mod sysctls;
mod values;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

pub use annotations::{ANNOTATION_PREFIX, REDIRECT, native_keys};
pub use sysctls::{SYSCTL_ALLOW_LIST, Safety, SysctlValue};

/// Most rules one pod's table may hold. A rule is ~250 bytes in the netlink batch, so a plan
/// at this bound is a ~2 MiB transaction, which the agent sizes its socket for. Every Linkerd
/// plan with its lists within [`MAX_LIST_ITEMS`] fits (~6,150 rules dual-stack); real pods
/// are far smaller. Checked before anything is applied.
pub const MAX_RULES: usize = 8192;

pub use consul::DNS6 as CONSUL_DNS6;
pub use values::MAX_LIST_ITEMS;

/// The error for a plan of `rules` rules, more than [`MAX_RULES`]: it names the list
/// annotation with the most items, the one to shorten.
pub fn too_many_rules(annotations: &BTreeMap<String, String>, rules: usize) -> PlanError {
    // Items of a list value, counting a numeric range `a-b` as its span.
    let items = |v: &str| -> usize {
        v.split(',')
            .map(|part| match part.trim().split_once('-') {
                Some((a, b)) => match (a.trim().parse::<u32>(), b.trim().parse::<u32>()) {
                    (Ok(a), Ok(b)) if b >= a => (b - a + 1) as usize,
                    _ => 1,
                },
                None => 1,
            })
            .sum()
    };
    let (key, value) = all_annotation_keys()
        .into_iter()
        .filter_map(|k| annotations.get(k).map(|v| (k, v.as_str())))
        .max_by_key(|(_, v)| items(v))
        .unwrap_or(("", ""));
    values::invalid(
        key,
        value,
        format!("the plan needs {rules} rules, more than the {MAX_RULES} one pod may have"),
    )
}

/// Every annotation key any profile reads (native, Istio, Linkerd), for docs and checks.
pub fn all_annotation_keys() -> Vec<&'static str> {
    let mut keys = native_keys().to_vec();
    keys.extend_from_slice(istio::keys());
    keys.extend_from_slice(linkerd::keys());
    keys.extend_from_slice(kuma::keys());
    keys.extend_from_slice(consul::keys());
    keys
}

/// An annotation whose value cannot be used. Nothing is applied when planning fails.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("annotation {annotation}: invalid value {value:?}: {reason}")]
pub struct PlanError {
    /// The annotation key, e.g. `sluice.dev/outbound-port`.
    pub annotation: String,
    /// The offending value as given.
    pub value: String,
    /// What is wrong with it.
    pub reason: String,
}

/// How redirected connections reach the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CaptureMode {
    /// nat-table REDIRECT; the proxy reads the original destination with `SO_ORIGINAL_DST`.
    Redirect,
    /// Inbound TCP is handed to the proxy's transparent listener without NAT (mangle-table
    /// TPROXY, Istio's `interceptionMode: TPROXY`): the proxy sees the original source and
    /// destination. Marked packets are routed locally by a policy rule `fwmark <mark> lookup
    /// <table>` and `local default dev lo table <table>`. Outbound stays REDIRECT, as in Istio.
    Tproxy {
        /// The packet mark of diverted packets (Istio: 1337). `mark + 1` marks the proxy's
        /// own connections to its pod over `lo`, as Istio does.
        mark: u32,
        /// The routing table of the local route (Istio: 133).
        table: u32,
    },
}

/// The IP families a plan captures, all in the one `inet` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Families {
    pub ipv4: bool,
    pub ipv6: bool,
}

impl Families {
    pub const DUAL: Families = Families {
        ipv4: true,
        ipv6: true,
    };
    pub const IPV4: Families = Families {
        ipv4: true,
        ipv6: false,
    };
    pub const IPV6: Families = Families {
        ipv4: false,
        ipv6: true,
    };
    /// No family: an attachment without addresses.
    pub const NONE: Families = Families {
        ipv4: false,
        ipv6: false,
    };

    /// The families of the pod's addresses. With no address known (no `prevResult`), both:
    /// capturing a family the pod does not use costs nothing, missing one would leave the pod
    /// uncaptured.
    pub fn of(pod_ips: &[IpAddr]) -> Self {
        Self::present(pod_ips).or_dual()
    }

    /// Exactly the families among `ips` (none for none).
    pub fn present(ips: &[IpAddr]) -> Self {
        Families {
            ipv4: ips.iter().any(IpAddr::is_ipv4),
            ipv6: ips.iter().any(IpAddr::is_ipv6),
        }
    }

    /// Both families when none is known (see [`Families::of`]).
    pub fn or_dual(self) -> Self {
        if self == Families::NONE {
            Families::DUAL
        } else {
            self
        }
    }

    pub fn union(self, other: Families) -> Self {
        Families {
            ipv4: self.ipv4 || other.ipv4,
            ipv6: self.ipv6 || other.ipv6,
        }
    }

    /// `4`, `6`, `4,6`, or `-` for none: the form the table's owner records.
    pub fn to_word(self) -> &'static str {
        match (self.ipv4, self.ipv6) {
            (true, true) => "4,6",
            (true, false) => "4",
            (false, true) => "6",
            (false, false) => "-",
        }
    }

    /// Reads [`Families::to_word`]'s form; `None` for anything else.
    pub fn from_word(word: &str) -> Option<Self> {
        Some(match word {
            "4,6" | "6,4" => Families::DUAL,
            "4" => Families::IPV4,
            "6" => Families::IPV6,
            "-" => Families::NONE,
            _ => return None,
        })
    }
}

/// A set of ports: every port, or exactly the listed ones (possibly none).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Ports {
    All,
    Only(Vec<u16>),
}

/// A set of destination networks: everything, or exactly the listed ones (possibly none).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Cidrs {
    All,
    Only(Vec<IpNet>),
}

/// The capture a pod gets. Field defaults mirror Istio's sidecar defaults.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RedirectPlan {
    pub mode: CaptureMode,
    /// Which IP families are captured.
    pub families: Families,
    /// Where outbound TCP is redirected (Istio: 15001).
    pub outbound_port: u16,
    /// Where inbound TCP is redirected (Istio: 15006).
    pub inbound_port: u16,
    /// Traffic from this uid is the proxy's own and is not redirected.
    pub proxy_uid: u32,
    /// Traffic from this gid is the proxy's own and is not redirected (Linkerd sets none).
    pub proxy_gid: Option<u32>,
    /// Inbound destination ports that are redirected.
    pub include_inbound_ports: Ports,
    /// Inbound destination ports that reach the app directly (the proxy's own ports).
    pub exclude_inbound_ports: Vec<u16>,
    /// Inbound sources that reach the app directly (Linkerd's skip-subnets).
    pub exclude_inbound_sources: Vec<IpNet>,
    /// Outbound destination ports that are never redirected.
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound TCP ports redirected whatever the destination (Istio includeOutboundPorts).
    pub include_outbound_ports: Vec<u16>,
    /// Outbound destinations that are redirected.
    pub include_outbound_cidrs: Cidrs,
    /// Outbound destinations that are never redirected.
    pub exclude_outbound_cidrs: Vec<IpNet>,
    /// Users whose outbound traffic is never redirected besides the proxy (Consul's
    /// `ExcludeUIDs`).
    pub exclude_outbound_uids: Vec<u32>,
    /// Consul's DNS redirection (DNAT to Consul's DNS address), instead of `dns_port`.
    pub consul_dns: Option<ConsulDns>,
    /// Outbound traffic of these users to these ports is never redirected (Kuma's
    /// `excludePortsForUIDs`), checked first.
    pub exclude_uid_ports: Vec<UidPorts>,
    /// Traffic in or out of these interfaces is left alone.
    pub exclude_interfaces: Vec<String>,
    /// DNS capture: UDP and TCP to port 53 from non-proxy users goes to this port.
    pub dns_port: Option<u16>,
    /// Per-pod sysctls (allow-listed names under `net.`), written inside the pod's netns.
    pub sysctls: Vec<(String, String)>,
    /// What happens to traffic over `lo`.
    pub loopback: Loopback,
}

/// Consul's DNS redirection (`sdk/iptables`): with a port, UDP and TCP to `ip`:53 go to
/// `ip:port`; without one, every UDP and TCP query to port 53 goes to `ip`. Everyone's,
/// the proxy's too. In a dual-stack pod only IPv6 queries are redirected, to `::1`, as
/// Consul's two passes do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConsulDns {
    pub ip: Ipv4Addr,
    pub port: Option<u16>,
}

/// What a profile with its own configuration and gate (Kuma, Consul) makes of a pod: its plan
/// and whether IPv6 is captured at all, or why the pod is left alone.
// One exists per decision and is matched right away (as `Decision`).
#[allow(clippy::large_enum_variant)]
pub(super) enum MeshPlan {
    Capture { plan: RedirectPlan, ipv6: bool },
    Skip(String),
}

/// One exclusion by user and port: `proto` traffic of `uid` to `ports` (inclusive; `None`
/// for every port).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UidPorts {
    pub proto: Proto,
    pub ports: Option<(u16, u16)>,
    pub uid: u32,
}

/// A transport protocol of an exclusion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl fmt::Display for UidPorts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        };
        match self.ports {
            Some((lo, hi)) => write!(f, "{proto}:{lo}-{hi}:{}", self.uid),
            None => write!(f, "{proto}:*:{}", self.uid),
        }
    }
}

/// Loopback handling, where Istio and Linkerd differ.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Loopback {
    /// Istio: the proxy calling its own pod over `lo` (not 127.0.0.1, not the tunnel port) is
    /// looped to the inbound port; the passthrough source over `lo` is left alone; other
    /// users' `lo` traffic is left alone unless the include CIDRs name a loopback address.
    Istio {
        /// The proxy's mTLS tunnel port (HBONE, 15008).
        tunnel_port: u16,
        /// Source the proxy uses over `lo` for inbound passthrough (127.0.0.6).
        passthrough_source: Ipv4Addr,
        /// The same for IPv6 (`::6`, which the agent adds to `lo` as Istio does).
        passthrough_source6: Ipv6Addr,
    },
    /// Linkerd: all egress over `lo` is left alone.
    IgnoreAll,
    /// Kuma: Istio's handling of `lo` without a tunnel port; its OUTPUT order also puts the
    /// outbound IP exclusions first and captures DNS over UDP only (TCP/53 of other users
    /// returns), as kuma-cni's rules do.
    Kuma {
        passthrough_source: Ipv4Addr,
        passthrough_source6: Ipv6Addr,
    },
    /// Consul: no special case for `lo` (only 127.0.0.1 / ::1 returns); the excluded users,
    /// destinations and ports return before the proxy's uid, as in `CONSUL_PROXY_OUTPUT`.
    Consul,
}

impl Loopback {
    /// Istio's values.
    pub fn istio() -> Self {
        Loopback::Istio {
            tunnel_port: 15008,
            passthrough_source: Ipv4Addr::new(127, 0, 0, 6),
            passthrough_source6: Ipv6Addr::new(0, 0, 0, 0, 0, 0, 0, 6),
        }
    }
}

impl RedirectPlan {
    /// All TCP captured to these ports, nothing excluded, no DNS capture or sysctls: the base
    /// every profile adjusts with struct-update syntax, so a new field has one default.
    pub fn capture_all(
        outbound_port: u16,
        inbound_port: u16,
        proxy_uid: u32,
        loopback: Loopback,
    ) -> Self {
        RedirectPlan {
            mode: CaptureMode::Redirect,
            families: Families::IPV4,
            outbound_port,
            inbound_port,
            proxy_uid,
            proxy_gid: None,
            include_inbound_ports: Ports::All,
            exclude_inbound_ports: Vec::new(),
            exclude_inbound_sources: Vec::new(),
            exclude_outbound_ports: Vec::new(),
            include_outbound_ports: Vec::new(),
            include_outbound_cidrs: Cidrs::All,
            exclude_outbound_cidrs: Vec::new(),
            exclude_outbound_uids: Vec::new(),
            consul_dns: None,
            exclude_uid_ports: Vec::new(),
            exclude_interfaces: Vec::new(),
            dns_port: None,
            sysctls: Vec::new(),
            loopback,
        }
    }
}

/// Node-level settings that shape every plan (agent configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanDefaults {
    /// Defaults of the native `sluice.dev/*` plan.
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    pub exclude_inbound_ports: Vec<u16>,
    /// TPROXY mark and routing table when a pod asks for TPROXY without naming them.
    pub tproxy_mark: u32,
    pub tproxy_table: u32,
    /// Read Istio's annotations (pods with `sidecar.istio.io/status`).
    pub istio: bool,
    /// Read Linkerd's annotations (pods with `linkerd.io/proxy-version`).
    pub linkerd: bool,
    /// Read Kuma's configuration (pods with `traffic.kuma.io/transparent-proxy-config`).
    pub kuma: bool,
    /// Read Consul's configuration (pods with `consul.hashicorp.com/redirect-traffic-config`).
    pub consul: bool,
    /// Sysctls Kubernetes calls unsafe that pods on this node may set anyway (the node's
    /// consent, as kubelet's `--allowed-unsafe-sysctls`); see [`SYSCTL_ALLOW_LIST`].
    pub allowed_unsafe_sysctls: Vec<String>,
    /// Whether native `sluice.dev/*` overrides apply to a pod a mesh profile captures. Off by
    /// default: a mesh's capture is the mesh's (Istio offers no knob to exempt root, say), so
    /// an annotation a pod's author adds cannot widen what bypasses the mesh's proxy.
    pub native_overrides_on_mesh_pods: bool,
}

impl Default for PlanDefaults {
    fn default() -> Self {
        Self {
            outbound_port: 15001,
            inbound_port: 15006,
            proxy_uid: 1337,
            proxy_gid: 1337,
            exclude_inbound_ports: vec![15008, 15020, 15021, 15090],
            tproxy_mark: 1337,
            tproxy_table: 133,
            istio: true,
            linkerd: true,
            kuma: true,
            consul: true,
            allowed_unsafe_sysctls: Vec::new(),
            native_overrides_on_mesh_pods: false,
        }
    }
}

mod decide;
pub use decide::{Decision, Profile, decide, decide_for};

#[cfg(test)]
mod tests;
