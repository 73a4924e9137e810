//! The agent's API over its real unix socket: health, RPC errors naming fields, List/Detach
//! bookkeeping, config file vs flags, JSON logs.

use sluice_proto::v1::agent_client::AgentClient;
use sluice_proto::v1::{AttachRequest, DetachRequest, ExplainRequest, ListRequest, StatusRequest};
use sluice_tests::*;
use tonic::transport::{Channel, Endpoint};

async fn channel(agent: &Agent) -> Channel {
    Endpoint::try_from(format!("unix://{}", agent.socket_str()))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect to agent")
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn health_status_and_rpc_errors_name_the_field() {
    require_root();
    let agent = Agent::start("rpc");
    let ns = Netns::new("sl-rpc");
    rt().block_on(async {
        let ch = channel(&agent).await;
        let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
        let reply = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "sluice.v1.Agent".into(),
            })
            .await
            .expect("health check")
            .into_inner();
        assert_eq!(
            reply.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );

        let mut client = AgentClient::new(ch);
        let status = client
            .status(StatusRequest {})
            .await
            .expect("status")
            .into_inner();
        assert!(status.ready, "{status:?}");

        let bad = client
            .attach(AttachRequest {
                container_id: "rpc".into(),
                netns: ns.path(),
                annotations: [
                    ("sluice.dev/redirect".to_owned(), "enabled".to_owned()),
                    ("sluice.dev/inbound-port".to_owned(), "x".to_owned()),
                ]
                .into(),
                ..Default::default()
            })
            .await
            .expect_err("invalid annotation");
        assert_eq!(bad.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            bad.metadata()
                .get("sluice-field")
                .and_then(|v| v.to_str().ok()),
            Some("annotation:sluice.dev/inbound-port")
        );
        assert!(
            bad.message().contains("sluice.dev/inbound-port") && bad.message().contains("\"x\""),
            "{bad:?}"
        );

        let missing = client
            .attach(AttachRequest {
                netns: ns.path(),
                ..Default::default()
            })
            .await
            .expect_err("container id required");
        assert_eq!(
            missing
                .metadata()
                .get("sluice-field")
                .and_then(|v| v.to_str().ok()),
            Some("container_id")
        );

        let gone = client
            .attach(AttachRequest {
                container_id: "rpc".into(),
                netns: "/var/run/netns/sl-rpc-never-existed".into(),
                annotations: [("sluice.dev/redirect".to_owned(), "enabled".to_owned())].into(),
                ..Default::default()
            })
            .await
            .expect_err("netns does not exist");
        assert_eq!(gone.code(), tonic::Code::NotFound);
        assert_eq!(
            gone.metadata()
                .get("sluice-field")
                .and_then(|v| v.to_str().ok()),
            Some("netns")
        );

        let explain = client
            .explain(ExplainRequest {
                annotations: [("sluice.dev/redirect".to_owned(), "enabled".to_owned())].into(),
                ..Default::default()
            })
            .await
            .expect("explain")
            .into_inner();
        assert!(explain.nft.contains("redirect to :15001"), "{explain:?}");
        assert_eq!(explain.profile, "native");
    });
    assert!(
        ns.sluice_table().is_none(),
        "failed attaches touched nothing"
    );
}

