//! Talking to nf_tables: a socket of the calling thread's namespace, one batch sent as one
//! datagram with the kernel's verdict awaited (bounded), and dumps.

use std::io;
use std::time::{Duration, Instant};

use nftnl::FinalizedBatch;
use nftnl::nftnl_sys::libc;

use super::wire::{dump_request, errors, headers, prepare};
use super::{NftError, batch, ffi};
use crate::model::ruleset::{Ruleset, TABLE};

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
pub(super) fn send(batch: &FinalizedBatch) -> Result<(), NftError> {
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

/// Runs one nf_tables dump request for the `inet` family and feeds every reply message to
/// `each`.
pub(super) fn dump(msg: u16, mut each: impl FnMut(&libc::nlmsghdr)) -> Result<(), NftError> {
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
        return clipped(text, MAX);
    }
    format!("message {seq} (not in the batch)")
}

fn clipped(mut s: String, max: usize) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_descriptions_are_clipped() {
        let s = clipped("é".repeat(300), 201);
        assert!(s.len() <= 204, "{}", s.len());
        assert!(s.ends_with('…'));
        assert_eq!(clipped("short".into(), 200), "short");
    }
}
