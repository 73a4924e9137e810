//! Capture proven by packets: real netns, real veth, the real plugin and agent, and listeners
//! that report the original destination of what they accept.

use sluice_tests::*;

const APP_UID: u32 = 1000;
const PROXY_ID: u32 = 1337;

/// Topology + agent + a real CNI ADD with these annotations.
fn attached(test: &str, annotations: &[(&str, &str)]) -> (Topology, Agent) {
    attached_with(test, &[POD_CIDR4], annotations)
}

/// Like [`attached`] with these pod addresses in prevResult (they choose the IP families).
fn attached_with(test: &str, ips: &[&str], annotations: &[(&str, &str)]) -> (Topology, Agent) {
    attached_by(test, &[], ips, annotations)
}

/// Like [`attached_with`], the agent started with `flags`.
fn attached_by(
    test: &str,
    flags: &[&str],
    ips: &[&str],
    annotations: &[(&str, &str)],
) -> (Topology, Agent) {
    require_root();
    let topo = Topology::new(test);
    let agent = Agent::start_with(test, flags);
    let mut all = vec![("sluice.dev/redirect", "enabled")];
    all.extend_from_slice(annotations);
    let stdin = conf(
        "1.0.0",
        &agent.socket_str(),
        &all,
        Some(&prev_result_with("1.0.0", ips)),
    );
    let run = cni("ADD", test, &topo.pod.path(), &stdin);
    assert_eq!(run.exit, 0, "ADD failed: {run:?}");
    (topo, agent)
}

/// CNI DEL of the pod attached by [`attached_with`] (the runtime sends the annotations again).
fn del(test: &str, topo: &Topology, agent: &Agent, annotations: &[(&str, &str)]) {
    let mut all = vec![("sluice.dev/redirect", "enabled")];
    all.extend_from_slice(annotations);
    let stdin = conf("1.0.0", &agent.socket_str(), &all, None);
    let run = cni("DEL", test, &topo.pod.path(), &stdin);
    assert_eq!(run.exit, 0, "DEL failed: {run:?}");
}

fn proxy_listeners(topo: &Topology) -> [Listener; 3] {
    [
        Listener::start(&topo.pod, "0.0.0.0:15001", "outbound"),
        Listener::start(&topo.pod, "0.0.0.0:15006", "inbound"),
        Listener::start(&topo.peer, "0.0.0.0:8080", "peer"),
    ]
}

fn label(reply: &Result<String, String>) -> &str {
    reply
        .as_deref()
        .map(|l| l.split(' ').next().unwrap_or(""))
        .unwrap_or("connect-failed")
}

#[test]
fn outbound_tcp_from_the_app_lands_on_the_outbound_port_with_its_original_destination() {
    let (topo, _agent) = attached("out", &[]);
    let _l = proxy_listeners(&topo);
    assert!(
        topo.pod.ip(&["link", "show", "lo"]).contains("UP"),
        "sluice brings lo up"
    );
    assert_eq!(
        connect_as(&topo.pod, APP_UID, APP_UID, "10.99.0.1:8080"),
        Ok("outbound orig=10.99.0.1:8080".to_owned())
    );
    assert_eq!(
        connect_as(&topo.pod, 0, 0, "10.98.0.1:443"),
        Ok("outbound orig=10.98.0.1:443".to_owned()),
        "root in the pod is an app user too"
    );
}

#[test]
fn the_proxy_uid_and_the_proxy_gid_bypass_capture() {
    let (topo, _agent) = attached("proxy", &[]);
    let _l = proxy_listeners(&topo);
    assert_eq!(
        label(&connect_as(&topo.pod, PROXY_ID, APP_UID, "10.99.0.1:8080")),
        "peer"
    );
    assert_eq!(
        label(&connect_as(&topo.pod, APP_UID, PROXY_ID, "10.99.0.1:8080")),
        "peer"
    );
    assert_eq!(
        label(&connect_as(&topo.pod, APP_UID, APP_UID, "10.99.0.1:8080")),
        "outbound"
    );
}

