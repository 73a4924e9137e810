//! Serving the API on a unix socket: directory 0700, socket 0600, peers vetted by
//! `SO_PEERCRED`, plus the standard gRPC health service.

use std::future::Future;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use sluice_proto::v1::agent_server::AgentServer;
use tokio::net::UnixListener;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Status};

use crate::agent::{Agent, InstallState};
use crate::config::AgentConfig;
use crate::kernel::netns;
use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("preparing socket {path:?}: {source}")]
    Socket {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading the agent's own network namespace: {0}")]
    HostNetns(#[source] std::io::Error),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("binding the health address {0}: {1}")]
    Health(std::net::SocketAddr, #[source] std::io::Error),
    #[error("binding the metrics address {0}: {1}")]
    Metrics(std::net::SocketAddr, #[source] std::io::Error),
    #[error("watching the CNI config dir: {0}")]
    Install(#[source] crate::node::install::InstallError),
    #[error("{0}")]
    Sysctl(String),
}

fn socket_err(path: &Path) -> impl FnOnce(std::io::Error) -> ServeError + '_ {
    move |source| ServeError::Socket {
        path: path.into(),
        source,
    }
}

/// Binds the socket: its directory is made 0700 — created so if missing; narrowed if it is
/// the agent's (holds nothing but the socket) yet wider, as a hostPath `DirectoryOrCreate`
/// makes it 0755; a shared directory (`/run`, `/tmp`) is left alone with a warning, the socket's
/// own 0600 guarding it; refused if another user owns it — replaces a stale socket (never
/// another kind of file), and sets the socket to 0600.
pub fn bind(path: &Path) -> Result<UnixListener, ServeError> {
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(socket_err(path))?;
        }
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(dir).map_err(socket_err(path))?;
        let me = nix::unistd::geteuid().as_raw();
        if meta.uid() != me {
            return Err(socket_err(path)(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "the socket directory {} belongs to uid {}, not to the agent (uid {me})",
                    dir.display(),
                    meta.uid()
                ),
            )));
        }
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            let only_ours = std::fs::read_dir(dir)
                .map_err(socket_err(path))?
                .flatten()
                .all(|e| Some(e.file_name().as_os_str()) == path.file_name());
            if only_ours {
                tracing::info!(dir = %dir.display(), mode = format!("{mode:o}"), "narrowing the socket directory to 0700");
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                    .map_err(socket_err(path))?;
            } else {
                tracing::warn!(dir = %dir.display(), mode = format!("{mode:o}"), "the socket directory holds other files: left as it is (the socket itself is 0600)");
            }
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(socket_err(path))?
        }
        Ok(_) => {
            return Err(socket_err(path)(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a socket",
            )));
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(socket_err(path))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(socket_err(path))?;
    Ok(listener)
}

/// Rejects callers whose uid is not allow-listed, before any handler runs (counted in
/// `sluice_refused_peers_total`).
fn peer_filter(
    allow: Vec<u32>,
    metrics: Arc<Metrics>,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |req: Request<()>| {
        let uid = req
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|i| i.peer_cred)
            .map(|c| c.uid());
        match uid {
            Some(uid) if allow.contains(&uid) => Ok(req),
            other => {
                metrics.refused_peers.inc();
                tracing::warn!(peer_uid = ?other, "refusing API call from a peer that is not allow-listed");
                Err(Status::permission_denied(format!(
                    "peer uid {} is not allowed to use the sluice agent",
                    other.map_or("unknown".to_owned(), |u| u.to_string())
                )))
            }
        }
    }
}

fn set_install(state: &InstallState, result: Result<(), crate::node::install::InstallError>) {
    if let Err(e) = &result {
        tracing::warn!(error = %e, "node install is not in place; not ready until it is");
    }
    let mut guard = state.lock().unwrap_or_else(|p| p.into_inner());
    *guard = result.map_err(|e| e.to_string());
}

