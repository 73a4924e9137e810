//! Serving the API on a unix socket: directory 0700, socket 0600, peers vetted by
//! `SO_PEERCRED`, plus the standard gRPC health service.

use std::future::Future;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::Path;

use sluice_proto::v1::agent_server::AgentServer;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Status};

use crate::config::AgentConfig;
use crate::netns;
use crate::service::AgentService;

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
}

fn socket_err(path: &Path) -> impl FnOnce(std::io::Error) -> ServeError + '_ {
    move |source| ServeError::Socket {
        path: path.into(),
        source,
    }
}

/// Binds the socket: creates its directory 0700 if missing, replaces a stale socket (never
/// another kind of file), and sets the socket to 0600.
pub fn bind(path: &Path) -> Result<UnixListener, ServeError> {
    if let Some(dir) = path.parent().filter(|d| !d.exists()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(socket_err(path))?;
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

/// Rejects callers whose uid is not allow-listed, before any handler runs.
fn peer_filter(allow: Vec<u32>) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |req: Request<()>| {
        let uid = req
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|i| i.peer_cred)
            .map(|c| c.uid());
        match uid {
            Some(uid) if allow.contains(&uid) => Ok(req),
            other => {
                tracing::warn!(peer_uid = ?other, "refusing API call from a peer that is not allow-listed");
                Err(Status::permission_denied(format!(
                    "peer uid {} is not allowed to use the sluice agent",
                    other.map_or("unknown".to_owned(), |u| u.to_string())
                )))
            }
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
    let listener = bind(&config.socket)?;
    let socket = config.socket.clone();
    let allow = config.allow_uids.clone();
    tracing::info!(socket = %socket.display(), roots = ?config.netns_roots, allow_uids = ?allow, "sluice-agent serving");

    let (health_reporter, health) = tonic_health::server::health_reporter();
    let service = AgentService::new(config, policy);
    match crate::service::readiness() {
        Ok(()) => {
            health_reporter
                .set_serving::<AgentServer<AgentService>>()
                .await
        }
        Err(reason) => {
            tracing::warn!(%reason, "agent is not ready to program pods");
            health_reporter
                .set_not_serving::<AgentServer<AgentService>>()
                .await;
        }
    }
    // Graceful shutdown waits for clients to hang up; a long-lived client (sluicectl watch,
    // a benchmark) must not keep a SIGTERMed agent alive, so in-flight calls get a bounded
    // grace period.
    let stop = std::sync::Arc::new(tokio::sync::Notify::new());
    let stopped = stop.clone();
    let server = tonic::transport::Server::builder()
        .add_service(health)
        .add_service(AgentServer::with_interceptor(service, peer_filter(allow)))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async move {
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
    tracing::info!("sluice-agent stopped");
    Ok(result?)
}