#[test]
fn excluded_outbound_ports_and_cidrs_bypass_capture() {
    let (topo, _agent) = attached(
        "excl",
        &[
            ("sluice.dev/exclude-outbound-ports", "9090"),
            ("sluice.dev/exclude-outbound-cidrs", "10.98.0.0/16"),
        ],
    );
    let _l = proxy_listeners(&topo);
    let _p9090 = Listener::start(&topo.peer, "0.0.0.0:9090", "peer9090");
    assert_eq!(
        label(&connect_as(&topo.pod, APP_UID, APP_UID, "10.99.0.1:9090")),
        "peer9090"
    );
    assert_eq!(
        label(&connect_as(&topo.pod, APP_UID, APP_UID, "10.98.0.1:8080")),
        "peer"
    );
    assert_eq!(
        connect_as(&topo.pod, APP_UID, APP_UID, "10.99.0.1:8080"),
        Ok("outbound orig=10.99.0.1:8080".to_owned())
    );
}

#[test]
fn include_outbound_cidrs_limits_capture_to_the_listed_networks() {
    let (topo, _agent) = attached(
        "incl",
        &[("sluice.dev/include-outbound-cidrs", "10.98.0.0/16")],
    );
    let _l = proxy_listeners(&topo);
    assert_eq!(
        connect_as(&topo.pod, APP_UID, APP_UID, "10.98.0.1:8080"),
        Ok("outbound orig=10.98.0.1:8080".to_owned())
    );
    assert_eq!(
        label(&connect_as(&topo.pod, APP_UID, APP_UID, "10.99.0.1:8080")),
        "peer"
    );
}

#[test]
fn localhost_is_never_redirected() {
    let (topo, _agent) = attached("lo", &[]);
    let _l = proxy_listeners(&topo);
    let _app = Listener::start(&topo.pod, "127.0.0.1:9000", "app");
    for (uid, gid) in [(APP_UID, APP_UID), (PROXY_ID, PROXY_ID)] {
        assert_eq!(
            label(&connect_as(&topo.pod, uid, gid, "127.0.0.1:9000")),
            "app",
            "uid {uid}"
        );
    }
}

#[test]
fn the_proxy_calling_its_own_pod_over_lo_is_looped_to_the_inbound_port() {
    let (topo, _agent) = attached("loop", &[]);
    let _l = proxy_listeners(&topo);
    let _app = Listener::start(&topo.pod, "0.0.0.0:8080", "app");
    assert_eq!(
        connect_as(&topo.pod, PROXY_ID, PROXY_ID, "10.99.0.2:8080"),
        Ok("inbound orig=10.99.0.2:8080".to_owned())
    );
    // The app calling its own pod IP goes over lo and is left alone.
    assert_eq!(
        label(&connect_as(&topo.pod, APP_UID, APP_UID, "10.99.0.2:8080")),
        "app"
    );
}

#[test]
fn inbound_tcp_from_the_peer_lands_on_the_inbound_port() {
    let (topo, _agent) = attached("in", &[]);
    let _l = proxy_listeners(&topo);
    let _app = Listener::start(&topo.pod, "0.0.0.0:8080", "app");
    assert_eq!(
        connect_as(&topo.peer, APP_UID, APP_UID, "10.99.0.2:8080"),
        Ok("inbound orig=10.99.0.2:8080".to_owned())
    );
}

#[test]
fn an_excluded_inbound_port_reaches_the_app() {
    let (topo, _agent) = attached(
        "inexcl",
        &[("sluice.dev/exclude-inbound-ports", "15020,8081")],
    );
    let _l = proxy_listeners(&topo);
    let _a = Listener::start(&topo.pod, "0.0.0.0:15020", "app15020");
    let _b = Listener::start(&topo.pod, "0.0.0.0:8081", "app8081");
    let _c = Listener::start(&topo.pod, "0.0.0.0:8080", "app8080");
    assert_eq!(
        label(&connect_as(&topo.peer, APP_UID, APP_UID, "10.99.0.2:15020")),
        "app15020"
    );
    assert_eq!(
        label(&connect_as(&topo.peer, APP_UID, APP_UID, "10.99.0.2:8081")),
        "app8081"
    );
    assert_eq!(
        label(&connect_as(&topo.peer, APP_UID, APP_UID, "10.99.0.2:8080")),
        "inbound"
    );
}

#[test]
fn a_pod_without_the_annotation_is_not_touched() {
    require_root();
    let topo = Topology::new("none");
    let _l = proxy_listeners(&topo);
    // No agent at all: the plugin must not need it.
    let stdin = conf(
        "1.0.0",
        "/nonexistent/agent.sock",
        &[("other/annotation", "x")],
        Some(&prev_result("1.0.0")),
    );
    let run = cni("ADD", "none", &topo.pod.path(), &stdin);
    assert_eq!(run.exit, 0, "{run:?}");
    assert!(topo.pod.sluice_table().is_none());
    assert_eq!(
        label(&connect_as(&topo.pod, APP_UID, APP_UID, "10.99.0.1:8080")),
        "peer"
    );
}

