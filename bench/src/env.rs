//! The benchmark's fixtures: fresh network namespaces, a running agent, the workspace binaries,
//! and running a command (or a closure) inside a namespace.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sched::{CloneFlags, setns};

/// A workspace binary next to this one (target/<profile>/NAME).
pub fn bin(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name(name);
    if !path.exists() {
        bail!(
            "{} not found: build the workspace first (`make bench` does)",
            path.display()
        );
    }
    Ok(path)
}

/// The `sluice-cni` to measure: `$SLUICE_BENCH_PLUGIN` when set (to compare two builds of it,
/// run after run), else the static executable nodes get (`make plugin-static`, which
/// `make bench` builds: target/x86_64-unknown-linux-gnu/release/ beside target/release/), or
/// the dynamically linked build next to the bench if there is no static one.
pub fn plugin() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("SLUICE_BENCH_PLUGIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let static_plugin = exe
        .parent()
        .and_then(|release| release.parent())
        .map(|target| target.join("x86_64-unknown-linux-gnu/release/sluice-cni"));
    match static_plugin {
        Some(p) if p.exists() => Ok(p),
        _ => bin("sluice-cni"),
    }
}

/// A named netns (`ip netns add`), deleted on drop. Created and deleted outside timed regions.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let _ = Command::new("ip").args(["netns", "del", name]).output();
        let out = Command::new("ip").args(["netns", "add", name]).output()?;
        if !out.status.success() {
            bail!(
                "ip netns add {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(Netns {
            name: name.to_owned(),
        })
    }

    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    /// Runs `f` on a fresh thread that has entered this namespace. Child processes spawned
    /// there start inside it, like an init container's.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
        let file = File::open(self.path()).with_context(|| format!("open {}", self.path()))?;
        std::thread::scope(|s| {
            s.spawn(move || -> anyhow::Result<T> {
                setns(&file, CloneFlags::CLONE_NEWNET).context("setns")?;
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
        })
    }

    /// `ip netns exec NAME ARGS` output, for verification (never timed).
    pub fn exec(&self, args: &[&str]) -> anyhow::Result<Output> {
        Ok(Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()?)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A running `sluice-agent` (release build) on a private socket.
#[derive(Debug)]
pub struct Agent {
    child: Child,
    pub dir: PathBuf,
    pub socket: PathBuf,
}

impl Agent {
    pub fn start() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("sluice-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let socket = dir.join("agent.sock");
        let child = Command::new(bin("sluice-agent")?)
            .args(["--metrics-addr", "127.0.0.1:0"])
            .arg("--socket")
            .arg(&socket)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn sluice-agent")?;
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            if start.elapsed() > Duration::from_secs(10) {
                bail!("sluice-agent did not open {} within 10 s", socket.display());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(Agent { child, dir, socket })
    }

    pub fn socket_str(&self) -> String {
        self.socket.display().to_string()
    }

    /// Resident set size from /proc, in KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        rss_kib(self.child.id())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS missing")
}

/// Runs a command with `stdin`, failing on a non-zero exit.
pub fn run_with_stdin(cmd: &mut Command, stdin: &[u8]) -> anyhow::Result<Output> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawn {cmd:?}"))?;
    child.stdin.take().context("stdin")?.write_all(stdin)?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{:?} exited {}: {}{}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}
