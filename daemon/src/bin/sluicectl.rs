//! `sluicectl`: inspect a node's sluice agent, or explain a plan without one.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use sluice::config::DEFAULT_SOCKET;
use sluice::plan::PlanDefaults;
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
    /// Print the `nft -f` text the plan for these annotations renders to (no agent needed).
    Explain {
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

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Command::Explain {
        annotations,
        pod_ips,
        plan,
    } = &args.command
    {
        let annotations: BTreeMap<_, _> = annotations.iter().cloned().collect();
        let out = sluice::service::explain(&annotations, pod_ips, &PlanDefaults::default())?;
        if out.outcome == Outcome::Skipped as i32 {
            println!("# skipped: {}", out.reason);
        } else {
            println!(
                "# profile: {}  fingerprint: {}",
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
                    "{:<14} {:<16} {:<10} {:<30} {:<18} {:<8} {:>5}  NETNS",
                    "CONTAINER", "IFNAME", "STATE", "POD", "FINGERPRINT", "PROFILE", "RULES"
                );
                for a in list.attachments {
                    let pod = a.pod.unwrap_or_default();
                    println!(
                        "{:<14} {:<16} {:<10} {:<30} {:<18} {:<8} {:>5}  {}",
                        a.container_id.chars().take(12).collect::<String>(),
                        a.ifname,
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
