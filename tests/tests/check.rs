//! Check verifies everything an ADD programs — the table, `lo`, the `::6` address, TPROXY's
//! policy rule and route, the sysctls — in REDIRECT, TPROXY and dual-stack: no drift on a
//! fresh pod, drift naming the damage for each kind made by hand, and a re-ADD repairs it.

use sluice_tests::*;

struct Damage {
    what: &'static str,
    /// Commands run in the pod's netns.
    commands: &'static [&'static [&'static str]],
    /// A piece of the drift line Check must print.
    expect: &'static str,
}

const SYSCTL: (&str, &str) = (
    "sluice.dev/sysctls",
    "net.ipv4.ip_local_port_range=20000 30000",
);

fn pod_ips_dual() -> String {
    r#"{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"x"}],"ips":[{"address":"10.99.0.2/24","interface":0},{"address":"fd00::2/64","interface":0}]}"#.to_owned()
}

fn run_case(
    name: &str,
    annotations: &[(&str, &str)],
    prev: &str,
    damages: &[Damage],
) -> Vec<String> {
    let agent = Agent::start(&format!("check-{name}"));
    let ns = Netns::new(&format!("sl-chk-{name}"));
    let stdin = conf("1.0.0", &agent.socket_str(), annotations, Some(prev));
    let add = cni("ADD", name, &ns.path(), &stdin);
    assert_eq!(add.exit, 0, "{name}: {add:?}");
    let check = |label: &str| -> (bool, String) {
        let out = agent.ctl(&["check", name]);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let _ = label;
        (out.status.success(), text)
    };
    let (ok, text) = check("fresh");
    assert!(ok, "{name}: a fresh pod has no drift:\n{text}");
    let mut seen = Vec::new();
    for d in damages {
        for cmd in d.commands {
            let out = ns.exec(cmd);
            assert!(out.status.success(), "{name}/{}: {cmd:?}: {out:?}", d.what);
        }
        let (ok, text) = check(d.what);
        assert!(!ok, "{name}: {} is drift, Check said ok:\n{text}", d.what);
        assert!(
            text.contains(d.expect),
            "{name}: {}: expected {:?} in:\n{text}",
            d.what,
            d.expect
        );
        let run = cni("CHECK", name, &ns.path(), &stdin);
        assert_eq!(run.error_code(), 100, "{name}/{}: {run:?}", d.what);
        let again = cni("ADD", name, &ns.path(), &stdin);
        assert_eq!(again.exit, 0, "{name}/{}: re-ADD: {again:?}", d.what);
        let (ok, text) = check("repaired");
        assert!(ok, "{name}: after {} and a re-ADD:\n{text}", d.what);
        seen.push(format!("{name}: {}", d.what));
    }
    seen
}

#[test]
fn check_sees_every_kind_of_damage_and_never_false_drift() {
    require_root();
    let mut seen = Vec::new();
    seen.extend(run_case(
        "redirect",
        &[("sluice.dev/redirect", "enabled"), SYSCTL],
        &prev_result("1.0.0"),
        &[
            Damage {
                what: "a rule added",
                commands: &[&[
                    "nft", "insert", "rule", "inet", "sluice", "outbound", "accept",
                ]],
                expect: "chain outbound has",
            },
            Damage {
                what: "a sysctl changed",
                commands: &[&["sysctl", "-qw", "net.ipv4.ip_local_port_range=32768 60999"]],
                expect: "sysctl net.ipv4.ip_local_port_range is \"32768 60999\"",
            },
            Damage {
                what: "lo down",
                commands: &[&["ip", "link", "set", "lo", "down"]],
                expect: "lo is down",
            },
        ],
    ));
    seen.extend(run_case(
        "tproxy",
        &[
            ("sluice.dev/redirect", "enabled"),
            ("sluice.dev/mode", "tproxy"),
        ],
        &prev_result("1.0.0"),
        &[
            Damage {
                what: "the policy rule deleted",
                commands: &[&["ip", "rule", "del", "fwmark", "1337", "lookup", "133"]],
                expect: "ip rule fwmark 1337 lookup 133 is missing",
            },
            Damage {
                what: "the local route deleted",
                commands: &[&[
                    "ip", "route", "del", "local", "default", "dev", "lo", "table", "133",
                ]],
                expect: "ip route local default dev lo table 133 is missing",
            },
            Damage {
                what: "the table deleted",
                commands: &[&["nft", "delete", "table", "inet", "sluice"]],
                expect: "table inet sluice is missing",
            },
        ],
    ));
    seen.extend(run_case(
        "dual",
        &[
            ("sluice.dev/redirect", "enabled"),
            ("sluice.dev/mode", "tproxy"),
        ],
        &pod_ips_dual(),
        &[
            Damage {
                what: "the ::6 address deleted",
                commands: &[&["ip", "-6", "addr", "del", "::6/128", "dev", "lo"]],
                expect: "address ::6/128 on lo is missing",
            },
            Damage {
                what: "the IPv6 policy rule deleted",
                commands: &[&["ip", "-6", "rule", "del", "fwmark", "1337", "lookup", "133"]],
                expect: "ip -6 rule fwmark 1337 lookup 133 is missing",
            },
            Damage {
                what: "the IPv6 local route deleted",
                commands: &[&[
                    "ip", "-6", "route", "del", "local", "::/0", "dev", "lo", "table", "133",
                ]],
                expect: "ip -6 route local default dev lo table 133 is missing",
            },
            Damage {
                what: "a foreign sluice rule added",
                commands: &[&[
                    "ip", "rule", "add", "fwmark", "7", "lookup", "77", "proto", "83",
                ]],
                expect: "unexpected sluice rule: fwmark 7 lookup 77",
            },
        ],
    ));
    eprintln!("check: {} kinds of damage seen and repaired", seen.len());
}

/// A repair of a capture that is there never removes it, even when the pod's table was written
/// under another fingerprint (an earlier release) and a repair step fails: the table stays,
/// what could be added is added, and the failure is reported for the next pass to retry.
#[test]
fn a_failed_repair_of_an_existing_capture_removes_nothing() {
    use sluice::kernel::capture::{Act, Want, reconcile};
    use sluice::model::plan::{Families, PlanDefaults};
    use sluice::model::ruleset::Attached;

    require_root();
    let agent = Agent::start_with(
        "check-repair",
        &["--allow-unsafe-sysctl", "net.ipv4.conf.eth0.route_localnet"],
    );
    let topo = Topology::new("chkrep");
    let ann = [
        ("sluice.dev/redirect", "enabled"),
        ("sluice.dev/mode", "tproxy"),
        ("sluice.dev/sysctls", "net.ipv4.conf.eth0.route_localnet=1"),
    ];
    let stdin = conf(
        "1.0.0",
        &agent.socket_str(),
        &ann,
        Some(&prev_result("1.0.0")),
    );
    assert_eq!(cni("ADD", "chkrep", &topo.pod.path(), &stdin).exit, 0);
    // As an earlier release would have labelled it: another fingerprint, same rules.
    let table = topo.pod.sluice_table().expect("captured");
    let old = table.replacen(" fp=", " fp=0ld", 1);
    let reload = topo.pod.exec(&[
        "sh",
        "-c",
        &format!("nft delete table inet sluice && nft -f - <<'EOF'\n{old}EOF"),
    ]);
    assert!(reload.status.success(), "{reload:?}");
    // Damage, and a repair that cannot complete: the sysctl's interface is gone.
    topo.pod
        .ip(&["rule", "del", "fwmark", "1337", "lookup", "133"]);
    topo.pod.ip(&["link", "del", "eth0"]);

    let want = Want {
        annotations: ann
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        defaults: PlanDefaults {
            allowed_unsafe_sysctls: vec!["net.ipv4.conf.eth0.route_localnet".into()],
            ..PlanDefaults::default()
        },
        pod_uid: "uid-chkrep".into(),
        container_id: "chkrep".into(),
    };
    let fallback = [Attached::new("eth0", "", Families::IPV4)];
    let result = topo
        .pod
        .run(move || reconcile(&want, &fallback, Act::Repair, 1).map_err(|e| e.to_string()))
        .expect("reconcile ran");
    assert!(!result.drift.is_empty());
    let repaired = result.repaired.expect("a repair was tried");
    assert!(
        repaired
            .as_ref()
            .is_err_and(|e| e.contains("route_localnet")),
        "{repaired:?}"
    );
    assert!(
        topo.pod.sluice_table().is_some(),
        "the failed repair left the table in place"
    );
    assert!(
        topo.pod
            .ip(&["rule", "show"])
            .contains("fwmark 0x539 lookup 133"),
        "and added what it could"
    );
}
