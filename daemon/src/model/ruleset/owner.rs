//! Who a pod's table belongs to, and the attachments counted against its capture: written into
//! the table itself so the kernel, not the agent's memory, is the record.
//!
//! Stored as comments of rules in the table's `owner` chain (a regular chain nothing jumps to,
//! so its rules never see a packet). Rule comments are the one place for metadata that every
//! kernel sluice supports keeps and returns (rule userdata: Linux 3.15; table comments need
//! 5.13), and that the node's own `nft` prints and loads back. Each comment is one line:
//!
//! ```text
//! sluice/v2 fp=<plan fingerprint> pod=<pod uid> at=<unix time of the install> [lo=::6]
//! sluice/v2 id=<full container id>
//! sluice/v2 if=<CNI_IFNAME> net=<CNI network name> ip=<4|6|4,6|->    (one per attachment)
//! ```
//!
//! Releases before this one wrote a table comment (`sluice/v1 fp=… pod=… cid=<12> if=a,b`)
//! and a userdata TLV beside it (`id=… at=…`); [`Owner::from_v1`] reads them, so their pods
//! keep working.

use crate::model::plan::Families;

/// The first word of every owner comment this release writes.
const TAG_V2: &str = "sluice/v2";
/// The first word of the table comment of earlier releases.
const TAG_V1: &str = "sluice/v1";

/// Longest comment written: `nft` refuses longer comments in its input, and a table whose
/// `nft list ruleset` output cannot be loaded back would surprise an operator.
pub const MAX_COMMENT: usize = 128;

/// Most attachments counted on one capture. A pod on more networks than this (Multus) keeps
/// its capture until the last counted one goes; the others are not counted (logged).
pub const MAX_ATTACHMENTS: usize = 16;

/// Longest CNI network name recorded (see [`sluice_proto::network_name`]).
const MAX_NETWORK: usize = sluice_proto::MAX_NETWORK_NAME;

/// One attachment of the pod counted against the capture.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attached {
    /// CNI_IFNAME.
    pub ifname: String,
    /// The CNI network (conflist `name`) it was made through; empty when unknown (tables
    /// written before this was recorded). GC of a network touches only its own attachments.
    pub network: String,
    /// The families of this attachment's addresses (none when it had none). The pod's capture
    /// covers the union over its attachments, so a secondary network never takes a family
    /// away from what the primary brought.
    pub families: Families,
}

impl Attached {
    pub fn new(ifname: &str, network: &str, families: Families) -> Self {
        Attached {
            ifname: ifname.to_owned(),
            network: sluice_proto::network_name(network),
            families,
        }
    }

    /// Whether `ifname` can be recorded: an interface name (at most 15 bytes; none of the
    /// characters the kernel refuses in one, nor `,` `"` `=`, which the comment uses).
    fn valid(ifname: &str) -> bool {
        !ifname.is_empty()
            && ifname.len() < 16
            && !ifname.contains(|c: char| {
                c.is_whitespace() || c.is_control() || matches!(c, '=' | ',' | '"' | ':' | '/')
            })
    }

    fn to_comment(&self) -> String {
        format!(
            "{TAG_V2} if={} net={} ip={}",
            self.ifname,
            self.network,
            self.families.to_word()
        )
    }
}

/// Metadata of a pod's table so ownership can be read back from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// Plan fingerprint.
    pub fingerprint: String,
    /// Pod UID (may be empty when the runtime gave none).
    pub pod_uid: String,
    /// The container (sandbox) id, so the agent can match a table to the runtime's sandbox
    /// after a restart. Tables of releases before `sluice/v2` whose full id was not kept
    /// carry its first 12 characters only.
    pub container_id: String,
    /// Unix time (seconds) of the ADD that installed or last re-installed the capture; 0 when
    /// unknown.
    pub attached_at: u64,
    /// The attachments counted against the capture, in the order their ADDs came: a pod on
    /// several networks keeps its capture until the DEL of the last of them. Empty when
    /// unknown (tables of old releases): any DEL removes such a table.
    pub attachments: Vec<Attached>,
    /// The address sluice added to `lo` (Istio's `::6` passthrough source), when it was not
    /// there before: removed with the capture, and never when something else added it.
    pub lo_address: Option<std::net::Ipv6Addr>,
}

/// Keeps a runtime value parseable in a comment (no spaces, `=` or quotes) and bounded.
fn clean(s: &str, max: usize) -> String {
    s.chars()
        .filter(|c| !c.is_whitespace() && !c.is_control() && *c != '=' && *c != '"')
        .take(max)
        .collect()
}

