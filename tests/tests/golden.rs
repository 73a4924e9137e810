//! Golden tests of the rendered `nft` text, and proof that the text is what the kernel holds:
//! after a real ADD, `nft list table inet sluice` prints exactly the golden listing, and
//! loading the golden script with `nft -f` yields the same listing again.
//!
//! Regenerate with `UPDATE_GOLDEN=1 cargo test -p sluice-tests --test golden` and review the diff.

use std::collections::BTreeMap;
use std::path::PathBuf;

use sluice::model::plan::{Decision, Families, PlanDefaults, decide};
use sluice::model::ruleset::{Attached, Owner, Ruleset};
use sluice_tests::*;

const CONTAINER: &str = "golden";

/// Pod addresses of a case, as prevResult gives them.
const V4: &[&str] = &[POD_CIDR4];
const DUAL: &[&str] = &[POD_CIDR4, POD_CIDR6];

type Case = (
    &'static str,
    &'static [&'static str],
    &'static [(&'static str, &'static str)],
);

const CASES: &[Case] = &[
    ("default", V4, &[]),
    (
        "exclusions",
        V4,
        &[
            ("sluice.dev/exclude-outbound-ports", "9090,9091"),
            (
                "sluice.dev/exclude-outbound-cidrs",
                "10.0.0.0/8, 192.168.0.0/16",
            ),
            ("sluice.dev/exclude-inbound-ports", "15020,15021,8081"),
        ],
    ),
    (
        "include-lists",
        V4,
        &[
            ("sluice.dev/include-inbound-ports", "80,443"),
            (
                "sluice.dev/include-outbound-cidrs",
                "10.96.0.0/12,172.16.0.0/12",
            ),
        ],
    ),
    (
        "custom-proxy",
        V4,
        &[
            ("sluice.dev/outbound-port", "4140"),
            ("sluice.dev/inbound-port", "4143"),
            ("sluice.dev/proxy-uid", "2102"),
            ("sluice.dev/proxy-gid", "2102"),
            ("sluice.dev/exclude-inbound-ports", "4190,4191"),
        ],
    ),
    (
        "no-inbound",
        V4,
        &[("sluice.dev/include-inbound-ports", "")],
    ),
    (
        "dns-capture",
        V4,
        &[
            ("sluice.dev/dns-capture", "enabled"),
            ("sluice.dev/exclude-interfaces", "eth1"),
        ],
    ),
    (
        "istio-profile",
        V4,
        &[
            ("sidecar.istio.io/status", "{}"),
            ("traffic.sidecar.istio.io/excludeInterfaces", "eth1"),
            ("traffic.sidecar.istio.io/includeOutboundPorts", "3306"),
        ],
    ),
    (
        "linkerd-profile",
        V4,
        &[
            ("linkerd.io/proxy-version", "stable-2.14.10"),
            ("config.linkerd.io/skip-subnets", "10.98.0.0/16"),
            ("config.linkerd.io/skip-outbound-ports", "4567-4568"),
        ],
    ),
    ("tproxy", V4, &[("sluice.dev/mode", "tproxy")]),
    (
        "dual-stack",
        DUAL,
        &[
            (
                "sluice.dev/exclude-outbound-cidrs",
                "10.0.0.0/8,fd00:98::/64",
            ),
            ("sluice.dev/include-inbound-ports", "80,443"),
            ("sluice.dev/dns-capture", "enabled"),
        ],
    ),
    (
        "istio-tproxy-dual",
        DUAL,
        &[
            ("sidecar.istio.io/status", "{}"),
            ("sidecar.istio.io/interceptionMode", "TPROXY"),
        ],
    ),
    (
        "kuma-profile",
        DUAL,
        &[
            ("kuma.io/sidecar-injected", "true"),
            (
                "traffic.kuma.io/transparent-proxy-config",
                "kumaDPUser: \"5678\"\nipFamilyMode: dualstack\nredirect:\n  inbound:\n    port: 15006\n    excludePorts: [9001]\n    excludePortsForIPs: [\"10.98.0.1,fd00:98::1\"]\n  outbound:\n    port: 15001\n    excludePorts: [3306]\n    excludePortsForIPs: [\"10.98.0.0/16\"]\n    excludePortsForUIDs: [\"tcp:2-3:1000\", \"udp:1001\"]\n  dns:\n    enabled: true\n    port: 15053\n    captureAll: true\ncniMode: true\n",
            ),
        ],
    ),
    (
        "consul-profile",
        V4,
        &[
            ("consul.hashicorp.com/connect-inject-status", "injected"),
            ("consul.hashicorp.com/transparent-proxy-status", "enabled"),
            (
                "consul.hashicorp.com/redirect-traffic-config",
                r#"{"ConsulDNSIP":"","ConsulDNSPort":8600,"ProxyUserID":"5995","ProxyInboundPort":20000,"ProxyOutboundPort":15001,"ExcludeInboundPorts":["20200"],"ExcludeOutboundPorts":["3306"],"ExcludeOutboundCIDRs":["10.98.0.0/16"],"ExcludeUIDs":["5996"],"NetNS":"","IptablesProvider":null}"#,
            ),
        ],
    ),
    (
        "consul-dual",
        DUAL,
        &[
            ("consul.hashicorp.com/connect-inject-status", "injected"),
            ("consul.hashicorp.com/transparent-proxy-status", "enabled"),
            ("consul.hashicorp.com/dual-stack", "true"),
            (
                "consul.hashicorp.com/redirect-traffic-config",
                r#"{"ConsulDNSIP":"10.96.0.10","ConsulDNSPort":0,"ProxyUserID":"5995","ProxyInboundPort":20000,"ProxyOutboundPort":15001,"ExcludeInboundPorts":null,"ExcludeOutboundPorts":null,"ExcludeOutboundCIDRs":null,"ExcludeUIDs":["5996"],"NetNS":"","IptablesProvider":null}"#,
            ),
        ],
    ),
];

