//! Method 7: what an istio-init container costs, without Kubernetes. A runc bundle with a
//! busybox rootfs, the host's /usr bind-mounted read-only (for iptables and its libraries),
//! only CAP_NET_ADMIN + CAP_NET_RAW, joined to the pod's netns, runs iptables-restore and
//! exits. The bundle is built once; per sample only config.json's netns path changes
//! (untimed) and `runc run` is timed.

use std::os::unix::fs::symlink;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::env::Netns;
use crate::rules::ISTIO_IPT;

#[derive(Debug)]
pub struct InitContainer {
    dir: PathBuf,
    runc: PathBuf,
}

const CAPS: [&str; 2] = ["CAP_NET_ADMIN", "CAP_NET_RAW"];

impl InitContainer {
    /// Builds the bundle; fails (and the method is skipped with the reason) when runc or
    /// busybox are missing.
    pub fn prepare() -> anyhow::Result<Self> {
        let runc = which("runc").context("runc is not installed (Debian package runc)")?;
        let busybox = ["/bin/busybox", "/usr/bin/busybox"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .context("busybox is not installed (Debian package busybox-static)")?;
        let dir = std::env::temp_dir().join(format!("sluice-bench-init-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let rootfs = dir.join("rootfs");
        for d in ["bin", "proc", "dev", "usr", "rules", "run", "tmp", "etc"] {
            std::fs::create_dir_all(rootfs.join(d))?;
        }
        std::fs::copy(&busybox, rootfs.join("bin/busybox"))?;
        symlink("busybox", rootfs.join("bin/sh"))?;
        // Merged /usr: the loader and libraries are reached through these links.
        symlink("usr/lib", rootfs.join("lib"))?;
        symlink("usr/lib64", rootfs.join("lib64"))?;
        symlink("usr/sbin", rootfs.join("sbin"))?;
        std::fs::create_dir_all(dir.join("rules"))?;
        std::fs::write(dir.join("rules/istio.ipt"), ISTIO_IPT)?;
        std::fs::create_dir_all(dir.join("state"))?;
        Ok(InitContainer { dir, runc })
    }

    fn config(&self, netns: &str) -> serde_json::Value {
        serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {
                "terminal": false,
                "user": {"uid": 0, "gid": 0},
                "args": ["/usr/sbin/xtables-nft-multi", "iptables-restore", "/rules/istio.ipt"],
                "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
                "cwd": "/",
                "capabilities": {"bounding": CAPS, "effective": CAPS, "permitted": CAPS},
                "noNewPrivileges": true
            },
            "root": {"path": "rootfs", "readonly": true},
            "hostname": "istio-init",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
                {"destination": "/run", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "mode=755"]},
                {"destination": "/usr", "type": "bind", "source": "/usr", "options": ["rbind", "ro"]},
                {"destination": "/rules", "type": "bind", "source": self.dir.join("rules"), "options": ["rbind", "ro"]}
            ],
            "linux": {
                "namespaces": [
                    {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                    {"type": "network", "path": netns}
                ],
                "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list"],
                "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger"]
            }
        })
    }

    /// Runs the init container once in `ns`; only `runc run` is timed.
    pub fn run(&self, id: &str, ns: &Netns) -> anyhow::Result<Duration> {
        std::fs::write(
            self.dir.join("config.json"),
            self.config(&ns.path()).to_string(),
        )?;
        let mut cmd = Command::new(&self.runc);
        cmd.arg("--root")
            .arg(self.dir.join("state"))
            .args(["run", "--bundle"])
            .arg(&self.dir)
            .arg(id);
        let start = Instant::now();
        let out = cmd.output().context("runc run")?;
        let took = start.elapsed();
        if !out.status.success() {
            bail!(
                "runc run exited {}: {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(took)
    }
}

impl Drop for InitContainer {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
        .into_iter()
        .chain(
            ["/usr/sbin", "/usr/bin", "/sbin"]
                .iter()
                .map(|d| PathBuf::from(d).join(name)),
        )
        .find(|p| p.exists())
}
