//! The node's pod sandboxes, from the container runtime over CRI (`runtime.v1`): no Kubernetes
//! API needed, because the runtime already knows every sandbox, the annotations the plugin
//! saw (CRI passes them through unaltered) and its network namespace.
//!
//! `ListPodSandbox` (READY only) gives ids, metadata and annotations; only the sandboxes whose
//! annotations ask for capture are looked at further: `PodSandboxStatus` with `verbose` gives
//! their addresses and, in its `info` JSON, the netns path: containerd 1.6/1.7
//! `runtimeSpec.linux.namespaces[type=network].path`, containerd 2.x also
//! `sandboxMetadata.Metadata.NetNSPath`, CRI-O `runtimeSpec` too. Host-network sandboxes are left out
//! (CNI never ran for them). Every call is bounded in time and in size ([`MAX_MESSAGE`]); one
//! sandbox whose status cannot be read is reported and skipped, never the end of the pass.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sluice_proto::cri::runtime_service_client::RuntimeServiceClient;
use sluice_proto::cri::{
    ListPodSandboxRequest, NamespaceMode, PodSandboxFilter, PodSandboxState, PodSandboxStateValue,
    PodSandboxStatusRequest,
};
use sluice_proto::v1::PodRef;
use tonic::transport::{Channel, Endpoint};

/// containerd's CRI socket, the default; CRI-O's is `/var/run/crio/crio.sock`.
pub const DEFAULT_CRI_SOCKET: &str = "/run/containerd/containerd.sock";

/// The longest one CRI call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest CRI answer read. `ListPodSandbox` carries every READY pod's annotations, and
/// Kubernetes allows 256 KiB of them per pod: 250 pods at the limit are ~64 MiB. gRPC's
/// default 4 MiB stops discovery at ~16 such pods. containerd sends at most 16 MiB unless
/// configured (`grpc.max_send_message_size`), CRI-O 80 MiB by default; this bound is above
/// both, and the answer is dropped as soon as the pods that ask for capture are picked out.
pub const MAX_MESSAGE: usize = 128 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("connecting to the CRI socket {socket}: {message}")]
    Connect { socket: String, message: String },
    #[error("CRI {call}: {message}")]
    Call { call: &'static str, message: String },
    #[error("CRI {call}: no answer within {timeout:?}")]
    Timeout {
        call: &'static str,
        timeout: Duration,
    },
}

/// What one listing found: the sandboxes that ask for capture, and the ones whose status could
/// not be read (each with why). A failure of one sandbox never hides the others.
#[derive(Debug, Default)]
pub struct Listing {
    pub sandboxes: Vec<Sandbox>,
    pub failed: Vec<(String, CriError)>,
    /// The ids of READY sandboxes that do not ask for capture (not looked at further).
    pub not_asking: Vec<String>,
}

pub use crate::agent::Sandbox;

/// A CRI runtime service client, connected on first use and again after a failure.
#[derive(Debug)]
pub struct Cri {
    socket: PathBuf,
    client: Option<RuntimeServiceClient<Channel>>,
    /// What each READY sandbox's verbose status said, by sandbox id: a sandbox's pod, network
    /// namespace and addresses are fixed for its life, so it is asked once, not every pass.
    /// Answering a verbose status is the runtime's largest cost of a pass (containerd
    /// marshals the sandbox's whole spec): measured in docs/benchmark.md. Entries of
    /// sandboxes no longer listed are dropped each pass; all of them when listing fails.
    known: HashMap<String, Known>,
}

/// The parts of a sandbox's verbose status a pass needs.
#[derive(Debug, Clone)]
enum Known {
    /// Host network: CNI never ran for it, nothing to do.
    HostNetwork,
    Pod {
        pod: PodRef,
        /// `None` when the status names none (then it is not kept, and asked again).
        netns: Option<String>,
        ips: Vec<String>,
    },
}

async fn timed_call<T>(
    call: &'static str,
    fut: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, CriError> {
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(CriError::Call {
            call,
            message: s.message().to_owned(),
        }),
        Err(_) => Err(CriError::Timeout {
            call,
            timeout: CALL_TIMEOUT,
        }),
    }
}