fn annotations(extra: &[(&'static str, &'static str)]) -> Vec<(&'static str, &'static str)> {
    let mut all = vec![("sluice.dev/redirect", "enabled")];
    all.extend_from_slice(extra);
    all
}

fn render(ips: &[&str], extra: &[(&'static str, &'static str)]) -> String {
    let map: BTreeMap<String, String> = annotations(extra)
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let Ok(Decision::Capture { plan, .. }) = decide(&map, &addrs(ips), &PlanDefaults::default())
    else {
        panic!("golden cases all capture");
    };
    // The owner matches what `cni()` sends for container "golden" (K8S_POD_UID=uid-golden,
    // CNI_IFNAME=eth0, network example-net, these addresses); its attach time is 0 here and
    // masked in the kernel's listing (see `untimed`).
    let mut owner = Owner::new(&plan.fingerprint(), &format!("uid-{CONTAINER}"), CONTAINER).on(
        Attached::new("eth0", "example-net", Families::present(&addrs(ips))),
    );
    // A fresh pod's `lo` has no `::6`: the agent adds it, and its owner says so.
    owner.lo_address = sluice::kernel::device::DeviceSetup::from_plan(&plan).lo_address6;
    Ruleset::from_plan(&plan, owner).to_nft_script()
}

fn addrs(ips: &[&str]) -> Vec<std::net::IpAddr> {
    ips.iter()
        .map(|c| {
            c.split('/')
                .next()
                .and_then(|a| a.parse().ok())
                .expect("address")
        })
        .collect()
}

fn golden_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("golden")
        .join(format!("{name}.nft"))
}

/// The listing part of a script (what `nft list table` prints).
fn listing(script: &str) -> String {
    script.lines().skip(2).map(|l| format!("{l}\n")).collect()
}

