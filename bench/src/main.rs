//! `sluice-bench`: attach latency of sluice against the ways capture rules are applied in the
//! field (iptables-restore, iptables-legacy-restore, one iptables exec per rule, nft -f, an
//! init container), the same capture semantics each time (Istio's default sidecar plan), in
//! one run, on a fresh pod netns per sample. Netns creation and teardown are never timed.
#![forbid(unsafe_code)]

mod breakdown;
mod env;
mod methods;
mod pod;
mod reconcile;
mod report;
mod rules;
mod runc;
mod stats;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use crate::env::{Netns, run_with_stdin};
use crate::methods::{ALL, Method, Runner};
use crate::report::{ConcurrencyResult, MethodResult, PopulationResult, Report, Rss, Sample};
use crate::stats::summarize;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Attach-latency benchmark: sluice vs iptables-based init"
)]
struct Args {
    /// A small run (for CI and smoke checks): fewer samples per method and sweep.
    #[arg(long)]
    quick: bool,
    /// Directory for results.md, samples.csv, summary.json and latency.svg.
    #[arg(long, default_value = "results")]
    out: PathBuf,
    /// Timed samples per method at concurrency 1 [default: 500, quick: 20].
    #[arg(long)]
    samples: Option<usize>,
    /// Untimed warm-up samples per method [default: 10, quick: 3].
    #[arg(long)]
    warmup: Option<usize>,
    /// Pod-level rounds (A, B and C each) through containerd's CRI [default: 100, quick: 5].
    #[arg(long)]
    pod_samples: Option<usize>,
    /// Only these methods (by id, repeatable; `pod` for the pod-level benchmark) and no
    /// sweeps: for profiling one path.
    #[arg(long = "only")]
    only: Vec<String>,
    #[command(subcommand)]
    probe: Option<Probe>,
}

#[derive(Debug, Subcommand)]
enum Probe {
    /// Internal: run one sluice-cni ADD and print its peak RSS in KiB (getrusage of children).
    #[command(hide = true)]
    PluginRss { netns: String, socket: String },
}

const CONCURRENCY: [usize; 3] = [1, 8, 32];
/// Rounds of the method comparison (each method's samples in this many blocks).
const ROUNDS: usize = 5;
const POPULATION: [usize; 3] = [0, 100, 1000];

