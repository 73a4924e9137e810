//! One short-lived gRPC call to the node agent over its unix socket, with a deadline that
//! covers connecting too. The tokio runtime is built only on paths that call the agent.

use std::future::Future;
use std::time::Duration;

use sluice_proto::FIELD_METADATA_KEY;
use sluice_proto::v1::agent_client::AgentClient;
use tonic::Status;
use tonic::transport::{Channel, Endpoint};

use crate::error::*;

pub type Client = AgentClient<Channel>;

/// Runs `call` against the agent at `socket`; every failure becomes the CNI error a runtime
/// should see.
pub fn call<T, F, Fut>(socket: &str, timeout: Duration, call: F) -> Result<T, CniError>
where
    F: FnOnce(Client) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, Status>>,
{
    let unreachable = |why: String| {
        CniError::new(
            TRY_AGAIN_LATER,
            format!("sluice agent at {socket} is unreachable: {why}"),
        )
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| unreachable(format!("cannot start the client runtime: {e}")))?;
    crate::timing::mark("runtime");
    rt.block_on(async {
        let work = async {
            let channel = Endpoint::try_from(format!("unix://{socket}"))
                .map_err(|e| unreachable(e.to_string()))?
                .connect()
                .await
                .map_err(|e| unreachable(source_chain(&e)))?;
            crate::timing::mark("connected");
            let answer = call(AgentClient::new(channel))
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| from_status(socket, &s));
            crate::timing::mark("answered");
            answer
        };
        tokio::time::timeout(timeout, work)
            .await
            .unwrap_or_else(|_| {
                Err(unreachable(format!(
                    "no answer within {} ms",
                    timeout.as_millis()
                )))
            })
    })
}

/// `msg` as a request carrying the caller's deadline (`grpc-timeout`), from which the agent
/// derives its own: it answers "try again" before this side gives up, and work queued for a
/// caller that has gone never starts.
pub fn timed<T>(msg: T, timeout: Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(msg);
    request.set_timeout(timeout);
    request
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        cur = s.source();
    }
    msg
}

/// Maps an agent status to a CNI code, using the field the agent names.
fn from_status(socket: &str, s: &Status) -> CniError {
    let field = s
        .metadata()
        .get(FIELD_METADATA_KEY)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    // A status the agent sent never carries a source error; one made on this side from a
    // broken connection (the agent died or restarted mid-call: "transport error") does. The
    // call may or may not have been applied, and a retry is the answer either way.
    let transport = std::error::Error::source(s).is_some();
    let code = sluice_proto::cni_code::of_status(s.code(), field, transport);
    let msg = match code {
        TRY_AGAIN_LATER if transport => format!(
            "sluice agent at {socket} went away during the call: {}",
            source_chain(s)
        ),
        TRY_AGAIN_LATER => format!("sluice agent at {socket} is unavailable: {}", s.message()),
        _ => format!("sluice: {}", s.message()),
    };
    CniError::new(code, msg)
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_request_carries_the_callers_deadline() {
        let r = super::timed((), std::time::Duration::from_millis(2000));
        let header = r
            .metadata()
            .get("grpc-timeout")
            .map(|v| v.to_str().map(str::to_owned));
        assert!(
            matches!(header, Some(Ok(v)) if v.ends_with('u') || v.ends_with('m') || v.ends_with('n') || v.ends_with('S'))
        );
    }
}
