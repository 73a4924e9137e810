//! What the running kernel can do, found out by doing it: at start-up the agent programs real
//! plans into a scratch network namespace of its own, reads them back, removes them, and
//! records what worked. Nothing is guessed from the kernel version (distributions backport and
//! strip features), no pod and not the host namespace is touched, and the result is logged
//! once and gates readiness.
//!
//! Kernel behaviour sluice depends on, and since when upstream Linux has it:
//! - nf_tables nat chains with `redirect`, `meta skuid/skgid`, `ct` (4.18): every REDIRECT plan;
//! - rule comments (rule userdata, 3.15): the owner metadata Check and the reconciler read
//!   back (in the table's `owner` chain; table comments would need 5.13);
//! - the `::6` sluice adds to `lo` removed exactly when it added it (its ownership is in the
//!   table's owner, so no address protocol tag, `IFA_PROTO` of 6.1, is needed);
//! - `tproxy` and `socket` expressions (4.19): TPROXY plans only;
//! - ACK of the batch-end message (6.10): reported only; sluice never relies on it (see
//!   `nft::send`).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use crate::kernel::capture::{self, Want};
use crate::kernel::netns;
use crate::model::plan::{self, Families, PlanDefaults};
use crate::model::ruleset::{Attached, Ruleset};
use crate::{kernel::device, kernel::nft};

/// What the probe found. `Err` carries the kernel's own error, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelFeatures {
    /// The kernel release (`uname -r`), for the log only.
    pub release: String,
    /// An Istio REDIRECT plan, dual-stack with `::6` on `lo`, applied in one batch.
    pub redirect: Result<(), String>,
    /// What the kernel holds equals the plan, table comment included.
    pub read_back: Result<(), String>,
    /// Detach removed the `::6` it added to `lo` (the table's owner records it).
    pub lo_address: Result<(), String>,
    /// A TPROXY plan (tproxy/socket expressions, policy routing) applied and removed.
    pub tproxy: Result<(), String>,
    /// The kernel acknowledges the batch-end message (informational).
    pub batch_end_ack: Result<bool, String>,
}

impl KernelFeatures {
    /// Whether every pod can be captured correctly here: what readiness requires. TPROXY is
    /// not required (only pods that ask for it need it; their ADD fails naming the rule).
    pub fn required(&self) -> Result<(), String> {
        let need = |what: &str, r: &Result<(), String>| {
            r.clone().map_err(|e| {
                format!(
                    "kernel {} lacks {what}: {e} (sluice needs Linux 5.10 or later with nf_tables)",
                    self.release
                )
            })
        };
        need("the nf_tables REDIRECT path", &self.redirect)?;
        need(
            "exact nftables read-back (rules and their comments)",
            &self.read_back,
        )?;
        need("removing the ::6 it added to lo", &self.lo_address)
    }

    /// One log line with the whole picture.
    pub fn log(&self) {
        let show = |r: &Result<(), String>| match r {
            Ok(()) => "yes".to_owned(),
            Err(e) => format!("NO ({e})"),
        };
        let end_ack = match &self.batch_end_ack {
            Ok(true) => "yes (Linux 6.10+)".to_owned(),
            Ok(false) => "no (before Linux 6.10; not needed)".to_owned(),
            Err(e) => format!("unknown ({e})"),
        };
        let fields = (
            show(&self.redirect),
            show(&self.read_back),
            show(&self.lo_address),
            show(&self.tproxy),
        );
        if self.required().is_ok() {
            tracing::info!(
                kernel = %self.release, redirect = %fields.0, read_back = %fields.1,
                lo_address = %fields.2, tproxy = %fields.3, batch_end_ack = %end_ack,
                "kernel probed"
            );
        } else {
            tracing::error!(
                kernel = %self.release, redirect = %fields.0, read_back = %fields.1,
                lo_address = %fields.2, tproxy = %fields.3, batch_end_ack = %end_ack,
                "kernel probed: sluice cannot capture pods correctly on this kernel"
            );
        }
    }
}

static FEATURES: OnceLock<Result<KernelFeatures, String>> = OnceLock::new();

