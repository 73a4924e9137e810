//! A plan lowered to chains and rules. Rule order follows the mesh's own chains (Istio's
//! `ISTIO_INBOUND` / `ISTIO_OUTPUT`, Linkerd's `PROXY_INIT_*`) so that first-match semantics
//! are identical.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use super::{
    Base, Chain, Family, Hook, Kind, L4, Match, Op, Owner, PRIORITY_DSTNAT, PRIORITY_MANGLE, Rule,
    Ruleset, Verdict,
};
use crate::model::plan::{CaptureMode, Cidrs, Loopback, Ports, RedirectPlan};

mod consul;
use consul::consul_outbound;

/// The DNS port.
const DNS: u16 = 53;

/// Per-family names and addresses: IPv4 keeps the chain names of the IPv4-only tables.
struct Fam {
    family: Family,
    localhost: IpNet,
    passthrough: Option<IpNet>,
    inbound: &'static str,
    outbound: &'static str,
    tproxy_inbound: &'static str,
    tproxy: &'static str,
}

impl Fam {
    fn new(family: Family, loopback: &Loopback) -> Self {
        let passthrough = |v4: Ipv4Addr, v6: Ipv6Addr| match family {
            Family::V4 => host(IpAddr::V4(v4)),
            Family::V6 => host(IpAddr::V6(v6)),
        };
        let passthrough = match *loopback {
            Loopback::Istio {
                passthrough_source,
                passthrough_source6,
                ..
            }
            | Loopback::Kuma {
                passthrough_source,
                passthrough_source6,
            } => Some(passthrough(passthrough_source, passthrough_source6)),
            Loopback::IgnoreAll | Loopback::Consul => None,
        };
        match family {
            Family::V4 => Fam {
                family,
                localhost: host(IpAddr::V4(Ipv4Addr::LOCALHOST)),
                passthrough,
                inbound: "inbound",
                outbound: "outbound",
                tproxy_inbound: "tproxy_inbound",
                tproxy: "to_proxy",
            },
            Family::V6 => Fam {
                family,
                localhost: host(IpAddr::V6(Ipv6Addr::LOCALHOST)),
                passthrough,
                inbound: "inbound6",
                outbound: "outbound6",
                tproxy_inbound: "tproxy_inbound6",
                tproxy: "to_proxy6",
            },
        }
    }

    fn owns(&self, net: &IpNet) -> bool {
        Family::of(net) == self.family
    }
}

fn base(kind: Kind, hook: Hook, priority: i32) -> Option<Base> {
    Some(Base {
        kind,
        hook,
        priority,
    })
}

impl Ruleset {
    /// Lowers a plan. Rule order follows the mesh's own chains (Istio's `ISTIO_INBOUND` /
    /// `ISTIO_OUTPUT`, Linkerd's `PROXY_INIT_*`) so that first-match semantics are identical.
    /// Each captured family gets its own inbound/outbound chains, reached by `meta nfproto`,
    /// as iptables and ip6tables each get theirs.
    pub fn from_plan(plan: &RedirectPlan, owner: Owner) -> Self {
        let fams: Vec<Fam> = [
            (plan.families.ipv4, Family::V4),
            (plan.families.ipv6, Family::V6),
        ]
        .into_iter()
        .filter(|(on, _)| *on)
        .map(|(_, f)| Fam::new(f, &plan.loopback))
        .collect();
        let skip_if = |m: fn(Op, String) -> Match| -> Vec<Rule> {
            plan.exclude_interfaces
                .iter()
                .map(|i| rule([m(Op::Eq, i.clone())], Verdict::Return))
                .collect()
        };
        let mut chains = Vec::new();
        match plan.mode {
            CaptureMode::Redirect => {
                let mut prerouting = skip_if(Match::IifName);
                prerouting.extend(
                    fams.iter()
                        .map(|f| rule([Match::NfProto(f.family)], Verdict::Jump(f.inbound))),
                );
                chains.push(Chain {
                    name: "prerouting",
                    base: base(Kind::Nat, Hook::Prerouting, PRIORITY_DSTNAT),
                    rules: prerouting,
                });
            }
            CaptureMode::Tproxy { mark, .. } => {
                let tcp = || Match::L4Proto(L4::Tcp);
                let mut prerouting = skip_if(Match::IifName);
                prerouting.extend(fams.iter().map(|f| {
                    rule(
                        [Match::NfProto(f.family), tcp()],
                        Verdict::Jump(f.tproxy_inbound),
                    )
                }));
                prerouting.push(rule([tcp(), Match::Mark(Op::Eq, mark)], Verdict::SaveMark));
                chains.push(Chain {
                    name: "mangle_prerouting",
                    base: base(Kind::Filter, Hook::Prerouting, PRIORITY_MANGLE),
                    rules: prerouting,
                });
                chains.push(Chain {
                    name: "mangle_output",
                    base: base(Kind::Route, Hook::Output, PRIORITY_MANGLE),
                    rules: mangle_output(plan, mark, &fams),
                });
            }
        }
        let mut output = skip_if(Match::OifName);
        output.extend(
            fams.iter()
                .map(|f| rule([Match::NfProto(f.family)], Verdict::Jump(f.outbound))),
        );
        chains.push(Chain {
            name: "output",
            base: base(Kind::Nat, Hook::Output, PRIORITY_DSTNAT),
            rules: output,
        });
        for f in &fams {
            match plan.mode {
                CaptureMode::Redirect => chains.push(Chain {
                    name: f.inbound,
                    base: None,
                    rules: inbound(plan, f),
                }),
                CaptureMode::Tproxy { mark, .. } => {
                    chains.push(Chain {
                        name: f.tproxy_inbound,
                        base: None,
                        rules: tproxy_inbound(plan, mark, f),
                    });
                    chains.push(Chain {
                        name: f.tproxy,
                        base: None,
                        rules: tproxy(plan, mark, f),
                    });
                }
            }
            chains.push(Chain {
                name: f.outbound,
                base: None,
                rules: outbound(plan, f),
            });
        }
        Ruleset { owner, chains }
    }
}

