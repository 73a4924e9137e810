//! Per-pod sysctls: written inside the pod's netns through the agent's sysctl directory, with
//! the previous values kept to restore.

use super::DeviceError;

/// Where sysctls are written unless configured otherwise.
pub const DEFAULT_SYSCTL_DIR: &str = "/proc/sys";

/// The agent's sysctl directory, set once at start-up ([`use_sysctl_dir`]). A process-wide
/// setting rather than a parameter: it is a fact of the agent's mount namespace, the same for
/// every pod, read on netns worker threads deep below the service.
static SYSCTL_DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// Checks that `net.*` sysctls can be written through `dir` and makes it the agent's sysctl
/// directory. A container's own `/proc/sys` is mounted read-only by the runtime (and AppArmor's
/// default profile denies writes below it): under the DaemonSet `dir` is the host's
/// `/proc/sys` mounted elsewhere. Refusing to start beats failing every pod that asks for a
/// sysctl.
pub fn use_sysctl_dir(dir: &std::path::Path) -> Result<(), String> {
    let net = dir.join("net");
    let vfs = nix::sys::statvfs::statvfs(&net).map_err(|e| {
        format!(
            "sysctl dir {}: {e}; set sysctl-dir to where /proc/sys/net is mounted",
            net.display()
        )
    })?;
    if vfs.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY) {
        return Err(format!(
            "sysctl dir {} is mounted read-only (a container's /proc/sys is): mount the host's /proc/sys/net writable elsewhere and set sysctl-dir (the DaemonSet in manifests/ does)",
            net.display()
        ));
    }
    let _ = SYSCTL_DIR.set(dir.to_owned());
    Ok(())
}

/// The file of a sysctl. `net/...` under procfs resolves against the calling *thread's*
/// network namespace (whichever mount of procfs it is reached through), so on a netns worker
/// thread this is the pod's.
pub(super) fn sysctl_path(name: &str) -> std::path::PathBuf {
    SYSCTL_DIR
        .get()
        .map_or(std::path::Path::new(DEFAULT_SYSCTL_DIR), |d| d.as_path())
        .join(name.replace('.', "/"))
}

/// Writes each sysctl and returns the previous values. If one fails, those already written
/// are restored first, so the namespace is left as it was.
pub fn write_sysctls(list: &[(String, String)]) -> Result<Vec<(String, String)>, DeviceError> {
    let mut previous = Vec::with_capacity(list.len());
    for (name, value) in list {
        let path = sysctl_path(name);
        let result = std::fs::read_to_string(&path).and_then(|old| {
            std::fs::write(&path, value)?;
            Ok(old.trim().to_owned())
        });
        match result {
            Ok(old) => previous.push((name.clone(), old)),
            Err(source) => {
                restore_sysctls(&previous);
                return Err(DeviceError::Sysctl {
                    name: name.clone(),
                    source,
                });
            }
        }
    }
    Ok(previous)
}

/// Best-effort restore of values returned by [`write_sysctls`], newest first.
pub fn restore_sysctls(previous: &[(String, String)]) {
    for (name, value) in previous.iter().rev() {
        if let Err(e) = std::fs::write(sysctl_path(name), value) {
            tracing::error!(sysctl = %name, error = %e, "restoring a sysctl failed");
        }
    }
}