#[test]
fn dns_capture_sends_udp_and_tcp_53_of_non_proxy_users_to_the_dns_port() {
    let (topo, _agent) = attached("dns", &[("sluice.dev/dns-capture", "enabled")]);
    let _l = proxy_listeners(&topo);
    let _pod_udp = UdpListener::start(&topo.pod, "0.0.0.0:15053", "dns-udp");
    let _pod_tcp = Listener::start(&topo.pod, "0.0.0.0:15053", "dns-tcp");
    let _peer_udp = UdpListener::start(&topo.peer, "0.0.0.0:53", "peer-udp53");
    let _peer_tcp = Listener::start(&topo.peer, "0.0.0.0:53", "peer-tcp53");
    assert_eq!(
        udp_as(&topo.pod, APP_UID, APP_UID, "10.99.0.1:53"),
        Ok("dns-udp".to_owned())
    );
    assert_eq!(
        connect_as(&topo.pod, APP_UID, APP_UID, "10.99.0.1:53"),
        Ok("dns-tcp orig=10.99.0.1:53".to_owned())
    );
    // The proxy's own lookups (by uid or gid) go out untouched.
    assert_eq!(
        udp_as(&topo.pod, PROXY_ID, APP_UID, "10.99.0.1:53"),
        Ok("peer-udp53".to_owned())
    );
    assert_eq!(
        udp_as(&topo.pod, APP_UID, PROXY_ID, "10.99.0.1:53"),
        Ok("peer-udp53".to_owned())
    );
    assert_eq!(
        label(&connect_as(&topo.pod, PROXY_ID, PROXY_ID, "10.99.0.1:53")),
        "peer-tcp53"
    );
    // Other UDP is never captured.
    let _peer_other = UdpListener::start(&topo.peer, "0.0.0.0:5353", "peer-udp5353");
    assert_eq!(
        udp_as(&topo.pod, APP_UID, APP_UID, "10.99.0.1:5353"),
        Ok("peer-udp5353".to_owned())
    );
}

#[test]
fn dns_is_not_captured_unless_asked() {
    let (topo, _agent) = attached("nodns", &[]);
    let _l = proxy_listeners(&topo);
    let _pod_udp = UdpListener::start(&topo.pod, "0.0.0.0:15053", "dns-udp");
    let _peer_udp = UdpListener::start(&topo.peer, "0.0.0.0:53", "peer-udp53");
    assert_eq!(
        udp_as(&topo.pod, APP_UID, APP_UID, "10.99.0.1:53"),
        Ok("peer-udp53".to_owned())
    );
}

