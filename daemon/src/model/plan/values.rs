//! The value grammar every profile's annotations share: ports and port ranges, CIDRs, ids,
//! interface names, sysctls, switches, and comma-separated lists of them, each bounded; and
//! the error that names the annotation and quotes a bounded excerpt of its value.

use std::collections::BTreeMap;
use std::str::FromStr;

use ipnet::IpNet;

use super::{Families, PlanError};

/// Longest excerpt of an annotation value an error quotes (annotations may be 256 KiB).
const MAX_EXCERPT: usize = 120;

pub(super) fn invalid(annotation: &str, value: &str, reason: impl Into<String>) -> PlanError {
    let mut excerpt = value.to_owned();
    if excerpt.len() > MAX_EXCERPT {
        let mut cut = MAX_EXCERPT;
        while !excerpt.is_char_boundary(cut) {
            cut -= 1;
        }
        excerpt.truncate(cut);
        excerpt.push('…');
    }
    PlanError {
        annotation: annotation.to_owned(),
        value: excerpt,
        reason: reason.into(),
    }
}

/// Longest value of an annotation sluice reads. 1,024 ports or CIDRs fit several times over;
/// anything longer is refused before it is parsed, so parsing work is bounded by it.
pub const MAX_VALUE_LEN: usize = 16 * 1024;

/// Parses one annotation if present, attaching the key and value to any error.
pub(super) fn get<T>(
    ann: &BTreeMap<String, String>,
    key: &str,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<Option<T>, PlanError> {
    ann.get(key)
        .map(|v| {
            if v.len() > MAX_VALUE_LEN {
                return Err(invalid(
                    key,
                    v,
                    format!(
                        "{} bytes, longer than the {MAX_VALUE_LEN} an annotation may be",
                        v.len()
                    ),
                ));
            }
            parse(v).map_err(|reason| invalid(key, v, reason))
        })
        .transpose()
}

/// `redirect` (false) or `tproxy` (true).
pub(super) fn mode(s: &str) -> Result<bool, String> {
    match s.trim() {
        "redirect" => Ok(false),
        "tproxy" => Ok(true),
        other => Err(format!("{other:?}: expected redirect or tproxy")),
    }
}

/// `ipv4`, `ipv6` or `dual`.
pub(super) fn families(s: &str) -> Result<Families, String> {
    match s.trim() {
        "ipv4" => Ok(Families::IPV4),
        "ipv6" => Ok(Families::IPV6),
        "dual" => Ok(Families::DUAL),
        other => Err(format!("{other:?}: expected ipv4, ipv6 or dual")),
    }
}

/// A packet mark: non-zero (0 is "unmarked") and below u32::MAX, since `mark + 1` marks the
/// proxy's own connections over `lo`.
pub(super) fn tproxy_mark(s: &str) -> Result<u32, String> {
    let s = s.trim();
    let n = if let Some(hex) = s.strip_prefix("0x") {
        u32::from_str_radix(hex, 16).ok()
    } else {
        s.parse::<u32>().ok()
    };
    n.filter(|n| *n != 0 && *n != u32::MAX)
        .ok_or_else(|| format!("{s:?} is not a mark (1 to 4294967294, decimal or 0x hex)"))
}

/// A routing table id other than the kernel's own (0 unspec, 253 default, 254 main,
/// 255 local): the TPROXY local route must not land in a table the node uses.
pub(super) fn route_table(s: &str) -> Result<u32, String> {
    let s = s.trim();
    s.parse::<u32>()
        .ok()
        .filter(|n| !matches!(n, 0 | 253..=255))
        .ok_or_else(|| format!("{s:?} is not a usable routing table (1-4294967295 except 253-255)"))
}

/// `enabled` or `disabled`.
pub(super) fn switch(s: &str) -> Result<bool, String> {
    match s.trim() {
        "enabled" => Ok(true),
        "disabled" => Ok(false),
        other => Err(format!("{other:?}: expected enabled or disabled")),
    }
}

pub(super) fn port(s: &str) -> Result<u16, String> {
    match u16::from_str(s.trim()) {
        Ok(0) | Err(_) => Err(format!("{:?} is not a port (1-65535)", s.trim())),
        Ok(p) => Ok(p),
    }
}

/// Largest `a-b` port range expanded into single ports (Linkerd allows ranges).
const MAX_RANGE: u16 = 256;

/// A port or an inclusive range `a-b` (at most [`MAX_RANGE`] ports), as its bounds.
pub(super) fn port_range(s: &str) -> Result<(u16, u16), String> {
    match s.trim().split_once('-') {
        None => port(s).map(|p| (p, p)),
        Some((a, b)) => {
            let (a, b) = (port(a)?, port(b)?);
            if a > b || b - a >= MAX_RANGE {
                return Err(format!(
                    "{:?} is not a range of at most {MAX_RANGE} ports",
                    s.trim()
                ));
            }
            Ok((a, b))
        }
    }
}

/// A list of ports and ranges, expanded in order with repeats dropped. Expansion stops as soon
/// as the list passes [`MAX_LIST_ITEMS`] ports, so memory stays bounded whatever the input.
pub(super) fn port_ranges(s: &str) -> Result<Vec<u16>, String> {
    let mut seen = vec![false; usize::from(u16::MAX) + 1];
    let mut out = Vec::new();
    for (a, b) in list(s, port_range)? {
        for p in a..=b {
            if !std::mem::replace(&mut seen[usize::from(p)], true) {
                out.push(p);
                if out.len() > MAX_LIST_ITEMS {
                    return Err(format!(
                        "more than the {MAX_LIST_ITEMS} ports a list may hold once ranges are expanded"
                    ));
                }
            }
        }
    }
    Ok(out)
}

pub(super) fn id(s: &str) -> Result<u32, String> {
    u32::from_str(s.trim()).map_err(|_| format!("{:?} is not a numeric id", s.trim()))
}

pub(super) fn cidr(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    let net = IpNet::from_str(s)
        .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{s:?} is not a CIDR"))?;
    Ok(net.trunc())
}

/// A Linux interface name (at most 15 bytes, no `/`, whitespace or NUL).
pub(super) fn interface(s: &str) -> Result<String, String> {
    let s = s.trim();
    let ok = !s.is_empty()
        && s.len() < 16
        && s != "."
        && s != ".."
        && !s
            .bytes()
            .any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace());
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!("{s:?} is not an interface name"))
    }
}