/// Probes once (later calls return the first result) and logs the result.
pub fn init() -> &'static Result<KernelFeatures, String> {
    FEATURES.get_or_init(|| {
        let result = run();
        match &result {
            Ok(f) => f.log(),
            Err(e) => tracing::error!(error = %e, "probing the kernel failed"),
        }
        result
    })
}

/// The probe's result, once [`init`] has finished.
pub fn get() -> Option<&'static Result<KernelFeatures, String>> {
    FEATURES.get()
}

/// The probe's pod: these annotations, one attachment without addresses (both families, as
/// for a pod whose prevResult has none).
fn want(annotations: &[(&str, &str)]) -> Want {
    Want {
        annotations: annotations
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<BTreeMap<String, String>>(),
        defaults: PlanDefaults::default(),
        pod_uid: "probe".into(),
        container_id: "probe".into(),
    }
}

fn probe_attachment() -> Attached {
    Attached::new("eth0", "probe", Families::NONE)
}

/// Attaches the probe's pod; the table it programmed.
fn attach(want: &Want) -> Result<Ruleset, String> {
    capture::attach(want, probe_attachment(), &[], 0, None)
        .map(|done| done.planned.ruleset)
        .map_err(|e| e.to_string())
}

/// Whether `lo` in the calling thread's namespace holds `::6` (from /proc, which follows the
/// thread's namespace through thread-self).
fn lo_has_passthrough6() -> bool {
    std::fs::read_to_string("/proc/thread-self/net/if_inet6").is_ok_and(|t| {
        t.lines()
            .any(|l| l.starts_with("00000000000000000000000000000006 ") && l.ends_with(" lo"))
    })
}

/// Runs the probe in a scratch namespace (needs CAP_SYS_ADMIN + CAP_NET_ADMIN, as the agent).
pub fn run() -> Result<KernelFeatures, String> {
    netns::run_in_scratch(probe_here).map_err(|e| e.to_string())
}

fn probe_here() -> KernelFeatures {
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let istio = attach(&want(&[
        (plan::REDIRECT, "enabled"),
        (sluice_proto::annotations::ISTIO_STATUS, "{}"),
    ]));
    let mut f = KernelFeatures {
        release,
        redirect: Err("not tried".into()),
        read_back: Err("not tried".into()),
        lo_address: Err("not tried".into()),
        tproxy: Err("not tried".into()),
        batch_end_ack: Err("not tried".into()),
    };
    f.redirect = istio.as_ref().map(drop).map_err(Clone::clone);
    match istio {
        Err(_) => {}
        Ok(rs) => {
            {
                f.read_back = match nft::read() {
                    Ok(live) => {
                        let drift = nft::diff(&nft::expected(&rs), live.as_ref());
                        if drift.is_empty() {
                            Ok(())
                        } else {
                            Err(drift.join("; "))
                        }
                    }
                    Err(e) => Err(e.to_string()),
                };
                f.batch_end_ack = nft::batch_end_acked(&rs).map_err(|e| e.to_string());
                // Where IPv6 is off sluice never adds `::6`, so there is nothing to tag.
                let ipv6 = std::fs::read_to_string("/proc/sys/net/ipv6/conf/lo/disable_ipv6")
                    .is_ok_and(|v| v.trim() == "0");
                let had = lo_has_passthrough6();
                f.lo_address = match capture::detach() {
                    Err(e) => Err(e.to_string()),
                    Ok(_) if !ipv6 => Ok(()),
                    Ok(_) if !had => Err("::6 was not on lo after attach".into()),
                    Ok(_) if lo_has_passthrough6() => {
                        Err("detach left the ::6 it added on lo".into())
                    }
                    Ok(_) => Ok(()),
                };
            }
        }
    }
    f.tproxy = attach(&want(&[
        (plan::REDIRECT, "enabled"),
        ("sluice.dev/mode", "tproxy"),
    ]))
    .and_then(|_| {
        capture::detach().map_err(|e| e.to_string())?;
        // The policy routing must be gone too.
        match device::teardown(None) {
            Ok(false) => Ok(()),
            Ok(true) => Err("detach left policy routing behind".into()),
            Err(e) => Err(e.to_string()),
        }
    });
    f
}
