//! The CNI protocol through the real `sluice-cni` binary, talking to a real agent.

use sluice_tests::*;

fn redirect() -> Vec<(&'static str, &'static str)> {
    vec![("sluice.dev/redirect", "enabled")]
}

#[test]
fn version_lists_every_supported_version() {
    let run = cni("VERSION", "", "", r#"{"cniVersion":"1.1.0"}"#);
    assert_eq!(run.exit, 0, "{run:?}");
    assert_eq!(
        run.json(),
        serde_json::json!({"cniVersion": "1.1.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]})
    );
}

#[test]
fn add_passes_prev_result_through_unchanged_for_0_4_0_and_1_0_0() {
    require_root();
    let topo = Topology::new("prev");
    let agent = Agent::start("prev");
    for version in ["0.4.0", "1.0.0"] {
        let prev = prev_result(version);
        let run = cni(
            "ADD",
            &format!("prev{}", version.replace('.', "")),
            &topo.pod.path(),
            &conf(version, &agent.socket_str(), &redirect(), Some(&prev)),
        );
        assert_eq!(run.exit, 0, "{run:?}");
        let expected: serde_json::Value = serde_json::from_str(&prev).expect("prev JSON");
        assert_eq!(
            run.json(),
            expected,
            "prevResult must come back as it went in ({version})"
        );
        assert_eq!(run.stdout, prev, "byte-for-byte too ({version})");
    }
    assert!(topo.pod.sluice_table().is_some());
}

#[test]
fn add_twice_is_idempotent() {
    require_root();
    let topo = Topology::new("twice");
    let agent = Agent::start("twice");
    let stdin = conf(
        "1.0.0",
        &agent.socket_str(),
        &redirect(),
        Some(&prev_result("1.0.0")),
    );
    assert_eq!(cni("ADD", "twice", &topo.pod.path(), &stdin).exit, 0);
    // As if the first ADD had come long ago: a repeated ADD of the same plan keeps the time
    // the capture was installed, so the table stays exactly as it was, whenever it comes.
    let first = untimed(&topo.pod.sluice_table().expect("table after first ADD")).replacen(
        " at=0\"",
        " at=1700000000\"",
        1,
    );
    let reload = topo.pod.exec(&[
        "sh",
        "-c",
        &format!("nft delete table inet sluice && nft -f - <<'EOF'\n{first}EOF"),
    ]);
    assert!(reload.status.success(), "{reload:?}");
    assert_eq!(cni("ADD", "twice", &topo.pod.path(), &stdin).exit, 0);
    let second = topo.pod.sluice_table().expect("table after second ADD");
    assert_eq!(first, second);
    let tables = topo.pod.exec(&["nft", "list", "tables"]);
    assert_eq!(
        String::from_utf8_lossy(&tables.stdout).trim(),
        "table inet sluice"
    );
    assert_eq!(cni("CHECK", "twice", &topo.pod.path(), &stdin).exit, 0);
}

#[test]
fn del_succeeds_twice_with_no_netns_and_after_the_netns_is_gone() {
    require_root();
    let topo = Topology::new("del");
    let agent = Agent::start("del");
    let stdin = conf(
        "1.0.0",
        &agent.socket_str(),
        &redirect(),
        Some(&prev_result("1.0.0")),
    );
    assert_eq!(cni("ADD", "del", &topo.pod.path(), &stdin).exit, 0);
    let del = cni("DEL", "del", &topo.pod.path(), &stdin);
    assert_eq!((del.exit, del.stdout.as_str()), (0, ""), "{del:?}");
    assert!(topo.pod.sluice_table().is_none(), "DEL removes the table");
    assert_eq!(
        cni("DEL", "del", &topo.pod.path(), &stdin).exit,
        0,
        "second DEL"
    );
    assert_eq!(
        cni("DEL", "del", "", &stdin).exit,
        0,
        "DEL with empty CNI_NETNS"
    );

    let gone = Netns::new("sl-del-gone");
    assert_eq!(cni("ADD", "gone", &gone.path(), &stdin).exit, 0);
    let path = gone.path();
    drop(gone);
    assert_eq!(
        cni("DEL", "gone", &path, &stdin).exit,
        0,
        "DEL after the netns was deleted"
    );
    let list = agent.ctl(&["list"]);
    assert!(
        !String::from_utf8_lossy(&list.stdout).contains("gone"),
        "the agent forgot it"
    );
}

#[test]
fn check_fails_after_someone_deletes_our_table() {
    require_root();
    let topo = Topology::new("check");
    let agent = Agent::start("check");
    let stdin = conf(
        "1.0.0",
        &agent.socket_str(),
        &redirect(),
        Some(&prev_result("1.0.0")),
    );
    assert_eq!(cni("ADD", "check", &topo.pod.path(), &stdin).exit, 0);
    assert_eq!(cni("CHECK", "check", &topo.pod.path(), &stdin).exit, 0);
    assert!(
        topo.pod
            .exec(&["nft", "delete", "table", "inet", "sluice"])
            .status
            .success()
    );
    let run = cni("CHECK", "check", &topo.pod.path(), &stdin);
    assert_eq!(run.error_code(), 100, "{run:?}");
    assert!(
        run.json()["details"]
            .as_str()
            .unwrap_or("")
            .contains("missing"),
        "{run:?}"
    );
}

#[test]
fn check_reports_a_rule_changed_by_hand() {
    require_root();
    let topo = Topology::new("drift");
    let agent = Agent::start("drift");
    let stdin = conf(
        "1.0.0",
        &agent.socket_str(),
        &redirect(),
        Some(&prev_result("1.0.0")),
    );
    assert_eq!(cni("ADD", "drift", &topo.pod.path(), &stdin).exit, 0);
    // Someone inserts an accept-all at the top of the outbound chain.
    assert!(
        topo.pod
            .exec(&[
                "nft", "insert", "rule", "inet", "sluice", "outbound", "accept"
            ])
            .status
            .success()
    );
    let run = cni("CHECK", "drift", &topo.pod.path(), &stdin);
    assert_eq!(run.error_code(), 100, "{run:?}");
    let out = agent.ctl(&["check", "drift"]);
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("chain outbound has 10 rules, expected 9"),
        "{out:?}"
    );
    assert!(stdout.contains("chain outbound rule 1 differs"), "{out:?}");
}

#[test]
fn add_with_the_agent_stopped_is_try_again_later_naming_the_socket() {
    require_root();
    let topo = Topology::new("down");
    let mut agent = Agent::start("down");
    agent.stop();
    let stdin = conf(
        "1.0.0",
        &agent.socket_str(),
        &redirect(),
        Some(&prev_result("1.0.0")),
    );
    let run = cni("ADD", "down", &topo.pod.path(), &stdin);
    assert_eq!(run.error_code(), 11, "{run:?}");
    assert!(
        run.json()["msg"]
            .as_str()
            .unwrap_or("")
            .contains(&agent.socket_str()),
        "{run:?}"
    );
    assert!(topo.pod.sluice_table().is_none());
    // DEL still succeeds.
    assert_eq!(cni("DEL", "down", &topo.pod.path(), &stdin).exit, 0);
    agent.restart();
    assert_eq!(
        cni("ADD", "down", &topo.pod.path(), &stdin).exit,
        0,
        "retry after restart works"
    );
}

#[test]
fn a_bad_annotation_is_invalid_config_naming_it_and_nothing_is_applied() {
    require_root();
    let topo = Topology::new("bad");
    let agent = Agent::start("bad");
    for (key, value) in [
        ("sluice.dev/outbound-port", "70000"),
        ("sluice.dev/exclude-outbound-cidrs", "10.0.0.0/33"),
        ("sluice.dev/exclude-inbound-ports", "80,,90"),
        ("sluice.dev/redirect", "yes"),
        ("sluice.dev/exclude-outbound-port", "80"),
    ] {
        let mut ann = redirect();
        if key == "sluice.dev/redirect" {
            ann.clear();
        }
        ann.push((key, value));
        let run = cni(
            "ADD",
            "bad",
            &topo.pod.path(),
            &conf(
                "1.0.0",
                &agent.socket_str(),
                &ann,
                Some(&prev_result("1.0.0")),
            ),
        );
        assert_eq!(run.error_code(), 7, "{key}={value}: {run:?}");
        let msg = run.json()["msg"].as_str().unwrap_or("").to_owned();
        assert!(
            msg.contains(key) && msg.contains(value),
            "message names {key} and {value}: {msg}"
        );
        assert!(
            topo.pod.sluice_table().is_none(),
            "nothing applied for {key}={value}"
        );
    }
}

#[test]
fn garbage_on_stdin_is_a_decode_failure() {
    for input in [
        "",
        "not json",
        "{\"cniVersion\":",
        "\u{0}\u{1}\u{2}",
        "[1,2,3]",
    ] {
        let run = cni("ADD", "garbage", "/var/run/netns/none", input);
        assert_eq!(run.error_code(), 6, "{input:?}: {run:?}");
    }
    // An unsupported version fails a pod that asked for sluice (code 1); a pod that did not
    // ask passes through, whatever the rest of its config looks like.
    let run = cni(
        "ADD",
        "old",
        "/var/run/netns/none",
        r#"{"cniVersion":"0.2.0","name":"n","type":"sluice-cni","runtimeConfig":{"io.kubernetes.cri.pod-annotations":{"sluice.dev/redirect":"enabled"}}}"#,
    );
    assert_eq!(run.error_code(), 1, "{run:?}");
    let run = cni(
        "ADD",
        "old",
        "/var/run/netns/none",
        r#"{"cniVersion":"0.2.0","name":"n","type":"sluice-cni","prevResult":{"ips":[]}}"#,
    );
    assert_eq!(run.exit, 0, "{run:?}");
    assert_eq!(run.stdout, r#"{"ips":[]}"#);
    let run = cni(
        "BOGUS",
        "x",
        "/var/run/netns/none",
        r#"{"cniVersion":"1.0.0","name":"n","type":"sluice-cni"}"#,
    );
    assert_eq!(run.error_code(), 4, "{run:?}");
}

#[test]
fn add_without_the_annotation_never_calls_the_agent() {
    // No root needed: nothing is touched and no agent exists at that socket.
    let stdin = conf(
        "1.0.0",
        "/nonexistent/agent.sock",
        &[("sluice.dev/redirect", "disabled")],
        Some(&prev_result("1.0.0")),
    );
    let run = cni("ADD", "skip", "/var/run/netns/does-not-matter", &stdin);
    assert_eq!(run.exit, 0, "{run:?}");
    assert_eq!(run.stdout, prev_result("1.0.0"));
}

/// The shapes real runtimes send for a pod that did not opt in: containerd sends
/// `"io.kubernetes.cri.pod-annotations": null` for a pod without annotations; `null` also
/// stands for other empty sections. Every one passes through with prevResult unchanged and no
/// agent.
#[test]
fn a_pod_without_annotations_in_every_null_shape_passes_through_without_the_agent() {
    let prev = prev_result("1.0.0");
    let base = |runtime_config: &str| {
        format!(
            r#"{{"capabilities":{{"io.kubernetes.cri.pod-annotations":true,"portMappings":true}},"cniVersion":"1.0.0","name":"example-net","type":"sluice-cni","agentSocket":"/nonexistent/agent.sock","prevResult":{prev},"runtimeConfig":{runtime_config}}}"#
        )
    };
    for stdin in [
        base(r#"{"io.kubernetes.cri.pod-annotations":null}"#),
        base(r#"{"io.kubernetes.cri.pod-annotations":null,"portMappings":null}"#),
        base("null"),
        base("{}"),
        base(r#"{"io.kubernetes.cri.pod-annotations":{}}"#),
        format!(
            r#"{{"cniVersion":"1.0.0","name":"n","type":"sluice-cni","capabilities":null,"agentSocket":null,"timeoutMs":null,"prevResult":{prev}}}"#
        ),
    ] {
        let run = cni("ADD", "nulls", "/var/run/netns/does-not-matter", &stdin);
        assert_eq!(run.exit, 0, "{stdin}\n{run:?}");
        assert_eq!(run.stdout, prev, "{stdin}");
    }
}

/// GC as libcni sends it (CNI 1.1): `cni.dev/valid-attachments` at the top level of the
/// plugin's config, matched on (containerID, ifname). A valid attachment stays captured; a
/// stale one is cleaned, also when its container is valid on another interface (then the pod
/// keeps its capture for the valid one) or another container's attachment has its interface.
#[test]
fn gc_keeps_valid_attachments_and_cleans_stale_ones() {
    require_root();
    let agent = Agent::start("gc");
    let (live, stale) = (Netns::new("sl-gc-live"), Netns::new("sl-gc-stale"));
    let stdin = conf(
        "1.1.0",
        &agent.socket_str(),
        &redirect(),
        Some(&prev_result("1.1.0")),
    );
    for (id, ifname, ns) in [
        ("gc-live", "eth0", &live),
        ("gc-live", "net1", &live),
        ("gc-stale", "eth0", &stale),
    ] {
        assert_eq!(cni_on(ifname, "ADD", id, &ns.path(), &stdin).exit, 0);
    }
    let stdin = format!(
        r#"{{"cniVersion":"1.1.0","name":"example-net","type":"sluice-cni","agentSocket":"{}","cni.dev/valid-attachments":[{{"containerID":"gc-live","ifname":"eth0"}},{{"containerID":"gc-stale","ifname":"net1"}}]}}"#,
        agent.socket_str()
    );
    let run = cni("GC", "", "", &stdin);
    assert_eq!(run.exit, 0, "{run:?}");
    let table = live
        .sluice_table()
        .expect("a valid attachment is never touched");
    assert!(
        table.contains(" if=eth0 ") && !table.contains(" if=net1 "),
        "only eth0 still counted: {table}"
    );
    assert!(
        stale.sluice_table().is_none(),
        "a stale attachment is cleaned"
    );
    let list = String::from_utf8_lossy(&agent.ctl(&["list"]).stdout).into_owned();
    let rows: Vec<&str> = list.lines().skip(1).collect();
    assert_eq!(rows.len(), 1, "{list}");
    assert!(
        rows[0].starts_with("gc-live") && rows[0].contains(" eth0 "),
        "{list}"
    );
}

/// GC is per network: the runtime sends it for one network (one conflist), listing that
/// network's valid attachments only. An attachment made through another network is never
/// touched, however absent from the list; a stale one of this network is cleaned. The network
/// is recorded with the attachment, in the kernel too (the table's owner).
#[test]
fn gc_of_one_network_never_touches_another_networks_attachments() {
    require_root();
    let agent = Agent::start("gc-nets");
    let network = |name: &str, version: &str| {
        conf(
            version,
            &agent.socket_str(),
            &redirect(),
            Some(&prev_result(version)),
        )
        .replacen(r#""name":"example-net""#, &format!(r#""name":"{name}""#), 1)
    };
    let (a_live, a_stale, b_pod) = (
        Netns::new("sl-gcn-alive"),
        Netns::new("sl-gcn-astale"),
        Netns::new("sl-gcn-b"),
    );
    for (id, ns, net) in [
        ("gcn-a-live", &a_live, "net-a"),
        ("gcn-a-stale", &a_stale, "net-a"),
        ("gcn-b", &b_pod, "net-b"),
    ] {
        let run = cni("ADD", id, &ns.path(), &network(net, "1.1.0"));
        assert_eq!(run.exit, 0, "{run:?}");
        let table = ns.sluice_table().expect("captured");
        assert!(table.contains(&format!(" net={net} ")), "recorded: {table}");
    }
    let gc = format!(
        r#"{{"cniVersion":"1.1.0","name":"net-a","type":"sluice-cni","agentSocket":"{}","cni.dev/valid-attachments":[{{"containerID":"gcn-a-live","ifname":"eth0"}}]}}"#,
        agent.socket_str()
    );
    let run = cni("GC", "", "", &gc);
    assert_eq!(run.exit, 0, "{run:?}");
    assert!(a_live.sluice_table().is_some(), "valid: kept");
    assert!(
        a_stale.sluice_table().is_none(),
        "net-a's stale attachment: cleaned"
    );
    assert!(
        b_pod.sluice_table().is_some(),
        "net-b's attachment is not net-a's GC's to touch"
    );
    let list = String::from_utf8_lossy(&agent.ctl(&["list"]).stdout).into_owned();
    assert!(list.contains("gcn-b") && list.contains("net-b"), "{list}");
}

/// STATUS answers whether the plugin can work, not whether the agent is up: a runtime that asks
/// STATUS (containerd 2.x on every CRI `Status`, CRI-O) marks the node's whole network not
/// ready on an error and kubelet admits no pod at all, annotated or not. So with the agent
/// stopped STATUS succeeds (while an opted-in pod's ADD is code 11 and a pod that did not ask
/// starts), unless the conflist opts in to `statusRequiresAgent` (then code 50 until the agent
/// is back and ready). A config the plugin cannot use still fails STATUS.
#[test]
fn status_succeeds_while_the_agent_is_away_unless_the_conflist_opts_in() {
    require_root();
    let topo = Topology::new("status");
    let mut agent = Agent::start("status");
    agent.stop();
    let stdin = conf("1.1.0", &agent.socket_str(), &[], None);
    let status = cni("STATUS", "", "", &stdin);
    assert_eq!(status.exit, 0, "the node stays ready: {status:?}");
    let plain = conf(
        "1.1.0",
        &agent.socket_str(),
        &[],
        Some(&prev_result("1.1.0")),
    );
    assert_eq!(
        cni("ADD", "status-plain", &topo.pod.path(), &plain).exit,
        0,
        "a pod that did not ask starts"
    );
    let captured = conf(
        "1.1.0",
        &agent.socket_str(),
        &redirect(),
        Some(&prev_result("1.1.0")),
    );
    assert_eq!(
        cni("ADD", "status-cap", &topo.pod.path(), &captured).error_code(),
        11,
        "a pod that asked waits for the agent"
    );
    let gated = stdin.replacen('{', r#"{"statusRequiresAgent":true,"#, 1);
    let run = cni("STATUS", "", "", &gated);
    assert_eq!(run.error_code(), 50, "{run:?}");
    assert!(run.stdout.contains(&agent.socket_str()), "{run:?}");
    agent.restart();
    assert_eq!(cni("STATUS", "", "", &gated).exit, 0);
    assert_eq!(cni("STATUS", "", "", &stdin).exit, 0);
    let unusable = stdin.replacen(r#""cniVersion":"1.1.0""#, r#""cniVersion":"9.9.9""#, 1);
    assert_eq!(cni("STATUS", "", "", &unusable).error_code(), 1);
}

/// DEL always exits 0: a config the strict parse refuses (an unknown cniVersion, a field of
/// the wrong type) still removes the capture where the agent can be found, and says on stderr
/// what it could not do. A DEL that failed would leave the pod Terminating and its IP leaked.
#[test]
fn del_succeeds_and_removes_the_capture_whatever_the_config_looks_like() {
    require_root();
    let agent = Agent::start("del-any");
    let ns = Netns::new("sl-del-any");
    let good = conf(
        "1.0.0",
        &agent.socket_str(),
        &redirect(),
        Some(&prev_result("1.0.0")),
    );
    for (what, from, to, removed) in [
        (
            "cniVersion 9.9.9",
            r#""cniVersion":"1.0.0""#,
            r#""cniVersion":"9.9.9""#,
            true,
        ),
        (
            "timeoutMs soon",
            r#""timeoutMs":"#,
            r#""timeoutMs":"soon","x":"#,
            true,
        ),
        (
            "agentSocket 5",
            r#""agentSocket":"#,
            r#""agentSocket":5,"x":"#,
            false,
        ),
        ("not JSON", "{", "][", false),
    ] {
        assert_eq!(cni("ADD", "del-any", &ns.path(), &good).exit, 0, "{what}");
        let bad = good.replacen(from, to, 1);
        assert_ne!(bad, good, "{what}: the config was changed");
        let run = cni("DEL", "del-any", &ns.path(), &bad);
        assert_eq!((run.exit, run.stdout.as_str()), (0, ""), "{what}: {run:?}");
        if removed {
            assert!(
                ns.sluice_table().is_none(),
                "{what}: the capture is removed"
            );
        } else {
            // The agent cannot be found where this config points: the rules go with the
            // namespace, and the runtime is told nothing is wrong.
            assert!(!run.stderr.is_empty(), "{what}: says what it could not do");
            assert_eq!(cni("DEL", "del-any", &ns.path(), &good).exit, 0);
        }
    }
}

/// Hostile sizes: an annotation value that once overflowed HTTP/2's header limits when the
/// agent echoed it whole (2,000 x `1-65535`, then one past the length bound) is code 7 naming
/// the annotation, with a bounded message; stdin past 1 MiB is refused unread (code 6).
#[test]
fn oversized_input_is_a_bounded_error_naming_what_is_too_large() {
    require_root();
    let ns = Netns::new("sl-cni-huge");
    let agent = Agent::start("huge");
    for n in [2000, 3000] {
        let value = vec!["1-65535"; n].join(",");
        let stdin = conf(
            "1.0.0",
            &agent.socket_str(),
            &[
                ("linkerd.io/proxy-version", "stable-2.14.10"),
                ("config.linkerd.io/skip-outbound-ports", &value),
            ],
            Some(&prev_result("1.0.0")),
        );
        let run = cni("ADD", "huge", &ns.path(), &stdin);
        assert_eq!(
            run.error_code(),
            7,
            "{n}: {}",
            &run.stdout[..run.stdout.len().min(600)]
        );
        assert!(
            run.stdout.len() < 1024,
            "{n}: bounded: {}",
            run.stdout.len()
        );
        assert!(
            run.stdout.contains("config.linkerd.io/skip-outbound-ports"),
            "{}",
            run.stdout
        );
        assert!(ns.sluice_table().is_none());
    }
    let padding = "x".repeat(1024 * 1024);
    let stdin = conf(
        "1.0.0",
        &agent.socket_str(),
        &[
            ("sluice.dev/redirect", "enabled"),
            ("example.com/pad", &padding),
        ],
        Some(&prev_result("1.0.0")),
    );
    let run = cni("ADD", "huge", &ns.path(), &stdin);
    assert_eq!(
        run.error_code(),
        6,
        "{}",
        &run.stdout[..run.stdout.len().min(600)]
    );
    assert!(
        run.stdout.contains("larger than 1048576 bytes"),
        "{}",
        run.stdout
    );
    assert!(run.stdout.len() < 1024, "bounded: {}", run.stdout.len());
    assert!(ns.sluice_table().is_none());
}

/// istio-cni's gate through the real plugin and agent: a pod whose injector added `istio-init`
/// (Istio installed without its CNI) captures itself, so sluice leaves it alone — ADD hands
/// `prevResult` on, no table, CHECK clean — instead of capturing it a second time; a pod
/// whose proxy is a native sidecar (`istio-proxy` under `initContainers`) is captured, and so
/// is the reconciler's view of both (`sluicectl explain` names the gate).
#[test]
fn istio_pods_are_captured_only_where_istio_cni_would_capture_them() {
    require_root();
    let agent = Agent::start("istio-gate");
    let with_init = Netns::new("sl-istio-gate-init");
    let native = Netns::new("sl-istio-gate-native");
    let init_status = (
        "sidecar.istio.io/status",
        r#"{"initContainers":["istio-init"],"containers":["istio-proxy"],"revision":"default"}"#,
    );
    let native_status = (
        "sidecar.istio.io/status",
        r#"{"initContainers":["istio-validation","istio-proxy"],"containers":null,"revision":"default"}"#,
    );
    let prev = prev_result("1.0.0");
    let stdin = conf("1.0.0", &agent.socket_str(), &[init_status], Some(&prev));
    let run = cni("ADD", "gate-init", &with_init.path(), &stdin);
    assert_eq!(run.exit, 0, "{run:?}");
    assert_eq!(run.stdout, prev, "prevResult handed on");
    assert_eq!(
        with_init.sluice_table(),
        None,
        "istio-init's pod is not captured twice"
    );
    assert_eq!(cni("CHECK", "gate-init", &with_init.path(), &stdin).exit, 0);
    let explain = agent.ctl(&[
        "explain",
        "--annotation",
        &format!("{}={}", init_status.0, init_status.1),
    ]);
    let text = String::from_utf8_lossy(&explain.stdout);
    assert!(
        text.contains("istio-init") && text.contains("mesh gate"),
        "explain names the gate: {text}{}",
        String::from_utf8_lossy(&explain.stderr)
    );
    assert_eq!(cni("DEL", "gate-init", &with_init.path(), &stdin).exit, 0);

    let stdin = conf("1.0.0", &agent.socket_str(), &[native_status], Some(&prev));
    let run = cni("ADD", "gate-native", &native.path(), &stdin);
    assert_eq!(run.exit, 0, "{run:?}");
    let table = native
        .sluice_table()
        .expect("a native-sidecar pod is captured");
    assert!(table.contains("redirect to :15001"), "{table}");
    assert_eq!(cni("CHECK", "gate-native", &native.path(), &stdin).exit, 0);
    assert_eq!(cni("DEL", "gate-native", &native.path(), &stdin).exit, 0);
}

/// kuma-cni's gate through the real plugin and agent: a pod in CNI mode is captured; one whose
/// configuration says `cniMode: false` (kuma-init captures it) is left alone; a configuration
/// asking for rules sluice does not write fails the ADD with code 7 naming the field, nothing
/// applied; a pod of Kuma ≤ 2.8 (no configuration annotation) never reaches the agent.
#[test]
fn kuma_pods_are_captured_only_where_kuma_cni_would_capture_them() {
    require_root();
    let agent = Agent::start("kuma-gate");
    let prev = prev_result("1.0.0");
    let injected = ("kuma.io/sidecar-injected", "true");
    let config = "traffic.kuma.io/transparent-proxy-config";
    let cases: [(&str, &str, Option<u64>, bool); 3] = [
        (
            "kuma-cni",
            "kumaDPUser: \"5678\"\ncniMode: true\n",
            None,
            true,
        ),
        (
            "kuma-init",
            "kumaDPUser: \"5678\"\ncniMode: false\n",
            None,
            false,
        ),
        (
            "kuma-uids",
            "cniMode: true\nredirect:\n  outbound:\n    excludePortsForUIDs: [\"tcp:80:*\"]\n",
            Some(7),
            false,
        ),
    ];
    for (name, yaml, code, captured) in cases {
        let ns = Netns::new(&format!("sl-{name}"));
        let stdin = conf(
            "1.0.0",
            &agent.socket_str(),
            &[injected, (config, yaml)],
            Some(&prev),
        );
        let run = cni("ADD", name, &ns.path(), &stdin);
        match code {
            None => assert_eq!(run.exit, 0, "{name}: {run:?}"),
            Some(code) => {
                assert_eq!(run.error_code(), code, "{name}: {run:?}");
                let msg = run.json()["msg"].as_str().unwrap_or_default().to_owned();
                assert!(msg.contains("excludePortsForUIDs"), "{name}: {msg}");
            }
        }
        assert_eq!(ns.sluice_table().is_some(), captured, "{name}");
        if captured {
            let table = ns.sluice_table().unwrap_or_default();
            assert!(table.contains("meta skuid 5678 return"), "{table}");
            assert_eq!(cni("CHECK", name, &ns.path(), &stdin).exit, 0);
        }
        assert_eq!(cni("DEL", name, &ns.path(), &stdin).exit, 0, "{name}");
    }
    let metrics = scrape(&agent.metrics_url());
    assert_eq!(
        value(&metrics, "sluice_programmed_total{profile=\"kuma\"}"),
        1.0,
        "one Kuma pod programmed"
    );
    // Kuma ≤ 2.8: per-field annotations only, not forwarded (no agent needed).
    let old = Netns::new("sl-kuma-old");
    let stdin = conf(
        "1.0.0",
        "/nonexistent/agent.sock",
        &[
            injected,
            ("kuma.io/transparent-proxying-inbound-port", "15006"),
        ],
        Some(&prev),
    );
    let run = cni("ADD", "kuma-old", &old.path(), &stdin);
    assert_eq!(run.exit, 0, "{run:?}");
    assert_eq!(old.sluice_table(), None);
}

/// consul-cni's gate through the real plugin and agent: a transparent-proxy pod is captured
/// (its DNS redirect, a DNAT, reads back equal: CHECK is clean); without the
/// transparent-proxy status it is left alone; a configuration that does not parse fails the
/// ADD with code 7 naming the annotation; a pod without the configuration (consul-k8s
/// without its CNI: its init container captures it) never reaches the agent.
#[test]
fn consul_pods_are_captured_only_where_consul_cni_would_capture_them() {
    require_root();
    let agent = Agent::start("consul-gate");
    let prev = prev_result("1.0.0");
    let config = (
        "consul.hashicorp.com/redirect-traffic-config",
        r#"{"ConsulDNSIP":"","ConsulDNSPort":8600,"ProxyUserID":"5995","ProxyInboundPort":20000,"ProxyOutboundPort":15001,"ExcludeInboundPorts":["20200"],"ExcludeOutboundPorts":null,"ExcludeOutboundCIDRs":null,"ExcludeUIDs":["5996"],"NetNS":"","IptablesProvider":null}"#,
    );
    let inject = ("consul.hashicorp.com/connect-inject-status", "injected");
    let tproxy = ("consul.hashicorp.com/transparent-proxy-status", "enabled");
    let bad = (
        "consul.hashicorp.com/redirect-traffic-config",
        "{\"ProxyUserID\":",
    );
    type Case<'a> = (&'a str, Vec<(&'a str, &'a str)>, Option<u64>, bool);
    let cases: [Case; 3] = [
        ("consul-tproxy", vec![inject, tproxy, config], None, true),
        ("consul-no-tproxy", vec![inject, config], None, false),
        ("consul-bad", vec![inject, tproxy, bad], Some(7), false),
    ];
    for (name, annotations, code, captured) in cases {
        let ns = Netns::new(&format!("sl-{name}"));
        let stdin = conf("1.0.0", &agent.socket_str(), &annotations, Some(&prev));
        let run = cni("ADD", name, &ns.path(), &stdin);
        match code {
            None => assert_eq!(run.exit, 0, "{name}: {run:?}"),
            Some(code) => {
                assert_eq!(run.error_code(), code, "{name}: {run:?}");
                assert!(run.stdout.contains("redirect-traffic-config"), "{run:?}");
            }
        }
        assert_eq!(ns.sluice_table().is_some(), captured, "{name}");
        if captured {
            let table = ns.sluice_table().unwrap_or_default();
            assert!(
                table.contains("dnat ip to 127.0.0.1:8600")
                    && table.contains("meta skuid 5996 return"),
                "{table}"
            );
            let check = cni("CHECK", name, &ns.path(), &stdin);
            assert_eq!(
                check.exit, 0,
                "{name}: the table reads back as planned: {check:?}"
            );
        }
        assert_eq!(cni("DEL", name, &ns.path(), &stdin).exit, 0, "{name}");
    }
    let metrics = scrape(&agent.metrics_url());
    assert_eq!(
        value(&metrics, "sluice_programmed_total{profile=\"consul\"}"),
        1.0
    );
    assert_eq!(
        value(
            &metrics,
            "sluice_attaches_total{result=\"skipped\",reason=\"mesh_gate\",code=\"\"}"
        ),
        1.0,
        "the pod without transparent proxy, left to its mesh"
    );
    let init = Netns::new("sl-consul-init");
    let stdin = conf(
        "1.0.0",
        "/nonexistent/agent.sock",
        &[inject, tproxy],
        Some(&prev),
    );
    let run = cni("ADD", "consul-init", &init.path(), &stdin);
    assert_eq!(run.exit, 0, "{run:?}");
    assert_eq!(init.sluice_table(), None);
}
