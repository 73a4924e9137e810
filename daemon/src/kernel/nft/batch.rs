//! [`Ruleset`] → one nftables netlink batch (nftnl). Each batch is one transaction: the kernel
//! either commits the whole table with all chains and rules or keeps exactly what was there.

use std::ffi::CString;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use nftnl::expr::{Bitwise, Cmp, CmpOp, Conntrack, Immediate, Meta, Payload, Register, States};
use nftnl::expr::{Ipv4HeaderField, Ipv6HeaderField, NetworkHeaderField};
use nftnl::expr::{TcpHeaderField, TransportHeaderField, UdpHeaderField, Verdict as NftVerdict};
use nftnl::{Batch, ChainType, FinalizedBatch, MsgType, ProtoFamily};

use super::ffi::{Dnat, Redir, TableMsg, Tproxy};
use crate::model::ruleset::{
    self, Family, Hook, Kind, L4, Match, OWNER_CHAIN, Op, Owner, Ruleset, TABLE, Verdict,
};

fn cstring(s: &str) -> CString {
    CString::new(s).unwrap_or_else(|_| unreachable!("chain and table names are NUL-free literals"))
}

/// The table message. No userdata: the owner lives in the `owner` chain (see
/// `ruleset::Owner`), which every kernel keeps, where table comments need Linux 5.13.
fn table_msg(exclusive: bool) -> TableMsg {
    TableMsg {
        name: cstring(TABLE),
        family: ProtoFamily::Inet,
        exclusive,
    }
}

/// The `owner` chain's rules: `return`, carrying one comment each.
fn add_owner(batch: &mut Batch, chain: &nftnl::Chain<'_>, owner: &Owner) {
    for comment in owner.to_comments() {
        let mut r = nftnl::Rule::new(chain);
        r.add_expr(&nftnl::expr::Verdict::Return);
        // Owner comments are bounded (MAX_COMMENT) and NUL-free by construction.
        if let Ok(c) = CString::new(comment)
            && r.set_comment(c).is_ok()
        {
            batch.add(&r, MsgType::Add);
        }
    }
}

/// How the batch treats a table that may already exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// Create the table; the kernel answers EEXIST (and applies nothing) if it exists. This
    /// is the fresh-pod path: no object is deleted, so the commit needs no RCU grace period.
    Create,
    /// Add, delete and re-add the table in one transaction: an atomic replace whether or not
    /// it exists (the deleted objects are freed after an RCU grace period, ~10 ms here).
    Replace,
}

/// The batch that installs a ruleset.
pub(super) fn install(rs: &Ruleset, mode: Mode) -> FinalizedBatch {
    let mut batch = Batch::new();
    if mode == Mode::Replace {
        batch.add(&table_msg(false), MsgType::Add);
        batch.add(&table_msg(false), MsgType::Del);
    }
    batch.add(&table_msg(mode == Mode::Create), MsgType::Add);

    let table = nftnl::Table::new(cstring(TABLE), ProtoFamily::Inet);
    let owner_chain = nftnl::Chain::new(cstring(OWNER_CHAIN), &table);
    batch.add(&owner_chain, MsgType::Add);
    add_owner(&mut batch, &owner_chain, &rs.owner);
    let chains: Vec<nftnl::Chain<'_>> = rs
        .chains
        .iter()
        .map(|c| {
            let mut chain = nftnl::Chain::new(cstring(c.name), &table);
            if let Some(base) = c.base {
                let hook = match base.hook {
                    Hook::Prerouting => nftnl::Hook::PreRouting,
                    Hook::Output => nftnl::Hook::Out,
                };
                chain.set_hook(hook, base.priority);
                chain.set_type(match base.kind {
                    Kind::Nat => ChainType::Nat,
                    Kind::Filter => ChainType::Filter,
                    Kind::Route => ChainType::Route,
                });
                chain.set_policy(nftnl::Policy::Accept);
            }
            chain
        })
        .collect();
    for chain in &chains {
        batch.add(chain, MsgType::Add);
    }
    for (spec, chain) in rs.chains.iter().zip(&chains) {
        for r in &spec.rules {
            batch.add(&rule(chain, r), MsgType::Add);
        }
    }
    batch.finalize()
}

/// Deletes the table; the kernel answers ENOENT when there is none.
pub(super) fn delete() -> FinalizedBatch {
    let mut batch = Batch::new();
    batch.add(&table_msg(false), MsgType::Del);
    batch.finalize()
}

