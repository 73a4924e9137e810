use std::collections::BTreeMap;

use super::*;

/// A pod with one IPv4 address: plans capture IPv4 only.
const POD_V4: &[IpAddr] = &[IpAddr::V4(Ipv4Addr::new(10, 99, 0, 2))];

fn decide4(ann: &BTreeMap<String, String>, defaults: &PlanDefaults) -> Result<Decision, PlanError> {
    decide(ann, POD_V4, defaults)
}

fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn plan(pairs: &[(&str, &str)]) -> RedirectPlan {
    let mut all = vec![("sluice.dev/redirect", "enabled")];
    all.extend_from_slice(pairs);
    match decide4(&ann(&all), &PlanDefaults::default()) {
        Ok(Decision::Capture { plan, profile, .. }) => {
            assert_eq!(profile, Profile::Native);
            plan
        }
        other => panic!("expected a capture plan, got {other:?}"),
    }
}

fn error(pairs: &[(&str, &str)]) -> PlanError {
    decide4(&ann(pairs), &PlanDefaults::default()).expect_err("expected an invalid annotation")
}

#[test]
fn no_annotation_or_disabled_skips() {
    assert!(matches!(
        decide4(&ann(&[]), &PlanDefaults::default()),
        Ok(Decision::Skip { .. })
    ));
    assert!(matches!(
        decide4(
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
        (15001, 15006, 1337, Some(1337))
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
        (4140, 4143, 2102, Some(2103))
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

fn decide_with(pairs: &[(&str, &str)], defaults: &PlanDefaults) -> Decision {
    decide4(&ann(pairs), defaults).expect("valid annotations")
}

const ISTIO: (&str, &str) = (
    "sidecar.istio.io/status",
    r#"{"initContainers":null,"containers":["istio-proxy"]}"#,
);
const LINKERD: (&str, &str) = ("linkerd.io/proxy-version", "stable-2.14.10");

#[test]
fn istio_pods_get_istio_cni_defaults() {
    let Decision::Capture {
        plan: p, profile, ..
    } = decide_with(&[ISTIO], &PlanDefaults::default())
    else {
        panic!("istio pod is captured")
    };
    assert_eq!(profile, Profile::Istio);
    assert_eq!(p.exclude_inbound_ports, vec![15008, 15020, 15021, 15090]);
    assert_eq!(p.exclude_outbound_ports, vec![15020]);
    assert_eq!(
        (p.outbound_port, p.inbound_port, p.proxy_uid, p.proxy_gid),
        (15001, 15006, 1337, Some(1337))
    );
}

/// istio-cni's own gate, read from what the injector recorded: a pod whose injector added
/// `istio-init` (Istio installed without its CNI) captures itself and is left alone; a pod is
/// captured when `istio-proxy` is a container or a native sidecar (`initContainers`).
#[test]
fn istio_pods_are_captured_only_where_istio_cni_would_capture_them() {
    let status = |v: &'static str| ("sidecar.istio.io/status", v);
    let captured = |v: &'static str| {
        matches!(
            decide_with(&[status(v)], &PlanDefaults::default()),
            Decision::Capture {
                profile: Profile::Istio,
                ..
            }
        )
    };
    let skipped = |v: &'static str| match decide_with(&[status(v)], &PlanDefaults::default()) {
        Decision::Skip { reason } => reason,
        other => panic!("{v}: expected a skip, got {other:?}"),
    };
    // Istio without its CNI: istio-init does the capture.
    let reason = skipped(
        r#"{"initContainers":["istio-init"],"containers":["istio-proxy"],"volumes":["istio-envoy"],"imagePullSecrets":null,"revision":"default"}"#,
    );
    assert!(reason.contains("istio-init"), "{reason}");
    // Native sidecar with istio-init too: still istio-init's.
    skipped(r#"{"initContainers":["istio-init","istio-proxy"],"containers":null}"#);
    // CNI mode: istio-validation (the CNI's check), the proxy a container or a native sidecar.
    assert!(captured(
        r#"{"initContainers":["istio-validation"],"containers":["istio-proxy"],"revision":"default"}"#
    ));
    assert!(captured(
        r#"{"initContainers":["istio-validation","istio-proxy"],"containers":null}"#
    ));
    assert!(captured(
        r#"{"initContainers":null,"containers":["istio-proxy"]}"#
    ));
    // Injected without a proxy (a custom template): istio-cni leaves it alone.
    let reason = skipped(r#"{"initContainers":null,"containers":["app-helper"]}"#);
    assert!(reason.contains("istio-proxy"), "{reason}");
    // No lists at all (not written by any injector): taken as a sidecar pod.
    assert!(captured("{}"));
    // A status that cannot be read is an invalid annotation, naming it.
    for bad in [
        "not json",
        "[]",
        r#"{"containers":"istio-proxy"}"#,
        r#"{"initContainers":[1]}"#,
    ] {
        let e =
            decide4(&ann(&[status(bad)]), &PlanDefaults::default()).expect_err("invalid status");
        assert_eq!(e.annotation, "sidecar.istio.io/status", "{bad}: {e}");
    }
}

#[test]
fn istio_annotations_keep_istios_meaning() {
    let Decision::Capture { plan: p, .. } = decide_with(
        &[
            ISTIO,
            ("traffic.sidecar.istio.io/excludeInboundPorts", "8081"),
            ("traffic.sidecar.istio.io/excludeOutboundPorts", "5555,6666"),
            (
                "traffic.sidecar.istio.io/includeOutboundIPRanges",
                "127.0.0.0/8",
            ),
            (
                "traffic.sidecar.istio.io/excludeOutboundIPRanges",
                "10.0.0.0/8",
            ),
            ("traffic.sidecar.istio.io/includeOutboundPorts", "3306"),
            ("traffic.sidecar.istio.io/excludeInterfaces", "eth1"),
            ("traffic.sidecar.istio.io/includeInboundPorts", ""),
        ],
        &PlanDefaults::default(),
    ) else {
        panic!("captured")
    };
    // Tunnel first, the pod's exclusions, then the proxy ports istio-cni always appends.
    assert_eq!(
        p.exclude_inbound_ports,
        vec![15008, 8081, 15020, 15021, 15090]
    );
    // excludeOutboundPorts replaces the 15020 default.
    assert_eq!(p.exclude_outbound_ports, vec![5555, 6666]);
    assert_eq!(
        p.include_outbound_cidrs,
        Cidrs::Only(vec!["127.0.0.0/8".parse().expect("net")])
    );
    assert_eq!(p.include_inbound_ports, Ports::Only(vec![]));
    assert_eq!(p.include_outbound_ports, vec![3306]);
    assert_eq!(p.exclude_interfaces, vec!["eth1".to_owned()]);
}

#[test]
fn istio_interception_modes() {
    assert!(matches!(
        decide_with(
            &[ISTIO, ("sidecar.istio.io/interceptionMode", "NONE")],
            &PlanDefaults::default()
        ),
        Decision::Skip { .. }
    ));
    let e = error(&[ISTIO, ("sidecar.istio.io/interceptionMode", "BOGUS")]);
    assert_eq!(e.annotation, "sidecar.istio.io/interceptionMode");
}

#[test]
fn linkerd_pods_get_proxy_init_defaults_and_skip_annotations() {
    let Decision::Capture {
        plan: p, profile, ..
    } = decide_with(
        &[
            LINKERD,
            ("config.linkerd.io/skip-outbound-ports", "3306,4567-4569"),
            ("config.linkerd.io/skip-inbound-ports", "8081"),
            ("config.linkerd.io/skip-subnets", "10.98.0.0/16"),
            ("config.linkerd.io/proxy-uid", "2103"),
        ],
        &PlanDefaults::default(),
    )
    else {
        panic!("linkerd pod is captured")
    };
    assert_eq!(profile, Profile::Linkerd);
    assert_eq!(
        (p.outbound_port, p.inbound_port, p.proxy_uid, p.proxy_gid),
        (4140, 4143, 2103, None)
    );
    assert_eq!(p.loopback, Loopback::IgnoreAll);
    assert_eq!(p.exclude_inbound_ports, vec![4190, 4191, 8081]);
    assert_eq!(p.exclude_outbound_ports, vec![3306, 4567, 4568, 4569]);
    assert_eq!(
        p.exclude_inbound_sources,
        vec!["10.98.0.0/16".parse().expect("net")]
    );
    assert_eq!(
        error(&[LINKERD, ("config.linkerd.io/skip-outbound-ports", "9-1")]).annotation,
        "config.linkerd.io/skip-outbound-ports"
    );
}

#[test]
fn native_overrides_on_mesh_pods_need_the_nodes_consent_and_disabled_profiles_skip() {
    // By default a mesh's capture is the mesh's: an author's `sluice.dev/proxy-uid: 0` must
    // not exempt every root process from Istio's proxy. Listed as ignored, nothing applied,
    // not even validated.
    let pod = [
        ISTIO,
        ("sluice.dev/outbound-port", "15111"),
        ("sluice.dev/proxy-uid", "0"),
        ("sluice.dev/mode", "bogus"),
    ];
    let Decision::Capture {
        plan: p,
        profile,
        ignored,
    } = decide_with(&pod, &PlanDefaults::default())
    else {
        panic!("captured")
    };
    assert_eq!(
        (profile, p.outbound_port, p.proxy_uid),
        (Profile::Istio, 15001, 1337)
    );
    assert_eq!(
        ignored,
        [
            "sluice.dev/mode",
            "sluice.dev/outbound-port",
            "sluice.dev/proxy-uid"
        ]
    );
    // With the node's consent, native annotations win over the profile's.
    let consent = PlanDefaults {
        native_overrides_on_mesh_pods: true,
        ..PlanDefaults::default()
    };
    let Decision::Capture {
        plan: p,
        profile,
        ignored,
    } = decide_with(&pod[..2], &consent)
    else {
        panic!("captured")
    };
    assert_eq!(
        (profile, p.outbound_port, p.exclude_outbound_ports.clone()),
        (Profile::Istio, 15111, vec![15020])
    );
    assert!(ignored.is_empty());
    assert_eq!(
        decide4(&ann(&pod), &consent)
            .expect_err("validated once applied")
            .annotation,
        "sluice.dev/mode"
    );
    assert!(matches!(
        decide_with(
            &[ISTIO, ("sluice.dev/redirect", "disabled")],
            &PlanDefaults::default()
        ),
        Decision::Skip { .. }
    ));
    let no_istio = PlanDefaults {
        istio: false,
        ..PlanDefaults::default()
    };
    match decide_with(&[ISTIO], &no_istio) {
        Decision::Skip { reason } => {
            assert!(reason.contains("istio profile is disabled"), "{reason}")
        }
        other => panic!("expected skip, got {other:?}"),
    }
    let no_linkerd = PlanDefaults {
        linkerd: false,
        ..PlanDefaults::default()
    };
    assert!(matches!(
        decide_with(&[LINKERD], &no_linkerd),
        Decision::Skip { .. }
    ));
}

#[test]
fn dns_capture_is_off_by_default_and_switchable_with_a_port() {
    assert_eq!(plan(&[]).dns_port, None);
    assert_eq!(
        plan(&[("sluice.dev/dns-capture", "enabled")]).dns_port,
        Some(15053)
    );
    assert_eq!(
        plan(&[
            ("sluice.dev/dns-capture", "enabled"),
            ("sluice.dev/dns-port", "5300")
        ])
        .dns_port,
        Some(5300)
    );
    assert_eq!(
        plan(&[
            ("sluice.dev/dns-capture", "disabled"),
            ("sluice.dev/dns-port", "5300")
        ])
        .dns_port,
        None
    );
    assert_eq!(
        error(&[
            ("sluice.dev/redirect", "enabled"),
            ("sluice.dev/dns-capture", "on")
        ])
        .annotation,
        "sluice.dev/dns-capture"
    );
    assert_eq!(
        error(&[
            ("sluice.dev/redirect", "enabled"),
            ("sluice.dev/exclude-interfaces", "a/b")
        ])
        .annotation,
        "sluice.dev/exclude-interfaces"
    );
}

#[test]
fn sysctls_are_allow_listed_and_normalised() {
    let value = " net.ipv4.ip_local_port_range = 20000-30000 ,net.ipv4.conf.all.route_localnet=1";
    // Kubernetes calls route_localnet unsafe: refused without the node's consent, naming the
    // sysctl and the setting that would allow it.
    let e = error(&[
        ("sluice.dev/redirect", "enabled"),
        ("sluice.dev/sysctls", value),
    ]);
    assert_eq!(e.annotation, "sluice.dev/sysctls");
    assert!(
        e.reason.contains("net.ipv4.conf.all.route_localnet")
            && e.reason.contains("allowed-unsafe-sysctls"),
        "{e}"
    );
    let consent = PlanDefaults {
        allowed_unsafe_sysctls: vec!["net.ipv4.conf.all.route_localnet".into()],
        ..PlanDefaults::default()
    };
    let Ok(Decision::Capture { plan: p, .. }) = decide4(
        &ann(&[
            ("sluice.dev/redirect", "enabled"),
            ("sluice.dev/sysctls", value),
        ]),
        &consent,
    ) else {
        panic!("allowed by the node")
    };
    // Every sysctl on Kubernetes' safe list is accepted without consent.
    for (name, _, safety) in SYSCTL_ALLOW_LIST {
        let v = if name.ends_with("range") { "1 2" } else { "1" };
        let r = decide4(
            &ann(&[
                ("sluice.dev/redirect", "enabled"),
                ("sluice.dev/sysctls", &format!("{name}={v}")),
            ]),
            &PlanDefaults::default(),
        );
        assert_eq!(r.is_ok(), *safety == Safety::Safe, "{name}: {r:?}");
    }
    assert_eq!(
        p.sysctls,
        vec![
            (
                "net.ipv4.ip_local_port_range".to_owned(),
                "20000 30000".to_owned()
            ),
            (
                "net.ipv4.conf.all.route_localnet".to_owned(),
                "1".to_owned()
            ),
        ]
    );
    for bad in [
        "kernel.pid_max=1",
        "net.ipv4.ip_forward=1",
        "net.ipv4.conf.all.route_localnet=2",
        "net.ipv4.ip_local_port_range=3 2",
        "novalue",
    ] {
        let e = decide4(
            &ann(&[
                ("sluice.dev/redirect", "enabled"),
                ("sluice.dev/sysctls", bad),
            ]),
            &consent,
        )
        .expect_err(bad);
        assert_eq!(e.annotation, "sluice.dev/sysctls", "{bad}");
    }
}

#[test]
fn families_follow_pod_ips_unless_forced() {
    let on = ann(&[("sluice.dev/redirect", "enabled")]);
    let fams = |ips: &[IpAddr], a: &BTreeMap<String, String>| match decide(
        a,
        ips,
        &PlanDefaults::default(),
    ) {
        Ok(Decision::Capture { plan, .. }) => plan.families,
        other => panic!("{other:?}"),
    };
    let v6: IpAddr = "fd00::2".parse().expect("v6");
    assert_eq!(fams(POD_V4, &on), Families::IPV4);
    assert_eq!(fams(&[v6], &on), Families::IPV6);
    assert_eq!(fams(&[POD_V4[0], v6], &on), Families::DUAL);
    assert_eq!(
        fams(&[], &on),
        Families::DUAL,
        "unknown addresses: capture both"
    );
    let mut forced = on.clone();
    forced.insert("sluice.dev/ip-families".into(), "dual".into());
    assert_eq!(fams(POD_V4, &forced), Families::DUAL);
    forced.insert("sluice.dev/ip-families".into(), "ipv5".into());
    assert!(decide(&forced, POD_V4, &PlanDefaults::default()).is_err());
}

#[test]
fn tproxy_mode_native_and_istio() {
    assert_eq!(
        plan(&[("sluice.dev/mode", "tproxy")]).mode,
        CaptureMode::Tproxy {
            mark: 1337,
            table: 133
        }
    );
    assert_eq!(
        plan(&[
            ("sluice.dev/mode", "tproxy"),
            ("sluice.dev/tproxy-mark", "0x100"),
            ("sluice.dev/tproxy-table", "200"),
        ])
        .mode,
        CaptureMode::Tproxy {
            mark: 256,
            table: 200
        }
    );
    for (k, v) in [
        ("sluice.dev/mode", "tprox"),
        ("sluice.dev/tproxy-mark", "0"),
        ("sluice.dev/tproxy-table", "254"),
    ] {
        let e = error(&[
            ("sluice.dev/redirect", "enabled"),
            (
                "sluice.dev/mode",
                if k == "sluice.dev/mode" { v } else { "tproxy" },
            ),
            (k, v),
        ]);
        assert_eq!(e.annotation, k, "{e}");
    }
    let e = error(&[
        ("sluice.dev/redirect", "enabled"),
        ("sluice.dev/tproxy-mark", "7"),
    ]);
    assert!(e.reason.contains("mode: tproxy"), "{e}");
    let Ok(Decision::Capture { plan, profile, .. }) = decide4(
        &ann(&[
            ("sidecar.istio.io/status", "{}"),
            ("sidecar.istio.io/interceptionMode", "TPROXY"),
        ]),
        &PlanDefaults::default(),
    ) else {
        panic!("istio TPROXY captures");
    };
    assert_eq!(profile, Profile::Istio);
    assert_eq!(
        plan.mode,
        CaptureMode::Tproxy {
            mark: 1337,
            table: 133
        }
    );
    assert_eq!(plan.exclude_inbound_ports, vec![15020, 15021, 15090]);
}

/// `a-b,c-d,...`: `n` ranges of 256 ports each, from port 1.
fn port_ranges(n: u16) -> String {
    (0..n)
        .map(|i| format!("{}-{}", i * 256 + 1, i * 256 + 256))
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn a_list_longer_than_the_bound_is_refused_naming_its_annotation() {
    // 1,280 ports after expanding the ranges.
    let e = error(&[
        LINKERD,
        ("config.linkerd.io/skip-outbound-ports", &port_ranges(5)),
    ]);
    assert_eq!(e.annotation, "config.linkerd.io/skip-outbound-ports");
    assert!(e.reason.contains("more than the 1024 ports"), "{e}");
    // A raw list that long is refused before its items are parsed; the error quotes a bounded
    // excerpt of the value, not all of it.
    let ports = (1..=2000)
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let e = error(&[
        ("sluice.dev/redirect", "enabled"),
        ("sluice.dev/exclude-outbound-ports", &ports),
    ]);
    assert_eq!(e.annotation, "sluice.dev/exclude-outbound-ports");
    assert!(e.to_string().len() < 400, "{e}");
    // At the bound it is accepted.
    let ok = ann(&[
        LINKERD,
        ("config.linkerd.io/skip-outbound-ports", &port_ranges(4)),
    ]);
    assert!(matches!(
        decide4(&ok, &PlanDefaults::default()),
        Ok(Decision::Capture { .. })
    ));
}

#[test]
fn too_many_rules_names_the_largest_list() {
    let a = ann(&[
        LINKERD,
        ("config.linkerd.io/skip-outbound-ports", "1-10"),
        ("config.linkerd.io/skip-inbound-ports", &port_ranges(4)),
    ]);
    let e = too_many_rules(&a, 5000);
    assert_eq!(e.annotation, "config.linkerd.io/skip-inbound-ports");
    assert!(e.reason.contains("5000 rules"), "{e}");
}

#[test]
fn repeated_items_are_dropped_and_overlapping_ranges_expand_once() {
    let p = plan(&[("sluice.dev/exclude-outbound-ports", "80,8080,80, 80")]);
    assert_eq!(p.exclude_outbound_ports, vec![80, 8080]);
    // 1-256 four times over is 256 ports, within the bound.
    let a = ann(&[
        LINKERD,
        (
            "config.linkerd.io/skip-outbound-ports",
            "1-256,1-256,200-256,1-256",
        ),
    ]);
    match decide4(&a, &PlanDefaults::default()) {
        Ok(Decision::Capture { plan, .. }) => {
            assert_eq!(plan.exclude_outbound_ports, (1..=256).collect::<Vec<u16>>());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_over_long_value_is_refused_before_parsing_with_a_bounded_excerpt() {
    // 2,000 x 1-65535 once overflowed HTTP/2's header limits when echoed whole; now it is
    // refused for its item count, and 3,000 for its length, each with a bounded excerpt.
    let e = error(&[
        LINKERD,
        (
            "config.linkerd.io/skip-outbound-ports",
            &vec!["1-65535"; 2000].join(","),
        ),
    ]);
    assert!(e.reason.contains("2000 items"), "{e}");
    assert!(e.to_string().len() < 400, "{}", e.to_string().len());
    let huge = vec!["1-65535"; 3000].join(",");
    let e = error(&[LINKERD, ("config.linkerd.io/skip-outbound-ports", &huge)]);
    assert_eq!(e.annotation, "config.linkerd.io/skip-outbound-ports");
    assert!(e.reason.contains("longer than the 16384"), "{e}");
    assert!(e.to_string().len() < 400, "{}", e.to_string().len());
    // Below the length bound the first bad item is named, still with a bounded excerpt.
    let big = vec!["1-65535"; 1000].join(",");
    let e = error(&[LINKERD, ("config.linkerd.io/skip-outbound-ports", &big)]);
    assert!(e.reason.contains("not a range of at most 256"), "{e}");
    assert!(e.to_string().len() < 400, "{}", e.to_string().len());
}

/// Arbitrary annotation maps through the planner: never a panic; a capture plan always fits
/// the rule bound, and an error always names an annotation the map holds, with a bounded
/// message. Values mix valid tokens, near-misses and noise, so most maps reach deep parsing.
#[test]
fn arbitrary_annotation_maps_plan_or_name_the_bad_annotation() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    use std::cell::Cell;
    let keys: Vec<String> = all_annotation_keys()
        .into_iter()
        .map(str::to_owned)
        .chain(["sluice.dev/unknown".to_owned(), "example.com/x".to_owned()])
        .collect();
    let token = prop_oneof![
        prop::sample::select(vec![
            "enabled",
            "disabled",
            "*",
            "",
            "80",
            "15001",
            "0",
            "65536",
            "1-256",
            "9-1",
            "1-65535",
            "10.0.0.0/8",
            "::/0",
            "fd00::1",
            "10.0.0.0/33",
            "eth1",
            "lo",
            "tproxy",
            "redirect",
            "TPROXY",
            "REDIRECT",
            "NONE",
            "ipv4",
            "ipv6",
            "dual",
            "0x539",
            "1337",
            "net.ipv4.ip_unprivileged_port_start=0",
            "kernel.panic=1",
            "{}",
            "stable-2.14",
        ])
        .prop_map(str::to_owned),
        ".{0,8}",
    ];
    let value = prop::collection::vec(token, 0..6).prop_map(|t| t.join(","));
    // Most maps carry an opt-in, so most cases reach the profile parsers.
    let trigger = prop::option::weighted(
        0.8,
        prop::sample::select(vec![
            ("sluice.dev/redirect", "enabled"),
            ("sidecar.istio.io/status", "{}"),
            ("linkerd.io/proxy-version", "stable-2.14.10"),
        ]),
    );
    let map = (
        prop::collection::btree_map(prop::sample::select(keys), value, 0..8),
        trigger,
    )
        .prop_map(|(mut m, t)| {
            if let Some((k, v)) = t {
                m.entry(k.to_owned()).or_insert_with(|| v.to_owned());
            }
            m
        });
    let ips = prop::sample::subsequence(
        vec![
            IpAddr::V4(Ipv4Addr::new(10, 99, 0, 2)),
            IpAddr::V6(Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, 2)),
        ],
        0..=2,
    );
    let mut runner = TestRunner::new(Config {
        cases: 3000,
        failure_persistence: None,
        ..Config::default()
    });
    let (planned, refused, skipped) = (Cell::new(0), Cell::new(0), Cell::new(0));
    runner
        .run(&(map, ips), |(ann, ips)| {
            match decide(&ann, &ips, &PlanDefaults::default()) {
                Ok(Decision::Capture { plan, .. }) => {
                    planned.set(planned.get() + 1);
                    let rules = crate::model::ruleset::Ruleset::from_plan(
                        &plan,
                        crate::model::ruleset::Owner::new("fp", "", ""),
                    )
                    .rule_count();
                    // Lists within their bounds can still sum past MAX_RULES: the service
                    // refuses those (too_many_rules), which must then name a present key.
                    if rules > MAX_RULES {
                        let e = too_many_rules(&ann, rules);
                        prop_assert!(ann.contains_key(&e.annotation), "{e}");
                    }
                }
                Ok(Decision::Skip { .. }) => skipped.set(skipped.get() + 1),
                Err(e) => {
                    refused.set(refused.get() + 1);
                    prop_assert!(ann.contains_key(&e.annotation), "unknown key in {e}");
                    prop_assert!(e.to_string().len() < 1024, "unbounded: {e}");
                }
            }
            Ok(())
        })
        .expect("property");
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!(
            "proptest: planner, arbitrary annotation maps: {} cases ({} planned, {} skipped, {} refused)\n",
            planned.get() + skipped.get() + refused.get(),
            planned.get(),
            skipped.get(),
            refused.get()
        )
        .as_bytes(),
    );
}

/// The fingerprint is a hash of the canonical text, which is written field by field: its form
/// for the default plan is pinned here, and the fingerprints of a few plans are pinned too, so
/// a change to either (which would make every live pod look re-planned after an upgrade) fails
/// this test instead of shipping.
#[test]
fn fingerprints_come_from_a_canonical_versioned_text() {
    assert_eq!(
        plan(&[]).canonical(),
        "sluice-plan/2\nmode=redirect\nfamilies=ipv4\noutbound_port=15001\ninbound_port=15006\n\
         proxy_uid=1337\nproxy_gid=1337\nexclude_inbound_ports=15008,15020,15021,15090\n\
         loopback=istio tunnel_port=15008 source=127.0.0.6 source6=::6\n"
    );
    let pinned = [
        (plan(&[]), "c5741236454798db"),
        (plan(&[("sluice.dev/mode", "tproxy")]), "fbd2df945932d81d"),
        (
            plan(&[
                ("sluice.dev/exclude-outbound-cidrs", "10.0.0.0/8"),
                (
                    "sluice.dev/sysctls",
                    "net.ipv4.ip_local_port_range=20000 30000",
                ),
            ]),
            "cec95f6fe7d5463e",
        ),
    ];
    let got: Vec<String> = pinned.iter().map(|(p, _)| p.fingerprint()).collect();
    let want: Vec<&str> = pinned.iter().map(|(_, fp)| *fp).collect();
    assert_eq!(got, want);
    // A field at its base value is left out: a plan with a DNS port differs only by that line.
    let with_dns = RedirectPlan {
        dns_port: Some(15053),
        ..plan(&[])
    };
    assert_eq!(
        with_dns.canonical(),
        plan(&[])
            .canonical()
            .replace("loopback=", "dns_port=15053\nloopback=")
    );
}

const KUMA_INJECTED: (&str, &str) = ("kuma.io/sidecar-injected", "true");
const KUMA_CONFIG: &str = "traffic.kuma.io/transparent-proxy-config";

fn kuma(config: &str, ips: &[IpAddr]) -> Result<Decision, PlanError> {
    decide(
        &ann(&[KUMA_INJECTED, (KUMA_CONFIG, config)]),
        ips,
        &PlanDefaults::default(),
    )
}

fn kuma_plan(config: &str) -> RedirectPlan {
    match kuma(config, POD_V4).expect("valid config") {
        Decision::Capture {
            plan,
            profile: Profile::Kuma,
            ..
        } => plan,
        other => panic!("{config}: expected a Kuma capture, got {other:?}"),
    }
}

/// The configuration is loaded on top of Kuma's defaults, field by field.
#[test]
fn kuma_pods_get_kumas_defaults_and_their_own_fields() {
    let p = kuma_plan("cniMode: true\n");
    assert_eq!(
        (p.outbound_port, p.inbound_port, p.proxy_uid, p.proxy_gid),
        (15001, 15006, 5678, None)
    );
    assert_eq!(p.dns_port, None);
    assert_eq!(p.loopback, Loopback::kuma());
    let p = kuma_plan(
        "kumaDPUser: \"5679\"\nredirect:\n  inbound:\n    port: 16006\n    excludePorts: [9001]\n    excludePortsForIPs: [\"10.1.0.0/16,fd00::1\"]\n  outbound:\n    port: 16001\n    includePorts: [80, 443, 3306]\n    excludePorts: [3306]\n    excludePortsForIPs: [\"10.2.0.1\"]\n  dns:\n    enabled: true\n    captureAll: true\ncniMode: true\n",
    );
    assert_eq!(
        (p.inbound_port, p.outbound_port, p.proxy_uid),
        (16006, 16001, 5679)
    );
    assert_eq!(p.exclude_inbound_ports, vec![9001]);
    assert_eq!(
        p.exclude_inbound_sources,
        vec![
            "10.1.0.0/16".parse().unwrap(),
            "fd00::1/128".parse().unwrap()
        ]
    );
    // includePorts replaces the catch-all; an excluded port stays excluded.
    assert_eq!(p.include_outbound_ports, vec![80, 443]);
    assert_eq!(p.include_outbound_cidrs, Cidrs::Only(vec![]));
    assert_eq!(
        p.exclude_outbound_cidrs,
        vec!["10.2.0.1/32".parse().unwrap()]
    );
    assert_eq!(p.dns_port, Some(15053));
    // A numeric uid as a YAML number too; inbound disabled (gateways).
    let p = kuma_plan("kumaDPUser: 5680\nredirect:\n  inbound:\n    enabled: false\n");
    assert_eq!(p.proxy_uid, 5680);
    assert_eq!(p.include_inbound_ports, Ports::Only(vec![]));
}

#[test]
fn kuma_ip_family_mode_ipv4_leaves_ipv6_alone() {
    let dual: &[IpAddr] = &["10.1.0.5".parse().unwrap(), "fd00::5".parse().unwrap()];
    let families = |config: &str| match kuma(config, dual).expect("valid") {
        Decision::Capture { plan, .. } => plan.families,
        other => panic!("{other:?}"),
    };
    assert_eq!(families("ipFamilyMode: dualstack\n"), Families::DUAL);
    assert_eq!(families("ipFamilyMode: ipv4\n"), Families::IPV4);
}

/// kuma-cni's gate: the webhook's `kuma.io/sidecar-injected: "true"`, and CNI mode (with
/// `cniMode: false` the webhook injected kuma-init, which captures the pod itself).
#[test]
fn kuma_pods_are_captured_only_where_kuma_cni_would_capture_them() {
    let skip = |pairs: &[(&str, &str)]| match decide4(&ann(pairs), &PlanDefaults::default())
        .expect("valid")
    {
        Decision::Skip { reason } => reason,
        other => panic!("{pairs:?}: expected a skip, got {other:?}"),
    };
    assert!(skip(&[KUMA_INJECTED, (KUMA_CONFIG, "cniMode: false\n")]).contains("kuma-init"));
    assert!(
        skip(&[
            ("kuma.io/sidecar-injected", "false"),
            (KUMA_CONFIG, "cniMode: true\n")
        ])
        .contains("sidecar-injected")
    );
    assert!(skip(&[(KUMA_CONFIG, "cniMode: true\n")]).contains("mesh gate"));
    let off = PlanDefaults {
        kuma: false,
        ..PlanDefaults::default()
    };
    let Decision::Skip { reason } =
        decide4(&ann(&[KUMA_INJECTED, (KUMA_CONFIG, "{}")]), &off).expect("valid")
    else {
        panic!("a disabled profile skips")
    };
    assert!(reason.contains("agent configuration"), "{reason}");
}

/// A configuration that does not parse, or asks for rules sluice does not write, fails the
/// ADD (code 7) naming the annotation and the field: a pod never starts captured differently
/// from what its mesh configured.
#[test]
fn kuma_configs_sluice_cannot_honour_are_refused_naming_the_field() {
    for (config, says) in [
        ("redirect: [", "invalid type"),
        ("ebpf:\n  enabled: true\n", "ebpf"),
        ("kumaDPUser: kuma-dp\n", "numeric uid"),
        ("ipFamilyMode: ipv6\n", "ipFamilyMode"),
        ("redirect:\n  inbound:\n    port: 70000\n", "inbound"),
        ("redirect:\n  dns:\n    enabled: true\n", "captureAll"),
        (
            "redirect:\n  inbound:\n    excludePortsForUIDs: [\"tcp:80:1000\"]\n",
            "excludePortsForUIDs",
        ),
        (
            "redirect:\n  outbound:\n    excludePortsForUIDs: [\"tcp:80:*\"]\n",
            "uids cannot be *",
        ),
        (
            "redirect:\n  outbound:\n    excludePortsForUIDs: [\"sctp:80:1\"]\n",
            "not tcp, udp",
        ),
        (
            "redirect:\n  outbound:\n    excludePortsForUIDs: [\"9-8:1\"]\n",
            "empty range",
        ),
        (
            "redirect:\n  outbound:\n    enabled: false\n",
            "outbound.enabled",
        ),
        ("dropInvalidPackets: true\n", "dropInvalidPackets"),
        (
            "redirect:\n  vnet:\n    networks: [\"docker0:172.17.0.0/16\"]\n",
            "vnet",
        ),
        (
            "redirect:\n  outbound:\n    excludePortsForIPs: [\"10.0.0.300\"]\n",
            "10.0.0.300",
        ),
    ] {
        let e = kuma(config, POD_V4).expect_err(config);
        assert_eq!(e.annotation, KUMA_CONFIG, "{config}");
        assert!(e.reason.contains(says), "{config}: {e}");
    }
}

const CONSUL_CONFIG: &str = "consul.hashicorp.com/redirect-traffic-config";
const CONSUL_BASE: &str = r#"{"ConsulDNSIP":"","ConsulDNSPort":8600,"ProxyUserID":"5995","ProxyInboundPort":20000,"ProxyOutboundPort":15001,"ExcludeInboundPorts":["20200","9000:9002"],"ExcludeOutboundPorts":null,"ExcludeOutboundCIDRs":["10.0.0.0/8"],"ExcludeUIDs":["5996"],"NetNS":"","IptablesProvider":null}"#;

fn consul(pairs: &[(&str, &str)], ips: &[IpAddr]) -> Result<Decision, PlanError> {
    let mut all = vec![
        ("consul.hashicorp.com/connect-inject-status", "injected"),
        ("consul.hashicorp.com/transparent-proxy-status", "enabled"),
    ];
    all.extend_from_slice(pairs);
    decide(&ann(&all), ips, &PlanDefaults::default())
}

#[test]
fn consul_pods_get_their_redirect_config() {
    let Decision::Capture {
        plan: p, profile, ..
    } = consul(&[(CONSUL_CONFIG, CONSUL_BASE)], POD_V4).expect("valid")
    else {
        panic!("captured")
    };
    assert_eq!(profile, Profile::Consul);
    assert_eq!(
        (p.outbound_port, p.inbound_port, p.proxy_uid, p.proxy_gid),
        (15001, 20000, 5995, None)
    );
    // `a:b` ranges expand; the excluded users, networks; DNS to 127.0.0.1:8600.
    assert_eq!(p.exclude_inbound_ports, vec![20200, 9000, 9001, 9002]);
    assert_eq!(p.exclude_outbound_uids, vec![5996]);
    assert_eq!(
        p.exclude_outbound_cidrs,
        vec!["10.0.0.0/8".parse().unwrap()]
    );
    assert_eq!(
        p.consul_dns,
        Some(ConsulDns {
            ip: std::net::Ipv4Addr::LOCALHOST,
            port: Some(8600)
        })
    );
    assert_eq!(p.loopback, Loopback::Consul);
}

/// Without `consul.hashicorp.com/dual-stack: "true"` (injectors before consul-k8s's dual-stack
/// support write none) a pod is captured over IPv4 only, as consul-cni did for it.
#[test]
fn consul_dual_stack_decides_ipv6() {
    let dual: &[IpAddr] = &["10.1.0.5".parse().unwrap(), "fd00::5".parse().unwrap()];
    let families = |extra: &[(&str, &str)]| {
        let mut pairs = vec![(CONSUL_CONFIG, CONSUL_BASE)];
        pairs.extend_from_slice(extra);
        match consul(&pairs, dual).expect("valid") {
            Decision::Capture { plan, .. } => plan.families,
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(families(&[]), Families::IPV4);
    assert_eq!(
        families(&[("consul.hashicorp.com/dual-stack", "false")]),
        Families::IPV4
    );
    assert_eq!(
        families(&[("consul.hashicorp.com/dual-stack", "true")]),
        Families::DUAL
    );
}

/// consul-cni's gate: an inject status and a transparent-proxy status, both set.
#[test]
fn consul_pods_are_captured_only_where_consul_cni_would_capture_them() {
    let skip = |pairs: &[(&str, &str)]| match decide4(&ann(pairs), &PlanDefaults::default())
        .expect("valid")
    {
        Decision::Skip { reason } => reason,
        other => panic!("{pairs:?}: expected a skip, got {other:?}"),
    };
    let reason = skip(&[
        (CONSUL_CONFIG, CONSUL_BASE),
        ("consul.hashicorp.com/connect-inject-status", "injected"),
    ]);
    assert!(reason.contains("transparent-proxy-status"), "{reason}");
    let reason = skip(&[
        (CONSUL_CONFIG, CONSUL_BASE),
        ("consul.hashicorp.com/transparent-proxy-status", "enabled"),
    ]);
    assert!(reason.contains("inject-status"), "{reason}");
    // The v2 (mesh) inject status counts too.
    assert!(matches!(
        decide4(
            &ann(&[
                (CONSUL_CONFIG, CONSUL_BASE),
                ("consul.hashicorp.com/mesh-inject-status", "injected"),
                ("consul.hashicorp.com/transparent-proxy-status", "enabled"),
            ]),
            &PlanDefaults::default()
        ),
        Ok(Decision::Capture {
            profile: Profile::Consul,
            ..
        })
    ));
}

#[test]
fn consul_configs_that_do_not_parse_are_refused_naming_the_field() {
    for (config, says) in [
        ("not json", "expected"),
        (
            r#"{"ProxyUserID":"envoy","ProxyInboundPort":20000,"ProxyOutboundPort":15001}"#,
            "ProxyUserID",
        ),
        (
            r#"{"ProxyUserID":"5995","ProxyInboundPort":0,"ProxyOutboundPort":15001}"#,
            "ProxyInboundPort",
        ),
        (
            r#"{"ProxyUserID":"5995","ProxyInboundPort":20000,"ProxyOutboundPort":15001,"ExcludeInboundPorts":["9:1"]}"#,
            "empty range",
        ),
        (
            r#"{"ProxyUserID":"5995","ProxyInboundPort":20000,"ProxyOutboundPort":15001,"ExcludeOutboundCIDRs":["10.0.0.0/33"]}"#,
            "ExcludeOutboundCIDRs",
        ),
        (
            r#"{"ProxyUserID":"5995","ProxyInboundPort":20000,"ProxyOutboundPort":15001,"ConsulDNSIP":"fd00::1"}"#,
            "ConsulDNSIP",
        ),
        (
            r#"{"ProxyUserID":"5995","ProxyInboundPort":20000,"ProxyOutboundPort":15001,"ExcludeUIDs":["x"]}"#,
            "ExcludeUIDs",
        ),
    ] {
        let e = consul(&[(CONSUL_CONFIG, config)], POD_V4).expect_err(config);
        assert_eq!(e.annotation, CONSUL_CONFIG, "{config}");
        assert!(e.reason.contains(says), "{config}: {e}");
    }
    let e = consul(
        &[
            (CONSUL_CONFIG, CONSUL_BASE),
            ("consul.hashicorp.com/dual-stack", "yes"),
        ],
        POD_V4,
    )
    .expect_err("dual-stack yes");
    assert_eq!(e.annotation, "consul.hashicorp.com/dual-stack");
}

/// Kuma's `excludePortsForUIDs` entries, `[<proto>:][<ports>:]<uids>`, as Kuma reads them
/// (its multiple-config-flags golden: `1` is every port of uid 1 over TCP and UDP, `2-3:4-5`
/// ports 2-3 of uids 4 and 5 over both).
#[test]
fn kuma_uid_exclusions_expand_as_kuma_reads_them() {
    let p = kuma_plan(
        "redirect:\n  outbound:\n    excludePortsForUIDs: [\"1\", \"2-3:4-5\", \"tcp:80,443:1000\", \"udp:1001\", 7]\n",
    );
    let got: Vec<String> = p
        .exclude_uid_ports
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        got,
        [
            "tcp:*:1",
            "udp:*:1",
            "tcp:2-3:4",
            "tcp:2-3:5",
            "udp:2-3:4",
            "udp:2-3:5",
            "tcp:80-80:1000",
            "tcp:443-443:1000",
            "udp:*:1001",
            "tcp:*:7",
            "udp:*:7",
        ]
    );
}
