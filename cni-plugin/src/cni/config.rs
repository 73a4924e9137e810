//! The network config the runtime hands us on stdin.
//!
//! Hand-written serde types rather than the `rscni`/`rscni-plugin` crates: rscni parses
//! `prevResult` into a typed result and serializes it again, which drops keys it does not know
//! and empty sections, while a chained plugin must hand `prevResult` on unchanged. Keeping it
//! as a `RawValue` prints exactly the bytes we were given. The rest we need is a handful of
//! fields, and we want to own the error codes for each failure.

use std::collections::HashMap;

use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use super::Output;
use super::error::{CniError, DECODE_FAILURE, INCOMPATIBLE_VERSION};
use super::version::{LATEST_VERSION, SUPPORTED_VERSIONS};
/// Where the agent listens unless the config says otherwise.
pub const DEFAULT_AGENT_SOCKET: &str = "/run/sluice/agent.sock";

#[derive(Debug, Deserialize)]
pub struct NetConf {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    /// The network's name (the conflist's `name`, which libcni copies into each plugin's
    /// config): recorded with each attachment, so GC of one network touches only its own.
    #[serde(default, deserialize_with = "null_as_default")]
    pub name: String,
    #[serde(rename = "prevResult")]
    pub prev_result: Option<Box<RawValue>>,
    #[serde(
        rename = "runtimeConfig",
        default,
        deserialize_with = "null_as_default"
    )]
    pub runtime_config: RuntimeConfig,
    /// GC (CNI 1.1): the attachments the runtime still considers alive. libcni injects this
    /// at the top level of each plugin's config (not under `runtimeConfig`).
    #[serde(
        rename = "cni.dev/valid-attachments",
        default,
        deserialize_with = "null_as_default"
    )]
    pub valid_attachments: Vec<ValidAttachment>,
    /// Our own conflist keys.
    #[serde(rename = "agentSocket")]
    pub agent_socket: Option<String>,
    #[serde(rename = "timeoutMs")]
    pub timeout_ms: Option<u64>,
    /// STATUS fails (code 50) while the agent is unreachable or not ready. Off by default:
    /// a runtime that asks STATUS (containerd 2.x on every CRI `Status`, CRI-O) then marks the
    /// whole node's network not ready, and kubelet admits no pod at all, annotated or not,
    /// during every agent restart.
    #[serde(rename = "statusRequiresAgent", default)]
    pub status_requires_agent: bool,
}

/// Real runtimes send `null` where a map or list is empty: containerd sends
/// `"io.kubernetes.cri.pod-annotations": null` for a pod without annotations. `null` and
/// absent both mean empty.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

#[derive(Debug, Default, Deserialize)]
pub struct RuntimeConfig {
    #[serde(
        rename = "io.kubernetes.cri.pod-annotations",
        default,
        deserialize_with = "null_as_default"
    )]
    pub pod_annotations: HashMap<String, String>,
    /// GC: the same list, where runtimes other than libcni's may put it.
    #[serde(
        rename = "cni.dev/valid-attachments",
        default,
        deserialize_with = "null_as_default"
    )]
    pub valid_attachments: Vec<ValidAttachment>,
}

#[derive(Debug, Deserialize)]
pub struct ValidAttachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub ifname: String,
}

/// The most stdin the plugin reads. Kubernetes caps a pod's annotations at 256 KiB in all,
/// so a real network config is far smaller; anything larger is refused unread.
pub const MAX_STDIN: usize = 1024 * 1024;

/// At most 120 characters of `input`, for an error message.
pub fn excerpt(input: &[u8]) -> String {
    const MAX: usize = 120;
    let text = String::from_utf8_lossy(&input[..input.len().min(MAX * 4)]);
    let mut out: String = text.chars().take(MAX).collect();
    if out.len() < text.len() || input.len() > MAX * 4 {
        out.push('…');
    }
    out
}

impl NetConf {
    pub fn parse(stdin: &[u8]) -> Result<Self, CniError> {
        let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(DECODE_FAILURE, "cannot decode the network config on stdin")
                .details(format!("{e}; input begins: {}", excerpt(stdin)))
        })?;
        if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
            return Err(CniError::new(
                INCOMPATIBLE_VERSION,
                format!("cniVersion {:?} is not supported", conf.cni_version),
            )
            .details(format!("supported: {}", SUPPORTED_VERSIONS.join(", "))));
        }
        Ok(conf)
    }

    /// Every attachment the runtime says is alive, wherever it put the list.
    pub fn valid_attachments(&self) -> impl Iterator<Item = &ValidAttachment> {
        self.valid_attachments
            .iter()
            .chain(&self.runtime_config.valid_attachments)
    }

    pub fn socket(&self) -> &str {
        self.agent_socket.as_deref().unwrap_or(DEFAULT_AGENT_SOCKET)
    }

    pub fn timeout(&self) -> std::time::Duration {
        sluice_proto::deadlines::plugin_timeout(self.timeout_ms)
    }

    /// The pod's addresses from `prevResult.ips[].address`.
    pub fn pod_ips(&self) -> Vec<String> {
        #[derive(Deserialize)]
        struct Prev {
            #[serde(default)]
            ips: Vec<Ip>,
        }
        #[derive(Deserialize)]
        struct Ip {
            address: String,
        }
        self.prev_result
            .as_ref()
            .and_then(|raw| serde_json::from_str::<Prev>(raw.get()).ok())
            .map(|p| p.ips.into_iter().map(|ip| ip.address).collect())
            .unwrap_or_default()
    }
}