fn sysctl(ns: Option<&Netns>, name: &str) -> String {
    let out = match ns {
        Some(ns) => ns.exec(&["sysctl", "-n", name]),
        None => std::process::Command::new("sysctl")
            .args(["-n", name])
            .output()
            .expect("sysctl"),
    };
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn sysctls_are_written_inside_the_pod_only() {
    require_root();
    let host_before = sysctl(None, "net.ipv4.ip_unprivileged_port_start");
    // route_localnet is not on Kubernetes' safe list: this node consents to it.
    let (topo, _agent) = attached_by(
        "sysctl",
        &["--allow-unsafe-sysctl", "net.ipv4.conf.all.route_localnet"],
        &[POD_CIDR4],
        &[(
            "sluice.dev/sysctls",
            "net.ipv4.ip_unprivileged_port_start=80, net.ipv4.conf.all.route_localnet=1, net.ipv4.ip_local_port_range=20000-30000",
        )],
    );
    assert_eq!(
        sysctl(Some(&topo.pod), "net.ipv4.ip_unprivileged_port_start"),
        "80"
    );
    assert_eq!(
        sysctl(Some(&topo.pod), "net.ipv4.conf.all.route_localnet"),
        "1"
    );
    assert_eq!(
        sysctl(Some(&topo.pod), "net.ipv4.ip_local_port_range"),
        "20000 30000"
    );
    assert_eq!(
        sysctl(None, "net.ipv4.ip_unprivileged_port_start"),
        host_before,
        "the node is untouched"
    );
    assert_ne!(
        sysctl(Some(&topo.peer), "net.ipv4.ip_unprivileged_port_start"),
        "80"
    );
}

#[test]
fn a_sysctl_off_the_allow_list_is_invalid_and_nothing_is_applied() {
    require_root();
    let ns = Netns::new("sl-sysbad");
    let agent = Agent::start("sysbad");
    for value in [
        "kernel.pid_max=100000",
        "net.ipv4.ip_forward=1",
        "net.ipv4.conf.all.route_localnet=2",
        // Unsafe in Kubernetes' terms, and this node did not consent.
        "net.ipv4.conf.all.route_localnet=1",
        "net.ipv6.conf.all.disable_ipv6=1",
    ] {
        let stdin = conf(
            "1.0.0",
            &agent.socket_str(),
            &[
                ("sluice.dev/redirect", "enabled"),
                ("sluice.dev/sysctls", value),
            ],
            Some(&prev_result("1.0.0")),
        );
        let run = cni("ADD", "sysbad", &ns.path(), &stdin);
        assert_eq!(run.error_code(), 7, "{value}: {run:?}");
        if value.ends_with("=1") && !value.contains("forward") {
            assert!(
                run.stdout.contains("allowed-unsafe-sysctls"),
                "names the setting that would allow it: {run:?}"
            );
        }
        assert!(
            run.json()["msg"]
                .as_str()
                .unwrap_or("")
                .contains("sluice.dev/sysctls"),
            "{run:?}"
        );
        assert!(ns.sluice_table().is_none());
    }
}

#[test]
fn a_failing_sysctl_rolls_back_earlier_sysctls_and_the_table() {
    require_root();
    // No eth0 in this netns: the second sysctl cannot be written.
    let ns = Netns::new("sl-sysroll");
    let before = sysctl(Some(&ns), "net.ipv4.ip_unprivileged_port_start");
    let agent = Agent::start_with(
        "sysroll",
        &["--allow-unsafe-sysctl", "net.ipv4.conf.eth0.route_localnet"],
    );
    let stdin = conf(
        "1.0.0",
        &agent.socket_str(),
        &[
            ("sluice.dev/redirect", "enabled"),
            (
                "sluice.dev/sysctls",
                "net.ipv4.ip_unprivileged_port_start=80,net.ipv4.conf.eth0.route_localnet=1",
            ),
        ],
        Some(&prev_result("1.0.0")),
    );
    let run = cni("ADD", "sysroll", &ns.path(), &stdin);
    assert_eq!(run.error_code(), 101, "{run:?}");
    assert!(
        run.json()["msg"]
            .as_str()
            .unwrap_or("")
            .contains("net.ipv4.conf.eth0.route_localnet"),
        "{run:?}"
    );
    assert!(ns.sluice_table().is_none(), "the table was rolled back");
    assert_eq!(
        sysctl(Some(&ns), "net.ipv4.ip_unprivileged_port_start"),
        before,
        "the first sysctl was restored"
    );
}

#[test]
fn ipv6_is_captured_from_the_pod_ips_and_loopback_is_never_redirected() {
    let (topo, agent) = attached_with("v6", &[POD_CIDR4, POD_CIDR6], &[]);
    let _l = proxy_listeners(&topo);
    let _l6 = [
        Listener::start(&topo.pod, "[::]:15001", "outbound6"),
        Listener::start(&topo.pod, "[::]:15006", "inbound6"),
        Listener::start(&topo.pod, "[::1]:9000", "app6"),
        Listener::start(&topo.peer, "[::]:8080", "peer6"),
    ];
    assert_eq!(
        connect_as(&topo.pod, APP_UID, APP_UID, "[fd00:99::1]:8080"),
        Ok("outbound6 orig=[fd00:99::1]:8080".to_owned())
    );
    assert_eq!(
        connect_as(&topo.pod, PROXY_ID, PROXY_ID, "[fd00:99::1]:8080"),
        Ok("peer6 orig=-".to_owned()),
        "the proxy's own IPv6 traffic passes"
    );
    assert_eq!(
        connect_as(&topo.pod, APP_UID, APP_UID, "[::1]:9000"),
        Ok("app6 orig=-".to_owned()),
        "::1 is never redirected"
    );
    assert_eq!(
        connect_as(&topo.peer, APP_UID, APP_UID, "[fd00:99::2]:8080"),
        Ok("inbound6 orig=[fd00:99::2]:8080".to_owned())
    );
    // IPv4 is captured in the same table.
    assert_eq!(
        connect_as(&topo.pod, APP_UID, APP_UID, "10.99.0.1:8080"),
        Ok("outbound orig=10.99.0.1:8080".to_owned())
    );
    let lo = topo.pod.ip(&["-6", "addr", "show", "dev", "lo"]);
    assert!(
        lo.contains("inet6 ::6/128"),
        "::6 on lo as Istio adds it: {lo}"
    );
    del("v6", &topo, &agent, &[]);
    let lo = topo.pod.ip(&["-6", "addr", "show", "dev", "lo"]);
    assert!(!lo.contains("::6/128"), "DEL removes ::6: {lo}");
    assert!(topo.pod.sluice_table().is_none());
}

/// `::6` on `lo` is sluice's to remove exactly when sluice added it: a pod whose `::6` was
/// there first (its runtime, a mesh's init container) keeps it after sluice's DEL; one where
/// sluice added it loses it. Ownership is recorded in the table's owner, so this holds on every
/// kernel, also those that keep no address protocol tag (before 6.1); Check finds the address
/// where it is, whoever added it.
#[test]
fn the_passthrough_address_is_removed_only_when_sluice_added_it() {
    require_root();
    let ips = [POD_CIDR4, POD_CIDR6];
    let lo6 = |topo: &Topology| {
        topo.pod
            .ip(&["-6", "addr", "show", "dev", "lo"])
            .contains("inet6 ::6/128")
    };
    // Someone else's ::6 first.
    let topo = Topology::new("lo6pre");
    topo.pod
        .ip(&["-6", "addr", "add", "::6/128", "dev", "lo", "nodad"]);
    let agent = Agent::start("lo6pre");
    let stdin = conf(
        "1.0.0",
        &agent.socket_str(),
        &[("sluice.dev/redirect", "enabled")],
        Some(&prev_result_with("1.0.0", &ips)),
    );
    assert_eq!(cni("ADD", "lo6pre", &topo.pod.path(), &stdin).exit, 0);
    let table = topo.pod.sluice_table().expect("captured");
    assert!(!table.contains(" lo=::6"), "not sluice's: {table}");
    assert_eq!(cni("CHECK", "lo6pre", &topo.pod.path(), &stdin).exit, 0);
    del("lo6pre", &topo, &agent, &[]);
    assert!(lo6(&topo), "DEL keeps a ::6 sluice did not add");
    // sluice's own.
    let (topo, agent) = attached_with("lo6own", &ips, &[]);
    let table = topo.pod.sluice_table().expect("captured");
    assert!(table.contains(" lo=::6"), "sluice's, and recorded: {table}");
    assert!(lo6(&topo));
    del("lo6own", &topo, &agent, &[]);
    assert!(!lo6(&topo), "DEL removes the ::6 sluice added");
}

#[test]
fn an_ipv4_only_pod_leaves_ipv6_alone() {
    let (topo, _agent) = attached("v4only", &[]);
    let _l6 = [
        Listener::start(&topo.pod, "[::]:15001", "outbound6"),
        Listener::start(&topo.peer, "[::]:8080", "peer6"),
    ];
    assert_eq!(
        connect_as(&topo.pod, APP_UID, APP_UID, "[fd00:99::1]:8080"),
        Ok("peer6 orig=-".to_owned())
    );
    let table = topo.pod.sluice_table().expect("table");
    assert!(!table.contains("ipv6"), "{table}");
}

/// The kernel's policy rules and the routes of `table` of one family in `ns`, as `ip` prints
/// them (no routes when the table does not exist).
fn policy(ns: &Netns, family: &str, table: &str) -> (String, String) {
    let routes = ns.exec(&["ip", family, "route", "show", "table", table]);
    (
        ns.ip(&[family, "rule", "show"]),
        String::from_utf8_lossy(&routes.stdout).into_owned(),
    )
}

#[test]
fn tproxy_mode_delivers_inbound_without_nat_and_del_removes_the_policy_routing() {
    let (topo, agent) = attached_with(
        "tproxy",
        &[POD_CIDR4, POD_CIDR6],
        &[("sluice.dev/mode", "tproxy")],
    );
    let _l = [
        Listener::transparent(&topo.pod, "0.0.0.0:15006", "inbound"),
        Listener::transparent(&topo.pod, "[::]:15006", "inbound6"),
        Listener::start(&topo.pod, "0.0.0.0:15001", "outbound"),
    ];
    // The proxy sees the original destination as its local address: no NAT.
    assert_eq!(
        connect_as(&topo.peer, APP_UID, APP_UID, "10.99.0.2:8080"),
        Ok("inbound orig=- local=10.99.0.2:8080".to_owned())
    );
    assert_eq!(
        connect_from(
            &topo.peer,
            APP_UID,
            APP_UID,
            Some(PEER_FAR_IP),
            "10.99.0.2:9999"
        ),
        Ok("inbound orig=- local=10.99.0.2:9999".to_owned()),
        "and the original source"
    );
    assert_eq!(
        connect_as(&topo.peer, APP_UID, APP_UID, "[fd00:99::2]:8080"),
        Ok("inbound6 orig=- local=[fd00:99::2]:8080".to_owned())
    );
    // Outbound stays REDIRECT, as in Istio's TPROXY mode.
    assert_eq!(
        connect_as(&topo.pod, APP_UID, APP_UID, "10.99.0.1:8080"),
        Ok("outbound orig=10.99.0.1:8080".to_owned())
    );
    for family in ["-4", "-6"] {
        let (rules, routes) = policy(&topo.pod, family, "133");
        assert!(
            rules.contains("32765:\tfrom all fwmark 0x539 lookup 133 proto 83"),
            "{family}: {rules}"
        );
        assert!(
            routes.contains("local default dev lo proto 83"),
            "{family}: {routes}"
        );
    }
    del("tproxy", &topo, &agent, &[("sluice.dev/mode", "tproxy")]);
    for family in ["-4", "-6"] {
        let (rules, routes) = policy(&topo.pod, family, "133");
        assert!(
            !rules.contains("fwmark"),
            "{family}: DEL removes the rule: {rules}"
        );
        assert!(
            routes.trim().is_empty(),
            "{family}: DEL removes the route: {routes}"
        );
    }
    assert!(topo.pod.sluice_table().is_none());
}

#[test]
fn tproxy_mark_and_table_are_configurable_and_no_listener_means_no_connection() {
    let (topo, _agent) = attached(
        "tpmark",
        &[
            ("sluice.dev/mode", "tproxy"),
            ("sluice.dev/tproxy-mark", "0x100"),
            ("sluice.dev/tproxy-table", "200"),
        ],
    );
    let (rules, routes) = policy(&topo.pod, "-4", "200");
    assert!(rules.contains("fwmark 0x100 lookup 200"), "{rules}");
    assert!(routes.contains("local default dev lo"), "{routes}");
    let (rules6, _) = policy(&topo.pod, "-6", "200");
    assert!(
        !rules6.contains("fwmark"),
        "IPv4-only pod: no IPv6 rule: {rules6}"
    );
    // The app listens, the proxy does not: iptables' TPROXY drops such a packet, and so do
    // we; the connection is never delivered uncaptured to the app.
    let _app = Listener::start(&topo.pod, "0.0.0.0:8080", "app");
    let reply = connect_as(&topo.peer, APP_UID, APP_UID, "10.99.0.2:8080");
    assert!(reply.is_err(), "{reply:?}");
}

#[test]
fn a_pod_with_ipv6_disabled_and_no_prevresult_still_attaches() {
    require_root();
    let topo = Topology::new("noip6");
    topo.pod
        .exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
    topo.pod
        .exec(&["sysctl", "-qw", "net.ipv6.conf.lo.disable_ipv6=1"]);
    let agent = Agent::start("noip6");
    // No prevResult: both families are captured by default, IPv6 device steps are skipped.
    let stdin = conf(
        "1.0.0",
        &agent.socket_str(),
        &[
            ("sluice.dev/redirect", "enabled"),
            ("sluice.dev/mode", "tproxy"),
        ],
        None,
    );
    let run = cni("ADD", "noip6", &topo.pod.path(), &stdin);
    assert_eq!(run.exit, 0, "{run:?}");
    let table = topo.pod.sluice_table().expect("table");
    assert!(table.contains("meta nfproto ipv6"), "{table}");
    assert!(
        topo.pod
            .ip(&["-4", "rule", "show"])
            .contains("fwmark 0x539 lookup 133")
    );
    let _l = Listener::start(&topo.pod, "0.0.0.0:15001", "outbound");
    let _p = Listener::start(&topo.peer, "0.0.0.0:8080", "peer");
    assert_eq!(
        connect_as(&topo.pod, APP_UID, APP_UID, "10.99.0.1:8080"),
        Ok("outbound orig=10.99.0.1:8080".to_owned())
    );
}

const LINKERD: (&str, &str) = ("linkerd.io/proxy-version", "stable-2.14.10");

/// `n` port ranges of 256 ports each starting at `from`: `from-(from+255),...`.
fn port_ranges(from: u32, n: u32) -> String {
    (0..n)
        .map(|i| format!("{}-{}", from + i * 256, from + i * 256 + 255))
        .collect::<Vec<_>>()
        .join(",")
}

/// Rules in the pod's sluice table (lines of `nft list table` that are statements).
fn rule_lines(ns: &Netns) -> usize {
    ns.sluice_table()
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("\t\t") && !l.contains(" hook "))
        .count()
}

