//! The DaemonSet as shipped, run the way kubelet runs it. `manifests/` is read through its
//! kustomization and the DaemonSet's pod template translated in code (`sluice_tests::kube`,
//! strict: an unknown field fails the test) into the CRI calls kubelet makes, against an
//! isolated containerd: the image `make image` builds, imported; a host-network sandbox; the
//! container's args and env (downward API included), its securityContext, resources, every
//! volume and mount with its propagation, the ConfigMap as kubelet lays out a configMap volume;
//! the gRPC probes run against the health port on the node's address. Then app pods created
//! through CRI, with the conflist the containerised agent's `--install` wrote, are captured —
//! REDIRECT, TPROXY, dual-stack, with sysctls — each proved by a connection; SIGTERM keeps the
//! install, and the documented uninstall (`--uninstall-on-exit`) restores the conf dir byte for
//! byte.
//!
//! What stands in for the node: the hostPaths of the CNI dirs and the CRI socket are remapped
//! to this containerd's own (the agent's socket dir, `/var/run/netns` and `/proc/sys/net` are
//! the real ones: the conflist names the socket path, and pod netns live there); `/run/netns`
//! is made a shared mount, as systemd makes every mount on a node (iproute2 does the same for
//! this directory), since `HostToContainer` propagation requires it, and `/var/run/netns` is
//! given to containerd as `/run/netns`, the same directory.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sluice_tests::cri::{Chain, Containerd, ONE_AT_A_TIME};
use sluice_tests::kube::{self, Node, Pod, Probe};
use sluice_tests::*;

const ENABLED: (&str, &str) = ("sluice.dev/redirect", "enabled");
/// The agent's socket directory as the DaemonSet mounts it (not remapped: the conflist the
/// agent writes names `/run/sluice/agent.sock`, which the runtime opens on the host).
const RUN_DIR: &str = "/run/sluice";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `make image`: the image the README's install uses (release agent, static plugin).
fn make_image() -> PathBuf {
    let out = std::process::Command::new("make")
        .arg("-C")
        .arg(repo())
        .arg("image")
        .output()
        .expect("make image");
    assert!(
        out.status.success(),
        "make image failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let tar = repo().join(format!(
        "target/image/sluice-agent-{}.tar",
        env!("CARGO_PKG_VERSION")
    ));
    assert!(tar.exists(), "{}", tar.display());
    tar
}

/// The node's InternalIP stand-in: the source address of this machine's default route (never
/// loopback, so a listener on it is distinguishable from one on 127.0.0.1 or on every address).
fn node_ip() -> IpAddr {
    let out = sh(&["ip", "-4", "-o", "route", "get", "192.0.2.1"]);
    let mut words = out.split_whitespace();
    while let Some(w) = words.next() {
        if w == "src" {
            return words
                .next()
                .and_then(|a| a.parse().ok())
                .expect("a source address");
        }
    }
    panic!("no route to the outside to take a node address from: {out}");
}

fn node_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(8 << 30, |kb| kb * 1024)
}

/// `/run/netns` as a shared mount point, as on a systemd node (and as `ip netns add` leaves
/// it): containerd refuses HostToContainer propagation from a private mount.
fn share_netns_dir() {
    std::fs::create_dir_all("/run/netns").expect("/run/netns");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mounted = mountinfo
        .lines()
        .any(|l| l.split(' ').nth(4) == Some("/run/netns"));
    if !mounted {
        sh(&["mount", "--bind", "/run/netns", "/run/netns"]);
    }
    sh(&["mount", "--make-shared", "/run/netns"]);
}

/// Every file of a directory, by name, with its bytes (symlinks as their target).
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .expect("read dir")
        .flatten()
        .map(|e| {
            let path = e.path();
            let bytes = match std::fs::read_link(&path) {
                Ok(target) => format!("-> {}", target.display()).into_bytes(),
                Err(_) => std::fs::read(&path).unwrap_or_default(),
            };
            (e.file_name().to_string_lossy().into_owned(), bytes)
        })
        .collect()
}