impl Owner {
    pub fn new(fingerprint: &str, pod_uid: &str, container_id: &str) -> Self {
        // The runtime's values are input: a Kubernetes UID is 36 characters, a container id
        // 64 (the comment has room for 100).
        Self {
            fingerprint: clean(fingerprint, 16),
            pod_uid: clean(pod_uid, 36),
            container_id: clean(container_id, 100),
            attached_at: 0,
            attachments: Vec::new(),
            lo_address: None,
        }
    }

    /// The same owner, attached at `unix` seconds.
    pub fn at(mut self, unix: u64) -> Self {
        self.attached_at = unix;
        self
    }

    /// The same owner, counting `a` alone.
    pub fn on(mut self, a: Attached) -> Self {
        self.attachments.clear();
        self.attach(a);
        self
    }

    /// The short container id `docker ps` shows (what tables of earlier releases kept).
    pub fn container(&self) -> &str {
        let end = self
            .container_id
            .char_indices()
            .nth(12)
            .map_or(self.container_id.len(), |(i, _)| i);
        &self.container_id[..end]
    }

    /// Counts `a` among the attachments, replacing what was recorded for its interface.
    /// `false` when it cannot be recorded: not an interface name, or [`MAX_ATTACHMENTS`]
    /// already counted.
    pub fn attach(&mut self, a: Attached) -> bool {
        if let Some(have) = self.attachments.iter_mut().find(|h| h.ifname == a.ifname) {
            *have = a;
            return true;
        }
        if !Attached::valid(&a.ifname) || self.attachments.len() >= MAX_ATTACHMENTS {
            return false;
        }
        self.attachments.push(a);
        true
    }

    /// Stops counting `ifname`; `true` if it was counted.
    pub fn detach(&mut self, ifname: &str) -> bool {
        let before = self.attachments.len();
        self.attachments.retain(|a| a.ifname != ifname);
        self.attachments.len() < before
    }

    pub fn ifnames(&self) -> Vec<String> {
        self.attachments.iter().map(|a| a.ifname.clone()).collect()
    }

    /// The families the pod's attachments brought (none when none had an address).
    pub fn families(&self) -> Families {
        self.attachments
            .iter()
            .fold(Families::NONE, |f, a| f.union(a.families))
    }

    /// The owner as the comments of the `owner` chain's rules, each at most [`MAX_COMMENT`]
    /// bytes.
    pub fn to_comments(&self) -> Vec<String> {
        let mut first = format!(
            "{TAG_V2} fp={} pod={} at={}",
            self.fingerprint, self.pod_uid, self.attached_at
        );
        if let Some(a) = self.lo_address {
            first += &format!(" lo={a}");
        }
        let mut out = vec![first];
        if !self.container_id.is_empty() {
            out.push(format!("{TAG_V2} id={}", self.container_id));
        }
        out.extend(self.attachments.iter().map(Attached::to_comment));
        out
    }

    /// Reads what [`Owner::to_comments`] wrote; `None` when no comment is sluice's. Unknown
    /// words and lines are ignored, so a later release may add some.
    pub fn from_comments<S: AsRef<str>>(comments: &[S]) -> Option<Self> {
        let mut owner: Option<Owner> = None;
        for comment in comments {
            let mut words = comment.as_ref().split(' ');
            if words.next() != Some(TAG_V2) {
                continue;
            }
            let o = owner.get_or_insert_with(|| Owner::new("", "", ""));
            let pairs: Vec<(&str, &str)> = words.filter_map(|w| w.split_once('=')).collect();
            let get = |k: &str| pairs.iter().find(|(key, _)| *key == k).map(|(_, v)| *v);
            if let Some(ifname) = get("if") {
                let families = get("ip")
                    .and_then(Families::from_word)
                    .unwrap_or(Families::NONE);
                o.attach(Attached {
                    ifname: ifname.to_owned(),
                    network: clean(get("net").unwrap_or_default(), MAX_NETWORK),
                    families,
                });
                continue;
            }
            for (k, v) in &pairs {
                match *k {
                    "fp" => o.fingerprint = clean(v, 16),
                    "pod" => o.pod_uid = clean(v, 36),
                    "at" => o.attached_at = v.parse().unwrap_or(0),
                    "id" => o.container_id = clean(v, 100),
                    "lo" => o.lo_address = v.parse().ok(),
                    _ => {}
                }
            }
        }
        owner
    }

