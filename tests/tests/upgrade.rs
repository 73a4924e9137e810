//! Upgrade: a pod programmed by an earlier release of the agent is recognised by this one
//! without false drift and without being re-programmed. `tests/upgrade/<commit>/` holds, per
//! case, what that release left in the pod's namespace (recorded by `tests/upgrade/record.sh`
//! from binaries built at that commit): the table as the kernel lists it, the namespace's
//! routing state, and the stdin of the ADD.

use std::path::{Path, PathBuf};

use sluice_tests::*;

/// A device listing without the broadcast routes the kernel makes for `lo`'s addresses:
/// sluice never adds a broadcast route, and which ones the kernel makes differs between
/// kernels (5.10 adds `broadcast 127.0.0.0`, 6.x does not), while the recordings come from
/// one kernel.
fn without_kernel_broadcasts(listing: &str) -> String {
    listing
        .lines()
        .filter(|l| !(l.starts_with("broadcast ") && l.contains(" proto kernel ")))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// The same listing `record.sh` makes.
fn device(ns: &Netns) -> String {
    let mut out = String::new();
    for args in [
        &["ip", "-4", "rule", "show"][..],
        &["ip", "-6", "rule", "show"],
        &["ip", "-4", "route", "show", "table", "all"],
        &["ip", "-6", "route", "show", "table", "all"],
        &["ip", "addr", "show", "dev", "lo"],
        &["sysctl", "net.ipv4.ip_local_port_range"],
    ] {
        let o = ns.exec(args);
        assert!(o.status.success(), "{args:?}: {o:?}");
        out += &String::from_utf8_lossy(&o.stdout);
    }
    without_kernel_broadcasts(&out)
}

fn cases() -> Vec<(String, PathBuf)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("upgrade");
    let mut out = Vec::new();
    for release in std::fs::read_dir(&root).expect("tests/upgrade").flatten() {
        if !release.path().is_dir() {
            continue;
        }
        for f in std::fs::read_dir(release.path())
            .expect("release dir")
            .flatten()
        {
            let p = f.path();
            if p.extension().is_some_and(|e| e == "stdin") {
                let name = format!(
                    "{}/{}",
                    release.file_name().to_string_lossy(),
                    p.file_stem().unwrap_or_default().to_string_lossy()
                );
                out.push((name, p.with_extension("")));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn pods_programmed_by_the_previous_release_check_clean_and_stay_as_they_are() {
    require_root();
    let cases = cases();
    assert!(cases.len() >= 3, "recorded cases missing: {cases:?}");
    for (i, (name, base)) in cases.iter().enumerate() {
        let read = |ext: &str| {
            let text = std::fs::read_to_string(base.with_extension(ext))
                .unwrap_or_else(|e| panic!("{name}.{ext}: {e}"));
            if ext == "device" {
                without_kernel_broadcasts(&text)
            } else {
                text
            }
        };
        let id = format!(
            "upgrade-{}",
            base.file_name().unwrap_or_default().to_string_lossy()
        );
        let ns = Netns::new(&format!("sl-upgrade-{i}"));
        // This release's device steps leave exactly what the recorded release left.
        let agent = Agent::start(&format!("upgrade-{i}"));
        let stdin = read("stdin")
            .trim()
            .replace("AGENT_SOCKET", &agent.socket_str());
        let add = cni("ADD", &id, &ns.path(), &stdin);
        assert_eq!(add.exit, 0, "{name}: {add:?}");
        assert_eq!(
            device(&ns),
            read("device"),
            "{name}: device state differs between releases"
        );
        // The table as the recorded release wrote it, then an agent that has never seen the pod.
        let old = read("nft");
        let load = ns.exec(&[
            "sh",
            "-c",
            &format!("nft delete table inet sluice && nft -f - <<'EOF'\n{old}EOF"),
        ]);
        assert!(load.status.success(), "{name}: {load:?}");
        drop(agent);
        let agent = Agent::start(&format!("upgrade-{i}-new"));
        let stdin = read("stdin")
            .trim()
            .replace("AGENT_SOCKET", &agent.socket_str());
        let check = cni("CHECK", &id, &ns.path(), &stdin);
        assert_eq!(
            check.exit, 0,
            "{name}: a pod of the previous release drifted? {check:?}"
        );
        assert_eq!(
            ns.sluice_table().as_deref(),
            Some(old.as_str()),
            "{name}: the table was not re-programmed"
        );
        assert_eq!(device(&ns), read("device"), "{name}: nor the device state");
    }
}
