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