    /// Reads the table comment of releases before `sluice/v2` (`sluice/v1 fp=… pod=… cid=…
    /// if=a,b`) and the state kept beside it (`id=… at=…`). Their attachments' network and
    /// families were not recorded: the network is unknown, and each is given `families`
    /// (what the table captures).
    pub fn from_v1(comment: &str, state: Option<&str>, families: Families) -> Option<Self> {
        let mut words = comment.split(' ');
        if words.next()? != TAG_V1 {
            return None;
        }
        let mut owner = Owner::new("", "", "");
        for word in words {
            let (k, v) = word.split_once('=')?;
            match k {
                "fp" => owner.fingerprint = clean(v, 16),
                "pod" => owner.pod_uid = clean(v, 36),
                "cid" => owner.container_id = clean(v, 100),
                "if" => {
                    for ifname in v.split(',').filter(|i| !i.is_empty()) {
                        owner.attach(Attached {
                            ifname: ifname.to_owned(),
                            network: String::new(),
                            families,
                        });
                    }
                }
                _ => {}
            }
        }
        for (k, v) in state
            .unwrap_or_default()
            .split(' ')
            .filter_map(|w| w.split_once('='))
        {
            match k {
                "id" => owner.container_id = clean(v, 100),
                "at" => owner.attached_at = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        Some(owner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eth0() -> Attached {
        Attached::new("eth0", "net-a", Families::DUAL)
    }

    #[test]
    fn the_owner_round_trips_through_its_comments() {
        let uid = "0123456789abcdef0123456789abcdef0123";
        let id = "c0ffee0123456789c0ffee0123456789c0ffee0123456789c0ffee0123456789";
        let mut o = Owner::new("0123456789abcdef", uid, id)
            .on(eth0())
            .at(1_763_797_200);
        o.lo_address = Some("::6".parse().expect("v6"));
        assert!(o.attach(Attached::new("net1", "macvlan-conf", Families::IPV6)));
        assert!(o.attach(eth0()), "a repeat is counted once");
        assert_eq!(o.ifnames(), ["eth0", "net1"]);
        let comments = o.to_comments();
        assert!(
            comments.iter().all(|c| c.len() <= MAX_COMMENT),
            "{comments:?}"
        );
        assert_eq!(Owner::from_comments(&comments), Some(o.clone()));
        assert_eq!(o.container(), "c0ffee012345");
        assert_eq!(o.families(), Families::DUAL);
        assert!(o.detach("eth0") && !o.detach("eth0"));
        assert_eq!(o.families(), Families::IPV6);
        assert_eq!(Owner::from_comments(&["not ours", "sluice/v1 fp=x"]), None);
    }

    #[test]
    fn hostile_values_stay_bounded_and_parseable() {
        let long = "x".repeat(300);
        let mut o = Owner::new(&long, &format!("a b=\"{long}"), &long).at(u64::MAX);
        assert!(o.attach(Attached::new(
            "eth0",
            &format!("n et\"{long}"),
            Families::IPV4
        )));
        for bad in [
            "",
            "a b",
            "a=b",
            "a,b",
            "sixteen-bytes-xx",
            "q\"",
            "a:b",
            "a/b",
        ] {
            assert!(
                !o.attach(Attached::new(bad, "n", Families::IPV4)),
                "{bad:?}"
            );
        }
        let mut n = 1;
        while o.attach(Attached::new(&format!("net{n}"), &long, Families::IPV4)) {
            n += 1;
        }
        assert_eq!(o.attachments.len(), MAX_ATTACHMENTS);
        let comments = o.to_comments();
        assert!(
            comments.iter().all(|c| c.len() <= MAX_COMMENT),
            "{comments:?}"
        );
        assert_eq!(Owner::from_comments(&comments), Some(o));
    }

    #[test]
    fn tables_of_earlier_releases_are_read() {
        let o = Owner::from_v1(
            "sluice/v1 fp=917ca839f05522bd pod=uid-1 cid=upgrade-redi if=eth0,net1",
            Some("id=upgrade-redirect at=1763797200"),
            Families::IPV4,
        )
        .expect("parses");
        assert_eq!(o.fingerprint, "917ca839f05522bd");
        assert_eq!(o.container_id, "upgrade-redirect");
        assert_eq!(o.attached_at, 1_763_797_200);
        assert_eq!(o.ifnames(), ["eth0", "net1"]);
        assert_eq!(o.attachments[0].network, "");
        assert_eq!(o.families(), Families::IPV4);
        // Without the state TLV (kernels before 5.13 kept none; `nft -f` loses it).
        let o = Owner::from_v1("sluice/v1 fp=a pod= cid=b", None, Families::DUAL).expect("v1");
        assert_eq!((o.container(), o.attachments.len()), ("b", 0));
        assert_eq!(Owner::from_v1("sluice/v2 fp=a", None, Families::DUAL), None);
    }
}
