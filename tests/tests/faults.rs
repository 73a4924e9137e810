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
    let agent = Agent::start_with(
        "readd",
        &["--allow-unsafe-sysctl", "net.ipv4.conf.eth0.route_localnet"],
    );
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
    // Check now reports the one thing that really differs (the sysctl's interface is gone);
    // the table and the policy routing are as the first ADD left them.
    let drift = check(&agent, "readd").expect_err("eth0's sysctl is gone");
    let lines: Vec<&str> = drift.lines().filter(|l| l.contains("drift")).collect();
    assert!(
        !lines.is_empty()
            && lines
                .iter()
                .all(|l| l.contains("sysctl net.ipv4.conf.eth0.route_localnet")),
        "only the sysctl differs: {drift}"
    );
    assert!(topo.pod.sluice_table().is_some(), "the table is in place");
    assert!(has_policy_rule(&topo.pod), "its policy routing too");
}

/// What the agent process holds now: (RSS KiB, open fds, threads), from /proc.
fn usage(pid: u32) -> (u64, usize, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count);
    (field("VmRSS:"), fds, field("Threads:") as usize)
}

/// Reported past the harness's output capture, so `make test` shows the figures.
fn report(line: String) {
    let _ = std::io::Write::write_all(&mut std::io::stderr(), format!("{line}\n").as_bytes());
}

/// The pod's table with its owner comment (which names the container) left out, for
/// comparing pods that share a plan.
fn table_body(ns: &Netns) -> Option<String> {
    ns.sluice_table().map(|t| {
        t.lines()
            .filter(|l| !l.contains("comment"))
            .collect::<Vec<_>>()
            .join("\n")
    })
}

