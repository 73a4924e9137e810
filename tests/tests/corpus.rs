//! Replays the corpus of real runtime input (`tests/corpus`, recorded from containerd by
//! `make corpus`, see `src/bin/sluice-corpus.rs`) through the real `sluice-cni`, in the order
//! the runtime sent it: ADD, CHECK, the first DEL (netns, cached prevResult), the second DEL
//! (no netns, no prevResult). Byte-exact stdin and the runtime's own `CNI_*` environment; only
//! the namespace path and the agent's socket are swapped for this test's.
//!
//! CHECK: containerd never sends CHECK (CRI has no such call). libcni builds a CHECK's stdin
//! exactly as the first DEL's (the cached result as prevResult, the same runtimeConfig), so
//! that stdin is replayed with `CNI_COMMAND=CHECK`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sluice_tests::*;

/// For a recorded pod shape: whether the plugin forwards it to the agent (its annotations ask
/// for sluice or name a mesh) and whether it ends up captured (the agent's decision: a mesh's
/// own gate may leave it alone).
fn expected(shape: &str) -> (bool, bool) {
    match shape {
        "istio" | "linkerd" => (true, true),
        // Istio without its CNI: its injector added istio-init, which captures the pod.
        "istio-init" => (true, false),
        "no-annotations" | "many-annotations" => (false, false),
        other => {
            panic!("unknown pod shape {other:?} in the corpus: say here whether it is captured")
        }
    }
}

/// Where a pod that did not opt in is pointed: an agent that is not there, so any call would
/// fail the ADD.
const NO_AGENT: &str = "/nonexistent/sluice-corpus/agent.sock";

struct Call {
    env: Vec<(String, String)>,
    stdin: Vec<u8>,
    result: serde_json::Value,
}

fn load(dir: &Path, step: &str) -> Call {
    let read = |ext: &str| {
        let p = dir.join(format!("{step}.{ext}"));
        std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    };
    let env = String::from_utf8(read("env"))
        .expect("env is text")
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    Call {
        env,
        stdin: read("stdin"),
        result: serde_json::from_slice(&read("result")).expect("result is JSON"),
    }
}

/// The recorded stdin with its `agentSocket` value (a path of the recording run) swapped,
/// every other byte as recorded.
fn with_socket(stdin: &[u8], socket: &str) -> Vec<u8> {
    let text = std::str::from_utf8(stdin).expect("stdin is UTF-8");
    let conf: serde_json::Value = serde_json::from_str(text).expect("stdin is JSON");
    let old = conf["agentSocket"].as_str().expect("agentSocket recorded");
    let from = format!("\"agentSocket\":{}", serde_json::Value::from(old));
    let to = format!("\"agentSocket\":{}", serde_json::Value::from(socket));
    assert_eq!(text.matches(&from).count(), 1, "{from}");
    text.replacen(&from, &to, 1).into_bytes()
}

struct Run {
    exit: i32,
    stdout: String,
    stderr: String,
}

fn run(call: &Call, command: &str, netns: &str, stdin: &[u8]) -> Run {
    let mut cmd = Command::new(bin("sluice-cni"));
    cmd.env_clear();
    for (k, v) in &call.env {
        let v = match k.as_str() {
            "CNI_COMMAND" => command,
            "CNI_NETNS" if !v.is_empty() => netns,
            "CNI_PATH" => "/usr/lib/cni",
            _ => v,
        };
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sluice-cni");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin)
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait sluice-cni");
    Run {
        exit: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn shapes() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let mut dirs = Vec::new();
    for runtime in std::fs::read_dir(&root).expect("tests/corpus").flatten() {
        for version in std::fs::read_dir(runtime.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if version.path().is_dir() {
                for shape in std::fs::read_dir(version.path())
                    .expect("cni dir")
                    .flatten()
                {
                    dirs.push(shape.path());
                }
            }
        }
    }
    dirs.sort();
    dirs
}

#[test]
fn every_recorded_runtime_call_replays_through_the_real_plugin() {
    require_root();
    let agent = Agent::start("corpus");
    let dirs = shapes();
    assert!(dirs.len() >= 8, "the corpus is missing: {dirs:?}");
    let mut calls = 0;
    for (i, dir) in dirs.iter().enumerate() {
        let shape = dir
            .file_name()
            .and_then(|n| n.to_str())
            .expect("shape name");
        let what = dir
            .strip_prefix(env!("CARGO_MANIFEST_DIR"))
            .unwrap_or(dir)
            .display()
            .to_string();
        let (forwarded, capture) = expected(shape);
        let socket = if forwarded {
            agent.socket_str()
        } else {
            NO_AGENT.to_owned()
        };
        let ns = Netns::new(&format!("sl-corpus-{i}"));
        let (add, del, del2) = (load(dir, "1-ADD"), load(dir, "2-DEL"), load(dir, "3-DEL"));
        assert!(
            del2.env
                .iter()
                .any(|(k, v)| k == "CNI_NETNS" && v.is_empty()),
            "{what}: the second DEL has no netns"
        );
        let id = add
            .env
            .iter()
            .find(|(k, _)| k == "CNI_CONTAINERID")
            .map(|(_, v)| v.clone())
            .expect("CNI_CONTAINERID");

        let r = run(&add, "ADD", &ns.path(), &with_socket(&add.stdin, &socket));
        assert_eq!(r.exit, 0, "{what} ADD: {}{}", r.stdout, r.stderr);
        assert_eq!(
            r.stdout,
            add.result["stdout"].as_str().expect("recorded stdout"),
            "{what} ADD: the answer the runtime got when recorded"
        );
        let prev: serde_json::Value = serde_json::from_slice(&add.stdin).expect("stdin is JSON");
        let answer: serde_json::Value = serde_json::from_str(&r.stdout).expect("ADD answers JSON");
        assert_eq!(
            answer, prev["prevResult"],
            "{what}: prevResult passed through"
        );
        assert_eq!(
            ns.sluice_table().is_some(),
            capture,
            "{what}: captured after ADD"
        );
        if capture {
            let check = agent.ctl(&["check", &id]);
            assert!(check.status.success(), "{what}: {check:?}");
        }

        let r = run(&del, "CHECK", &ns.path(), &with_socket(&del.stdin, &socket));
        assert_eq!(
            (r.exit, r.stdout.as_str()),
            (0, ""),
            "{what} CHECK: {}",
            r.stderr
        );

        let r = run(&del, "DEL", &ns.path(), &with_socket(&del.stdin, &socket));
        assert_eq!(
            (r.exit, r.stdout.as_str()),
            (0, ""),
            "{what} DEL: {}",
            r.stderr
        );
        assert!(
            ns.sluice_table().is_none(),
            "{what}: nothing left after DEL"
        );
        let r = run(&del2, "DEL", &ns.path(), &with_socket(&del2.stdin, &socket));
        assert_eq!(
            (r.exit, r.stdout.as_str()),
            (0, ""),
            "{what} second DEL: {}",
            r.stderr
        );
        for (call, step) in [(&del, "first DEL"), (&del2, "second DEL")] {
            assert_eq!(call.result["exit"], 0, "{what} {step} as recorded");
        }
        calls += 4;
    }
    let list = String::from_utf8_lossy(&agent.ctl(&["list"]).stdout).into_owned();
    assert_eq!(list.lines().count(), 1, "no attachment left: {list}");
    let _ = std::io::stderr().write_all(
        format!(
            "corpus: {} recorded pod shapes, {calls} plugin calls replayed\n",
            dirs.len()
        )
        .as_bytes(),
    );
}
