//! Harness for sluice's integration tests: real network namespaces wired with veth, listeners
//! that report where a connection was headed (`SO_ORIGINAL_DST`), clients with a chosen
//! fsuid/fsgid (what nftables' skuid/skgid see), and drivers for the real `sluice-agent`,
//! `sluice-cni` and `sluicectl` binaries. Every resource is released in `Drop`.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub mod cri;
pub mod kube;
pub mod render;

use nix::sched::{CloneFlags, setns};
use nix::unistd::{Gid, Uid};

/// Fails the calling test unless we are root. Kernel tests must never turn into silent passes:
/// without root they fail (always, and in particular under `CI=true`).
pub fn require_root() {
    if !Uid::effective().is_root() {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true");
        panic!(
            "this test needs root (netns, nftables){}; run it as root, e.g. `sudo make test`",
            if ci {
                " and CI=true forbids skipping it"
            } else {
                ""
            }
        );
    }
}

/// Runs a command and panics with its output when it fails.
pub fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("spawning {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Path of one of the workspace's binaries next to the running test (target/<profile>/NAME).
/// `make test` builds them first.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // Test binaries run from target/<profile>/deps, `cargo run` ones from target/<profile>.
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(name))
        .collect();
    candidates.iter().find(|p| p.exists()).cloned().unwrap_or_else(|| {
        panic!(
            "{name} not found in {candidates:?}: build the binaries first (`cargo build --workspace --bins`, which `make test` does)"
        )
    })
}

/// A named network namespace (`ip netns add`), deleted on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
    /// Deleted on drop (false for a namespace someone else owns, e.g. containerd's).
    owned: bool,
}

impl Netns {
    pub fn new(name: &str) -> Self {
        // A leftover from an aborted earlier run would make `add` fail.
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        sh(&["ip", "netns", "add", name]);
        Netns {
            name: name.to_owned(),
            owned: true,
        }
    }

    /// A handle on an existing `/var/run/netns/NAME` owned by someone else (not deleted).
    pub fn existing(path: &str) -> Self {
        let name = path
            .strip_prefix("/var/run/netns/")
            .or_else(|| path.strip_prefix("/run/netns/"))
            .unwrap_or_else(|| panic!("{path} is not a named netns"));
        Netns {
            name: name.to_owned(),
            owned: false,
        }
    }

    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    /// `ip -n NAME ...`
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["ip", "-n", &self.name];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// `ip netns exec NAME ...`, returning the output without checking status.
    pub fn exec(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .expect("ip netns exec")
    }

