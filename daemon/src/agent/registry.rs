//! The attachments this agent has made, keyed by (container id, interface): a pod attached
//! on several networks (Multus chaining sluice into more than one) has one record per
//! interface. In memory: the kernel is the source of truth for what is programmed (Check reads
//! it back, and the table's owner lists the interfaces counted against the capture); this map
//! is what `List` shows, what `Check <container-id>` resolves a namespace from, and where a
//! Detach finds the plan to rewrite the table's owner with.

use std::collections::BTreeMap;
use std::sync::Mutex;

use sluice_proto::v1::{Attachment, PodRef};

/// One recorded attachment, with what is needed to re-plan it for Check.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub attachment: Attachment,
    pub annotations: BTreeMap<String, String>,
    pub pod_ips: Vec<String>,
}

type Key = (String, String);

/// The records and how many distinct containers they belong to, kept together so that the
/// count is O(1): it is read on every Attach and Detach (the `sluice_attached_pods` gauge),
/// and counting a node's thousands of records each time showed in the agent's profile.
#[derive(Debug, Default)]
struct Records {
    map: BTreeMap<Key, Record>,
    pods: usize,
}

impl Records {
    /// The keys of one container's attachments.
    fn of<'a>(&'a self, container_id: &'a str) -> impl Iterator<Item = &'a Key> + 'a {
        self.map
            .range((container_id.to_owned(), String::new())..)
            .map(|(k, _)| k)
            .take_while(move |(id, _)| id == container_id)
    }
}

#[derive(Debug, Default)]
pub struct Registry {
    records: Mutex<Records>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, Records> {
        // A panic while holding the lock cannot leave a map half-updated (single insert/remove),
        // so a poisoned lock is still consistent.
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records (or replaces) the attachment of `record`'s (container, interface).
    pub fn insert(&self, record: Record) {
        let key = (
            record.attachment.container_id.clone(),
            record.attachment.ifname.clone(),
        );
        let mut records = self.lock();
        let new_pod = records.of(&key.0).next().is_none();
        records.map.insert(key, record);
        records.pods += usize::from(new_pod);
    }

    /// Forgets the attachment on `ifname` of a container; every attachment of the container
    /// when `ifname` is empty. Returns how many were forgotten.
    pub fn remove(&self, container_id: &str, ifname: &str) -> usize {
        let mut records = self.lock();
        let gone: Vec<Key> = records
            .of(container_id)
            .filter(|(_, i)| ifname.is_empty() || i == ifname)
            .cloned()
            .collect();
        for key in &gone {
            records.map.remove(key);
        }
        if !gone.is_empty() && records.of(container_id).next().is_none() {
            records.pods -= 1;
        }
        gone.len()
    }

    /// Every attachment of the container, by interface name.
    pub fn of(&self, container_id: &str) -> Vec<Record> {
        let records = self.lock();
        records
            .of(container_id)
            .filter_map(|k| records.map.get(k).cloned())
            .collect()
    }

    /// Any attachment of the container (they share the pod's annotations and netns), the
    /// first by interface name.
    pub fn get(&self, container_id: &str) -> Option<Record> {
        let records = self.lock();
        let key = records.of(container_id).next()?;
        records.map.get(key).cloned()
    }

    pub fn list(&self) -> Vec<Attachment> {
        self.lock()
            .map
            .values()
            .map(|r| r.attachment.clone())
            .collect()
    }

    /// Attachments recorded, one per (container, interface).
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Pods (containers) with at least one attachment.
    pub fn pods(&self) -> usize {
        self.lock().pods
    }
}

/// Builds the proto pod reference, tolerating an absent one.
pub fn pod_or_default(pod: Option<PodRef>) -> PodRef {
    pod.unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, ifname: &str) -> Record {
        Record {
            attachment: Attachment {
                container_id: id.into(),
                ifname: ifname.into(),
                ..Default::default()
            },
            annotations: BTreeMap::new(),
            pod_ips: vec![],
        }
    }

    #[test]
    fn attachments_are_keyed_by_container_and_interface() {
        let r = Registry::default();
        r.insert(record("a", "eth0"));
        r.insert(record("a", "net1"));
        r.insert(record("ab", "eth0"));
        r.insert(record("a", "eth0"));
        assert_eq!((r.len(), r.pods()), (3, 2));
        assert_eq!(r.get("a").unwrap().attachment.ifname, "eth0");
        assert!(r.get("").is_none() && r.get("b").is_none());
        assert_eq!(r.remove("a", "eth0"), 1);
        assert_eq!(r.get("a").unwrap().attachment.ifname, "net1");
        assert_eq!(r.remove("a", "eth9"), 0);
        r.insert(record("a", "eth0"));
        assert_eq!(
            r.remove("a", ""),
            2,
            "an empty ifname forgets the container"
        );
        assert_eq!((r.len(), r.pods()), (1, 1));
        assert_eq!(r.remove("ab", "eth0"), 1);
        assert_eq!((r.len(), r.pods()), (0, 0));
        assert_eq!(r.remove("ab", ""), 0);
        assert_eq!(r.pods(), 0);
    }
}
