//! Render and apply: the one module that talks nf_tables. It links libnftnl (GPL-2.0-or-later)
//! through the `nftnl` crate; nothing else in sluice touches nftnl, so the GPL-linked surface
//! is exactly this directory.
//!
//! Every function here acts on the network namespace of the calling thread: callers run them
//! through `crate::kernel::netns` on a thread that has entered the pod's namespace. Sockets are opened
//! per call, after that entry, so they belong to the pod's namespace.

mod batch;
mod ffi;

use std::io;
use std::time::{Duration, Instant};

use nftnl::FinalizedBatch;
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

/// A netfilter netlink socket of the calling thread's namespace. Every receive on it is
/// bounded by [`crate::kernel::netns::step_timeout`]; error answers carry only the failing message's header
/// (NETLINK_CAP_ACK), so a batch with many failing rules cannot overflow the receive buffer
/// with echoed payloads.
fn socket() -> Result<mnl::Socket, NftError> {
    let socket = mnl::Socket::new(mnl::Bus::Netfilter).map_err(NftError::Socket)?;
    ffi::set_receive_timeout(&socket, crate::kernel::netns::step_timeout())
        .map_err(NftError::Socket)?;
    // Best effort: without it (kernels before 4.3) errors echo the whole message, which only
    // costs receive-buffer space.
    let _ = ffi::set_int_option(&socket, libc::SOL_NETLINK, NETLINK_CAP_ACK, 1);
    Ok(socket)
}

/// A buffer for dump answers, which the kernel packs into datagrams as large as the reader's
/// buffer allows.
fn recv_buffer() -> Vec<u8> {
    // malloc'd buffers of this size are 16-byte aligned, as mnl requires for nlmsghdr.
    vec![0u8; nftnl::nft_nlmsg_maxsize() as usize]
}

/// A buffer for a batch's answers: each ACK or error is a datagram of its own, a few dozen
/// bytes with NETLINK_CAP_ACK (libmnl's MNL_SOCKET_BUFFER_SIZE), so the 64 KiB a dump needs is
/// not allocated and zeroed on every attach.
fn ack_buffer() -> Vec<u8> {
    vec![0u8; 8192]
}

/// Bytes the kernel keeps out of `SO_SNDBUF` for its own accounting: netlink refuses a
/// datagram longer than `sk_sndbuf - 32`.
const SNDBUF_SLACK: usize = 32;

/// `NETLINK_CAP_ACK` (linux/netlink.h), which the libc crate does not export for Linux.
const NETLINK_CAP_ACK: libc::c_int = 10;

/// Makes the socket's send buffer large enough for one datagram of `len` bytes, as `nft` does:
/// `SO_SNDBUFFORCE` (CAP_NET_ADMIN, which the agent holds, may exceed `wmem_max`), falling
/// back to `SO_SNDBUF`. A large plan must never fail because its batch outgrew the default
/// buffer (~208 KiB).
fn size_send_buffer(socket: &mnl::Socket, len: usize) -> Result<(), NftError> {
    let fits = |have: libc::c_int| usize::try_from(have).unwrap_or(0) >= len + SNDBUF_SLACK;
    let current =
        ffi::int_option(socket, libc::SOL_SOCKET, libc::SO_SNDBUF).map_err(NftError::Socket)?;
    if fits(current) {
        return Ok(());
    }
    // The kernel doubles the value it is given; ask for the whole length anyway.
    let want = libc::c_int::try_from(len + SNDBUF_SLACK).unwrap_or(libc::c_int::MAX);
    if ffi::set_int_option(socket, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, want).is_err() {
        let _ = ffi::set_int_option(socket, libc::SOL_SOCKET, libc::SO_SNDBUF, want);
    }
    let now =
        ffi::int_option(socket, libc::SOL_SOCKET, libc::SO_SNDBUF).map_err(NftError::Socket)?;
    if fits(now) {
        Ok(())
    } else {
        Err(NftError::Send {
            bytes: len,
            source: io::Error::other(format!(
                "the socket send buffer cannot be raised past {now} bytes (net.core.wmem_max) and CAP_NET_ADMIN is missing"
            )),
        })
    }
}

