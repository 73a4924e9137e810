//! Render and apply: the one module that talks nf_tables. It links libnftnl (GPL-2.0-or-later)
//! through the `nftnl` crate; nothing else in sluice touches nftnl, so the GPL-linked surface
//! is exactly this directory.
//!
//! Every function here acts on the network namespace of the calling thread: callers run them
//! through `crate::netns` on a thread that has entered the pod's namespace. Sockets are opened
//! per call, after that entry, so they belong to the pod's namespace.

mod batch;
mod ffi;

use std::io;

use nftnl::FinalizedBatch;
use nftnl::nftnl_sys::libc;

use crate::ruleset::{Owner, Ruleset, TABLE};

#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("opening a netfilter netlink socket: {0}")]
    Socket(#[source] io::Error),
    #[error("the kernel rejected the nftables batch: {0}")]
    Batch(#[source] io::Error),
    #[error("reading nftables state back from the kernel: {0}")]
    Dump(#[source] io::Error),
}

/// What the kernel holds in our table, in comparable form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveTable {
    /// The table's comment (owner metadata), if any.
    pub comment: Option<String>,
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
    pub fn owner(&self) -> Option<Owner> {
        self.comment.as_deref().and_then(Owner::from_comment)
    }
}

/// Installs `rs` as `inet sluice` in the current netns, atomically. A fresh pod takes one
/// create-only batch; if the table already exists (re-ADD) that batch is refused whole and an
/// atomic replace follows, so re-apply stays idempotent. `Ok(true)` when a table was replaced.
pub fn apply(rs: &Ruleset) -> Result<bool, NftError> {
    match send(&batch::install(rs, batch::Mode::Create)) {
        Err(NftError::Batch(e)) if e.raw_os_error() == Some(libc::EEXIST) => {
            send(&batch::install(rs, batch::Mode::Replace)).map(|()| true)
        }
        other => other.map(|()| false),
    }
}

/// Deletes `inet sluice` from the current netns. `Ok(false)` when there was none.
pub fn remove() -> Result<bool, NftError> {
    match send(&batch::delete()) {
        Ok(()) => Ok(true),
        Err(NftError::Batch(e)) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
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
            table = Some(ffi::udata_comment(&t.userdata));
        }
    })?;
    let Some(comment) = table else {
        return Ok(None);
    };
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
            && let Some(c) = chains.iter_mut().find(|c| c.name == r.chain)
        {
            c.rules.push(r.exprs);
        }
    })?;
    Ok(Some(LiveTable { comment, chains }))
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
                    crate::ruleset::Hook::Prerouting => libc::NF_INET_PRE_ROUTING,
                    crate::ruleset::Hook::Output => libc::NF_INET_LOCAL_OUT,
                };
                (
                    hook as u32,
                    b.priority,
                    "nat".to_owned(),
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
        comment: Some(rs.owner.to_comment()),
        chains,
    }
}

/// Human-readable differences between what should be and what is; empty when equal.
pub fn diff(expected: &LiveTable, live: Option<&LiveTable>) -> Vec<String> {
    let Some(live) = live else {
        return vec![format!("table inet {TABLE} is missing")];
    };
    let mut out = Vec::new();
    if expected.comment != live.comment {
        out.push(format!(
            "table metadata differs: expected {:?}, found {:?}",
            expected.comment, live.comment
        ));
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

fn socket() -> Result<mnl::Socket, NftError> {
    mnl::Socket::new(mnl::Bus::Netfilter).map_err(NftError::Socket)
}

fn recv_buffer() -> Vec<u8> {
    // malloc'd buffers of this size are 16-byte aligned, as mnl requires for nlmsghdr.
    vec![0u8; nftnl::nft_nlmsg_maxsize() as usize]
}

/// Sends a batch as one datagram and waits for the kernel's verdict on the whole
/// transaction. Only the batch-end message asks for an ACK: the kernel reports an error for
/// any failing message regardless (and then applies nothing), so per-message ACKs would only
/// cost one extra receive each.
fn send(batch: &FinalizedBatch) -> Result<(), NftError> {
    let mut buf: Vec<u8> = batch.iter().flatten().copied().collect();
    let last_seq = ack_only_last(&mut buf)
        .ok_or_else(|| NftError::Batch(io::Error::other("empty nftables batch")))?;
    let socket = socket()?;
    let sent = socket.send(&buf).map_err(NftError::Batch)?;
    if sent < buf.len() {
        return Err(NftError::Batch(io::Error::other(
            "short send of the nftables batch",
        )));
    }
    let mut buffer = recv_buffer();
    loop {
        let n = socket.recv_raw(&mut buffer[..]).map_err(NftError::Batch)?;
        for (seq, error) in errors(&buffer[..n]) {
            if error != 0 {
                return Err(NftError::Batch(io::Error::from_raw_os_error(-error)));
            }
            if seq == last_seq {
                return Ok(());
            }
        }
    }
}

const NLMSG_HDRLEN: usize = 16;

/// Clears NLM_F_ACK on every message but the last and returns the last one's sequence number.
fn ack_only_last(buf: &mut [u8]) -> Option<u32> {
    let mut offsets = Vec::new();
    let mut off = 0;
    while off + NLMSG_HDRLEN <= buf.len() {
        let len = u32::from_ne_bytes(buf[off..off + 4].try_into().ok()?) as usize;
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            break;
        }
        offsets.push(off);
        off += (len + 3) & !3;
    }
    let (&last, rest) = offsets.split_last()?;
    for &o in rest {
        let flags = u16::from_ne_bytes([buf[o + 6], buf[o + 7]]) & !(libc::NLM_F_ACK as u16);
        buf[o + 6..o + 8].copy_from_slice(&flags.to_ne_bytes());
    }
    Some(u32::from_ne_bytes(
        buf[last + 8..last + 12].try_into().ok()?,
    ))
}

/// (sequence number, error) of every NLMSG_ERROR message in a reply; error 0 is an ACK.
fn errors(buf: &[u8]) -> Vec<(u32, i32)> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + NLMSG_HDRLEN + 4 <= buf.len() {
        let word = |at: usize| [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
        let len = u32::from_ne_bytes(word(off)) as usize;
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            break;
        }
        let kind = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
        if kind == libc::NLMSG_ERROR as u16 {
            out.push((
                u32::from_ne_bytes(word(off + 8)),
                i32::from_ne_bytes(word(off + NLMSG_HDRLEN)),
            ));
        }
        off += (len + 3) & !3;
    }
    out
}

