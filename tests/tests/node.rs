//! The agent as a DaemonSet runs it: least privilege (exactly CAP_NET_ADMIN + CAP_SYS_ADMIN),
//! Prometheus metrics scraped over HTTP, and readiness that waits for the node install.

use std::process::Command;
use std::time::Duration;

use sluice_tests::*;

/// `setpriv` (util-linux) limiting the agent's bounding set, so as root it is permitted only
/// these capabilities (what `capabilities: {drop: [ALL], add: [...]}` gives a container).
fn only_caps(caps: &str) -> Vec<String> {
    vec![
        "setpriv".into(),
        format!("--bounding-set=-all,{caps}"),
        "--inh-caps=-all".into(),
        "--".into(),
    ]
}

fn add(agent: &Agent, ns: &Netns, container: &str, annotations: &[(&str, &str)]) -> CniRun {
    let stdin = conf(
        "1.0.0",
        &agent.socket_str(),
        annotations,
        Some(&prev_result("1.0.0")),
    );
    cni("ADD", container, &ns.path(), &stdin)
}

#[test]
fn with_exactly_net_admin_and_sys_admin_a_full_add_works() {
    require_root();
    let wrapper = only_caps("+net_admin,+sys_admin");
    let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
    let agent = Agent::start_wrapped("caps", &wrapper, &[]);
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).expect("agent status");
    // CapEff of exactly NET_ADMIN (12) and SYS_ADMIN (21): bits 0x201000.
    assert!(
        status.lines().any(|l| l == "CapEff:\t0000000000201000"),
        "{status}"
    );
    assert!(
        status.lines().any(|l| l == "CapPrm:\t0000000000201000"),
        "{status}"
    );
    let topo = Topology::new("caps");
    let run = add(
        &agent,
        &topo.pod,
        "caps",
        &[
            ("sluice.dev/redirect", "enabled"),
            ("sluice.dev/mode", "tproxy"),
            (
                "sluice.dev/sysctls",
                "net.ipv4.ip_unprivileged_port_start=0",
            ),
        ],
    );
    assert_eq!(run.exit, 0, "{run:?}");
    assert!(topo.pod.sluice_table().is_some());
    assert!(
        topo.pod
            .ip(&["rule", "show"])
            .contains("fwmark 0x539 lookup 133")
    );
    let log = std::fs::read_to_string(&agent.log).unwrap_or_default();
    assert!(
        log.contains("dropped every other capability")
            && log.contains("CAP_NET_ADMIN, CAP_SYS_ADMIN"),
        "{log}"
    );
}

#[test]
fn without_net_admin_the_agent_fails_fast_with_a_clear_message() {
    require_root();
    let wrapper = only_caps("+sys_admin");
    let dir = std::env::temp_dir().join(format!("sluice-nocap-{}", std::process::id()));
    let out = Command::new(&wrapper[0])
        .args(&wrapper[1..])
        .arg(bin("sluice-agent"))
        .arg("--socket")
        .arg(dir.join("agent.sock"))
        .args(["--metrics-addr", "off"])
        .output()
        .expect("run agent");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("missing capability CAP_NET_ADMIN") && err.contains("NET_ADMIN, SYS_ADMIN"),
        "{err}"
    );
}

#[test]
fn a_read_only_sysctl_dir_stops_the_agent_at_start_and_a_writable_one_is_used() {
    require_root();
    // What a container's /proc/sys is: procfs mounted read-only.
    let dir = std::env::temp_dir().join(format!("sluice-rosys-{}", std::process::id()));
    let ro = dir.join("proc-sys");
    std::fs::create_dir_all(&ro).expect("dir");
    sh(&["mount", "--bind", "/proc/sys", &ro.display().to_string()]);
    sh(&["mount", "-o", "remount,bind,ro", &ro.display().to_string()]);
    let out = Command::new(bin("sluice-agent"))
        .arg("--socket")
        .arg(dir.join("agent.sock"))
        .args([
            "--metrics-addr",
            "off",
            "--cri-socket",
            "off",
            "--sysctl-dir",
        ])
        .arg(&ro)
        .output()
        .expect("run agent");
    let _ = nix::mount::umount2(&ro, nix::mount::MntFlags::MNT_DETACH);
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is mounted read-only") && err.contains("sysctl-dir"),
        "{err}"
    );
    assert!(!dir.join("agent.sock").exists(), "it never served");
    // The host's /proc/sys mounted elsewhere, writable (the DaemonSet's /host/proc/sys): the
    // pod's sysctl is written through it, into the pod's netns.
    let rw = dir.join("host-proc-sys");
    std::fs::create_dir_all(rw.join("net")).expect("dir");
    sh(&[
        "mount",
        "--bind",
        "/proc/sys/net",
        &rw.join("net").display().to_string(),
    ]);
    let agent = Agent::start_with("rwsys", &["--sysctl-dir", &rw.display().to_string()]);
    let topo = Topology::new("rwsys");
    let host_before = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .expect("host sysctl");
    let run = add(
        &agent,
        &topo.pod,
        "rwsys",
        &[
            ("sluice.dev/redirect", "enabled"),
            (
                "sluice.dev/sysctls",
                "net.ipv4.ip_unprivileged_port_start=77",
            ),
        ],
    );
    let _ = nix::mount::umount2(&rw.join("net"), nix::mount::MntFlags::MNT_DETACH);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(run.exit, 0, "{run:?}");
    let in_pod = topo.pod.run(|| {
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start").unwrap_or_default()
    });
    assert_eq!(in_pod.trim(), "77");
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start").ok(),
        Some(host_before),
        "the host's value is untouched"
    );
}

