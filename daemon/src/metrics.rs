//! Prometheus/OpenMetrics metrics: the SLIs an init container never had, per attach. Served
//! over plain HTTP on a configurable address (default 127.0.0.1:9965) at `/metrics`.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

pub const DEFAULT_ADDR: &str = "127.0.0.1:9965";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// `programmed`, `skipped`, `error` (attach); `removed`, `absent`, `error` (detach); `ok`,
    /// `drift`, `error` (check).
    pub result: String,
    /// Why, in a few words: `invalid_argument`, `netns`, `kernel`, a skip reason class, or "".
    pub reason: String,
}

/// An attach's outcome, with the CNI code the plugin answered for a failure.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttachOutcome {
    /// `programmed`, `skipped` or `error`.
    pub result: String,
    /// A fixed set: for `error` `invalid_argument`, `not_found`, `deadline`, `saturated`,
    /// `unavailable`, `kernel`; for `skipped` `not_selected`, `opted_out`,
    /// `profile_disabled`, `interception_none`, `mesh_gate`; "" for `programmed`.
    pub reason: String,
    /// The CNI error code the runtime saw (`7`, `11`, `101` …); "" unless `error`.
    pub code: String,
}

/// Every (result, reason, code) an attach can be counted under; the README's metrics table
/// lists them.
pub const ATTACH_OUTCOMES: [(&str, &str, &str); 14] = [
    ("programmed", "", ""),
    ("skipped", "not_selected", ""),
    ("skipped", "opted_out", ""),
    ("skipped", "profile_disabled", ""),
    ("skipped", "interception_none", ""),
    ("skipped", "mesh_gate", ""),
    ("error", "invalid_argument", "7"),
    ("error", "invalid_argument", "4"),
    ("error", "not_found", "3"),
    ("error", "not_found", "101"),
    ("error", "deadline", "11"),
    ("error", "saturated", "11"),
    ("error", "unavailable", "11"),
    ("error", "kernel", "101"),
];

/// Every profile label value (`plan::Profile`'s names): a bounded set.
pub const PROFILES: [&str; 5] = ["native", "istio", "linkerd", "kuma", "consul"];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildInfo {
    version: String,
}