/// Rewrites the table's owner alone, in one transaction, leaving every capture chain as it is:
/// the `owner` chain is created if missing (tables of earlier releases), flushed, and filled.
/// The kernel answers ENOENT when there is no table.
pub(super) fn set_owner(owner: &Owner) -> FinalizedBatch {
    let mut batch = Batch::new();
    let table = nftnl::Table::new(cstring(TABLE), ProtoFamily::Inet);
    let chain = nftnl::Chain::new(cstring(OWNER_CHAIN), &table);
    batch.add(&chain, MsgType::Add);
    // A rule deletion naming the chain and no handle flushes the chain.
    batch.add(&nftnl::Rule::new(&chain), MsgType::Del);
    add_owner(&mut batch, &chain, owner);
    batch.finalize()
}

fn cmp_op(op: Op) -> CmpOp {
    match op {
        Op::Eq => CmpOp::Eq,
        Op::Ne => CmpOp::Neq,
    }
}

/// Tracks the protocol dependencies already matched in a rule, so an address or port match
/// emits `meta nfproto` / `meta l4proto` once and only where needed (as nft does).
#[derive(Default)]
struct Deps {
    family: Option<Family>,
    l4: Option<L4>,
}

fn nfproto(f: Family) -> u8 {
    match f {
        Family::V4 => libc::NFPROTO_IPV4 as u8,
        Family::V6 => libc::NFPROTO_IPV6 as u8,
    }
}

impl Deps {
    fn need_family(&mut self, r: &mut nftnl::Rule<'_>, f: Family) {
        if self.family != Some(f) {
            r.add_expr(&Meta::NfProto);
            r.add_expr(&Cmp::new(CmpOp::Eq, nfproto(f)));
            self.family = Some(f);
        }
    }
    fn need_l4(&mut self, r: &mut nftnl::Rule<'_>, l4: L4) {
        if self.l4 != Some(l4) {
            r.add_expr(&Meta::L4Proto);
            r.add_expr(&Cmp::new(CmpOp::Eq, l4.number()));
            self.l4 = Some(l4);
        }
    }
}

fn rule<'a>(chain: &'a nftnl::Chain<'a>, spec: &ruleset::Rule) -> nftnl::Rule<'a> {
    let mut r = nftnl::Rule::new(chain);
    let mut deps = Deps::default();
    for m in &spec.matches {
        match m {
            Match::NfProto(f) => deps.need_family(&mut r, *f),
            Match::L4Proto(l4) => deps.need_l4(&mut r, *l4),
            Match::IifName(op, name) => ifname(&mut r, Meta::IifName, *op, name),
            Match::OifName(op, name) => ifname(&mut r, Meta::OifName, *op, name),
            // Meta uid/gid are host byte order; the kernel compares the raw u32.
            Match::SkUid(op, id) => {
                r.add_expr(&Meta::SkUid);
                r.add_expr(&Cmp::new(cmp_op(*op), *id));
            }
            Match::SkGid(op, id) => {
                r.add_expr(&Meta::SkGid);
                r.add_expr(&Cmp::new(cmp_op(*op), *id));
            }
            Match::Daddr(op, net) => addr(&mut r, &mut deps, Dir::Daddr, *op, net),
            Match::Saddr(op, net) => addr(&mut r, &mut deps, Dir::Saddr, *op, net),
            // Marks are host byte order u32 in the kernel, like uid/gid.
            Match::Mark(op, mark) => {
                r.add_expr(&Meta::Mark { set: false });
                r.add_expr(&Cmp::new(cmp_op(*op), *mark));
            }
            Match::CtMark(op, mark) => {
                r.add_expr(&Conntrack::Mark { set: false });
                r.add_expr(&Cmp::new(cmp_op(*op), *mark));
            }
            // `ct state established,related`: any of the two state bits set.
            Match::CtEstablishedOrRelated => {
                r.add_expr(&Conntrack::State);
                let bits = (States::ESTABLISHED | States::RELATED).bits();
                r.add_expr(&Bitwise::new(bits, 0u32));
                r.add_expr(&Cmp::new(CmpOp::Neq, 0u32));
            }
            Match::DportRange(l4, lo, hi) => {
                deps.need_l4(&mut r, *l4);
                let field = match l4 {
                    L4::Tcp => TransportHeaderField::Tcp(TcpHeaderField::Dport),
                    L4::Udp => TransportHeaderField::Udp(UdpHeaderField::Dport),
                };
                // Network byte order compares as numbers: no byteorder step (as nft emits).
                r.add_expr(&Payload::Transport(field));
                r.add_expr(&Cmp::new(CmpOp::Gte, &lo.to_be_bytes()[..]));
                r.add_expr(&Payload::Transport(field));
                r.add_expr(&Cmp::new(CmpOp::Lte, &hi.to_be_bytes()[..]));
            }
            Match::Dport(l4, op, port) => {
                deps.need_l4(&mut r, *l4);
                let field = match l4 {
                    L4::Tcp => TransportHeaderField::Tcp(TcpHeaderField::Dport),
                    L4::Udp => TransportHeaderField::Udp(UdpHeaderField::Dport),
                };
                r.add_expr(&Payload::Transport(field));
                // Payload bytes are in network byte order.
                r.add_expr(&Cmp::new(cmp_op(*op), &port.to_be_bytes()[..]));
            }
        }
    }
    match &spec.verdict {
        Verdict::Return => r.add_expr(&NftVerdict::Return),
        Verdict::Jump(chain) => r.add_expr(&NftVerdict::Jump {
            chain: cstring(chain),
        }),
        Verdict::Redirect(port) => {
            r.add_expr(&Immediate::new(port.to_be_bytes(), Register::Reg1));
            r.add_expr(&Redir);
        }
        Verdict::SetMark(mark) => set_mark(&mut r, *mark),
        Verdict::MarkAccept(mark) => {
            set_mark(&mut r, *mark);
            r.add_expr(&NftVerdict::Accept);
        }
        Verdict::Tproxy { port, mark } => {
            let family = deps.family.unwrap_or_else(|| {
                unreachable!("TPROXY rules always match an address, which sets the family")
            });
            r.add_expr(&Immediate::new(port.to_be_bytes(), Register::Reg1));
            r.add_expr(&Tproxy {
                family: u32::from(nfproto(family)),
            });
            set_mark(&mut r, *mark);
            r.add_expr(&NftVerdict::Accept);
        }
        Verdict::SaveMark => {
            r.add_expr(&Meta::Mark { set: false });
            r.add_expr(&Conntrack::Mark { set: true });
        }
        Verdict::RestoreMark => {
            r.add_expr(&Conntrack::Mark { set: false });
            r.add_expr(&Meta::Mark { set: true });
        }
        Verdict::Drop => r.add_expr(&NftVerdict::Drop),
        Verdict::Dnat { addr, port } => {
            let family = match addr {
                IpAddr::V4(a) => {
                    r.add_expr(&Immediate::new(a.octets(), Register::Reg1));
                    Family::V4
                }
                IpAddr::V6(a) => {
                    r.add_expr(&Immediate::new(a.octets(), Register::Reg1));
                    Family::V6
                }
            };
            if let Some(port) = port {
                r.add_expr(&Immediate::new(port.to_be_bytes(), Register::Reg2));
            }
            r.add_expr(&Dnat {
                family: u32::from(nfproto(family)),
                port: port.is_some(),
            });
        }
    }
    r
}