/// A large legitimate plan (Linkerd skipping 256 outbound and 256 inbound ports, dual-stack:
/// ~1,000 rules, a batch past the default 208 KiB socket buffer) goes in as one transaction,
/// and its traffic is right in both families.
#[test]
fn a_large_linkerd_plan_attaches_in_one_transaction_and_its_traffic_is_right() {
    let (topo, _agent) = attached_with(
        "biglnk",
        &[POD_CIDR4, POD_CIDR6],
        &[
            LINKERD,
            ("config.linkerd.io/skip-outbound-ports", "1-256"),
            ("config.linkerd.io/skip-inbound-ports", "1000-1255"),
        ],
    );
    assert!(rule_lines(&topo.pod) > 1000, "{}", rule_lines(&topo.pod));
    // The harness's listeners are single-family: one per family and port.
    let _l: Vec<Listener> = ["0.0.0.0", "[::]"]
        .iter()
        .flat_map(|any| {
            [
                Listener::start(&topo.pod, &format!("{any}:4140"), "outbound"),
                Listener::start(&topo.pod, &format!("{any}:4143"), "inbound"),
                Listener::start(&topo.pod, &format!("{any}:1100"), "app1100"),
                Listener::start(&topo.pod, &format!("{any}:2000"), "app2000"),
                Listener::start(&topo.peer, &format!("{any}:80"), "peer80"),
                Listener::start(&topo.peer, &format!("{any}:8080"), "peer8080"),
            ]
        })
        .collect();
    for (peer, pod) in [(PEER_IP, POD_IP), (PEER_IP6, POD_IP6)] {
        let at = |ip: &str, port: u16| {
            if ip.contains(':') {
                format!("[{ip}]:{port}")
            } else {
                format!("{ip}:{port}")
            }
        };
        assert_eq!(
            label(&connect_as(&topo.pod, APP_UID, APP_UID, &at(peer, 80))),
            "peer80",
            "outbound port 80 is skipped ({peer})"
        );
        assert_eq!(
            connect_as(&topo.pod, APP_UID, APP_UID, &at(peer, 8080)),
            Ok(format!("outbound orig={}", at(peer, 8080)))
        );
        assert_eq!(
            label(&connect_as(&topo.peer, APP_UID, APP_UID, &at(pod, 1100))),
            "app1100",
            "inbound port 1100 is skipped ({pod})"
        );
        assert_eq!(
            connect_as(&topo.peer, APP_UID, APP_UID, &at(pod, 2000)),
            Ok(format!("inbound orig={}", at(pod, 2000)))
        );
    }
}

