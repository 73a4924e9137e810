//! Netlink framing of nf_tables batches and replies, as pure functions over bytes: one walker
//! over a buffer's messages ([`headers`]), which everything else in `nft` goes through
//! (`ffi::messages` too).

use nftnl::nftnl_sys::libc;

const NLMSG_HDRLEN: usize = 16;

/// (offset, type, sequence number) of every complete message in a buffer.
pub(super) fn headers(buf: &[u8]) -> Vec<(usize, u16, u32)> {
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
pub(super) fn prepare(buf: &mut [u8]) -> Result<u32, &'static str> {
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

/// (sequence number, error) of every NLMSG_ERROR message in a reply; error 0 is an ACK.
pub(super) fn errors(buf: &[u8]) -> Vec<(u32, i32)> {
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

/// `nlmsghdr` + `nfgenmsg` asking for a dump of one object type in family inet.
pub(super) fn dump_request(msg: u16, seq: u32) -> Vec<u8> {
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
    fn errors_and_acks_are_read_with_their_sequence_numbers() {
        let err = |seq, e: i32| msg(seq, libc::NLMSG_ERROR as u16, 0, &e.to_ne_bytes());
        let buf = [err(4, -libc::EEXIST), msg(5, 16, 0, &[]), err(9, 0)].concat();
        assert_eq!(errors(&buf), vec![(4, -libc::EEXIST), (9, 0)]);
    }
}
