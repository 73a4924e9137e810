//! The Kubernetes manifests, validated offline against the Kubernetes JSON schemas in strict
//! mode (PyPI `kubernetes-validate`, installed here into a local venv) for every Kubernetes
//! version the README claims, plus the facts the install depends on.

use std::path::{Path, PathBuf};
use std::process::Command;

use sluice_tests::*;

/// The Kubernetes versions the README claims.
const VERSIONS: [&str; 3] = ["1.29.0", "1.30.0", "1.31.0"];
/// The resources `kubectl apply -k manifests/` creates, plus the example pod.
const RESOURCES: [&str; 5] = [
    "namespace.yaml",
    "serviceaccount.yaml",
    "configmap.yaml",
    "daemonset.yaml",
    "example-pod.yaml",
];
const VALIDATOR: &str = "kubernetes-validate==1.31.0";

fn manifests() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests")
}

/// target/kubernetes-validate-venv, created on first use.
fn validator() -> PathBuf {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/kubernetes-validate-venv");
    let exe = venv.join("bin/kubernetes-validate");
    if !exe.exists() {
        sh(&["python3", "-m", "venv", &venv.display().to_string()]);
        sh(&[
            &venv.join("bin/pip").display().to_string(),
            "install",
            "--quiet",
            VALIDATOR,
        ]);
    }
    exe
}

fn validate(files: &[PathBuf], version: &str) -> std::process::Output {
    Command::new(validator())
        .args(["--strict", "-k", version])
        .args(files)
        .output()
        .expect("run kubernetes-validate")
}

#[test]
fn manifests_validate_strictly_for_every_claimed_kubernetes_version() {
    let files: Vec<PathBuf> = RESOURCES.iter().map(|f| manifests().join(f)).collect();
    for version in VERSIONS {
        let out = validate(&files, version);
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{version}: {text}");
        assert_eq!(
            text.matches(" passed for resource ").count(),
            RESOURCES.len(),
            "{version}: {text}"
        );
    }
    // The validator is strict: a misspelt field fails it.
    let bad = std::env::temp_dir().join(format!("sluice-bad-ds-{}.yaml", std::process::id()));
    let ds = std::fs::read_to_string(manifests().join("daemonset.yaml")).expect("daemonset");
    std::fs::write(&bad, ds.replace("hostNetwork: true", "hostNetwrok: true")).expect("write");
    let out = validate(std::slice::from_ref(&bad), VERSIONS[2]);
    let _ = std::fs::remove_file(&bad);
    assert!(
        !out.status.success(),
        "a misspelt field must fail strict validation"
    );
}

#[test]
fn the_kustomization_lists_the_install_and_the_daemonset_keeps_least_privilege() {
    let kustomization =
        std::fs::read_to_string(manifests().join("kustomization.yaml")).expect("kustomization");
    for f in &RESOURCES[..4] {
        assert!(kustomization.contains(&format!("  - {f}")), "{f} missing");
        assert!(manifests().join(f).exists());
    }
    let ds = std::fs::read_to_string(manifests().join("daemonset.yaml")).expect("daemonset");
    for want in [
        "hostNetwork: true",
        "priorityClassName: system-node-critical",
        "- operator: Exists",
        "privileged: false",
        "drop: [ALL]",
        "add: [NET_ADMIN, SYS_ADMIN]",
        "mountPropagation: HostToContainer",
        "path: /run/sluice",
        "path: /opt/cni/bin",
        "path: /etc/cni/net.d",
        "grpc:",
        "- --install",
        "fieldPath: status.hostIP",
        "- --metrics-addr=$(NODE_IP):9965",
        "- --health-addr=$(NODE_IP):9966",
        "path: /proc/sys/net",
        "mountPath: /host/proc/sys/net",
    ] {
        assert!(ds.contains(want), "daemonset lacks {want:?}");
    }
    assert!(!ds.contains("privileged: true"));
    // Never every address of the node: metrics and probes bind the node's own address.
    for file in ["daemonset.yaml", "configmap.yaml"] {
        let text = std::fs::read_to_string(manifests().join(file)).expect("manifest");
        assert!(!text.contains("0.0.0.0"), "{file} binds every address");
    }
    // The image `make image` produces.
    assert!(
        ds.contains(&format!(
            "image: localhost/sluice-agent:{}",
            env!("CARGO_PKG_VERSION")
        )),
        "the DaemonSet names the image make image builds"
    );
}

#[test]
fn the_configmap_is_a_config_the_agent_accepts() {
    let cm = std::fs::read_to_string(manifests().join("configmap.yaml")).expect("configmap");
    let body: String = cm
        .split_once("config.toml: |\n")
        .expect("config.toml key")
        .1
        .lines()
        .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
        .collect();
    let path = std::env::temp_dir().join(format!("sluice-cm-{}.toml", std::process::id()));
    std::fs::write(&path, body).expect("write");
    let loaded = sluice::config::FileConfig::load(&path);
    let _ = std::fs::remove_file(&path);
    let file = loaded.expect("the ConfigMap's config.toml loads");
    let mut cfg = sluice::config::AgentConfig::default();
    file.apply(&mut cfg);
    assert_eq!(cfg.socket, Path::new("/run/sluice/agent.sock"));
    assert_eq!(cfg.sysctl_dir, Path::new("/host/proc/sys"));
}