/// Addresses listening on TCP `port` in this (the host's) network namespace.
fn listening_on(port: u16) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for (file, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        for line in std::fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .skip(1)
        {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 4 || f[3] != "0A" {
                continue;
            }
            let Some((addr, p)) = f[1].split_once(':') else {
                continue;
            };
            if u16::from_str_radix(p, 16).ok() != Some(port) {
                continue;
            }
            let bytes: Vec<u8> = (0..addr.len() / 2)
                .filter_map(|i| u8::from_str_radix(&addr[2 * i..2 * i + 2], 16).ok())
                .collect();
            // /proc/net/tcp* print each 32-bit word in host (little-endian) order.
            let fixed: Vec<u8> = bytes
                .chunks(4)
                .flat_map(|w| w.iter().rev().copied())
                .collect();
            out.push(if v6 {
                let a: [u8; 16] = fixed.try_into().unwrap_or([0; 16]);
                IpAddr::from(a)
            } else {
                let a: [u8; 4] = fixed.try_into().unwrap_or([0; 4]);
                IpAddr::from(a)
            });
        }
    }
    out
}

fn status_field(pid: u32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{key}:"))
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
}

/// Connects from the host and returns the line the listener wrote; retried while the pod's
/// address settles (IPv6 DAD).
fn line_from(addr: SocketAddr) -> String {
    let deadline = Instant::now() + scaled(Duration::from_secs(10));
    loop {
        let attempt = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).and_then(|s| {
            s.set_read_timeout(Some(Duration::from_secs(3)))?;
            let mut line = String::new();
            BufReader::new(s).read_line(&mut line)?;
            Ok(line.trim().to_owned())
        });
        match attempt {
            Ok(line) => return line,
            Err(e) if Instant::now() > deadline => panic!("connecting to {addr}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn pod_ip(ns: &Netns, family: &str) -> IpAddr {
    let out = ns.ip(&[
        family, "-o", "addr", "show", "dev", "eth0", "scope", "global",
    ]);
    out.split_whitespace()
        .skip_while(|w| *w != "inet" && *w != "inet6")
        .nth(1)
        .and_then(|a| a.split('/').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {family} address on eth0: {out}"))
}

fn sysctl_in(ns: &Netns, name: &'static str) -> String {
    ns.run(move || {
        std::fs::read_to_string(Path::new("/proc/sys").join(name.replace('.', "/")))
            .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|e| format!("unreadable: {e}"))
    })
}

/// kubelet's prober for one probe kind until it passes: initial delay, then every period,
/// failing after `failure_threshold` consecutive failures.
fn probe_until_passing(node: IpAddr, probe: &Probe, log: &Path) -> Duration {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let started = Instant::now();
    std::thread::sleep(probe.initial_delay);
    let mut failures = 0;
    let mut passes = 0;
    loop {
        match rt.block_on(kube::grpc_probe(node, probe)) {
            Ok(()) => {
                passes += 1;
                if passes >= probe.success_threshold {
                    return started.elapsed();
                }
            }
            Err(e) => {
                passes = 0;
                failures += 1;
                if failures >= probe.failure_threshold {
                    panic!(
                        "{} failed {failures} times on {node}:{} (service {:?}): {e}\n--- container log ---\n{}",
                        probe.kind,
                        probe.port,
                        probe.service,
                        std::fs::read_to_string(log).unwrap_or_default()
                    );
                }
            }
        }
        std::thread::sleep(probe.period);
    }
}

/// The agent's pod on the node: sandbox and container, started and probed as kubelet does.
struct Running<'a> {
    containerd: &'a Containerd,
    pod: &'a Pod,
    sandbox: String,
    container: String,
}

impl<'a> Running<'a> {
    fn start(containerd: &'a Containerd, pod: &'a Pod, node: IpAddr, extra_args: &[&str]) -> Self {
        assert_eq!(pod.containers.len(), 1, "one container in the agent's pod");
        let sandbox = containerd
            .run_sandbox(pod.sandbox.clone())
            .unwrap_or_else(|e| panic!("the DaemonSet's sandbox: {e}"));
        let mut me = Running {
            containerd,
            pod,
            sandbox,
            container: String::new(),
        };
        me.start_container(node, 0, extra_args);
        me
    }

    /// (Re)starts the container, attempt `attempt`, and waits for its startup probe; then the
    /// readiness and liveness probes must pass too.
    fn start_container(&mut self, node: IpAddr, attempt: u32, extra_args: &[&str]) {
        let c = &self.pod.containers[0];
        let mut config = c.config.clone();
        if let Some(m) = config.metadata.as_mut() {
            m.attempt = attempt;
        }
        config.log_path = format!("{}/{attempt}.log", c.name);
        config.args.extend(extra_args.iter().map(|a| a.to_string()));
        self.container = self
            .containerd
            .create_and_start_in(&self.sandbox, &self.pod.sandbox, config)
            .unwrap_or_else(|e| panic!("the agent's container: {e}"));
        let log = self.log(attempt);
        let startup = c
            .probes
            .iter()
            .find(|p| p.kind == "startupProbe")
            .expect("a startup probe");
        let took = probe_until_passing(node, startup, &log);
        eprintln!("agent container (attempt {attempt}) passed its startup probe after {took:?}");
        for p in c.probes.iter().filter(|p| p.kind != "startupProbe") {
            probe_until_passing(node, p, &log);
        }
    }

    fn log(&self, attempt: u32) -> PathBuf {
        let c = &self.pod.containers[0];
        c.log
            .parent()
            .expect("log dir")
            .join(format!("{attempt}.log"))
    }

    /// `kubectl exec` into the agent's container.
    fn exec(&self, cmd: &[&str]) -> String {
        let (code, out, err) = self.containerd.exec(&self.container, cmd);
        assert_eq!(code, 0, "{cmd:?}: {out}{err}");
        out
    }

    /// StopContainer with the pod's grace period; the exit code.
    fn stop(&self) -> i32 {
        self.containerd
            .stop_container(&self.container, self.pod.grace)
            .unwrap_or_else(|e| panic!("{e}"));
        let status = self.containerd.container_status(&self.container);
        assert_eq!(
            status.state,
            sluice_proto::cri::ContainerState::ContainerExited as i32
        );
        status.exit_code
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let _ = self.containerd.stop_and_remove(&self.sandbox);
    }
}

#[test]
fn the_daemonset_as_shipped_runs_through_cri_captures_pods_and_uninstalls() {
    require_root();
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let started = Instant::now();
    let tar = make_image();
    let image_built = started.elapsed();

    // A node: containerd with bridge + host-local (dual-stack) and nothing of sluice's.
    share_netns_dir();
    if Path::new(RUN_DIR).join("agent.sock").exists() {
        let live = std::os::unix::net::UnixStream::connect(Path::new(RUN_DIR).join("agent.sock"));
        assert!(
            live.is_err(),
            "a sluice agent is serving {RUN_DIR} on this machine; stop it before this test"
        );
    }
    let _ = std::fs::remove_dir_all(RUN_DIR);
    let chain = Chain {
        link_plugin: false,
        ipv6: true,
        ..Chain::new(None, 12)
    };
    let containerd = Containerd::start("daemonset", &chain);
    containerd.import(&tar, "localhost/sluice-agent");
    let bin_dir = containerd.dir.join("cni/bin");
    let conf_dir = containerd.dir.join("cni/conf");
    let conf_before = snapshot(&conf_dir);
    let bin_before = snapshot(&bin_dir);

    // The objects Helm's own engine renders from the chart with its defaults (the same as
    // `kustomize build manifests/`: tests/tests/chart.rs).
    let rendered = sluice_tests::render::helm_render(&serde_json::json!({}), "sluice-system")
        .unwrap_or_else(|e| panic!("{e}"));
    let install = kube::from_render(&rendered).unwrap_or_else(|e| panic!("{e}"));
    let ip = node_ip();
    let node = Node {
        name: sh(&["hostname"]).trim().to_owned(),
        ip,
        memory_bytes: node_memory(),
        host_paths: [
            ("/opt/cni/bin", bin_dir.clone()),
            ("/etc/cni/net.d", conf_dir.clone()),
            ("/run/containerd/containerd.sock", containerd.socket.clone()),
            // The same directory (/var/run -> /run), spelled resolved: containerd looks up the
            // mount of a HostToContainer source without resolving symlinks, and here only
            // /run/netns is shared, not / as on a systemd node.
            ("/var/run/netns", PathBuf::from("/run/netns")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect(),
        pods_dir: containerd.dir.join("kubelet/pods"),
        log_dir: containerd.dir.join("kubelet/logs"),
    };
    let pod =
        kube::daemonset_pod(&install, "sluice-agent", &node).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("manifest fields honoured:");
    for (field, how) in &pod.honoured {
        eprintln!("  {field}: {how}");
    }

    let mut agent = Running::start(&containerd, &pod, ip, &[]);

    // The agent process as the kernel sees it: exactly its two capabilities, no new privileges,
    // a seccomp filter, uid 0.
    let pid = containerd.container_pid(&agent.container);
    let cap_net_admin = 1u64 << 12;
    let cap_sys_admin = 1u64 << 21;
    let caps = |key: &str| u64::from_str_radix(&status_field(pid, key), 16).expect("caps");
    assert_eq!(
        caps("CapEff"),
        cap_net_admin | cap_sys_admin,
        "effective capabilities"
    );
    assert_eq!(
        caps("CapBnd"),
        cap_net_admin | cap_sys_admin,
        "bounding set"
    );
    assert_eq!(status_field(pid, "NoNewPrivs"), "1", "no_new_privs");
    assert_eq!(
        status_field(pid, "Seccomp"),
        "2",
        "a seccomp filter (RuntimeDefault)"
    );
    assert!(status_field(pid, "Uid").starts_with("0\t"));

    // Its socket directory is its own (0700), whatever mode the hostPath was created with.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(RUN_DIR)
        .expect(RUN_DIR)
        .permissions()
        .mode()
        & 0o7777;
    assert_eq!(mode, 0o700, "{RUN_DIR} is {mode:o}");
    let sock_mode = std::fs::metadata(Path::new(RUN_DIR).join("agent.sock"))
        .expect("the agent's socket")
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(sock_mode, 0o600);

    // Metrics and health listen on the node address only, not on every address of the node.
    for port in [9965, 9966] {
        let addrs = listening_on(port);
        assert_eq!(addrs, vec![ip], "port {port} listens on {addrs:?}");
    }
    let metrics = scrape(&format!("http://{ip}:9965/metrics"));
    assert!(metrics.contains("sluice_build_info"), "{metrics}");

    // The install, done by the containerised agent into the (remapped) host dirs: the static
    // plugin copied, our entry chained into the primary conflist.
    let installed = std::fs::read(bin_dir.join("sluice-cni")).expect("sluice-cni installed");
    let static_plugin =
        std::fs::read(repo().join("target/x86_64-unknown-linux-gnu/release/sluice-cni"))
            .expect("the static plugin make image shipped");
    assert!(
        installed == static_plugin,
        "the installed plugin is the static one"
    );
    let conflist: serde_json::Value = serde_json::from_slice(
        &std::fs::read(conf_dir.join("10-sluice-test.conflist")).expect("conflist"),
    )
    .expect("json");
    let entry = &conflist["plugins"][1];
    assert_eq!(entry["type"], "sluice-cni", "{conflist}");
    assert_eq!(entry["agentSocket"], "/run/sluice/agent.sock");

    // App pods, created through CRI: the runtime runs the installed plugin, which reaches the
    // containerised agent through the socket on the host.
    // Not ip_unprivileged_port_start or ping_group_range: containerd 2.x writes those into
    // every sandbox's spec, and runc applies them after CNI ADD (docs/annotations.md).
    let sysctls = (
        "sluice.dev/sysctls",
        "net.ipv4.tcp_fin_timeout=30,net.ipv4.tcp_keepalive_time=600",
    );
    let web = containerd
        .run_pod("web", &[ENABLED, sysctls])
        .unwrap_or_else(|e| panic!("REDIRECT pod: {e}"));
    let web_ns = Netns::existing(&containerd.netns_of(&web));
    let table = web_ns.sluice_table().expect("web has our table");
    assert!(table.contains("redirect to :15001"), "{table}");
    assert_eq!(sysctl_in(&web_ns, "net.ipv4.tcp_fin_timeout"), "30");
    assert_eq!(sysctl_in(&web_ns, "net.ipv4.tcp_keepalive_time"), "600");
    let _proxy = Listener::start(&web_ns, "0.0.0.0:15001", "proxy");
    assert_eq!(
        containerd.app_connects(&web, "web", "192.0.2.10", "80"),
        Ok("proxy orig=192.0.2.10:80".to_owned()),
        "REDIRECT: the app's connection lands on the proxy"
    );

    let tp = containerd
        .run_pod("tp", &[ENABLED, ("sluice.dev/mode", "tproxy")])
        .unwrap_or_else(|e| panic!("TPROXY pod: {e}"));
    let tp_ns = Netns::existing(&containerd.netns_of(&tp));
    let tp_ip = pod_ip(&tp_ns, "-4");
    let _inbound = Listener::transparent(&tp_ns, "0.0.0.0:15006", "inbound");
    assert_eq!(
        line_from(SocketAddr::new(tp_ip, 8080)),
        format!("inbound orig=- local={tp_ip}:8080"),
        "TPROXY: inbound reaches the transparent listener with its destination kept"
    );

    let dual = containerd
        .run_pod(
            "dual",
            &[
                ENABLED,
                (
                    "sluice.dev/sysctls",
                    "net.ipv4.ip_local_port_range=20000 40000",
                ),
            ],
        )
        .unwrap_or_else(|e| panic!("dual-stack pod: {e}"));
    let dual_ns = Netns::existing(&containerd.netns_of(&dual));
    let dual_ip6 = pod_ip(&dual_ns, "-6");
    let dual_ip4 = pod_ip(&dual_ns, "-4");
    assert_eq!(
        sysctl_in(&dual_ns, "net.ipv4.ip_local_port_range"),
        "20000 40000"
    );
    let _in4 = Listener::start(&dual_ns, "0.0.0.0:15006", "inbound");
    let _in6 = Listener::start(&dual_ns, "[::]:15006", "inbound6");
    assert_eq!(
        line_from(SocketAddr::new(dual_ip6, 8080)),
        format!("inbound6 orig=[{dual_ip6}]:8080"),
        "dual-stack: IPv6 inbound is captured"
    );
    assert_eq!(
        line_from(SocketAddr::new(dual_ip4, 8080)),
        format!("inbound orig={dual_ip4}:8080"),
        "dual-stack: IPv4 inbound is captured"
    );

    let plain = containerd
        .run_pod("plain", &[("team", "payments")])
        .unwrap_or_else(|e| panic!("a pod that did not opt in: {e}"));
    assert!(
        Netns::existing(&containerd.netns_of(&plain))
            .sluice_table()
            .is_none()
    );

    // `kubectl exec ds/sluice-agent -- sluicectl ...` works in the shipped container.
    let list = agent.exec(&["sluicectl", "list"]);
    for id in [&web, &tp, &dual] {
        assert!(list.contains(&id[..12]), "{id} in {list}");
        agent.exec(&["sluicectl", "check", id]);
    }
    assert!(!list.contains(&plain[..12]));
    for id in [&web, &tp, &dual, &plain] {
        containerd
            .stop_and_remove(id)
            .unwrap_or_else(|e| panic!("{e}"));
    }
    let list = agent.exec(&["sluicectl", "list"]);
    assert_eq!(
        list.lines().count(),
        1,
        "nothing attached after DEL: {list}"
    );

    // SIGTERM (a rolling update): a clean exit that keeps the install.
    assert_eq!(
        agent.stop(),
        0,
        "{}",
        std::fs::read_to_string(agent.log(0)).unwrap_or_default()
    );
    assert!(
        std::fs::read_to_string(conf_dir.join("10-sluice-test.conflist"))
            .expect("conflist")
            .contains("sluice-cni"),
        "the install stays across a restart"
    );

    // The documented uninstall: the DaemonSet run with --uninstall-on-exit, then stopped.
    agent.start_container(ip, 1, &["--uninstall-on-exit"]);
    assert_eq!(
        agent.stop(),
        0,
        "{}",
        std::fs::read_to_string(agent.log(1)).unwrap_or_default()
    );
    let conf_after = snapshot(&conf_dir);
    assert!(
        conf_after == conf_before,
        "the conf dir is restored byte for byte: before {:?}, after {:?}",
        conf_before.keys().collect::<Vec<_>>(),
        conf_after.keys().collect::<Vec<_>>()
    );
    assert_eq!(
        snapshot(&bin_dir),
        bin_before,
        "the plugin binary is removed"
    );
    drop(agent);
    for dir in pod.created.iter().rev() {
        let _ = std::fs::remove_dir_all(dir);
    }
    eprintln!(
        "the DaemonSet test took {:?} ({image_built:?} of it `make image`)",
        started.elapsed()
    );
}
