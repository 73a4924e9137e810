//! Per-pod device setup through rtnetlink: `lo` up, the IPv6 passthrough address, TPROXY's
//! policy routing, sysctls. Runs on a netns worker thread, so the rtnetlink connection is
//! opened after entering the pod's namespace and belongs to it.
//!
//! Every rule, route and address sluice adds carries the protocol number [`PROTO`], so Detach
//! finds and removes exactly ours, even after an agent restart with no memory of the plan.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressProtocol};
use netlink_packet_route::route::{RouteProtocol, RouteScope, RouteType};
use netlink_packet_route::rule::{RuleAction, RuleAttribute};
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};
use tokio_stream::StreamExt;

use crate::model::plan::{CaptureMode, Loopback, RedirectPlan};

mod survey;
mod sysctl;

pub use survey::inspect;
use survey::remove_unexpected;
pub use sysctl::{DEFAULT_SYSCTL_DIR, restore_sysctls, use_sysctl_dir, write_sysctls};

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("building the netlink runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("opening an rtnetlink connection: {0}")]
    Connect(#[source] std::io::Error),
    #[error("{what}: {source}")]
    Netlink {
        what: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("reading lo: the kernel listed no device with index {LOOPBACK_INDEX}")]
    NoLoopback,
    #[error("{what}: the kernel did not answer within {timeout:?}")]
    Timeout { what: String, timeout: Duration },
    #[error("sysctl {name}: {source}")]
    Sysctl {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// The loopback device's index, fixed by the kernel in every namespace.
const LOOPBACK_INDEX: u32 = 1;

/// The routing protocol number on sluice's rules, routes and addresses (`ip rule show` prints
/// `proto 83`). Unassigned in iproute2's rt_protos list.
pub const PROTO: u8 = 83;

/// Priority of the TPROXY policy rule: the one the kernel gives `ip rule add` without a
/// priority in a fresh namespace (what Istio's init ends up with), made explicit so re-adding
/// finds the same rule.
pub const TPROXY_RULE_PRIORITY: u32 = 32765;

/// What the device steps of a plan are (a pure value; `sluicectl explain` prints it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSetup {
    /// Add this address to `lo` (Istio's `::6` IPv6 passthrough source).
    pub lo_address6: Option<Ipv6Addr>,
    /// TPROXY policy routing `(mark, table)`, per captured family.
    pub tproxy: Option<(u32, u32)>,
    pub ipv4: bool,
    pub ipv6: bool,
    pub sysctls: Vec<(String, String)>,
    /// The `lo` address sluice owns in this namespace, from the table's owner (it added it:
    /// it was not there before). Removed with the capture, and only then; `None` when the
    /// address was already there (the runtime's, a mesh init container's) or is not planned.
    /// Ownership is recorded in the table, not read from the address: the address protocol
    /// tag (`IFA_PROTO`) that would say it needs Linux 6.1.
    pub owned_lo: Option<Ipv6Addr>,
}

impl DeviceSetup {
    pub fn from_plan(plan: &RedirectPlan) -> Self {
        DeviceSetup {
            lo_address6: match plan.loopback {
                Loopback::Istio {
                    passthrough_source6,
                    ..
                }
                | Loopback::Kuma {
                    passthrough_source6,
                    ..
                } if plan.families.ipv6 => Some(passthrough_source6),
                _ => None,
            },
            tproxy: match plan.mode {
                CaptureMode::Tproxy { mark, table } => Some((mark, table)),
                CaptureMode::Redirect => None,
            },
            ipv4: plan.families.ipv4,
            ipv6: plan.families.ipv6,
            sysctls: plan.sysctls.clone(),
            owned_lo: None,
        }
    }

    /// The same steps, with sluice owning `owned` on `lo` (see [`DeviceSetup::owned_lo`]).
    pub fn owning(mut self, owned: Option<Ipv6Addr>) -> Self {
        self.owned_lo = owned;
        self
    }

    fn families(&self) -> impl Iterator<Item = (IpVersion, &'static str)> {
        [
            (self.ipv4, IpVersion::V4, ""),
            (self.ipv6, IpVersion::V6, " -6"),
        ]
        .into_iter()
        .filter(|(on, ..)| *on)
        .map(|(_, v, flag)| (v, flag))
    }

    /// The steps as `ip`/`sysctl` commands, one per line.
    pub fn describe(&self) -> String {
        let mut out = String::from("ip link set lo up\n");
        if let Some(a) = self.lo_address6 {
            out += &format!("ip -6 addr add {a}/128 dev lo nodad proto {PROTO}\n");
        }
        if let Some((mark, table)) = self.tproxy {
            for (_, flag) in self.families() {
                out += &format!(
                    "ip{flag} rule add fwmark {mark} lookup {table} pref {TPROXY_RULE_PRIORITY} proto {PROTO}\n"
                );
                let any = if flag.is_empty() { "0.0.0.0/0" } else { "::/0" };
                out +=
                    &format!("ip{flag} route add local {any} dev lo table {table} proto {PROTO}\n");
            }
        }
        for (name, value) in &self.sysctls {
            out += &format!("sysctl -w {name}={value}\n");
        }
        out
    }
}

thread_local! {
    /// The rtnetlink runtime of a netns worker thread, built on its first device step and kept
    /// for the thread's life: building one per attach (an epoll instance, an eventfd, timer
    /// state) cost more than the request it carried. It is namespace-neutral: only the netlink
    /// connection, opened per call after the thread entered the pod's namespace, belongs to one.
    static RUNTIME: std::cell::RefCell<Option<tokio::runtime::Runtime>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `f` with an rtnetlink handle of the calling thread's namespace, on the thread's own
/// long-lived runtime.
fn with_handle<T>(f: impl AsyncFnOnce(Handle) -> Result<T, DeviceError>) -> Result<T, DeviceError> {
    RUNTIME.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.is_none() {
            *cell = Some(
                tokio::runtime::Builder::new_current_thread()
                    .enable_io()
                    .enable_time()
                    // One netlink socket at a time: no need for room for 1,024 events.
                    .max_io_events_per_tick(8)
                    .build()
                    .map_err(DeviceError::Runtime)?,
            );
        }
        let Some(runtime) = cell.as_ref() else {
            unreachable!("the runtime was just built")
        };
        runtime.block_on(async {
            let (connection, handle, _) =
                rtnetlink::new_connection().map_err(DeviceError::Connect)?;
            let task = tokio::spawn(connection);
            let result = f(handle).await;
            task.abort();
            result
        })
    })
}

/// Runs one rtnetlink request with a deadline; an error names the step.
async fn step<T>(
    what: impl Into<String>,
    request: impl Future<Output = Result<T, rtnetlink::Error>>,
) -> Result<T, DeviceError> {
    let what = what.into();
    // The kernel answers rtnetlink synchronously; no answer within the step's bound (see
    // `netns::step_timeout`) means none is coming, and the worker must not be held forever.
    let limit = crate::kernel::netns::step_timeout();
    match tokio::time::timeout(limit, request).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(DeviceError::Netlink { what, source }),
        Err(_) => Err(DeviceError::Timeout {
            what,
            timeout: limit,
        }),
    }
}

