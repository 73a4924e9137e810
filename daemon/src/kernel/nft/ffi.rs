//! The libnftnl calls that the `nftnl` crate does not wrap. This is the only module of sluice
//! with `unsafe` code; every block says why it is sound.
//!
//! Written by hand because nothing maintained does it: nftnl 0.9 has no `redir` or `tproxy` expression and
//! no table userdata, and its only read-back helper returns table names. What we need is small:
//! two expressions, one message type, and three parsers that turn netlink messages (from the
//! kernel's dumps, or from our own batch) into plain Rust values.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_char, c_void};
use std::ptr::NonNull;

use nftnl::nftnl_sys::{self as sys, libc};
use nftnl::{MsgType, ProtoFamily, Rule, expr::Expression};

/// `NF_NAT_RANGE_PROTO_SPECIFIED`: the redirect carries a port (what `nft` sets for `to :PORT`).
const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 0x2;
/// `NF_NAT_RANGE_MAP_IPS`: a NAT to an address (the kernel sets it for any address register).
const NF_NAT_RANGE_MAP_IPS: u32 = 0x1;

/// Aborts like nftnl does on allocation failure: a tiny malloc failing leaves nothing sane to do.
fn alloc<T>(ptr: *mut T) -> NonNull<T> {
    NonNull::new(ptr).unwrap_or_else(|| std::process::abort())
}

/// `redirect to :PORT`, reading the port (network byte order) from register 1, which the
/// caller fills with an `Immediate` first.
#[derive(Debug, Clone, Copy)]
pub(super) struct Redir;

impl Expression for Redir {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        // Safety: the name is a NUL-terminated literal; the returned pointer is checked for
        // NULL and ownership passes to the rule (nftnl_rule_add_expr), as the trait requires.
        let expr = alloc(unsafe { sys::nftnl_expr_alloc(c"redir".as_ptr()) });
        let reg = libc::NFT_REG_1 as u32;
        // Safety: `expr` is a live redir expression; these attributes are u32 for redir.
        unsafe {
            sys::nftnl_expr_set_u32(
                expr.as_ptr(),
                sys::NFTNL_EXPR_REDIR_REG_PROTO_MIN as u16,
                reg,
            );
            sys::nftnl_expr_set_u32(
                expr.as_ptr(),
                sys::NFTNL_EXPR_REDIR_REG_PROTO_MAX as u16,
                reg,
            );
            sys::nftnl_expr_set_u32(
                expr.as_ptr(),
                sys::NFTNL_EXPR_REDIR_FLAGS as u16,
                NF_NAT_RANGE_PROTO_SPECIFIED,
            );
        }
        expr
    }
}

/// `dnat ip|ip6 to ADDR[:PORT]`, reading the address from register 1 and the port (network
/// byte order) from register 2, which the caller fills with `Immediate`s first. nftnl 0.9's
/// `Nat` sets neither the max registers nor the flags, which the kernel fills in and dumps
/// back (addr_max = addr_min, proto_max = proto_min, flags MAP_IPS | PROTO_SPECIFIED): a rule
/// it built would never read back equal to the batch, and `Check` would report drift.
#[derive(Debug, Clone, Copy)]
pub(super) struct Dnat {
    /// `NFPROTO_IPV4` or `NFPROTO_IPV6`: the address's family.
    pub family: u32,
    /// Whether register 2 holds a port.
    pub port: bool,
}

