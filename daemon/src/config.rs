//! Agent configuration: defaults, overlaid by an optional TOML file, overlaid by flags.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::kernel::netns::Root;
use crate::model::plan::PlanDefaults;

pub const DEFAULT_SOCKET: &str = "/run/sluice/agent.sock";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Everything the agent needs to run. Field docs say why the knob exists.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Where the plugin reaches us; its directory is created 0700 and the socket is 0600.
    pub socket: PathBuf,
    /// Where pod namespaces may live; anything else is refused.
    pub netns_roots: Vec<Root>,
    /// Peer uids (SO_PEERCRED) allowed to call the API; the plugin runs as root.
    pub allow_uids: Vec<u32>,
    pub log_format: LogFormat,
    /// Node-wide plan defaults (ports, proxy uid/gid).
    pub plan: PlanDefaults,
    /// Prometheus endpoint; `None` serves none.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// The gRPC health service alone on TCP, for kubelet gRPC probes (which cannot reach a
    /// unix socket); `None` serves none.
    pub health_addr: Option<std::net::SocketAddr>,
    /// Install into the node's CNI dirs at start-up and keep the chain in place.
    pub install: Option<NodeInstall>,
    /// The container runtime's CRI socket for sandbox discovery and repair (`reconcile`);
    /// `None` turns discovery off.
    pub cri_socket: Option<PathBuf>,
    pub repair: crate::node::reconcile::Repair,
    pub reconcile_interval: std::time::Duration,
    /// Where `net.*` sysctls are written: `<dir>/net/...`. A container's own `/proc/sys` is
    /// read-only (the runtime's default), so the DaemonSet mounts the host's `/proc/sys/net`
    /// elsewhere and names it here; the files resolve against the writing thread's netns,
    /// whichever procfs mount they are reached through.
    pub sysctl_dir: PathBuf,
}

/// The long-running agent's node install.
#[derive(Debug, Clone)]
pub struct NodeInstall {
    pub installer: crate::node::install::Installer,
    /// Uninstall on SIGTERM. Off by default: a rolling upgrade must not open a window where
    /// pods start uncaptured or a DEL finds no plugin.
    pub uninstall_on_exit: bool,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            socket: DEFAULT_SOCKET.into(),
            netns_roots: Root::defaults(),
            allow_uids: vec![0],
            log_format: LogFormat::Text,
            plan: PlanDefaults::default(),
            metrics_addr: crate::metrics::DEFAULT_ADDR.parse().ok(),
            health_addr: None,
            install: None,
            cri_socket: Some(crate::node::discovery::DEFAULT_CRI_SOCKET.into()),
            repair: crate::node::reconcile::Repair::default(),
            reconcile_interval: crate::node::reconcile::DEFAULT_INTERVAL,
            sysctl_dir: crate::kernel::device::DEFAULT_SYSCTL_DIR.into(),
        }
    }
}

/// The config file's shape; every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileConfig {
    pub socket: Option<PathBuf>,
    pub netns_roots: Option<Vec<String>>,
    pub allow_uids: Option<Vec<u32>>,
    pub log_format: Option<LogFormat>,
    /// Prometheus endpoint address, or "off".
    pub metrics_addr: Option<String>,
    /// gRPC health on TCP (kubelet probes), e.g. "10.0.0.5:9966".
    pub health_addr: Option<String>,
    /// Where `net.*` sysctls are written (default /proc/sys).
    pub sysctl_dir: Option<PathBuf>,
    pub outbound_port: Option<u16>,
    pub inbound_port: Option<u16>,
    pub proxy_uid: Option<u32>,
    pub proxy_gid: Option<u32>,
    pub exclude_inbound_ports: Option<Vec<u16>>,
    /// TPROXY packet mark and routing table when a pod names none (default 1337, 133).
    pub tproxy_mark: Option<u32>,
    pub tproxy_table: Option<u32>,
    /// Mesh profiles to read annotations of (default: all): "istio", "linkerd", "kuma", "consul".
    pub profiles: Option<Vec<String>>,
    /// CRI socket path, or `off`.
    pub cri_socket: Option<String>,
    pub repair: Option<crate::node::reconcile::Repair>,
    /// Seconds between reconcile passes.
    pub reconcile_interval: Option<u64>,
    /// Sysctls Kubernetes calls unsafe that pods on this node may set (default: none).
    pub allowed_unsafe_sysctls: Option<Vec<String>>,
    /// Native `sluice.dev/*` overrides apply to mesh pods too (default: false).
    pub native_overrides_on_mesh_pods: Option<bool>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config {path:?}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path:?}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("parsing config {path:?}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
}

