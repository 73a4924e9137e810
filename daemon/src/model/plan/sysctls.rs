//! The sysctls a pod may ask for through `sluice.dev/sysctls`, and the node's consent for the
//! ones Kubernetes calls unsafe.

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
