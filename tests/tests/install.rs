//! Node install against real files: `sluice-agent install` / `uninstall` on temp CNI dirs
//! holding realistic primary configs (tests/cni-configs), and the long-running agent's
//! `--install` watch re-chaining after the primary CNI rewrites its file.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sluice_tests::*;

struct Dirs {
    root: PathBuf,
}

impl Dirs {
    fn new(test: &str, configs: &[&str]) -> Self {
        let root =
            std::env::temp_dir().join(format!("sluice-install-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("bin")).expect("bin dir");
        std::fs::create_dir_all(root.join("net.d")).expect("conf dir");
        for name in configs {
            std::fs::copy(data(name), root.join("net.d").join(name)).expect("copy config");
        }
        Dirs { root }
    }
    fn bin(&self) -> PathBuf {
        self.root.join("bin")
    }
    fn conf(&self) -> PathBuf {
        self.root.join("net.d")
    }
    fn args(&self) -> Vec<String> {
        vec![
            "--cni-bin-dir".into(),
            self.bin().display().to_string(),
            "--cni-conf-dir".into(),
            self.conf().display().to_string(),
            "--socket".into(),
            "/run/sluice/agent.sock".into(),
        ]
    }
    /// `sluice-agent <cmd> <dirs> <extra>`.
    fn run(&self, cmd: &str, extra: &[&str]) -> std::process::Output {
        Command::new(bin("sluice-agent"))
            .arg(cmd)
            .args(self.args())
            .args(extra)
            .output()
            .expect("run sluice-agent")
    }
    fn listing(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(self.conf())
            .expect("conf dir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

impl Drop for Dirs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("cni-configs")
        .join(name)
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).expect("read config")).expect("valid JSON")
}

fn ours(conf: &serde_json::Value) -> Vec<&serde_json::Value> {
    conf["plugins"]
        .as_array()
        .expect("plugins")
        .iter()
        .filter(|p| p["type"] == "sluice-cni")
        .collect()
}

fn ok(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn install_chains_into_a_conflist_idempotently_and_uninstall_restores_it_byte_for_byte() {
    for primary in ["10-bridge.conflist", "10-calico.conflist"] {
        let d = Dirs::new(&primary.replace('.', "-"), &[primary]);
        let original = std::fs::read(d.conf().join(primary)).expect("original");
        ok(&d.run("install", &[]));
        let plugin = d.bin().join("sluice-cni");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&plugin)
            .expect("plugin")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755, "{primary}");
        assert_eq!(
            std::fs::read(&plugin).expect("plugin"),
            std::fs::read(bin("sluice-cni")).expect("built plugin")
        );
        let conf = json(&d.conf().join(primary));
        let entry = ours(&conf);
        assert_eq!(entry.len(), 1, "{primary}: {conf}");
        assert_eq!(
            conf["plugins"].as_array().and_then(|p| p.last()),
            Some(entry[0]),
            "appended last"
        );
        assert_eq!(
            entry[0]["capabilities"]["io.kubernetes.cri.pod-annotations"],
            true
        );
        assert_eq!(entry[0]["agentSocket"], "/run/sluice/agent.sock");
        // The plugin's own default, from the one place deadlines are set.
        assert_eq!(
            entry[0]["timeoutMs"].as_u64(),
            Some(sluice_proto::deadlines::PLUGIN_TIMEOUT.as_millis() as u64)
        );
        // The other plugins are untouched.
        let before: serde_json::Value = serde_json::from_slice(&original).expect("json");
        assert_eq!(
            conf["plugins"].as_array().map(|p| p.len() - 1),
            before["plugins"].as_array().map(Vec::len)
        );

        let after_first = std::fs::read(d.conf().join(primary)).expect("after");
        let listing = d.listing();
        let out = d.run("install", &[]);
        ok(&out);
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("binary unchanged, config unchanged"),
            "{out:?}"
        );
        assert_eq!(
            std::fs::read(d.conf().join(primary)).expect("again"),
            after_first
        );
        assert_eq!(d.listing(), listing, "no stray temp files");

        ok(&d.run("uninstall", &[]));
        assert_eq!(
            std::fs::read(d.conf().join(primary)).expect("restored"),
            original,
            "{primary}: byte-identical after uninstall"
        );
        assert_eq!(d.listing(), vec![primary.to_owned()], "backups removed");
        assert!(!plugin.exists(), "binary removed");
    }
}

#[test]
fn a_conf_becomes_a_conflist_and_uninstall_brings_the_conf_back() {
    let d = Dirs::new("conf", &["05-cilium.conf", "10-calico.conflist"]);
    let cilium = std::fs::read(d.conf().join("05-cilium.conf")).expect("cilium");
    let calico = std::fs::read(d.conf().join("10-calico.conflist")).expect("calico");
    ok(&d.run("install", &[]));
    // 05-cilium sorts first: it is the primary, converted; calico is not touched.
    assert!(!d.conf().join("05-cilium.conf").exists());
    let conf = json(&d.conf().join("05-cilium.conflist"));
    assert_eq!(conf["name"], "cilium");
    assert_eq!(conf["cniVersion"], "0.3.1");
    assert_eq!(conf["plugins"][0]["type"], "cilium-cni");
    assert_eq!(
        conf["plugins"][0]["log-file"],
        "/var/run/cilium/cilium-cni.log"
    );
    assert_eq!(ours(&conf).len(), 1);
    assert_eq!(
        std::fs::read(d.conf().join("10-calico.conflist")).expect("calico"),
        calico
    );
    ok(&d.run("uninstall", &[]));
    assert_eq!(
        std::fs::read(d.conf().join("05-cilium.conf")).expect("cilium back"),
        cilium
    );
    assert_eq!(
        d.listing(),
        vec!["05-cilium.conf".to_owned(), "10-calico.conflist".to_owned()]
    );
}

