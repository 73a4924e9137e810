//! `sluice-cni` as shipped (`make plugin-static`): a static executable that runs on any Linux
//! host, whatever its libc. Proved in an empty root holding only the binary — no libraries,
//! no loader, no `/etc` — where a dynamically linked build cannot even start.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sluice_tests::*;

fn static_plugin() -> PathBuf {
    // Test binaries run from target/<profile>/deps; the static build is under target/<triple>.
    let target = std::env::current_exe()
        .expect("test path")
        .ancestors()
        .nth(3)
        .expect("target dir")
        .join("x86_64-unknown-linux-gnu/release/sluice-cni");
    assert!(
        target.exists(),
        "{} is missing: `make plugin-static` builds it (`make test` does)",
        target.display()
    );
    target
}

/// Runs `/sluice-cni` chrooted into `root` with only the given environment.
fn run_in(root: &Path, env: &[(&str, &str)], stdin: &str) -> (i32, String, String) {
    let mut child = Command::new("/usr/sbin/chroot")
        .arg(root)
        .arg("/sluice-cni")
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chroot (coreutils)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

struct Root(PathBuf);

impl Drop for Root {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg(self.0.join("run/sluice"))
            .status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn the_static_plugin_runs_in_an_empty_root() {
    require_root();
    let plugin = static_plugin();
    let root = Root(std::env::temp_dir().join(format!("sluice-static-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&root.0);
    std::fs::create_dir_all(root.0.join("run/sluice")).expect("root");
    std::fs::copy(&plugin, root.0.join("sluice-cni")).expect("copy the plugin");

    // A dynamically linked build cannot start there: the root is really empty.
    std::fs::copy(bin("sluice-cni"), root.0.join("dynamic")).expect("copy");
    let dynamic = Command::new("/usr/sbin/chroot")
        .arg(&root.0)
        .arg("/dynamic")
        .env_clear()
        .env("CNI_COMMAND", "VERSION")
        .output()
        .expect("chroot");
    assert!(!dynamic.status.success(), "{dynamic:?}");
    std::fs::remove_file(root.0.join("dynamic")).expect("rm");

    let (code, out, err) = run_in(&root.0, &[("CNI_COMMAND", "VERSION")], "");
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("\"supportedVersions\""), "{out}");

    let env = |netns: &str, id: &str| -> Vec<(String, String)> {
        [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", id),
            ("CNI_NETNS", netns),
            ("CNI_IFNAME", "eth0"),
            ("CNI_PATH", "/opt/cni/bin"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    };
    let prev = prev_result("1.0.0");
    let plain = conf("1.0.0", "/run/sluice/agent.sock", &[], Some(&prev));
    let e = env("/var/run/netns/none", "static-plain");
    let e: Vec<(&str, &str)> = e.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (code, out, err) = run_in(&root.0, &e, &plain);
    assert_eq!((code, out.as_str()), (0, prev.as_str()), "{err}");

    // An annotated ADD reaches the agent through the socket bind-mounted into the root.
    let agent = Agent::start("static");
    let ns = Netns::new("sl-static");
    let mounted = Command::new("mount")
        .args(["--bind"])
        .arg(&agent.dir)
        .arg(root.0.join("run/sluice"))
        .status()
        .expect("mount");
    assert!(mounted.success());
    let stdin = conf(
        "1.0.0",
        "/run/sluice/agent.sock",
        &[("sluice.dev/redirect", "enabled")],
        Some(&prev),
    );
    let e = env(&ns.path(), "static-annotated");
    let e: Vec<(&str, &str)> = e.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let (code, out, err) = run_in(&root.0, &e, &stdin);
    assert_eq!((code, out.as_str()), (0, prev.as_str()), "{err}");
    assert!(
        ns.sluice_table().is_some(),
        "captured through the chrooted plugin"
    );
}