    /// `nft list table inet sluice` in this netns, or `None` when there is no such table.
    pub fn sluice_table(&self) -> Option<String> {
        let out = self.exec(&["nft", "list", "table", "inet", "sluice"]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `f` on a fresh thread inside this namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let file = File::open(self.path()).expect("open netns");
        std::thread::spawn(move || {
            setns(&file, CloneFlags::CLONE_NEWNET).expect("setns into test netns");
            f()
        })
        .join()
        .expect("netns thread panicked")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

pub const POD_IP: &str = "10.99.0.2";
pub const POD_IP6: &str = "fd00:99::2";
pub const PEER_IP6: &str = "fd00:99::1";
/// The peer's second IPv6 address, in another network.
pub const PEER_FAR_IP6: &str = "fd00:98::1";
pub const PEER_IP: &str = "10.99.0.1";
/// A second address of the peer, in another network, for CIDR include/exclude tests.
pub const PEER_FAR_IP: &str = "10.98.0.1";

/// A "pod" netns and a "peer" netns joined by a veth pair (eth0 on both sides), dual-stack.
/// pod: 10.99.0.2/24 and fd00:99::2/64, default routes via the peer; peer: 10.99.0.1/24,
/// 10.98.0.1/32, fd00:99::1/64 and fd00:98::1/128. IPv6 addresses skip DAD (`nodad`) so
/// they are usable at once.
/// The pod's `lo` is left down, as a fresh sandbox has it: sluice brings it up.
#[derive(Debug)]
pub struct Topology {
    pub pod: Netns,
    pub peer: Netns,
}

impl Topology {
    pub fn new(test: &str) -> Self {
        let pod = Netns::new(&format!("sl-{test}-pod"));
        let peer = Netns::new(&format!("sl-{test}-peer"));
        sh(&[
            "ip", "link", "add", "eth0", "netns", &pod.name, "type", "veth", "peer", "name",
            "eth0", "netns", &peer.name,
        ]);
        pod.ip(&["addr", "add", &format!("{POD_IP}/24"), "dev", "eth0"]);
        pod.ip(&["link", "set", "eth0", "up"]);
        pod.ip(&["route", "add", "default", "via", PEER_IP]);
        pod.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{POD_IP6}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        pod.ip(&["-6", "route", "add", "default", "via", PEER_IP6]);
        peer.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{PEER_IP6}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        peer.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{PEER_FAR_IP6}/128"),
            "dev",
            "eth0",
            "nodad",
        ]);
        peer.ip(&["addr", "add", &format!("{PEER_IP}/24"), "dev", "eth0"]);
        peer.ip(&["addr", "add", &format!("{PEER_FAR_IP}/32"), "dev", "eth0"]);
        peer.ip(&["link", "set", "eth0", "up"]);
        peer.ip(&["link", "set", "lo", "up"]);
        peer.ip(&["route", "add", "10.99.0.0/16", "dev", "eth0"]);
        Topology { pod, peer }
    }
}

/// A TCP listener inside a netns that answers every connection with one line:
/// `<label> orig=<SO_ORIGINAL_DST if it differs from the local address, else ->` (a transparent one adds ` local=<getsockname>`,
/// the original destination a TPROXY'd connection keeps) and closes. IPv6 listeners are
/// IPv6-only, so `[::]:P` and `0.0.0.0:P` coexist. Stopped on drop.
#[derive(Debug)]
pub struct Listener {
    fd: TcpListener,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A listening socket bound to `addr`, optionally with IP_TRANSPARENT (what a TPROXY proxy
/// sets so the kernel hands it connections for any destination).
fn listen_socket(addr: SocketAddr, transparent: bool) -> std::io::Result<TcpListener> {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrStorage, bind, listen, setsockopt,
        socket, sockopt,
    };
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    if addr.is_ipv6() {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    }
    if transparent {
        setsockopt(&fd, sockopt::IpTransparent, &true)?;
    }
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    listen(&fd, Backlog::new(128).map_err(std::io::Error::from)?)?;
    Ok(TcpListener::from(fd))
}

/// Where a redirected connection was headed: `SO_ORIGINAL_DST` (or its IPv6 twin).
fn original_dst(conn: &TcpStream) -> String {
    use nix::sys::socket::{getsockopt, sockopt};
    if let Ok(sa) = getsockopt(conn, sockopt::OriginalDst) {
        let ip = std::net::Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr));
        return format!("{ip}:{}", u16::from_be(sa.sin_port));
    }
    if let Ok(sa) = getsockopt(conn, sockopt::Ip6tOriginalDst) {
        let ip = std::net::Ipv6Addr::from(sa.sin6_addr.s6_addr);
        return format!("[{ip}]:{}", u16::from_be(sa.sin6_port));
    }
    "-".to_owned()
}

impl Listener {
    pub fn start(ns: &Netns, addr: &str, label: &str) -> Self {
        Self::start_with(ns, addr, label, false)
    }

    /// A listener with IP_TRANSPARENT, reporting its local address too.
    pub fn transparent(ns: &Netns, addr: &str, label: &str) -> Self {
        Self::start_with(ns, addr, label, true)
    }

