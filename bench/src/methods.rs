//! The ways a pod gets the same capture rules (Istio's default sidecar plan), each applied to a
//! fresh netns per sample. Only `apply` is timed.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sluice_proto::v1::agent_client::AgentClient;
use sluice_proto::v1::{AttachRequest, DetachRequest, ListRequest};
use tonic::transport::Channel;

use crate::env::{Agent, Netns, run_with_stdin};
use crate::runc::InitContainer;

pub use crate::rules::{ISTIO_IPT, ISTIO_NFT};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    SluiceE2e,
    SluiceRpc,
    IptablesNftRestore,
    IptablesLegacyRestore,
    IptablesPerRule,
    NftFile,
    InitContainer,
    /// Like for like with the Istio CNI plugin: a process started from the host per pod that
    /// enters the pod netns and runs iptables-restore (`nsenter --net=NETNS iptables-nft-restore`).
    IstioCniLike,
    /// Like for like with the Linkerd CNI plugin: from the host, one `nsenter --net=NETNS
    /// iptables-nft` exec per rule.
    LinkerdCniLike,
    /// Reference, not a method: spawning and reaping `/bin/true`, the floor under every
    /// method that starts a process.
    ExecFloor,
}

pub const ALL: [Method; 10] = [
    Method::SluiceE2e,
    Method::SluiceRpc,
    Method::IstioCniLike,
    Method::LinkerdCniLike,
    Method::IptablesNftRestore,
    Method::IptablesLegacyRestore,
    Method::IptablesPerRule,
    Method::NftFile,
    Method::InitContainer,
    Method::ExecFloor,
];

impl Method {
    pub fn id(self) -> &'static str {
        match self {
            Method::SluiceE2e => "sluice-e2e",
            Method::SluiceRpc => "sluice-rpc",
            Method::IptablesNftRestore => "iptables-nft-restore",
            Method::IptablesLegacyRestore => "iptables-legacy-restore",
            Method::IptablesPerRule => "iptables-per-rule",
            Method::NftFile => "nft-f",
            Method::InitContainer => "init-container",
            Method::IstioCniLike => "istio-cni-like",
            Method::LinkerdCniLike => "linkerd-cni-like",
            Method::ExecFloor => "ref-exec-true",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Method::SluiceE2e => "exec sluice-cni ADD (containerd stdin) -> agent -> kernel",
            Method::SluiceRpc => "Attach RPC from a long-lived client (no process start)",
            Method::IptablesNftRestore => "iptables-restore (nft backend) in the netns",
            Method::IptablesLegacyRestore => "iptables-legacy-restore in the netns",
            Method::IptablesPerRule => "one iptables exec per rule (linkerd proxy-init style)",
            Method::NftFile => "nft -f in the netns (Istio's nftables backend)",
            Method::InitContainer => {
                "runc run of a busybox init container (NET_ADMIN+NET_RAW) running iptables-restore"
            }
            Method::IstioCniLike => {
                "from the host: nsenter --net=NETNS iptables-nft-restore (what istio-cni does per pod)"
            }
            Method::LinkerdCniLike => {
                "from the host: one nsenter --net=NETNS iptables-nft exec per rule (linkerd-cni)"
            }
            Method::ExecFloor => "reference floor: spawn /bin/true and wait (no rules)",
        }
    }
}

/// The stdin containerd sends a chained sluice-cni, asking for the same capture as the
/// Istio rules (Istio CNI also excludes outbound 15020).
pub fn cni_stdin(socket: &str) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "bench-net",
        "type": "sluice-cni",
        "capabilities": {"io.kubernetes.cri.pod-annotations": true},
        "agentSocket": socket,
        "runtimeConfig": {"io.kubernetes.cri.pod-annotations": annotations()},
        "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.123.0.5/24", "gateway": "10.123.0.1", "interface": 2}], "dns": {}},
    })
    .to_string()
}