fn rule<const N: usize>(matches: [Match; N], verdict: Verdict) -> Rule {
    Rule {
        matches: matches.into(),
        verdict,
    }
}

fn host(addr: IpAddr) -> IpNet {
    IpNet::from(addr)
}

/// The proxy's owners (uid, and gid if set), each as (is owner, is not owner).
fn owners(plan: &RedirectPlan) -> Vec<(Match, Match)> {
    std::iter::once((
        Match::SkUid(Op::Eq, plan.proxy_uid),
        Match::SkUid(Op::Ne, plan.proxy_uid),
    ))
    .chain(
        plan.proxy_gid
            .map(|g| (Match::SkGid(Op::Eq, g), Match::SkGid(Op::Ne, g))),
    )
    .collect()
}

/// Inbound (PREROUTING): skipped sources and the proxy's own ports reach the app, the rest
/// goes to the inbound port. With an explicit port list only those ports are redirected (the
/// exclusions then do not apply, as in Istio), except that Istio's tunnel port always passes.
fn inbound(plan: &RedirectPlan, f: &Fam) -> Vec<Rule> {
    let mut rules: Vec<Rule> = plan
        .exclude_inbound_sources
        .iter()
        .filter(|n| f.owns(n))
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

/// TPROXY inbound (mangle PREROUTING, Istio's mangle `ISTIO_INBOUND`): already-diverted
/// packets, the passthrough source over lo and lo traffic not marked by the proxy return;
/// excluded ports return; packets of established connections are marked so the policy route
/// delivers them locally (`ISTIO_DIVERT`); new connections go to the transparent listener.
fn tproxy_inbound(plan: &RedirectPlan, mark: u32, f: &Fam) -> Vec<Rule> {
    let tcp = || Match::L4Proto(L4::Tcp);
    let lo = || Match::IifName(Op::Eq, "lo".to_owned());
    let mut rules = vec![rule([tcp(), Match::Mark(Op::Eq, mark)], Verdict::Return)];
    if let Some(src) = f.passthrough {
        rules.push(rule(
            [tcp(), Match::Saddr(Op::Eq, src), lo()],
            Verdict::Return,
        ));
    }
    rules.push(rule(
        [tcp(), lo(), Match::Mark(Op::Ne, own_lo_mark(mark))],
        Verdict::Return,
    ));
    rules.extend(
        plan.exclude_inbound_sources
            .iter()
            .filter(|n| f.owns(n))
            .map(|&n| rule([Match::Saddr(Op::Eq, n)], Verdict::Return)),
    );
    let divert = |dport: Option<u16>| {
        let mut matches: Vec<Match> = dport
            .map(|p| Match::Dport(L4::Tcp, Op::Eq, p))
            .into_iter()
            .collect();
        let mut established = matches.clone();
        established.push(Match::CtEstablishedOrRelated);
        if dport.is_none() {
            established.insert(0, tcp());
            matches.push(tcp());
        }
        [
            Rule {
                matches: established,
                verdict: Verdict::MarkAccept(mark),
            },
            Rule {
                matches,
                verdict: Verdict::Jump(f.tproxy),
            },
        ]
    };
    match &plan.include_inbound_ports {
        Ports::All => {
            rules.extend(
                plan.exclude_inbound_ports
                    .iter()
                    .map(|&p| rule([Match::Dport(L4::Tcp, Op::Eq, p)], Verdict::Return)),
            );
            rules.extend(divert(None));
        }
        Ports::Only(ports) => rules.extend(ports.iter().flat_map(|&p| divert(Some(p)))),
    }
    rules
}

/// The TPROXY itself (Istio's `ISTIO_TPROXY`). iptables' TPROXY target drops a packet when no
/// transparent listener takes it, while nft's `tproxy` falls through; the trailing drop keeps
/// iptables' fate: no proxy listening means no connection, never an uncaptured one.
fn tproxy(plan: &RedirectPlan, mark: u32, f: &Fam) -> Vec<Rule> {
    let not_local = || Match::Daddr(Op::Ne, f.localhost);
    vec![
        rule(
            [not_local(), Match::L4Proto(L4::Tcp)],
            Verdict::Tproxy {
                port: plan.inbound_port,
                mark,
            },
        ),
        rule([not_local(), Match::L4Proto(L4::Tcp)], Verdict::Drop),
    ]
}

/// The mark Istio gives the proxy's own connections to its pod over lo, so that TPROXY
/// inbound takes them (1338 next to 1337).
pub fn own_lo_mark(mark: u32) -> u32 {
    mark.wrapping_add(1)
}

/// TPROXY output (mangle OUTPUT): diverted connections over lo pass, the proxy's own
/// connections to its pod over lo are marked for inbound capture, and replies of diverted
/// connections get their connection's mark back so they are routed by the policy rule.
fn mangle_output(plan: &RedirectPlan, mark: u32, fams: &[Fam]) -> Vec<Rule> {
    let tcp = || Match::L4Proto(L4::Tcp);
    let lo = || Match::OifName(Op::Eq, "lo".to_owned());
    let mut rules = vec![rule(
        [tcp(), lo(), Match::Mark(Op::Eq, mark)],
        Verdict::Return,
    )];
    for f in fams {
        for (owner, _) in owners(plan) {
            rules.push(rule(
                [Match::Daddr(Op::Ne, f.localhost), tcp(), lo(), owner],
                Verdict::SetMark(own_lo_mark(mark)),
            ));
        }
    }
    rules.push(rule(
        [tcp(), Match::CtMark(Op::Eq, mark)],
        Verdict::RestoreMark,
    ));
    rules
}

/// Outbound (OUTPUT). Istio's order: excluded ports, the passthrough source, then per proxy
/// owner (uid, gid): the proxy calling its own pod over lo is looped to inbound, lo traffic of
/// other users returns (unless the include CIDRs name loopback), the proxy's own traffic
/// returns; then 127.0.0.1, excluded CIDRs, included ports, included CIDRs. Linkerd's: the
/// proxy uid (and gid if set), all of lo, excluded ports, then redirect.
fn outbound(plan: &RedirectPlan, f: &Fam) -> Vec<Rule> {
    if plan.loopback == Loopback::Consul {
        return consul_outbound(plan, f);
    }
    let lo = || Match::OifName(Op::Eq, "lo".to_owned());
    let owners = owners(plan);
    let mut rules = Vec::new();
    let kuma = matches!(plan.loopback, Loopback::Kuma { .. });
    // Users excluded for some ports (Kuma's excludePortsForUIDs) come first, as in Kuma's OUTPUT.
    for e in &plan.exclude_uid_ports {
        let l4 = match e.proto {
            crate::model::plan::Proto::Tcp => L4::Tcp,
            crate::model::plan::Proto::Udp => L4::Udp,
        };
        let port = match e.ports {
            Some((lo, hi)) if lo == hi => Match::Dport(l4, Op::Eq, lo),
            Some((lo, hi)) => Match::DportRange(l4, lo, hi),
            None => Match::L4Proto(l4),
        };
        rules.push(rule([port, Match::SkUid(Op::Eq, e.uid)], Verdict::Return));
    }
    if kuma {
        // Kuma's OUTPUT: the excluded destinations return before anything, DNS included.
        for net in plan.exclude_outbound_cidrs.iter().filter(|n| f.owns(n)) {
            rules.push(rule([Match::Daddr(Op::Eq, *net)], Verdict::Return));
        }
    }
    // DNS capture comes first: the proxy's own lookups pass, everyone else's go to the DNS
    // port, over UDP and TCP, whatever the destination (the catch-all TCP redirect below would
    // otherwise send TCP/53 to the outbound port).
    if let Some(dns_port) = plan.dns_port
        && kuma
    {
        // Kuma: UDP only; TCP/53 of everyone but the proxy returns, uncaptured.
        for (owner, _) in &owners {
            rules.push(rule(
                [Match::Dport(L4::Udp, Op::Eq, DNS), owner.clone()],
                Verdict::Return,
            ));
        }
        rules.push(rule(
            [Match::Dport(L4::Udp, Op::Eq, DNS)],
            Verdict::Redirect(dns_port),
        ));
        for (_, not_owner) in &owners {
            rules.push(rule(
                [Match::Dport(L4::Tcp, Op::Eq, DNS), not_owner.clone()],
                Verdict::Return,
            ));
        }
    } else if let Some(dns_port) = plan.dns_port {
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
    let tunnel = match plan.loopback {
        Loopback::Istio { tunnel_port, .. } => Some(tunnel_port),
        _ => None,
    };
    match plan.loopback {
        Loopback::Istio { .. } | Loopback::Kuma { .. } => {
            rules.extend(excluded_ports);
            if let Some(src) = f.passthrough {
                rules.push(rule([lo(), Match::Saddr(Op::Eq, src)], Verdict::Return));
            }
            let keep_lo_return = !includes_loopback(&plan.include_outbound_cidrs, f);
            for (owner, not_owner) in owners {
                let mut looped = vec![lo(), Match::Daddr(Op::Ne, f.localhost)];
                match tunnel {
                    Some(tunnel_port) => looped.push(Match::Dport(L4::Tcp, Op::Ne, tunnel_port)),
                    None => looped.push(Match::L4Proto(L4::Tcp)),
                }
                looped.push(owner.clone());
                rules.push(Rule {
                    matches: looped,
                    verdict: Verdict::Redirect(plan.inbound_port),
                });
                if keep_lo_return {
                    rules.push(rule([lo(), not_owner], Verdict::Return));
                }
                rules.push(rule([owner], Verdict::Return));
            }
            rules.push(rule([Match::Daddr(Op::Eq, f.localhost)], Verdict::Return));
        }
        Loopback::IgnoreAll | Loopback::Consul => {
            rules.extend(
                owners
                    .into_iter()
                    .map(|(owner, _)| rule([owner], Verdict::Return)),
            );
            rules.push(rule([lo()], Verdict::Return));
            rules.extend(excluded_ports);
        }
    }
    if !kuma {
        for net in plan.exclude_outbound_cidrs.iter().filter(|n| f.owns(n)) {
            rules.push(rule([Match::Daddr(Op::Eq, *net)], Verdict::Return));
        }
    }
    let to_outbound = Verdict::Redirect(plan.outbound_port);
    rules.extend(
        plan.include_outbound_ports
            .iter()
            .map(|&p| rule([Match::Dport(L4::Tcp, Op::Eq, p)], to_outbound.clone())),
    );
    match &plan.include_outbound_cidrs {
        Cidrs::All => rules.push(rule([Match::L4Proto(L4::Tcp)], to_outbound)),
        Cidrs::Only(nets) => rules.extend(nets.iter().filter(|n| f.owns(n)).map(|net| {
            rule(
                [Match::Daddr(Op::Eq, *net), Match::L4Proto(L4::Tcp)],
                to_outbound.clone(),
            )
        })),
    }
    rules
}

/// Istio drops the "lo traffic of other users returns" rule when the include ranges of the
/// family contain a loopback address: the user asked for loopback to be captured.
fn includes_loopback(cidrs: &Cidrs, f: &Fam) -> bool {
    match cidrs {
        Cidrs::All => false,
        Cidrs::Only(nets) => nets
            .iter()
            .filter(|n| f.owns(n))
            .any(|n| n.addr().is_loopback() || n.contains(&f.localhost.addr())),
    }
}
