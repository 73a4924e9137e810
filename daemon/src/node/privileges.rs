//! Least privilege: the agent's hot path needs CAP_NET_ADMIN (nftables, rtnetlink, sysctls of
//! the pod's netns) and CAP_SYS_ADMIN (setns into a pod's network namespace), nothing else.
//! At start-up it checks both are there, then drops every other capability from every set.

use caps::{CapSet, Capability, CapsHashSet};

/// What the agent keeps.
pub const NEEDED: [Capability; 2] = [Capability::CAP_NET_ADMIN, Capability::CAP_SYS_ADMIN];

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error(
        "missing capability {0}: sluice-agent needs CAP_NET_ADMIN (nftables, netlink) and CAP_SYS_ADMIN (entering pod network namespaces); grant them (securityContext.capabilities.add: [NET_ADMIN, SYS_ADMIN])"
    )]
    Missing(Capability),
    #[error("reading or changing capabilities: {0}")]
    Caps(#[from] caps::errors::CapsError),
    #[error("setting no_new_privs: {0}")]
    NoNewPrivs(#[source] nix::Error),
}

/// Checks the needed capabilities are permitted, then keeps only those: the bounding set is
/// trimmed (when CAP_SETPCAP allows it), ambient and inheritable are cleared, and permitted and
/// effective become exactly [`NEEDED`]; and sets `no_new_privs`, so nothing the process might
/// exec gains privileges (a setuid binary, file capabilities). Returns the capabilities kept.
pub fn drop_to_needed() -> Result<Vec<Capability>, PrivilegeError> {
    let permitted = caps::read(None, CapSet::Permitted)?;
    if let Some(missing) = NEEDED.iter().find(|c| !permitted.contains(c)) {
        return Err(PrivilegeError::Missing(*missing));
    }
    let keep: CapsHashSet = NEEDED.into_iter().collect();
    if permitted.contains(&Capability::CAP_SETPCAP) {
        for cap in caps::read(None, CapSet::Bounding)? {
            if !keep.contains(&cap) {
                caps::drop(None, CapSet::Bounding, cap)?;
            }
        }
    }
    caps::clear(None, CapSet::Ambient)?;
    caps::clear(None, CapSet::Inheritable)?;
    caps::set(None, CapSet::Effective, &keep)?;
    caps::set(None, CapSet::Permitted, &keep)?;
    nix::sys::prctl::set_no_new_privs().map_err(PrivilegeError::NoNewPrivs)?;
    let mut kept: Vec<Capability> = caps::read(None, CapSet::Effective)?.into_iter().collect();
    kept.sort_by_key(|c| c.index());
    Ok(kept)
}
