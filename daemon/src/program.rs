//! The kernel-facing steps of Attach/Detach/Check, run inside a pod's namespace on a netns
//! worker thread: one nftables batch plus device setup, with rollback, so a pod ends up either
//! fully programmed or untouched.

use std::time::Instant;

use crate::device::{self, DeviceError, DeviceSetup};
use crate::nft::{self, LiveTable, NftError};
use crate::plan::RedirectPlan;
use crate::ruleset::Ruleset;

#[derive(Debug, thiserror::Error)]
pub enum ProgramError {
    #[error(transparent)]
    Nft(#[from] NftError),
    #[error("{0} (rolled back)")]
    Device(#[source] DeviceError),
    #[error("removing device setup: {0}")]
    Teardown(#[source] DeviceError),
    #[error("reading device state: {0}")]
    Inspect(#[source] DeviceError),
    #[error("{0} (repair in place: nothing removed)")]
    Repair(#[source] DeviceError),
}

impl ProgramError {
    /// The kernel did not answer in time: the caller should report "try again later".
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            ProgramError::Nft(NftError::Timeout { .. })
                | ProgramError::Device(DeviceError::Timeout { .. })
                | ProgramError::Teardown(DeviceError::Timeout { .. })
                | ProgramError::Inspect(DeviceError::Timeout { .. })
                | ProgramError::Repair(DeviceError::Timeout { .. })
        )
    }
}

/// Applies the ruleset (one atomic batch), then device setup (`lo` up, the IPv6 passthrough
/// address, TPROXY policy routing, sysctls). What a failure leaves depends on what was there:
/// - a fresh pod: what device setup added is removed, sysctls already written are restored and
///   the table is removed again, so the pod is left without capture and the ADD fails (the
///   runtime then tears the sandbox down);
/// - a repeated ADD of the same plan (the table's owner says so): nothing is removed, so the
///   capture that was in place stays in place;
/// - a different plan replacing an earlier one: `previous` (the earlier plan, when the agent
///   knows it) is put back, table and device state; without it the pod is left uncaptured as
///   for a fresh pod, and the ADD fails.
pub fn attach(
    rs: &Ruleset,
    plan: &RedirectPlan,
    previous: Option<&(Ruleset, RedirectPlan)>,
) -> Result<Timings, ProgramError> {
    let start = Instant::now();
    let applied = nft::apply(rs).inspect_err(|e| {
        // No answer means the batch may or may not have been committed: remove the table so
        // the failed ADD leaves nothing behind (best effort, itself bounded in time).
        if matches!(e, NftError::Timeout { .. })
            && let Err(rb) = nft::remove()
        {
            tracing::error!(error = %rb, "removing the table after an unanswered batch failed");
        }
    })?;
    let nft_done = Instant::now();
    let nft_at_ns = now_ns();
    let mode = match &applied {
        nft::Applied::Created => device::Setup::Fresh,
        nft::Applied::Replaced { previous: Some(o) } if o.fingerprint == rs.owner.fingerprint => {
            device::Setup::Repair
        }
        nft::Applied::Replaced { .. } => device::Setup::Replace,
    };
    let setup = DeviceSetup::from_plan(plan);
    let result = device::setup(&setup, mode).and_then(|()| {
        device::write_sysctls(&setup.sysctls)
            .map(drop)
            .inspect_err(|_| {
                if mode != device::Setup::Repair
                    && let Err(e) = device::teardown()
                {
                    tracing::error!(error = %e, "removing device setup after a failed sysctl");
                }
            })
    });
    if let Err(e) = result {
        match (mode, &applied, previous) {
            (device::Setup::Repair, ..) => {}
            (
                device::Setup::Replace,
                nft::Applied::Replaced { previous: Some(o) },
                Some((prev_rs, prev_plan)),
            ) if o.fingerprint == prev_rs.owner.fingerprint => {
                let restored = nft::apply(prev_rs)
                    .map_err(ProgramError::Nft)
                    .and_then(|_| {
                        device::setup(&DeviceSetup::from_plan(prev_plan), device::Setup::Replace)
                            .map_err(ProgramError::Device)
                    });
                if let Err(rb) = restored {
                    tracing::error!(error = %rb, "restoring the previous capture after a failed re-ADD failed");
                }
            }
            _ => {
                if let Err(rb) = nft::remove() {
                    tracing::error!(error = %rb, "rollback after failed device setup also failed");
                }
            }
        }
        return Err(ProgramError::Device(e));
    }
    Ok(Timings {
        replaced: applied != nft::Applied::Created,
        nft_us: (nft_done - start).as_micros() as u64,
        device_us: nft_done.elapsed().as_micros() as u64,
        nft_at_ns,
        device_at_ns: now_ns(),
    })
}

/// Repairs a capture that is there but differs from `rs`: the table is replaced in one
/// transaction (an atomic swap: the pod is never without a table), then the device state is
/// made equal to the plan in place — what is missing added, what is ours and not in the plan
/// removed — and the sysctls written. Nothing is torn down first and nothing is removed when a
/// step fails, so working capture is never lost to a failed repair (the next pass retries).
pub fn repair(rs: &Ruleset, plan: &RedirectPlan) -> Result<Timings, ProgramError> {
    let start = Instant::now();
    nft::apply(rs)?;
    let nft_done = Instant::now();
    let nft_at_ns = now_ns();
    let setup = DeviceSetup::from_plan(plan);
    device::setup(&setup, device::Setup::Repair).map_err(ProgramError::Repair)?;
    device::write_sysctls(&setup.sysctls).map_err(ProgramError::Repair)?;
    Ok(Timings {
        replaced: true,
        nft_us: (nft_done - start).as_micros() as u64,
        device_us: nft_done.elapsed().as_micros() as u64,
        nft_at_ns,
        device_at_ns: now_ns(),
    })
}

/// Where an attach spent its time inside the pod's namespace (logged per attach).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    /// An existing sluice table was atomically replaced (a re-ADD).
    pub replaced: bool,
    pub nft_us: u64,
    pub device_us: u64,
    /// When the batch was acknowledged and the device setup done ([`now_ns`]).
    pub nft_at_ns: u64,
    pub device_at_ns: u64,
}

/// Wall-clock nanoseconds since the Unix epoch: stage timestamps a caller on the same host can
/// line up with its own (an `Instant` cannot leave the process).
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Removes our table and our rules, routes and addresses. `Ok(false)` when there was nothing
/// to remove.
pub fn detach() -> Result<bool, ProgramError> {
    let table = nft::remove()?;
    let device = device::teardown().map_err(ProgramError::Teardown)?;
    Ok(table || device)
}

/// What [`detach_for`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detached {
    /// Our table and device state were removed (`false`: there were none).
    Removed(bool),
    /// Other interfaces of the pod are still attached (listed), so the capture was kept.
    /// `recounted`: the table's owner no longer lists the detached interface.
    Kept {
        attached: Vec<String>,
        recounted: bool,
    },
}

/// Detach for the attachment on interface `ifname`. The table's owner lists the interfaces
/// attached with the capture; the capture (table and device state) is removed only when
/// `ifname` is the last of them, so a secondary network's DEL (Multus) leaves the pod
/// captured, whatever the order of the DELs. An interface that is not listed (never counted)
/// changes nothing while others are. An empty `ifname`, or a table that lists none, removes.
///
/// To stop counting `ifname` while others remain, the table is rewritten with a new owner in
/// one atomic replace, which needs the rules: `current` is the ruleset of the plan the agent
/// recorded for the pod. When it is absent or its fingerprint is not the live one, the table is
/// left as it is (the capture stays until the namespace goes) rather than rewritten with rules
/// that might differ from what is live.
pub fn detach_for(ifname: &str, current: Option<&Ruleset>) -> Result<Detached, ProgramError> {
    let owner = if ifname.is_empty() {
        None
    } else {
        nft::read()?.and_then(|t| t.owner())
    };
    let Some(owner) = owner.filter(|o| !o.ifnames.is_empty()) else {
        return detach().map(Detached::Removed);
    };
    let attached: Vec<String> = owner
        .ifnames
        .iter()
        .filter(|i| *i != ifname)
        .cloned()
        .collect();
    if attached.is_empty() {
        return detach().map(Detached::Removed);
    }
    let counted = attached.len() < owner.ifnames.len();
    let recounted = match current {
        Some(rs) if counted && rs.owner.fingerprint == owner.fingerprint => {
            let mut rs = rs.clone();
            rs.owner = crate::ruleset::Owner {
                ifnames: attached.clone(),
                ..owner
            };
            nft::replace(&rs)?;
            true
        }
        _ => false,
    };
    Ok(Detached::Kept {
        attached,
        recounted,
    })
}

/// What [`reconcile`] found, and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reconciled {
    /// The live table's owner, if there is a table of ours.
    pub live: Option<crate::ruleset::Owner>,
    /// The interfaces counted on the desired owner (the live table's, else the given ones).
    pub ifnames: Vec<String>,
    /// One line per difference between the namespace and the plan; empty when equal.
    pub drift: Vec<String>,
    /// Whether the table was missing (as opposed to present and different).
    pub missing: bool,
    /// `Some` when a repair ran: its result.
    pub repaired: Option<Result<Timings, String>>,
}