    fn start_with(ns: &Netns, addr: &str, label: &str, transparent: bool) -> Self {
        let addr: SocketAddr = addr.parse().expect("listener address");
        let listener = ns.run(move || {
            listen_socket(addr, transparent).unwrap_or_else(|e| panic!("bind {addr}: {e}"))
        });
        let fd = listener.try_clone().expect("clone listener");
        let stop = Arc::new(AtomicBool::new(false));
        let label = label.to_owned();
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut conn) = conn else { continue };
                let local = conn
                    .local_addr()
                    .map_or_else(|e| e.to_string(), |a| a.to_string());
                // conntrack answers SO_ORIGINAL_DST for any tracked connection; only a
                // destination that was rewritten is news ("-" otherwise).
                let mut orig = original_dst(&conn);
                if orig == local {
                    orig = "-".to_owned();
                }
                if transparent {
                    let _ = writeln!(conn, "{label} orig={orig} local={local}");
                } else {
                    let _ = writeln!(conn, "{label} orig={orig}");
                }
            }
        });
        Listener {
            fd,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // shutdown(2) on a listening socket wakes a blocked accept(2) on Linux.
        let _ = nix::sys::socket::shutdown(self.fd.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A UDP socket inside a netns that answers every datagram with its label. Stopped on drop.
#[derive(Debug)]
pub struct UdpListener {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UdpListener {
    pub fn start(ns: &Netns, addr: &str, label: &str) -> Self {
        let addr: SocketAddr = addr.parse().expect("listener address");
        let socket =
            ns.run(move || udp_socket(addr).unwrap_or_else(|e| panic!("bind udp {addr}: {e}")));
        // A short receive timeout lets the thread notice `stop` without a wake-up packet.
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .expect("udp read timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let label = label.to_owned();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !stopping.load(Ordering::SeqCst) {
                if let Ok((_, from)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(label.as_bytes(), from);
                }
            }
        });
        UdpListener {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for UdpListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A UDP socket bound to `addr` (IPv6-only for IPv6 addresses).
fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrStorage, bind, setsockopt, socket, sockopt,
    };
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Datagram, SockFlag::SOCK_CLOEXEC, None)?;
    if addr.is_ipv6() {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    }
    bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    Ok(std::net::UdpSocket::from(fd))
}

/// Sends one UDP datagram from inside `ns` with the given fsuid/fsgid and returns the label
/// of whoever answered, or the error (e.g. a timeout when nobody did).
pub fn udp_as(ns: &Netns, uid: u32, gid: u32, to: &str) -> Result<String, String> {
    let to: SocketAddr = to.parse().expect("target address");
    ns.run(move || {
        nix::unistd::setfsgid(Gid::from_raw(gid));
        nix::unistd::setfsuid(Uid::from_raw(uid));
        let any: SocketAddr = if to.is_ipv4() {
            "0.0.0.0:0".parse().expect("any v4")
        } else {
            "[::]:0".parse().expect("any v6")
        };
        let socket = udp_socket(any).map_err(|e| e.to_string())?;
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .map_err(|e| e.to_string())?;
        socket.send_to(b"probe", to).map_err(|e| e.to_string())?;
        let mut buf = [0u8; 512];
        let (n, _) = socket.recv_from(&mut buf).map_err(|e| e.to_string())?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    })
}

/// Connects from inside `ns` with the given fsuid/fsgid (what skuid/skgid match) and returns
/// the line the accepting listener wrote, or the connect error.
pub fn connect_as(ns: &Netns, uid: u32, gid: u32, to: &str) -> Result<String, String> {
    connect_from(ns, uid, gid, None, to)
}

/// Like [`connect_as`], binding the source address `src` first (e.g. 127.0.0.6).
pub fn connect_from(
    ns: &Netns,
    uid: u32,
    gid: u32,
    src: Option<&str>,
    to: &str,
) -> Result<String, String> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrStorage, bind, connect, setsockopt, socket,
        sockopt,
    };
    let to: SocketAddr = to.parse().expect("target address");
    let src: Option<SocketAddr> = src.map(|s| {
        let ip: std::net::IpAddr = s.parse().expect("source address");
        SocketAddr::new(ip, 0)
    });
    ns.run(move || {
        nix::unistd::setfsgid(Gid::from_raw(gid));
        nix::unistd::setfsuid(Uid::from_raw(uid));
        let family = if to.is_ipv4() {
            AddressFamily::Inet
        } else {
            AddressFamily::Inet6
        };
        let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)
            .map_err(|e| e.to_string())?;
        let limit = nix::sys::time::TimeVal::new(3, 0);
        // SO_SNDTIMEO also bounds a blocking connect(2) on Linux.
        setsockopt(&fd, sockopt::SendTimeout, &limit).map_err(|e| e.to_string())?;
        setsockopt(&fd, sockopt::ReceiveTimeout, &limit).map_err(|e| e.to_string())?;
        if let Some(src) = src {
            bind(fd.as_raw_fd(), &SockaddrStorage::from(src))
                .map_err(|e| format!("bind {src}: {e}"))?;
        }
        connect(fd.as_raw_fd(), &SockaddrStorage::from(to)).map_err(|e| e.desc().to_owned())?;
        let stream = TcpStream::from(fd);
        let mut line = String::new();
        BufReader::new(stream)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        Ok(line.trim().to_owned())
    })
}

