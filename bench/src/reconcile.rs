//! What one reconcile pass costs the node: the agent with discovery on, over a real
//! containerd with N READY sandboxes that all ask for capture (each captured by its ADD, so
//! every pass reads every pod's state and finds nothing to repair: the steady state). Per
//! size: the pass's wall time (the agent's `sluice_reconcile_pass_duration_seconds`), the
//! agent's CPU time per pass (/proc utime + stime over the passes, the agent otherwise idle),
//! containerd's over the same passes (it answers the agent's calls; otherwise idle too), and
//! the share of one core the agent's CPU makes at the default interval.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use sluice_tests::cri::{Chain, Containerd};
use sluice_tests::{Agent, scrape, value};

/// Seconds between passes while measuring: passes follow each other as fast as allowed.
const INTERVAL_S: u64 = 1;
/// The agent's default `reconcile-interval` (daemon/src/node/reconcile.rs, docs/install.md).
const DEFAULT_INTERVAL_S: f64 = 15.0;

#[derive(Debug, Clone, Serialize)]
pub struct PassCost {
    pub sandboxes: usize,
    pub passes: u64,
    pub wall_ms_mean: f64,
    pub cpu_ms_per_pass: f64,
    /// containerd's CPU time over the same passes, per pass (answering the agent's calls).
    pub runtime_cpu_ms_per_pass: f64,
    /// CPU per pass over the default interval (15 s): the share of one core discovery takes.
    pub core_share_at_default: f64,
}

fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command's closing parenthesis: state is 3rd, utime 14th, stime 15th.
    let rest = stat.rsplit_once(')').context("stat format")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

fn pass_totals(url: &str) -> (f64, f64) {
    let m = scrape(url);
    (
        value(&m, "sluice_reconcile_pass_duration_seconds_sum"),
        value(&m, "sluice_reconcile_pass_duration_seconds_count"),
    )
}

pub fn run(
    sizes: &[usize],
    passes: u64,
    pb: &indicatif::ProgressBar,
) -> anyhow::Result<Vec<PassCost>> {
    let name = "bench-reconcile";
    let cri_socket = Containerd::dir_for(name).join("containerd.sock");
    let agent = Agent::start_with(
        name,
        &[
            "--cri-socket",
            &cri_socket.display().to_string(),
            "--reconcile-interval",
            &INTERVAL_S.to_string(),
        ],
    );
    let containerd = Containerd::start(name, &Chain::new(Some(agent.socket_str()), 42));
    let url = agent.metrics_url();
    let ticks_per_s =
        nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.context("CLK_TCK")? as f64;
    let default_interval = DEFAULT_INTERVAL_S;
    let mut out = Vec::new();
    let mut started = 0;
    for &n in sizes {
        while started < n {
            containerd
                .run_pod(
                    &format!("r{started}"),
                    &[("sluice.dev/redirect", "enabled")],
                )
                .map_err(|e| anyhow::anyhow!("RunPodSandbox r{started}: {e}"))?;
            started += 1;
            pb.inc(1);
        }
        // One whole pass over all n first, then the measured ones.
        let (_, c0) = pass_totals(&url);
        wait_passes(&url, c0 + 2.0)?;
        let (sum0, count0) = pass_totals(&url);
        let cpu0 = cpu_ticks(agent.pid())?;
        let rt0 = cpu_ticks(containerd.pid())?;
        wait_passes(&url, count0 + passes as f64)?;
        let cpu1 = cpu_ticks(agent.pid())?;
        let rt1 = cpu_ticks(containerd.pid())?;
        let (sum1, count1) = pass_totals(&url);
        let done = count1 - count0;
        let cpu_ms = (cpu1 - cpu0) as f64 / ticks_per_s * 1e3 / done;
        out.push(PassCost {
            sandboxes: n,
            passes: done as u64,
            wall_ms_mean: (sum1 - sum0) / done * 1e3,
            cpu_ms_per_pass: cpu_ms,
            runtime_cpu_ms_per_pass: (rt1 - rt0) as f64 / ticks_per_s * 1e3 / done,
            core_share_at_default: cpu_ms / 1e3 / default_interval,
        });
    }
    // Steady state: nothing was repaired and every pod is captured.
    let m = scrape(&url);
    anyhow::ensure!(
        value(&m, "sluice_repairs_total{reason=\"missing\"}") == 0.0
            && value(&m, "sluice_uncaptured_pods") == 0.0,
        "the measured passes were not the steady state (repairs or uncaptured pods)"
    );
    drop(containerd);
    drop(agent);
    Ok(out)
}

fn wait_passes(url: &str, count: f64) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    while pass_totals(url).1 < count {
        anyhow::ensure!(Instant::now() < deadline, "reconcile passes stopped");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}