/// The agent is SIGKILLed while 200 ADDs are in flight through the real plugin, for three
/// kinds of pod in turn — REDIRECT, TPROXY (policy rule and local route) and one with a
/// sysctl — since device state is where a partial attach would hide. Every ADD either
/// succeeded, and its pod then holds the full table and device state, or failed with code 11;
/// after a restart every failed one succeeds when retried, and a CNI CHECK of every pod (table,
/// device state, sysctls) is clean.
#[test]
fn sigkill_with_200_adds_in_flight_never_reports_a_partial_success() {
    require_root();
    let mut agent = Agent::start("kill");
    let kinds: [&[(&str, &str)]; 3] = [
        &[("sluice.dev/redirect", "enabled")],
        &[
            ("sluice.dev/redirect", "enabled"),
            ("sluice.dev/mode", "tproxy"),
        ],
        &[
            ("sluice.dev/redirect", "enabled"),
            (
                "sluice.dev/sysctls",
                "net.ipv4.ip_local_port_range=20000 30000",
            ),
        ],
    ];
    let want: Vec<String> = kinds
        .iter()
        .enumerate()
        .map(|(k, ann)| {
            let reference = Netns::new(&format!("sl-kill-ref{k}"));
            assert_eq!(
                add(&agent, &format!("kill-ref{k}"), &reference, ann).exit,
                0
            );
            table_body(&reference).expect("reference table")
        })
        .collect();
    let port_range = |ns: &Netns| {
        String::from_utf8_lossy(
            &ns.exec(&["sysctl", "-n", "net.ipv4.ip_local_port_range"])
                .stdout,
        )
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
    };
    let complete = |i: usize, ns: &Netns| {
        let kind = i % kinds.len();
        assert_eq!(
            table_body(ns).as_deref(),
            Some(want[kind].as_str()),
            "pod {i}: the full table"
        );
        assert!(
            ns.ip(&["link", "show", "lo"]).contains("UP"),
            "pod {i}: lo up"
        );
        if kind == 1 {
            assert!(has_policy_rule(ns), "pod {i}: TPROXY's policy rule");
            assert!(
                ns.ip(&["route", "show", "table", "133"])
                    .contains("local default dev lo"),
                "pod {i}: TPROXY's local route"
            );
        }
        if kind == 2 {
            assert_eq!(port_range(ns), "20000 30000", "pod {i}: the sysctl");
        }
    };
    let pods: Vec<Netns> = (0..200)
        .map(|i| Netns::new(&format!("sl-kill-{i}")))
        .collect();
    let pid = agent.pid();
    let attached = || {
        std::fs::read_to_string(&agent.log)
            .unwrap_or_default()
            .matches(" attached ")
            .count()
    };
    let before = attached();
    let runs: Vec<CniRun> = std::thread::scope(|s| {
        let handles: Vec<_> = pods
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                let agent = &agent;
                let ann = kinds[i % kinds.len()];
                s.spawn(move || add(agent, &format!("kill-{i}"), ns, ann))
            })
            .collect();
        // Kill once some have gone through, so the kill lands mid-storm.
        wait_for(
            "the first attaches",
            std::time::Duration::from_secs(20),
            || attached() >= before + 10,
        );
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        handles
            .into_iter()
            .map(|h| h.join().expect("ADD"))
            .collect()
    });
    let (mut ok, mut retry) = (0, Vec::new());
    for (i, run) in runs.iter().enumerate() {
        if run.exit == 0 {
            ok += 1;
            complete(i, &pods[i]);
        } else {
            assert_eq!(run.error_code(), 11, "pod {i}: {run:?}");
            retry.push(i);
        }
    }
    agent.restart();
    for &i in &retry {
        let run = add(
            &agent,
            &format!("kill-{i}"),
            &pods[i],
            kinds[i % kinds.len()],
        );
        assert_eq!(run.exit, 0, "retry of pod {i}: {run:?}");
        complete(i, &pods[i]);
    }
    for (i, ns) in pods.iter().enumerate() {
        let stdin = conf(
            "1.0.0",
            &agent.socket_str(),
            kinds[i % kinds.len()],
            Some(&prev_result("1.0.0")),
        );
        let run = cni("CHECK", &format!("kill-{i}"), &ns.path(), &stdin);
        assert_eq!(run.exit, 0, "pod {i}: {run:?}");
    }
    report(format!(
        "sigkill with 200 ADDs in flight (REDIRECT, TPROXY, sysctl pods): {ok} succeeded (full state checked), {} failed with code 11, all of those succeeded on retry; CHECK clean on all 200",
        retry.len()
    ));
}

/// 1,000 ADDs through the real plugin, 64 at a time: nothing fails but with code 11, which
/// succeeds on retry; the agent's threads stay bounded. Prints its peak RSS, fds and threads.
#[test]
fn a_thousand_adds_64_at_a_time() {
    require_root();
    let agent = Agent::start("storm");
    let pid = agent.pid();
    let ann = [("sluice.dev/redirect", "enabled")];
    let pods: Vec<Netns> = (0..1000)
        .map(|i| Netns::new(&format!("sl-storm-{i}")))
        .collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let done = std::sync::atomic::AtomicBool::new(false);
    let peak = std::sync::Mutex::new((0u64, 0usize, 0usize));
    let failures: Vec<(usize, CniRun)> = std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let (rss, fds, threads) = usage(pid);
                let mut p = peak.lock().expect("peak");
                *p = (p.0.max(rss), p.1.max(fds), p.2.max(threads));
                drop(p);
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        });
        let workers: Vec<_> = (0..64)
            .map(|_| {
                s.spawn(|| {
                    let mut failed = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= pods.len() {
                            return failed;
                        }
                        let run = add(&agent, &format!("storm-{i}"), &pods[i], &ann);
                        if run.exit != 0 {
                            failed.push((i, run));
                        }
                    }
                })
            })
            .collect();
        let failed = workers
            .into_iter()
            .flat_map(|w| w.join().expect("worker"))
            .collect();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        failed
    });
    for (i, run) in &failures {
        assert_eq!(run.error_code(), 11, "pod {i}: {run:?}");
        let again = add(&agent, &format!("storm-{i}"), &pods[*i], &ann);
        assert_eq!(again.exit, 0, "retry of pod {i}: {again:?}");
    }
    let (rss, fds, threads) = *peak.lock().expect("peak");
    report(format!(
        "1000 ADDs, 64 in parallel: {} answered code 11 and succeeded on retry; agent peak RSS {} KiB, fds {fds}, threads {threads}",
        failures.len(),
        rss
    ));
    // 8 netns workers + the runtime's threads: bounded whatever the load.
    assert!(threads <= 32, "threads must stay bounded: {threads}");
}

