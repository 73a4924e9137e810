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

/// target/kubernetes-validate-venv, created on first use (by one test; the others wait).
fn validator() -> PathBuf {
    static CREATING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = CREATING.lock().unwrap_or_else(|p| p.into_inner());
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
    // Read as YAML, field by field: a substring check passes on a comment or on the same words
    // under the wrong key.
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&ds).expect("daemonset YAML");
    let pod = &doc["spec"]["template"]["spec"];
    let strings = |v: &serde_yaml_ng::Value| -> Vec<String> {
        v.as_sequence()
            .map(|s| {
                s.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(pod["hostNetwork"].as_bool(), Some(true));
    assert_eq!(pod["automountServiceAccountToken"].as_bool(), Some(false));
    assert_eq!(
        pod["priorityClassName"].as_str(),
        Some("system-node-critical")
    );
    assert_eq!(pod["tolerations"][0]["operator"].as_str(), Some("Exists"));
    assert!(pod["initContainers"].is_null(), "no init container");
    let containers = pod["containers"].as_sequence().expect("containers");
    assert_eq!(containers.len(), 1, "one container");
    let c = &containers[0];
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"].as_bool(), Some(false));
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(
        strings(&sc["capabilities"]["add"]),
        ["NET_ADMIN", "SYS_ADMIN"]
    );
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(
        sc["seccompProfile"]["type"].as_str(),
        Some("RuntimeDefault")
    );
    assert!(
        sc["allowPrivilegeEscalation"].is_null(),
        "the agent sets no_new_privs itself"
    );
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert_eq!(c[probe]["grpc"]["port"].as_u64(), Some(9966), "{probe}");
    }
    let args = strings(&c["args"]);
    for want in [
        "--install",
        "--metrics-addr=$(NODE_IP):9965",
        "--health-addr=$(NODE_IP):9966",
    ] {
        assert!(args.iter().any(|a| a == want), "args lack {want}: {args:?}");
    }
    assert_eq!(
        c["env"]
            .as_sequence()
            .into_iter()
            .flatten()
            .find(|e| e["name"].as_str() == Some("NODE_IP"))
            .map(|e| &e["valueFrom"]["fieldRef"]["fieldPath"])
            .and_then(|f| f.as_str()),
        Some("status.hostIP")
    );
    // Exactly these host paths, each mounted where the agent expects it; nothing else of
    // the node's.
    let host_paths: std::collections::BTreeMap<String, String> = pod["volumes"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|v| {
            Some((
                v["name"].as_str()?.to_owned(),
                v["hostPath"]["path"].as_str()?.to_owned(),
            ))
        })
        .collect();
    let mounts: std::collections::BTreeMap<String, (String, Option<String>)> = c["volumeMounts"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(|m| {
            Some((
                m["name"].as_str()?.to_owned(),
                (
                    m["mountPath"].as_str()?.to_owned(),
                    m["mountPropagation"].as_str().map(str::to_owned),
                ),
            ))
        })
        .collect();
    let want = [
        ("/opt/cni/bin", "/host/opt/cni/bin", None),
        ("/etc/cni/net.d", "/host/etc/cni/net.d", None),
        ("/var/run/netns", "/var/run/netns", Some("HostToContainer")),
        ("/run/sluice", "/run/sluice", None),
        ("/proc/sys/net", "/host/proc/sys/net", None),
        (
            "/run/containerd/containerd.sock",
            "/run/containerd/containerd.sock",
            None,
        ),
    ];
    assert_eq!(host_paths.len(), want.len(), "{host_paths:?}");
    for (host, mount, propagation) in want {
        let (name, _) = host_paths
            .iter()
            .find(|(_, p)| p.as_str() == host)
            .unwrap_or_else(|| panic!("no hostPath {host}: {host_paths:?}"));
        assert_eq!(
            mounts.get(name),
            Some(&(mount.to_owned(), propagation.map(str::to_owned))),
            "{host}"
        );
    }
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

/// What the real tools render (Debian's kustomize; Helm's engine, default and CRI-O) validates
/// strictly too: the objects the cluster gets are these, not the files.
#[test]
fn the_real_renders_validate_strictly() {
    use sluice_tests::render::{documents, helm_render, kustomize_build};
    let renders = [
        ("kustomize build manifests", kustomize_build("manifests")),
        (
            "helm template (defaults)",
            helm_render(&serde_json::json!({}), "sluice-system"),
        ),
        (
            "helm template (runtime crio)",
            helm_render(&serde_json::json!({"runtime": "crio"}), "sluice-system"),
        ),
    ];
    for (what, text) in renders {
        let text = text.unwrap_or_else(|e| panic!("{what}: {e}"));
        let objects = documents(&text)
            .unwrap_or_else(|e| panic!("{what}: {e}"))
            .len();
        assert!(objects >= 4, "{what}: {objects} objects");
        let file = std::env::temp_dir().join(format!(
            "sluice-render-{}-{}.yaml",
            what.replace(' ', "-").replace(['(', ')'], ""),
            std::process::id()
        ));
        std::fs::write(&file, &text).expect("write render");
        let out = validate(std::slice::from_ref(&file), VERSIONS[2]);
        let _ = std::fs::remove_file(&file);
        let report = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{what}: {report}");
        assert_eq!(
            report.matches(" passed for resource ").count(),
            objects,
            "{what}: {report}"
        );
    }
}
