//! The pod-level benchmark: how long until a pod's network is ready *with capture in place*,
//! through a real containerd and its CRI plugin (the harness of the CRI tests).
//!
//! - A `sandbox+sluice`: RunPodSandbox on a containerd whose conflist chains sluice-cni after
//!   bridge + host-local, for an Istio-annotated pod: capture happens inside the call.
//! - B `sandbox+init`: RunPodSandbox on a containerd with bridge + host-local only, then an
//!   init container (the busybox image, the host's /usr bind-mounted read-only, only
//!   CAP_NET_ADMIN + CAP_NET_RAW) created, started and waited for until it exits after
//!   `iptables-restore` of the same rules (istio-cni's `basic` golden) — what istio-init costs.
//! - C `sandbox`: RunPodSandbox on that plain containerd, no capture at all (the floor).
//!
//! Samples are interleaved A, B, C so drift hits all three alike; teardown (Stop + Remove) is
//! untimed. The first sample of A and of B is verified: our table / the ISTIO chains exist.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;
use sluice_proto::cri::{
    Capability, ContainerConfig, ContainerMetadata, ImageSpec, LinuxContainerConfig,
    LinuxContainerSecurityContext, Mount, NamespaceOption,
};
use sluice_tests::cri::{Chain, Containerd, IMAGE};

use crate::rules::ISTIO_IPT;
use crate::stats::{Summary, summarize};

const ISTIO_STATUS: (&str, &str) = (
    "sidecar.istio.io/status",
    r#"{"containers":["istio-proxy"]}"#,
);

/// A mean with its 95 % confidence interval (normal approximation) and the median.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Share {
    pub n: usize,
    pub mean_ms: f64,
    pub ci95_ms: f64,
    pub p50_ms: f64,
}

