//! The kernel-facing steps of Attach/Detach/Check, run inside a pod's namespace on a netns
//! worker thread: one nftables batch plus device setup, with rollback, so a pod ends up either
//! fully programmed or untouched.

use std::time::Instant;

use crate::device::{self, DeviceError};
use crate::nft::{self, LiveTable, NftError};
use crate::ruleset::Ruleset;

#[derive(Debug, thiserror::Error)]
pub enum ProgramError {
    #[error(transparent)]
    Nft(#[from] NftError),
    #[error("{0} (the nftables table was rolled back)")]
    Device(#[source] DeviceError),
}

/// Applies the ruleset (one atomic batch), then device setup (`lo` up, sysctls). If device
/// setup fails, sysctls already written are restored and the table is removed again, so the
/// pod is left without capture and the ADD fails; the runtime then tears the sandbox down.
pub fn attach(rs: &Ruleset, sysctls: &[(String, String)]) -> Result<Timings, ProgramError> {
    let start = Instant::now();
    nft::apply(rs)?;
    let nft_done = Instant::now();
    if let Err(e) = device::setup().and_then(|()| device::write_sysctls(sysctls).map(drop)) {
        if let Err(rb) = nft::remove() {
            tracing::error!(error = %rb, "rollback after failed device setup also failed");
        }
        return Err(ProgramError::Device(e));
    }
    Ok(Timings {
        nft_us: (nft_done - start).as_micros() as u64,
        device_us: nft_done.elapsed().as_micros() as u64,
    })
}

/// Where an attach spent its time inside the pod's namespace (logged per attach).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    pub nft_us: u64,
    pub device_us: u64,
}

/// Removes our table. `Ok(false)` when there was nothing to remove.
pub fn detach() -> Result<bool, NftError> {
    nft::remove()
}

/// Reads our table back.
pub fn inspect() -> Result<Option<LiveTable>, NftError> {
    nft::read()
}