#[test]
fn metrics_count_attaches_detaches_checks_and_drift() {
    require_root();
    let agent = Agent::start("metrics");
    let url = agent.metrics_url();
    let ns = Netns::new("sl-metrics");
    let enabled = [("sluice.dev/redirect", "enabled")];
    assert_eq!(add(&agent, &ns, "m1", &enabled).exit, 0);
    assert_eq!(add(&agent, &ns, "m1", &enabled).exit, 0, "re-ADD replaces");
    assert_eq!(
        add(
            &agent,
            &ns,
            "m2",
            &[
                ("sluice.dev/redirect", "enabled"),
                ("sluice.dev/outbound-port", "x")
            ]
        )
        .error_code(),
        7
    );
    // Drift: a rule inserted by hand, then CHECK.
    let out = ns.exec(&[
        "nft", "insert", "rule", "inet", "sluice", "output", "return",
    ]);
    assert!(out.status.success());
    assert!(!agent.ctl(&["check", "m1"]).status.success());
    let m = scrape(&url);
    assert_eq!(
        value(
            &m,
            "sluice_attaches_total{result=\"programmed\",reason=\"\",code=\"\"}"
        ),
        2.0
    );
    assert_eq!(
        value(
            &m,
            "sluice_attaches_total{result=\"error\",reason=\"invalid_argument\",code=\"7\"}"
        ),
        1.0
    );
    assert_eq!(value(&m, "sluice_attached_pods"), 1.0);
    assert_eq!(value(&m, "sluice_attach_duration_seconds_count"), 2.0);
    assert_eq!(
        value(&m, "sluice_checks_total{result=\"drift\",reason=\"\"}"),
        1.0
    );
    assert_eq!(value(&m, "sluice_drift_detected_total"), 1.0);
    assert_eq!(value(&m, "sluice_drift_repaired_total"), 1.0);
    assert!(m.contains("sluice_build_info{version=\""), "{m}");
    assert!(value(&m, "sluice_process_resident_memory_bytes") > 1e6);
    assert!(m.ends_with("# EOF\n"), "OpenMetrics text");
    let stdin = conf("1.0.0", &agent.socket_str(), &enabled, None);
    assert_eq!(cni("DEL", "m1", &ns.path(), &stdin).exit, 0);
    let m = scrape(&url);
    assert_eq!(
        value(&m, "sluice_detaches_total{result=\"removed\",reason=\"\"}"),
        1.0
    );
    assert_eq!(value(&m, "sluice_attached_pods"), 0.0);
}