pub use sluice_proto::annotations::opted_in;

/// The answer for a config the strict parse refused, when a lenient look shows the pod did not
/// opt in: ADD hands `prevResult` on unchanged (or a bare result), DEL and CHECK succeed.
/// `None` (keep the strict error) when stdin is not a JSON object, the verb is another, or the
/// pod may have opted in (an annotation map sluice cannot read counts as opted in: refusing is
/// then safer than starting the pod uncaptured).
pub fn pass_through(command: &str, stdin: &[u8]) -> Option<Output> {
    if !matches!(command, "ADD" | "DEL" | "CHECK") {
        return None;
    }
    // Only a JSON object is a config (serde would read a struct from an array too).
    let conf: HashMap<String, &RawValue> = serde_json::from_slice(stdin).ok()?;
    let value = |key: &str| -> Option<serde_json::Value> {
        conf.get(key)
            .and_then(|raw| serde_json::from_str(raw.get()).ok())
    };
    let annotations = match value("runtimeConfig")
        .as_ref()
        .and_then(|rc| rc.get("io.kubernetes.cri.pod-annotations"))
    {
        None | Some(serde_json::Value::Null) => serde_json::Map::new(),
        Some(serde_json::Value::Object(m)) => m.clone(),
        Some(_) => return None,
    };
    let unreadable = |k: &str| annotations.get(k).is_some_and(|v| !v.is_string());
    let keys = sluice_proto::annotations::PROFILE_TRIGGERS
        .iter()
        .chain([&sluice_proto::annotations::REDIRECT]);
    if keys.clone().any(|k| unreadable(k))
        || opted_in(|k| annotations.get(k).and_then(|v| v.as_str()))
    {
        return None;
    }
    Some(match command {
        "ADD" => Output::Text(match conf.get("prevResult") {
            Some(prev) if prev.get() != "null" => prev.get().to_owned(),
            _ => {
                let version = value("cniVersion");
                let version = version
                    .as_ref()
                    .and_then(|v| v.as_str())
                    .filter(|v| SUPPORTED_VERSIONS.contains(v))
                    .unwrap_or(LATEST_VERSION);
                format!(r#"{{"cniVersion":"{version}"}}"#)
            }
        }),
        _ => Output::Nothing,
    })
}

/// What a DEL whose config the strict parse refused can still use to remove the capture: the
/// agent's socket and timeout where they are readable (the defaults otherwise), and whether
/// the pod may have opted in. `None` when stdin is not a JSON object at all.
#[derive(Debug, PartialEq, Eq)]
pub struct LenientDel {
    pub socket: String,
    pub timeout: std::time::Duration,
    pub opted_in: bool,
}

impl LenientDel {
    pub fn read(stdin: &[u8]) -> Option<Self> {
        let conf: HashMap<String, serde_json::Value> = serde_json::from_slice(stdin).ok()?;
        let socket = conf
            .get("agentSocket")
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())
            .unwrap_or(DEFAULT_AGENT_SOCKET)
            .to_owned();
        let timeout = sluice_proto::deadlines::plugin_timeout(
            conf.get("timeoutMs").and_then(serde_json::Value::as_u64),
        );
        // An annotation map sluice cannot read counts as opted in: asking the agent to remove
        // a capture that is not there costs nothing, leaving one behind could.
        let opted_in = pass_through("DEL", stdin).is_none();
        Some(LenientDel {
            socket,
            timeout,
            opted_in,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prev_result_is_kept_verbatim_and_ips_are_read() {
        let stdin = br#"{"cniVersion":"1.0.0","name":"n","type":"sluice-cni","prevResult":{"cniVersion":"1.0.0", "ips":[{"address":"10.1.0.5/24","interface":2}],"x-extra":{"b":1,"a":2}}}"#;
        let conf = NetConf::parse(stdin).expect("parses");
        assert_eq!(
            conf.prev_result.as_ref().map(|r| r.get()),
            Some(
                r#"{"cniVersion":"1.0.0", "ips":[{"address":"10.1.0.5/24","interface":2}],"x-extra":{"b":1,"a":2}}"#
            )
        );
        assert_eq!(conf.pod_ips(), vec!["10.1.0.5/24".to_owned()]);
    }

    /// One deadline set (see `sluice_proto::deadlines`): without `timeoutMs` the plugin waits
    /// as long as the installer writes into the conflist, and the agent answers within it.
    #[test]
    fn the_default_timeout_is_the_one_the_installer_writes() {
        let conf = NetConf::parse(br#"{"cniVersion":"1.0.0","name":"n","type":"sluice-cni"}"#)
            .expect("parses");
        assert_eq!(conf.timeout(), sluice_proto::deadlines::PLUGIN_TIMEOUT);
        assert!(
            sluice_proto::deadlines::agent_deadline(conf.timeout())
                > sluice_proto::deadlines::KERNEL_STEP
        );
    }

    #[test]
    fn unsupported_version_and_garbage_have_distinct_codes() {
        assert_eq!(
            NetConf::parse(br#"{"cniVersion":"0.2.0"}"#)
                .unwrap_err()
                .code,
            INCOMPATIBLE_VERSION
        );
        assert_eq!(
            NetConf::parse(b"\x00garbage").unwrap_err().code,
            DECODE_FAILURE
        );
        assert_eq!(
            NetConf::parse(br#"{"cniVersion":"1.0.0","runtimeConfig":{"io.kubernetes.cri.pod-annotations":{"a":1}}}"#)
                .unwrap_err()
                .code,
            DECODE_FAILURE
        );
    }
}