/// Adding something that is already there (a re-ADD) is success.
fn exists_ok(r: Result<(), rtnetlink::Error>) -> Result<(), rtnetlink::Error> {
    match r {
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
        other => other,
    }
}

/// How [`setup`] treats device state already in the namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setup {
    /// A fresh pod: add; on failure remove what was added.
    Fresh,
    /// Same plan as what is there (a repeated ADD): add what is missing, remove nothing, not
    /// even on failure, so the capture already in place stays as it was.
    Repair,
    /// A different plan: clear sluice's rules, routes and addresses first, so a changed mark
    /// or table leaves nothing stale; on failure remove what was added.
    Replace,
}

/// Applies the netlink steps (everything but sysctls), as `mode` says.
pub fn setup(s: &DeviceSetup, mode: Setup) -> Result<(), DeviceError> {
    with_handle(async |handle| {
        if mode == Setup::Replace {
            remove_ours(&handle, None).await?;
        }
        let result = async {
            step(
                "setting lo up",
                handle
                    .link()
                    .set(
                        rtnetlink::LinkUnspec::new_with_index(LOOPBACK_INDEX)
                            .up()
                            .build(),
                    )
                    .execute(),
            )
            .await?;
            add_ours(&handle, s).await?;
            // A repair makes the namespace equal the plan: what is ours but not in the plan
            // (a rule someone added with our protocol, a stale route) goes too.
            if mode == Setup::Repair {
                remove_unexpected(&handle, s).await?;
            }
            Ok(())
        }
        .await;
        if result.is_err()
            && mode != Setup::Repair
            && let Err(e) = remove_ours(&handle, s.owned_lo).await
        {
            tracing::error!(error = %e, "removing device setup after a failed step also failed");
        }
        result
    })
}

