//! `make demo`: the main job on this machine, end to end. Starts an agent on a temporary
//! socket, builds a "pod" netns joined to a "peer" netns by veth, runs the real `sluice-cni`
//! ADD with the stdin containerd would send, proves redirection with a real connection, prints
//! the ruleset, runs DEL and cleans up. Any failed step panics: cleanup still runs (Drop) and
//! the exit status is non-zero.

use std::process::Command;

use sluice_tests::*;

fn step(n: u32, what: &str) {
    println!("\n== {n}. {what}");
}

fn main() {
    require_root();
    step(1, "start sluice-agent on a temporary socket");
    let agent = Agent::start("demo");
    println!(
        "agent pid {} listening on {}",
        agent.pid(),
        agent.socket_str()
    );

    step(2, "create a pod netns wired by veth to a peer netns");
    let topo = Topology::new("demo");
    println!(
        "pod  {} eth0 {POD_IP}/24 (lo down, like a fresh sandbox)",
        topo.pod.name
    );
    println!(
        "peer {} eth0 {PEER_IP}/24, listening on :8080",
        topo.peer.name
    );
    let _peer = Listener::start(&topo.peer, "0.0.0.0:8080", "peer");
    let _proxy = Listener::start(&topo.pod, "0.0.0.0:15001", "proxy-outbound");

    step(
        3,
        "sluice-cni ADD, stdin as containerd sends it to a chained plugin",
    );
    let annotations = [
        ("sluice.dev/redirect", "enabled"),
        ("sluice.dev/exclude-outbound-ports", "9090"),
    ];
    let stdin = conf(
        "1.0.0",
        &agent.socket_str(),
        &annotations,
        Some(&prev_result("1.0.0")),
    );
    println!("stdin: {stdin}");
    let add = cni("ADD", "demo", &topo.pod.path(), &stdin);
    println!("exit {} stdout: {}", add.exit, add.stdout);
    assert_eq!(add.exit, 0, "ADD failed: {add:?}");
    assert_eq!(
        add.stdout,
        prev_result("1.0.0"),
        "prevResult passes through unchanged"
    );

    step(
        4,
        "an app in the pod (uid 1000) connects to the peer 10.99.0.1:8080",
    );
    let reply = connect_as(&topo.pod, 1000, 1000, "10.99.0.1:8080");
    println!("the listener that accepted says: {reply:?}");
    assert_eq!(
        reply,
        Ok("proxy-outbound orig=10.99.0.1:8080".to_owned()),
        "the connection must land on the proxy port with its original destination"
    );
    println!("=> redirected to the proxy on :15001, SO_ORIGINAL_DST = 10.99.0.1:8080");
    let bypass = connect_as(&topo.pod, 1337, 1337, "10.99.0.1:8080");
    println!("the proxy itself (uid 1337) connecting to the peer reaches: {bypass:?}");
    assert!(
        bypass.as_deref().is_ok_and(|l| l.starts_with("peer")),
        "proxy traffic bypasses capture"
    );

    step(5, "the ruleset in the pod (nft list table inet sluice)");
    print!(
        "{}",
        topo.pod.sluice_table().expect("table present after ADD")
    );
    let list = agent.ctl(&["list"]);
    println!(
        "\n$ sluicectl list\n{}",
        String::from_utf8_lossy(&list.stdout)
    );
    let check = cni("CHECK", "demo", &topo.pod.path(), &stdin);
    println!("CNI CHECK exit {}", check.exit);
    assert_eq!(check.exit, 0, "{check:?}");

    step(6, "sluice-cni DEL");
    let del = cni("DEL", "demo", &topo.pod.path(), &stdin);
    println!("exit {}", del.exit);
    assert_eq!(del.exit, 0, "{del:?}");
    assert!(topo.pod.sluice_table().is_none(), "DEL removed the table");
    let after = connect_as(&topo.pod, 1000, 1000, "10.99.0.1:8080");
    println!("after DEL the app reaches: {after:?}");
    assert!(after.as_deref().is_ok_and(|l| l.starts_with("peer")));

    step(7, "clean up");
    drop((_proxy, _peer, topo, agent));
    let left = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    assert!(
        !String::from_utf8_lossy(&left.stdout).contains("sl-demo"),
        "netns removed"
    );
    println!("netns and agent removed\n\ndemo OK");
}
