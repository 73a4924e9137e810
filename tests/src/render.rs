//! The install rendered by the real tools: Debian's `kustomize` (trixie's package, unpacked
//! under `target/runtimes/` by `tests/runtimes/fetch.sh`, never installed) and Helm's own
//! engine (PyPI `helm-python-sdk`, Helm's Go SDK as a library, in a venv under `target/helm/`
//! made by `tests/helm/venv.sh`; no `helm` binary exists in the registries here).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// The repository's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("running {cmd:?}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The YAML documents of a stream as JSON values (empty documents left out).
pub fn documents(text: &str) -> Result<Vec<Value>, String> {
    use serde::Deserialize;
    let mut docs = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(text) {
        let value = Value::deserialize(doc).map_err(|e| e.to_string())?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

/// `kustomize build DIR` (relative to the repository), by Debian's kustomize.
pub fn kustomize_build(dir: &str) -> Result<String, String> {
    let root = run(Command::new("bash")
        .arg(repo().join("tests/runtimes/fetch.sh"))
        .args(["trixie", "kustomize"]))?;
    let kustomize = PathBuf::from(root.trim()).join("usr/bin/kustomize");
    run(Command::new(kustomize).arg("build").arg(repo().join(dir)))
}

fn helm(args: &[&str]) -> Result<String, String> {
    let python = run(Command::new("bash").arg(repo().join("tests/helm/venv.sh")))?;
    run(Command::new(python.trim())
        .arg(repo().join("tests/helm/render.py"))
        .args(args))
}

/// The chart `charts/sluice` rendered with these values (JSON) into `namespace`.
pub fn helm_render(values: &Value, namespace: &str) -> Result<String, String> {
    let chart = repo().join("charts/sluice");
    helm(&[
        "render",
        &chart.display().to_string(),
        &values.to_string(),
        namespace,
    ])
}

/// Helm's lint of the chart (strict: warnings count) with these values: its report.
pub fn helm_lint(values: &Value, namespace: &str) -> Result<Value, String> {
    let chart = repo().join("charts/sluice");
    let report = helm(&[
        "lint",
        &chart.display().to_string(),
        &values.to_string(),
        namespace,
    ])?;
    serde_json::from_str(&report).map_err(|e| format!("lint report: {e}: {report}"))
}
