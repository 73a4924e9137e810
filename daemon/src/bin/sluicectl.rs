//! `sluicectl`: inspect a node's sluice agent, or explain a plan without one.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sluice::config::DEFAULT_SOCKET;
use sluice::model::plan::PlanDefaults;
use sluice_proto::v1::agent_client::AgentClient;
use sluice_proto::v1::{CheckRequest, ListRequest, Outcome, StatusRequest};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Inspect the sluice agent, or explain what annotations program"
)]
struct Args {
    /// The agent's socket.
    #[arg(long, default_value = DEFAULT_SOCKET, global = true)]
    socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List the attachments the agent has programmed.
    List,
    /// Compare a container's live table with its plan; exits 1 on drift.
    Check { container_id: String },
    /// Whether the agent can program new pods.
    Status,
    /// Print the `nft -f` text the plan for these annotations renders to under this node's
    /// configuration: the running agent's (asked over its socket), or with `--config` (or when
    /// no agent answers) the agent config file's, else the built-in defaults. The first line
    /// says which.
    Explain {
        /// The agent's TOML config file to plan under, without asking the agent.
        #[arg(long)]
        config: Option<PathBuf>,
        /// A pod annotation as key=value (repeatable).
        #[arg(long = "annotation", short = 'a', value_parser = parse_kv)]
        annotations: Vec<(String, String)>,
        /// A pod address (repeatable); decides the IP families captured (none: both).
        #[arg(long = "pod-ip")]
        pod_ips: Vec<std::net::IpAddr>,
        /// Also print the plan value.
        #[arg(long)]
        plan: bool,
    },
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?} is not key=value"))
}

async fn client(
    socket: &std::path::Path,
) -> anyhow::Result<AgentClient<tonic::transport::Channel>> {
    let channel = tonic::transport::Endpoint::try_from(format!("unix://{}", socket.display()))?
        .connect()
        .await
        .with_context(|| format!("connecting to the agent at {}", socket.display()))?;
    Ok(AgentClient::new(channel))
}

/// The explanation under the node's configuration, and where that configuration came from.
fn explain(
    socket: &std::path::Path,
    config: Option<&std::path::Path>,
    annotations: &BTreeMap<String, String>,
    pod_ips: &[std::net::IpAddr],
) -> anyhow::Result<(sluice_proto::v1::ExplainResponse, String)> {
    let local = |defaults: &PlanDefaults, source: String| -> anyhow::Result<_> {
        Ok((
            sluice::agent::explain_under(annotations, pod_ips, defaults)?,
            source,
        ))
    };
    if let Some(path) = config {
        let mut cfg = sluice::config::AgentConfig::default();
        sluice::config::FileConfig::load(path)?.apply(&mut cfg);
        return local(&cfg.plan, format!("the config file {}", path.display()));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let asked = rt.block_on(async {
        let mut agent = client(socket).await?;
        let reply = agent
            .explain(sluice_proto::v1::ExplainRequest {
                annotations: annotations.clone().into_iter().collect(),
                pod_ips: pod_ips.iter().map(ToString::to_string).collect(),
            })
            .await?;
        anyhow::Ok(reply.into_inner())
    });
    match asked {
        Ok(out) => Ok((out, format!("the agent at {}", socket.display()))),
        Err(e) => local(
            &PlanDefaults::default(),
            format!(
                "built-in defaults (no agent answered: {e:#}; pass --config to use a node's file)"
            ),
        ),
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Command::Explain {
        config,
        annotations,
        pod_ips,
        plan,
    } = &args.command
    {
        let annotations: BTreeMap<_, _> = annotations.iter().cloned().collect();
        let (out, source) = explain(&args.socket, config.as_deref(), &annotations, pod_ips)?;
        println!("# planned under: {source}");
        for note in &out.notes {
            println!("# note: {note}");
        }
        if out.outcome == Outcome::Skipped as i32 {
            println!("# skipped: {}", out.reason);
        } else {
            let source = sluice::model::plan::Profile::source_annotation(&out.profile)
                .map_or(String::new(), |a| format!(" (from {a})"));
            println!(
                "# profile: {}{source}  fingerprint: {}",
                out.profile, out.fingerprint
            );
            if *plan {
                for line in out.plan.lines() {
                    println!("# {line}");
                }
            }
            for line in out.device.lines() {
                println!("# device: {line}");
            }
            print!("{}", out.nft);
        }
        return Ok(());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut agent = client(&args.socket).await?;
        match args.command {
            Command::List => {
                let list = agent.list(ListRequest {}).await?.into_inner();
                println!(
                    "{:<14} {:<16} {:<16} {:<10} {:<30} {:<18} {:<8} {:>5}  NETNS",
                    "CONTAINER",
                    "IFNAME",
                    "NETWORK",
                    "STATE",
                    "POD",
                    "FINGERPRINT",
                    "PROFILE",
                    "RULES"
                );
                for a in list.attachments {
                    let pod = a.pod.unwrap_or_default();
                    println!(
                        "{:<14} {:<16} {:<16} {:<10} {:<30} {:<18} {:<8} {:>5}  {}",
                        a.container_id.chars().take(12).collect::<String>(),
                        a.ifname,
                        if a.network.is_empty() {
                            "-"
                        } else {
                            &a.network
                        },
                        a.state,
                        format!("{}/{}", pod.namespace, pod.name),
                        a.fingerprint,
                        a.profile,
                        a.rule_count,
                        a.netns
                    );
                }
            }
            Command::Check { container_id } => {
                let r = agent
                    .check(CheckRequest {
                        container_id,
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                if r.ok {
                    println!("ok (fingerprint {})", r.live_fingerprint);
                } else {
                    for d in &r.drift {
                        println!("drift: {d}");
                    }
                    std::process::exit(1);
                }
            }
            Command::Status => {
                let s = agent.status(StatusRequest {}).await?.into_inner();
                println!(
                    "ready: {}{}\nversion: {}\nattached: {}\ndiscovery: {}",
                    s.ready,
                    if s.reason.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", s.reason)
                    },
                    s.version,
                    s.attached,
                    s.discovery
                );
            }
            Command::Explain { .. } => unreachable!("handled above"),
        }
        Ok(())
    })
}