/// Sends a batch as one datagram and waits for the kernel's verdict on the whole transaction.
///
/// Which message asks for the ACK matters, because kernels differ: before Linux 6.10 the
/// kernel ignores NLM_F_ACK on the batch-end message, so waiting for that ACK hangs forever
/// (and 6.10+ answers it only on a successful commit). Every kernel honours NLM_F_ACK on the
/// messages *inside* a batch, so the ACK is requested on the last of those and on nothing else.
/// That ACK proves the commit on every kernel, because nfnetlink queues per-message answers
/// and delivers them only after the transaction ends: if any message failed, its error is
/// delivered first (and the batch is aborted); if the commit itself failed, the kernel sends
/// that error (on the batch's first message) before delivering the queued answers; only a
/// committed batch yields our ACK with no error before it. [`prepare`] checks the batch ends
/// with a batch-end message, without which the kernel would abort and still deliver the ACK.
fn send(batch: &FinalizedBatch) -> Result<(), NftError> {
    let mut buf: Vec<u8> = batch.iter().flatten().copied().collect();
    let ack_seq = prepare(&mut buf).map_err(|why| NftError::Send {
        bytes: buf.len(),
        source: io::Error::new(io::ErrorKind::InvalidInput, why),
    })?;
    let socket = socket()?;
    size_send_buffer(&socket, buf.len())?;
    let send_error = |source| NftError::Send {
        bytes: buf.len(),
        source,
    };
    let sent = socket.send(&buf).map_err(send_error)?;
    if sent < buf.len() {
        return Err(send_error(io::Error::other("short send")));
    }
    let limit = crate::kernel::netns::step_timeout();
    if wait_for_ack(&socket, &buf, ack_seq, limit)? {
        Ok(())
    } else {
        Err(NftError::Timeout {
            step: "waiting for the kernel's verdict on the nftables batch",
            timeout: limit,
        })
    }
}