impl Cri {
    pub fn new(socket: &Path) -> Self {
        Cri {
            socket: socket.to_owned(),
            client: None,
            known: HashMap::new(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn client(&mut self) -> Result<RuntimeServiceClient<Channel>, CriError> {
        if let Some(c) = &self.client {
            return Ok(c.clone());
        }
        let socket = self.socket.display().to_string();
        let connect_err = |message: String| CriError::Connect {
            socket: socket.clone(),
            message,
        };
        let channel = Endpoint::try_from(format!("unix://{socket}"))
            .map_err(|e| connect_err(e.to_string()))?
            .connect_timeout(CALL_TIMEOUT)
            .connect()
            .await
            .map_err(|e| {
                connect_err(std::error::Error::source(&e).map_or(e.to_string(), |s| s.to_string()))
            })?;
        let client = RuntimeServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE);
        self.client = Some(client.clone());
        Ok(client)
    }

    /// Every READY sandbox that asks for capture (see `sluice_proto::annotations::opted_in`),
    /// with its own network namespace. `Err` only when the runtime cannot be listed at all.
    pub async fn ready_sandboxes(&mut self) -> Result<Listing, CriError> {
        let result = self.list().await;
        if result.is_err() {
            // Reconnect next time (the runtime may have restarted), and ask afresh.
            self.client = None;
            self.known.clear();
        }
        result
    }

    async fn list(&mut self) -> Result<Listing, CriError> {
        let mut client = self.client().await?;
        let items = timed_call(
            "ListPodSandbox",
            client.list_pod_sandbox(ListPodSandboxRequest {
                filter: Some(PodSandboxFilter {
                    state: Some(PodSandboxStateValue {
                        state: PodSandboxState::SandboxReady as i32,
                    }),
                    ..Default::default()
                }),
            }),
        )
        .await?
        .items;
        let mut listing = Listing::default();
        // Only the pods that ask for capture are kept (and asked about): the others'
        // annotations go with the answer.
        let asking: Vec<_> = items
            .into_iter()
            .filter(|item| {
                let asks = sluice_proto::annotations::opted_in(|k| {
                    item.annotations.get(k).map(String::as_str)
                });
                if !asks {
                    listing.not_asking.push(item.id.clone());
                }
                asks
            })
            .collect();
        let listed: HashSet<String> = asking.iter().map(|i| i.id.clone()).collect();
        self.known.retain(|id, _| listed.contains(id));
        for item in asking {
            let known = match self.known.get(&item.id) {
                Some(k) => k.clone(),
                None => match status_of(&mut client, &item.id).await {
                    Ok(Some(k)) => {
                        if !matches!(k, Known::Pod { netns: None, .. }) {
                            self.known.insert(item.id.clone(), k.clone());
                        }
                        k
                    }
                    // Not READY any more, or gone.
                    Ok(None) => continue,
                    Err(e) => {
                        listing.failed.push((item.id, e));
                        continue;
                    }
                },
            };
            let Known::Pod { pod, netns, ips } = known else {
                continue;
            };
            listing.sandboxes.push(Sandbox {
                id: item.id,
                pod,
                annotations: item.annotations.into_iter().collect(),
                netns,
                ips,
            });
        }
        Ok(listing)
    }
}

/// A sandbox's verbose status, reduced to what a pass needs; `None` when it is no longer
/// READY (or gone).
async fn status_of(
    client: &mut RuntimeServiceClient<Channel>,
    id: &str,
) -> Result<Option<Known>, CriError> {
    let status = match timed_call(
        "PodSandboxStatus",
        client.pod_sandbox_status(PodSandboxStatusRequest {
            pod_sandbox_id: id.to_owned(),
            verbose: true,
        }),
    )
    .await
    {
        Ok(s) => s,
        // Gone between the two calls: not READY any more.
        Err(CriError::Call { message, .. }) if message.contains("not found") => return Ok(None),
        Err(e) => return Err(e),
    };
    let Some(st) = status.status else {
        return Ok(None);
    };
    if st.state != PodSandboxState::SandboxReady as i32 {
        return Ok(None);
    }
    let host_network = st
        .linux
        .as_ref()
        .and_then(|l| l.namespaces.as_ref())
        .and_then(|n| n.options.as_ref())
        .is_some_and(|o| o.network == NamespaceMode::Node as i32);
    if host_network {
        return Ok(Some(Known::HostNetwork));
    }
    let netns = netns_from_info(&status.info);
    let meta = st.metadata.unwrap_or_default();
    let mut ips = Vec::new();
    if let Some(net) = st.network {
        ips.extend(Some(net.ip).filter(|ip| !ip.is_empty()));
        ips.extend(net.additional_ips.into_iter().map(|p| p.ip));
    }
    Ok(Some(Known::Pod {
        pod: PodRef {
            namespace: meta.namespace,
            name: meta.name,
            uid: meta.uid,
        },
        netns,
        ips,
    }))
}

/// The network namespace path in a verbose `PodSandboxStatus`'s `info` (see the module docs).
pub fn netns_from_info(info: &std::collections::HashMap<String, String>) -> Option<String> {
    let json: serde_json::Value = serde_json::from_str(info.get("info")?).ok()?;
    let from_spec = json["runtimeSpec"]["linux"]["namespaces"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["type"] == "network")
        .and_then(|n| n["path"].as_str());
    from_spec
        .or_else(|| json["sandboxMetadata"]["Metadata"]["NetNSPath"].as_str())
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(json: &str) -> std::collections::HashMap<String, String> {
        [("info".to_owned(), json.to_owned())].into()
    }

    /// Verbose `PodSandboxStatus` infos recorded from each real containerd by `make corpus`
    /// (a running captured pod), and CRI-O's shape (see `tests/corpus/cri-o-1.29/SOURCE`).
    const RECORDED: [(&str, &str); 4] = [
        (
            "containerd 1.6.20",
            include_str!("../../../tests/corpus/containerd-1.6.20/sandbox-status.json"),
        ),
        (
            "containerd 1.7.24",
            include_str!("../../../tests/corpus/containerd-1.7.24/sandbox-status.json"),
        ),
        (
            "containerd 2.1.9",
            include_str!("../../../tests/corpus/containerd-2.1.9/sandbox-status.json"),
        ),
        (
            "CRI-O 1.29",
            include_str!("../../../tests/corpus/cri-o-1.29/sandbox-status.json"),
        ),
    ];

    fn spec_path(json: &serde_json::Value) -> &str {
        json["runtimeSpec"]["linux"]["namespaces"]
            .as_array()
            .and_then(|ns| ns.iter().find(|n| n["type"] == "network"))
            .and_then(|n| n["path"].as_str())
            .expect("the fixture's spec names a network namespace")
    }

    #[test]
    fn the_netns_path_is_found_in_every_runtimes_recorded_info() {
        for (runtime, text) in RECORDED {
            let json: serde_json::Value = serde_json::from_str(text).expect(runtime);
            let want = spec_path(&json);
            assert!(want.starts_with("/var/run/netns/"), "{runtime}: {want}");
            assert_eq!(
                netns_from_info(&info(text)).as_deref(),
                Some(want),
                "{runtime}"
            );
        }
    }

    /// containerd 2.x also keeps the path in its sandbox store's metadata
    /// (`sandboxMetadata.Metadata.NetNSPath`); a sandbox whose spec is not (or no longer) in
    /// the answer is still found through it.
    #[test]
    fn containerd_2_sandbox_metadata_gives_the_path_without_the_spec() {
        let (_, text) = RECORDED[2];
        let mut json: serde_json::Value = serde_json::from_str(text).expect("2.1.9");
        let want = spec_path(&json).to_owned();
        json.as_object_mut().expect("object").remove("runtimeSpec");
        assert_eq!(
            json["sandboxMetadata"]["Metadata"]["NetNSPath"].as_str(),
            Some(want.as_str())
        );
        assert_eq!(
            netns_from_info(&info(&json.to_string())),
            Some(want),
            "from sandboxMetadata.Metadata.NetNSPath"
        );
    }

    #[test]
    fn host_network_and_unreadable_info_give_no_path() {
        // A network namespace entry without a path (host network) or no info at all: none.
        let host = r#"{"runtimeSpec":{"linux":{"namespaces":[{"type":"network"}]}}}"#;
        assert_eq!(netns_from_info(&info(host)), None);
        let empty = r#"{"sandboxMetadata":{"Metadata":{"NetNSPath":""}}}"#;
        assert_eq!(netns_from_info(&info(empty)), None);
        assert_eq!(netns_from_info(&info("not json")), None);
        assert_eq!(netns_from_info(&Default::default()), None);
    }
}
