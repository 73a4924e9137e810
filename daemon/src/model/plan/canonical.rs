//! A plan's canonical, versioned text and the fingerprint hashed from it.

use std::fmt;

use sha2::{Digest, Sha256};

use super::{CaptureMode, Cidrs, Loopback, Ports, RedirectPlan};

impl RedirectPlan {
    /// A stable short hash of the plan: 16 hex digits of SHA-256 over [`Self::canonical`].
    /// Equal plans give equal fingerprints across runs, builds and releases.
    pub fn fingerprint(&self) -> String {
        let digest = Sha256::digest(self.canonical().as_bytes());
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The plan in a canonical, versioned text form (`sluice-plan/2`, then one `key=value`
    /// line per field in a fixed order). Written out field by field, never derived from
    /// `Debug` or a serializer, so renaming or reordering fields in the code changes nothing,
    /// and a field at its base value (what [`Self::capture_all`] sets: empty list, none, all)
    /// is left out, so adding a field with such a base value keeps every existing plan's
    /// fingerprint. Releases before this form hashed the `Debug` text; `Check` compares rules,
    /// not fingerprints, so pods they programmed are not reported as drifted.
    pub fn canonical(&self) -> String {
        use std::fmt::Write;
        fn join<T: fmt::Display>(items: &[T]) -> String {
            items
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        }
        let mut out = String::from("sluice-plan/2\n");
        let mut line = |key: &str, value: String| {
            let _ = writeln!(out, "{key}={value}");
        };
        line(
            "mode",
            match self.mode {
                CaptureMode::Redirect => "redirect".to_owned(),
                CaptureMode::Tproxy { mark, table } => format!("tproxy mark={mark} table={table}"),
            },
        );
        let families: Vec<&str> = [(self.families.ipv4, "ipv4"), (self.families.ipv6, "ipv6")]
            .into_iter()
            .filter_map(|(on, name)| on.then_some(name))
            .collect();
        line("families", families.join(","));
        line("outbound_port", self.outbound_port.to_string());
        line("inbound_port", self.inbound_port.to_string());
        line("proxy_uid", self.proxy_uid.to_string());
        if let Some(gid) = self.proxy_gid {
            line("proxy_gid", gid.to_string());
        }
        if let Ports::Only(ports) = &self.include_inbound_ports {
            line("include_inbound_ports", format!("only {}", join(ports)));
        }
        let lists: [(&str, String); 6] = [
            ("exclude_inbound_ports", join(&self.exclude_inbound_ports)),
            (
                "exclude_inbound_sources",
                join(&self.exclude_inbound_sources),
            ),
            ("exclude_outbound_ports", join(&self.exclude_outbound_ports)),
            ("include_outbound_ports", join(&self.include_outbound_ports)),
            ("exclude_outbound_cidrs", join(&self.exclude_outbound_cidrs)),
            ("exclude_interfaces", join(&self.exclude_interfaces)),
        ];
        for (key, value) in lists {
            if !value.is_empty() {
                line(key, value);
            }
        }
        if !self.exclude_uid_ports.is_empty() {
            line("exclude_uid_ports", join(&self.exclude_uid_ports));
        }
        if !self.exclude_outbound_uids.is_empty() {
            line("exclude_outbound_uids", join(&self.exclude_outbound_uids));
        }
        if let Some(dns) = self.consul_dns {
            line(
                "consul_dns",
                match dns.port {
                    Some(port) => format!("{}:{port}", dns.ip),
                    None => dns.ip.to_string(),
                },
            );
        }
        if let Cidrs::Only(cidrs) = &self.include_outbound_cidrs {
            line("include_outbound_cidrs", format!("only {}", join(cidrs)));
        }
        if let Some(port) = self.dns_port {
            line("dns_port", port.to_string());
        }
        for (name, value) in &self.sysctls {
            line("sysctl", format!("{name}={value}"));
        }
        line(
            "loopback",
            match &self.loopback {
                Loopback::Istio {
                    tunnel_port,
                    passthrough_source,
                    passthrough_source6,
                } => format!(
                    "istio tunnel_port={tunnel_port} source={passthrough_source} source6={passthrough_source6}"
                ),
                Loopback::IgnoreAll => "ignore-all".to_owned(),
                Loopback::Kuma {
                    passthrough_source,
                    passthrough_source6,
                } => format!("kuma source={passthrough_source} source6={passthrough_source6}"),
                Loopback::Consul => "consul".to_owned(),
            },
        );
        out
    }
}