/// 10,000 attach/detach cycles (over the agent's API, 8 pods at a time): the agent ends with
/// the fds, threads and memory it had after warming up, within a small margin.
#[test]
fn ten_thousand_attach_detach_cycles_leak_nothing() {
    use sluice_proto::v1::agent_client::AgentClient;
    use sluice_proto::v1::{AttachRequest, DetachRequest};
    require_root();
    let agent = Agent::start("cycles");
    let pid = agent.pid();
    let pods: Vec<Netns> = (0..8).map(|i| Netns::new(&format!("sl-cyc-{i}"))).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let socket = agent.socket_str();
    let cycles = |per_pod: usize| {
        rt.block_on(async {
            let channel = tonic::transport::Endpoint::try_from(format!("unix://{socket}"))
                .expect("endpoint")
                .connect()
                .await
                .expect("connect");
            let tasks: Vec<_> = pods
                .iter()
                .enumerate()
                .map(|(i, ns)| {
                    let mut client = AgentClient::new(channel.clone());
                    let netns = ns.path();
                    tokio::spawn(async move {
                        for _ in 0..per_pod {
                            let id = format!("cyc-{i}");
                            client
                                .attach(AttachRequest {
                                    container_id: id.clone(),
                                    netns: netns.clone(),
                                    ifname: "eth0".into(),
                                    annotations: [("sluice.dev/redirect".into(), "enabled".into())]
                                        .into(),
                                    ..Default::default()
                                })
                                .await
                                .expect("attach");
                            client
                                .detach(DetachRequest {
                                    container_id: id,
                                    netns: netns.clone(),
                                    ifname: "eth0".into(),
                                })
                                .await
                                .expect("detach");
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.expect("cycle task");
            }
        });
    };
    cycles(25); // warm up: 200 cycles
    let before = usage(pid);
    cycles(1225); // 9,800 more: 10,000 in all
    let after = usage(pid);
    report(format!(
        "10000 attach/detach cycles: agent (RSS KiB, fds, threads) after warm-up {before:?}, at the end {after:?}"
    ));
    assert!(after.1 <= before.1 + 2, "fds: {before:?} -> {after:?}");
    assert!(after.2 <= before.2 + 2, "threads: {before:?} -> {after:?}");
    assert!(
        after.0 <= before.0 + 16 * 1024,
        "RSS: {before:?} -> {after:?}"
    );
    for ns in &pods {
        assert!(ns.sluice_table().is_none());
    }
}

/// Multus: a secondary network (interface `net1`) chained with sluice attaches and detaches
/// the same pod. Both interfaces are counted in the table's owner; the capture goes away only
/// with the last attachment, whichever order the DELs come in, and `List` shows one attachment
/// per interface.
#[test]
fn a_pods_capture_goes_away_only_with_its_last_attachment() {
    require_root();
    let agent = Agent::start("multus");
    let ann = annotations();
    let stdin = conf(
        "1.0.0",
        &agent.socket_str(),
        &ann,
        Some(&prev_result("1.0.0")),
    );
    let del_stdin = conf("1.0.0", &agent.socket_str(), &ann, None);
    for (id, order) in [
        ("multus-a", ["net1", "eth0"]),
        ("multus-b", ["eth0", "net1"]),
    ] {
        let ns = Netns::new(&format!("sl-fault-{id}"));
        assert_eq!(cni_on("eth0", "ADD", id, &ns.path(), &stdin).exit, 0);
        let second = cni_on("net1", "ADD", id, &ns.path(), &stdin);
        assert_eq!(second.exit, 0, "{second:?}");
        let table = ns.sluice_table().expect("captured");
        assert_eq!(counted(&table), ["eth0", "net1"], "both counted: {table}");
        let list = String::from_utf8_lossy(&agent.ctl(&["list"]).stdout).into_owned();
        let rows = list.lines().filter(|l| l.starts_with(id)).count();
        assert_eq!(rows, 2, "one attachment per interface:\n{list}");
        check(&agent, id).expect("captured with both attached");

        let first = cni_on(order[0], "DEL", id, &ns.path(), &del_stdin);
        assert_eq!(first.exit, 0, "{first:?}");
        check(&agent, id)
            .unwrap_or_else(|e| panic!("{id}: still captured after the DEL of {}: {e}", order[0]));
        assert!(has_policy_rule(&ns), "{id}: device state kept");
        let table = ns.sluice_table().expect("captured");
        assert_eq!(
            counted(&table),
            [order[1]],
            "{id}: only {} counted now: {table}",
            order[1]
        );
        let last = cni_on(order[1], "DEL", id, &ns.path(), &del_stdin);
        assert_eq!(last.exit, 0, "{last:?}");
        assert!(
            ns.sluice_table().is_none(),
            "{id}: the last attachment's DEL removes the capture"
        );
        assert!(!has_policy_rule(&ns), "{id}: and the device state");
        let list = String::from_utf8_lossy(&agent.ctl(&["list"]).stdout).into_owned();
        assert!(!list.contains(id), "{list}");
    }
}

/// A pod's capture covers the IP families of all its attachments: a secondary network (Multus)
/// with only an IPv6 address, or with none, never takes IPv4 capture away from what the
/// primary brought, whatever the agent remembers (a restart in between too); a secondary that
/// brings a family the primary lacks widens the capture, and its DEL narrows it back.
#[test]
fn a_secondary_network_never_narrows_the_pods_capture() {
    require_root();
    let mut agent = Agent::start("families");
    let ann = [("sluice.dev/redirect", "enabled")];
    let add_on = |agent: &Agent, ifname: &str, id: &str, ns: &Netns, ips: &[&str]| {
        let prev = (!ips.is_empty()).then(|| prev_result_with("1.0.0", ips));
        let stdin = conf("1.0.0", &agent.socket_str(), &ann, prev.as_deref());
        let run = cni_on(ifname, "ADD", id, &ns.path(), &stdin);
        assert_eq!(run.exit, 0, "{ifname}: {run:?}");
        ns.sluice_table().expect("captured")
    };
    let del_on = |agent: &Agent, ifname: &str, id: &str, ns: &Netns| {
        let stdin = conf("1.0.0", &agent.socket_str(), &ann, None);
        assert_eq!(cni_on(ifname, "DEL", id, &ns.path(), &stdin).exit, 0);
    };
    let dual = ["inbound", "outbound", "inbound6", "outbound6"];
    let has = |table: &str, want: &[&str]| {
        let have = chains(table);
        want.iter().all(|c| have.iter().any(|h| h == c))
    };

    // Dual-stack primary; a secondary with only IPv6, one with no address at all.
    let ns = Netns::new("sl-fam-dual");
    let primary = add_on(
        &agent,
        "eth0",
        "fam-dual",
        &ns,
        &["10.244.9.9/24", "fd00:244::9/64"],
    );
    assert!(has(&primary, &dual), "{primary}");
    let after_v6 = add_on(&agent, "net1", "fam-dual", &ns, &["fd00:99::9/64"]);
    assert!(
        has(&after_v6, &dual),
        "IPv4 capture kept after net1: {after_v6}"
    );
    let after_none = add_on(&agent, "net2", "fam-dual", &ns, &[]);
    assert!(has(&after_none, &dual), "{after_none}");
    assert_eq!(counted(&after_none), ["eth0", "net1", "net2"]);
    check(&agent, "fam-dual").expect("captured as planned");
    // The agent forgets everything: the kernel's own count decides.
    agent.restart();
    let after_restart = add_on(&agent, "net3", "fam-dual", &ns, &["fd00:98::9/64"]);
    assert!(has(&after_restart, &dual), "{after_restart}");
    del_on(&agent, "net1", "fam-dual", &ns);
    let table = ns.sluice_table().expect("still captured");
    assert!(has(&table, &dual), "{table}");

    // IPv4-only primary: an IPv6 secondary widens the capture; its DEL narrows it back.
    let ns = Netns::new("sl-fam-v4");
    let primary = add_on(&agent, "eth0", "fam-v4", &ns, &["10.244.9.10/24"]);
    assert!(has(&primary, &["inbound", "outbound"]) && !has(&primary, &["inbound6"]));
    let widened = add_on(&agent, "net1", "fam-v4", &ns, &["fd00:99::10/64"]);
    assert!(has(&widened, &dual), "{widened}");
    check(&agent, "fam-v4").expect("captured as planned");
    del_on(&agent, "net1", "fam-v4", &ns);
    let narrowed = ns.sluice_table().expect("still captured");
    assert!(
        has(&narrowed, &["inbound", "outbound"]) && !has(&narrowed, &["inbound6"]),
        "{narrowed}"
    );
    check(&agent, "fam-v4").expect("captured as planned");
}

/// A re-ADD whose changed plan fails (its new sysctl cannot be written) puts back the capture
/// it replaced as the kernel had it: the same rules, every attachment still counted, the
/// device state; so the next DEL of one network leaves the pod captured.
#[test]
fn a_failed_plan_change_puts_back_the_capture_with_its_attachments() {
    require_root();
    let agent = Agent::start_with(
        "putback",
        &["--allow-unsafe-sysctl", "net.ipv4.conf.eth0.route_localnet"],
    );
    let topo = Topology::new("putback");
    let plan_a = annotations();
    let mut plan_b = annotations();
    plan_b.push(("sluice.dev/sysctls", "net.ipv4.conf.eth0.route_localnet=1"));
    let stdin = |ann: &[(&str, &str)]| {
        conf(
            "1.0.0",
            &agent.socket_str(),
            ann,
            Some(&prev_result("1.0.0")),
        )
    };
    assert_eq!(
        cni_on("eth0", "ADD", "putback", &topo.pod.path(), &stdin(&plan_a)).exit,
        0
    );
    assert_eq!(
        cni_on("net1", "ADD", "putback", &topo.pod.path(), &stdin(&plan_a)).exit,
        0
    );
    let before = topo.pod.sluice_table().expect("captured");
    topo.pod.ip(&["link", "del", "eth0"]);
    let failed = cni_on("eth0", "ADD", "putback", &topo.pod.path(), &stdin(&plan_b));
    assert_ne!(failed.exit, 0, "{failed:?}");
    assert_eq!(
        topo.pod.sluice_table().as_deref(),
        Some(before.as_str()),
        "the capture as it was, owner included"
    );
    assert!(has_policy_rule(&topo.pod));
    check(&agent, "putback").expect("captured as before");
    let del_stdin = conf("1.0.0", &agent.socket_str(), &plan_a, None);
    assert_eq!(
        cni_on("net1", "DEL", "putback", &topo.pod.path(), &del_stdin).exit,
        0
    );
    let table = topo
        .pod
        .sluice_table()
        .expect("eth0 still holds the capture");
    assert_eq!(counted(&table), ["eth0"]);
    assert!(has_policy_rule(&topo.pod));
}

/// The reconciler's pass works from a snapshot of the runtime's sandboxes; a DEL of a pod that
/// comes after the snapshot (the pod is being deleted) wins: under the pod's lock the pass sees
/// it and leaves the pod alone — no re-capture of a dying pod, no ghost record, no "repaired".
#[test]
fn the_reconciler_never_recaptures_a_pod_whose_del_came_after_its_snapshot() {
    use sluice::node::reconcile::{Found, Repair, reconcile_sandbox};
    require_root();
    let ns = Netns::new("sl-fault-dying");
    let svc = Arc::new(service());
    let sandbox = sluice::node::discovery::Sandbox {
        id: "dying".into(),
        pod: sluice_proto::v1::PodRef {
            namespace: "default".into(),
            name: "dying".into(),
            uid: "uid-dying".into(),
        },
        annotations: [("sluice.dev/redirect".to_owned(), "enabled".to_owned())].into(),
        netns: Some(ns.path()),
        ips: vec!["10.99.0.2".into()],
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let found = rt.block_on(async {
        let snapshot = std::time::Instant::now();
        // The runtime's DEL arrives after the pass listed the sandbox.
        svc.detach(
            sluice_proto::v1::DetachRequest {
                container_id: "dying".into(),
                netns: String::new(),
                ifname: "eth0".into(),
            },
            std::time::Duration::from_secs(10),
        )
        .await
        .expect("detach");
        reconcile_sandbox(&svc, &sandbox, Repair::Apply, snapshot).await
    });
    assert_eq!(found, Found::Deleting);
    assert!(ns.sluice_table().is_none(), "not re-captured");
    assert!(svc.registry().is_empty(), "no ghost record");
    // A pass whose snapshot came after the DEL repairs as usual (a pod can be re-created
    // with the same sandbox id only by a new ADD, but a missing capture is still repaired).
    let found = rt.block_on(reconcile_sandbox(
        &svc,
        &sandbox,
        Repair::Apply,
        std::time::Instant::now(),
    ));
    assert_eq!(found, Found::Repaired { reason: "missing" });
    assert!(ns.sluice_table().is_some());
}

/// After an nftables batch the kernel did not answer, only the table that batch provably
/// created is removed: a capture that was already there (a re-ADD's) stays.
#[test]
fn an_unanswered_batch_removes_only_the_table_it_sent() {
    use sluice::kernel::capture::{Want, attach, remove_if_sent};
    use sluice::model::plan::{Families, PlanDefaults};
    use sluice::model::ruleset::Attached;
    require_root();
    let ns = Netns::new("sl-fault-unanswered");
    let removed = ns.run(|| {
        let want = Want {
            annotations: [("sluice.dev/redirect".to_owned(), "enabled".to_owned())].into(),
            defaults: PlanDefaults::default(),
            pod_uid: "uid-u".into(),
            container_id: "unanswered".into(),
        };
        let eth0 = Attached::new("eth0", "n", Families::IPV4);
        let first = attach(&want, eth0.clone(), &[], 1_000, None).expect("attach");
        // A re-ADD's batch, a second later, got no answer: what is there is the earlier one.
        let mut sent = first.planned.ruleset.owner.clone();
        sent.attached_at = 1_001;
        remove_if_sent(&sent);
        let kept = sluice::kernel::nft::read().expect("read").is_some();
        remove_if_sent(&first.planned.ruleset.owner);
        let gone = sluice::kernel::nft::read().expect("read").is_none();
        (kept, gone)
    });
    assert_eq!(
        removed,
        (true, true),
        "(the earlier capture kept, its own table removed)"
    );
}

/// An agent over /var/run/netns, as `sluice-agent` builds it.
fn service() -> sluice::agent::Agent {
    let roots = vec![sluice::kernel::netns::Root::Dir("/var/run/netns".into())];
    sluice::agent::Agent::new(
        sluice::model::plan::PlanDefaults::default(),
        sluice::kernel::netns::Policy::new(roots).expect("policy"),
        Arc::new(sluice::metrics::Metrics::new()),
        Arc::new(std::sync::Mutex::new(Ok(()))),
    )
}