/// gRPC health SERVING iff the install is in place and the kernel path works (what the
/// DaemonSet's readiness probe asks).
async fn report_health(
    state: &InstallState,
    reporter: &tonic_health::server::HealthReporter,
    metrics: &Metrics,
) {
    let install = state
        .lock()
        .map_or_else(|p| p.into_inner().clone(), |g| g.clone());
    let ready = install.and_then(|()| crate::agent::readiness());
    metrics.ready.set(i64::from(ready.is_ok()));
    match ready {
        Ok(()) => {
            reporter
                .set_serving::<AgentServer<crate::api::grpc::GrpcService>>()
                .await
        }
        Err(reason) => {
            tracing::warn!(%reason, "agent is not ready to program pods");
            reporter
                .set_not_serving::<AgentServer<crate::api::grpc::GrpcService>>()
                .await;
        }
    }
}

/// How long in-flight calls may finish after shutdown is requested.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Runs the agent until `shutdown` resolves, then removes the socket.
pub async fn serve(
    config: AgentConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let policy = netns::Policy::new(config.netns_roots.clone()).map_err(ServeError::HostNetns)?;
    // What the kernel can do, tried in a scratch namespace before the socket exists, so every
    // answer the agent gives (readiness, CNI STATUS) already knows. Each kernel step in it is
    // bounded; a failed probe keeps the agent serving but not ready, with the reason.
    let _ = tokio::task::spawn_blocking(crate::kernel::probe::init).await;
    crate::kernel::device::use_sysctl_dir(&config.sysctl_dir).map_err(ServeError::Sysctl)?;
    let listener = bind(&config.socket)?;
    let socket = config.socket.clone();
    let allow = config.allow_uids.clone();
    tracing::info!(socket = %socket.display(), roots = ?config.netns_roots, allow_uids = ?allow, "sluice-agent serving");

    let (health_reporter, health) = tonic_health::server::health_reporter();
    let metrics = Arc::new(Metrics::new());
    let metrics_task = match config.metrics_addr {
        Some(addr) => {
            let listener = crate::metrics::bind(addr)
                .await
                .map_err(|e| ServeError::Metrics(addr, e))?;
            Some(tokio::spawn(crate::metrics::serve(
                listener,
                metrics.clone(),
            )))
        }
        None => None,
    };
    let install_state: InstallState = Arc::new(std::sync::Mutex::new(Ok(())));
    let node_install = config.install.clone();
    let mut _watcher = None;
    if let Some(ni) = &node_install {
        set_install(&install_state, ni.installer.install().map(|changes| {
            tracing::info!(binary_written = changes.binary, config_written = ?changes.config, "install pass done");
        }));
        // Keep the chain in place when the primary CNI rewrites its config.
        let (state, reporter) = (install_state.clone(), health_reporter.clone());
        let watch_metrics = metrics.clone();
        let handle = tokio::runtime::Handle::current();
        _watcher = Some(
            ni.installer
                .clone()
                .watch(move |result| {
                    if let Ok(written) = &result {
                        tracing::info!(written = %written.as_ref().map_or("nothing".to_owned(), |p| p.display().to_string()), "install watch pass");
                    }
                    set_install(&state, result.map(drop));
                    let (state, reporter) = (state.clone(), reporter.clone());
                    let metrics = watch_metrics.clone();
                    handle.spawn(async move { report_health(&state, &reporter, &metrics).await });
                })
                .map_err(ServeError::Install)?,
        );
    }
    let health_task = match config.health_addr {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| ServeError::Health(addr, e))?;
            tracing::info!(addr = %listener.local_addr().map_err(|e| ServeError::Health(addr, e))?, "gRPC health served on TCP");
            // Bounded connections, each for a bounded time (see `ports`): the port is on the
            // node's address, reachable by any pod.
            let server = tonic::transport::Server::builder()
                .add_service(health.clone())
                .serve_with_incoming(
                    crate::api::ports::Bounded::new(listener, "health").incoming(),
                );
            Some(tokio::spawn(server))
        }
        None => None,
    };
    let discovery = config
        .cri_socket
        .clone()
        .map(|socket| (socket, config.repair, config.reconcile_interval));
    let ready_metrics = metrics.clone();
    let peer_metrics = metrics.clone();
    let service = Arc::new(Agent::new(
        config.plan.clone(),
        policy,
        metrics.clone(),
        install_state.clone(),
    ));
    report_health(&install_state, &health_reporter, &ready_metrics).await;
    // Sandbox discovery and repair: a first pass now (rebuilding the records after a
    // restart), then one per interval.
    let reconciler = discovery.map(|(socket, repair, interval)| {
        service.set_discovery(format!("cri {}: first pass pending", socket.display()));
        tracing::info!(cri_socket = %socket.display(), ?repair, ?interval, "sandbox discovery on");
        tokio::spawn(crate::node::reconcile::run(
            service.clone(),
            crate::node::discovery::Cri::new(&socket),
            repair,
            interval,
        ))
    });
    if reconciler.is_none() {
        tracing::info!(
            "sandbox discovery off (no CRI socket): records come from the plugin's calls alone"
        );
    }
    // Graceful shutdown waits for clients to hang up; a long-lived client (sluicectl watch,
    // a benchmark) must not keep a SIGTERMed agent alive, so in-flight calls get a bounded
    // grace period.
    let stop = std::sync::Arc::new(tokio::sync::Notify::new());
    let stopped = stop.clone();
    let server = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(tonic::service::interceptor::InterceptedService::new(
            AgentServer::new(crate::api::grpc::GrpcService::new(service, metrics)),
            peer_filter(allow, peer_metrics),
        ))
        .serve_with_incoming_shutdown(crate::api::ports::unix_incoming(listener), async move {
            stopped.notified().await
        });
    tokio::pin!(server);
    let result = tokio::select! {
        result = &mut server => result,
        () = shutdown => {
            stop.notify_one();
            match tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await {
                Ok(result) => result,
                Err(_) => {
                    tracing::warn!(grace = ?SHUTDOWN_GRACE, "clients still connected; stopping anyway");
                    Ok(())
                }
            }
        }
    };
    let _ = std::fs::remove_file(&socket);
    if let Some(task) = reconciler {
        task.abort();
    }
    if let Some(task) = metrics_task {
        task.abort();
    }
    if let Some(task) = health_task {
        task.abort();
    }
    drop(_watcher);
    if let Some(ni) = node_install.filter(|ni| ni.uninstall_on_exit) {
        match ni.installer.uninstall() {
            Ok(()) => tracing::info!("uninstalled on exit (--uninstall-on-exit)"),
            Err(e) => tracing::error!(error = %e, "uninstall on exit failed"),
        }
    }
    tracing::info!("sluice-agent stopped");
    Ok(result?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p)
            .map(|m| m.permissions().mode() & 0o7777)
            .unwrap_or(0)
    }

    #[tokio::test]
    async fn the_socket_directory_is_narrowed_only_when_it_is_the_agents() {
        let tmp = tempfile::tempdir().expect("tempdir");
        // A hostPath DirectoryOrCreate: 0755, empty.
        let own = tmp.path().join("sluice");
        std::fs::DirBuilder::new()
            .mode(0o755)
            .create(&own)
            .expect("dir");
        let sock = own.join("agent.sock");
        drop(bind(&sock).expect("bind"));
        assert_eq!(mode(&own), 0o700);
        assert_eq!(mode(&sock), 0o600);
        // Again, with the stale socket left behind: still the agent's.
        std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        drop(bind(&sock).expect("rebind over a stale socket"));
        assert_eq!(mode(&own), 0o700);
        // A shared directory keeps its mode.
        let shared = tmp.path().join("run");
        std::fs::DirBuilder::new()
            .mode(0o755)
            .create(&shared)
            .expect("dir");
        std::fs::write(shared.join("other.pid"), "1").expect("other file");
        drop(bind(&shared.join("agent.sock")).expect("bind"));
        assert_eq!(mode(&shared), 0o755);
    }
}
