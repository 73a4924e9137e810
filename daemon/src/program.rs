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
    #[error("{0} (the nftables table was rolled back)")]
    Device(#[source] DeviceError),
    #[error("removing device setup: {0}")]
    Teardown(#[source] DeviceError),
}

impl ProgramError {
    /// The kernel did not answer in time: the caller should report "try again later".
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            ProgramError::Nft(NftError::Timeout { .. })
                | ProgramError::Device(DeviceError::Timeout { .. })
                | ProgramError::Teardown(DeviceError::Timeout { .. })
        )
    }
}

/// Applies the ruleset (one atomic batch), then device setup (`lo` up, the IPv6 passthrough
/// address, TPROXY policy routing, sysctls). If device setup fails, what it added is removed,
/// sysctls already written are restored and the table is removed again, so the pod is left
/// without capture and the ADD fails; the runtime then tears the sandbox down.
pub fn attach(rs: &Ruleset, plan: &RedirectPlan) -> Result<Timings, ProgramError> {
    let start = Instant::now();
    let replaced = nft::apply(rs).inspect_err(|e| {
        // No answer means the batch may or may not have been committed: remove the table so
        // the failed ADD leaves nothing behind (best effort, itself bounded in time).
        if matches!(e, NftError::Timeout { .. })
            && let Err(rb) = nft::remove()
        {
            tracing::error!(error = %rb, "removing the table after an unanswered batch failed");
        }
    })?;
    let nft_done = Instant::now();
    let setup = DeviceSetup::from_plan(plan);
    let result = device::setup(&setup, !replaced).and_then(|()| {
        device::write_sysctls(&setup.sysctls)
            .map(drop)
            .inspect_err(|_| {
                if let Err(e) = device::teardown() {
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
    Ok(Timings {
        replaced,
        nft_us: (nft_done - start).as_micros() as u64,
        device_us: nft_done.elapsed().as_micros() as u64,
    })
}

/// Where an attach spent its time inside the pod's namespace (logged per attach).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    /// An existing sluice table was atomically replaced (a re-ADD).
    pub replaced: bool,
    pub nft_us: u64,
    pub device_us: u64,
}

/// Removes our table and our rules, routes and addresses. `Ok(false)` when there was nothing
/// to remove.
pub fn detach() -> Result<bool, ProgramError> {
    let table = nft::remove()?;
    let device = device::teardown().map_err(ProgramError::Teardown)?;
    Ok(table || device)
}

/// Reads our table back.
pub fn inspect() -> Result<Option<LiveTable>, NftError> {
    nft::read()
}
