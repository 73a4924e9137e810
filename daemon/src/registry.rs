//! The attachments this agent has made, keyed by container id. In memory: the kernel is the
//! source of truth for what is programmed (Check reads it back); this map is what `List` shows
//! and what `Check <container-id>` resolves a namespace from.

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

#[derive(Debug, Default)]
pub struct Registry {
    records: Mutex<BTreeMap<String, Record>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Record>> {
        // A panic while holding the lock cannot leave a map half-updated (single insert/remove),
        // so a poisoned lock is still consistent.
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn insert(&self, record: Record) {
        let id = record.attachment.container_id.clone();
        self.lock().insert(id, record);
    }

    pub fn remove(&self, container_id: &str) -> Option<Record> {
        self.lock().remove(container_id)
    }

    pub fn get(&self, container_id: &str) -> Option<Record> {
        self.lock().get(container_id).cloned()
    }

    pub fn list(&self) -> Vec<Attachment> {
        self.lock().values().map(|r| r.attachment.clone()).collect()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Builds the proto pod reference, tolerating an absent one.
pub fn pod_or_default(pod: Option<PodRef>) -> PodRef {
    pod.unwrap_or_default()
}
