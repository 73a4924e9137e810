//! The kernel-facing steps of Attach/Detach/Check, run inside a pod's namespace on a netns
//! worker thread: one nftables batch plus device setup, with rollback, so a pod ends up either
//! fully programmed or as it was.
//!
//! The plan is made here, from what the pod asks for ([`Want`]) and the attachments the kernel
//! counts (the table's owner): a pod attached on several networks is captured for the address
//! families of all its attachments together, whatever order their ADDs come in and whether or
//! not the agent remembers the earlier ones.

use std::collections::BTreeMap;
use std::time::Instant;

use crate::kernel::device::{self, DeviceError, DeviceSetup};
use crate::kernel::nft::{self, NftError};
use crate::model::plan::{self, Decision, PlanDefaults, PlanError, Profile, RedirectPlan};
use crate::model::ruleset::{Attached, Owner, Ruleset};

mod reconcile;

pub use reconcile::{Act, Reconciled, inspect, reconcile};

#[derive(Debug, thiserror::Error)]
pub enum ProgramError {
    #[error(transparent)]
    Plan(#[from] PlanError),
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
        match self {
            ProgramError::Nft(e) => matches!(e, NftError::Timeout { .. }),
            ProgramError::Device(e)
            | ProgramError::Teardown(e)
            | ProgramError::Inspect(e)
            | ProgramError::Repair(e) => matches!(e, DeviceError::Timeout { .. }),
            ProgramError::Plan(_) => false,
        }
    }

    /// The agent ran short of something that comes back (file descriptors, memory, netlink
    /// buffer space): transient, as a timeout is; the runtime's retry will find it again.
    pub fn is_transient(&self) -> bool {
        let io = match self {
            ProgramError::Nft(
                NftError::Socket(e) | NftError::Send { source: e, .. } | NftError::Receive(e),
            )
            | ProgramError::Nft(NftError::Dump(e)) => Some(e),
            ProgramError::Device(DeviceError::Connect(e) | DeviceError::Runtime(e))
            | ProgramError::Inspect(DeviceError::Connect(e) | DeviceError::Runtime(e))
            | ProgramError::Repair(DeviceError::Connect(e) | DeviceError::Runtime(e))
            | ProgramError::Teardown(DeviceError::Connect(e) | DeviceError::Runtime(e)) => Some(e),
            _ => None,
        };
        self.is_timeout()
            || io
                .and_then(std::io::Error::raw_os_error)
                .is_some_and(crate::kernel::netns::transient_errno)
    }
}

/// What a pod asks for: its annotations under the node's defaults, and who it is. The plan is
/// made from it against the pod's attachments ([`Want::plan`]).
#[derive(Debug, Clone)]
pub struct Want {
    pub annotations: BTreeMap<String, String>,
    pub defaults: PlanDefaults,
    pub pod_uid: String,
    pub container_id: String,
}

/// A plan, its table, and where it came from.
#[derive(Debug, Clone)]
pub struct Planned {
    pub plan: RedirectPlan,
    pub profile: Profile,
    /// Native annotations not applied (see `plan::Decision::Capture`).
    pub ignored: Vec<String>,
    pub ruleset: Ruleset,
}

impl Want {
    /// The capture for this pod counting `owner`'s attachments: the families of their
    /// addresses together (both when none has an address). `None` when the pod does not ask
    /// for capture. A plan over [`plan::MAX_RULES`] is refused, naming the annotation.
    pub fn plan(&self, mut owner: Owner) -> Result<Option<Planned>, PlanError> {
        let families = owner.families().or_dual();
        let (plan, profile, ignored) =
            match plan::decide_for(&self.annotations, families, &self.defaults)? {
                Decision::Skip { .. } => return Ok(None),
                Decision::Capture {
                    plan,
                    profile,
                    ignored,
                } => (plan, profile, ignored),
            };
        owner.fingerprint = plan.fingerprint();
        let ruleset = Ruleset::from_plan(&plan, owner);
        if ruleset.rule_count() > plan::MAX_RULES {
            return Err(plan::too_many_rules(
                &self.annotations,
                ruleset.rule_count(),
            ));
        }
        Ok(Some(Planned {
            plan,
            profile,
            ignored,
            ruleset,
        }))
    }

    /// An owner of this pod, stamped `at`, counting `attachments`.
    pub fn owner(&self, attachments: &[Attached], at: u64) -> Owner {
        let mut owner = Owner::new("", &self.pod_uid, &self.container_id).at(at);
        for a in attachments {
            owner.attach(a.clone());
        }
        owner
    }
}