#[test]
fn readiness_waits_for_the_install_and_follows_it() {
    require_root();
    let root = std::env::temp_dir().join(format!("sluice-ready-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("net.d")).expect("conf dir");
    let bin_dir = root.join("bin").display().to_string();
    let conf_dir = root.join("net.d").display().to_string();
    let agent = Agent::start_with(
        "ready",
        &[
            "--install",
            "--cni-bin-dir",
            &bin_dir,
            "--cni-conf-dir",
            &conf_dir,
        ],
    );
    let status = || String::from_utf8_lossy(&agent.ctl(&["status"]).stdout).into_owned();
    let s = status();
    assert!(
        s.contains("ready: false (install not done: no CNI network config"),
        "no primary CNI config yet: {s}"
    );
    // The primary CNI comes up and writes its config: the agent chains and turns ready.
    std::fs::copy(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("cni-configs/10-bridge.conflist"),
        root.join("net.d/10-bridge.conflist"),
    )
    .expect("primary config");
    wait_for("readiness after install", Duration::from_secs(10), || {
        status().contains("ready: true")
    });
    let conf = std::fs::read_to_string(root.join("net.d/10-bridge.conflist")).expect("conf");
    assert!(conf.contains("\"sluice-cni\""), "{conf}");
    drop(agent);
    let _ = std::fs::remove_dir_all(&root);
}

/// An attach reads no `/proc/sys` it was not asked to write: every network namespace in which
/// a `/proc/sys/net/...` path was ever looked up keeps its own dentries for it, under the same
/// names and parents, and the kernel compares them one by one on the next lookup, so such a
/// read in the ADD path costs more the more pods the node has (~440 µs at 1,500 namespaces,
/// 20 µs on an empty node). The agent runs here in a mount namespace of its own whose
/// `/proc/sys` is an empty tmpfs: a dual-stack Istio pod must still get its `::6` (the IPv6
/// state of `lo` comes from rtnetlink) and a full, clean Check.
#[test]
fn an_attach_without_sysctls_never_looks_into_proc_sys() {
    require_root();
    let sysctls = std::env::temp_dir().join(format!("sluice-noprocsys-{}", std::process::id()));
    std::fs::create_dir_all(sysctls.join("net")).expect("net dir");
    let sysctl_dir = sysctls.display().to_string();
    let wrapper = [
        "unshare",
        "--mount",
        // Namespaces created after the agent started must still appear (HostToContainer).
        "--propagation",
        "slave",
        "--",
        "sh",
        "-c",
        r#"mount -t tmpfs -o ro,size=4k sluice-test-no-proc-sys /proc/sys && exec "$0" "$@""#,
    ];
    let agent = Agent::start_wrapped(
        "noprocsys",
        &wrapper,
        &["--sysctl-dir", sysctl_dir.as_str()],
    );
    let topo = Topology::new("noprocsys");
    let stdin = conf(
        "1.0.0",
        &agent.socket_str(),
        &[
            ("sidecar.istio.io/status", "{}"),
            ("sluice.dev/ip-families", "dual"),
        ],
        Some(&prev_result_with("1.0.0", &[POD_CIDR4, POD_CIDR6])),
    );
    let run = cni("ADD", "noprocsys", &topo.pod.path(), &stdin);
    assert_eq!(run.exit, 0, "{run:?}");
    let lo = topo.pod.ip(&["-6", "addr", "show", "dev", "lo"]);
    assert!(
        lo.contains("::6/128"),
        "the IPv6 passthrough address is missing: IPv6 on lo was read where the agent cannot see it\n{lo}"
    );
    let check = agent.ctl(&["check", "noprocsys"]);
    assert!(check.status.success(), "Check of the pod: {check:?}");
    let log = std::fs::read_to_string(&agent.log).unwrap_or_default();
    assert!(
        !log.contains("/proc/sys"),
        "the agent touched /proc/sys:\n{log}"
    );
    let _ = std::fs::remove_dir_all(&sysctls);
}

/// Sets the agent's open-file limit (the soft one: raising it again needs no privilege), as a
/// node's tight `LimitNOFILE` would.
fn limit_fds(agent: &Agent, n: usize) {
    let out = Command::new("prlimit")
        .args(["--pid", &agent.pid().to_string(), &format!("--nofile={n}:")])
        .output()
        .expect("prlimit");
    assert!(out.status.success(), "{out:?}");
}

fn open_fds(agent: &Agent) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", agent.pid())).map_or(0, Iterator::count)
}

/// The metrics and health ports are on the node's address, reachable by any pod: connections
/// there are bounded in number and time, so they never take the file descriptors a pod's ADD
/// needs, and the servers keep serving after every accept error. Tried as the review did: the
/// agent's fd limit at 64, 65 idle connections to each port, then a captured pod's ADD.
#[test]
fn idle_connections_to_the_metrics_and_health_ports_never_starve_an_add() {
    require_root();
    let health = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let agent = Agent::start_with("fdstarve", &["--health-addr", &health.to_string()]);
    let metrics_url = agent.metrics_url();
    let metrics_addr = metrics_url
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .to_owned();
    limit_fds(&agent, 64);
    let idle: Vec<std::net::TcpStream> = (0..65)
        .flat_map(|_| {
            [
                std::net::TcpStream::connect(&metrics_addr),
                std::net::TcpStream::connect(health),
            ]
        })
        .map(|c| c.expect("connect"))
        .collect();
    wait_for(
        "the agent to take what it will",
        Duration::from_secs(5),
        || open_fds(&agent) < 64,
    );
    let ns = Netns::new("sl-node-fdstarve");
    let run = add(
        &agent,
        &ns,
        "fdstarve",
        &[("sluice.dev/redirect", "enabled")],
    );
    assert_eq!(run.exit, 0, "{run:?}");
    assert!(ns.sluice_table().is_some());
    drop(idle);
    // Still serving, both.
    let scraped = scrape(&metrics_url);
    assert!(scraped.contains("sluice_attaches_total"), "{scraped}");
    let probe = std::net::TcpStream::connect(health);
    assert!(probe.is_ok(), "the health port still accepts");
}

/// Running out of file descriptors is transient: the ADD is code 11 (the runtime retries it),
/// not 101, and once descriptors are back the same ADD succeeds.
#[test]
fn an_agent_out_of_file_descriptors_answers_try_again_later() {
    require_root();
    let agent = Agent::start("fdout");
    let ns = Netns::new("sl-node-fdout");
    // Room for the plugin's connection and nothing more: opening the pod's netns fails.
    limit_fds(&agent, open_fds(&agent) + 1);
    let run = add(&agent, &ns, "fdout", &[("sluice.dev/redirect", "enabled")]);
    assert_eq!(run.error_code(), 11, "{run:?}");
    assert!(run.stdout.contains("Too many open files"), "{run:?}");
    assert!(ns.sluice_table().is_none());
    limit_fds(&agent, 1024);
    let run = add(&agent, &ns, "fdout", &[("sluice.dev/redirect", "enabled")]);
    assert_eq!(run.exit, 0, "{run:?}");
}
