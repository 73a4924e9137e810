//! The kernel-facing steps of Attach/Detach/Check, run inside a pod's namespace on a netns
//! worker thread: one nftables batch plus device setup, with rollback, so a pod ends up either
//! fully programmed or untouched.

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

/// Applies the ruleset (one atomic batch), then device setup. If device setup fails the table
/// is removed again, so the pod is left without capture and the ADD fails; the runtime then
/// tears the sandbox down.
pub fn attach(rs: &Ruleset) -> Result<(), ProgramError> {
    nft::apply(rs)?;
    if let Err(e) = device::setup() {
        if let Err(rb) = nft::remove() {
            tracing::error!(error = %rb, "rollback after failed device setup also failed");
        }
        return Err(ProgramError::Device(e));
    }
    Ok(())
}

/// Removes our table. `Ok(false)` when there was nothing to remove.
pub fn detach() -> Result<bool, NftError> {
    nft::remove()
}

/// Reads our table back.
pub fn inspect() -> Result<Option<LiveTable>, NftError> {
    nft::read()
}
