//! Writes the results: the markdown table (stdout and results.md), every sample (samples.csv),
//! the summary (summary.json) and the latency distribution plot (latency.svg).

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use serde::Serialize;

use crate::stats::Summary;

#[derive(Debug, Serialize)]
pub struct MethodResult {
    pub id: String,
    pub description: String,
    /// Why the method has no figures, if it has none.
    pub skipped: Option<String>,
    #[serde(flatten)]
    pub summary: Option<Summary>,
    /// p50 and p99 divided by sluice end-to-end's.
    pub ratio_p50: Option<f64>,
    pub ratio_p99: Option<f64>,
}

#[derive(Debug, Serialize)]
pub struct ConcurrencyResult {
    pub method: String,
    pub concurrency: usize,
    #[serde(flatten)]
    pub summary: Option<Summary>,
    pub attaches_per_s: f64,
}

#[derive(Debug, Serialize)]
pub struct PopulationResult {
    pub pods: usize,
    #[serde(flatten)]
    pub summary: Option<Summary>,
    /// p50 relative to the empty node.
    pub ratio_p50_to_empty: Option<f64>,
}

#[derive(Debug, Default, Serialize)]
pub struct Rss {
    pub agent_kib_0: Option<u64>,
    pub agent_kib_1000: Option<u64>,
    pub plugin_peak_kib: Option<u64>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub machine: String,
    pub command: String,
    pub quick: bool,
    pub warmup: usize,
    pub methods: Vec<MethodResult>,
    pub concurrency: Vec<ConcurrencyResult>,
    pub population: Vec<PopulationResult>,
    pub pod: Option<crate::pod::PodResult>,
    pub reconcile: Vec<crate::reconcile::PassCost>,
    pub breakdown: Option<crate::breakdown::Breakdown>,
    pub rss: Rss,
}

/// One timed sample, as written to samples.csv.
#[derive(Debug, Clone)]
pub struct Sample {
    pub sweep: &'static str,
    pub method: String,
    pub concurrency: usize,
    pub pods: usize,
    pub index: usize,
    pub ms: f64,
}

fn f(v: Option<f64>) -> String {
    v.map_or("–".to_owned(), |v| format!("{v:.2}"))
}

fn x(v: Option<f64>) -> String {
    v.map_or("–".to_owned(), |v| format!("{v:.1}×"))
}