/// Whether IPv6 is usable on `lo`, from its link message: the kernel has IPv6 (the link
/// carries AF_INET6's attributes) and the namespace has not disabled it (devconf
/// `disable_ipv6`). When it is not, the IPv6 device steps are skipped (the family was only
/// guessed, e.g. for a pod with no addresses in prevResult; there is no IPv6 traffic to
/// capture).
///
/// Read through rtnetlink, never `/proc/sys/net/ipv6/conf/lo/disable_ipv6`: every namespace
/// in which that path was ever looked up keeps its own dentries for it under the same parents
/// and names, and the kernel compares them one by one, so with 1,500 namespaces the first
/// lookup in a new pod took ~440 µs (20 µs on an empty node), the whole of the benchmark's
/// slowdown with 1,000 pods attached.
fn ipv6_enabled(lo: &netlink_packet_route::link::LinkMessage) -> bool {
    use netlink_packet_route::link::{AfSpecInet6, AfSpecUnspec, LinkAttribute};
    lo.attributes
        .iter()
        .filter_map(|a| match a {
            LinkAttribute::AfSpecUnspec(specs) => Some(specs),
            _ => None,
        })
        .flatten()
        .filter_map(|spec| match spec {
            AfSpecUnspec::Inet6(inet6) => Some(inet6),
            _ => None,
        })
        .flatten()
        .any(|nla| matches!(nla, AfSpecInet6::DevConf(conf) if conf.disable_ipv6 == 0))
}

/// `lo`'s link message (flags and per-family configuration).
async fn read_lo(handle: &Handle) -> Result<netlink_packet_route::link::LinkMessage, DeviceError> {
    let links: Vec<_> = step(
        "reading lo",
        handle
            .link()
            .get()
            .match_index(LOOPBACK_INDEX)
            .execute()
            .collect::<Result<Vec<_>, _>>(),
    )
    .await?;
    links.into_iter().next().ok_or(DeviceError::NoLoopback)
}

/// Whether the setup has any IPv6 step, so that the IPv6 state of `lo` must be read first.
fn has_ipv6_steps(s: &DeviceSetup) -> bool {
    s.lo_address6.is_some() || (s.ipv6 && s.tproxy.is_some())
}

async fn add_ours(handle: &Handle, s: &DeviceSetup) -> Result<(), DeviceError> {
    let ipv6 = has_ipv6_steps(s) && ipv6_enabled(&read_lo(handle).await?);
    if !ipv6 && s.ipv6 {
        tracing::debug!("IPv6 is disabled in the pod's netns; skipping the IPv6 device steps");
    }
    if let Some(addr) = s.lo_address6.filter(|_| ipv6) {
        let mut req = handle.address().add(LOOPBACK_INDEX, IpAddr::V6(addr), 128);
        let msg = req.message_mut();
        msg.attributes
            .push(AddressAttribute::Protocol(AddressProtocol::Other(PROTO)));
        msg.attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
        step(format!("adding {addr}/128 to lo"), async {
            exists_ok(req.execute().await)
        })
        .await?;
    }
    let Some((mark, table)) = s.tproxy else {
        return Ok(());
    };
    for (version, _) in s
        .families()
        .filter(|(v, _)| ipv6 || !matches!(v, IpVersion::V6))
    {
        // `local default dev lo table T`, built per family (the builder is typed by it).
        macro_rules! local_default {
            ($addr:ty) => {
                RouteMessageBuilder::<$addr>::new()
                    .destination_prefix(<$addr>::UNSPECIFIED, 0)
                    .table_id(table)
                    .kind(RouteType::Local)
                    .scope(RouteScope::Host)
                    .protocol(RouteProtocol::Other(PROTO))
                    .output_interface(LOOPBACK_INDEX)
                    .build()
            };
        }
        let (family, route) = match version {
            IpVersion::V4 => (AddressFamily::Inet, local_default!(Ipv4Addr)),
            IpVersion::V6 => (AddressFamily::Inet6, local_default!(Ipv6Addr)),
        };
        let mut rule = handle
            .rule()
            .add()
            .fw_mark(mark)
            .table_id(table)
            .priority(TPROXY_RULE_PRIORITY)
            .action(RuleAction::ToTable);
        let msg = rule.message_mut();
        msg.header.family = family;
        msg.attributes
            .push(RuleAttribute::Protocol(RouteProtocol::Other(PROTO)));
        step(
            format!("adding {version:?} rule fwmark {mark} lookup {table}"),
            async { exists_ok(rule.execute().await) },
        )
        .await?;
        step(
            format!("adding {version:?} local default route to table {table}"),
            async { exists_ok(handle.route().add(route).execute().await) },
        )
        .await?;
    }
    Ok(())
}