#[test]
fn invalid_json_is_a_clear_error_and_the_file_is_untouched() {
    let d = Dirs::new("invalid", &[]);
    let broken = b"{\"cniVersion\": \"1.0.0\", \"name\": \"x\", \"plugins\": [ {\"type\": ";
    std::fs::write(d.conf().join("10-broken.conflist"), broken).expect("write");
    let out = d.run("install", &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("10-broken.conflist") && err.contains("not valid CNI JSON"),
        "{err}"
    );
    assert_eq!(
        std::fs::read(d.conf().join("10-broken.conflist")).expect("still there"),
        broken
    );
    assert_eq!(d.listing(), vec!["10-broken.conflist".to_owned()]);

    let empty = Dirs::new("empty", &[]);
    let out = empty.run("install", &[]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no CNI network config"),
        "{out:?}"
    );
}

#[test]
fn own_copy_mode_leaves_the_primary_alone() {
    let d = Dirs::new("own", &["10-calico.conflist"]);
    let calico = std::fs::read(d.conf().join("10-calico.conflist")).expect("calico");
    ok(&d.run("install", &["--chain-mode", "own-copy"]));
    assert_eq!(
        std::fs::read(d.conf().join("10-calico.conflist")).expect("calico"),
        calico
    );
    let own = json(&d.conf().join("00-sluice.conflist"));
    assert_eq!(own["name"], "k8s-pod-network");
    assert_eq!(own["plugins"][0]["type"], "calico");
    assert_eq!(ours(&own).len(), 1);
    ok(&d.run("install", &["--chain-mode", "own-copy"]));
    assert_eq!(ours(&json(&d.conf().join("00-sluice.conflist"))).len(), 1);
    ok(&d.run("uninstall", &[]));
    assert_eq!(d.listing(), vec!["10-calico.conflist".to_owned()]);
}

/// The primary CNI rewriting its config on restart (Calico, Cilium do) drops our entry; the
/// agent's watch puts it back, exactly once.
#[test]
fn the_agent_re_chains_after_the_primary_cni_rewrites_its_config() {
    require_root();
    let d = Dirs::new("watch", &["10-calico.conflist"]);
    let calico = std::fs::read(d.conf().join("10-calico.conflist")).expect("calico");
    let mut args: Vec<String> = vec!["--install".into()];
    args.extend(
        d.args()
            .into_iter()
            .filter(|a| a != "--socket" && a != "/run/sluice/agent.sock"),
    );
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut agent = Agent::start_with("watch", &arg_refs);
    let path = d.conf().join("10-calico.conflist");
    let chained = |n: usize| {
        std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|c| ours(&c).len() == n)
    };
    wait_for("the initial chain", Duration::from_secs(10), || chained(1));
    // The watch's passes as the agent logs them: what each wrote.
    let passes = |agent: &Agent| -> Vec<String> {
        std::fs::read_to_string(&agent.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("install watch pass"))
            .map(str::to_owned)
            .collect()
    };
    for _ in 0..3 {
        let before = passes(&agent).len();
        // What calico-node does on restart: write its own config again, atomically.
        let tmp = d.conf().join(".calico.tmp");
        std::fs::write(&tmp, &calico).expect("rewrite");
        std::fs::rename(&tmp, &path).expect("rename");
        // The pass that re-chains writes the file, which is itself a change the watch sees:
        // the pass after it must find the entry there and write nothing. That pass having run
        // is what shows there is no second insert (not a wait of some length).
        wait_for(
            "a watch pass that writes nothing after re-chaining",
            Duration::from_secs(10),
            || {
                let after = &passes(&agent)[before..];
                after
                    .iter()
                    .position(|l| !l.contains("written=nothing"))
                    .is_some_and(|wrote| {
                        after[wrote + 1..]
                            .iter()
                            .any(|l| l.contains("written=nothing"))
                    })
            },
        );
        assert!(chained(1), "never inserted twice: {:?}", passes(&agent));
    }
    // Passes come from changes, not from the passes' own reads of the dir: at most the first
    // pass's echo, then per rewrite one pass that re-chains, its echo, and one for the
    // rewrite's temporary file. (Counting reads made every pass start the next, 20 a second,
    // for as long as the agent ran.)
    let n = passes(&agent).len();
    assert!(
        n <= 10,
        "{n} passes for three rewrites: {:#?}",
        passes(&agent)
    );
    assert!(d.bin().join("sluice-cni").exists());
    // Default SIGTERM keeps the install (rolling upgrades).
    agent.stop();
    assert!(chained(1), "the install survives an agent stop");
    assert!(d.bin().join("sluice-cni").exists());

    // With --uninstall-on-exit the primary is restored byte-for-byte.
    let mut with_exit = arg_refs.clone();
    with_exit.push("--uninstall-on-exit");
    let mut agent = Agent::start_with("watch-exit", &with_exit);
    wait_for("chain", Duration::from_secs(10), || chained(1));
    agent.stop();
    assert_eq!(std::fs::read(&path).expect("restored"), calico);
    assert!(!d.bin().join("sluice-cni").exists());
}
