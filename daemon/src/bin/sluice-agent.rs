//! `sluice-agent`: parses flags, builds the config, serves (or runs one install/uninstall
//! pass). All logic is in the library.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use sluice::config::{AgentConfig, FileConfig, LogFormat, NodeInstall};
use sluice::kernel::netns::Root;
use sluice::node::install::{ChainMode, Installer};

/// The sluice node agent: programs traffic capture into pod network namespaces on request of
/// the sluice-cni plugin.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// TOML config file; flags given on the command line win over its keys.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Unix socket to serve on [default: /run/sluice/agent.sock].
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// Allowed netns root (repeatable): a directory whose direct children are netns files, or
    /// `/proc` for /proc/<pid>/ns/net [default: /var/run/netns, /run/netns, /proc].
    #[arg(long = "netns-root")]
    netns_roots: Vec<String>,
    /// Peer uid allowed to call the API (repeatable) [default: 0].
    #[arg(long = "allow-uid")]
    allow_uids: Vec<u32>,
    /// Log format [default: text].
    #[arg(long, value_enum, global = true)]
    log_format: Option<LogFormat>,
    /// Prometheus endpoint address, or `off` [default: 127.0.0.1:9965].
    #[arg(long)]
    metrics_addr: Option<String>,
    /// Serve the gRPC health service alone on this TCP address too (kubelet gRPC probes);
    /// `ip:port`, an IPv6 address may be written without brackets.
    #[arg(long)]
    health_addr: Option<String>,
    /// Where `net.*` sysctls are written (`<dir>/net/...`) [default: /proc/sys]. In a
    /// container, the host's /proc/sys/net mounted elsewhere (its own /proc/sys is read-only).
    #[arg(long)]
    sysctl_dir: Option<PathBuf>,
    /// The container runtime's CRI socket, for sandbox discovery and repair, or `off`
    /// [default: /run/containerd/containerd.sock; CRI-O: /var/run/crio/crio.sock].
    #[arg(long)]
    cri_socket: Option<String>,
    /// What the reconciler does about a pod lacking its capture: `apply` it, or `report` only.
    #[arg(long, value_enum)]
    repair: Option<sluice::node::reconcile::Repair>,
    /// Seconds between reconcile passes [default: 15].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    reconcile_interval: Option<u64>,
    /// A sysctl Kubernetes calls unsafe that pods on this node may set through
    /// `sluice.dev/sysctls` (repeatable; as kubelet's --allowed-unsafe-sysctls) [default:
    /// none: only Kubernetes' safe list].
    #[arg(long = "allow-unsafe-sysctl")]
    allowed_unsafe_sysctls: Vec<String>,
    /// Apply native `sluice.dev/*` overrides to pods a mesh profile captures too [default:
    /// off: a mesh's capture is the mesh's].
    #[arg(long)]
    native_overrides_on_mesh_pods: bool,
    /// Install into the node's CNI dirs at start-up and keep sluice-cni chained.
    #[arg(long)]
    install: bool,
    /// With --install: uninstall on SIGTERM (default keeps the install across restarts).
    #[arg(long, requires = "install")]
    uninstall_on_exit: bool,
    #[command(flatten)]
    dirs: Dirs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, clap::Args)]
struct Dirs {
    /// Host CNI binary directory.
    #[arg(long, default_value = "/opt/cni/bin", global = true)]
    cni_bin_dir: PathBuf,
    /// Host CNI config directory.
    #[arg(long, default_value = "/etc/cni/net.d", global = true)]
    cni_conf_dir: PathBuf,
    /// `insert` our entry into the primary config, or write an `own-copy` that sorts first.
    #[arg(long, value_enum, default_value = "insert", global = true)]
    chain_mode: ChainMode,
    /// The sluice-cni binary to install [default: next to this binary].
    #[arg(long, global = true)]
    plugin: Option<PathBuf>,
    /// The plugin's call timeout written into its config, in milliseconds (the plugin's own
    /// default when its config names none).
    #[arg(long, default_value_t = sluice_proto::deadlines::PLUGIN_TIMEOUT.as_millis() as u64, global = true)]
    plugin_timeout_ms: u64,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// One install pass (copy sluice-cni, chain it into the primary CNI config), then exit.
    Install,
    /// Remove the chain entry and the binary, restoring the primary config, then exit.
    Uninstall,
}

