//! Records the corpus of what a real runtime sends `sluice-cni` (stdin and `CNI_*` environment,
//! byte for byte), for `tests/tests/corpus.rs` to replay through the real binary.
//!
//! `sluice-corpus record [OUT]` (`make corpus`; OUT defaults to `tests/corpus`) starts an
//! isolated containerd (the Debian package, see `cri.rs`) whose chain is bridge + host-local +
//! `sluice-cni`, with a running agent, where `sluice-cni` in containerd's CNI bin dir is a
//! symlink to this program. Run under that name (`CNI_COMMAND` set), this program writes what
//! it received next to containerd's state and runs the real `sluice-cni` with exactly that
//! input, passing its answer back: the pods really start and really get captured while being
//! recorded. Each pod shape is driven through CRI like kubelet does (RunPodSandbox, then
//! StopPodSandbox, then RemovePodSandbox) for each `cniVersion` of the conflist, and every
//! step must produce exactly one call of the plugin.
//!
//! The output: `OUT/<containerd version>/cni-<version>/<shape>/<n>-<COMMAND>.{stdin,env,result}`
//! (`result` is the plugin's exit code and stdout as the runtime got them) and `SOURCE` saying
//! how and where it was recorded.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};

use sluice_tests::cri::{Chain, Containerd, Runtime};
use sluice_tests::{Agent, bin};

/// Pod shapes: a name and the annotations kubelet would pass for it.
fn shapes() -> Vec<(&'static str, Vec<(String, String)>)> {
    let kubelet = |extra: &[(&str, &str)]| -> Vec<(String, String)> {
        // kubelet adds these two to every API pod it hands the runtime.
        [
            (
                "kubernetes.io/config.seen",
                "2026-11-22T07:40:00.000000000Z",
            ),
            ("kubernetes.io/config.source", "api"),
        ]
        .iter()
        .chain(extra)
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    };
    let last_applied = format!(
        r#"{{"apiVersion":"apps/v1","kind":"Deployment","metadata":{{"annotations":{{}},"name":"shop","namespace":"default"}},"spec":{{"template":{{"spec":{{"containers":[{}]}}}}}}}}"#,
        (0..60)
            .map(|i| format!(
                r#"{{"name":"c{i}","image":"registry.example/shop/c{i}:1.{i}","env":[{{"name":"A","value":"ü—\"quoted\"\n"}}]}}"#
            ))
            .collect::<Vec<_>>()
            .join(",")
    );
    let mut many: Vec<(String, String)> = kubelet(&[
        ("sidecar.istio.io/inject", "false"),
        ("linkerd.io/inject", "disabled"),
        ("prometheus.io/scrape", "true"),
        ("prometheus.io/port", "9090"),
        (
            "checksum/config",
            "4f9c2b1d6e8a0c3f5b7d9e1a2c4f6b8d0e2a4c6f8b0d2e4a6c8f0b2d4e6a8c0f",
        ),
        ("empty", ""),
        ("unicode.example/ñame", "値 — ✓"),
        ("cluster-autoscaler.kubernetes.io/safe-to-evict", "true"),
        ("kubectl.kubernetes.io/restartedAt", "2026-11-22T07:39:58Z"),
        (
            "kubectl.kubernetes.io/last-applied-configuration",
            &last_applied,
        ),
    ]);
    many.extend((0..30).map(|i| {
        (
            format!("team.example.com/label-{i:02}"),
            format!("value {i}"),
        )
    }));
    let istio = |status: &str| {
        kubelet(&[
            ("istio.io/rev", "default"),
            ("kubectl.kubernetes.io/default-container", "app"),
            ("kubectl.kubernetes.io/default-logs-container", "app"),
            ("prometheus.io/path", "/stats/prometheus"),
            ("prometheus.io/port", "15020"),
            ("prometheus.io/scrape", "true"),
            ("sidecar.istio.io/status", status),
            ("traffic.sidecar.istio.io/excludeOutboundPorts", "9411"),
        ])
    };
    vec![
        // No annotations at all: kubelet sends none for a static pod without any, and
        // containerd then sends `"io.kubernetes.cri.pod-annotations": null`.
        ("no-annotations", vec![]),
        // A busy pod that did not opt in: kubelet's, kubectl's, Helm's, opt-outs, a large
        // JSON value, unicode, an empty value.
        ("many-annotations", many),
        // What Istio's injector leaves on a sidecar pod when Istio runs with its CNI (istio
        // 1.2x: the CNI's `istio-validation` init container), captured in REDIRECT.
        (
            "istio",
            istio(
                r#"{"initContainers":["istio-validation"],"containers":["istio-proxy"],"volumes":["workload-socket","credential-socket","workload-certs","istio-envoy","istio-data","istio-podinfo","istio-token","istiod-ca-cert"],"imagePullSecrets":null,"revision":"default"}"#,
            ),
        ),
        // The same pod from an Istio without its CNI: `istio-init` captures it, sluice must not
        // (istio-cni's gate).
        (
            "istio-init",
            istio(
                r#"{"initContainers":["istio-init"],"containers":["istio-proxy"],"volumes":["workload-socket","credential-socket","workload-certs","istio-envoy","istio-data","istio-podinfo","istio-token","istiod-ca-cert"],"imagePullSecrets":null,"revision":"default"}"#,
            ),
        ),
        // What Linkerd's injector leaves on a meshed pod (stable-2.14).
        (
            "linkerd",
            kubelet(&[
                (
                    "linkerd.io/created-by",
                    "linkerd/proxy-injector stable-2.14.10",
                ),
                ("linkerd.io/inject", "enabled"),
                ("linkerd.io/proxy-version", "stable-2.14.10"),
                (
                    "linkerd.io/trust-root-sha256",
                    "0d1e6c2fd1ef7d3ab7c5e2f6a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5",
                ),
                ("viz.linkerd.io/tap-enabled", "true"),
                ("config.linkerd.io/skip-outbound-ports", "4567,4568,25"),
            ]),
        ),
    ]
}

