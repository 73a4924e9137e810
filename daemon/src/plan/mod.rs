//! Pod annotations + node defaults → a [`RedirectPlan`]: a plain value describing the capture
//! a pod gets. No I/O happens here; rendering and applying live in `ruleset` and `nft`.

mod annotations;

use std::collections::BTreeMap;
use std::fmt;
use std::net::Ipv4Addr;

use ipnet::IpNet;
use sha2::{Digest, Sha256};

pub use annotations::{ANNOTATION_PREFIX, REDIRECT, native_keys};

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
    /// Where outbound TCP is redirected (Istio: 15001).
    pub outbound_port: u16,
    /// Where inbound TCP is redirected (Istio: 15006).
    pub inbound_port: u16,
    /// Traffic from this uid is the proxy's own and is not redirected.
    pub proxy_uid: u32,
    /// Traffic from this gid is the proxy's own and is not redirected.
    pub proxy_gid: u32,
    /// Inbound destination ports that are redirected.
    pub include_inbound_ports: Ports,
    /// Inbound destination ports that reach the app directly (the proxy's own ports).
    pub exclude_inbound_ports: Vec<u16>,
    /// Outbound destination ports that are never redirected.
    pub exclude_outbound_ports: Vec<u16>,
    /// Outbound destinations that are redirected.
    pub include_outbound_cidrs: Cidrs,
    /// Outbound destinations that are never redirected.
    pub exclude_outbound_cidrs: Vec<IpNet>,
    /// The proxy's mTLS tunnel port: the proxy's own connections over `lo` to it are not
    /// looped back into the inbound port (Istio HBONE, 15008).
    pub tunnel_port: u16,
    /// Source address the proxy uses over `lo` for inbound passthrough (Istio: 127.0.0.6).
    pub passthrough_source: Ipv4Addr,
}

impl RedirectPlan {
    /// A stable short hash of the plan: equal plans give equal fingerprints across runs and
    /// builds, so the fingerprint stored in the kernel can be compared later.
    pub fn fingerprint(&self) -> String {
        let digest = Sha256::digest(format!("{self:?}").as_bytes());
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Node-level settings that shape every plan (agent configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanDefaults {
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    pub exclude_inbound_ports: Vec<u16>,
}

impl Default for PlanDefaults {
    fn default() -> Self {
        Self {
            outbound_port: 15001,
            inbound_port: 15006,
            proxy_uid: 1337,
            proxy_gid: 1337,
            exclude_inbound_ports: vec![15008, 15020, 15021, 15090],
        }
    }
}

/// Which annotation set a plan came from (shown by `sluicectl explain` and recorded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// `sluice.dev/*` annotations.
    Native,
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Profile::Native => "native",
        })
    }
}

/// What to do with a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Program this plan.
    Capture {
        plan: RedirectPlan,
        profile: Profile,
    },
    /// Leave the pod alone, for this reason.
    Skip { reason: String },
}

/// Decides a pod's capture from its annotations. Pure: same input, same output.
pub fn decide(
    annotations: &BTreeMap<String, String>,
    defaults: &PlanDefaults,
) -> Result<Decision, PlanError> {
    annotations::native(annotations, defaults)
}

#[cfg(test)]
mod tests;