/// Reads the kernel's answers to `batch` until the ACK of `ack_seq` (`Ok(true)`), an error
/// for one of its messages (which names it), or no ACK within `limit` (`Ok(false)`): every
/// receive is bounded by the socket's timeout, and unrelated messages (none are expected on a
/// unicast socket) do not extend the wait.
fn wait_for_ack(
    socket: &mnl::Socket,
    batch: &[u8],
    ack_seq: u32,
    limit: Duration,
) -> Result<bool, NftError> {
    let deadline = Instant::now() + limit;
    let mut buffer = ack_buffer();
    while Instant::now() < deadline {
        let n = match socket.recv_raw(&mut buffer[..]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(NftError::Receive(e)),
        };
        for (seq, error) in errors(&buffer[..n]) {
            if error != 0 {
                return Err(NftError::Rejected {
                    message: describe(batch, seq),
                    source: io::Error::from_raw_os_error(-error),
                });
            }
            if seq == ack_seq {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// Whether the kernel acknowledges the batch-end message (Linux 6.10+), found by asking:
/// installs `rs` (an atomic replace) with the ACK asked of batch-end alone. The kernel answers
/// a batch inside `sendmsg`, so an ACK that is coming is queued by the time `send` returns; a
/// short wait tells. Only reported at start-up: [`send`] works without it.
pub fn batch_end_acked(rs: &Ruleset) -> Result<bool, NftError> {
    let batch = batch::install(rs, batch::Mode::Replace);
    let mut buf: Vec<u8> = batch.iter().flatten().copied().collect();
    let invalid = |why: &str| NftError::Send {
        bytes: 0,
        source: io::Error::new(io::ErrorKind::InvalidInput, why.to_owned()),
    };
    let inner_seq = prepare(&mut buf).map_err(invalid)?;
    let msgs = headers(&buf);
    let ack = libc::NLM_F_ACK as u16;
    let end_seq = inner_seq.wrapping_add(1);
    for (i, &(off, ..)) in msgs.iter().enumerate() {
        let mut flags = u16::from_ne_bytes([buf[off + 6], buf[off + 7]]) & !ack;
        if i == msgs.len() - 1 {
            flags |= ack;
            buf[off + 8..off + 12].copy_from_slice(&end_seq.to_ne_bytes());
        }
        buf[off + 6..off + 8].copy_from_slice(&flags.to_ne_bytes());
    }
    let socket = socket()?;
    let short = Duration::from_millis(200);
    ffi::set_receive_timeout(&socket, short).map_err(NftError::Socket)?;
    size_send_buffer(&socket, buf.len())?;
    socket.send(&buf).map_err(|source| NftError::Send {
        bytes: buf.len(),
        source,
    })?;
    wait_for_ack(&socket, &buf, end_seq, short)
}

const NLMSG_HDRLEN: usize = 16;

/// (offset, type, sequence number) of every complete message in a buffer.
fn headers(buf: &[u8]) -> Vec<(usize, u16, u32)> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + NLMSG_HDRLEN <= buf.len() {
        let word = |at: usize| [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
        let len = u32::from_ne_bytes(word(off)) as usize;
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            break;
        }
        let kind = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
        out.push((off, kind, u32::from_ne_bytes(word(off + 8))));
        off += (len + 3) & !3;
    }
    out
}

/// Checks that `buf` is one whole batch (batch-begin, at least one message, batch-end), sets
/// NLM_F_ACK on the last message inside it and clears it everywhere else (see [`send`]).
/// Returns that message's sequence number.
fn prepare(buf: &mut [u8]) -> Result<u32, &'static str> {
    let msgs = headers(buf);
    let begin = libc::NFNL_MSG_BATCH_BEGIN as u16;
    let end = libc::NFNL_MSG_BATCH_END as u16;
    let [(_, first, _), inner @ .., (_, last, _)] = msgs.as_slice() else {
        return Err("not a batch: fewer than two messages");
    };
    if *first != begin || *last != end {
        return Err("not a batch: it must start with batch-begin and end with batch-end");
    }
    let Some(&(_, _, ack_seq)) = inner.last() else {
        return Err("an empty batch");
    };
    if inner
        .iter()
        .any(|&(_, kind, _)| kind == begin || kind == end)
    {
        return Err("a batch nested in a batch");
    }
    let ack = libc::NLM_F_ACK as u16;
    let last_inner = inner.len(); // index in `msgs`
    for (i, &(off, ..)) in msgs.iter().enumerate() {
        let mut flags = u16::from_ne_bytes([buf[off + 6], buf[off + 7]]) & !ack;
        if i == last_inner {
            flags |= ack;
        }
        buf[off + 6..off + 8].copy_from_slice(&flags.to_ne_bytes());
    }
    Ok(ack_seq)
}

/// Names the batch message with sequence number `seq`, for an error: which table, chain or
/// rule the kernel refused. Bounded in length.
fn describe(batch: &[u8], seq: u32) -> String {
    const MAX: usize = 200;
    let subsys = (libc::NFNL_SUBSYS_NFTABLES as u16) << 8;
    let kind = |m: libc::c_int| subsys | m as u16;
    let mut rules_seen: Vec<(String, usize)> = Vec::new();
    for nlh in ffi::messages(batch) {
        let t = nlh.nlmsg_type;
        let rule = (t == kind(libc::NFT_MSG_NEWRULE))
            .then(|| ffi::parse_rule(nlh))
            .flatten()
            .map(|r| {
                let n = match rules_seen.iter_mut().find(|(c, _)| *c == r.chain) {
                    Some((_, n)) => {
                        *n += 1;
                        *n
                    }
                    None => {
                        rules_seen.push((r.chain.clone(), 1));
                        1
                    }
                };
                (r, n)
            });
        if nlh.nlmsg_seq != seq {
            continue;
        }
        let text = if t == libc::NFNL_MSG_BATCH_BEGIN as u16 {
            "the transaction as a whole (commit)".to_owned()
        } else if t == kind(libc::NFT_MSG_NEWTABLE) {
            format!("the creation of table inet {TABLE}")
        } else if t == kind(libc::NFT_MSG_DELTABLE) {
            format!("the deletion of table inet {TABLE}")
        } else if t == kind(libc::NFT_MSG_NEWCHAIN) {
            let name = ffi::parse_chain(nlh).map(|c| c.name).unwrap_or_default();
            format!("chain {name}")
        } else if let Some((r, n)) = rule {
            let exprs = r.exprs.split_whitespace().collect::<Vec<_>>().join(" ");
            format!("rule {n} of chain {} ({exprs})", r.chain)
        } else {
            format!("message {seq} (type {t:#x})")
        };
        return bounded(text, MAX);
    }
    format!("message {seq} (not in the batch)")
}

fn bounded(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// (sequence number, error) of every NLMSG_ERROR message in a reply; error 0 is an ACK.
fn errors(buf: &[u8]) -> Vec<(u32, i32)> {
    headers(buf)
        .into_iter()
        .filter(|&(off, kind, _)| {
            kind == libc::NLMSG_ERROR as u16 && off + NLMSG_HDRLEN + 4 <= buf.len()
        })
        .map(|(off, _, seq)| {
            let at = off + NLMSG_HDRLEN;
            (
                seq,
                i32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]),
            )
        })
        .collect()
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
        let n = match socket.recv_raw(&mut buffer[..]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Err(NftError::Timeout {
                    step: "reading nftables state back from the kernel",
                    timeout: crate::kernel::netns::step_timeout(),
                });
            }
            Err(e) => return Err(NftError::Dump(e)),
        };
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

    fn flags(buf: &[u8]) -> Vec<u16> {
        headers(buf)
            .iter()
            .map(|&(o, ..)| u16::from_ne_bytes([buf[o + 6], buf[o + 7]]))
            .collect()
    }

    const BEGIN: u16 = libc::NFNL_MSG_BATCH_BEGIN as u16;
    const END: u16 = libc::NFNL_MSG_BATCH_END as u16;
    const ACK: u16 = libc::NLM_F_ACK as u16;

    /// The regression behind Linux < 6.10 hanging: the ACK must be asked of the last message
    /// *inside* the batch, never of batch-end (which old kernels never acknowledge).
    #[test]
    fn the_ack_is_asked_of_the_last_message_inside_the_batch_only() {
        let mut buf = [
            msg(0, BEGIN, 1 | ACK, &[0; 4]),
            msg(1, 0xa00, ACK | 1, &[1, 2, 3]),
            msg(2, 0xa03, 1, &[0; 4]),
            msg(3, END, 1 | ACK, &[0; 4]),
        ]
        .concat();
        assert_eq!(prepare(&mut buf), Ok(2));
        assert_eq!(flags(&buf), vec![1, 1, 1 | ACK, 1]);
    }

    #[test]
    fn anything_but_one_whole_batch_is_refused_before_sending() {
        let m = |seq, kind| msg(seq, kind, 1, &[0; 4]);
        assert!(prepare(&mut []).is_err());
        assert!(prepare(&mut [m(0, BEGIN), m(1, END)].concat()).is_err());
        // No batch-end: the kernel would abort the transaction yet deliver our ACK.
        assert!(prepare(&mut [m(0, BEGIN), m(1, 0xa00), m(2, 0xa03)].concat()).is_err());
        assert!(prepare(&mut [m(1, 0xa00), m(2, END)].concat()).is_err());
        assert!(prepare(&mut [m(0, BEGIN), m(1, BEGIN), m(2, 0xa00), m(3, END)].concat()).is_err());
    }

    #[test]
    fn long_descriptions_are_bounded() {
        let s = bounded("é".repeat(300), 201);
        assert!(s.len() <= 204, "{}", s.len());
        assert!(s.ends_with('…'));
        assert_eq!(bounded("short".into(), 200), "short");
    }

    #[test]
    fn errors_and_acks_are_read_with_their_sequence_numbers() {
        let err = |seq, e: i32| msg(seq, libc::NLMSG_ERROR as u16, 0, &e.to_ne_bytes());
        let buf = [err(4, -libc::EEXIST), msg(5, 16, 0, &[]), err(9, 0)].concat();
        assert_eq!(errors(&buf), vec![(4, -libc::EEXIST), (9, 0)]);
    }
}
