//! Property tests of the plugin's whole entry point (`run`): arbitrary stdin and environment,
//! and every shape of config a runtime might send for a pod that did not opt in. No agent
//! exists at the socket used here, so calls fail fast with code 11.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Map, Value};

use super::*;
use crate::cni::version::SUPPORTED_VERSIONS;
use crate::verbs::run;

const SOCKET: &str = "/nonexistent/sluice-proptest/agent.sock";
const CASES: u32 = 1500;

/// Every code the plugin may answer with (README, "Configure the plugin").
const CODES: &[u32] = &[1, 3, 4, 6, 7, 11, 50, 100, 101, 102];

/// Reported past the test harness's output capture, so `make test` shows it.
fn report(what: &str, cases: usize) {
    let _ = writeln!(std::io::stderr(), "proptest: {what}: {cases} cases");
}

fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn command() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec!["ADD", "DEL", "CHECK", "STATUS", "GC", "VERSION", ""])
            .prop_map(str::to_owned),
        ".{0,10}",
    ]
}

fn env() -> impl Strategy<Value = Env> {
    (command(), ".{0,20}", ".{0,40}", ".{0,16}").prop_map(|(command, id, netns, ifname)| Env {
        command,
        container_id: id,
        netns,
        ifname,
        ..Default::default()
    })
}

/// Annotations that never opt in: other keys with string values, plus sometimes values of other
/// JSON types on keys sluice does not read (not a real shape, but liberal is the rule).
fn foreign_annotations() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        prop::collection::btree_map(
            "[a-z./-]{1,20}".prop_filter("not a key sluice reads", |k| {
                !k.starts_with("sluice.dev/")
                    && !sluice_proto::annotations::PROFILE_TRIGGERS.contains(&k.as_str())
            }),
            prop_oneof![4 => ".{0,30}".prop_map(Value::from), 1 => json()],
            0..6,
        )
        .prop_map(|m| Value::Object(m.into_iter().collect())),
        Just(serde_json::json!({"sluice.dev/redirect": "disabled"})),
    ]
}

/// A config as a runtime might send it for a pod that did not opt in: known keys with right or
/// wrong types, absent or null sections, unknown keys.
fn unopted_config() -> impl Strategy<Value = (Value, Option<Value>)> {
    (
        prop_oneof![
            prop::sample::select(SUPPORTED_VERSIONS.to_vec()).prop_map(Value::from),
            json()
        ],
        prop::option::of(json()),
        prop_oneof![
            Just(None),
            Just(Some(Value::Null)),
            (
                foreign_annotations(),
                prop::collection::btree_map("[a-z]{1,8}", json(), 0..3)
            )
                .prop_map(|(ann, extra)| {
                    let mut rc: Map<String, Value> = extra.into_iter().collect();
                    rc.insert("io.kubernetes.cri.pod-annotations".into(), ann);
                    Some(Value::Object(rc))
                }),
        ],
        prop::collection::btree_map("[a-zA-Z]{1,10}", json(), 0..4),
        prop::option::of(json()),
        prop::option::of(json()),
    )
        .prop_map(|(version, prev, rc, extra, caps, timeout)| {
            let mut conf: Map<String, Value> = extra.into_iter().collect();
            conf.insert("cniVersion".into(), version);
            conf.insert("name".into(), "example-net".into());
            conf.insert("type".into(), "sluice-cni".into());
            conf.insert("agentSocket".into(), SOCKET.into());
            if let Some(prev) = &prev {
                conf.insert("prevResult".into(), prev.clone());
            }
            if let Some(rc) = rc {
                conf.insert("runtimeConfig".into(), rc);
            }
            if let Some(caps) = caps {
                conf.insert("capabilities".into(), caps);
            }
            if let Some(t) = timeout {
                conf.insert("timeoutMs".into(), t);
            }
            (Value::Object(conf), prev)
        })
}

fn runner() -> TestRunner {
    TestRunner::new(Config {
        cases: CASES,
        failure_persistence: None,
        ..Config::default()
    })
}

