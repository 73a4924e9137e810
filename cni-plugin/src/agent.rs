//! One unary gRPC call to the node agent over its unix socket, through tonic's generated
//! client (the one `sluicectl` uses), on a current-thread runtime built for the call: connect,
//! call, hang up, all under one deadline that starts before connecting.
//!
//! The plugin once carried its own blocking HTTP/2 client and HPACK decoder; they saved about
//! 0.1 ms of a pod start, in a binary that runs as root on every node, and every reviewer had
//! to audit a protocol stack that h2 and tonic maintain for everyone. What the swap costs is in
//! docs/benchmark.md.

use std::time::Duration;

use sluice_proto::FIELD_METADATA_KEY;
use sluice_proto::v1::agent_client::AgentClient;
use tonic::transport::{Channel, Endpoint};

use crate::cni::error::{CniError, TRY_AGAIN_LATER};

/// Why a call did not produce an answer from the agent.
#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("{0}")]
    Connect(String),
    #[error("no answer within {0} ms")]
    Timeout(u128),
    /// Broken mid-call (the agent died or restarted): it may or may not have acted.
    #[error("{0}")]
    Transport(String),
    /// The agent's gRPC status.
    #[error("{message}")]
    Status {
        code: tonic::Code,
        message: String,
        field: String,
    },
}

/// Calls the agent with `call` on a client connected to `socket`; every failure becomes the
/// CNI error a runtime should see. `timeout` bounds everything from the connect on, and is
/// sent as `grpc-timeout`, from which the agent derives its own deadline (so it answers "try
/// again" before this side gives up, and work queued for a caller that has gone never starts).
pub fn call<Req, Resp, F, Fut>(
    socket: &str,
    timeout: Duration,
    request: Req,
    call: F,
) -> Result<Resp, CniError>
where
    F: FnOnce(AgentClient<Channel>, tonic::Request<Req>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<Resp>, tonic::Status>>,
{
    crate::timing::mark("encoded");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
        .map_err(|e| {
            to_cni(
                socket,
                CallError::Connect(format!("starting a runtime: {e}")),
            )
        })?;
    let result = runtime.block_on(async {
        let mut request = tonic::Request::new(request);
        request.set_timeout(timeout);
        let attempt = async {
            let client = connect(socket).await?;
            crate::timing::mark("connected");
            call(client, request)
                .await
                .map_err(|s| classify(s, timeout))
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(r) => r.map(tonic::Response::into_inner),
            Err(_) => Err(CallError::Timeout(timeout.as_millis())),
        }
    });
    crate::timing::mark("answered");
    result.map_err(|e| to_cni(socket, e))
}

/// A channel over the agent's unix socket (the URI's authority is a placeholder: the socket,
/// not a name, says where the agent is).
async fn connect(socket: &str) -> Result<AgentClient<Channel>, CallError> {
    let path = socket.to_owned();
    let channel = Endpoint::from_static("http://sluice-agent")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await
        .map_err(|e| {
            let cause = std::error::Error::source(&e).map_or(e.to_string(), |s| s.to_string());
            CallError::Connect(cause)
        })?;
    Ok(AgentClient::new(channel))
}

/// A status the agent sent (from its trailers) keeps its code, message and field; one tonic
/// made from a broken connection (it carries the transport error as its source) is a call
/// that may or may not have been applied.
fn classify(status: tonic::Status, timeout: Duration) -> CallError {
    // tonic's own deadline (from `grpc-timeout`) is the call's deadline, whichever fires first.
    let mut cause = std::error::Error::source(&status);
    while let Some(e) = cause {
        if e.is::<tonic::TimeoutExpired>() {
            return CallError::Timeout(timeout.as_millis());
        }
        cause = e.source();
    }
    if let Some(source) = std::error::Error::source(&status) {
        return CallError::Transport(source.to_string());
    }
    let field = status
        .metadata()
        .get(FIELD_METADATA_KEY)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    CallError::Status {
        code: status.code(),
        message: status.message().to_owned(),
        field,
    }
}

fn to_cni(socket: &str, e: CallError) -> CniError {
    let code = match &e {
        CallError::Connect(_) | CallError::Timeout(_) | CallError::Transport(_) => TRY_AGAIN_LATER,
        CallError::Status { code, field, .. } => sluice_proto::cni_code::of_status(*code, field),
    };
    let msg = match (&e, code) {
        (CallError::Connect(_) | CallError::Timeout(_), _) => {
            format!("sluice agent at {socket} is unreachable: {e}")
        }
        (CallError::Transport(_), _) => {
            format!("sluice agent at {socket} went away during the call: {e}")
        }
        (_, TRY_AGAIN_LATER) => format!("sluice agent at {socket} is unavailable: {e}"),
        _ => format!("sluice: {e}"),
    };
    CniError::new(code, msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agents_status_keeps_its_code_message_and_field() {
        let mut status = tonic::Status::invalid_argument("annotation sluice.dev/mode: \"x\"");
        status.metadata_mut().insert(
            FIELD_METADATA_KEY,
            "annotation:sluice.dev/mode".parse().expect("ascii"),
        );
        let e = to_cni("/s", classify(status, Duration::ZERO));
        assert_eq!(e.code, sluice_proto::cni_code::INVALID_CONFIG);
        assert_eq!(e.msg, "sluice: annotation sluice.dev/mode: \"x\"");
        let mut netns = tonic::Status::invalid_argument("netns: outside the roots");
        netns
            .metadata_mut()
            .insert(FIELD_METADATA_KEY, "netns".parse().expect("ascii"));
        assert_eq!(
            to_cni("/s", classify(netns, Duration::ZERO)).code,
            sluice_proto::cni_code::INVALID_ENV
        );
    }

    #[test]
    fn unreachable_and_broken_calls_are_try_again_later() {
        let e = to_cni("/s", CallError::Connect("No such file or directory".into()));
        assert_eq!(
            (e.code, e.msg.as_str()),
            (
                TRY_AGAIN_LATER,
                "sluice agent at /s is unreachable: No such file or directory"
            )
        );
        // A status tonic made from a broken connection, not one the agent sent.
        let broken = tonic::Status::from_error(Box::new(std::io::Error::new(
            std::io::ErrorKind::BrokenPipe,
            "the connection was closed",
        )));
        let e = to_cni("/s", classify(broken, Duration::ZERO));
        assert_eq!(e.code, TRY_AGAIN_LATER);
        assert!(e.msg.contains("went away during the call"), "{}", e.msg);
        let e = to_cni("/s", CallError::Timeout(5000));
        assert_eq!(
            e.msg,
            "sluice agent at /s is unreachable: no answer within 5000 ms"
        );
    }

    /// The deadline covers connecting: a socket whose listener never accepts (its backlog
    /// full) or never answers ends the call at the timeout, as code 11.
    #[test]
    fn a_silent_agent_is_try_again_later_at_the_deadline() {
        let dir = std::env::temp_dir().join(format!("sluice-cni-silent-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let socket = dir.join("agent.sock");
        let _ = std::fs::remove_file(&socket);
        let _listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind");
        let r = call(
            socket.to_str().expect("utf8"),
            Duration::from_millis(300),
            sluice_proto::v1::StatusRequest {},
            |mut c, req| async move { c.status(req).await },
        );
        let e = r.expect_err("no answer");
        assert_eq!(e.code, TRY_AGAIN_LATER, "{e:?}");
        assert!(e.msg.contains("no answer within 300 ms"), "{}", e.msg);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