/// A control-plane deadline (agent start-up, the plugin's timeout, polling) scaled for the
/// machine the suite runs on: `SLUICE_TEST_TIME_SCALE` (default 1) is set by the kernel matrix,
/// whose VMs run in software emulation many times slower than real hardware. Deadlines are
/// there to turn a hang into a failure, never to assert speed; data-plane timeouts (a dropped
/// connection) are not scaled.
pub fn scaled(d: Duration) -> Duration {
    let factor = std::env::var("SLUICE_TEST_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|&f| f >= 1)
        .unwrap_or(1);
    d * factor
}

/// Polls `cond` until it holds or `deadline` (scaled, see [`scaled`]) passes.
pub fn wait_for(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = scaled(deadline);
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A running `sluice-agent` on a private socket; SIGTERM + wait on drop.
#[derive(Debug)]
pub struct Agent {
    child: Option<Child>,
    pub dir: PathBuf,
    pub socket: PathBuf,
    /// Where the agent's stderr (its logs) goes.
    pub log: PathBuf,
    extra: Vec<String>,
    /// A command the agent runs under (e.g. `setpriv` limiting its capabilities).
    wrapper: Vec<String>,
}

impl Agent {
    pub fn start(test: &str) -> Self {
        Self::start_with(test, &[])
    }

    pub fn start_with(test: &str, extra: &[&str]) -> Self {
        Self::start_wrapped(test, &[], extra)
    }

    /// Starts the agent as `WRAPPER... sluice-agent --socket S EXTRA...`.
    pub fn start_wrapped(test: &str, wrapper: &[&str], extra: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(format!("sluice-test-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let socket = dir.join("agent.sock");
        let log =
            std::env::temp_dir().join(format!("sluice-agent-{test}-{}.log", std::process::id()));
        let mut agent = Agent {
            child: None,
            dir,
            socket,
            log,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            wrapper: wrapper.iter().map(|s| s.to_string()).collect(),
        };
        agent.spawn();
        agent
    }

    fn spawn(&mut self) {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("agent log file");
        let mut cmd = match self.wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin("sluice-agent"));
                c
            }
            None => Command::new(bin("sluice-agent")),
        };
        cmd.arg("--socket").arg(&self.socket);
        // Tests run many agents at once: an ephemeral metrics port each (see `metrics_url`).
        if !self.extra.iter().any(|a| a == "--metrics-addr") {
            cmd.args(["--metrics-addr", "127.0.0.1:0"]);
        }
        // No sandbox discovery unless a test asks for it with its own runtime's socket (this
        // machine may run another containerd at the default path).
        if !self.extra.iter().any(|a| a == "--cri-socket") {
            cmd.args(["--cri-socket", "off"]);
        }
        let child = cmd
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn sluice-agent");
        self.child = Some(child);
        let socket = self.socket.clone();
        wait_for("the agent socket", Duration::from_secs(10), || {
            std::os::unix::net::UnixStream::connect(&socket).is_ok()
        });
    }

    /// Stops the agent (SIGTERM) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// The agent's metrics URL, from the address it logged when binding.
    pub fn metrics_url(&self) -> String {
        let mut addr = None;
        wait_for(
            "the agent's metrics address in its log",
            Duration::from_secs(10),
            || {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                addr = log
                    .lines()
                    .rev()
                    .find(|l| l.contains("metrics served"))
                    .and_then(|l| l.split("addr=").nth(1))
                    .map(|a| a.split_whitespace().next().unwrap_or("").to_owned());
                addr.is_some()
            },
        );
        format!("http://{}/metrics", addr.unwrap_or_default())
    }

    /// The agent's pid (its /proc entry shows the agent's own namespaces).
    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(Child::id)
            .expect("agent is running")
    }

    pub fn socket_str(&self) -> String {
        self.socket.display().to_string()
    }

    /// `sluicectl --socket <ours> ARGS`
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(bin("sluicectl"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run sluicectl")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
        // Keep the log of a failing test for a look; drop it otherwise.
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// The stdin containerd sends a chained plugin (see shared/reference/containerd-ADD-stdin.json),
/// with our conflist keys and the given annotations and prevResult.
pub fn conf(
    version: &str,
    socket: &str,
    annotations: &[(&str, &str)],
    prev: Option<&str>,
) -> String {
    let ann: serde_json::Map<String, serde_json::Value> = annotations
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::String(v.to_string())))
        .collect();
    let conf = serde_json::json!({
        "capabilities": {"io.kubernetes.cri.pod-annotations": true, "portMappings": true},
        "cniVersion": version,
        "name": "example-net",
        "type": "sluice-cni",
        "agentSocket": socket,
        "timeoutMs": scaled(Duration::from_millis(2000)).as_millis() as u64,
        "runtimeConfig": {"io.kubernetes.cri.pod-annotations": ann},
    });
    let mut text = conf.to_string();
    if let Some(prev) = prev {
        // Spliced in as text so the exact bytes reach the plugin.
        text.pop();
        text.push_str(&format!(",\"prevResult\":{prev}}}"));
    }
    text
}

/// A prevResult as the bridge plugin prints it, for the given version.
pub fn prev_result(version: &str) -> String {
    prev_result_with(version, &[POD_CIDR4])
}

/// The pod's IPv4 address as prevResult carries it.
pub const POD_CIDR4: &str = "10.99.0.2/24";
/// The pod's IPv6 address as prevResult carries it.
pub const POD_CIDR6: &str = "fd00:99::2/64";

/// A prevResult like the bridge plugin's, with these pod addresses.
pub fn prev_result_with(version: &str, ips: &[&str]) -> String {
    let ips: Vec<String> = ips
        .iter()
        .map(|a| format!(r#"{{"address":"{a}","interface":2}}"#))
        .collect();
    format!(
        r#"{{"cniVersion":"{version}","interfaces":[{{"name":"cni0","mac":"ae:27:49:13:d0:b5"}},{{"name":"veth887c2dfd","mac":"9e:50:a9:d6:e8:cf"}},{{"name":"eth0","mac":"c2:3f:67:e2:46:fa","sandbox":"/var/run/netns/x"}}],"ips":[{}],"routes":[{{"dst":"0.0.0.0/0"}}],"dns":{{"nameservers":["10.96.0.10"]}}}}"#,
        ips.join(",")
    )
}

/// A table listing with the owner's attach time masked (`at=0`): what differs between two
/// ADDs of the same plan at different times.
pub fn untimed(listing: &str) -> String {
    let mut out = String::with_capacity(listing.len());
    let mut rest = listing;
    while let Some(i) = rest.find(" at=") {
        out.push_str(&rest[..i + 4]);
        rest = &rest[i + 4..];
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        out.push('0');
        rest = &rest[digits..];
    }
    out.push_str(rest);
    out
}

/// The interfaces a table listing's owner counts (its `if=` comments), in order.
pub fn counted(listing: &str) -> Vec<String> {
    listing
        .lines()
        .filter(|l| l.contains("comment \"sluice/v2 if="))
        .filter_map(|l| l.split(" if=").nth(1)?.split(' ').next().map(str::to_owned))
        .collect()
}

/// The chains of a table listing, by name.
pub fn chains(listing: &str) -> Vec<String> {
    listing
        .lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("chain ")?
                .strip_suffix(" {")
                .map(str::to_owned)
        })
        .collect()
}

/// What one run of the plugin produced.
#[derive(Debug)]
pub struct CniRun {
    pub exit: i32,
    pub stdout: String,
    pub stderr: String,
}

impl CniRun {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("plugin stdout is not JSON ({e}): {:?}", self.stdout))
    }

    /// The CNI error code, asserting the run failed with error JSON.
    pub fn error_code(&self) -> u64 {
        assert_eq!(self.exit, 1, "expected a CNI error, got {self:?}");
        self.json()["code"].as_u64().expect("error JSON has a code")
    }
}