/// What [`attach`] did.
#[derive(Debug, Clone)]
pub struct Attach {
    /// The plan programmed (counting every attachment of the pod).
    pub planned: Planned,
    /// A table was there before (a re-ADD, or another network's ADD of the same pod).
    pub replaced: bool,
    pub timings: Timings,
}

/// Programs the pod for attachment `this`: the table (one atomic batch), then device setup
/// (`lo` up, the IPv6 passthrough address, TPROXY policy routing, sysctls), planned over the
/// attachments the kernel already counts plus `this` (`known`: what the agent recorded, used
/// when there is no table yet). What a failure leaves depends on what was there:
/// - no table (a fresh pod): what was added is removed and the sysctls written are restored,
///   so the pod is left without capture and the ADD fails (the runtime tears the sandbox
///   down); a batch the kernel did not answer is removed only if the table there is provably
///   the one this call sent;
/// - the same plan again, or another network's ADD of a captured pod: the table is swapped
///   and the device state completed in place; nothing is removed, so the capture in place
///   stays;
/// - a different plan for the same attachments: `restore` (what the pod asked for before,
///   when the agent knows it) is put back — table with its owner as the kernel had it, device
///   state, sysctls; without it the pod is left uncaptured as a fresh pod, and the ADD fails.
pub fn attach(
    want: &Want,
    this: Attached,
    known: &[Attached],
    at: u64,
    restore: Option<&Want>,
) -> Result<Attach, ProgramError> {
    let start = Instant::now();
    let mut attachments: Vec<Attached> = known
        .iter()
        .filter(|a| a.ifname != this.ifname)
        .cloned()
        .collect();
    attachments.push(this.clone());
    let mut fresh = want
        .plan(want.owner(&attachments, at))?
        .ok_or_else(|| not_asked(want))?;
    own_lo_address(&mut fresh, None)?;
    let created = nft::create(&fresh.ruleset).inspect_err(|e| {
        if matches!(e, NftError::Timeout { .. }) {
            remove_if_sent(&fresh.ruleset.owner);
        }
    })?;
    if created {
        let timings = complete_fresh(&fresh.plan, fresh.ruleset.owner.lo_address, start)?;
        return Ok(Attach {
            planned: fresh,
            replaced: false,
            timings,
        });
    }
    // A table is there: count what its owner counts, and ours.
    let previous = nft::read()?.and_then(|t| t.owner());
    let ours = previous
        .as_ref()
        .filter(|p| p.container() == Owner::new("", "", &want.container_id).container());
    let mut owner = want.owner(&[], at);
    for a in ours.into_iter().flat_map(|p| &p.attachments) {
        owner.attach(a.clone());
    }
    if !owner.attach(this.clone()) {
        tracing::warn!(ifname = %this.ifname, attached = ?owner.ifnames(), "cannot count this interface in the table's owner; its DEL will leave the capture to the others");
    }
    let mut planned = want.plan(owner)?.ok_or_else(|| not_asked(want))?;
    let same_plan = ours.is_some_and(|p| p.fingerprint == planned.ruleset.owner.fingerprint);
    // The same capture again keeps the time it was installed: a repeated ADD leaves the table
    // exactly as it was.
    if let Some(p) = ours.filter(|p| same_plan && p.attached_at != 0) {
        planned.ruleset.owner.attached_at = p.attached_at;
    }
    own_lo_address(&mut planned, ours)?;
    let owned = planned.ruleset.owner.lo_address;
    // An address sluice added that the plan no longer has goes (after the new state is in).
    let released = ours
        .and_then(|p| p.lo_address)
        .filter(|a| Some(*a) != owned);
    // A new interface's ADD of a pod already captured (Multus) only ever adds to its capture.
    let secondary = ours.is_some_and(|p| {
        !p.attachments.is_empty() && p.attachments.iter().all(|a| a.ifname != this.ifname)
    });
    // An unanswered replace leaves what was there (the capture in place, or ours): never
    // removed on a timeout.
    nft::replace(&planned.ruleset)?;
    let nft_done = Instant::now();
    let nft_at_ns = now_ns();
    let setup = DeviceSetup::from_plan(&planned.plan).owning(owned);
    if same_plan || secondary {
        device::setup(&setup, device::Setup::Repair).map_err(ProgramError::Repair)?;
        device::write_sysctls(&setup.sysctls).map_err(ProgramError::Repair)?;
    } else {
        let result = device::setup(&setup, device::Setup::Replace)
            .and_then(|()| device::write_sysctls(&setup.sysctls).map(drop));
        if let Err(e) = result {
            put_back(restore, ours);
            return Err(ProgramError::Device(e));
        }
    }
    if let Some(a) = released {
        device::release(a).map_err(ProgramError::Repair)?;
    }
    Ok(Attach {
        planned,
        replaced: true,
        timings: Timings::since(start, nft_done, nft_at_ns),
    })
}