#[test]
fn list_shows_attachments_until_they_are_detached() {
    require_root();
    let agent = Agent::start("list");
    let ns = Netns::new("sl-list");
    rt().block_on(async {
        let mut client = AgentClient::new(channel(&agent).await);
        let reply = client
            .attach(AttachRequest {
                container_id: "c-list".into(),
                netns: ns.path(),
                annotations: [("sluice.dev/redirect".to_owned(), "enabled".to_owned())].into(),
                pod: Some(sluice_proto::v1::PodRef {
                    namespace: "team".into(),
                    name: "web".into(),
                    uid: "u-1".into(),
                }),
                pod_ips: vec!["10.99.0.2/24".into()],
                ..Default::default()
            })
            .await
            .expect("attach")
            .into_inner();
        let list = client
            .list(ListRequest {})
            .await
            .expect("list")
            .into_inner();
        assert_eq!(list.attachments.len(), 1);
        let a = &list.attachments[0];
        assert_eq!(
            (
                a.container_id.as_str(),
                a.netns.as_str(),
                a.fingerprint.as_str()
            ),
            ("c-list", ns.path().as_str(), reply.fingerprint.as_str())
        );
        assert_eq!(a.pod.as_ref().map(|p| p.name.as_str()), Some("web"));
        let detached = client
            .detach(DetachRequest {
                container_id: "c-list".into(),
                netns: ns.path(),
                ..Default::default()
            })
            .await
            .expect("detach")
            .into_inner();
        assert!(detached.removed);
        let again = client
            .detach(DetachRequest {
                container_id: "c-list".into(),
                netns: ns.path(),
                ..Default::default()
            })
            .await
            .expect("detach is idempotent")
            .into_inner();
        assert!(!again.removed);
        assert!(
            client
                .list(ListRequest {})
                .await
                .expect("list")
                .into_inner()
                .attachments
                .is_empty()
        );
    });
    assert!(ns.sluice_table().is_none());
}

