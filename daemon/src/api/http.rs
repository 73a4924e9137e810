//! The metrics endpoint: `GET /metrics` over plain HTTP/1.1 on a bounded port (see `ports`).

use std::net::SocketAddr;
use std::sync::Arc;

use crate::metrics::Metrics;

/// Binds the metrics address (start-up fails on a taken port rather than running blind).
pub async fn bind(addr: SocketAddr) -> std::io::Result<crate::api::ports::Bounded> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "metrics served at /metrics");
    Ok(crate::api::ports::Bounded::new(listener, "metrics"))
}

/// How long a scraper may take to send its request headers.
const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves `/metrics` until the task is dropped, a bounded number of connections at a time,
/// each for a bounded time (see `ports`); it keeps serving whatever one connection does.
pub async fn serve(listener: crate::api::ports::Bounded, metrics: Arc<Metrics>) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    loop {
        let stream = listener.accept().await;
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                let metrics = metrics.clone();
                async move {
                    if req.uri().path() == "/metrics" {
                        hyper::Response::builder()
                            .header(
                                "content-type",
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )
                            .body(Full::new(Bytes::from(metrics.render())))
                    } else {
                        hyper::Response::builder()
                            .status(404)
                            .body(Full::new(Bytes::from_static(b"see /metrics\n")))
                    }
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(io, service)
                .await
            {
                tracing::debug!(error = %e, "metrics connection");
            }
        });
    }
}