impl Expression for Dnat {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        // Safety: as for `Redir`: NUL-terminated literal, NULL checked, ownership to the rule.
        let expr = alloc(unsafe { sys::nftnl_expr_alloc(c"nat".as_ptr()) });
        let (addr, port) = (libc::NFT_REG_1 as u32, libc::NFT_REG_2 as u32);
        let mut flags = NF_NAT_RANGE_MAP_IPS;
        let set = |attr: u32, value: u32| {
            // Safety: `expr` is a live nat expression; every attribute set here is a u32.
            unsafe { sys::nftnl_expr_set_u32(expr.as_ptr(), attr as u16, value) }
        };
        set(sys::NFTNL_EXPR_NAT_TYPE, libc::NFT_NAT_DNAT as u32);
        set(sys::NFTNL_EXPR_NAT_FAMILY, self.family);
        set(sys::NFTNL_EXPR_NAT_REG_ADDR_MIN, addr);
        set(sys::NFTNL_EXPR_NAT_REG_ADDR_MAX, addr);
        if self.port {
            set(sys::NFTNL_EXPR_NAT_REG_PROTO_MIN, port);
            set(sys::NFTNL_EXPR_NAT_REG_PROTO_MAX, port);
            flags |= NF_NAT_RANGE_PROTO_SPECIFIED;
        }
        set(sys::NFTNL_EXPR_NAT_FLAGS, flags);
        expr
    }
}

/// `tproxy ip|ip6 to :PORT`, reading the port (network byte order) from register 1, which the
/// caller fills with an `Immediate` first. nftnl 0.9 has no tproxy expression either.
#[derive(Debug, Clone, Copy)]
pub(super) struct Tproxy {
    /// `NFPROTO_IPV4` or `NFPROTO_IPV6`: the family of the rule's address match.
    pub family: u32,
}

impl Expression for Tproxy {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        // Safety: as for `Redir`: NUL-terminated literal, NULL checked, ownership to the rule.
        let expr = alloc(unsafe { sys::nftnl_expr_alloc(c"tproxy".as_ptr()) });
        // Safety: `expr` is a live tproxy expression; family and port register are u32
        // attributes. No address register: the listener is looked up on the packet's own
        // destination address, as iptables' TPROXY without --on-ip does.
        unsafe {
            sys::nftnl_expr_set_u32(
                expr.as_ptr(),
                sys::NFTNL_EXPR_TPROXY_FAMILY as u16,
                self.family,
            );
            sys::nftnl_expr_set_u32(
                expr.as_ptr(),
                sys::NFTNL_EXPR_TPROXY_REG_PORT as u16,
                libc::NFT_REG_1 as u32,
            );
        }
        expr
    }
}

/// A table message that can be exclusive (create-only), which `nftnl::Table` cannot be.
#[derive(Debug)]
pub(super) struct TableMsg {
    pub name: CString,
    pub family: ProtoFamily,
    /// Add with NLM_F_EXCL: fail with EEXIST instead of reusing an existing table.
    pub exclusive: bool,
}

// Safety: `write` builds exactly one table message, far below nft_nlmsg_maxsize(), the space
// the batch guarantees at `buf`.
unsafe impl nftnl::NlMsg for TableMsg {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, msg_type: MsgType) {
        let table = alloc(unsafe { sys::nftnl_table_alloc() });
        let raw_type = match msg_type {
            MsgType::Add => libc::NFT_MSG_NEWTABLE,
            MsgType::Del => libc::NFT_MSG_DELTABLE,
        };
        let mut flags = libc::NLM_F_ACK;
        if self.exclusive && matches!(msg_type, MsgType::Add) {
            flags |= libc::NLM_F_CREATE | libc::NLM_F_EXCL;
        }
        // Safety: `table` is live until freed below; strings are NUL-terminated and copied by
        // libnftnl; `buf` has room for one message (trait contract).
        unsafe {
            let t = table.as_ptr();
            sys::nftnl_table_set_u32(t, sys::NFTNL_TABLE_FAMILY as u16, self.family as u32);
            sys::nftnl_table_set_str(t, sys::NFTNL_TABLE_NAME as u16, self.name.as_ptr());
            let header = sys::nftnl_nlmsg_build_hdr(
                buf.cast::<c_char>(),
                raw_type as u16,
                self.family as u16,
                flags as u16,
                seq,
            );
            sys::nftnl_table_nlmsg_build_payload(header, t);
            sys::nftnl_table_free(t);
        }
    }
}

/// The userdata TLV type of the state releases before `sluice/v2` kept beside their table
/// comment (full container id, attach time): read back from their tables, never written.
pub(super) const UDATA_SLUICE_STATE: u8 = 0xa1;

