//! `sluice-agent`: parses flags, builds the config, serves. All logic is in the library.

use std::path::PathBuf;

use clap::Parser;
use sluice::config::{AgentConfig, FileConfig, LogFormat};
use sluice::netns::Root;

/// The sluice node agent: programs traffic capture into pod network namespaces on request of
/// the sluice-cni plugin.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// TOML config file; flags given on the command line win over its keys.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Unix socket to serve on [default: /run/sluice/agent.sock].
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Allowed netns root (repeatable): a directory whose direct children are netns files, or
    /// `/proc` for /proc/<pid>/ns/net [default: /var/run/netns, /run/netns, /proc].
    #[arg(long = "netns-root")]
    netns_roots: Vec<String>,
    /// Peer uid allowed to call the API (repeatable) [default: 0].
    #[arg(long = "allow-uid")]
    allow_uids: Vec<u32>,
    /// Log format [default: text].
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut config = AgentConfig::default();
    if let Some(path) = &args.config {
        FileConfig::load(path)?.apply(&mut config);
    }
    if let Some(socket) = args.socket {
        config.socket = socket;
    }
    if !args.netns_roots.is_empty() {
        config.netns_roots = args.netns_roots.iter().map(|s| Root::parse(s)).collect();
    }
    if !args.allow_uids.is_empty() {
        config.allow_uids = args.allow_uids;
    }
    if let Some(format) = args.log_format {
        config.log_format = format;
    }
    sluice::logging::init(config.log_format);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("installing a SIGTERM handler cannot fail at startup");
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("shutting down");
        };
        sluice::server::serve(config, shutdown).await
    })?;
    Ok(())
}