/// A Linkerd plan with both port lists at their bound (1,024 ports each), dual-stack: ~6,150
/// rules, a ~1.5 MiB batch, still commits in one transaction (the agent sizes its socket for
/// the batch).
#[test]
fn a_plan_with_every_list_at_its_bound_commits() {
    let (topo, _agent) = attached_with(
        "bound",
        &[POD_CIDR4, POD_CIDR6],
        &[
            LINKERD,
            (
                "config.linkerd.io/skip-outbound-ports",
                &port_ranges(1, 4)[..],
            ),
            (
                "config.linkerd.io/skip-inbound-ports",
                &port_ranges(2001, 4),
            ),
        ],
    );
    let rules = rule_lines(&topo.pod);
    assert!(rules > 6000, "{rules}");
}

/// Absurd plans are refused with code 7 naming the annotation, before anything is applied.
#[test]
fn an_absurd_plan_is_refused_naming_the_annotation_and_nothing_is_applied() {
    require_root();
    let topo = Topology::new("absurd");
    let agent = Agent::start("absurd");
    let five = port_ranges(1, 5);
    let list = |from: u32| {
        (from..from + 1024)
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(",")
    };
    let (a, b, c) = (list(1), list(2001), list(5001));
    let cases: [(&[(&str, &str)], &str); 2] = [
        // One list past its bound (1,280 ports).
        (
            &[LINKERD, ("config.linkerd.io/skip-outbound-ports", &five)],
            "config.linkerd.io/skip-outbound-ports",
        ),
        // Every list within its bound, the sum past the per-pod rule bound (~8,200 rules).
        (
            &[
                ("sidecar.istio.io/status", "{}"),
                ("traffic.sidecar.istio.io/excludeOutboundPorts", &a),
                ("traffic.sidecar.istio.io/excludeInboundPorts", &b),
                ("traffic.sidecar.istio.io/includeOutboundPorts", &c),
            ],
            "rules, more than the 8192",
        ),
    ];
    for (annotations, expect) in cases {
        let stdin = conf(
            "1.0.0",
            &agent.socket_str(),
            annotations,
            Some(&prev_result_with("1.0.0", &[POD_CIDR4, POD_CIDR6])),
        );
        let run = cni("ADD", "absurd", &topo.pod.path(), &stdin);
        assert_eq!(run.exit, 1, "{run:?}");
        assert_eq!(run.error_code(), 7, "{run:?}");
        let msg = run.json()["msg"].as_str().unwrap_or_default().to_owned();
        assert!(msg.contains(expect), "{msg}");
        assert!(msg.contains("annotation "), "names the annotation: {msg}");
        assert!(
            msg.len() < 1024,
            "the error quotes a bounded excerpt: {msg}"
        );
        assert!(topo.pod.sluice_table().is_none(), "nothing applied");
        assert!(
            !topo.pod.ip(&["link", "show", "lo"]).contains(",UP"),
            "lo untouched"
        );
    }
}

