//! The agent refuses namespaces it must not touch and callers it must not serve.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::Command;

use sluice_tests::*;

fn add(agent: &Agent, netns: &str) -> CniRun {
    let stdin = conf(
        "1.0.0",
        &agent.socket_str(),
        &[("sluice.dev/redirect", "enabled")],
        Some(&prev_result("1.0.0")),
    );
    cni("ADD", "safety", netns, &stdin)
}

fn assert_refused(run: &CniRun, why: &str) {
    assert_eq!(run.error_code(), 4, "{run:?}");
    let msg = run.json()["msg"].as_str().unwrap_or("").to_owned();
    assert!(msg.contains(why), "expected {why:?} in {msg:?}");
}

#[test]
fn the_agents_own_netns_is_refused() {
    require_root();
    let agent = Agent::start("host");
    let run = add(&agent, &format!("/proc/{}/ns/net", agent.pid()));
    assert_refused(&run, "host");
    let host_tables = String::from_utf8_lossy(&sh_out(&["nft", "list", "tables"])).into_owned();
    assert!(
        !host_tables.contains("inet sluice"),
        "nothing in the host netns: {host_tables}"
    );
}

#[test]
fn a_regular_file_and_a_non_network_namespace_are_refused() {
    require_root();
    let root = std::env::temp_dir().join(format!("sluice-roots-{}", std::process::id()));
    std::fs::create_dir_all(&root).expect("root dir");
    let agent = Agent::start_with("files", &["--netns-root", root.to_str().expect("utf8")]);

    let file = root.join("plain");
    std::fs::write(&file, b"not a namespace").expect("write file");
    assert_refused(
        &add(&agent, file.to_str().expect("utf8")),
        "not a network namespace",
    );

    // An nsfs file of another namespace type (UTS) passes the nsfs check but not setns.
    let mnt = root.join("utsns");
    std::fs::write(&mnt, b"").expect("mount point");
    sh(&[
        "mount",
        "--bind",
        &format!("/proc/{}/ns/uts", agent.pid()),
        mnt.to_str().expect("utf8"),
    ]);
    let run = add(&agent, mnt.to_str().expect("utf8"));
    let _ = Command::new("umount").arg(&mnt).status();
    assert_refused(&run, "not a network namespace");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn paths_outside_the_roots_and_symlinks_are_refused() {
    require_root();
    let agent = Agent::start("outside");
    let ns = Netns::new("sl-outside");
    assert_refused(
        &add(&agent, "/tmp/somewhere/netns"),
        "outside the allowed roots",
    );
    assert_refused(
        &add(&agent, "/var/run/netns/../netns/sl-outside"),
        "normalized",
    );
    assert_refused(
        &add(&agent, &format!("/proc/{}/ns/mnt", agent.pid())),
        "outside the allowed roots",
    );
    // A symlink inside a root pointing at a real netns is not followed.
    let link = "/var/run/netns/sl-outside-link";
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(ns.path(), link).expect("symlink");
    let run = add(&agent, link);
    let _ = std::fs::remove_file(link);
    assert_refused(&run, "not a network namespace");
    assert!(ns.sluice_table().is_none());
}

#[test]
fn a_peer_that_is_not_allow_listed_is_refused() {
    require_root();
    let agent = Agent::start("peer");
    let ns = Netns::new("sl-peer");
    // The socket is 0600 root: open it up so that the SO_PEERCRED check itself is exercised.
    std::fs::set_permissions(&agent.socket, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    std::fs::set_permissions(&agent.dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let out = Command::new(bin("sluicectl"))
        .arg("--socket")
        .arg(&agent.socket)
        .arg("list")
        .uid(65534)
        .gid(65534)
        .output()
        .expect("sluicectl as nobody");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("peer uid 65534 is not allowed"), "{stderr}");

    let stdin = conf(
        "1.0.0",
        &agent.socket_str(),
        &[("sluice.dev/redirect", "enabled")],
        Some(&prev_result("1.0.0")),
    );
    let mut cmd = Command::new(bin("sluice-cni"));
    cmd.env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", "peer")
        .env("CNI_NETNS", ns.path())
        .env("CNI_IFNAME", "eth0")
        .uid(65534)
        .gid(65534)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("plugin as nobody");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), stdin.as_bytes())
        .expect("stdin");
    let out = child.wait_with_output().expect("wait");
    let reply: serde_json::Value = serde_json::from_slice(&out.stdout).expect("CNI error JSON");
    assert_eq!(reply["code"], 102, "{reply}");
    assert!(ns.sluice_table().is_none());

    // Root is allowed.
    assert!(agent.ctl(&["list"]).status.success());
}