impl Report {
    pub fn markdown(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "Machine: {}  \nCommand: `{}`{}\n",
            self.machine,
            self.command,
            if self.quick { " (quick run)" } else { "" }
        );
        let _ = writeln!(
            out,
            "| method | n | p50 ms | p90 ms | p99 ms | max ms | mean ms | p50 / sluice | p99 / sluice |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for m in &self.methods {
            match (&m.summary, &m.skipped) {
                (Some(s), _) => {
                    let _ = writeln!(
                        out,
                        "| {} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} |",
                        m.id,
                        s.n,
                        s.p50_ms,
                        s.p90_ms,
                        s.p99_ms,
                        s.max_ms,
                        s.mean_ms,
                        x(m.ratio_p50),
                        x(m.ratio_p99)
                    );
                }
                (None, why) => {
                    let _ = writeln!(
                        out,
                        "| {} | skipped: {} | | | | | | | |",
                        m.id,
                        why.as_deref().unwrap_or("no samples")
                    );
                }
            }
        }
        // Headline: like for like with what the meshes' CNI plugins do per pod.
        for like in ["istio-cni-like", "linkerd-cni-like"] {
            if let Some(r) = self
                .methods
                .iter()
                .find(|m| m.id == like)
                .and_then(|m| m.ratio_p50.zip(m.ratio_p99))
            {
                let _ = writeln!(
                    out,
                    "\nsluice-e2e vs {like}: {:.1}× faster at p50, {:.1}× at p99.",
                    r.0, r.1
                );
            }
        }
        if let Some(b) = &self.breakdown {
            let _ = writeln!(out, "\n{}", b.markdown());
        }
        let _ = writeln!(
            out,
            "\n| concurrency sweep | parallel | n | p50 ms | p99 ms | attaches/s |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|");
        for c in &self.concurrency {
            let s = c.summary;
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {:.0} |",
                c.method,
                c.concurrency,
                s.map_or(0, |s| s.n),
                f(s.map(|s| s.p50_ms)),
                f(s.map(|s| s.p99_ms)),
                c.attaches_per_s
            );
        }
        let _ = writeln!(
            out,
            "\n| pods already attached | n | p50 ms | p99 ms | p50 / empty node |"
        );
        let _ = writeln!(out, "|---:|---:|---:|---:|---:|");
        for p in &self.population {
            let s = p.summary;
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} |",
                p.pods,
                s.map_or(0, |s| s.n),
                f(s.map(|s| s.p50_ms)),
                f(s.map(|s| s.p99_ms)),
                p.ratio_p50_to_empty
                    .map_or("–".to_owned(), |r| format!("{r:.2}"))
            );
        }
        if let Some(p) = &self.pod {
            let _ = writeln!(
                out,
                "\n| pod network ready (containerd CRI) | n | p50 ms | p90 ms | p99 ms |"
            );
            let _ = writeln!(out, "|---|---:|---:|---:|---:|");
            for (name, s) in [
                ("A: RunPodSandbox with sluice", p.with_sluice),
                (
                    "B: RunPodSandbox + istio-init container",
                    p.with_init_container,
                ),
                ("C: RunPodSandbox, no capture", p.no_capture),
            ] {
                let _ = writeln!(
                    out,
                    "| {name} | {} | {} | {} | {} |",
                    s.map_or(0, |s| s.n),
                    f(s.map(|s| s.p50_ms)),
                    f(s.map(|s| s.p90_ms)),
                    f(s.map(|s| s.p99_ms))
                );
            }
            let [a50, a90, a99] = p.sluice_overhead_ms;
            let [b50, b90, b99] = p.init_overhead_ms;
            let _ = writeln!(
                out,
                "| capture overhead A − C | | {a50:.2} | {a90:.2} | {a99:.2} |"
            );
            let _ = writeln!(
                out,
                "| capture overhead B − C | | {b50:.2} | {b90:.2} | {b99:.2} |"
            );
            let _ = writeln!(
                out,
                "\nB / A at p50: {:.2}× (targets: A − C ≤ 5 ms at p50, B / A ≥ 1.5).",
                p.init_over_sluice_p50
            );
            let _ = writeln!(
                out,
                "\n| capture's share, measured inside each pod start | n | mean ms | 95 % CI ± ms | p50 ms |\n|---|---:|---:|---:|---:|"
            );
            for (name, s) in [
                (
                    "sluice-cni's own run in A (its timestamps in containerd's log; exec and exit not included)",
                    p.sluice_share,
                ),
                (
                    "the init container in B (CreateContainer to observed exit)",
                    p.init_share,
                ),
            ] {
                if let Some(s) = s {
                    let _ = writeln!(
                        out,
                        "| {name} | {} | {:.2} | {:.2} | {:.2} |",
                        s.n, s.mean_ms, s.ci95_ms, s.p50_ms
                    );
                }
            }
        }
        if !self.reconcile.is_empty() {
            let _ = writeln!(
                out,
                "\n| reconcile pass (containerd CRI, READY sandboxes asking for capture) | passes | wall ms (mean) | agent CPU ms / pass | containerd CPU ms / pass | agent's share of a core at the default 15 s |\n|---|---:|---:|---:|---:|---:|"
            );
            for r in &self.reconcile {
                let _ = writeln!(
                    out,
                    "| {} sandboxes | {} | {:.1} | {:.1} | {:.1} | {:.2} % |",
                    r.sandboxes,
                    r.passes,
                    r.wall_ms_mean,
                    r.cpu_ms_per_pass,
                    r.runtime_cpu_ms_per_pass,
                    r.core_share_at_default * 100.0
                );
            }
        }
        let kib = |v: Option<u64>| {
            v.map_or("–".to_owned(), |v| {
                format!("{:.1} MiB", v as f64 / 1024.0)
            })
        };
        let _ = writeln!(
            out,
            "\nAgent RSS: {} with 0 attachments, {} with 1,000. Plugin peak RSS: {}.",
            kib(self.rss.agent_kib_0),
            kib(self.rss.agent_kib_1000),
            kib(self.rss.plugin_peak_kib)
        );
        out
    }

    pub fn write(&self, dir: &Path, samples: &[Sample]) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("results.md"), self.markdown())?;
        std::fs::write(
            dir.join("summary.json"),
            serde_json::to_string_pretty(self)?,
        )?;
        let mut csv = String::from("sweep,method,concurrency,pods,index,latency_ms\n");
        for s in samples {
            let _ = writeln!(
                csv,
                "{},{},{},{},{},{:.4}",
                s.sweep, s.method, s.concurrency, s.pods, s.index, s.ms
            );
        }
        std::fs::write(dir.join("samples.csv"), csv)?;
        if let Some(b) = &self.breakdown {
            b.plot(&dir.join("breakdown.svg"))?;
        }
        plot(&dir.join("latency.svg"), samples)
    }
}

/// Latency CDF per method (concurrency 1), log-scale x axis.
fn plot(path: &Path, samples: &[Sample]) -> anyhow::Result<()> {
    let mut methods: Vec<(String, Vec<f64>)> = Vec::new();
    for s in samples.iter().filter(|s| s.sweep == "method") {
        match methods.iter_mut().find(|(m, _)| *m == s.method) {
            Some((_, v)) => v.push(s.ms),
            None => methods.push((s.method.clone(), vec![s.ms])),
        }
    }
    let all = methods.iter().flat_map(|(_, v)| v.iter().copied());
    let (lo, hi) = all.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if methods.is_empty() {
        return Ok(());
    }
    let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Attach latency per method (CDF, concurrency 1)",
            ("sans-serif", 22),
        )
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(56)
        .build_cartesian_2d((lo * 0.8..hi * 1.25).log_scale(), 0f64..1f64)?;
    chart
        .configure_mesh()
        .x_desc("latency (ms, log scale)")
        .y_desc("fraction of samples ≤ x")
        .draw()?;
    for (i, (name, mut v)) in methods.into_iter().enumerate() {
        v.sort_by(f64::total_cmp);
        let n = v.len() as f64;
        let color = Palette99::pick(i).to_rgba();
        let points: Vec<(f64, f64)> = v
            .iter()
            .enumerate()
            .map(|(k, &ms)| (ms, (k + 1) as f64 / n))
            .collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()?;
    root.present()?;
    Ok(())
}