/// Removes every rule, route and `lo` address tagged with [`PROTO`], and `owned` on `lo` (an
/// address sluice added on a kernel that keeps no tag). `Ok(true)` if any was.
async fn remove_ours(handle: &Handle, owned: Option<Ipv6Addr>) -> Result<bool, DeviceError> {
    let proto = RouteProtocol::Other(PROTO);
    let mut removed = false;
    for version in [IpVersion::V4, IpVersion::V6] {
        let rules: Vec<_> = step(
            "listing rules",
            handle
                .rule()
                .get(version.clone())
                .execute()
                .collect::<Result<Vec<_>, _>>(),
        )
        .await?;
        for rule in rules {
            if rule.attributes.contains(&RuleAttribute::Protocol(proto)) {
                step("deleting a sluice rule", handle.rule().del(rule).execute()).await?;
                removed = true;
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
        for route in routes {
            if route.header.protocol == proto {
                step(
                    "deleting a sluice route",
                    handle.route().del(route).execute(),
                )
                .await?;
                removed = true;
            }
        }
    }
    let addresses = lo_addresses(handle).await?;
    for address in addresses {
        let ours = address
            .attributes
            .contains(&AddressAttribute::Protocol(AddressProtocol::Other(PROTO)))
            || (owned.is_some() && address_ip(&address) == owned.map(IpAddr::V6));
        if ours {
            step(
                "deleting a sluice lo address",
                handle.address().del(address).execute(),
            )
            .await?;
            removed = true;
        }
    }
    Ok(removed)
}

/// Removes sluice's rules, routes and addresses from the calling thread's namespace (Detach,
/// rollback), and `owned` on `lo` (see [`DeviceSetup::owned_lo`]). `Ok(true)` if there were any.
pub fn teardown(owned: Option<Ipv6Addr>) -> Result<bool, DeviceError> {
    with_handle(async |handle| remove_ours(&handle, owned).await)
}

/// Removes `addr` from `lo` if it is there: an address sluice added that its plan no longer has.
pub fn release(addr: Ipv6Addr) -> Result<(), DeviceError> {
    with_handle(async |handle| {
        let addresses = lo_addresses(&handle).await?;
        for a in addresses {
            if address_ip(&a) == Some(IpAddr::V6(addr)) {
                step(
                    format!("removing {addr} from lo"),
                    handle.address().del(a).execute(),
                )
                .await?;
            }
        }
        Ok(())
    })
}

/// `lo`'s addresses.
pub(super) async fn lo_addresses(
    handle: &Handle,
) -> Result<Vec<netlink_packet_route::address::AddressMessage>, DeviceError> {
    step(
        "listing lo addresses",
        handle
            .address()
            .get()
            .set_link_index_filter(LOOPBACK_INDEX)
            .execute()
            .collect::<Result<Vec<_>, _>>(),
    )
    .await
}

/// The address of an address message.
pub(super) fn address_ip(a: &netlink_packet_route::address::AddressMessage) -> Option<IpAddr> {
    a.attributes.iter().find_map(|attr| match attr {
        AddressAttribute::Address(ip) => Some(*ip),
        _ => None,
    })
}

/// Whether `addr` is on `lo` now: `None` when IPv6 is off there (sluice adds no IPv6 address
/// then). Read before an attach that plans the address, so the owner records whether sluice
/// adds it.
pub fn lo_has(addr: Ipv6Addr) -> Result<Option<bool>, DeviceError> {
    with_handle(async |handle| {
        if !ipv6_enabled(&read_lo(&handle).await?) {
            return Ok(None);
        }
        let addresses = lo_addresses(&handle).await?;
        Ok(Some(
            addresses
                .iter()
                .any(|a| address_ip(a) == Some(IpAddr::V6(addr))),
        ))
    })
}