/// How [`reconcile`] acts on a difference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    /// Report only (Check; the reconciler in report mode).
    Diff,
    /// Repair through [`attach`] when there is a difference (the reconciler).
    Repair,
}

/// The one comparison of a pod's namespace with its plan, shared by Check and the reconciler:
/// the table (ownership and rules; see `nft::diff`), then the device state and sysctls (see
/// `device::inspect`). The interfaces attached are the kernel's record, not part of the plan:
/// the desired owner takes the live table's (or `ifnames` when there is no table). With
/// [`Act::Repair`] and a difference, `desired` stamped `at` is applied: a missing capture
/// through [`attach`] as for a fresh pod (on failure the pod is left as it was, uncaptured), an
/// existing one through [`repair`] (never removed on failure).
pub fn reconcile(
    desired: &Ruleset,
    plan: &RedirectPlan,
    ifnames: &[String],
    act: Act,
    at: u64,
) -> Result<Reconciled, ProgramError> {
    let (live, device_drift) = inspect(Some(&DeviceSetup::from_plan(plan)))?;
    let live_owner = live.as_ref().and_then(|l| l.owner());
    let mut rs = desired.clone();
    rs.owner.ifnames = live_owner
        .as_ref()
        .map(|o| o.ifnames.clone())
        .filter(|i| !i.is_empty())
        .unwrap_or_else(|| ifnames.to_vec());
    let mut drift = nft::diff(&nft::expected(&rs), live.as_ref());
    drift.extend(device_drift);
    let repaired = (act == Act::Repair && !drift.is_empty()).then(|| {
        rs.owner.attached_at = at;
        if live.is_some() {
            repair(&rs, plan)
        } else {
            attach(&rs, plan, None)
        }
        .map_err(|e| e.to_string())
    });
    Ok(Reconciled {
        live: live_owner,
        ifnames: rs.owner.ifnames,
        missing: live.is_none(),
        drift,
        repaired,
    })
}

/// Reads our table back, and compares the device state with `device` when the pod should be
/// captured (see [`device::inspect`]).
pub fn inspect(
    device: Option<&DeviceSetup>,
) -> Result<(Option<LiveTable>, Vec<String>), ProgramError> {
    let live = nft::read()?;
    let drift = match device {
        Some(d) => device::inspect(d).map_err(ProgramError::Inspect)?,
        None => Vec::new(),
    };
    Ok((live, drift))
}