/// Runs the real `sluice-cni` like a runtime does.
pub fn cni(command: &str, container_id: &str, netns: &str, stdin: &str) -> CniRun {
    cni_on("eth0", command, container_id, netns, stdin)
}

/// [`cni`] for the attachment on interface `ifname` (a secondary network's is e.g. `net1`).
pub fn cni_on(ifname: &str, command: &str, container_id: &str, netns: &str, stdin: &str) -> CniRun {
    let mut child = Command::new(bin("sluice-cni"))
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container_id)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", ifname)
        .env("CNI_PATH", "/usr/lib/cni")
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=pod-{container_id};K8S_POD_INFRA_CONTAINER_ID={container_id};K8S_POD_UID=uid-{container_id}"),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sluice-cni");
    // A plugin may stop reading early (it refuses stdin past its size limit): a broken pipe
    // is its answer, not the harness's failure.
    if let Err(e) = child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
    {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "write stdin: {e}");
    }
    let out = child.wait_with_output().expect("wait sluice-cni");
    CniRun {
        exit: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// GET a metrics URL over plain HTTP/1.1; the whole response, status line included.
pub fn scrape(url: &str) -> String {
    let rest = url.strip_prefix("http://").expect("http url");
    let (host, path) = rest.split_once('/').expect("path");
    let mut stream = std::net::TcpStream::connect(host).expect("connect to metrics");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    std::io::Write::write_fmt(
        &mut stream,
        format_args!("GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
    )
    .expect("request");
    let mut body = String::new();
    std::io::Read::read_to_string(&mut stream, &mut body).expect("response");
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    body
}

/// The value of the first sample of `series` (name with labels, as printed).
pub fn value(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
}
