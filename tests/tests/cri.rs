//! The real runtime end to end: an isolated containerd with its CRI plugin calls `sluice-cni`
//! (chained after bridge + host-local) and the pod's sandbox gets its capture, driven over CRI
//! v1 from Rust like kubelet does. Each test has its own containerd, agent and bridge; they run
//! one at a time (see `cri::ONE_AT_A_TIME`).

use sluice_tests::cri::{Chain, Containerd, ONE_AT_A_TIME};
use sluice_tests::*;

const ENABLED: (&str, &str) = ("sluice.dev/redirect", "enabled");

struct Env {
    // Field order is drop order: containerd (removing sandboxes, so DEL reaches the agent)
    // before the agent.
    containerd: Containerd,
    agent: Agent,
    _serial: std::sync::MutexGuard<'static, ()>,
}

fn env(test: &str, index: u8) -> Env {
    require_root();
    let serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let agent = Agent::start(&format!("cri-{test}"));
    let containerd = Containerd::start(test, &Chain::new(Some(agent.socket_str()), index));
    Env {
        containerd,
        agent,
        _serial: serial,
    }
}

fn agent_log(agent: &Agent) -> String {
    std::fs::read_to_string(&agent.log).unwrap_or_default()
}

#[test]
fn an_annotated_pod_is_captured_and_its_container_reaches_the_proxy() {
    let e = env("capture", 1);
    let id = e
        .containerd
        .run_pod("web", &[ENABLED])
        .unwrap_or_else(|m| panic!("RunPodSandbox: {m}"));
    let netns = e.containerd.netns_of(&id);
    let ns = Netns::existing(&netns);
    let table = ns.sluice_table().expect("the sandbox netns has our table");
    assert!(table.contains("redirect to :15001"), "{table}");
    // The proxy's listener, in the pod's netns (a sidecar would bind it).
    let _proxy = Listener::start(&ns, "0.0.0.0:15001", "proxy");
    let app = e.containerd.start_container(&id, "web", "app", 1000);
    let (code, out, err) = e
        .containerd
        .exec(&app, &["/bin/busybox", "nc", "-w", "3", "192.0.2.10", "80"]);
    assert_eq!(
        (code, out.trim()),
        (0, "proxy orig=192.0.2.10:80"),
        "the app container's connection lands on the proxy with its original destination; stderr {err}"
    );
    let list = e.agent.ctl(&["list"]);
    assert!(
        String::from_utf8_lossy(&list.stdout).contains(&id[..12]),
        "{list:?}"
    );
}