fn sh_out(args: &[&str]) -> Vec<u8> {
    Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("run")
        .stdout
}

/// The agent's netns workers are long-lived threads that enter a pod's namespace per job: every
/// job runs in its pod's namespace whatever ran on that thread before, a job that panics
/// inside a namespace is an error for its caller only, and no thread is ever left in a pod's
/// namespace (each returns to the agent's own, which a job that does not enter one sees).
#[test]
fn netns_workers_run_each_job_in_its_pod_and_always_return_home() {
    require_root();
    use std::os::unix::fs::MetadataExt;
    let inode = || {
        std::fs::metadata("/proc/thread-self/ns/net")
            .map(|m| m.ino())
            .expect("own netns")
    };
    let host = inode();
    let pods: Vec<Netns> = (0..3)
        .map(|i| Netns::new(&format!("sl-pool-{i}")))
        .collect();
    let want: Vec<u64> = pods
        .iter()
        .map(|p| {
            std::fs::metadata(p.path())
                .map(|m| m.ino())
                .expect("pod netns")
        })
        .collect();
    let policy = sluice::kernel::netns::Policy::new(vec![sluice::kernel::netns::Root::Dir(
        "/var/run/netns".into(),
    )])
    .expect("policy");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        // More jobs at once than there are workers, spread over three pods.
        let jobs: Vec<_> = (0..48)
            .map(|i| {
                let ns = policy.open(&pods[i % 3].path()).expect("open");
                tokio::spawn(async move { (i, ns.run(far(), inode).await.expect("job")) })
            })
            .collect();
        for job in jobs {
            let (i, seen) = job.await.expect("task");
            assert_eq!(seen, want[i % 3], "job {i} ran in the wrong namespace");
        }
        let ns = policy.open(&pods[0].path()).expect("open");
        let panicked = ns
            .run(far(), || -> u64 {
                panic!("a job that fails inside the pod")
            })
            .await;
        assert!(
            panicked.is_err(),
            "a panicking job is an error: {panicked:?}"
        );
        for i in 0..16 {
            let ns = policy.open(&pods[i % 3].path()).expect("open");
            assert_eq!(
                ns.run(far(), inode).await.expect("after a panic"),
                want[i % 3]
            );
        }
    });
    assert_eq!(inode(), host, "the test thread itself never moved");
    let workers: Vec<String> = std::fs::read_dir("/proc/thread-self/..")
        .expect("tasks")
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
        .filter(|c| c.trim() == "sluice-netns")
        .collect();
    assert!(
        !workers.is_empty() && workers.len() <= 8,
        "{} netns workers",
        workers.len()
    );
    // Every worker, idle now, is back in the test process's own namespace.
    for t in std::fs::read_dir("/proc/thread-self/..")
        .expect("tasks")
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.trim() == "sluice-netns" {
            let ns = std::fs::metadata(t.path().join("ns/net")).map(|m| m.ino());
            assert_eq!(
                ns.ok(),
                Some(host),
                "an idle netns worker is outside the host namespace"
            );
        }
    }
}

/// A deadline no job here comes near.
fn far() -> std::time::Instant {
    std::time::Instant::now() + std::time::Duration::from_secs(60)
}
