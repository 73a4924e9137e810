//! Recovery through the container runtime (real containerd over CRI, real kernel): pods that
//! started before sluice was chained are found and captured; an agent restart loses nothing;
//! hand-made damage is repaired within one interval (or only reported, in report mode); pods
//! that did not ask are never touched.

use std::time::{Duration, Instant};

use sluice_proto::v1::ListRequest;
use sluice_proto::v1::agent_client::AgentClient;
use sluice_tests::cri::{Chain, Containerd, ONE_AT_A_TIME};
use sluice_tests::*;

const ENABLED: (&str, &str) = ("sluice.dev/redirect", "enabled");
/// Seconds between reconcile passes in these tests.
const INTERVAL: &str = "1";

fn list(agent: &Agent) -> Vec<sluice_proto::v1::Attachment> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(async {
            let channel =
                tonic::transport::Endpoint::try_from(format!("unix://{}", agent.socket_str()))
                    .expect("endpoint")
                    .connect()
                    .await
                    .expect("connect");
            let mut list = AgentClient::new(channel)
                .list(ListRequest {})
                .await
                .expect("List")
                .into_inner()
                .attachments;
            list.sort_by(|a, b| (&a.container_id, &a.ifname).cmp(&(&b.container_id, &b.ifname)));
            list
        })
}

fn discovering(test: &str, containerd: &Containerd, extra: &[&str]) -> Agent {
    let socket = containerd.socket.display().to_string();
    let mut args = vec!["--cri-socket", &socket, "--reconcile-interval", INTERVAL];
    args.extend_from_slice(extra);
    Agent::start_with(test, &args)
}

/// Waits (bounded) until the agent has finished a reconcile pass that started after now.
fn after_a_pass(agent: &Agent) {
    let url = agent.metrics_url();
    let passes = || {
        scrape(&url)
            .lines()
            .find_map(|l| {
                l.strip_prefix("sluice_reconcile_passes_total{result=\"ok\",reason=\"\"} ")
                    .and_then(|v| v.trim().parse::<f64>().ok())
            })
            .unwrap_or(0.0)
    };
    let start = passes();
    wait_for("a reconcile pass", scaled(Duration::from_secs(30)), || {
        passes() >= start + 2.0
    });
}

/// Both repair counters (present from the start, at 0) are still 0.
fn assert_no_repairs(metrics: &str, why: &str) {
    for reason in ["missing", "drift"] {
        let series = format!("sluice_repairs_total{{reason=\"{reason}\"}}");
        assert_eq!(value(metrics, &series), 0.0, "{why}: {series}");
    }
}

fn state_of(agent: &Agent, id: &str) -> Vec<String> {
    list(agent)
        .into_iter()
        .filter(|a| a.container_id == id)
        .map(|a| a.state)
        .collect()
}

