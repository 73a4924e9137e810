//! Operators debug a pod with the node's own `nft`: every kind of table sluice writes must list
//! cleanly with the nft of the distributions it supports — Debian 12's 1.0.6 (the host's) and
//! Debian 11's 0.9.8 (the bullseye `nftables` package with its own libraries, unpacked under
//! target/ through tests/apt/suite.sh, never installed). A listing that errors, crashes or
//! loses a chain fails.

use std::path::PathBuf;
use std::process::Command;

use sluice_tests::*;

/// Debian 11's nft, unpacked with its libnftables and libnftnl; (binary, library dir).
fn bullseye_nft() -> (PathBuf, PathBuf) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/nft-bullseye");
    let nft = root.join("usr/sbin/nft");
    if !nft.exists() {
        let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let debs = root.join("debs");
        let suite = "bullseye+bullseye-security";
        for args in [
            vec![suite, "update"],
            vec![
                suite,
                "download",
                debs.to_str().expect("utf8"),
                "nftables",
                "libnftables1",
                "libnftnl11",
            ],
        ] {
            let out = Command::new("bash")
                .arg(repo.join("tests/apt/suite.sh"))
                .args(&args)
                .output()
                .expect("tests/apt/suite.sh");
            assert!(out.status.success(), "{args:?}: {out:?}");
        }
        for deb in std::fs::read_dir(&debs).expect("debs").flatten() {
            let out = Command::new("dpkg-deb")
                .arg("-x")
                .arg(deb.path())
                .arg(&root)
                .output()
                .expect("dpkg-deb");
            assert!(out.status.success(), "{out:?}");
        }
    }
    (nft, root.join("usr/lib/x86_64-linux-gnu"))
}

/// A kind of table: its name, the pod's addresses, its annotations.
type Kind = (
    &'static str,
    &'static [&'static str],
    &'static [(&'static str, &'static str)],
);

#[test]
fn every_kind_of_table_lists_with_debian_11s_and_debian_12s_nft() {
    require_root();
    let (old_nft, old_libs) = bullseye_nft();
    let version = Command::new(&old_nft)
        .arg("--version")
        .env("LD_LIBRARY_PATH", &old_libs)
        .output()
        .expect("nft --version");
    let version = String::from_utf8_lossy(&version.stdout).into_owned();
    assert!(version.contains("v0.9.8"), "{version}");
    let agent = Agent::start("nfttools");
    let kinds: [Kind; 5] = [
        (
            "redirect",
            &[POD_CIDR4],
            &[("sluice.dev/redirect", "enabled")],
        ),
        (
            "tproxy",
            &[POD_CIDR4],
            &[
                ("sluice.dev/redirect", "enabled"),
                ("sluice.dev/mode", "tproxy"),
            ],
        ),
        (
            "dual",
            &[POD_CIDR4, POD_CIDR6],
            &[
                ("sidecar.istio.io/status", "{}"),
                ("sidecar.istio.io/interceptionMode", "TPROXY"),
            ],
        ),
        (
            "dns",
            &[POD_CIDR4, POD_CIDR6],
            &[
                ("sluice.dev/redirect", "enabled"),
                ("sluice.dev/dns-capture", "enabled"),
                (
                    "sluice.dev/exclude-outbound-cidrs",
                    "10.0.0.0/8,fd00:98::/64",
                ),
            ],
        ),
        (
            "linkerd",
            &[POD_CIDR4],
            &[
                ("linkerd.io/proxy-version", "stable-2.14.10"),
                ("config.linkerd.io/skip-outbound-ports", "3306,4567-4569"),
                ("config.linkerd.io/skip-subnets", "10.98.0.0/16"),
            ],
        ),
    ];
    for (name, ips, annotations) in kinds {
        let ns = Netns::new(&format!("sl-nfttool-{name}"));
        let stdin = conf(
            "1.0.0",
            &agent.socket_str(),
            annotations,
            Some(&prev_result_with("1.0.0", ips)),
        );
        let add = cni("ADD", &format!("nfttool-{name}"), &ns.path(), &stdin);
        assert_eq!(add.exit, 0, "{name}: {add:?}");
        let current = ns.sluice_table().expect("the host's nft lists it");
        let old = ns.exec(&[
            "env",
            &format!("LD_LIBRARY_PATH={}", old_libs.display()),
            old_nft.to_str().expect("utf8"),
            "list",
            "table",
            "inet",
            "sluice",
        ]);
        let listing = String::from_utf8_lossy(&old.stdout).into_owned();
        assert!(
            old.status.success() && old.stderr.is_empty(),
            "{name}: nft 0.9.8: {old:?}"
        );
        for chain in chains(&current) {
            assert!(
                listing.contains(&format!("chain {chain} {{")),
                "{name}: nft 0.9.8 lost chain {chain}:\n{listing}"
            );
        }
        assert!(
            listing.contains("comment \"sluice/v2 fp="),
            "{name}: the owner reads with nft 0.9.8:\n{listing}"
        );
        assert_eq!(
            listing.lines().filter(|l| l.trim().is_empty()).count(),
            current.lines().filter(|l| l.trim().is_empty()).count(),
            "{name}: as many chains"
        );
        eprintln!(
            "nft tools: {name}: {} lines with nft 1.0.6, {} with nft 0.9.8",
            current.lines().count(),
            listing.lines().count()
        );
    }
}
