//! A [`RedirectPlan`] lowered to the shape of an nftables table: chains and rules built from a
//! small set of matches and verdicts. Still a pure value. Two renderers consume it: `text`
//! (the `nft -f` form, for explain, docs and golden tests) and `crate::nft` (the netlink batch
//! the kernel gets). Keeping one lowering for both is what makes the golden text a faithful
//! picture of what is programmed.

mod text;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;

use crate::plan::{CaptureMode, Cidrs, Loopback, Ports, RedirectPlan};

/// Name of sluice's table in every pod netns (family `inet`).
pub const TABLE: &str = "sluice";

/// Metadata stored in the table's comment so ownership can be read back from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// Plan fingerprint.
    pub fingerprint: String,
    /// Pod UID (may be empty when the runtime gave none).
    pub pod_uid: String,
    /// Container (sandbox) id, shortened to 12 characters like `docker ps` shows.
    pub container: String,
}

const OWNER_TAG: &str = "sluice/v1";

impl Owner {
    pub fn new(fingerprint: &str, pod_uid: &str, container_id: &str) -> Self {
        Self {
            fingerprint: fingerprint.to_owned(),
            pod_uid: pod_uid.to_owned(),
            container: container_id.chars().take(12).collect(),
        }
    }

    /// The comment text: fits nft's 128-byte comment limit.
    pub fn to_comment(&self) -> String {
        format!(
            "{OWNER_TAG} fp={} pod={} cid={}",
            self.fingerprint, self.pod_uid, self.container
        )
    }

    /// Parses a comment written by [`Owner::to_comment`]; `None` for anything else.
    pub fn from_comment(comment: &str) -> Option<Self> {
        let mut words = comment.split(' ');
        if words.next()? != OWNER_TAG {
            return None;
        }
        let mut owner = Owner::new("", "", "");
        for word in words {
            let (k, v) = word.split_once('=')?;
            match k {
                "fp" => owner.fingerprint = v.to_owned(),
                "pod" => owner.pod_uid = v.to_owned(),
                "cid" => owner.container = v.to_owned(),
                _ => {}
            }
        }
        Some(owner)
    }
}

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
    /// `meta nfproto ipv4`.
    Ipv4,
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
    /// `ip daddr 10.0.0.0/8`.
    Daddr(Op, IpNet),
    /// `ip saddr 127.0.0.6`.
    Saddr(Op, IpNet),
    /// `tcp dport 80`.
    Dport(L4, Op, u16),
}

/// What a rule does when all its matches hold.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Verdict {
    Return,
    Jump(&'static str),
    /// `redirect to :PORT` (the rule must have matched an l4proto).
    Redirect(u16),
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

/// A base chain's registration: always type nat, policy accept in this slice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Base {
    pub hook: Hook,
    pub priority: i32,
}

/// The dstnat priority (-100), where iptables' nat PREROUTING/OUTPUT sit.
pub const PRIORITY_DSTNAT: i32 = -100;

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

const INBOUND: &str = "inbound";
/// The DNS port.
const DNS: u16 = 53;
const OUTBOUND: &str = "outbound";

