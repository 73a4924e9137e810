//! Stage timestamps for latency breakdowns, off unless `SLUICE_CNI_TIMING` is set (sluice-bench
//! sets it; no runtime does): wall-clock nanoseconds, comparable with the agent's and the
//! caller's on the same host, printed as one stderr line at exit. Costs one environment lookup
//! when off.

use std::sync::{Mutex, OnceLock};

use sluice_proto::v1::AttachTiming;

static MARKS: Mutex<Vec<(&'static str, u64)>> = Mutex::new(Vec::new());

fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("SLUICE_CNI_TIMING").is_some())
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn push(name: &'static str, ns: u64) {
    if let Ok(mut m) = MARKS.lock() {
        m.push((name, ns));
    }
}

/// Records that stage `name` has just ended.
pub fn mark(name: &'static str) {
    if enabled() {
        push(name, now_ns());
    }
}

/// Records the agent's stage timestamps from its answer.
pub fn agent(t: Option<&AttachTiming>) {
    if let Some(t) = t.filter(|_| enabled()) {
        for (name, ns) in [
            ("agent_received", t.received_ns),
            ("agent_started", t.started_ns),
            ("agent_in_netns", t.in_netns_ns),
            ("agent_nft", t.nft_ns),
            ("agent_device", t.device_ns),
            ("agent_replied", t.replied_ns),
        ] {
            push(name, ns);
        }
    }
}

/// Prints `sluice-cni timing name=ns ...` to stderr.
pub fn print() {
    if !enabled() {
        return;
    }
    let marks = MARKS.lock().map(|m| m.clone()).unwrap_or_default();
    let line: Vec<String> = marks.iter().map(|(n, v)| format!("{n}={v}")).collect();
    eprintln!("sluice-cni timing {}", line.join(" "));
}