#[test]
fn a_config_file_is_read_flags_win_and_logs_can_be_json() {
    require_root();
    let dir = std::env::temp_dir().join(format!("sluice-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        "socket = \"/nonexistent/overridden.sock\"\nlog-format = \"json\"\noutbound-port = 15111\n",
    )
    .expect("config");
    let mut agent = Agent::start_with("cfg", &["--config", config.to_str().expect("utf8")]);
    let ns = Netns::new("sl-cfg");
    let stdin = conf(
        "1.0.0",
        &agent.socket_str(),
        &[("sluice.dev/redirect", "enabled")],
        Some(&prev_result("1.0.0")),
    );
    assert_eq!(
        cni("ADD", "cfg", &ns.path(), &stdin).exit,
        0,
        "the --socket flag won over the file"
    );
    assert!(
        ns.sluice_table()
            .expect("table")
            .contains("redirect to :15111"),
        "file's node default applied"
    );
    agent.stop();
    let log = std::fs::read_to_string(&agent.log).expect("agent log");
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty());
    for line in &lines {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(
            v.get("level").is_some() && v.get("message").is_some(),
            "{line}"
        );
    }
    assert!(
        lines
            .iter()
            .any(|l| l.contains("\"attached\"") && l.contains("\"container\":\"cfg\"")),
        "{log}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// `sluicectl explain` plans under the node's configuration, and says whose: the running
/// agent's over its socket, or a config file's. On a mesh pod, native `sluice.dev/*` overrides
/// are not applied unless the node allows it — an author's `sluice.dev/proxy-uid: 0` must not
/// exempt every root process from Istio's proxy; explain says so, the ADD logs and counts it.
#[test]
fn native_overrides_on_a_mesh_pod_need_the_nodes_consent_and_explain_says_so() {
    require_root();
    let agent = Agent::start("overrides");
    let istio_root = [
        ("sidecar.istio.io/status", "{}"),
        ("sluice.dev/proxy-uid", "0"),
    ];
    let explain = |extra: &[&str]| {
        let mut cmd = std::process::Command::new(bin("sluicectl"));
        cmd.args(["--socket", &agent.socket_str(), "explain"])
            .args(extra);
        for (k, v) in istio_root {
            cmd.args(["-a", &format!("{k}={v}")]);
        }
        let out = cmd.output().expect("sluicectl explain");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let by_agent = explain(&[]);
    assert!(
        by_agent.contains(&format!(
            "# planned under: the agent at {}",
            agent.socket_str()
        )),
        "{by_agent}"
    );
    assert!(
        by_agent.contains("# note: not applied on a istio pod")
            && by_agent.contains("sluice.dev/proxy-uid"),
        "{by_agent}"
    );
    assert!(by_agent.contains("meta skuid 1337 return"), "{by_agent}");
    assert!(!by_agent.contains("meta skuid 0 "), "{by_agent}");
    let file = std::env::temp_dir().join(format!("sluice-overrides-{}.toml", std::process::id()));
    std::fs::write(&file, "native-overrides-on-mesh-pods = true\n").expect("config");
    let by_file = explain(&["--config", file.to_str().expect("utf8")]);
    let _ = std::fs::remove_file(&file);
    assert!(
        by_file.contains("# planned under: the config file"),
        "{by_file}"
    );
    assert!(by_file.contains("meta skuid 0 return"), "{by_file}");
    assert!(!by_file.contains("# note:"), "{by_file}");
    // The ADD applies what explain showed, and counts the pod.
    let ns = Netns::new("sl-agent-overrides");
    let stdin = conf(
        "1.0.0",
        &agent.socket_str(),
        &istio_root,
        Some(&prev_result("1.0.0")),
    );
    assert_eq!(cni("ADD", "overrides", &ns.path(), &stdin).exit, 0);
    let table = ns.sluice_table().expect("captured");
    assert!(table.contains("meta skuid 1337 return") && !table.contains("meta skuid 0 "));
    let metrics = scrape(&agent.metrics_url());
    assert_eq!(
        value(
            &metrics,
            r#"sluice_native_overrides_ignored_total{profile="istio"}"#
        ),
        1.0,
        "{metrics}"
    );
}

/// `sluicectl explain` (no agent needed) renders every mode: REDIRECT, TPROXY with its
/// policy routing, dual-stack, and each profile, saying which profile produced the plan.
#[test]
fn sluicectl_explain_renders_each_mode_and_names_the_profile() {
    let explain = |args: &[&str]| {
        let out = std::process::Command::new(bin("sluicectl"))
            .arg("explain")
            .args(args)
            .output()
            .expect("sluicectl explain");
        assert!(out.status.success(), "{args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let redirect = explain(&["-a", "sluice.dev/redirect=enabled", "--pod-ip", "10.0.0.5"]);
    assert!(redirect.contains("# profile: native"), "{redirect}");
    assert!(redirect.contains("redirect to :15001"), "{redirect}");
    assert!(!redirect.contains("ipv6"), "{redirect}");
    let tproxy = explain(&[
        "-a",
        "sluice.dev/redirect=enabled",
        "-a",
        "sluice.dev/mode=tproxy",
        "--pod-ip",
        "10.0.0.5",
        "--pod-ip",
        "fd00::5",
    ]);
    for want in [
        "tproxy ip to :15006 meta mark set 0x00000539 accept",
        "tproxy ip6 to :15006",
        "# device: ip rule add fwmark 1337 lookup 133",
        "# device: ip -6 route add local ::/0 dev lo table 133",
        "# device: ip -6 addr add ::6/128 dev lo",
    ] {
        assert!(tproxy.contains(want), "missing {want:?} in\n{tproxy}");
    }
    let istio = explain(&[
        "-a",
        "sidecar.istio.io/status={}",
        "-a",
        "sidecar.istio.io/interceptionMode=TPROXY",
    ]);
    assert!(istio.contains("# profile: istio"), "{istio}");
    assert!(istio.contains("tproxy ip to :15006"), "{istio}");
    let linkerd = explain(&["-a", "linkerd.io/proxy-version=stable-2.14.10", "--plan"]);
    assert!(linkerd.contains("# profile: linkerd"), "{linkerd}");
    assert!(linkerd.contains("redirect to :4140"), "{linkerd}");
    let kuma = explain(&[
        "-a",
        "kuma.io/sidecar-injected=true",
        "-a",
        "traffic.kuma.io/transparent-proxy-config=cniMode: true\nredirect:\n  dns:\n    enabled: true\n    captureAll: true\n",
    ]);
    assert!(
        kuma.contains("# profile: kuma (from traffic.kuma.io/transparent-proxy-config)"),
        "{kuma}"
    );
    assert!(kuma.contains("udp dport 53 redirect to :15053"), "{kuma}");
    let none = explain(&[
        "-a",
        "sidecar.istio.io/status={}",
        "-a",
        "sidecar.istio.io/interceptionMode=NONE",
    ]);
    assert!(
        none.contains("# skipped: the mesh's interception mode is NONE"),
        "{none}"
    );
}