fn annotations() -> std::collections::HashMap<String, String> {
    [
        ("sluice.dev/redirect", "enabled"),
        ("sluice.dev/exclude-outbound-ports", "15020"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// `iptables -t nat ...` argument lists equivalent to [`ISTIO_IPT`], one exec each.
fn per_rule_commands() -> Vec<Vec<String>> {
    ISTIO_IPT
        .lines()
        .filter(|l| l.starts_with("-N ") || l.starts_with("-A "))
        .map(|l| {
            let mut args = vec!["-t".to_owned(), "nat".to_owned()];
            args.extend(l.split_whitespace().map(str::to_owned));
            args
        })
        .collect()
}

/// Everything the methods need, set up once.
pub struct Runner {
    pub agent: Agent,
    pub cni: std::path::PathBuf,
    stdin: String,
    rt: tokio::runtime::Runtime,
    client: AgentClient<Channel>,
    per_rule: Vec<Vec<String>>,
    pub init: Result<InitContainer, String>,
    seq: u64,
}

impl std::fmt::Debug for Runner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runner")
            .field("agent", &self.agent)
            .finish_non_exhaustive()
    }
}

impl Runner {
    pub fn new() -> anyhow::Result<Self> {
        let agent = Agent::start()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let endpoint =
            tonic::transport::Endpoint::try_from(format!("unix://{}", agent.socket_str()))?;
        let client = AgentClient::new(
            rt.block_on(endpoint.connect())
                .context("connect to agent")?,
        );
        Ok(Runner {
            stdin: cni_stdin(&agent.socket_str()),
            agent,
            cni: crate::env::plugin()?,
            rt,
            client,
            per_rule: per_rule_commands(),
            init: InitContainer::prepare().map_err(|e| format!("{e:#}")),
            seq: 0,
        })
    }

    /// Applies the rules with `method` to `ns` and returns the time it took.
    pub fn apply(&mut self, method: Method, ns: &Netns) -> anyhow::Result<Duration> {
        self.seq += 1;
        let id = format!("bench-{}-{}", std::process::id(), self.seq);
        match method {
            Method::SluiceE2e => {
                let mut cmd = self.cni_command(&id, ns);
                let start = Instant::now();
                run_with_stdin(&mut cmd, self.stdin.as_bytes())?;
                Ok(start.elapsed())
            }
            Method::SluiceRpc => {
                let request = AttachRequest {
                    container_id: id,
                    netns: ns.path(),
                    ifname: "eth0".into(),
                    annotations: annotations(),
                    pod_ips: vec!["10.123.0.5/24".into()],
                    ..Default::default()
                };
                let client = &mut self.client;
                let start = Instant::now();
                self.rt.block_on(client.attach(request))?;
                Ok(start.elapsed())
            }
            Method::IptablesNftRestore => restore_in(ns, "iptables-nft-restore"),
            Method::IptablesLegacyRestore => restore_in(ns, "iptables-legacy-restore"),
            Method::NftFile => ns.run(|| {
                let start = Instant::now();
                run_with_stdin(Command::new("nft").args(["-f", "-"]), ISTIO_NFT.as_bytes())?;
                Ok(start.elapsed())
            })?,
            Method::IptablesPerRule => {
                let cmds = &self.per_rule;
                ns.run(|| {
                    let start = Instant::now();
                    for args in cmds {
                        let out = Command::new("iptables-nft").args(args).output()?;
                        if !out.status.success() {
                            bail!(
                                "iptables {args:?}: {}",
                                String::from_utf8_lossy(&out.stderr)
                            );
                        }
                    }
                    Ok(start.elapsed())
                })?
            }
            Method::IstioCniLike => {
                let mut cmd = Command::new("nsenter");
                cmd.arg(format!("--net={}", ns.path()))
                    .arg("iptables-nft-restore");
                let start = Instant::now();
                run_with_stdin(&mut cmd, ISTIO_IPT.as_bytes())?;
                Ok(start.elapsed())
            }
            Method::LinkerdCniLike => {
                let enter = format!("--net={}", ns.path());
                let start = Instant::now();
                for args in &self.per_rule {
                    let out = Command::new("nsenter")
                        .arg(&enter)
                        .arg("iptables-nft")
                        .args(args)
                        .output()?;
                    if !out.status.success() {
                        bail!(
                            "nsenter iptables {args:?}: {}",
                            String::from_utf8_lossy(&out.stderr)
                        );
                    }
                }
                Ok(start.elapsed())
            }
            Method::ExecFloor => {
                let mut cmd = Command::new("/bin/true");
                cmd.stdin(std::process::Stdio::null());
                let start = Instant::now();
                let status = cmd.status()?;
                let took = start.elapsed();
                anyhow::ensure!(status.success(), "/bin/true failed");
                Ok(took)
            }
            Method::InitContainer => match &self.init {
                Ok(init) => init.run(&id, ns),
                Err(why) => bail!("init container unavailable: {why}"),
            },
        }
    }

    pub fn cni_command(&self, id: &str, ns: &Netns) -> Command {
        let mut cmd = Command::new(&self.cni);
        cmd.env_clear()
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", id)
            .env("CNI_NETNS", ns.path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/usr/lib/cni")
            .env(
                "CNI_ARGS",
                format!(
                    "IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={id};K8S_POD_UID=uid-{id}"
                ),
            );
        cmd
    }

    pub fn stdin(&self) -> &str {
        &self.stdin
    }

    /// Detaches every attachment whose netns is gone (untimed), as the runtime's DEL does when
    /// a pod is removed: the bench deletes each sample's namespace, and without this the
    /// agent would carry thousands of records of pods that no longer exist, so its memory
    /// "with 1,000 pods attached" would not be that.
    pub fn detach_gone(&mut self) -> anyhow::Result<usize> {
        let list = self
            .rt
            .block_on(self.client.list(ListRequest {}))?
            .into_inner();
        let mut detached = 0;
        for a in list.attachments {
            if std::path::Path::new(&a.netns).exists() {
                continue;
            }
            let request = DetachRequest {
                container_id: a.container_id,
                netns: String::new(),
                ifname: a.ifname,
            };
            self.rt.block_on(self.client.detach(request))?;
            detached += 1;
        }
        Ok(detached)
    }

    /// Checks that `method` really left the capture rules in `ns` (run once per method on an
    /// untimed sample, so a broken method cannot post fast numbers).
    pub fn verify(&self, method: Method, ns: &Netns) -> anyhow::Result<()> {
        if method == Method::ExecFloor {
            return Ok(());
        }
        let listing = match method {
            Method::IptablesLegacyRestore => ns.exec(&["iptables-legacy-save", "-t", "nat"])?,
            Method::IptablesNftRestore
            | Method::IptablesPerRule
            | Method::InitContainer
            | Method::IstioCniLike
            | Method::LinkerdCniLike => ns.exec(&["iptables-nft-save", "-t", "nat"])?,
            _ => ns.exec(&["nft", "list", "ruleset"])?,
        };
        let text = String::from_utf8_lossy(&listing.stdout);
        let needles: &[&str] = match method {
            Method::SluiceE2e | Method::SluiceRpc => &[
                "table inet sluice",
                "redirect to :15001",
                "redirect to :15006",
            ],
            Method::NftFile => &[
                "table inet istio-proxy-nat",
                "redirect to :15001",
                "redirect to :15006",
            ],
            _ => &[
                "ISTIO_OUTPUT",
                "--to-ports 15001",
                "--to-ports 15006",
                "--uid-owner 1337",
            ],
        };
        for n in needles {
            if !text.contains(n) {
                bail!(
                    "{}: {n:?} missing from the netns after apply:\n{text}",
                    method.id()
                );
            }
        }
        Ok(())
    }
}

pub fn restore_in(ns: &Netns, tool: &str) -> anyhow::Result<Duration> {
    ns.run(|| {
        let start = Instant::now();
        run_with_stdin(&mut Command::new(tool), ISTIO_IPT.as_bytes())?;
        Ok(start.elapsed())
    })?
}