impl FileConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        let file: FileConfig = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.into(),
            source: Box::new(source),
        })?;
        if let Some(a) = file.metrics_addr.as_deref()
            && a != "off"
            && let Err(e) = listen_addr(a)
        {
            return Err(ConfigError::Invalid {
                path: path.into(),
                message: format!("metrics-addr: {e} (or \"off\")"),
            });
        }
        if let Some(a) = file.health_addr.as_deref()
            && let Err(e) = listen_addr(a)
        {
            return Err(ConfigError::Invalid {
                path: path.into(),
                message: format!("health-addr: {e}"),
            });
        }
        if file.tproxy_mark.is_some_and(|m| m == 0 || m == u32::MAX) {
            return Err(ConfigError::Invalid {
                path: path.into(),
                message: "tproxy-mark must be 1 to 4294967294".into(),
            });
        }
        if file
            .tproxy_table
            .is_some_and(|t| matches!(t, 0 | 253..=255))
        {
            return Err(ConfigError::Invalid {
                path: path.into(),
                message: "tproxy-table must not be 0 or a kernel table (253-255)".into(),
            });
        }
        if file.reconcile_interval == Some(0) {
            return Err(ConfigError::Invalid {
                path: path.into(),
                message: "reconcile-interval must be at least 1 (seconds)".into(),
            });
        }
        if let Some(list) = &file.allowed_unsafe_sysctls
            && let Err(e) = unsafe_sysctls(list.clone())
        {
            return Err(ConfigError::Invalid {
                path: path.into(),
                message: format!("allowed-unsafe-sysctls: {e}"),
            });
        }
        if let Some(unknown) = file
            .profiles
            .iter()
            .flatten()
            .find(|p| !["istio", "linkerd", "kuma", "consul"].contains(&p.as_str()))
        {
            return Err(ConfigError::Invalid {
                path: path.into(),
                message: format!(
                    "unknown profile {unknown:?} (known: istio, linkerd, kuma, consul)"
                ),
            });
        }
        Ok(file)
    }

    /// Applies the file's keys over `cfg`.
    pub fn apply(self, cfg: &mut AgentConfig) {
        if let Some(v) = self.socket {
            cfg.socket = v;
        }
        if let Some(v) = self.netns_roots {
            cfg.netns_roots = v.iter().map(|s| Root::parse(s)).collect();
        }
        if let Some(v) = self.allow_uids {
            cfg.allow_uids = v;
        }
        if let Some(v) = self.log_format {
            cfg.log_format = v;
        }
        if let Some(v) = self.metrics_addr {
            cfg.metrics_addr = listen_addr(&v).ok();
        }
        if let Some(v) = self.health_addr {
            cfg.health_addr = listen_addr(&v).ok();
        }
        if let Some(v) = self.sysctl_dir {
            cfg.sysctl_dir = v;
        }
        if let Some(v) = self.cri_socket {
            cfg.cri_socket = cri_socket(&v);
        }
        if let Some(v) = self.repair {
            cfg.repair = v;
        }
        if let Some(v) = self.reconcile_interval {
            cfg.reconcile_interval = std::time::Duration::from_secs(v.max(1));
        }
        let p = &mut cfg.plan;
        p.outbound_port = self.outbound_port.unwrap_or(p.outbound_port);
        p.inbound_port = self.inbound_port.unwrap_or(p.inbound_port);
        p.proxy_uid = self.proxy_uid.unwrap_or(p.proxy_uid);
        p.proxy_gid = self.proxy_gid.unwrap_or(p.proxy_gid);
        if let Some(v) = self.exclude_inbound_ports {
            p.exclude_inbound_ports = v;
        }
        p.tproxy_mark = self.tproxy_mark.unwrap_or(p.tproxy_mark);
        p.tproxy_table = self.tproxy_table.unwrap_or(p.tproxy_table);
        if let Some(v) = self.profiles {
            p.istio = v.iter().any(|s| s == "istio");
            p.linkerd = v.iter().any(|s| s == "linkerd");
            p.kuma = v.iter().any(|s| s == "kuma");
            p.consul = v.iter().any(|s| s == "consul");
        }
        if let Some(v) = self.allowed_unsafe_sysctls {
            p.allowed_unsafe_sysctls = v;
        }
        if let Some(v) = self.native_overrides_on_mesh_pods {
            p.native_overrides_on_mesh_pods = v;
        }
    }
}

