//! Reading a pod's device state back and comparing it with the plan (Check, the reconciler),
//! and removing what is ours and not in the plan (a repair).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_route::address::{AddressAttribute, AddressProtocol};
use netlink_packet_route::route::{RouteProtocol, RouteType};
use netlink_packet_route::rule::RuleAttribute;
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};
use tokio_stream::StreamExt;

use super::sysctl::sysctl_path;
use super::{
    DeviceError, DeviceSetup, PROTO, TPROXY_RULE_PRIORITY, address_ip, ipv6_enabled, lo_addresses,
    read_lo, step, with_handle,
};

/// Compares the device state of the calling thread's namespace with `s`: `lo` up, the `::6`
/// address, TPROXY's rules and routes (exactly ours, by [`PROTO`]: missing ones and ones the
/// plan does not have) and the sysctls' values. One line per difference; empty when equal.
/// IPv6 steps are expected only where IPv6 is on for `lo`, as [`setup`] applies them.
pub fn inspect(s: &DeviceSetup) -> Result<Vec<String>, DeviceError> {
    let survey = with_handle(async |handle| survey(&handle, s).await)?;
    let mut drift = survey.missing;
    drift.extend(survey.unexpected.into_iter().map(|(what, _)| what));
    for (name, want) in &s.sysctls {
        match std::fs::read_to_string(sysctl_path(name)) {
            Ok(have) if normalise(&have) == normalise(want) => {}
            Ok(have) => drift.push(format!(
                "sysctl {name} is {:?}, expected {want:?}",
                normalise(&have)
            )),
            Err(e) => drift.push(format!("sysctl {name} cannot be read: {e}")),
        }
    }
    Ok(drift)
}

/// Sysctl values compare by their words (the kernel prints `32768\t60999` for `32768 60999`).
fn normalise(v: &str) -> String {
    v.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Device state of ours (tagged [`PROTO`]) that a plan does not have, to report or remove.
enum Unexpected {
    Rule(netlink_packet_route::rule::RuleMessage),
    Route(netlink_packet_route::route::RouteMessage),
    Address(netlink_packet_route::address::AddressMessage),
}

/// What [`survey`] found: what the plan has and the namespace lacks, and what is ours in the
/// namespace but not in the plan.
struct Survey {
    missing: Vec<String>,
    unexpected: Vec<(String, Unexpected)>,
}

async fn survey(handle: &Handle, s: &DeviceSetup) -> Result<Survey, DeviceError> {
    let mut unexpected = Vec::new();
    let mut drift = Vec::new();
    let proto = RouteProtocol::Other(PROTO);
    let lo = read_lo(handle).await?;
    let ipv6 = ipv6_enabled(&lo);
    let up = lo
        .header
        .flags
        .contains(netlink_packet_route::link::LinkFlags::Up);
    if !up {
        drift.push("lo is down".to_owned());
    }
    let addresses = lo_addresses(handle).await?;
    // The plan's address counts wherever it came from (the pod's runtime or a mesh's init
    // container may have added it first); sluice's own are the ones it tagged (Linux 6.1+
    // keeps the tag) or its owner records.
    let want_address = s.lo_address6.filter(|_| ipv6).map(IpAddr::V6);
    if let Some(want) = want_address
        && !addresses.iter().any(|a| address_ip(a) == Some(want))
    {
        drift.push(format!("address {want}/128 on lo is missing"));
    }
    for a in addresses {
        let Some(have) = address_ip(&a) else { continue };
        let ours = a
            .attributes
            .contains(&AddressAttribute::Protocol(AddressProtocol::Other(PROTO)))
            || s.owned_lo.map(IpAddr::V6) == Some(have);
        if ours && Some(have) != want_address {
            unexpected.push((
                format!("unexpected sluice address {have} on lo"),
                Unexpected::Address(a),
            ));
        }
    }
    for (version, flag) in [(IpVersion::V4, ""), (IpVersion::V6, " -6")] {
        let wanted = match version {
            IpVersion::V4 => s.ipv4,
            IpVersion::V6 => s.ipv6 && ipv6,
        };
        let want = s.tproxy.filter(|_| wanted);
        let rules: Vec<_> = step(
            "listing rules",
            handle
                .rule()
                .get(version.clone())
                .execute()
                .collect::<Result<Vec<_>, _>>(),
        )
        .await?;
        let mut found_rule = false;
        for rule in rules
            .into_iter()
            .filter(|r| r.attributes.contains(&RuleAttribute::Protocol(proto)))
        {
            let attr = |f: fn(&RuleAttribute) -> Option<u32>| rule.attributes.iter().find_map(f);
            let mark = attr(|a| match a {
                RuleAttribute::FwMark(m) => Some(*m),
                _ => None,
            });
            let table = attr(|a| match a {
                RuleAttribute::Table(t) => Some(*t),
                _ => None,
            })
            .unwrap_or(u32::from(rule.header.table));
            let priority = attr(|a| match a {
                RuleAttribute::Priority(p) => Some(*p),
                _ => None,
            });
            match want {
                Some((m, t))
                    if mark == Some(m) && table == t && priority == Some(TPROXY_RULE_PRIORITY) =>
                {
                    found_rule = true;
                }
                _ => unexpected.push((
                    format!(
                        "unexpected sluice rule{flag}: fwmark {} lookup {table}",
                        mark.unwrap_or_default()
                    ),
                    Unexpected::Rule(rule),
                )),
            }
        }
        let query = match version {
            IpVersion::V4 => RouteMessageBuilder::<Ipv4Addr>::new().build(),
            IpVersion::V6 => RouteMessageBuilder::<Ipv6Addr>::new().build(),
        };
        let routes: Vec<_> = step(
            "listing routes",
            handle
                .route()
                .get(query)
                .execute()
                .collect::<Result<Vec<_>, _>>(),
        )
        .await?;
        let mut found_route = false;
        for route in routes.into_iter().filter(|r| r.header.protocol == proto) {
            let table = route
                .attributes
                .iter()
                .find_map(|a| match a {
                    netlink_packet_route::route::RouteAttribute::Table(t) => Some(*t),
                    _ => None,
                })
                .unwrap_or(u32::from(route.header.table));
            match want {
                Some((_, t))
                    if table == t
                        && route.header.kind == RouteType::Local
                        && route.header.destination_prefix_length == 0 =>
                {
                    found_route = true;
                }
                _ => unexpected.push((
                    format!("unexpected sluice route{flag} in table {table}"),
                    Unexpected::Route(route),
                )),
            }
        }
        if let Some((mark, table)) = want {
            if !found_rule {
                drift.push(format!(
                    "ip{flag} rule fwmark {mark} lookup {table} is missing"
                ));
            }
            if !found_route {
                drift.push(format!(
                    "ip{flag} route local default dev lo table {table} is missing"
                ));
            }
        }
    }
    Ok(Survey {
        missing: drift,
        unexpected,
    })
}

/// Removes what [`survey`] found of ours that the plan does not have.
pub(super) async fn remove_unexpected(handle: &Handle, s: &DeviceSetup) -> Result<(), DeviceError> {
    for (what, item) in survey(handle, s).await?.unexpected {
        let done = match item {
            Unexpected::Rule(m) => step(&what, handle.rule().del(m).execute()).await,
            Unexpected::Route(m) => step(&what, handle.route().del(m).execute()).await,
            Unexpected::Address(m) => step(&what, handle.address().del(m).execute()).await,
        };
        done?;
        tracing::info!(removed = %what, "device state not in the plan removed");
    }
    Ok(())
}