/// Runs one nf_tables dump request for the `inet` family and feeds every reply message to
/// `each`.
fn dump(msg: u16, mut each: impl FnMut(&libc::nlmsghdr)) -> Result<(), NftError> {
    let socket = socket()?;
    let seq = 1u32;
    socket
        .send(&dump_request(msg, seq))
        .map_err(NftError::Dump)?;
    let portid = socket.portid();
    let mut buffer = recv_buffer();
    let mut sink: &mut dyn FnMut(&libc::nlmsghdr) = &mut each;
    loop {
        let n = socket.recv_raw(&mut buffer[..]).map_err(NftError::Dump)?;
        let done =
            mnl::cb_run2(&buffer[..n], seq, portid, callback, &mut sink).map_err(NftError::Dump)?;
        if matches!(done, mnl::CbResult::Stop) {
            return Ok(());
        }
    }
}

fn callback(nlh: &libc::nlmsghdr, sink: &mut &mut dyn FnMut(&libc::nlmsghdr)) -> libc::c_int {
    sink(nlh);
    1 // MNL_CB_OK
}

/// `nlmsghdr` + `nfgenmsg` asking for a dump of one object type in family inet.
fn dump_request(msg: u16, seq: u32) -> Vec<u8> {
    let len = 16u32 + 4;
    let kind = ((libc::NFNL_SUBSYS_NFTABLES as u16) << 8) | msg;
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP | libc::NLM_F_ACK) as u16;
    let mut out = Vec::with_capacity(len as usize);
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes()); // portid: the kernel fills it in
    out.push(libc::NFPROTO_INET as u8); // nfgen_family
    out.push(0); // version: NFNETLINK_V0
    out.extend_from_slice(&0u16.to_be_bytes()); // res_id
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(seq: u32, kind: u16, flags: u16, payload: &[u8]) -> Vec<u8> {
        let len = (NLMSG_HDRLEN + payload.len()) as u32;
        let mut m = Vec::new();
        m.extend_from_slice(&len.to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(payload);
        while m.len() % 4 != 0 {
            m.push(0);
        }
        m
    }

    #[test]
    fn only_the_last_message_keeps_its_ack_flag() {
        let ack = libc::NLM_F_ACK as u16;
        let mut buf = [
            msg(7, 16, ack, &[1, 2, 3]),
            msg(8, 0xa00, ack | 1, &[]),
            msg(9, 17, ack, &[0; 4]),
        ]
        .concat();
        assert_eq!(ack_only_last(&mut buf), Some(9));
        let flags: Vec<u16> = [0, 20, 36]
            .iter()
            .map(|&o| u16::from_ne_bytes([buf[o + 6], buf[o + 7]]))
            .collect();
        assert_eq!(flags, vec![0, 1, ack]);
        assert_eq!(ack_only_last(&mut []), None);
    }

    #[test]
    fn errors_and_acks_are_read_with_their_sequence_numbers() {
        let err = |seq, e: i32| msg(seq, libc::NLMSG_ERROR as u16, 0, &e.to_ne_bytes());
        let buf = [err(4, -libc::EEXIST), msg(5, 16, 0, &[]), err(9, 0)].concat();
        assert_eq!(errors(&buf), vec![(4, -libc::EEXIST), (9, 0)]);
    }
}