impl Ruleset {
    /// Lowers a plan. Rule order follows the mesh's own chains (Istio's `ISTIO_INBOUND` /
    /// `ISTIO_OUTPUT`, Linkerd's `PROXY_INIT_*`) so that first-match semantics are identical.
    pub fn from_plan(plan: &RedirectPlan, owner: Owner) -> Self {
        let CaptureMode::Redirect = plan.mode;
        let skip_if = |m: fn(Op, String) -> Match| -> Vec<Rule> {
            plan.exclude_interfaces
                .iter()
                .map(|i| rule([m(Op::Eq, i.clone())], Verdict::Return))
                .collect()
        };
        let mut prerouting = skip_if(Match::IifName);
        prerouting.push(rule([Match::Ipv4], Verdict::Jump(INBOUND)));
        let mut output = skip_if(Match::OifName);
        output.push(rule([Match::Ipv4], Verdict::Jump(OUTBOUND)));
        let chains = vec![
            Chain {
                name: "prerouting",
                base: Some(Base {
                    hook: Hook::Prerouting,
                    priority: PRIORITY_DSTNAT,
                }),
                rules: prerouting,
            },
            Chain {
                name: "output",
                base: Some(Base {
                    hook: Hook::Output,
                    priority: PRIORITY_DSTNAT,
                }),
                rules: output,
            },
            Chain {
                name: INBOUND,
                base: None,
                rules: inbound(plan),
            },
            Chain {
                name: OUTBOUND,
                base: None,
                rules: outbound(plan),
            },
        ];
        Ruleset { owner, chains }
    }

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

fn rule<const N: usize>(matches: [Match; N], verdict: Verdict) -> Rule {
    Rule {
        matches: matches.into(),
        verdict,
    }
}

fn host(addr: Ipv4Addr) -> IpNet {
    IpNet::from(IpAddr::V4(addr))
}

/// Inbound (PREROUTING): skipped sources and the proxy's own ports reach the app, the rest
/// goes to the inbound port. With an explicit port list only those ports are redirected (the
/// exclusions then do not apply, as in Istio), except that Istio's tunnel port always passes.
fn inbound(plan: &RedirectPlan) -> Vec<Rule> {
    let mut rules: Vec<Rule> = plan
        .exclude_inbound_sources
        .iter()
        .filter(|n| is_v4(n))
        .map(|&n| rule([Match::Saddr(Op::Eq, n)], Verdict::Return))
        .collect();
    let to_inbound = Verdict::Redirect(plan.inbound_port);
    match &plan.include_inbound_ports {
        Ports::All => {
            rules.extend(
                plan.exclude_inbound_ports
                    .iter()
                    .map(|&p| rule([Match::Dport(L4::Tcp, Op::Eq, p)], Verdict::Return)),
            );
            rules.push(rule([Match::L4Proto(L4::Tcp)], to_inbound));
        }
        Ports::Only(ports) => {
            if let Loopback::Istio { tunnel_port, .. } = plan.loopback {
                rules.push(rule(
                    [Match::Dport(L4::Tcp, Op::Eq, tunnel_port)],
                    Verdict::Return,
                ));
            }
            rules.extend(
                ports
                    .iter()
                    .map(|&p| rule([Match::Dport(L4::Tcp, Op::Eq, p)], to_inbound.clone())),
            );
        }
    }
    rules
}

/// Outbound (OUTPUT). Istio's order: excluded ports, the passthrough source, then per proxy
/// owner (uid, gid): the proxy calling its own pod over lo is looped to inbound, lo traffic of
/// other users returns (unless the include CIDRs name loopback), the proxy's own traffic
/// returns; then 127.0.0.1, excluded CIDRs, included ports, included CIDRs. Linkerd's: the
/// proxy uid (and gid if set), all of lo, excluded ports, then redirect.
fn outbound(plan: &RedirectPlan) -> Vec<Rule> {
    let lo = || Match::OifName(Op::Eq, "lo".to_owned());
    let localhost = host(Ipv4Addr::LOCALHOST);
    let owners: Vec<(Match, Match)> = std::iter::once((
        Match::SkUid(Op::Eq, plan.proxy_uid),
        Match::SkUid(Op::Ne, plan.proxy_uid),
    ))
    .chain(
        plan.proxy_gid
            .map(|g| (Match::SkGid(Op::Eq, g), Match::SkGid(Op::Ne, g))),
    )
    .collect();
    let mut rules = Vec::new();
    // DNS capture comes first: the proxy's own lookups pass, everyone else's go to the DNS
    // port, over UDP and TCP, whatever the destination (the catch-all TCP redirect below would
    // otherwise send TCP/53 to the outbound port).
    if let Some(dns_port) = plan.dns_port {
        for l4 in [L4::Udp, L4::Tcp] {
            for (owner, _) in &owners {
                rules.push(rule(
                    [Match::Dport(l4, Op::Eq, DNS), owner.clone()],
                    Verdict::Return,
                ));
            }
            rules.push(rule(
                [Match::Dport(l4, Op::Eq, DNS)],
                Verdict::Redirect(dns_port),
            ));
        }
    }
    let excluded_ports = plan.exclude_outbound_ports.iter().flat_map(|&p| {
        [
            rule([Match::Dport(L4::Tcp, Op::Eq, p)], Verdict::Return),
            rule([Match::Dport(L4::Udp, Op::Eq, p)], Verdict::Return),
        ]
    });
    match plan.loopback {
        Loopback::Istio {
            tunnel_port,
            passthrough_source,
        } => {
            rules.extend(excluded_ports);
            rules.push(rule(
                [lo(), Match::Saddr(Op::Eq, host(passthrough_source))],
                Verdict::Return,
            ));
            let keep_lo_return = !includes_loopback(&plan.include_outbound_cidrs);
            for (owner, not_owner) in owners {
                rules.push(rule(
                    [
                        lo(),
                        Match::Daddr(Op::Ne, localhost),
                        Match::Dport(L4::Tcp, Op::Ne, tunnel_port),
                        owner.clone(),
                    ],
                    Verdict::Redirect(plan.inbound_port),
                ));
                if keep_lo_return {
                    rules.push(rule([lo(), not_owner], Verdict::Return));
                }
                rules.push(rule([owner], Verdict::Return));
            }
            rules.push(rule([Match::Daddr(Op::Eq, localhost)], Verdict::Return));
        }
        Loopback::IgnoreAll => {
            rules.extend(
                owners
                    .into_iter()
                    .map(|(owner, _)| rule([owner], Verdict::Return)),
            );
            rules.push(rule([lo()], Verdict::Return));
            rules.extend(excluded_ports);
        }
    }
    for net in plan.exclude_outbound_cidrs.iter().filter(|n| is_v4(n)) {
        rules.push(rule([Match::Daddr(Op::Eq, *net)], Verdict::Return));
    }
    let to_outbound = Verdict::Redirect(plan.outbound_port);
    rules.extend(
        plan.include_outbound_ports
            .iter()
            .map(|&p| rule([Match::Dport(L4::Tcp, Op::Eq, p)], to_outbound.clone())),
    );
    match &plan.include_outbound_cidrs {
        Cidrs::All => rules.push(rule([Match::L4Proto(L4::Tcp)], to_outbound)),
        Cidrs::Only(nets) => rules.extend(nets.iter().filter(|n| is_v4(n)).map(|net| {
            rule(
                [Match::Daddr(Op::Eq, *net), Match::L4Proto(L4::Tcp)],
                to_outbound.clone(),
            )
        })),
    }
    rules
}

/// Istio drops the "lo traffic of other users returns" rule when the include ranges contain a
/// loopback address: the user asked for loopback to be captured.
fn includes_loopback(cidrs: &Cidrs) -> bool {
    match cidrs {
        Cidrs::All => false,
        Cidrs::Only(nets) => nets
            .iter()
            .any(|n| n.addr().is_loopback() || n.contains(&IpAddr::V4(Ipv4Addr::LOCALHOST))),
    }
}

/// This slice captures IPv4 only; IPv6 entries in CIDR lists are accepted and kept in the
/// plan but produce no rules until dual-stack capture exists.
fn is_v4(net: &IpNet) -> bool {
    matches!(net, IpNet::V4(_))
}

impl fmt::Display for Hook {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Hook::Prerouting => "prerouting",
            Hook::Output => "output",
        })
    }
}
