//! Renders a [`Ruleset`] as `nft` text, in exactly the form `nft list table` prints it, so a
//! golden file, `sluicectl explain` and the kernel's own listing can be compared verbatim.

use std::fmt::Write;

use ipnet::IpNet;

use super::{
    Base, Family, Hook, Kind, Match, OWNER_CHAIN, Op, PRIORITY_DSTNAT, PRIORITY_MANGLE, Rule,
    Ruleset, TABLE, Verdict,
};

pub(super) fn script(rs: &Ruleset) -> String {
    // `add` + `delete` first makes the replace atomic and work whether or not the table
    // exists; the agent's netlink batch does the same.
    format!(
        "add table inet {TABLE}\ndelete table inet {TABLE}\n{}",
        listing(rs)
    )
}

pub(super) fn listing(rs: &Ruleset) -> String {
    let mut out = format!("table inet {TABLE} {{\n");
    let _ = writeln!(out, "\tchain {OWNER_CHAIN} {{");
    for comment in rs.owner.to_comments() {
        let _ = writeln!(out, "\t\treturn comment {comment:?}");
    }
    out.push_str("\t}\n");
    for chain in &rs.chains {
        out.push('\n');
        let _ = writeln!(out, "\tchain {} {{", chain.name);
        if let Some(base) = chain.base {
            let _ = writeln!(
                out,
                "\t\ttype {} hook {} priority {}; policy accept;",
                match base.kind {
                    Kind::Nat => "nat",
                    Kind::Filter => "filter",
                    Kind::Route => "route",
                },
                base.hook,
                priority(base)
            );
        }
        for r in &chain.rules {
            let _ = writeln!(out, "\t\t{}", rule(r));
        }
        out.push_str("\t}\n");
    }
    out.push_str("}\n");
    out
}

/// nft names the standard priority only where it is defined for the hook.
fn priority(base: Base) -> String {
    match (base.hook, base.priority) {
        (Hook::Prerouting, PRIORITY_DSTNAT) => "dstnat".to_owned(),
        (_, PRIORITY_MANGLE) => "mangle".to_owned(),
        (_, p) => p.to_string(),
    }
}

fn op(o: Op) -> &'static str {
    match o {
        Op::Eq => "",
        Op::Ne => "!= ",
    }
}

fn net(n: &IpNet) -> String {
    if n.prefix_len() == n.max_prefix_len() {
        n.addr().to_string()
    } else {
        n.to_string()
    }
}

fn family(n: &IpNet) -> &'static str {
    family_name(Family::of(n))
}

fn family_name(f: Family) -> &'static str {
    match f {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

/// Marks print as nft prints them: zero-padded hex.
fn mark(m: u32) -> String {
    format!("0x{m:08x}")
}

pub(super) fn rule(r: &Rule) -> String {
    let mut parts: Vec<String> = r
        .matches
        .iter()
        .map(|m| match m {
            Match::NfProto(Family::V4) => "meta nfproto ipv4".to_owned(),
            Match::NfProto(Family::V6) => "meta nfproto ipv6".to_owned(),
            Match::Mark(o, m) => format!("meta mark {}{}", op(*o), mark(*m)),
            Match::CtMark(o, m) => format!("ct mark {}{}", op(*o), mark(*m)),
            Match::CtEstablishedOrRelated => "ct state established,related".to_owned(),
            Match::L4Proto(l4) => format!("meta l4proto {}", l4.name()),
            Match::IifName(o, name) => format!("iifname {}{name:?}", op(*o)),
            Match::OifName(o, name) => format!("oifname {}{name:?}", op(*o)),
            Match::SkUid(o, id) => format!("meta skuid {}{id}", op(*o)),
            Match::SkGid(o, id) => format!("meta skgid {}{id}", op(*o)),
            Match::Daddr(o, n) => format!("{} daddr {}{}", family(n), op(*o), net(n)),
            Match::Saddr(o, n) => format!("{} saddr {}{}", family(n), op(*o), net(n)),
            Match::Dport(l4, o, p) => format!("{} dport {}{p}", l4.name(), op(*o)),
            Match::DportRange(l4, lo, hi) => format!("{} dport {lo}-{hi}", l4.name()),
        })
        .collect();
    parts.push(match &r.verdict {
        Verdict::Return => "return".to_owned(),
        Verdict::Jump(chain) => format!("jump {chain}"),
        Verdict::Redirect(port) => format!("redirect to :{port}"),
        Verdict::SetMark(m) => format!("meta mark set {}", mark(*m)),
        Verdict::MarkAccept(m) => format!("meta mark set {} accept", mark(*m)),
        Verdict::Tproxy { port, mark: m } => {
            // nft needs the family where the rule has an address match; our TPROXY rules
            // always have one (`daddr != localhost`).
            let fam = r
                .matches
                .iter()
                .find_map(|m| match m {
                    Match::Daddr(_, n) | Match::Saddr(_, n) => Some(family(n)),
                    Match::NfProto(f) => Some(family_name(*f)),
                    _ => None,
                })
                .map_or(String::new(), |f| format!("{f} "));
            format!("tproxy {fam}to :{port} meta mark set {} accept", mark(*m))
        }
        Verdict::SaveMark => "ct mark set meta mark".to_owned(),
        Verdict::RestoreMark => "meta mark set ct mark".to_owned(),
        Verdict::Drop => "drop".to_owned(),
        Verdict::Dnat { addr, port } => match (addr, port) {
            (std::net::IpAddr::V4(a), Some(p)) => format!("dnat ip to {a}:{p}"),
            (std::net::IpAddr::V4(a), None) => format!("dnat ip to {a}"),
            (std::net::IpAddr::V6(a), Some(p)) => format!("dnat ip6 to [{a}]:{p}"),
            (std::net::IpAddr::V6(a), None) => format!("dnat ip6 to {a}"),
        },
    });
    parts.join(" ")
}