fn cni_netns_count() -> usize {
    std::fs::read_dir("/var/run/netns")
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().starts_with("cni-"))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn a_pod_without_the_annotation_is_not_touched_and_the_agent_is_not_called() {
    let mut e = env("plain", 2);
    // With the agent stopped, any call would fail the ADD (code 11): success proves the
    // plugin's fast path did not call it.
    e.agent.stop();
    let id = e
        .containerd
        .run_pod("plain", &[("team", "payments")])
        .unwrap_or_else(|m| panic!("RunPodSandbox: {m}"));
    let ns = Netns::existing(&e.containerd.netns_of(&id));
    assert_eq!(ns.sluice_table(), None);
    e.containerd
        .stop_and_remove(&id)
        .expect("Stop/Remove of an uncaptured pod");
    // With the agent running, the same holds: it counts every call it gets (a skip too), and
    // counts none for these pods.
    e.agent.restart();
    // No annotations at all, as kubelet sends most pods: containerd then hands the plugin
    // `"io.kubernetes.cri.pod-annotations": null`.
    let bare = e
        .containerd
        .run_pod("bare", &[])
        .unwrap_or_else(|m| panic!("RunPodSandbox of a pod without annotations: {m}"));
    assert_eq!(
        Netns::existing(&e.containerd.netns_of(&bare)).sluice_table(),
        None
    );
    e.containerd
        .stop_and_remove(&bare)
        .expect("Stop/Remove of a pod without annotations");
    let metrics = scrape(&e.agent.metrics_url());
    let calls: f64 = [
        "sluice_attaches_total",
        "sluice_detaches_total",
        "sluice_checks_total",
    ]
    .iter()
    .flat_map(|m| {
        metrics
            .lines()
            .filter(move |l| l.starts_with(&format!("{m}{{")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    })
    .sum();
    assert_eq!(calls, 0.0, "the agent was never called: {metrics}");
}

#[test]
fn an_istio_pod_gets_istio_defaults() {
    let e = env("istio", 3);
    let id = e
        .containerd
        .run_pod(
            "reviews",
            &[(
                "sidecar.istio.io/status",
                r#"{"containers":["istio-proxy"]}"#,
            )],
        )
        .unwrap_or_else(|m| panic!("RunPodSandbox: {m}"));
    let ns = Netns::existing(&e.containerd.netns_of(&id));
    let table = ns.sluice_table().expect("table");
    for want in [
        "tcp dport 15020 return",
        "oifname \"lo\" ip saddr 127.0.0.6 return",
        "meta skgid 1337 return",
        "meta l4proto tcp redirect to :15001",
        "meta l4proto tcp redirect to :15006",
    ] {
        assert!(table.contains(want), "missing {want:?}:\n{table}");
    }
    let list = String::from_utf8_lossy(&e.agent.ctl(&["list"]).stdout).into_owned();
    assert!(
        list.lines()
            .any(|l| l.contains(&id[..12]) && l.contains("istio")),
        "{list}"
    );
    let _proxy = Listener::start(&ns, "0.0.0.0:15001", "envoy");
    let app = e.containerd.start_container(&id, "reviews", "app", 1000);
    let (code, out, _) = e.containerd.exec(
        &app,
        &["/bin/busybox", "nc", "-w", "3", "192.0.2.20", "9080"],
    );
    assert_eq!((code, out.trim()), (0, "envoy orig=192.0.2.20:9080"));
}

#[test]
fn a_bad_annotation_fails_the_sandbox_with_our_message_and_leaves_nothing() {
    let e = env("bad", 4);
    let before = cni_netns_count();
    let err = e
        .containerd
        .run_pod("bad", &[ENABLED, ("sluice.dev/outbound-port", "http")])
        .expect_err("RunPodSandbox must fail");
    assert!(
        err.contains(r#"plugin type="sluice-cni""#) && err.contains("sluice.dev/outbound-port"),
        "containerd's error carries our CNI message: {err}"
    );
    assert!(
        !e.containerd.sandboxes().contains_key("bad"),
        "no sandbox is left behind"
    );
    assert_eq!(cni_netns_count(), before, "no netns is left behind");
}

#[test]
fn with_the_agent_stopped_the_sandbox_fails_with_code_11_and_a_retry_after_restart_works() {
    let mut e = env("restart", 5);
    e.agent.stop();
    let err = e
        .containerd
        .run_pod("retry", &[ENABLED])
        .expect_err("no agent, no capture, no pod");
    assert!(
        err.contains(&format!(
            "sluice agent at {} is unreachable",
            e.agent.socket_str()
        )),
        "{err}"
    );
    assert!(!e.containerd.sandboxes().contains_key("retry"));
    e.agent.restart();
    let id = e
        .containerd
        .run_pod("retry", &[ENABLED])
        .unwrap_or_else(|m| panic!("retried RunPodSandbox: {m}"));
    let ns = Netns::existing(&e.containerd.netns_of(&id));
    assert!(ns.sluice_table().is_some());
}

#[test]
fn stop_then_remove_both_succeed_and_nothing_of_ours_remains() {
    let e = env("teardown", 6);
    let id = e
        .containerd
        .run_pod("gone", &[ENABLED, ("sluice.dev/mode", "tproxy")])
        .unwrap_or_else(|m| panic!("RunPodSandbox: {m}"));
    let netns = e.containerd.netns_of(&id);
    e.containerd
        .stop_and_remove(&id)
        .expect("StopPodSandbox (DEL with netns) and RemovePodSandbox (DEL without)");
    assert!(!std::path::Path::new(&netns).exists(), "netns removed");
    let list = String::from_utf8_lossy(&e.agent.ctl(&["list"]).stdout).into_owned();
    assert_eq!(list.lines().count(), 1, "agent List is empty: {list}");
    let log = agent_log(&e.agent);
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("detached") && l.contains(&id))
            .count(),
        2,
        "DEL came twice: {log}"
    );
}

#[test]
fn twenty_pods_started_concurrently_all_get_correct_rules() {
    let e = env("many", 7);
    let socket = e.containerd.socket.clone();
    let logs = e.containerd.dir.join("logs");
    let threads: Vec<_> = (0..20)
        .map(|i| {
            let socket = socket.clone();
            let logs = logs.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async {
                    let mut client = Containerd::connect(&socket).await;
                    let name = format!("pod{i}");
                    let req = sluice_tests::cri::pod_request(&name, &[ENABLED], &logs);
                    client
                        .run_pod_sandbox(req)
                        .await
                        .map(|r| r.into_inner().pod_sandbox_id)
                        .map_err(|s| format!("{name}: {}", s.message()))
                })
            })
        })
        .collect();
    let ids: Vec<String> = threads
        .into_iter()
        .map(|t| t.join().expect("thread").unwrap_or_else(|m| panic!("{m}")))
        .collect();
    assert_eq!(ids.len(), 20);
    let golden_fp = {
        let out = e.agent.ctl(&["list"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for id in &ids {
        let ns = Netns::existing(&e.containerd.netns_of(id));
        let table = ns
            .sluice_table()
            .unwrap_or_else(|| panic!("{id}: no table"));
        assert!(table.contains("redirect to :15001"), "{id}: {table}");
        assert!(
            golden_fp.contains(&id[..12]),
            "{id} not listed: {golden_fp}"
        );
        let check = e.agent.ctl(&["check", id]);
        assert!(check.status.success(), "{id}: {check:?}");
    }
}

/// The install on this runtime's layout: for every `cniVersion` its libcni accepts results of
/// (1.6/1.7: 0.4.0 and 1.0.0; 2.x also 1.1.0), `sluice-agent install` chains into the primary
/// conflist keeping its version, and the runtime then runs a captured pod and a plain one
/// through it, and removes them.
#[test]
fn install_keeps_each_cni_version_the_runtime_accepts_and_pods_run_through_it() {
    require_root();
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let runtime = sluice_tests::cri::Runtime::current();
    let agent = Agent::start("cri-install-versions");
    for (i, version) in runtime.cni_versions().iter().enumerate() {
        let chain = Chain {
            cni_version: version,
            link_plugin: false,
            ..Chain::new(None, 40 + i as u8)
        };
        let containerd = Containerd::start(&format!("install-{i}"), &chain);
        let conf_dir = containerd.dir.join("cni/conf");
        let out = std::process::Command::new(bin("sluice-agent"))
            .arg("install")
            .arg("--cni-bin-dir")
            .arg(containerd.dir.join("cni/bin"))
            .arg("--cni-conf-dir")
            .arg(&conf_dir)
            .arg("--socket")
            .arg(&agent.socket)
            .arg("--plugin")
            .arg(bin("sluice-cni"))
            .output()
            .expect("sluice-agent install");
        assert!(out.status.success(), "install: {out:?}");
        let conflist: serde_json::Value = serde_json::from_slice(
            &std::fs::read(conf_dir.join("10-sluice-test.conflist")).expect("conflist"),
        )
        .expect("JSON");
        assert_eq!(conflist["cniVersion"], *version, "{conflist}");
        assert_eq!(conflist["plugins"][1]["type"], "sluice-cni", "{conflist}");

        let web = containerd
            .run_pod("web", &[ENABLED])
            .unwrap_or_else(|e| panic!("containerd {} cni {version}: {e}", runtime.version));
        let ns = Netns::existing(&containerd.netns_of(&web));
        assert!(
            ns.sluice_table()
                .is_some_and(|t| t.contains("redirect to :15001")),
            "cni {version}: captured"
        );
        let plain = containerd
            .run_pod("plain", &[])
            .unwrap_or_else(|e| panic!("cni {version}, a plain pod: {e}"));
        assert_eq!(
            Netns::existing(&containerd.netns_of(&plain)).sluice_table(),
            None
        );
        containerd.stop_and_remove(&web).expect("web goes");
        containerd.stop_and_remove(&plain).expect("plain goes");
        let listed = String::from_utf8_lossy(&agent.ctl(&["list"]).stdout).into_owned();
        assert!(
            !listed.contains(&web),
            "cni {version}: DEL detached: {listed}"
        );
    }
}
