//! Off the happy path, through the real plugin and agent: concurrent verbs on one pod, and a
//! failing re-ADD on a pod that is already captured.

use std::sync::Arc;

use sluice_tests::*;

fn annotations() -> Vec<(&'static str, &'static str)> {
    vec![
        ("sluice.dev/redirect", "enabled"),
        ("sluice.dev/mode", "tproxy"),
    ]
}

fn add(agent: &Agent, id: &str, ns: &Netns, ann: &[(&str, &str)]) -> CniRun {
    let stdin = conf(
        "1.0.0",
        &agent.socket_str(),
        ann,
        Some(&prev_result("1.0.0")),
    );
    cni("ADD", id, &ns.path(), &stdin)
}

fn del(agent: &Agent, id: &str, ns: &Netns) -> CniRun {
    let stdin = conf("1.0.0", &agent.socket_str(), &annotations(), None);
    cni("DEL", id, &ns.path(), &stdin)
}

/// `sluicectl check` of a container: Ok when the kernel holds exactly its plan.
fn check(agent: &Agent, id: &str) -> Result<(), String> {
    let out = agent.ctl(&["check", id]);
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The TPROXY policy rule sluice adds, as `ip rule` shows it.
fn has_policy_rule(ns: &Netns) -> bool {
    ns.ip(&["rule", "show"]).contains("fwmark 0x539 lookup 133")
}

#[test]
fn the_same_container_attached_twice_at_once_ends_fully_captured() {
    require_root();
    let agent = Arc::new(Agent::start("twice"));
    let ns = Arc::new(Netns::new("sl-fault-twice"));
    for round in 0..5 {
        let runs: Vec<CniRun> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..2)
                .map(|_| s.spawn(|| add(&agent, "twice", &ns, &annotations())))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("ADD thread"))
                .collect()
        });
        for run in &runs {
            assert_eq!(run.exit, 0, "round {round}: {run:?}");
        }
        check(&agent, "twice").unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert!(has_policy_rule(&ns), "round {round}: device state in place");
    }
}

/// ADD and DEL of one container raced many times: the end state is always that of whichever
/// verb ran last — either fully captured and recorded, or no table, no device state and no
/// record — never a mix.
#[test]
fn attach_racing_detach_ends_as_the_last_verb_left_it() {
    require_root();
    let agent = Agent::start("race");
    let ns = Netns::new("sl-fault-race");
    let (mut captured, mut clean) = (0, 0);
    for round in 0..20 {
        let (a, d) = std::thread::scope(|s| {
            let a = s.spawn(|| add(&agent, "race", &ns, &annotations()));
            let d = s.spawn(|| del(&agent, "race", &ns));
            (a.join().expect("ADD"), d.join().expect("DEL"))
        });
        assert_eq!(a.exit, 0, "round {round}: {a:?}");
        assert_eq!(d.exit, 0, "round {round}: {d:?}");
        let listed = String::from_utf8_lossy(&agent.ctl(&["list"]).stdout).contains("race");
        let table = ns.sluice_table().is_some();
        let rule = has_policy_rule(&ns);
        if table {
            captured += 1;
            assert!(
                listed && rule,
                "round {round}: table without record or device state"
            );
            check(&agent, "race").unwrap_or_else(|e| panic!("round {round}: {e}"));
        } else {
            clean += 1;
            assert!(
                !listed && !rule,
                "round {round}: record or device state without table"
            );
        }
        // Start each round from nothing.
        assert_eq!(del(&agent, "race", &ns).exit, 0);
    }
    // Past the harness's output capture, so `make test` shows it.
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("attach/detach race: {captured} rounds ended captured, {clean} clean\n").as_bytes(),
    );
}

/// A re-ADD that fails (its sysctl cannot be written any more) leaves the capture that the
/// first ADD installed exactly as it was: the table, the TPROXY policy routing.
#[test]
fn a_failed_re_add_keeps_the_capture_in_place() {
    require_root();
    let agent = Agent::start("readd");
    let topo = Topology::new("readd");
    let mut ann = annotations();
    ann.push(("sluice.dev/sysctls", "net.ipv4.conf.eth0.route_localnet=1"));
    let first = add(&agent, "readd", &topo.pod, &ann);
    assert_eq!(first.exit, 0, "{first:?}");
    check(&agent, "readd").expect("captured");
    assert!(has_policy_rule(&topo.pod));
    // eth0 goes away, so the same plan's sysctl can no longer be written.
    topo.pod.ip(&["link", "del", "eth0"]);
    let again = add(&agent, "readd", &topo.pod, &ann);
    assert_ne!(again.exit, 0, "{again:?}");
    assert!(again.stdout.contains("route_localnet"), "{again:?}");
    check(&agent, "readd").expect("the first ADD's table is still in place");
    assert!(has_policy_rule(&topo.pod), "its policy routing too");
}