#[test]
fn pods_started_before_sluice_was_chained_are_captured_and_others_left_alone() {
    require_root();
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    // Only bridge in the conflist: nothing captures these pods at start.
    let containerd = Containerd::start("recovery-late", &Chain::new(None, 11));
    let web = containerd.run_pod("web", &[ENABLED]).expect("web");
    let tp = containerd
        .run_pod("tp", &[ENABLED, ("sluice.dev/mode", "tproxy")])
        .expect("tp");
    let plain = containerd
        .run_pod("plain", &[("team", "payments")])
        .expect("plain");
    let off = containerd
        .run_pod("off", &[("sluice.dev/redirect", "disabled")])
        .expect("off");
    // Istio without its CNI: istio-init captures this pod; the reconciler must not.
    let istio_init = containerd
        .run_pod(
            "istio-init",
            &[(
                "sidecar.istio.io/status",
                r#"{"initContainers":["istio-init"],"containers":["istio-proxy"]}"#,
            )],
        )
        .expect("istio-init");
    let ns = |id: &str| Netns::existing(&containerd.netns_of(id));
    for id in [&web, &tp, &plain, &off, &istio_init] {
        assert!(ns(id).sluice_table().is_none());
    }
    let started = Instant::now();
    let agent = discovering("recovery-late", &containerd, &[]);
    wait_for(
        "the annotated pods captured",
        scaled(Duration::from_secs(30)),
        || ns(&web).sluice_table().is_some() && ns(&tp).sluice_table().is_some(),
    );
    let took = started.elapsed();
    after_a_pass(&agent);
    assert!(
        ns(&plain).sluice_table().is_none(),
        "an un-annotated pod is never captured"
    );
    assert!(
        ns(&off).sluice_table().is_none(),
        "nor one that says disabled"
    );
    assert!(
        ns(&istio_init).sluice_table().is_none(),
        "nor one its mesh's own init container captures (the mesh's gate)"
    );
    // Check works for any pod the runtime knows, captured or not.
    for id in [&web, &tp, &plain, &off, &istio_init] {
        let check = agent.ctl(&["check", id]);
        assert!(check.status.success(), "{check:?}");
    }
    assert!(!agent.ctl(&["check", "not-a-sandbox"]).status.success());
    // The capture works: the app container's connection lands on the proxy.
    let web_ns = ns(&web);
    let _proxy = Listener::start(&web_ns, "0.0.0.0:15001", "proxy");
    assert_eq!(
        containerd.app_connects(&web, "web", "192.0.2.10", "80"),
        Ok("proxy orig=192.0.2.10:80".to_owned())
    );
    let metrics = scrape(&agent.metrics_url());
    assert_eq!(
        value(&metrics, "sluice_repairs_total{reason=\"missing\"}"),
        2.0
    );
    assert_eq!(value(&metrics, "sluice_uncaptured_pods"), 0.0);
    assert_eq!(value(&metrics, "sluice_attached_pods"), 2.0);
    let listed: Vec<String> = list(&agent).into_iter().map(|a| a.container_id).collect();
    assert!(
        listed.contains(&web)
            && listed.contains(&tp)
            && !listed.contains(&plain)
            && !listed.contains(&off)
            && !listed.contains(&istio_init),
        "{listed:?}"
    );
    let status = String::from_utf8_lossy(&agent.ctl(&["status"]).stdout).into_owned();
    assert!(status.contains("discovery: cri "), "{status}");
    // A sandbox that goes away (here without a DEL reaching the agent: sluice is not chained)
    // is forgotten once passes stop listing it (after the second that does not).
    containerd.stop_and_remove(&tp).expect("remove tp");
    wait_for("tp forgotten", scaled(Duration::from_secs(30)), || {
        !list(&agent).iter().any(|a| a.container_id == tp)
    });
    assert!(list(&agent).iter().any(|a| a.container_id == web));
    eprintln!(
        "recovery: pods started before sluice was chained captured {took:?} after the agent started"
    );
}

