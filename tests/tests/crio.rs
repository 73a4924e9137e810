//! CRI-O's call pattern, replayed through the real `sluice-cni` and a real agent on real
//! network namespaces. CRI-O (1.3x) is not packaged by Debian and cannot run here, so the
//! sequence is built from how it calls chained plugins (ocicni over libcni; the facts are in
//! docs/testing.md, "CRI-O"), not recorded:
//!
//! - VERSION on every conflist load: stdin `{"cniVersion": ...}`, `CNI_NETNS=dummy`;
//! - STATUS polled (500 ms at start-up, then every 5 s);
//! - GC once at start-up, with `cni.dev/valid-attachments`;
//! - ADD, then CHECK after every ADD (stdin: the cached config, the ADD's result as
//!   `prevResult`);
//! - CHECK of every pod again when CRI-O restarts — also while the agent is away;
//! - one DEL only, built from the config cached at ADD time;
//! - `{}` rather than `null` for a pod without annotations;
//! - the netns under its `namespaces_dir` as `<dir>/netns/<uuid>` (no `cni-` prefix).

use std::io::Write;
use std::process::{Command, Stdio};

use sluice_tests::*;

const VERSION: &str = "1.1.0";

/// Runs the plugin the way CRI-O's libcni does: its `CNI_ARGS`, the netns path as given.
fn crio(command: &str, id: &str, netns: &str, stdin: &str) -> CniRun {
    let mut child = Command::new(bin("sluice-cni"))
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", id)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/libexec/cni:/opt/cni/bin")
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-{id};K8S_POD_INFRA_CONTAINER_ID={id};K8S_POD_UID=uid-{id}"),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sluice-cni");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait sluice-cni");
    CniRun {
        exit: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The plugin's entry of the conflist as libcni hands it over (name and cniVersion from the
/// list), with `runtimeConfig` for the pod and extra top-level keys.
fn netconf(socket: &str, annotations: serde_json::Value, extra: serde_json::Value) -> String {
    let mut conf = serde_json::json!({
        "cniVersion": VERSION,
        "name": "crio",
        "type": "sluice-cni",
        "capabilities": {"io.kubernetes.cri.pod-annotations": true},
        "agentSocket": socket,
        "timeoutMs": 5000,
        "runtimeConfig": {"io.kubernetes.cri.pod-annotations": annotations},
    });
    if let (Some(c), Some(e)) = (conf.as_object_mut(), extra.as_object()) {
        c.extend(e.clone());
    }
    conf.to_string()
}

fn prev(netns: &str) -> serde_json::Value {
    serde_json::json!({
        "cniVersion": VERSION,
        "interfaces": [{"name": "cni0"}, {"name": "veth1"}, {"name": "eth0", "sandbox": netns}],
        "ips": [{"address": "10.85.0.7/16", "gateway": "10.85.0.1", "interface": 2}],
        "routes": [{"dst": "0.0.0.0/0"}],
    })
}

fn ok(run: &CniRun, what: &str) {
    assert_eq!(run.exit, 0, "{what}: {run:?}");
}

#[test]
fn cri_o_call_sequence_keeps_pods_working_through_agent_restarts() {
    require_root();
    let mut agent = Agent::start("crio");
    let socket = agent.socket_str();
    // CRI-O's default namespaces_dir is /var/run: a pod's netns is /var/run/netns/<uuid>.
    let pod = Netns::new("5b0d9c7e-2f41-4a8e-9c3d-7e1f0a2b6c5d");
    let plain = Netns::new("0c4e1a7b-93d2-4f6a-8e5b-1d2c3b4a5f60");
    let istio = serde_json::json!({
        "sidecar.istio.io/status": r#"{"initContainers":null,"containers":["istio-proxy"]}"#,
        "kubernetes.io/config.seen": "2026-12-06T21:00:00Z",
    });

    // Conflist load: VERSION with a dummy netns, then STATUS, then GC of nothing.
    let version = crio(
        "VERSION",
        "",
        "dummy",
        &format!(r#"{{"cniVersion":"{VERSION}"}}"#),
    );
    ok(&version, "VERSION");
    assert!(
        version.json()["supportedVersions"]
            .as_array()
            .is_some_and(|v| v.iter().any(|x| x == VERSION)),
        "{version:?}"
    );
    let status = netconf(&socket, serde_json::json!({}), serde_json::json!({}));
    ok(&crio("STATUS", "", "", &status), "STATUS");
    let gc = netconf(
        &socket,
        serde_json::json!({}),
        serde_json::json!({"cni.dev/valid-attachments": []}),
    );
    ok(&crio("GC", "", "", &gc), "start-up GC");

    // ADD of an Istio pod, then CHECK with the cached config (ADD's result as prevResult).
    let add = netconf(
        &socket,
        istio.clone(),
        serde_json::json!({"prevResult": prev(&pod.path())}),
    );
    let added = crio("ADD", "pod1", &pod.path(), &add);
    ok(&added, "ADD");
    assert_eq!(added.json(), prev(&pod.path()), "ADD hands prevResult on");
    let table = pod.sluice_table().expect("the Istio pod is captured");
    assert!(table.contains("redirect to :15001"), "{table}");
    let cached = netconf(
        &socket,
        istio.clone(),
        serde_json::json!({"prevResult": added.json()}),
    );
    ok(
        &crio("CHECK", "pod1", &pod.path(), &cached),
        "CHECK after ADD",
    );

    // A pod without annotations: `{}`, passed through without the agent, CHECK too.
    let plain_add = netconf(
        &socket,
        serde_json::json!({}),
        serde_json::json!({"prevResult": prev(&plain.path())}),
    );
    let plain_added = crio("ADD", "pod2", &plain.path(), &plain_add);
    ok(&plain_added, "ADD of a pod without annotations");
    assert_eq!(plain_added.json(), prev(&plain.path()));
    assert_eq!(plain.sluice_table(), None, "not captured");
    ok(
        &crio("CHECK", "pod2", &plain.path(), &plain_add),
        "CHECK of a pod without annotations",
    );

    // CRI-O restarts while the agent is away (a DaemonSet rollout): it polls STATUS and
    // CHECKs every pod. Nothing a runtime would act on fails, and the capture stays.
    agent.stop();
    ok(
        &crio("STATUS", "", "", &status),
        "STATUS with the agent away",
    );
    let away = crio("CHECK", "pod1", &pod.path(), &cached);
    ok(&away, "CHECK with the agent away");
    assert!(away.stdout.is_empty(), "{away:?}");
    assert!(
        away.stderr.contains("not verified") && away.stderr.contains("cannot answer"),
        "says why it did not verify: {away:?}"
    );
    ok(
        &crio("CHECK", "pod2", &plain.path(), &plain_add),
        "CHECK of the plain pod with the agent away",
    );
    assert_eq!(
        pod.sluice_table().as_deref(),
        Some(table.as_str()),
        "the capture is untouched"
    );
    // An ADD still fails while the agent is away: a pod never starts uncaptured.
    let other = Netns::new("7f3a2b1c-0d9e-4c8b-a765-43210fedcba9");
    let refused = crio(
        "ADD",
        "pod3",
        &other.path(),
        &netconf(
            &socket,
            istio.clone(),
            serde_json::json!({"prevResult": prev(&other.path())}),
        ),
    );
    assert_eq!(refused.error_code(), 11, "{refused:?}");
    assert_eq!(other.sluice_table(), None);

    // The agent is back: CHECK verifies again, and reports a capture that is gone.
    agent.restart();
    ok(
        &crio("CHECK", "pod1", &pod.path(), &cached),
        "CHECK with the agent back",
    );
    pod.exec(&["nft", "delete", "table", "inet", "sluice"]);
    let drift = crio("CHECK", "pod1", &pod.path(), &cached);
    assert_eq!(drift.error_code(), 100, "{drift:?}");
    // (The reconciler, or a new ADD, would restore it; the DEL below removes what is left.)

    // One DEL, from the cached config: the capture goes, and nothing is left for a GC.
    ok(&crio("DEL", "pod1", &pod.path(), &cached), "DEL");
    ok(
        &crio("DEL", "pod2", &plain.path(), &plain_add),
        "DEL of the plain pod",
    );
    assert_eq!(pod.sluice_table(), None);
    let listed = agent.ctl(&["list"]);
    let listing = String::from_utf8_lossy(&listed.stdout);
    assert!(!listing.contains("pod1"), "{listing}");
    ok(&crio("GC", "", "", &gc), "GC at the next start-up");
}

/// CRI-O with its own `namespaces_dir` puts netns files at `<dir>/netns/<uuid>`: outside the
/// agent's default roots (refused, naming the setting), accepted once that directory is
/// given with `--netns-root` (docs/install.md, "CRI-O").
#[test]
fn cri_o_with_its_own_namespaces_dir_needs_that_netns_root() {
    require_root();
    let ns = Netns::new("crio-nsdir-source");
    let dir = std::env::temp_dir().join(format!("sluice-crio-nsdir-{}", std::process::id()));
    let netns_dir = dir.join("netns");
    std::fs::create_dir_all(&netns_dir).expect("namespaces_dir");
    let path = netns_dir.join("2a4c6e8f-1b3d-4f5a-9c7e-0d2b4f6a8c1e");
    std::fs::write(&path, "").expect("bind target");
    sh(&["mount", "--bind", &ns.path(), &path.display().to_string()]);
    let unmount = scopeguard(&path);
    let annotations = serde_json::json!({"sluice.dev/redirect": "enabled"});
    let path_s = path.display().to_string();

    let agent = Agent::start("crio-nsdir");
    let stdin = netconf(
        &agent.socket_str(),
        annotations.clone(),
        serde_json::json!({"prevResult": prev(&path_s)}),
    );
    let refused = crio("ADD", "nsdir", &path_s, &stdin);
    assert_ne!(refused.exit, 0, "{refused:?}");
    let msg = refused.json()["msg"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
        + refused.json()["details"].as_str().unwrap_or_default();
    assert!(msg.contains("netns"), "names the netns: {refused:?}");
    assert_eq!(ns.sluice_table(), None);
    drop(agent);

    let agent = Agent::start_with(
        "crio-nsdir-root",
        &["--netns-root", &netns_dir.display().to_string()],
    );
    let stdin = netconf(
        &agent.socket_str(),
        annotations,
        serde_json::json!({"prevResult": prev(&path_s)}),
    );
    ok(
        &crio("ADD", "nsdir", &path_s, &stdin),
        "ADD under --netns-root",
    );
    assert!(ns.sluice_table().is_some(), "captured");
    ok(&crio("DEL", "nsdir", &path_s, &stdin), "DEL");
    drop(unmount);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Unmounts the bind mount on drop (also when the test fails).
struct Unmount(std::path::PathBuf);

fn scopeguard(path: &std::path::Path) -> Unmount {
    Unmount(path.to_path_buf())
}

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}
