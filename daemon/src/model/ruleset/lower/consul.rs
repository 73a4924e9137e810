//! Consul's outbound chain, which shares nothing of the loopback handling of the others.

use std::net::IpAddr;

use super::{DNS, Fam, host, owners, rule};
use crate::model::plan::RedirectPlan;
use crate::model::ruleset::{Family, L4, Match, Op, Rule, Verdict};

/// Consul's OUTPUT (`sdk/iptables`): DNS to Consul's DNS address first (everyone's), then in
/// `CONSUL_PROXY_OUTPUT` the excluded users, destinations and TCP ports return, the proxy's
/// uid returns, 127.0.0.1 / ::1 returns, and the rest of TCP goes to the outbound port. No
/// special case for `lo`. In a dual-stack pod Consul's IPv4 pass has no DNS rules and its
/// IPv6 pass redirects queries to `::1`.
pub(super) fn consul_outbound(plan: &RedirectPlan, f: &Fam) -> Vec<Rule> {
    let mut rules = Vec::new();
    if let Some(dns) = plan.consul_dns {
        let ip = match f.family {
            Family::V4 if plan.families.ipv6 => None,
            Family::V4 => Some(IpAddr::V4(dns.ip)),
            Family::V6 => Some(IpAddr::V6(crate::model::plan::CONSUL_DNS6)),
        };
        if let Some(ip) = ip {
            for l4 in [L4::Udp, L4::Tcp] {
                let mut matches = Vec::new();
                if dns.port.is_some() {
                    matches.push(Match::Daddr(Op::Eq, host(ip)));
                }
                matches.push(Match::Dport(l4, Op::Eq, DNS));
                rules.push(Rule {
                    matches,
                    verdict: Verdict::Dnat {
                        addr: ip,
                        port: dns.port,
                    },
                });
            }
        }
    }
    rules.extend(
        plan.exclude_outbound_uids
            .iter()
            .map(|&uid| rule([Match::SkUid(Op::Eq, uid)], Verdict::Return)),
    );
    rules.extend(
        plan.exclude_outbound_cidrs
            .iter()
            .filter(|n| f.owns(n))
            .map(|&net| rule([Match::Daddr(Op::Eq, net)], Verdict::Return)),
    );
    rules.extend(
        plan.exclude_outbound_ports
            .iter()
            .map(|&p| rule([Match::Dport(L4::Tcp, Op::Eq, p)], Verdict::Return)),
    );
    rules.extend(
        owners(plan)
            .into_iter()
            .map(|(owner, _)| rule([owner], Verdict::Return)),
    );
    rules.push(rule([Match::Daddr(Op::Eq, f.localhost)], Verdict::Return));
    rules.push(rule(
        [Match::L4Proto(L4::Tcp)],
        Verdict::Redirect(plan.outbound_port),
    ));
    rules
}