/// Records in the planned owner whether sluice owns the `lo` address the plan has (`::6`):
/// it does when the previous owner says so, or when the address is not there yet (this call
/// adds it). An address already there is someone else's (the pod's runtime, a mesh's init
/// container), and sluice never removes it. One code path on every kernel: the address's own
/// protocol tag, which would say it, needs Linux 6.1.
pub(super) fn own_lo_address(
    planned: &mut Planned,
    previous: Option<&Owner>,
) -> Result<(), ProgramError> {
    let wanted = DeviceSetup::from_plan(&planned.plan).lo_address6;
    planned.ruleset.owner.lo_address = match wanted {
        None => None,
        Some(a) if previous.and_then(|p| p.lo_address) == Some(a) => Some(a),
        Some(a) => match device::lo_has(a).map_err(ProgramError::Inspect)? {
            Some(false) => Some(a),
            // There already, or IPv6 off on lo (then nothing is added).
            Some(true) | None => None,
        },
    };
    Ok(())
}

fn not_asked(want: &Want) -> ProgramError {
    // The caller decided capture from the same annotations; a skip here means they changed
    // under it, which they cannot (they are one request's).
    ProgramError::Plan(PlanError {
        annotation: String::new(),
        value: String::new(),
        reason: format!(
            "container {}: the pod does not ask for capture",
            want.container_id
        ),
    })
}

/// After a batch the kernel did not answer: removes the table only if it is provably the one
/// that batch created (its owner is exactly `sent`), never a capture that was already there.
pub fn remove_if_sent(sent: &Owner) {
    match nft::read() {
        Ok(Some(live)) if live.owner().as_ref() == Some(sent) => {
            if let Err(e) = nft::remove() {
                tracing::error!(error = %e, "removing the table after an unanswered batch failed");
            }
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(error = %e, "after an unanswered batch the table could not be read; left as it is")
        }
    }
}

/// Puts back the capture a failed plan change replaced: the previous plan (from `restore`,
/// what the pod asked for before) under the owner the kernel had — its attachments and attach
/// time — with its device state and sysctls. Without both, the table is removed: the ADD
/// fails, and the pod is left without capture rather than with half of one.
fn put_back(restore: Option<&Want>, previous: Option<&Owner>) {
    let back = restore.zip(previous).and_then(|(want, owner)| {
        let planned = want.plan(owner.clone()).ok()??;
        // Only the very plan that was there: another one would not be a restore.
        (planned.ruleset.owner.fingerprint == owner.fingerprint).then_some(planned)
    });
    let Some(planned) = back else {
        if let Err(e) = device::teardown(previous.and_then(|p| p.lo_address)) {
            tracing::error!(error = %e, "removing device setup after a failed plan change");
        }
        if let Err(e) = nft::remove() {
            tracing::error!(error = %e, "removing the table after a failed plan change");
        }
        return;
    };
    let mut ruleset = planned.ruleset;
    // `plan` stamped its own fingerprint; the owner stays as the kernel had it.
    ruleset.owner = previous.cloned().unwrap_or(ruleset.owner);
    let setup = DeviceSetup::from_plan(&planned.plan).owning(ruleset.owner.lo_address);
    let restored = nft::replace(&ruleset)
        .map_err(ProgramError::Nft)
        .and_then(|()| device::setup(&setup, device::Setup::Replace).map_err(ProgramError::Device))
        .and_then(|()| {
            device::write_sysctls(&setup.sysctls)
                .map(drop)
                .map_err(ProgramError::Device)
        });
    if let Err(e) = restored {
        tracing::error!(error = %e, "restoring the previous capture after a failed re-ADD failed");
    }
}

/// Repairs a capture that is there but differs from `rs`: the table is replaced in one
/// transaction (an atomic swap: the pod is never without a table), then the device state is
/// made equal to the plan in place — what is missing added, what is ours and not in the plan
/// removed — and the sysctls written. Nothing is torn down first and nothing is removed when a
/// step fails, so working capture is never lost to a failed repair (the next pass retries).
pub fn repair(rs: &Ruleset, plan: &RedirectPlan) -> Result<Timings, ProgramError> {
    let start = Instant::now();
    nft::replace(rs)?;
    let nft_done = Instant::now();
    let nft_at_ns = now_ns();
    let setup = DeviceSetup::from_plan(plan).owning(rs.owner.lo_address);
    device::setup(&setup, device::Setup::Repair).map_err(ProgramError::Repair)?;
    device::write_sysctls(&setup.sysctls).map_err(ProgramError::Repair)?;
    Ok(Timings::since(start, nft_done, nft_at_ns))
}

