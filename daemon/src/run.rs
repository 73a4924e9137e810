//! The agent process: everything wired together — the kernel probe, the sysctl directory,
//! the node install and its watch, the socket with the gRPC and health services, the metrics
//! and health ports, the reconciler — until shutdown.

use std::future::Future;
use std::sync::Arc;

use sluice_proto::v1::agent_server::AgentServer;

use crate::agent::{Agent, InstallState};
use crate::api::grpc::GrpcService;
use crate::api::server::{bind, peer_filter};
use crate::config::AgentConfig;
use crate::kernel::netns;
use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Socket(#[from] crate::api::server::SocketError),
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
        Ok(()) => reporter.set_serving::<AgentServer<GrpcService>>().await,
        Err(reason) => {
            tracing::warn!(%reason, "agent is not ready to program pods");
            reporter.set_not_serving::<AgentServer<GrpcService>>().await;
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
            let listener = crate::api::http::bind(addr)
                .await
                .map_err(|e| ServeError::Metrics(addr, e))?;
            Some(tokio::spawn(crate::api::http::serve(
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
        // Keep the chain in place when the primary CNI rewrites its config. The watch starts
        // before the first pass: a rewrite between the two would otherwise go unseen (the
        // pass's own write only brings a pass that finds the entry there).
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
        set_install(&install_state, ni.installer.install().map(|changes| {
            tracing::info!(binary_written = changes.binary, config_written = ?changes.config, "install pass done");
        }));
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
            AgentServer::new(GrpcService::new(service, metrics)),
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