/// The value of TLV `kind` inside table or rule userdata, if any: libnftnl's layout (a type
/// byte, a length byte counting the NUL, the string, NUL), which `nft` writes and reads.
pub(super) fn udata_field(mut udata: &[u8], kind: u8) -> Option<String> {
    while udata.len() >= 2 {
        let (k, len) = (udata[0], udata[1] as usize);
        let value = udata.get(2..2 + len)?;
        if k == kind {
            let value = value.strip_suffix(&[0]).unwrap_or(value);
            return Some(String::from_utf8_lossy(value).into_owned());
        }
        udata = &udata[2 + len..];
    }
    None
}

/// The comment inside table userdata, if any.
pub(super) fn udata_comment(udata: &[u8]) -> Option<String> {
    udata_field(udata, sys::NFTNL_UDATA_TABLE_COMMENT as u8)
}

/// A table as read from a netlink message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct TableInfo {
    pub family: u32,
    pub name: String,
    pub userdata: Vec<u8>,
}

/// A chain as read from a netlink message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct ChainInfo {
    pub family: u32,
    pub table: String,
    pub name: String,
    /// (hook number, priority, type, policy) for base chains.
    pub base: Option<(u32, i32, String, u32)>,
}

/// A rule as read from a netlink message, with its expressions in libnftnl's text form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RuleInfo {
    pub family: u32,
    pub table: String,
    pub chain: String,
    pub exprs: String,
    /// The rule's comment (userdata TLV `NFTNL_UDATA_RULE_COMMENT`), if any.
    pub comment: Option<String>,
}

/// Reads a NUL-terminated string attribute; `get` returns NULL when unset.
fn string(ptr: *const c_char) -> String {
    if ptr.is_null() {
        return String::new();
    }
    // Safety: non-NULL pointers from nftnl_*_get_str point at a NUL-terminated string owned
    // by the object, which is alive for the duration of this call.
    unsafe { CStr::from_ptr(ptr) }
        .to_string_lossy()
        .into_owned()
}

pub(super) fn parse_table(nlh: &libc::nlmsghdr) -> Option<TableInfo> {
    let t = alloc(unsafe { sys::nftnl_table_alloc() });
    // Safety: `nlh` is a complete message (validated by mnl or by our batch walker); `t` is
    // live until freed at the end; returned data pointers are copied before the free.
    unsafe {
        let t = t.as_ptr();
        let info = (sys::nftnl_table_nlmsg_parse(nlh, t) >= 0).then(|| {
            let mut len = 0u32;
            let data = sys::nftnl_table_get_data(t, sys::NFTNL_TABLE_USERDATA as u16, &mut len);
            let userdata = if data.is_null() {
                Vec::new()
            } else {
                std::slice::from_raw_parts(data.cast::<u8>(), len as usize).to_vec()
            };
            TableInfo {
                family: sys::nftnl_table_get_u32(t, sys::NFTNL_TABLE_FAMILY as u16),
                name: string(sys::nftnl_table_get_str(t, sys::NFTNL_TABLE_NAME as u16)),
                userdata,
            }
        });
        sys::nftnl_table_free(t);
        info
    }
}

pub(super) fn parse_chain(nlh: &libc::nlmsghdr) -> Option<ChainInfo> {
    let c = alloc(unsafe { sys::nftnl_chain_alloc() });
    // Safety: as in parse_table.
    unsafe {
        let c = c.as_ptr();
        let info = (sys::nftnl_chain_nlmsg_parse(nlh, c) >= 0).then(|| {
            let base = sys::nftnl_chain_is_set(c, sys::NFTNL_CHAIN_HOOKNUM as u16).then(|| {
                (
                    sys::nftnl_chain_get_u32(c, sys::NFTNL_CHAIN_HOOKNUM as u16),
                    sys::nftnl_chain_get_s32(c, sys::NFTNL_CHAIN_PRIO as u16),
                    string(sys::nftnl_chain_get_str(c, sys::NFTNL_CHAIN_TYPE as u16)),
                    sys::nftnl_chain_get_u32(c, sys::NFTNL_CHAIN_POLICY as u16),
                )
            });
            ChainInfo {
                family: sys::nftnl_chain_get_u32(c, sys::NFTNL_CHAIN_FAMILY as u16),
                table: string(sys::nftnl_chain_get_str(c, sys::NFTNL_CHAIN_TABLE as u16)),
                name: string(sys::nftnl_chain_get_str(c, sys::NFTNL_CHAIN_NAME as u16)),
                base,
            }
        });
        sys::nftnl_chain_free(c);
        info
    }
}