/// Every metric the agent exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub attaches: Family<AttachOutcome, Counter>,
    pub detaches: Family<Outcome, Counter>,
    pub checks: Family<Outcome, Counter>,
    /// Agent-side attach duration (request received → kernel programmed), seconds.
    pub attach_duration: Histogram,
    pub attached_pods: Gauge,
    pub drift_detected: Counter,
    /// Attaches that atomically replaced an existing sluice table (a re-ADD re-programming a
    /// pod, which also repairs any drift).
    pub drift_repaired: Counter,
    /// Captures the reconciler re-programmed, by reason (`missing`, `drift`).
    pub repairs: Family<Reason, Counter>,
    /// READY pods that ask for capture and lack it or have drifted, left alone (repair =
    /// report) or whose repair failed, as of the last reconcile pass.
    pub uncaptured_pods: Gauge,
    /// Reconcile passes by result (`ok`; `partial`: some sandboxes' status could not be read;
    /// `error`: the runtime could not be listed).
    pub reconcile_passes: Family<Outcome, Counter>,
    /// Wall time of each reconcile pass that listed the runtime (`ok` or `partial`), seconds.
    pub reconcile_pass_duration: Histogram,
    /// 1 while the agent answers its readiness probe SERVING (install in place, kernel path
    /// working), else 0.
    pub ready: Gauge,
    /// API calls refused because the caller's uid is not allow-listed (SO_PEERCRED), before
    /// any verb runs; the plugin answers them with code 102.
    pub refused_peers: Counter,
    /// Attaches of mesh pods that carried native `sluice.dev/*` overrides the node does not
    /// apply to mesh pods, by profile (`istio`, `linkerd`, `kuma`, `consul`).
    pub native_overrides_ignored: Family<Profile, Counter>,
    /// Attaches that programmed a capture, by the profile that planned it.
    pub programmed: Family<Profile, Counter>,
    rss_bytes: Gauge,
    cpu_seconds: Counter<f64, AtomicU64>,
    /// CPU seconds already added to `cpu_seconds` (it is read as a total from /proc).
    cpu_seen: std::sync::Mutex<f64>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Reason {
    pub reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Profile {
    pub profile: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("sluice");
        let m = Metrics {
            attaches: Family::default(),
            detaches: Family::default(),
            checks: Family::default(),
            // 100 µs .. ~3.3 s, doubling.
            attach_duration: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 16),
            ),
            attached_pods: Gauge::default(),
            drift_detected: Counter::default(),
            drift_repaired: Counter::default(),
            repairs: Family::default(),
            uncaptured_pods: Gauge::default(),
            reconcile_passes: Family::default(),
            // 1 ms .. ~16 s, doubling.
            reconcile_pass_duration: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 15),
            ),
            ready: Gauge::default(),
            refused_peers: Counter::default(),
            native_overrides_ignored: Family::default(),
            programmed: Family::default(),
            rss_bytes: Gauge::default(),
            cpu_seconds: Counter::default(),
            cpu_seen: std::sync::Mutex::new(0.0),
            registry: Registry::default(),
        };
        registry.register(
            "attaches",
            "Attach calls by result, reason and the CNI code answered",
            m.attaches.clone(),
        );
        registry.register("detaches", "Detach calls by result", m.detaches.clone());
        registry.register("checks", "Check calls by result", m.checks.clone());
        registry.register(
            "attach_duration_seconds",
            "Agent-side attach duration",
            m.attach_duration.clone(),
        );
        registry.register(
            "attached_pods",
            "Pods this agent has programmed and not detached",
            m.attached_pods.clone(),
        );
        registry.register(
            "drift_detected",
            "Checks that found a live table different from the plan",
            m.drift_detected.clone(),
        );
        registry.register(
            "drift_repaired",
            "Attaches that atomically replaced an existing sluice table",
            m.drift_repaired.clone(),
        );
        registry.register(
            "repairs",
            "Captures the reconciler re-programmed, by reason (missing, drift)",
            m.repairs.clone(),
        );
        registry.register(
            "uncaptured_pods",
            "READY pods asking for capture that lack it or have drifted, as of the last reconcile pass",
            m.uncaptured_pods.clone(),
        );
        registry.register(
            "reconcile_passes",
            "Reconcile passes over the runtime's sandboxes, by result",
            m.reconcile_passes.clone(),
        );
        registry.register(
            "reconcile_pass_duration_seconds",
            "Wall time of a reconcile pass that listed the runtime",
            m.reconcile_pass_duration.clone(),
        );
        registry.register(
            "ready",
            "1 while the agent is ready (install in place, kernel path working)",
            m.ready.clone(),
        );
        registry.register(
            "refused_peers",
            "API calls refused because the caller's uid is not allow-listed",
            m.refused_peers.clone(),
        );
        registry.register(
            "native_overrides_ignored",
            "Attaches of mesh pods whose native sluice.dev overrides were not applied, by profile",
            m.native_overrides_ignored.clone(),
        );
        registry.register(
            "programmed",
            "Attaches that programmed a capture, by the profile that planned it",
            m.programmed.clone(),
        );
        let info = Family::<BuildInfo, Gauge>::default();
        info.get_or_create(&BuildInfo {
            version: env!("CARGO_PKG_VERSION").to_owned(),
        })
        .set(1);
        registry.register("build_info", "Build information", info);
        registry.register(
            "process_resident_memory_bytes",
            "Agent resident set size",
            m.rss_bytes.clone(),
        );
        registry.register(
            "process_cpu_seconds",
            "Agent CPU time (user + system)",
            m.cpu_seconds.clone(),
        );
        // Every bounded label value exists from the start, at 0: a ratio or an increase over
        // a window is then exact from the first scrape, and "no failures" is a 0, not an
        // absent series.
        for (result, reason, code) in ATTACH_OUTCOMES {
            drop(m.attaches.get_or_create(&AttachOutcome {
                result: result.into(),
                reason: reason.into(),
                code: code.into(),
            }));
        }
        for reason in ["missing", "drift"] {
            drop(m.repairs.get_or_create(&Reason {
                reason: reason.into(),
            }));
        }
        for (family, results) in [
            (&m.detaches, ["removed", "absent", "error"]),
            (&m.checks, ["ok", "drift", "error"]),
        ] {
            for result in results {
                drop(family.get_or_create(&Outcome {
                    result: result.into(),
                    reason: String::new(),
                }));
            }
        }
        for profile in PROFILES {
            if profile != "native" {
                drop(m.native_overrides_ignored.get_or_create(&Profile {
                    profile: profile.into(),
                }));
            }
            drop(m.programmed.get_or_create(&Profile {
                profile: profile.into(),
            }));
        }
        for result in ["ok", "partial", "error"] {
            drop(m.reconcile_passes.get_or_create(&Outcome {
                result: result.into(),
                reason: String::new(),
            }));
        }
        Metrics { registry, ..m }
    }

    /// Counts an attach; `code` is the CNI code answered for an error.
    pub fn attach(&self, result: &str, reason: &str, code: Option<u32>) {
        debug_assert!(
            ATTACH_OUTCOMES.contains(&(
                result,
                reason,
                &code.map(|c| c.to_string()).unwrap_or_default()
            )),
            "an attach outcome off the documented set: {result} {reason} {code:?}"
        );
        self.attaches
            .get_or_create(&AttachOutcome {
                result: result.into(),
                reason: reason.into(),
                code: code.map(|c| c.to_string()).unwrap_or_default(),
            })
            .inc();
    }

    pub fn repair(&self, reason: &str) {
        self.repairs
            .get_or_create(&Reason {
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub fn native_overrides_ignored(&self, profile: crate::model::plan::Profile) {
        self.native_overrides_ignored
            .get_or_create(&Profile {
                profile: profile.to_string(),
            })
            .inc();
    }

    /// Counts an attach that programmed a capture planned by `profile`.
    pub fn programmed(&self, profile: crate::model::plan::Profile) {
        self.programmed
            .get_or_create(&Profile {
                profile: profile.to_string(),
            })
            .inc();
    }

    pub fn reconcile_pass(&self, result: &str) {
        inc(&self.reconcile_passes, result, "");
    }

    pub fn detach(&self, result: &str) {
        inc(&self.detaches, result, "");
    }

    pub fn check(&self, result: &str) {
        inc(&self.checks, result, "");
    }

    /// The text exposition, with process figures read from /proc at scrape time.
    pub fn render(&self) -> String {
        if let Some((rss, cpu)) = process_figures() {
            self.rss_bytes.set(rss as i64);
            let mut seen = self.cpu_seen.lock().unwrap_or_else(|p| p.into_inner());
            if cpu > *seen {
                self.cpu_seconds.inc_by(cpu - *seen);
                *seen = cpu;
            }
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "encoding metrics");
        }
        out
    }
}

fn inc(family: &Family<Outcome, Counter>, result: &str, reason: &str) {
    family
        .get_or_create(&Outcome {
            result: result.into(),
            reason: reason.into(),
        })
        .inc();
}

/// RSS bytes and CPU seconds of this process from /proc/self/stat (fields 14, 15, 24).
fn process_figures() -> Option<(u64, f64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may contain spaces; fields count from after its closing paren.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64;
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    let rss: u64 = f.get(21)?.parse().ok()?;
    Some((rss * page, (utime + stime) / ticks))
}

#[cfg(test)]
mod tests {
    use super::PROFILES;
    use crate::model::plan::Profile;

    /// The profile label's values are exactly the profiles' names (a new profile fails to
    /// compile here until it is listed).
    #[test]
    fn the_profile_label_values_are_the_profiles() {
        let all = |p: Profile| match p {
            Profile::Native
            | Profile::Istio
            | Profile::Linkerd
            | Profile::Kuma
            | Profile::Consul => p.to_string(),
        };
        let names: Vec<String> = [
            Profile::Native,
            Profile::Istio,
            Profile::Linkerd,
            Profile::Kuma,
            Profile::Consul,
        ]
        .into_iter()
        .map(all)
        .collect();
        assert_eq!(names, PROFILES);
        let registry = super::Metrics::new().render();
        for p in PROFILES {
            assert!(
                registry.contains(&format!("sluice_programmed_total{{profile=\"{p}\"}} 0")),
                "{p} pre-initialised"
            );
        }
    }
}
