//! Render and apply: the one module that talks nf_tables. It links libnftnl (GPL-2.0-or-later)
//! through the `nftnl` crate; nothing else in sluice touches nftnl, so the GPL-linked surface
//! is exactly this directory.
//!
//! Every function here acts on the network namespace of the calling thread: callers run them
//! through `crate::kernel::netns` on a thread that has entered the pod's namespace. Sockets are opened
//! per call, after that entry, so they belong to the pod's namespace.

mod batch;
mod ffi;
mod send;
mod wire;

pub use send::batch_end_acked;
use send::{dump, send};

use std::io;
use std::time::Duration;

use nftnl::nftnl_sys::libc;

use crate::model::plan::Families;
use crate::model::ruleset::{OWNER_CHAIN, Owner, Ruleset, TABLE};

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("opening a netfilter netlink socket: {0}")]
    Socket(#[source] io::Error),
    /// The kernel refused one message of the batch (and so applied none of it).
    #[error("the kernel rejected {message} of the nftables batch: {source}")]
    Rejected {
        /// Which message: e.g. `rule 3 of chain inbound (…)`, `table inet sluice`.
        message: String,
        #[source]
        source: io::Error,
    },
    #[error("sending the nftables batch ({bytes} bytes): {source}")]
    Send {
        bytes: usize,
        #[source]
        source: io::Error,
    },
    #[error("receiving the kernel's answer to the nftables batch: {0}")]
    Receive(#[source] io::Error),
    #[error("{step}: the kernel did not answer within {timeout:?}")]
    Timeout {
        step: &'static str,
        timeout: Duration,
    },
    #[error("reading nftables state back from the kernel: {0}")]
    Dump(#[source] io::Error),
}

impl NftError {
    /// The errno the kernel answered a batch message with, if that is what failed.
    fn rejected_with(&self) -> Option<i32> {
        match self {
            NftError::Rejected { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// What the kernel holds in our table, in comparable form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveTable {
    /// The comments of the `owner` chain's rules (see `ruleset::Owner`), in order; empty for a
    /// table without that chain (earlier releases).
    pub owner_comments: Vec<String>,
    /// The table's comment and the state TLV beside it, as releases before `sluice/v2` wrote
    /// their owner (never written now).
    pub comment: Option<String>,
    pub state: Option<String>,
    /// Every chain but `owner`.
    pub chains: Vec<LiveChain>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveChain {
    pub name: String,
    /// (hook number, priority, type, policy) for base chains.
    pub base: Option<(u32, i32, String, u32)>,
    /// Each rule's expressions, in libnftnl's text form, in chain order.
    pub rules: Vec<String>,
}

impl LiveTable {
    /// The table's owner: from the `owner` chain, else from an earlier release's comment.
    pub fn owner(&self) -> Option<Owner> {
        Owner::from_comments(&self.owner_comments).or_else(|| {
            Owner::from_v1(
                self.comment.as_deref()?,
                self.state.as_deref(),
                self.families(),
            )
        })
    }

    /// The families the table captures, from its per-family chains (IPv4's are `inbound`,
    /// `outbound`, `tproxy_inbound`, IPv6's the same with a `6`).
    pub fn families(&self) -> Families {
        let has = |names: &[&str]| self.chains.iter().any(|c| names.contains(&c.name.as_str()));
        Families {
            ipv4: has(&["inbound", "outbound", "tproxy_inbound"]),
            ipv6: has(&["inbound6", "outbound6", "tproxy_inbound6"]),
        }
    }
}

/// Creates `rs` as `inet sluice` in the current netns in one create-only transaction: the
/// fresh-pod path (nothing is deleted, so the commit waits for no RCU grace period).
/// `Ok(false)` when a table is already there (the kernel refused the whole batch); nothing
/// was changed then.
pub fn create(rs: &Ruleset) -> Result<bool, NftError> {
    match send(&batch::install(rs, batch::Mode::Create)) {
        Ok(()) => Ok(true),
        Err(e) if e.rejected_with() == Some(libc::EEXIST) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Rewrites the owner of the existing `inet sluice` alone (see `batch::set_owner`): the
/// capture's chains stay exactly as they are. `Ok(false)` when there is no table.
pub fn set_owner(owner: &Owner) -> Result<bool, NftError> {
    match send(&batch::set_owner(owner)) {
        Ok(()) => Ok(true),
        Err(e) if e.rejected_with() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Atomically replaces the existing `inet sluice` with `rs` (no create-first attempt and no
/// owner merging: the caller says exactly what the table becomes).
pub fn replace(rs: &Ruleset) -> Result<(), NftError> {
    send(&batch::install(rs, batch::Mode::Replace))
}

/// Deletes `inet sluice` from the current netns. `Ok(false)` when there was none.
pub fn remove() -> Result<bool, NftError> {
    match send(&batch::delete()) {
        Ok(()) => Ok(true),
        Err(e) if e.rejected_with() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether nf_tables is usable here (a socket opens and the table list can be dumped).
pub fn probe() -> Result<(), NftError> {
    dump(libc::NFT_MSG_GETTABLE as u16, |_| {}).map(|_| ())
}

/// Reads `inet sluice` from the current netns; `None` when it does not exist.
pub fn read() -> Result<Option<LiveTable>, NftError> {
    let inet = libc::NFPROTO_INET as u32;
    let mut table = None;
    dump(libc::NFT_MSG_GETTABLE as u16, |nlh| {
        if let Some(t) = ffi::parse_table(nlh)
            && t.family == inet
            && t.name == TABLE
        {
            table = Some((
                ffi::udata_comment(&t.userdata),
                ffi::udata_field(&t.userdata, ffi::UDATA_SLUICE_STATE),
            ));
        }
    })?;
    let Some((comment, state)) = table else {
        return Ok(None);
    };
    let mut owner_comments = Vec::new();
    let mut chains: Vec<LiveChain> = Vec::new();
    dump(libc::NFT_MSG_GETCHAIN as u16, |nlh| {
        if let Some(c) = ffi::parse_chain(nlh)
            && c.family == inet
            && c.table == TABLE
        {
            chains.push(LiveChain {
                name: c.name,
                base: c.base,
                rules: Vec::new(),
            });
        }
    })?;
    dump(libc::NFT_MSG_GETRULE as u16, |nlh| {
        if let Some(r) = ffi::parse_rule(nlh)
            && r.family == inet
            && r.table == TABLE
        {
            if r.chain == OWNER_CHAIN {
                owner_comments.extend(r.comment);
            } else if let Some(c) = chains.iter_mut().find(|c| c.name == r.chain) {
                c.rules.push(r.exprs);
            }
        }
    })?;
    chains.retain(|c| c.name != OWNER_CHAIN);
    Ok(Some(LiveTable {
        owner_comments,
        comment,
        state,
        chains,
    }))
}

/// What [`read`] returns right after [`apply`] of `rs`: computed by parsing our own batch with
/// the same libnftnl parser the kernel's dump goes through, so equal means equal expressions.
pub fn expected(rs: &Ruleset) -> LiveTable {
    let batch = batch::install(rs, batch::Mode::Create);
    let mut chains: Vec<LiveChain> = rs
        .chains
        .iter()
        .map(|c| LiveChain {
            name: c.name.to_owned(),
            base: c.base.map(|b| {
                let hook = match b.hook {
                    crate::model::ruleset::Hook::Prerouting => libc::NF_INET_PRE_ROUTING,
                    crate::model::ruleset::Hook::Output => libc::NF_INET_LOCAL_OUT,
                };
                let kind = match b.kind {
                    crate::model::ruleset::Kind::Nat => "nat",
                    crate::model::ruleset::Kind::Filter => "filter",
                    crate::model::ruleset::Kind::Route => "route",
                };
                (
                    hook as u32,
                    b.priority,
                    kind.to_owned(),
                    libc::NF_ACCEPT as u32,
                )
            }),
            rules: Vec::new(),
        })
        .collect();
    let newrule = ((libc::NFNL_SUBSYS_NFTABLES << 8) | libc::NFT_MSG_NEWRULE) as u16;
    for page in &batch {
        for nlh in ffi::messages(page) {
            if nlh.nlmsg_type != newrule {
                continue;
            }
            if let Some(r) = ffi::parse_rule(nlh)
                && let Some(c) = chains.iter_mut().find(|c| c.name == r.chain)
            {
                c.rules.push(r.exprs);
            }
        }
    }
    LiveTable {
        owner_comments: rs.owner.to_comments(),
        comment: None,
        state: None,
        chains,
    }
}

/// Human-readable differences between what should be and what is; empty when equal.
pub fn diff(expected: &LiveTable, live: Option<&LiveTable>) -> Vec<String> {
    let Some(live) = live else {
        return vec![format!("table inet {TABLE} is missing")];
    };
    let mut out = Vec::new();
    // Ownership is compared (which pod the table belongs to), not the whole owner: the
    // fingerprint labels what was applied and the rules below are compared one by one, so a
    // table written by an earlier release (another fingerprint form, its owner in a table
    // comment) with the same rules is not drift; the attachments are bookkeeping, not capture.
    // Earlier releases kept only the first 12 characters of the container id.
    match (expected.owner(), live.owner()) {
        (Some(want), Some(have))
            if want.container() == have.container() && want.pod_uid == have.pod_uid => {}
        (_, Some(have)) => out.push(format!(
            "the table belongs to another pod (container {}, pod uid {})",
            have.container(),
            have.pod_uid
        )),
        // No metadata at all: a table an earlier release wrote on a kernel that keeps no table
        // comment (before 5.13). `inet sluice` is sluice's name; its rules decide.
        (_, None) if live.owner_comments.is_empty() && live.comment.is_none() => {}
        (_, None) => out.push(format!(
            "the table's metadata is not sluice's: owner chain {:?}, comment {:?}",
            live.owner_comments, live.comment
        )),
    }
    for want in &expected.chains {
        match live.chains.iter().find(|c| c.name == want.name) {
            None => out.push(format!("chain {} is missing", want.name)),
            Some(have) => {
                if have.base != want.base {
                    out.push(format!(
                        "chain {} has a different hook/priority/type/policy",
                        want.name
                    ));
                }
                if have.rules.len() != want.rules.len() {
                    out.push(format!(
                        "chain {} has {} rules, expected {}",
                        want.name,
                        have.rules.len(),
                        want.rules.len()
                    ));
                }
                // Report the first difference only: after an insert or delete every later rule
                // shifts, and listing all of them hides the one that matters.
                if let Some(i) = have.rules.iter().zip(&want.rules).position(|(h, w)| h != w) {
                    out.push(format!(
                        "chain {} rule {} differs from the plan",
                        want.name,
                        i + 1
                    ));
                }
            }
        }
    }
    for have in &live.chains {
        if !expected.chains.iter().any(|c| c.name == have.name) {
            out.push(format!("unexpected chain {}", have.name));
        }
    }
    out
}
