//! The one comparison of a pod's namespace with its plan (Check, the reconciler), and the
//! repair it may lead to.

use std::time::Instant;

use super::{Planned, ProgramError, Timings, Want, complete_fresh, repair};
use crate::kernel::device::{self, DeviceSetup};
use crate::kernel::nft::{self, LiveTable};
use crate::model::plan::RedirectPlan;
use crate::model::ruleset::{Attached, Owner, Ruleset};

/// What [`reconcile`] found, and did.
#[derive(Debug, Clone)]
pub struct Reconciled {
    /// The live table's owner, if there is a table of ours.
    pub live: Option<Owner>,
    /// The plan compared with (counting the live table's attachments); `None` when the pod
    /// does not ask for capture.
    pub planned: Option<Planned>,
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
    /// Repair when there is a difference (the reconciler).
    Repair,
}

/// The one comparison of a pod's namespace with its plan, shared by Check and the reconciler:
/// the table (ownership and rules; see `nft::diff`), then the device state and sysctls (see
/// `device::inspect`). The plan counts the attachments the live table's owner counts (the
/// kernel's record), or `fallback` when there is no table or it counts none (what the agent or
/// the runtime knows). A pod that does not ask for capture is expected to have no table. With
/// [`Act::Repair`] and a difference, the plan stamped `at` is applied: a missing capture as
/// for a fresh pod (on failure the pod is left as it was, uncaptured), an existing one through
/// [`repair`] (never removed on failure).
pub fn reconcile(
    want: &Want,
    fallback: &[Attached],
    act: Act,
    at: u64,
) -> Result<Reconciled, ProgramError> {
    let live = nft::read()?;
    let live_owner = live.as_ref().and_then(LiveTable::owner);
    let counted = live_owner
        .as_ref()
        .map(|o| o.attachments.clone())
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| fallback.to_vec());
    let mut owner = want.owner(&counted, live_owner.as_ref().map_or(0, |o| o.attached_at));
    if owner.attached_at == 0 {
        owner.attached_at = at;
    }
    let Some(mut planned) = want.plan(owner)? else {
        let drift = live
            .map(|_| vec!["a sluice table exists for a pod that is not captured".to_owned()])
            .unwrap_or_default();
        return Ok(Reconciled {
            live: live_owner,
            planned: None,
            missing: false,
            drift,
            repaired: None,
        });
    };
    super::own_lo_address(&mut planned, live_owner.as_ref())?;
    let setup = DeviceSetup::from_plan(&planned.plan).owning(planned.ruleset.owner.lo_address);
    let mut drift = nft::diff(&nft::expected(&planned.ruleset), live.as_ref());
    drift.extend(device::inspect(&setup).map_err(ProgramError::Inspect)?);
    let repaired = (act == Act::Repair && !drift.is_empty()).then(|| {
        let mut rs = planned.ruleset.clone();
        rs.owner.attached_at = at;
        if live.is_some() {
            repair(&rs, &planned.plan)
        } else {
            fresh(&rs, &planned.plan)
        }
        .map_err(|e| e.to_string())
    });
    Ok(Reconciled {
        live: live_owner,
        missing: live.is_none(),
        planned: Some(planned),
        drift,
        repaired,
    })
}

/// Programs a pod that has no table (the reconciler's repair of a missing capture): as an ADD
/// of a fresh pod, rolled back whole on failure.
fn fresh(rs: &Ruleset, plan: &RedirectPlan) -> Result<Timings, ProgramError> {
    let start = Instant::now();
    if !nft::create(rs)? {
        // Someone's ADD got there first: make it equal in place instead.
        return repair(rs, plan);
    }
    complete_fresh(plan, rs.owner.lo_address, start)
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
