//! The agent's unix socket: directory 0700, socket 0600, peers vetted by `SO_PEERCRED` before
//! any verb runs.

use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use tokio::net::UnixListener;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Status};

use crate::metrics::Metrics;

/// The socket could not be prepared.
#[derive(Debug, thiserror::Error)]
#[error("preparing socket {path:?}: {source}")]
pub struct SocketError {
    pub path: std::path::PathBuf,
    #[source]
    pub source: std::io::Error,
}

fn socket_err(path: &Path) -> impl FnOnce(std::io::Error) -> SocketError + '_ {
    move |source| SocketError {
        path: path.into(),
        source,
    }
}

/// Binds the socket: its directory is made 0700 — created so if missing; narrowed if it is
/// the agent's (holds nothing but the socket) yet wider, as a hostPath `DirectoryOrCreate`
/// makes it 0755; a shared directory (`/run`, `/tmp`) is left alone with a warning, the socket's
/// own 0600 guarding it; refused if another user owns it — replaces a stale socket (never
/// another kind of file), and sets the socket to 0600.
pub fn bind(path: &Path) -> Result<UnixListener, SocketError> {
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
pub fn peer_filter(
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
