//! The Helm chart (`charts/sluice`) and the kustomize install (`manifests/`), built by the real
//! tools (see `sluice_tests::render`): the chart lints clean, its default render is the same
//! objects as `kustomize build manifests/` (and with monitoring, as `manifests/monitoring`),
//! and its runtime switch changes exactly the CRI socket.

use std::collections::BTreeMap;

use serde_json::{Value, json};
use sluice_tests::render::{documents, helm_lint, helm_render, kustomize_build, repo};

const NAMESPACE: &str = "sluice-system";

/// Objects by (kind, namespace, name).
fn by_key(objects: Vec<Value>) -> BTreeMap<(String, String, String), Value> {
    let mut out = BTreeMap::new();
    for o in objects {
        let key = (
            o["kind"].as_str().unwrap_or_default().to_owned(),
            o["metadata"]["namespace"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            o["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
        assert!(out.insert(key.clone(), o).is_none(), "{key:?} twice");
    }
    out
}

fn rendered(values: Value) -> BTreeMap<(String, String, String), Value> {
    let text = helm_render(&values, NAMESPACE).unwrap_or_else(|e| panic!("{e}"));
    by_key(documents(&text).unwrap_or_else(|e| panic!("chart render: {e}")))
}

fn built(dir: &str) -> BTreeMap<(String, String, String), Value> {
    let text = kustomize_build(dir).unwrap_or_else(|e| panic!("{e}"));
    by_key(documents(&text).unwrap_or_else(|e| panic!("kustomize build: {e}")))
}

fn same_objects(
    what: &str,
    chart: &BTreeMap<(String, String, String), Value>,
    kustomize: &BTreeMap<(String, String, String), Value>,
) {
    let keys =
        |m: &BTreeMap<(String, String, String), Value>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(chart), keys(kustomize), "{what}: the same objects");
    for (key, object) in chart {
        assert_eq!(
            object, &kustomize[key],
            "{what}: {key:?} differs between the chart and kustomize"
        );
    }
}

#[test]
fn the_chart_lints_clean_with_every_switch() {
    for values in [
        json!({}),
        json!({"runtime": "crio", "monitoring": {"enabled": true}}),
        json!({"chainMode": "own-copy", "repair": "report", "profiles": ["istio"],
               "allowedUnsafeSysctls": ["net.ipv4.conf.all.route_localnet"],
               "nodeSelector": {"kubernetes.io/os": "linux"}, "extraArgs": ["--log-format=text"]}),
    ] {
        let report = helm_lint(&values, NAMESPACE).unwrap_or_else(|e| panic!("{e}"));
        let problems: Vec<&Value> = report["messages"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| m["severity"].as_u64().unwrap_or(3) >= 2)
            .collect();
        assert!(
            problems.is_empty() && report["errors"].as_array().is_some_and(Vec::is_empty),
            "{values}: {report}"
        );
    }
}

#[test]
fn the_default_render_is_the_kustomize_install() {
    same_objects("default", &rendered(json!({})), &built("manifests"));
}

#[test]
fn monitoring_on_adds_exactly_the_monitoring_component() {
    let mut with = rendered(json!({"monitoring": {"enabled": true}}));
    for key in built("manifests").keys() {
        with.remove(key)
            .unwrap_or_else(|| panic!("{key:?} missing with monitoring on"));
    }
    same_objects("monitoring", &with, &built("manifests/monitoring"));
    // The chart's copies of the rules and the dashboard are the component's files.
    for file in ["sluice.rules.yaml", "sluice-dashboard.json"] {
        assert_eq!(
            std::fs::read(repo().join("charts/sluice/files").join(file)).expect("chart file"),
            std::fs::read(repo().join("manifests/monitoring").join(file)).expect("component file"),
            "charts/sluice/files/{file} is a copy of manifests/monitoring/{file}"
        );
    }
}

/// Every string leaf of a value with its path.
fn leaves(v: &Value, path: String, out: &mut BTreeMap<String, String>) {
    match v {
        Value::Object(m) => m
            .iter()
            .for_each(|(k, v)| leaves(v, format!("{path}.{k}"), out)),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .for_each(|(i, v)| leaves(v, format!("{path}[{i}]"), out)),
        other => {
            out.insert(path, other.to_string());
        }
    }
}

#[test]
fn the_cri_o_switch_changes_exactly_the_socket() {
    let (containerd, crio) = (rendered(json!({})), rendered(json!({"runtime": "crio"})));
    let mut changed = Vec::new();
    for (key, object) in &containerd {
        let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
        leaves(object, key.2.clone(), &mut a);
        leaves(&crio[key], key.2.clone(), &mut b);
        assert_eq!(
            a.keys().collect::<Vec<_>>(),
            b.keys().collect::<Vec<_>>(),
            "{key:?}"
        );
        for (path, value) in &a {
            if b[path] != *value {
                changed.push((path.clone(), value.clone(), b[path].clone()));
            }
        }
    }
    let paths: Vec<&str> = changed.iter().map(|(p, _, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        [
            "sluice-agent.data.config.toml",
            "sluice-agent.spec.template.spec.containers[0].volumeMounts[6].mountPath",
            "sluice-agent.spec.template.spec.volumes[6].hostPath.path",
        ],
        "{changed:?}"
    );
    for (path, from, to) in &changed {
        assert!(
            from.contains("/run/containerd/containerd.sock")
                && to.contains("/var/run/crio/crio.sock")
                && from.replace("/run/containerd/containerd.sock", "/var/run/crio/crio.sock")
                    == *to,
            "{path}: only the socket changes: {from} -> {to}"
        );
    }
    // An explicit socket wins over the runtime's.
    let explicit =
        rendered(json!({"runtime": "crio", "criSocket": "/run/k3s/containerd/containerd.sock"}));
    let ds = &explicit[&("DaemonSet".into(), NAMESPACE.into(), "sluice-agent".into())];
    assert_eq!(
        ds["spec"]["template"]["spec"]["volumes"][6]["hostPath"]["path"],
        "/run/k3s/containerd/containerd.sock"
    );
}

/// `values.schema.json` refuses what the chart cannot render into a working install.
#[test]
fn the_values_schema_refuses_bad_values() {
    for bad in [
        json!({"runtime": "docker"}),
        json!({"chainMode": "append"}),
        json!({"profiles": ["osm"]}),
        json!({"reconcileInterval": 0}),
        json!({"metricsPort": 70000}),
        json!({"criSocket": "relative.sock"}),
        json!({"imagee": {}}),
    ] {
        let err = helm_render(&bad, NAMESPACE).expect_err(&bad.to_string());
        assert!(
            err.contains("schema") || err.contains("values"),
            "{bad}: {err}"
        );
    }
}