fn installer(dirs: &Dirs, socket: PathBuf) -> anyhow::Result<Installer> {
    let plugin = match &dirs.plugin {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .map(|d| d.join(sluice::node::install::PLUGIN))
            .ok_or_else(|| anyhow::anyhow!("cannot locate sluice-cni next to the agent"))?,
    };
    Ok(Installer {
        bin_dir: dirs.cni_bin_dir.clone(),
        conf_dir: dirs.cni_conf_dir.clone(),
        plugin_source: plugin,
        mode: dirs.chain_mode,
        socket,
        timeout_ms: dirs.plugin_timeout_ms,
    })
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
    match args.metrics_addr.as_deref() {
        Some("off") => config.metrics_addr = None,
        Some(addr) => {
            config.metrics_addr = Some(
                sluice::config::listen_addr(addr)
                    .map_err(|e| anyhow::anyhow!("--metrics-addr: {e}"))?,
            )
        }
        None => {}
    }
    if let Some(addr) = &args.health_addr {
        config.health_addr = Some(
            sluice::config::listen_addr(addr).map_err(|e| anyhow::anyhow!("--health-addr: {e}"))?,
        );
    }
    if let Some(dir) = args.sysctl_dir {
        config.sysctl_dir = dir;
    }
    if let Some(v) = &args.cri_socket {
        config.cri_socket = sluice::config::cri_socket(v);
    }
    if let Some(v) = args.repair {
        config.repair = v;
    }
    if let Some(v) = args.reconcile_interval {
        config.reconcile_interval = std::time::Duration::from_secs(v);
    }
    if !args.allowed_unsafe_sysctls.is_empty() {
        config.plan.allowed_unsafe_sysctls =
            sluice::config::unsafe_sysctls(args.allowed_unsafe_sysctls)
                .map_err(|e| anyhow::anyhow!("--allow-unsafe-sysctl: {e}"))?;
    }
    if args.native_overrides_on_mesh_pods {
        config.plan.native_overrides_on_mesh_pods = true;
    }
    sluice::logging::init(config.log_format);

    match args.command {
        Some(Command::Install) => {
            let changes = installer(&args.dirs, config.socket.clone())?.install()?;
            println!(
                "sluice-cni installed (binary {}, config {})",
                if changes.binary {
                    "written"
                } else {
                    "unchanged"
                },
                changes.config.map_or("unchanged".to_owned(), |p| format!(
                    "written to {}",
                    p.display()
                ))
            );
            return Ok(());
        }
        Some(Command::Uninstall) => {
            installer(&args.dirs, config.socket.clone())?.uninstall()?;
            println!("sluice-cni uninstalled");
            return Ok(());
        }
        None => {}
    }
    if args.install {
        config.install = Some(NodeInstall {
            installer: installer(&args.dirs, config.socket.clone())?,
            uninstall_on_exit: args.uninstall_on_exit,
        });
    }
    // Least privilege before serving: keep CAP_NET_ADMIN + CAP_SYS_ADMIN, drop the rest, and
    // no new privileges through exec (the API server refuses allowPrivilegeEscalation: false
    // next to SYS_ADMIN, so the agent sets it itself).
    // A node's default soft fd limit (1,024) is low for an agent holding a netns, a netlink
    // socket and a connection per pod in flight: raise it to the hard limit, as Go programs
    // do at start (no privilege is needed up to the hard limit).
    if let Ok((soft, hard)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(e) =
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard)
    {
        tracing::warn!(error = %e, soft, hard, "raising the open-file limit failed");
    }
    let kept = sluice::node::privileges::drop_to_needed()?;
    tracing::info!(capabilities = ?kept, no_new_privs = true, "dropped every other capability");

    // One thread for all the agent's async work (gRPC, metrics, health, discovery): kernel
    // work runs on netns worker threads, so what is left is a few tens of microseconds of
    // protocol per call. A multi-thread runtime handed each call between its workers (a
    // cross-CPU wake-up per hop): ~37 µs more per ADD at p50, interleaved A/B on two agents.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        // Registered before anything else, so a SIGTERM during start-up is a clean shutdown
        // (uninstall-on-exit included), not the default kill.
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            tracing::info!("shutting down");
        };
        sluice::run::serve(config, shutdown).await?;
        anyhow::Ok(())
    })?;
    Ok(())
}