#[test]
fn rendered_text_matches_the_golden_files() {
    let update = std::env::var("UPDATE_GOLDEN").is_ok_and(|v| v == "1");
    // CI checks the goldens; it never rewrites them (a rewrite would pass whatever changed).
    assert!(
        !(update && std::env::var("CI").is_ok_and(|v| v == "true")),
        "UPDATE_GOLDEN=1 rewrites the goldens: not under CI=true"
    );
    for (name, ips, extra) in CASES {
        let text = render(ips, extra);
        let path = golden_path(name);
        if update {
            std::fs::write(&path, &text).expect("write golden");
            continue;
        }
        let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (run with UPDATE_GOLDEN=1 to create it)",
                path.display()
            )
        });
        assert_eq!(text, want, "case {name} differs from {}", path.display());
    }
}

#[test]
fn the_kernel_holds_exactly_the_golden_text() {
    require_root();
    let agent = Agent::start("golden");
    for (name, ips, extra) in CASES {
        let golden = std::fs::read_to_string(golden_path(name)).expect("golden file");

        let via_agent = Netns::new(&format!("sl-gold-{name}"));
        let stdin = conf(
            "1.0.0",
            &agent.socket_str(),
            &annotations(extra),
            Some(&prev_result_with("1.0.0", ips)),
        );
        let run = cni("ADD", CONTAINER, &via_agent.path(), &stdin);
        assert_eq!(run.exit, 0, "{name}: {run:?}");
        assert_eq!(
            via_agent.sluice_table().as_deref().map(untimed),
            Some(listing(&golden)),
            "{name}: agent"
        );

        let via_nft = Netns::new(&format!("sl-goldf-{name}"));
        let script =
            std::env::temp_dir().join(format!("sluice-golden-{name}-{}.nft", std::process::id()));
        std::fs::write(&script, &golden).expect("script");
        let out = via_nft.exec(&["nft", "-f", script.to_str().expect("utf8")]);
        let _ = std::fs::remove_file(&script);
        assert!(
            out.status.success(),
            "{name}: nft -f: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            via_nft.sluice_table().as_deref(),
            Some(listing(&golden).as_str()),
            "{name}: nft -f"
        );
    }
}

/// When the kernel refuses one message of a batch, the error names that message (which rule of
/// which chain) and the kernel applies none of the batch. The refused rule jumps to a chain that
/// does not exist, which every kernel rejects with ENOENT.
#[test]
fn a_refused_rule_is_named_and_nothing_is_applied() {
    use sluice::model::ruleset::{Base, Chain, Hook, Kind, Match, PRIORITY_DSTNAT, Rule, Verdict};
    require_root();
    let ns = Netns::new("sl-gold-refused");
    let rs = Ruleset {
        owner: Owner::new("fp", "uid", CONTAINER),
        chains: vec![Chain {
            name: "output",
            base: Some(Base {
                kind: Kind::Nat,
                hook: Hook::Output,
                priority: PRIORITY_DSTNAT,
            }),
            rules: vec![
                Rule {
                    matches: vec![Match::SkUid(sluice::model::ruleset::Op::Eq, 1337)],
                    verdict: Verdict::Return,
                },
                Rule {
                    matches: vec![],
                    verdict: Verdict::Jump("no-such-chain"),
                },
            ],
        }],
    };
    let err = ns
        .run(move || {
            sluice::kernel::nft::create(&rs)
                .map(drop)
                .map_err(|e| e.to_string())
        })
        .expect_err("the kernel refuses a jump to a missing chain");
    assert!(
        err.contains("rule 2 of chain output") && err.contains("no-such-chain"),
        "{err}"
    );
    assert!(ns.sluice_table().is_none(), "nothing applied: {err}");
}

/// The agent's start-up probe, run here directly: on every kernel of the matrix every required
/// feature works, TPROXY too, and whether batch-end is acknowledged is a definite answer. The
/// probe's line is printed, so each kernel's log says what it found.
#[test]
fn the_kernel_probe_finds_every_required_feature() {
    require_root();
    let features = sluice::kernel::probe::run().expect("the probe runs");
    println!("probe: {features:?}");
    features.required().expect("required features");
    assert_eq!(features.tproxy, Ok(()), "{features:?}");
    assert!(features.batch_end_ack.is_ok(), "{features:?}");
}