/// Where an attach spent its time inside the pod's namespace (logged per attach).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    pub nft_us: u64,
    pub device_us: u64,
    /// When the batch was acknowledged and the device setup done ([`now_ns`]).
    pub nft_at_ns: u64,
    pub device_at_ns: u64,
}

impl Timings {
    fn since(start: Instant, nft_done: Instant, nft_at_ns: u64) -> Self {
        Timings {
            nft_us: (nft_done - start).as_micros() as u64,
            device_us: nft_done.elapsed().as_micros() as u64,
            nft_at_ns,
            device_at_ns: now_ns(),
        }
    }
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
    let owned = nft::read()?
        .and_then(|t| t.owner())
        .and_then(|o| o.lo_address);
    detach_owning(owned)
}

/// [`detach`], the table's owner having said which `lo` address is sluice's.
fn detach_owning(owned: Option<std::net::Ipv6Addr>) -> Result<bool, ProgramError> {
    let table = nft::remove()?;
    let device = device::teardown(owned).map_err(ProgramError::Teardown)?;
    Ok(table || device)
}

/// What [`detach_for`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detached {
    /// Our table and device state were removed (`false`: there were none).
    Removed(bool),
    /// Other interfaces of the pod are still attached (listed), so the capture was kept.
    /// `recounted`: the table's owner no longer counts the detached interface.
    Kept {
        attached: Vec<String>,
        recounted: bool,
    },
}

/// Detach for the attachment on interface `ifname`. The table's owner counts the attachments
/// of the capture; the capture (table and device state) is removed only when `ifname` is the
/// last of them, so a secondary network's DEL (Multus) leaves the pod captured, whatever the
/// order of the DELs. An interface that is not counted changes nothing while others are. An
/// empty `ifname`, or a table that counts none, removes.
///
/// The remaining attachments are counted in the table's owner (rewritten alone, in one
/// transaction). When they bring fewer address families than the table captures and `want`
/// (what the pod asks for) is known, the capture is narrowed to them in place (as a repair:
/// nothing torn down first); without `want` it is left as it is, and Check reports the
/// difference until a re-ADD or the reconciler makes it equal.
pub fn detach_for(ifname: &str, want: Option<&Want>) -> Result<Detached, ProgramError> {
    let live = if ifname.is_empty() {
        None
    } else {
        nft::read()?
    };
    let Some((live, mut owner)) = live
        .and_then(|l| l.owner().map(|o| (l, o)))
        .filter(|(_, o)| !o.attachments.is_empty())
    else {
        return detach().map(Detached::Removed);
    };
    if !owner.detach(ifname) {
        return Ok(Detached::Kept {
            attached: owner.ifnames(),
            recounted: false,
        });
    }
    if owner.attachments.is_empty() {
        return detach_owning(owner.lo_address).map(Detached::Removed);
    }
    let narrower = owner.families().or_dual() != live.families();
    match want.filter(|_| narrower).map(|w| w.plan(owner.clone())) {
        Some(Ok(Some(planned))) => {
            repair(&planned.ruleset, &planned.plan)?;
        }
        _ => {
            nft::set_owner(&owner)?;
        }
    }
    Ok(Detached::Kept {
        attached: owner.ifnames(),
        recounted: true,
    })
}

/// Device setup and sysctls after this call created the table; on failure everything the
/// call added — device state, sysctls, the table — is removed again.
pub(super) fn complete_fresh(
    plan: &RedirectPlan,
    owned: Option<std::net::Ipv6Addr>,
    start: Instant,
) -> Result<Timings, ProgramError> {
    let nft_done = Instant::now();
    let nft_at_ns = now_ns();
    let setup = DeviceSetup::from_plan(plan).owning(owned);
    let result = device::setup(&setup, device::Setup::Fresh).and_then(|()| {
        device::write_sysctls(&setup.sysctls)
            .map(drop)
            .inspect_err(|_| {
                if let Err(e) = device::teardown(owned) {
                    tracing::error!(error = %e, "removing device setup after a failed sysctl");
                }
            })
    });
    if let Err(e) = result {
        if let Err(rb) = nft::remove() {
            tracing::error!(error = %rb, "rollback after failed device setup also failed");
        }
        return Err(ProgramError::Device(e));
    }
    Ok(Timings::since(start, nft_done, nft_at_ns))
}
