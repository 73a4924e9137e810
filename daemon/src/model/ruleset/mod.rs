//! A [`RedirectPlan`] lowered to the shape of an nftables table: chains and rules built from a
//! small set of matches and verdicts. Still a pure value. Two renderers consume it: `text`
//! (the `nft -f` form, for explain, docs and golden tests) and `crate::kernel::nft` (the netlink batch
//! the kernel gets). Keeping one lowering for both is what makes the golden text a faithful
//! picture of what is programmed.

mod lower;
mod owner;
mod text;

pub use lower::own_lo_mark;

pub use owner::{Attached, MAX_ATTACHMENTS, MAX_COMMENT, Owner};

use std::fmt;

use ipnet::IpNet;

/// Name of sluice's table in every pod netns (family `inet`).
pub const TABLE: &str = "sluice";

/// The chain holding the table's [`Owner`] as rule comments. Nothing jumps to it, so its
/// rules (`return`, with the comment) never see a packet.
pub const OWNER_CHAIN: &str = "owner";

/// Layer 4 protocols we match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum L4 {
    Tcp,
    Udp,
}

impl L4 {
    pub fn number(self) -> u8 {
        match self {
            L4::Tcp => libc::IPPROTO_TCP as u8,
            L4::Udp => libc::IPPROTO_UDP as u8,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            L4::Tcp => "tcp",
            L4::Udp => "udp",
        }
    }
}

/// An IP family of the `inet` table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(net: &IpNet) -> Self {
        match net {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        }
    }
}

/// Equality or inequality.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Eq,
    Ne,
}

/// One match in a rule. Protocol dependencies (`meta nfproto`, `meta l4proto`) of address and
/// port matches are implied and emitted by the renderers, as `nft` itself does.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Match {
    /// `meta nfproto ipv4` / `ipv6`.
    NfProto(Family),
    /// `meta l4proto tcp`.
    L4Proto(L4),
    /// `iifname "eth1"`.
    IifName(Op, String),
    /// `oifname "lo"`.
    OifName(Op, String),
    /// `meta skuid 1337`.
    SkUid(Op, u32),
    /// `meta skgid 1337`.
    SkGid(Op, u32),
    /// `ip daddr 10.0.0.0/8` / `ip6 daddr ::1`.
    Daddr(Op, IpNet),
    /// `ip saddr 127.0.0.6`.
    Saddr(Op, IpNet),
    /// `tcp dport 80`.
    Dport(L4, Op, u16),
    /// `tcp dport 2-3` (inclusive; encoded as nft does: `>=` then `<=`).
    DportRange(L4, u16, u16),
    /// `meta mark 0x00000539`.
    Mark(Op, u32),
    /// `ct mark 0x00000539`.
    CtMark(Op, u32),
    /// `ct state established,related`.
    CtEstablishedOrRelated,
}

/// What a rule does when all its matches hold.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Verdict {
    Return,
    Jump(&'static str),
    /// `redirect to :PORT` (the rule must have matched an l4proto).
    Redirect(u16),
    /// `meta mark set MARK` and go on (iptables' `-j MARK --set-mark`).
    SetMark(u32),
    /// `meta mark set MARK accept` (Istio's ISTIO_DIVERT chain, inlined).
    MarkAccept(u32),
    /// `tproxy to :PORT meta mark set MARK accept` (iptables' `-j TPROXY --on-port PORT
    /// --tproxy-mark MARK`). The rule must have matched an l4proto.
    Tproxy {
        port: u16,
        mark: u32,
    },
    /// `ct mark set meta mark` (`-j CONNMARK --save-mark`).
    SaveMark,
    /// `meta mark set ct mark` (`-j CONNMARK --restore-mark`).
    RestoreMark,
    Drop,
    /// `dnat ip to ADDR[:PORT]` / `dnat ip6 to [ADDR][:PORT]` (iptables' `-j DNAT
    /// --to-destination`; Consul's DNS).
    Dnat {
        addr: std::net::IpAddr,
        port: Option<u16>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    pub matches: Vec<Match>,
    pub verdict: Verdict,
}

/// Netfilter hooks our base chains attach to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    Prerouting,
    Output,
}

/// The nftables chain type of a base chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// `type nat`: iptables' nat table.
    Nat,
    /// `type filter`: iptables' mangle PREROUTING.
    Filter,
    /// `type route`: iptables' mangle OUTPUT (re-routes when the mark changes).
    Route,
}

/// A base chain's registration, always with policy accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Base {
    pub kind: Kind,
    pub hook: Hook,
    pub priority: i32,
}

/// The dstnat priority (-100), where iptables' nat PREROUTING/OUTPUT sit.
pub const PRIORITY_DSTNAT: i32 = -100;
/// The mangle priority (-150), where iptables' mangle PREROUTING/OUTPUT sit.
pub const PRIORITY_MANGLE: i32 = -150;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Chain {
    pub name: &'static str,
    pub base: Option<Base>,
    pub rules: Vec<Rule>,
}

/// The whole `inet sluice` table for one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    pub owner: Owner,
    pub chains: Vec<Chain>,
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Hook::Prerouting => "prerouting",
            Hook::Output => "output",
        })
    }
}

impl Ruleset {
    pub fn rule_count(&self) -> usize {
        self.chains.iter().map(|c| c.rules.len()).sum()
    }

    /// The table as `nft list table` prints it.
    pub fn to_nft_listing(&self) -> String {
        text::listing(self)
    }

    /// An `nft -f` script that atomically replaces the table, as the agent's batch does.
    pub fn to_nft_script(&self) -> String {
        text::script(self)
    }
}