/// Most items one list annotation may hold (ports after expanding ranges, CIDRs, names).
/// Each item becomes a rule per captured family, so this bounds a plan before anything is
/// rendered; [`super::MAX_RULES`] bounds the sum over all lists.
pub const MAX_LIST_ITEMS: usize = 1024;

/// Drops repeated items (keeping the first), then refuses a list longer than
/// [`MAX_LIST_ITEMS`]: `80,80` is one rule, not two.
pub(super) fn deduplicated<T: PartialEq>(mut items: Vec<T>) -> Result<Vec<T>, String> {
    let mut seen = 0;
    for i in 0..items.len() {
        if !items[..seen].contains(&items[i]) {
            items.swap(seen, i);
            seen += 1;
        }
    }
    items.truncate(seen);
    if items.len() > MAX_LIST_ITEMS {
        Err(format!(
            "{} items, more than the {MAX_LIST_ITEMS} a list may hold",
            items.len()
        ))
    } else {
        Ok(items)
    }
}

/// A comma-separated list. The empty string is the empty list; an empty item (`80,,90`,
/// `80,`) is an error because it is almost always a templating mistake.
pub(super) fn list<T: PartialEq>(
    s: &str,
    item: impl Fn(&str) -> Result<T, String>,
) -> Result<Vec<T>, String> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    let count = s.split(',').count();
    if count > MAX_LIST_ITEMS {
        return Err(format!(
            "{count} items, more than the {MAX_LIST_ITEMS} a list may hold"
        ));
    }
    let items = s
        .split(',')
        .map(|part| {
            if part.trim().is_empty() {
                Err("empty list item".to_owned())
            } else {
                item(part)
            }
        })
        .collect::<Result<Vec<T>, String>>()?;
    deduplicated(items)
}

/// `*` (everything, `None`) or a list (`Some`, possibly empty: nothing).
pub(super) fn star_or<T: PartialEq>(
    s: &str,
    item: impl Fn(&str) -> Result<T, String>,
) -> Result<Option<Vec<T>>, String> {
    if s.trim() == "*" {
        Ok(None)
    } else {
        list(s, item).map(Some)
    }
}