fn main() -> ExitCode {
    let argv0 = std::env::args_os()
        .next()
        .map(PathBuf::from)
        .unwrap_or_default();
    if argv0.file_name().is_some_and(|n| n == "sluice-cni") {
        return record_one_call(&argv0);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["record"] => record(Path::new("tests/corpus")),
        ["record", out] => record(Path::new(out)),
        _ => {
            eprintln!("usage: sluice-corpus record [OUT-DIR]   (see the module docs)");
            ExitCode::from(2)
        }
    }
}

/// Plugin mode: `argv0` is `<containerd dir>/cni/bin/sluice-cni`; the call is written under
/// `<containerd dir>/corpus-raw/`, then the real plugin answers it.
fn record_one_call(argv0: &Path) -> ExitCode {
    let raw = argv0
        .ancestors()
        .nth(3)
        .map(|d| d.join("corpus-raw"))
        .expect("plugin path has a containerd dir");
    let mut stdin = Vec::new();
    std::io::stdin()
        .read_to_end(&mut stdin)
        .expect("read stdin");
    let mut env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| k.starts_with("CNI_"))
        .collect();
    env.sort();
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let base = raw.join(format!("{stamp:024}-{}", std::process::id()));
    std::fs::create_dir_all(&raw).expect("corpus-raw dir");
    std::fs::write(base.with_extension("stdin"), &stdin).expect("write stdin");
    let env_text: String = env.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    std::fs::write(base.with_extension("env"), env_text).expect("write env");
    let mut child = Command::new(bin("sluice-cni"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run the real sluice-cni");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(&stdin)
        .expect("pass stdin on");
    let out = child.wait_with_output().expect("wait for sluice-cni");
    let code = out.status.code().unwrap_or(1);
    let result = serde_json::json!({
        "exit": code,
        "stdout": String::from_utf8_lossy(&out.stdout),
    });
    std::fs::write(base.with_extension("result"), result.to_string()).expect("write result");
    std::io::stdout().write_all(&out.stdout).expect("answer");
    ExitCode::from(code as u8)
}

fn record(out: &Path) -> ExitCode {
    let runtime = Runtime::current();
    let short = &runtime.version;
    let dest = out.join(format!("containerd-{short}"));
    let _ = std::fs::remove_dir_all(&dest);
    let agent = Agent::start("corpus");
    for (i, cni_version) in runtime.cni_versions().iter().enumerate() {
        let chain = Chain {
            cni_version,
            ..Chain::new(Some(agent.socket_str()), 30 + i as u8)
        };
        let containerd = Containerd::start(&format!("corpus-{i}"), &chain);
        let plugin = containerd.dir.join("cni/bin/sluice-cni");
        std::fs::remove_file(&plugin).expect("unlink sluice-cni");
        std::os::unix::fs::symlink(bin("sluice-corpus"), &plugin).expect("link the recorder");
        let raw = containerd.dir.join("corpus-raw");
        for (shape, annotations) in shapes() {
            let dir = dest.join(format!("cni-{cni_version}")).join(shape);
            std::fs::create_dir_all(&dir).expect("corpus dir");
            let ann: Vec<(&str, &str)> = annotations
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let id = containerd
                .run_pod(shape, &ann)
                .unwrap_or_else(|e| panic!("RunPodSandbox {shape}: {e}"));
            collect(&raw, &dir, 1, "ADD");
            if i == 0 && shape == "istio" {
                // What discovery reads: the runtime's verbose PodSandboxStatus of a running pod.
                let info = containerd.sandbox_info(&id);
                let text = serde_json::to_string_pretty(&info).expect("status JSON");
                std::fs::write(dest.join("sandbox-status.json"), text + "\n")
                    .expect("write sandbox-status.json");
            }
            containerd.stop_pod(&id).expect("StopPodSandbox");
            collect(&raw, &dir, 2, "DEL");
            containerd.remove_pod(&id).expect("RemovePodSandbox");
            collect(&raw, &dir, 3, "DEL");
            println!("recorded {}", dir.display());
        }
    }
    let source = format!(
        "Recorded by `make corpus` (tests/src/bin/sluice-corpus.rs) on {}.\n{} ({})\nReference plugins: {}\nKernel {}.\nConflist: bridge + host-local + sluice-cni with the io.kubernetes.cri.pod-annotations capability; cniVersion per directory.\n",
        chrono_free_date(),
        runtime.describe,
        runtime
            .bin_dir
            .as_ref()
            .map_or("the machine's package".into(), |d| relative(d)),
        relative(&runtime.plugins),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    std::fs::write(dest.join("SOURCE"), source).expect("write SOURCE");
    println!("corpus written to {}", dest.display());
    ExitCode::SUCCESS
}

/// Moves the one call recorded since the last step into `dir` as `<n>-<COMMAND>.*`; panics
/// unless exactly one call of `command` was made.
fn collect(raw: &Path, dir: &Path, n: u32, command: &str) {
    let mut calls: Vec<PathBuf> = std::fs::read_dir(raw)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "stdin"))
                .collect()
        })
        .unwrap_or_default();
    calls.sort();
    assert_eq!(
        calls.len(),
        1,
        "step {n} ({command}) made {} plugin calls: {calls:?}",
        calls.len()
    );
    let base = calls[0].with_extension("");
    let env = std::fs::read_to_string(base.with_extension("env")).expect("env");
    assert!(
        env.lines().any(|l| l == format!("CNI_COMMAND={command}")),
        "step {n}: expected {command}, got {env}"
    );
    for ext in ["stdin", "env", "result"] {
        std::fs::rename(
            base.with_extension(ext),
            dir.join(format!("{n}-{command}.{ext}")),
        )
        .expect("move a recorded call");
    }
}

/// Today's date (UTC) without a date crate: `date -u +%F`.
fn chrono_free_date() -> String {
    Command::new("date")
        .args(["-u", "+%F"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// A path below the working directory (the repository, under `make corpus`) as a relative one.
fn relative(path: &Path) -> String {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| path.strip_prefix(cwd).ok().map(Path::to_path_buf))
        .unwrap_or_else(|| path.to_path_buf())
        .display()
        .to_string()
}