fn share(v: &[f64]) -> Option<Share> {
    if v.len() < 2 {
        return None;
    }
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    let mut sorted = v.to_vec();
    sorted.sort_by(f64::total_cmp);
    Some(Share {
        n: v.len(),
        mean_ms: mean,
        ci95_ms: 1.96 * (var / n).sqrt(),
        p50_ms: sorted[sorted.len() / 2],
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct PodResult {
    pub with_sluice: Option<Summary>,
    pub with_init_container: Option<Summary>,
    pub no_capture: Option<Summary>,
    /// A − C and B − C at p50/p90/p99 (ms): what capture adds to pod network readiness.
    pub sluice_overhead_ms: [f64; 3],
    pub init_overhead_ms: [f64; 3],
    /// B / A at p50.
    pub init_over_sluice_p50: f64,
    /// Measured directly inside A: sluice-cni's own run (its first to its last timestamp, as
    /// it printed them into containerd's log), exec and exit not included.
    pub sluice_share: Option<Share>,
    /// Measured directly inside B: CreateContainer to the init container's observed exit.
    pub init_share: Option<Share>,
}

pub struct PodSamples {
    pub a: Vec<Duration>,
    pub b: Vec<Duration>,
    pub c: Vec<Duration>,
    /// sluice-cni's in-process time per A sample, ms.
    pub a_plugin_ms: Vec<f64>,
    /// The init container's create-to-exit time per B sample, ms.
    pub b_init_ms: Vec<f64>,
}

/// The newest `sluice-cni timing` line in containerd's log after byte `from`: main → done, ms.
fn plugin_ms(log: &Path, from: &mut usize) -> anyhow::Result<f64> {
    let text = std::fs::read_to_string(log)?;
    let new = text.get(*from..).unwrap_or_default();
    *from = text.len();
    let line = new
        .lines()
        .rev()
        .find_map(|l| l.split_once("sluice-cni timing ").map(|(_, t)| t))
        .context("no sluice-cni timing line in containerd's log")?;
    let mark = |name: &str| {
        line.split_whitespace().find_map(|kv| {
            kv.strip_prefix(name)?
                .strip_prefix('=')?
                .parse::<u64>()
                .ok()
        })
    };
    let (main, done) = mark("main").zip(mark("done")).context("main/done marks")?;
    Ok((done as f64 - main as f64) / 1e6)
}

fn init_container(rules: &Path) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: "istio-init".into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: IMAGE.into(),
            ..Default::default()
        }),
        command: vec![
            "/usr/sbin/xtables-nft-multi".into(),
            "iptables-restore".into(),
            "/rules/istio.ipt".into(),
        ],
        envs: Vec::new(),
        mounts: vec![
            Mount {
                container_path: "/usr".into(),
                host_path: "/usr".into(),
                readonly: true,
                ..Default::default()
            },
            Mount {
                container_path: "/rules/istio.ipt".into(),
                host_path: rules.display().to_string(),
                readonly: true,
                ..Default::default()
            },
        ],
        log_path: "istio-init.log".into(),
        linux: Some(LinuxContainerConfig {
            security_context: Some(LinuxContainerSecurityContext {
                capabilities: Some(Capability {
                    add_capabilities: vec!["NET_ADMIN".into(), "NET_RAW".into()],
                    drop_capabilities: vec!["ALL".into()],
                    ..Default::default()
                }),
                run_as_user: Some(sluice_proto::cri::Int64Value { value: 0 }),
                namespace_options: Some(NamespaceOption::default()),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn timed_sandbox(
    cd: &Containerd,
    name: &str,
    ann: &[(&str, &str)],
) -> anyhow::Result<(String, Duration)> {
    let t = Instant::now();
    let id = cd
        .run_pod(name, ann)
        .map_err(|m| anyhow::anyhow!("RunPodSandbox {name}: {m}"))?;
    Ok((id, t.elapsed()))
}

/// Runs `warmup + n` interleaved rounds of A, B and C.
pub fn run(
    agent_socket: &str,
    warmup: usize,
    n: usize,
    pb: &indicatif::ProgressBar,
) -> anyhow::Result<PodSamples> {
    let sluiced = Containerd::start(
        "bench-a",
        &Chain {
            plugin_timing: true,
            ..Chain::new(Some(agent_socket.to_owned()), 40)
        },
    );
    let mut log_at = 0;
    let plain = Containerd::start("bench-bc", &Chain::new(None, 41));
    let rules = plain.dir.join("istio.ipt");
    std::fs::write(&rules, ISTIO_IPT).context("writing the init container's rules")?;
    let mut out = PodSamples {
        a: Vec::new(),
        b: Vec::new(),
        c: Vec::new(),
        a_plugin_ms: Vec::new(),
        b_init_ms: Vec::new(),
    };
    for i in 0..warmup + n {
        let keep = i >= warmup;

        let (id, a) = timed_sandbox(&sluiced, &format!("a{i}"), &[ISTIO_STATUS])?;
        let a_plugin = plugin_ms(&sluiced.log, &mut log_at)?;
        if i == 0 {
            let ns = sluiced.netns_of(&id);
            let listed = nft_in(&ns, &["list", "table", "inet", "sluice"])?;
            anyhow::ensure!(
                listed.contains("redirect to :15001"),
                "A: no capture in {ns}"
            );
        }
        sluiced
            .stop_and_remove(&id)
            .map_err(|m| anyhow::anyhow!(m))?;

        let t = Instant::now();
        let (id, _) = timed_sandbox(&plain, &format!("b{i}"), &[ISTIO_STATUS])?;
        let t_init = Instant::now();
        let code = plain
            .run_to_exit(&id, &format!("b{i}"), init_container(&rules))
            .map_err(|m| anyhow::anyhow!("init container: {m}"))?;
        let b_init = t_init.elapsed();
        let b = t.elapsed();
        if code != 0 {
            let log = plain
                .dir
                .join("logs")
                .join(format!("b{i}"))
                .join("istio-init.log");
            anyhow::bail!(
                "init container exited with {code}: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        if i == 0 {
            let ns = plain.netns_of(&id);
            let listed = nft_in(&ns, &["list", "ruleset"])?;
            anyhow::ensure!(listed.contains("ISTIO_OUTPUT"), "B: no rules in {ns}");
        }
        plain.stop_and_remove(&id).map_err(|m| anyhow::anyhow!(m))?;

        let (id, c) = timed_sandbox(&plain, &format!("c{i}"), &[])?;
        plain.stop_and_remove(&id).map_err(|m| anyhow::anyhow!(m))?;

        if keep {
            out.a.push(a);
            out.b.push(b);
            out.c.push(c);
            out.a_plugin_ms.push(a_plugin);
            out.b_init_ms.push(b_init.as_secs_f64() * 1e3);
        }
        pb.inc(1);
    }
    Ok(out)
}

fn nft_in(netns: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={netns}"))
        .arg("nft")
        .args(args)
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl PodSamples {
    pub fn result(&self) -> PodResult {
        let (a, b, c) = (summarize(&self.a), summarize(&self.b), summarize(&self.c));
        let pct = |s: Option<Summary>| s.map_or([0.0; 3], |s| [s.p50_ms, s.p90_ms, s.p99_ms]);
        let diff = |x: [f64; 3], y: [f64; 3]| [x[0] - y[0], x[1] - y[1], x[2] - y[2]];
        PodResult {
            with_sluice: a,
            with_init_container: b,
            no_capture: c,
            sluice_overhead_ms: diff(pct(a), pct(c)),
            init_overhead_ms: diff(pct(b), pct(c)),
            init_over_sluice_p50: pct(b)[0] / pct(a)[0],
            sluice_share: share(&self.a_plugin_ms),
            init_share: share(&self.b_init_ms),
        }
    }
}
