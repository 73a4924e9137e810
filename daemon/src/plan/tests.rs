use std::collections::BTreeMap;

use super::*;

fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn plan(pairs: &[(&str, &str)]) -> RedirectPlan {
    let mut all = vec![("sluice.dev/redirect", "enabled")];
    all.extend_from_slice(pairs);
    match decide(&ann(&all), &PlanDefaults::default()) {
        Ok(Decision::Capture { plan, profile }) => {
            assert_eq!(profile, Profile::Native);
            plan
        }
        other => panic!("expected a capture plan, got {other:?}"),
    }
}

fn error(pairs: &[(&str, &str)]) -> PlanError {
    decide(&ann(pairs), &PlanDefaults::default()).expect_err("expected an invalid annotation")
}

#[test]
fn no_annotation_or_disabled_skips() {
    assert!(matches!(
        decide(&ann(&[]), &PlanDefaults::default()),
        Ok(Decision::Skip { .. })
    ));
    assert!(matches!(
        decide(
            &ann(&[
                ("sluice.dev/redirect", "disabled"),
                ("sluice.dev/outbound-port", "bad")
            ]),
            &PlanDefaults::default()
        ),
        Ok(Decision::Skip { .. })
    ));
}

#[test]
fn defaults_mirror_istio() {
    let p = plan(&[]);
    assert_eq!(
        (p.outbound_port, p.inbound_port, p.proxy_uid, p.proxy_gid),
        (15001, 15006, 1337, 1337)
    );
    assert_eq!(p.include_inbound_ports, Ports::All);
    assert_eq!(p.exclude_inbound_ports, vec![15008, 15020, 15021, 15090]);
    assert_eq!(p.exclude_outbound_ports, Vec::<u16>::new());
    assert_eq!(p.include_outbound_cidrs, Cidrs::All);
    assert!(p.exclude_outbound_cidrs.is_empty());
}

#[test]
fn every_annotation_is_honoured() {
    let p = plan(&[
        ("sluice.dev/outbound-port", "4140"),
        ("sluice.dev/inbound-port", "4143"),
        ("sluice.dev/proxy-uid", "2102"),
        ("sluice.dev/proxy-gid", "2103"),
        ("sluice.dev/include-inbound-ports", "80, 443"),
        ("sluice.dev/exclude-inbound-ports", "4190,4191"),
        ("sluice.dev/exclude-outbound-ports", "9090"),
        ("sluice.dev/include-outbound-cidrs", "10.0.0.0/8"),
        (
            "sluice.dev/exclude-outbound-cidrs",
            "10.1.2.3/16,192.168.1.1",
        ),
    ]);
    assert_eq!(
        (p.outbound_port, p.inbound_port, p.proxy_uid, p.proxy_gid),
        (4140, 4143, 2102, 2103)
    );
    assert_eq!(p.include_inbound_ports, Ports::Only(vec![80, 443]));
    assert_eq!(p.exclude_inbound_ports, vec![4190, 4191]);
    assert_eq!(p.exclude_outbound_ports, vec![9090]);
    assert_eq!(
        p.include_outbound_cidrs,
        Cidrs::Only(vec!["10.0.0.0/8".parse().expect("net")])
    );
    // Host bits are cleared; a bare address is a /32.
    assert_eq!(
        p.exclude_outbound_cidrs,
        vec![
            "10.1.0.0/16".parse().expect("net"),
            "192.168.1.1/32".parse().expect("net")
        ]
    );
}

#[test]
fn empty_and_star_lists_mean_none_and_all() {
    assert_eq!(
        plan(&[("sluice.dev/include-inbound-ports", "")]).include_inbound_ports,
        Ports::Only(vec![])
    );
    assert_eq!(
        plan(&[("sluice.dev/include-inbound-ports", "*")]).include_inbound_ports,
        Ports::All
    );
    assert_eq!(
        plan(&[("sluice.dev/exclude-inbound-ports", "")]).exclude_inbound_ports,
        Vec::<u16>::new()
    );
    assert_eq!(
        plan(&[("sluice.dev/include-outbound-cidrs", "")]).include_outbound_cidrs,
        Cidrs::Only(vec![])
    );
}

#[test]
fn invalid_values_name_the_annotation_and_value() {
    let cases: &[(&str, &str)] = &[
        ("sluice.dev/redirect", "yes"),
        ("sluice.dev/outbound-port", "0"),
        ("sluice.dev/inbound-port", "65536"),
        ("sluice.dev/proxy-uid", "-1"),
        ("sluice.dev/proxy-gid", "root"),
        ("sluice.dev/exclude-inbound-ports", "80,,90"),
        ("sluice.dev/exclude-outbound-ports", "80,"),
        ("sluice.dev/include-inbound-ports", "http"),
        ("sluice.dev/include-outbound-cidrs", "10.0.0.0/33"),
        ("sluice.dev/exclude-outbound-cidrs", "not-a-cidr"),
        ("sluice.dev/exclude-outbound-port", "80"),
    ];
    for (key, value) in cases {
        let mut pairs = vec![(*key, *value)];
        if *key != "sluice.dev/redirect" {
            pairs.push(("sluice.dev/redirect", "enabled"));
        }
        let e = error(&pairs);
        assert_eq!((e.annotation.as_str(), e.value.as_str()), (*key, *value));
        let msg = e.to_string();
        assert!(msg.contains(key) && msg.contains(value), "{msg}");
    }
}

#[test]
fn other_annotations_are_ignored_and_fingerprints_are_stable() {
    let a = plan(&[("example.com/x", "1")]);
    let b = plan(&[]);
    assert_eq!(a, b);
    assert_eq!(a.fingerprint(), b.fingerprint());
    assert_ne!(
        a.fingerprint(),
        plan(&[("sluice.dev/outbound-port", "15002")]).fingerprint()
    );
    assert_eq!(a.fingerprint().len(), 16);
}
