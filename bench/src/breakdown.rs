//! Where sluice-e2e's time goes: each sample execs the real `sluice-cni ADD` with
//! `SLUICE_CNI_TIMING` set, so the plugin prints its own stage timestamps and the agent's (from
//! the Attach answer); with the bench's own spawn and exit times they split one attach into
//! stages. All are wall-clock nanoseconds on one host.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::Stdio;

use anyhow::{Context, bail};
use plotters::prelude::*;
use serde::Serialize;

use crate::env::Netns;
use crate::methods::Runner;

/// (stage, from mark, to mark), in order: they tile the whole attach.
pub const STAGES: [(&str, &str, &str); 11] = [
    ("exec + loader", "spawn", "main"),
    ("plugin: parse + encode", "main", "encoded"),
    ("connect", "encoded", "connected"),
    ("request", "connected", "agent_received"),
    ("agent: plan + queue", "agent_received", "agent_started"),
    ("agent: netns entry", "agent_started", "agent_in_netns"),
    ("agent: nft batch", "agent_in_netns", "agent_nft"),
    ("agent: device setup", "agent_nft", "agent_device"),
    ("reply", "agent_device", "answered"),
    ("plugin: teardown + output", "answered", "done"),
    ("process exit", "done", "exited"),
];

#[derive(Debug, Clone, Serialize)]
pub struct Stage {
    pub stage: String,
    pub p50_ms: f64,
    pub p90_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Breakdown {
    pub n: usize,
    /// The samples' own end-to-end p50 (spawn to exit).
    pub e2e_p50_ms: f64,
    pub stages: Vec<Stage>,
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// One timed ADD into `ns`: every mark, by name.
pub fn sample(runner: &mut Runner, id: &str, ns: &Netns) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut cmd = runner.cni_command(id, ns);
    cmd.env("SLUICE_CNI_TIMING", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let spawn = now_ns();
    let mut child = cmd.spawn().context("spawn sluice-cni")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(runner.stdin().as_bytes())?;
    let out = child.wait_with_output()?;
    let exited = now_ns();
    if !out.status.success() {
        bail!("sluice-cni: {}", String::from_utf8_lossy(&out.stdout));
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr
        .lines()
        .find_map(|l| l.strip_prefix("sluice-cni timing "))
        .context("no timing line from sluice-cni")?;
    let mut marks: BTreeMap<String, u64> = line
        .split_whitespace()
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect();
    marks.insert("spawn".into(), spawn);
    marks.insert("exited".into(), exited);
    for (_, from, to) in STAGES {
        anyhow::ensure!(
            marks.contains_key(from) && marks.contains_key(to),
            "mark {from} or {to} missing: {line}"
        );
    }
    Ok(marks)
}

fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

/// Per-stage p50 and p90 over the samples.
pub fn summarize(samples: &[BTreeMap<String, u64>]) -> Breakdown {
    let ms =
        |m: &BTreeMap<String, u64>, from: &str, to: &str| (m[to] as f64 - m[from] as f64) / 1e6;
    let mut e2e: Vec<f64> = samples.iter().map(|m| ms(m, "spawn", "exited")).collect();
    let stages = STAGES
        .iter()
        .map(|(name, from, to)| {
            let mut v: Vec<f64> = samples.iter().map(|m| ms(m, from, to)).collect();
            Stage {
                stage: (*name).to_owned(),
                p50_ms: quantile(&mut v, 0.5),
                p90_ms: quantile(&mut v, 0.9),
            }
        })
        .collect();
    Breakdown {
        n: samples.len(),
        e2e_p50_ms: quantile(&mut e2e, 0.5),
        stages,
    }
}

impl Breakdown {
    pub fn markdown(&self) -> String {
        let mut out = format!(
            "| sluice-e2e stage (n = {}) | p50 ms | p90 ms | share of p50 sum |\n|---|---:|---:|---:|\n",
            self.n
        );
        let sum: f64 = self.stages.iter().map(|s| s.p50_ms).sum();
        for s in &self.stages {
            out += &format!(
                "| {} | {:.3} | {:.3} | {:.0} % |\n",
                s.stage,
                s.p50_ms,
                s.p90_ms,
                100.0 * s.p50_ms / sum
            );
        }
        out += &format!(
            "| **sum of stage p50s** / e2e p50 of these samples | {sum:.3} | | {:.3} |\n",
            self.e2e_p50_ms
        );
        out
    }

    /// One horizontal bar: the p50 of each stage, stacked in order.
    pub fn plot(&self, path: &Path) -> anyhow::Result<()> {
        let total: f64 = self.stages.iter().map(|s| s.p50_ms).sum();
        let root = SVGBackend::new(path, (960, 300)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "sluice-e2e: where the p50 goes (stages stacked)",
                ("sans-serif", 20),
            )
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(10)
            .build_cartesian_2d(0f64..total * 1.05, 0f64..1f64)?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .disable_y_axis()
            .x_desc("ms")
            .draw()?;
        let mut at = 0.0;
        for (i, s) in self.stages.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let (from, to) = (at, at + s.p50_ms);
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(from, 0.45), (to, 0.85)],
                    color.filled(),
                )))?
                .label(format!("{} {:.2} ms", s.stage, s.p50_ms))
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled())
                });
            at = to;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.9))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerLeft)
            .label_font(("sans-serif", 11))
            .draw()?;
        root.present()?;
        Ok(())
    }
}