/// Kuma's own validator (the `kuma-validation` init container of CNI mode) passes on a pod
/// sluice captured: as the sidecar's uid it listens on 127.0.0.1:15006 (`::1` for IPv6),
/// dials 127.0.0.6:<port> (`::6`) from 127.0.0.1 and must land on its own listener — the
/// proxy-calling-its-own-pod rule over `lo`.
#[test]
fn kumas_validator_passes_on_a_kuma_pod() {
    let (topo, agent) = attached_with(
        "kuma-validator",
        &[POD_CIDR4, POD_CIDR6],
        &[
            ("kuma.io/sidecar-injected", "true"),
            (
                "traffic.kuma.io/transparent-proxy-config",
                "kumaDPUser: \"5678\"\nipFamilyMode: dualstack\ncniMode: true\n",
            ),
        ],
    );
    let _v4 = Listener::start(&topo.pod, "127.0.0.1:15006", "validator");
    let _v6 = Listener::start(&topo.pod, "[::1]:15006", "validator6");
    assert_eq!(
        connect_from(&topo.pod, 5678, 5678, Some("127.0.0.1"), "127.0.0.6:23456"),
        Ok("validator orig=127.0.0.6:23456".to_owned())
    );
    assert_eq!(
        connect_from(&topo.pod, 5678, 5678, Some("::1"), "[::6]:23456"),
        Ok("validator6 orig=[::6]:23456".to_owned())
    );
    // Anyone else dialling the same lands nowhere (lo of other users is left alone).
    assert!(
        connect_from(
            &topo.pod,
            APP_UID,
            APP_UID,
            Some("127.0.0.1"),
            "127.0.0.6:23456"
        )
        .is_err()
    );
    drop(agent);
}

/// Linkerd's own validator (`linkerd-network-validator`, the CNI mode's init container) passes
/// on a pod sluice captured: it listens on 0.0.0.0:4140, dials an address outside the pod,
/// and must read its own listener's answer back.
#[test]
fn linkerds_validator_passes_on_a_linkerd_pod() {
    let (topo, agent) = attached("linkerd-validator", &[LINKERD]);
    let _validator = Listener::start(&topo.pod, "0.0.0.0:4140", "validator-token");
    assert_eq!(
        connect_as(&topo.pod, APP_UID, APP_UID, "192.0.2.1:20001"),
        Ok("validator-token orig=192.0.2.1:20001".to_owned())
    );
    drop(agent);
}