/// The node's `allowed-unsafe-sysctls`: each must be a sysctl sluice sets that Kubernetes
/// calls unsafe (a safe one needs no consent; any other is never set).
pub fn unsafe_sysctls(list: Vec<String>) -> Result<Vec<String>, String> {
    use crate::model::plan::{SYSCTL_ALLOW_LIST, Safety};
    for name in &list {
        match SYSCTL_ALLOW_LIST.iter().find(|(n, ..)| n == name) {
            Some((_, _, Safety::NodeConsent)) => {}
            Some(_) => {
                return Err(format!(
                    "{name} is on Kubernetes' safe list: no consent needed"
                ));
            }
            None => {
                let known: Vec<&str> = SYSCTL_ALLOW_LIST
                    .iter()
                    .filter(|(_, _, s)| *s == Safety::NodeConsent)
                    .map(|(n, ..)| *n)
                    .collect();
                return Err(format!(
                    "{name:?} is not a sysctl sluice sets (those needing consent: {})",
                    known.join(", ")
                ));
            }
        }
    }
    Ok(list)
}

/// A TCP listen address: `ip:port`, `[ipv6]:port`, or an unbracketed IPv6 address followed by
/// `:port` — what `$(NODE_IP):9965` becomes in a DaemonSet's args on an IPv6 node.
pub fn listen_addr(s: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    s.rsplit_once(':')
        .and_then(|(ip, port)| {
            Some(std::net::SocketAddr::new(
                ip.parse().ok()?,
                port.parse().ok()?,
            ))
        })
        .ok_or_else(|| format!("{s:?} is not an address and port (ip:port)"))
}

/// A `cri-socket` value: a path, or `off` (or empty) for no discovery.
pub fn cri_socket(v: &str) -> Option<PathBuf> {
    match v.trim() {
        "" | "off" => None,
        path => Some(path.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_keys_override_defaults_and_unknown_keys_are_errors() {
        let file: FileConfig = toml::from_str(
            "socket = \"/tmp/x.sock\"\nnetns-roots = [\"/tmp/ns\", \"/proc\"]\nallow-uids = [0, 1000]\nlog-format = \"json\"\nproxy-uid = 2102\n",
        )
        .expect("valid config");
        let mut cfg = AgentConfig::default();
        file.apply(&mut cfg);
        assert_eq!(cfg.socket, PathBuf::from("/tmp/x.sock"));
        assert_eq!(
            cfg.netns_roots,
            vec![Root::Dir("/tmp/ns".into()), Root::Proc]
        );
        assert_eq!(cfg.allow_uids, vec![0, 1000]);
        assert_eq!(cfg.log_format, LogFormat::Json);
        assert_eq!(cfg.plan.proxy_uid, 2102);
        assert_eq!(cfg.plan.outbound_port, 15001);
        assert!(toml::from_str::<FileConfig>("sockett = \"/x\"").is_err());
    }

    #[test]
    fn listen_addresses_take_the_forms_a_daemonset_produces() {
        for (text, want) in [
            ("10.0.0.5:9965", "10.0.0.5:9965"),
            ("[fd00::5]:9965", "[fd00::5]:9965"),
            ("fd00::5:9965", "[fd00::5]:9965"),
            ("0.0.0.0:0", "0.0.0.0:0"),
        ] {
            assert_eq!(
                listen_addr(text).map(|a| a.to_string()),
                Ok(want.to_owned())
            );
        }
        for bad in ["", "9965", "$(NODE_IP):9965", "node:9965", "10.0.0.5:http"] {
            assert!(listen_addr(bad).is_err(), "{bad}");
        }
    }
}