fn bar(len: usize, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len as u64);
    pb.set_style(
        ProgressStyle::with_template("{prefix:>28} [{bar:30}] {pos}/{len} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_prefix(what.to_owned());
    pb
}

fn ns_name(tag: &str, i: usize) -> String {
    format!("slb-{}-{tag}-{i}", std::process::id() % 100_000)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(Probe::PluginRss { netns, socket }) = args.probe {
        return plugin_rss_probe(&netns, &socket);
    }
    anyhow::ensure!(
        nix::unistd::Uid::effective().is_root(),
        "sluice-bench needs root (netns, nftables)"
    );
    let samples = args.samples.unwrap_or(if args.quick { 20 } else { 500 });
    let warmup = args.warmup.unwrap_or(if args.quick { 3 } else { 10 });
    let rounds = if args.quick { 2 } else { 16 };
    let pop_samples = if args.quick { 10 } else { 200 };

    let mut runner = Runner::new()?;
    let mut all_samples: Vec<Sample> = Vec::new();
    let mut rss = Rss {
        agent_kib_0: runner.agent.rss_kib().ok(),
        ..Default::default()
    };
    rss.plugin_peak_kib = plugin_rss(&runner)
        .map_err(|e| eprintln!("plugin RSS probe failed: {e:#}"))
        .ok();

    // 1. Every method at concurrency 1, in rotating blocks.
    let selected: Vec<Method> = ALL
        .into_iter()
        .filter(|m| args.only.is_empty() || args.only.iter().any(|o| o == m.id()))
        .collect();
    // Only the init container may be skipped, and only because runc or busybox is absent; any
    // other failure is a broken benchmark and fails the run.
    let skipped = |m: &Method| *m == Method::InitContainer && runner.init.is_err();
    let active: Vec<Method> = selected.iter().copied().filter(|m| !skipped(m)).collect();
    let method_rounds = if args.quick { 1 } else { ROUNDS };
    let pb = bar(
        (warmup * method_rounds + samples) * active.len(),
        "methods, rotating blocks",
    );
    let mut measured = measure(&mut runner, &active, warmup, samples, method_rounds, &pb)?;
    pb.finish();
    let mut methods = Vec::new();
    for method in selected {
        let Some(durations) = measured.remove(&method) else {
            methods.push(MethodResult {
                id: method.id().to_owned(),
                description: method.describe().to_owned(),
                skipped: runner.init.as_ref().err().map(|e| format!("{e:#}")),
                summary: None,
                ratio_p50: None,
                ratio_p99: None,
            });
            continue;
        };
        all_samples.extend(durations.iter().enumerate().map(|(i, d)| Sample {
            sweep: "method",
            method: method.id().to_owned(),
            concurrency: 1,
            pods: 0,
            index: i,
            ms: d.as_secs_f64() * 1e3,
        }));
        methods.push(MethodResult {
            id: method.id().to_owned(),
            description: method.describe().to_owned(),
            skipped: None,
            summary: summarize(&durations),
            ratio_p50: None,
            ratio_p99: None,
        });
    }
    runner.detach_gone()?;
    let base = methods.first().and_then(|m| m.summary);
    for m in &mut methods {
        if let (Some(b), Some(s)) = (base, m.summary) {
            m.ratio_p50 = Some(s.p50_ms / b.p50_ms);
            m.ratio_p99 = Some(s.p99_ms / b.p99_ms);
        }
    }

    // 1b. Where sluice-e2e's time goes, from the plugin's and the agent's own timestamps.
    let mut breakdown = None;
    if args.only.is_empty() || args.only.iter().any(|o| o == "breakdown") {
        let n = if args.quick { 20 } else { 300 };
        let pb = bar(warmup + n, "sluice-e2e breakdown");
        let mut marks = Vec::with_capacity(n);
        for i in 0..warmup + n {
            let ns = Netns::new(&ns_name("bd", i))?;
            let m = breakdown::sample(&mut runner, &format!("bd-{}-{i}", std::process::id()), &ns)?;
            if i >= warmup {
                marks.push(m);
            }
            drop(ns);
            pb.inc(1);
        }
        pb.finish();
        runner.detach_gone()?;
        breakdown = Some(breakdown::summarize(&marks));
    }

    // 2. Concurrency sweep: parallel attaches into distinct netns.
    let mut concurrency = Vec::new();
    let sweeps = args.only.is_empty();
    for method in [Method::SluiceE2e, Method::IptablesNftRestore]
        .into_iter()
        .filter(|_| sweeps)
    {
        for c in CONCURRENCY {
            let (durations, wall) = parallel(&runner, method, c, rounds)?;
            runner.detach_gone()?;
            all_samples.extend(durations.iter().enumerate().map(|(i, d)| Sample {
                sweep: "concurrency",
                method: method.id().to_owned(),
                concurrency: c,
                pods: 0,
                index: i,
                ms: d.as_secs_f64() * 1e3,
            }));
            concurrency.push(ConcurrencyResult {
                method: method.id().to_owned(),
                concurrency: c,
                summary: summarize(&durations),
                attaches_per_s: durations.len() as f64 / wall.as_secs_f64(),
            });
        }
    }

    // 3. Pod level: RunPodSandbox with sluice vs sandbox + init container vs sandbox alone.
    let mut pod = None;
    if sweeps || args.only.iter().any(|o| o == "pod") {
        let n = args.pod_samples.unwrap_or(if args.quick { 5 } else { 100 });
        let w = if args.quick { 1 } else { 5 };
        let pb = bar(w + n, "pod: A, B, C rounds");
        let samples = pod::run(&runner.agent.socket_str(), w, n, &pb)?;
        pb.finish();
        for (id, list) in [
            ("sandbox+sluice", &samples.a),
            ("sandbox+init", &samples.b),
            ("sandbox", &samples.c),
        ] {
            all_samples.extend(list.iter().enumerate().map(|(i, d)| Sample {
                sweep: "pod",
                method: id.to_owned(),
                concurrency: 1,
                pods: 0,
                index: i,
                ms: d.as_secs_f64() * 1e3,
            }));
        }
        pod = Some(samples.result());
    }

    // 3b. What a reconcile pass costs with 100 and 250 READY sandboxes asking for capture.
    let mut reconcile = Vec::new();
    if sweeps || args.only.iter().any(|o| o == "reconcile") {
        let sizes: &[usize] = if args.quick { &[10] } else { &[100, 250] };
        let passes = if args.quick { 3 } else { 10 };
        let pb = bar(
            sizes.iter().copied().max().unwrap_or(0),
            "reconcile: sandboxes",
        );
        reconcile = reconcile::run(sizes, passes, &pb)?;
        pb.finish();
    }

    // 4. Node population: one more attach with 0, 100, 1000 pods already attached.
    let mut population = Vec::new();
    let mut background: Vec<Netns> = Vec::new();
    for pods in POPULATION.into_iter().filter(|_| sweeps) {
        let pb = bar(
            pods - background.len(),
            &format!("attach {pods} background pods"),
        );
        while background.len() < pods {
            let ns = Netns::new(&ns_name("bg", background.len()))?;
            runner.apply(Method::SluiceRpc, &ns)?;
            background.push(ns);
            pb.inc(1);
        }
        pb.finish();
        if pods == 1000 {
            rss.agent_kib_1000 = runner.agent.rss_kib().ok();
        }
        let pb = bar(warmup + pop_samples, &format!("e2e with {pods} pods"));
        let durations = measure(
            &mut runner,
            &[Method::SluiceE2e],
            warmup,
            pop_samples,
            1,
            &pb,
        )?
        .remove(&Method::SluiceE2e)
        .unwrap_or_default();
        pb.finish();
        runner.detach_gone()?;
        all_samples.extend(durations.iter().enumerate().map(|(i, d)| Sample {
            sweep: "population",
            method: Method::SluiceE2e.id().to_owned(),
            concurrency: 1,
            pods,
            index: i,
            ms: d.as_secs_f64() * 1e3,
        }));
        population.push(PopulationResult {
            pods,
            summary: summarize(&durations),
            ratio_p50_to_empty: None,
        });
    }
    let empty = population.first().and_then(|p| p.summary);
    for p in &mut population {
        if let (Some(e), Some(s)) = (empty, p.summary) {
            p.ratio_p50_to_empty = Some(s.p50_ms / e.p50_ms);
        }
    }
    let pb = bar(background.len(), "tear down background pods");
    for ns in background.drain(..) {
        drop(ns);
        pb.inc(1);
    }
    pb.finish();

    let report = Report {
        machine: machine(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        quick: args.quick,
        warmup,
        methods,
        concurrency,
        population,
        pod,
        reconcile,
        breakdown,
        rss,
    };
    report.write(&args.out, &all_samples)?;
    println!("\n{}", report.markdown());
    println!(
        "Wrote {}/{{results.md,samples.csv,summary.json,latency.svg,breakdown.svg}}",
        args.out.display()
    );
    Ok(())
}

/// Warm-up + timed samples of one method, each on a fresh netns. The first sample is
/// verified to have really installed the rules.
/// `n` samples of every method, each into a fresh netns, in `rounds` rounds: a round takes a
/// block of `n / rounds` samples of each method in turn, preceded by `warmup` untimed ones,
/// starting one method further each round. Drift in the machine's state over the run (a
/// neighbour on the host, memory) then falls on every method, as it would not if each were
/// measured once, one after the other; blocks keep a method's samples from following another
/// method's (an init container's teardown runs on for milliseconds after it exits, and the
/// warm-up absorbs it). Each method's first sample is verified.
fn measure(
    runner: &mut Runner,
    methods: &[Method],
    warmup: usize,
    n: usize,
    rounds: usize,
    pb: &ProgressBar,
) -> anyhow::Result<std::collections::HashMap<Method, Vec<Duration>>> {
    let mut out: std::collections::HashMap<Method, Vec<Duration>> = methods
        .iter()
        .map(|m| (*m, Vec::with_capacity(n)))
        .collect();
    let rounds = rounds.clamp(1, n.max(1));
    for round in 0..rounds {
        let block = n / rounds + usize::from(round < n % rounds);
        for k in 0..methods.len() {
            let method = methods[(round + k) % methods.len()];
            for i in 0..warmup + block {
                let ns = Netns::new(&ns_name(method.id(), round * (warmup + n) + i))?;
                let took = runner
                    .apply(method, &ns)
                    .with_context(|| format!("method {} failed", method.id()))?;
                if round == 0 && i == 0 {
                    runner.verify(method, &ns).with_context(|| {
                        format!("method {} did not program the pod", method.id())
                    })?;
                }
                if i >= warmup {
                    out.entry(method).or_default().push(took);
                }
                drop(ns);
                pb.inc(1);
            }
        }
    }
    Ok(out)
}

/// `c` workers, each applying `rounds` times into its own fresh netns; returns every latency
/// and the wall time of the whole sweep point.
fn parallel(
    runner: &Runner,
    method: Method,
    c: usize,
    rounds: usize,
) -> anyhow::Result<(Vec<Duration>, Duration)> {
    let pb = bar(c * rounds, &format!("{} x{c}", method.id()));
    let spaces: Vec<Vec<Netns>> = (0..c)
        .map(|w| {
            (0..rounds)
                .map(|r| Netns::new(&ns_name(&format!("c{c}w{w}"), r)))
                .collect()
        })
        .collect::<anyhow::Result<_>>()?;
    let barrier = std::sync::Barrier::new(c);
    let start = Instant::now();
    let results: Vec<anyhow::Result<Vec<Duration>>> = std::thread::scope(|s| {
        let handles: Vec<_> = spaces
            .iter()
            .enumerate()
            .map(|(w, list)| {
                let (barrier, pb) = (&barrier, &pb);
                s.spawn(move || {
                    barrier.wait();
                    list.iter()
                        .enumerate()
                        .map(|(r, ns)| {
                            let d = match method {
                                Method::SluiceE2e => {
                                    let mut cmd = runner.cni_command(
                                        &format!("par-{c}-{w}-{r}-{}", std::process::id()),
                                        ns,
                                    );
                                    let t = Instant::now();
                                    run_with_stdin(&mut cmd, runner.stdin().as_bytes())?;
                                    t.elapsed()
                                }
                                _ => methods::restore_in(ns, "iptables-nft-restore")?,
                            };
                            pb.inc(1);
                            Ok(d)
                        })
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("worker panicked")))
            })
            .collect()
    });
    let wall = start.elapsed();
    pb.finish();
    let mut all = Vec::new();
    for r in results {
        all.extend(r?);
    }
    Ok((all, wall))
}

/// Peak RSS of one sluice-cni ADD, measured by a child of ours whose only child is the plugin.
fn plugin_rss(runner: &Runner) -> anyhow::Result<u64> {
    let ns = Netns::new(&ns_name("rss", 0))?;
    let out = Command::new(std::env::current_exe()?)
        .args(["plugin-rss", &ns.path(), &runner.agent.socket_str()])
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .context("probe output")
}

fn plugin_rss_probe(netns: &str, socket: &str) -> anyhow::Result<()> {
    let mut cmd = Command::new(env::plugin()?);
    cmd.env_clear()
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", "rss-probe")
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0");
    run_with_stdin(&mut cmd, methods::cni_stdin(socket).as_bytes())?;
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)?;
    println!("{}", usage.max_rss());
    Ok(())
}

fn machine() -> String {
    let uname = nix::sys::utsname::uname().ok();
    let kernel = uname.as_ref().map_or(String::new(), |u| {
        u.release().to_string_lossy().into_owned()
    });
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines().next().map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse::<u64>()
                    .unwrap_or(0)
            })
        })
        .map_or(0, |kib| kib / 1024 / 1024);
    let plugin = env::plugin().map_or("?".to_owned(), |p| {
        if p.to_string_lossy().contains("x86_64-unknown-linux-gnu") {
            "static".to_owned()
        } else {
            "dynamically linked".to_owned()
        }
    });
    format!("{cores} cores ({cpu}), {mem} GiB, Linux {kernel}; sluice-cni {plugin}")
}