#[test]
fn any_stdin_and_env_get_a_cni_answer_never_a_panic() {
    let cases = AtomicUsize::new(0);
    let stdin = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        unopted_config().prop_map(|(c, _)| serde_json::to_vec(&c).unwrap_or_default()),
        // Opted-in configs reach the (absent) agent: code 11, or a field error first.
        (
            unopted_config(),
            prop::sample::select(vec![
                ("sluice.dev/redirect", "enabled"),
                ("sluice.dev/redirect", "garbage"),
                ("sidecar.istio.io/status", "{}"),
                ("linkerd.io/proxy-version", "stable"),
            ])
        )
            .prop_map(|((mut c, _), (k, v))| {
                c["runtimeConfig"] =
                    serde_json::json!({"io.kubernetes.cri.pod-annotations": {k: v}});
                serde_json::to_vec(&c).unwrap_or_default()
            }),
    ];
    runner()
        .run(&(env(), stdin), |(env, stdin)| {
            cases.fetch_add(1, Ordering::Relaxed);
            let outcome = std::panic::catch_unwind(|| run(&env, &stdin));
            prop_assert!(outcome.is_ok(), "panicked on {:?}", conf::excerpt(&stdin));
            if let Ok(Err(e)) = outcome {
                prop_assert!(CODES.contains(&e.code), "code {} for {e:?}", e.code);
                let json = serde_json::to_string(&e).expect("error JSON");
                prop_assert!(json.len() < 4096, "unbounded error: {} bytes", json.len());
            }
            Ok(())
        })
        .expect("property");
    report(
        "plugin entry point, arbitrary stdin and env",
        cases.into_inner(),
    );
}

#[test]
fn a_pod_that_did_not_opt_in_always_passes_through() {
    let cases = AtomicUsize::new(0);
    let verbs = prop::sample::select(vec!["ADD", "DEL", "CHECK"]);
    runner()
        .run(&(unopted_config(), verbs), |((conf, prev), verb)| {
            cases.fetch_add(1, Ordering::Relaxed);
            let env = Env {
                command: verb.to_owned(),
                ..Default::default()
            };
            let stdin = serde_json::to_vec(&conf).expect("config JSON");
            let out = run(&env, &stdin);
            prop_assert!(
                out.is_ok(),
                "{verb} failed: {out:?} for {}",
                conf::excerpt(&stdin)
            );
            if let (Ok(Output::Text(text)), Some(prev)) = (&out, &prev)
                && !prev.is_null()
            {
                prop_assert_eq!(text, &serde_json::to_string(prev).expect("prev JSON"));
            }
            if verb == "ADD" {
                prop_assert!(matches!(out, Ok(Output::Text(_))), "ADD prints a result");
            }
            Ok(())
        })
        .expect("property");
    report("plugin, pods that did not opt in", cases.into_inner());
}

/// Found by the property above (a generated `timeoutMs` near `u64::MAX`): tonic panics on a
/// `grpc-timeout` it cannot encode, so the plugin died instead of answering. Every verb that
/// calls the agent reads the timeout within bounds now.
#[test]
fn a_huge_timeout_gets_an_answer_never_a_panic() {
    for timeout in [u64::MAX, u64::MAX / 1000, 1 << 60] {
        let stdin = serde_json::to_vec(&serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "example-net",
            "type": "sluice-cni",
            "agentSocket": SOCKET,
            "timeoutMs": timeout,
            "runtimeConfig": {"io.kubernetes.cri.pod-annotations": {"sluice.dev/redirect": "enabled"}},
            "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.5/24"}]},
        }))
        .expect("config JSON");
        for verb in ["ADD", "CHECK", "DEL"] {
            let env = Env {
                command: verb.to_owned(),
                container_id: "c1".into(),
                netns: "/var/run/netns/none".into(),
                ifname: "eth0".into(),
                ..Default::default()
            };
            let outcome = std::panic::catch_unwind(|| run(&env, &stdin));
            let Ok(out) = outcome else {
                panic!("{verb} with timeoutMs {timeout} panicked");
            };
            match verb {
                // DEL always succeeds; CHECK does while the agent cannot answer.
                "DEL" | "CHECK" => assert!(out.is_ok(), "{verb} succeeds: {out:?}"),
                _ => assert_eq!(out.expect_err("no agent").code, 11, "{verb}"),
            }
        }
    }
}