pub(super) fn parse_rule(nlh: &libc::nlmsghdr) -> Option<RuleInfo> {
    let r = alloc(unsafe { sys::nftnl_rule_alloc() });
    let mut buf = vec![0u8; 16 * 1024];
    // Safety: as in parse_table; snprintf writes at most `buf.len()` bytes including the NUL.
    unsafe {
        let r = r.as_ptr();
        let info = (sys::nftnl_rule_nlmsg_parse(nlh, r) >= 0).then(|| {
            sys::nftnl_rule_snprintf(
                buf.as_mut_ptr().cast(),
                buf.len(),
                r,
                sys::NFTNL_OUTPUT_DEFAULT,
                0,
            );
            let text = string(buf.as_ptr().cast());
            // The first line names family/table/chain/handle/position; keep the expressions.
            let exprs = text
                .split_once('\n')
                .map_or("", |(_, e)| e)
                .trim_end()
                .to_owned();
            let mut len = 0u32;
            let data = sys::nftnl_rule_get_data(r, sys::NFTNL_RULE_USERDATA as u16, &mut len);
            let comment = (!data.is_null())
                .then(|| std::slice::from_raw_parts(data.cast::<u8>(), len as usize))
                .and_then(|udata| udata_field(udata, sys::NFTNL_UDATA_RULE_COMMENT as u8));
            RuleInfo {
                family: sys::nftnl_rule_get_u32(r, sys::NFTNL_RULE_FAMILY as u16),
                table: string(sys::nftnl_rule_get_str(r, sys::NFTNL_RULE_TABLE as u16)),
                chain: string(sys::nftnl_rule_get_str(r, sys::NFTNL_RULE_CHAIN as u16)),
                exprs,
                comment,
            }
        });
        sys::nftnl_rule_free(r);
        info
    }
}

/// Views each complete netlink message in `buf` (our own batch pages or a kernel reply) as a
/// header reference. Stops at the first truncated message.
pub(super) fn messages(buf: &[u8]) -> Vec<&libc::nlmsghdr> {
    super::wire::headers(buf)
        .into_iter()
        .map_while(|(off, ..)| {
            let ptr = buf[off..].as_ptr().cast::<libc::nlmsghdr>();
            // Safety: `headers` yields only complete messages (a header's worth of bytes at
            // least, within `buf`); the pointer is checked aligned, and the reference borrows
            // `buf`, so it cannot outlive the bytes it points at.
            ptr.is_aligned().then(|| unsafe { &*ptr })
        })
        .collect()
}

/// Sets an integer socket option on a netlink socket.
pub(super) fn set_int_option(
    socket: &mnl::Socket,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // Safety: the fd is the socket's own, alive while `socket` is borrowed; `value` is a live
    // c_int and the length passed is its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&raw const value).cast::<c_void>(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Reads an integer socket option of a netlink socket.
pub(super) fn int_option(
    socket: &mnl::Socket,
    level: libc::c_int,
    name: libc::c_int,
) -> std::io::Result<libc::c_int> {
    use std::os::fd::AsRawFd;
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // Safety: `value` and `len` are live locals; the kernel writes at most `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&raw mut value).cast::<c_void>(),
            &raw mut len,
        )
    };
    if rc == 0 {
        Ok(value)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Bounds every receive on `socket` (SO_RCVTIMEO): a receive that would wait longer fails with
/// EAGAIN instead of blocking the netns worker thread forever.
pub(super) fn set_receive_timeout(
    socket: &mnl::Socket,
    timeout: std::time::Duration,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros() as i32),
    };
    // Safety: as in set_int_option, with a live timeval.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast::<c_void>(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