#[test]
fn restart_loses_nothing_and_damage_is_repaired_or_reported() {
    require_root();
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    // The chain includes sluice: pods are captured by the plugin's ADD, as usual.
    let agent = Agent::start_with("recovery-restart", &["--cri-socket", "off"]);
    let containerd = Containerd::start(
        "recovery-restart",
        &Chain::new(Some(agent.socket_str()), 12),
    );
    let web = containerd.run_pod("web", &[ENABLED]).expect("web");
    let tp = containerd
        .run_pod("tp", &[ENABLED, ("sluice.dev/mode", "tproxy")])
        .expect("tp");
    let ns = |id: &str| Netns::existing(&containerd.netns_of(id));
    let before = list(&agent);
    assert_eq!(before.len(), 2, "{before:?}");
    let status = String::from_utf8_lossy(&agent.ctl(&["status"]).stdout).into_owned();
    assert!(
        status.contains("discovery: off"),
        "without a CRI socket, status says so: {status}"
    );
    drop(agent);

    // 1. Restart (now with discovery): the records are rebuilt, identical.
    let agent = discovering("recovery-restart-2", &containerd, &[]);
    after_a_pass(&agent);
    assert_eq!(list(&agent), before, "List after a restart");
    let metrics = scrape(&agent.metrics_url());
    assert_eq!(value(&metrics, "sluice_attached_pods"), 2.0);
    assert_no_repairs(&metrics, "nothing was repaired");
    for id in [&web, &tp] {
        assert!(agent.ctl(&["check", id]).status.success());
    }

    // 2. Damage: web's table deleted, tp's policy rule deleted. Repaired within one interval.
    let damaged = Instant::now();
    assert!(
        ns(&web)
            .exec(&["nft", "delete", "table", "inet", "sluice"])
            .status
            .success()
    );
    assert!(
        ns(&tp)
            .exec(&["ip", "rule", "del", "fwmark", "1337", "lookup", "133"])
            .status
            .success()
    );
    wait_for(
        "the damage repaired",
        scaled(Duration::from_secs(30)),
        || {
            agent.ctl(&["check", &web]).status.success()
                && agent.ctl(&["check", &tp]).status.success()
        },
    );
    let took = damaged.elapsed();
    let metrics = scrape(&agent.metrics_url());
    assert_eq!(
        value(&metrics, "sluice_repairs_total{reason=\"missing\"}"),
        1.0
    );
    assert_eq!(
        value(&metrics, "sluice_repairs_total{reason=\"drift\"}"),
        1.0
    );
    assert_eq!(state_of(&agent, &web), ["repaired"]);
    drop(agent);

    // 3. Report mode: the same damage stays, and says so.
    let agent = discovering("recovery-report", &containerd, &["--repair", "report"]);
    after_a_pass(&agent);
    assert!(
        ns(&web)
            .exec(&["nft", "delete", "table", "inet", "sluice"])
            .status
            .success()
    );
    assert!(
        ns(&tp)
            .exec(&["ip", "rule", "del", "fwmark", "1337", "lookup", "133"])
            .status
            .success()
    );
    after_a_pass(&agent);
    assert!(
        ns(&web).sluice_table().is_none(),
        "report mode changes nothing"
    );
    assert!(!ns(&tp).ip(&["rule", "show"]).contains("fwmark 0x539"));
    let metrics = scrape(&agent.metrics_url());
    assert_eq!(value(&metrics, "sluice_uncaptured_pods"), 2.0);
    assert_no_repairs(&metrics, "report mode repairs nothing");
    assert_eq!(state_of(&agent, &web), ["uncaptured"]);
    assert_eq!(state_of(&agent, &tp), ["drifted"]);
    let listed = String::from_utf8_lossy(&agent.ctl(&["list"]).stdout).into_owned();
    assert!(
        listed.contains("uncaptured") && listed.contains("drifted"),
        "{listed}"
    );
    eprintln!("recovery: damage to repair took {took:?} with a 1 s interval");
}

/// A runtime restart while the agent is away (a node upgrade during a DaemonSet rollout): the
/// runtime loads its pods back without asking the network plugins (containerd sends no CHECK;
/// CRI-O's CHECK succeeds while the agent cannot answer, see tests/tests/crio.rs), the pods
/// keep their capture, and the agent, back, finds nothing to repair.
#[test]
fn a_runtime_restart_while_the_agent_is_away_leaves_every_pod_as_it_was() {
    require_root();
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let agent = Agent::start_with("recovery-runtime-restart", &["--cri-socket", "off"]);
    let mut containerd = Containerd::start(
        "recovery-runtime-restart",
        &Chain::new(Some(agent.socket_str()), 13),
    );
    let web = containerd.run_pod("web", &[ENABLED]).expect("web");
    let plain = containerd.run_pod("plain", &[]).expect("plain");
    let web_ns = Netns::existing(&containerd.netns_of(&web));
    let table = web_ns.sluice_table().expect("web is captured");
    drop(agent);

    containerd.restart();
    let sandboxes = containerd.sandboxes();
    assert_eq!(sandboxes.get("web"), Some(&web), "{sandboxes:?}");
    assert_eq!(sandboxes.get("plain"), Some(&plain), "{sandboxes:?}");
    assert_eq!(
        Netns::existing(&containerd.netns_of(&web))
            .sluice_table()
            .as_deref(),
        Some(table.as_str()),
        "the capture survives the runtime's restart"
    );
    assert_eq!(
        Netns::existing(&containerd.netns_of(&plain)).sluice_table(),
        None
    );

    let agent = discovering("recovery-runtime-restart-2", &containerd, &[]);
    after_a_pass(&agent);
    assert_no_repairs(&scrape(&agent.metrics_url()), "nothing to repair");
    assert_eq!(state_of(&agent, &web).len(), 1, "{:?}", list(&agent));
    assert!(agent.ctl(&["check", &web]).status.success());
    containerd.stop_and_remove(&web).expect("web goes");
    containerd.stop_and_remove(&plain).expect("plain goes");
}
