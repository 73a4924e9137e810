//! Per-pod device setup through rtnetlink. Runs on a netns worker thread, so the rtnetlink
//! connection is opened after entering the pod's namespace and belongs to it.

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("building the netlink runtime: {0}")]
    Runtime(#[source] std::io::Error),
    #[error("opening an rtnetlink connection: {0}")]
    Connect(#[source] std::io::Error),
    #[error("setting lo up: {0}")]
    LoopbackUp(#[source] rtnetlink::Error),
    #[error("sysctl {name}: {source}")]
    Sysctl {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// The loopback device's index, fixed by the kernel in every namespace.
const LOOPBACK_INDEX: u32 = 1;

/// Brings `lo` up. Redirected connections land on loopback, so without it nothing works.
pub fn setup() -> Result<(), DeviceError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(DeviceError::Runtime)?;
    rt.block_on(async {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(DeviceError::Connect)?;
        let task = tokio::spawn(connection);
        let result = handle
            .link()
            .set(
                rtnetlink::LinkUnspec::new_with_index(LOOPBACK_INDEX)
                    .up()
                    .build(),
            )
            .execute()
            .await
            .map_err(DeviceError::LoopbackUp);
        task.abort();
        result
    })
}

/// The /proc/sys file of a sysctl. `/proc/sys/net` resolves against the calling *thread's*
/// network namespace, so on a netns worker thread this is the pod's.
fn sysctl_path(name: &str) -> std::path::PathBuf {
    std::path::Path::new("/proc/sys").join(name.replace('.', "/"))
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