/// `meta mark set MARK`: the mark goes through register 1.
fn set_mark(r: &mut nftnl::Rule<'_>, mark: u32) {
    r.add_expr(&Immediate::new(mark, Register::Reg1));
    r.add_expr(&Meta::Mark { set: true });
}

#[derive(Clone, Copy)]
enum Dir {
    Saddr,
    Daddr,
}

/// Interface names compare as the kernel's zero-padded IFNAMSIZ buffer.
fn ifname(r: &mut nftnl::Rule<'_>, key: Meta, op: Op, name: &str) {
    let mut buf = [0u8; libc::IFNAMSIZ];
    let n = name.len().min(libc::IFNAMSIZ - 1);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    r.add_expr(&key);
    r.add_expr(&Cmp::new(cmp_op(op), &buf[..]));
}

/// An address match: the family dependency, the header field, a mask for prefixes, and the
/// compare (addresses are network byte order, which is how `IpAddr` serializes).
fn addr(r: &mut nftnl::Rule<'_>, deps: &mut Deps, dir: Dir, op: Op, net: &IpNet) {
    deps.need_family(r, Family::of(net));
    match net {
        IpNet::V4(net) => {
            let field = match dir {
                Dir::Saddr => Ipv4HeaderField::Saddr,
                Dir::Daddr => Ipv4HeaderField::Daddr,
            };
            r.add_expr(&Payload::Network(NetworkHeaderField::Ipv4(field)));
            if net.prefix_len() < 32 {
                r.add_expr(&Bitwise::new(net.netmask(), Ipv4Addr::UNSPECIFIED));
            }
            r.add_expr(&Cmp::new(cmp_op(op), IpAddr::V4(net.network())));
        }
        IpNet::V6(net) => {
            let field = match dir {
                Dir::Saddr => Ipv6HeaderField::Saddr,
                Dir::Daddr => Ipv6HeaderField::Daddr,
            };
            r.add_expr(&Payload::Network(NetworkHeaderField::Ipv6(field)));
            if net.prefix_len() < 128 {
                r.add_expr(&Bitwise::new(net.netmask(), Ipv6Addr::UNSPECIFIED));
            }
            r.add_expr(&Cmp::new(cmp_op(op), IpAddr::V6(net.network())));
        }
    }
}
