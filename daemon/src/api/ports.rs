//! The agent's TCP ports (metrics, health): reachable from the node's network, pods included,
//! so bounded in what they can take from the agent. At most [`MAX_CONNECTIONS`] connections
//! are open on each port at once — past that, callers wait in the kernel's listen backlog,
//! holding none of the agent's file descriptors, so they can never starve the ADD path — and
//! each connection lives at most [`CONNECTION_LIFETIME`] (a probe or a scrape takes
//! milliseconds). An `accept` error (fd exhaustion, a connection reset before it was taken)
//! never ends a server: it is logged and accepting resumes after a short pause.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Connections open at once on one port. Prometheus scrapes one at a time, kubelet probes one
/// at a time; 8 leaves room for a few concurrent readers and bounds the fds to 8 per port.
pub const MAX_CONNECTIONS: usize = 8;

/// The longest one connection may stay open, idle or not.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(10);

/// How long to pause after an `accept` error before accepting again (fd exhaustion would
/// otherwise turn the loop into a busy spin).
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// A listener that hands out at most [`MAX_CONNECTIONS`] connections at a time.
#[derive(Debug)]
pub struct Bounded {
    listener: TcpListener,
    slots: Arc<Semaphore>,
    /// What the port serves, for logs.
    what: &'static str,
}

impl Bounded {
    pub fn new(listener: TcpListener, what: &'static str) -> Self {
        Bounded {
            listener,
            slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            what,
        }
    }

    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// The next connection, once a slot is free. Never fails: accept errors are logged and
    /// retried.
    pub async fn accept(&self) -> Conn {
        let Ok(slot) = self.slots.clone().acquire_owned().await else {
            unreachable!("the semaphore is never closed")
        };
        loop {
            match self.listener.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    return Conn {
                        stream,
                        _slot: slot,
                        expires: Box::pin(tokio::time::sleep(CONNECTION_LIFETIME)),
                    };
                }
                Err(e) => {
                    tracing::warn!(port = self.what, error = %e, "accepting a connection failed; accepting again shortly");
                    tokio::time::sleep(ACCEPT_PAUSE).await;
                }
            }
        }
    }

    /// The connections as a stream, for tonic's `serve_with_incoming`.
    pub fn incoming(
        self,
    ) -> impl tokio_stream::Stream<Item = Result<Conn, std::io::Error>> + Send + 'static {
        futures_util::stream::unfold(self, |this| async move {
            let conn = this.accept().await;
            Some((Ok(conn), this))
        })
    }
}

/// The agent's unix socket (root's only, see `server::bind`) as a stream of connections, for
/// tonic: not bounded in number (the plugin's calls are admitted by `work`), but an accept
/// error is logged and followed by a pause, never a busy retry (tonic itself retries at once,
/// which at the fd limit would spin a core).
pub fn unix_incoming(
    listener: tokio::net::UnixListener,
) -> impl tokio_stream::Stream<Item = Result<tokio::net::UnixStream, std::io::Error>> + Send + 'static
{
    futures_util::stream::unfold(listener, |listener| async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => return Some((Ok(stream), listener)),
                Err(e) => {
                    tracing::warn!(port = "agent socket", error = %e, "accepting a connection failed; accepting again shortly");
                    tokio::time::sleep(ACCEPT_PAUSE).await;
                }
            }
        }
    })
}

/// One accepted connection: its slot is freed when it is dropped, and it reads and writes
/// nothing more past its lifetime.
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
    expires: Pin<Box<tokio::time::Sleep>>,
}

impl Conn {
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        self.expires.as_mut().poll(cx).is_ready()
    }
}

fn lifetime_over() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "the connection outlived its lifetime",
    )
}

impl AsyncRead for Conn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.expired(cx) {
            return Poll::Ready(Err(lifetime_over()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.expired(cx) {
            return Poll::Ready(Err(lifetime_over()));
        }
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Past the bound, a connection waits in the backlog (not accepted, no fd of ours); a
    /// freed slot lets it in; a connection is cut at the end of its lifetime.
    #[tokio::test(start_paused = true)]
    async fn connections_are_bounded_in_number_and_time() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let bounded = Arc::new(Bounded::new(listener, "test"));
        let mut clients = Vec::new();
        for _ in 0..=MAX_CONNECTIONS {
            clients.push(TcpStream::connect(addr).await.expect("connect"));
        }
        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            held.push(bounded.accept().await);
        }
        let next = tokio::spawn({
            let b = bounded.clone();
            async move { b.accept().await }
        });
        tokio::task::yield_now().await;
        assert!(!next.is_finished(), "the ninth waits for a slot");
        drop(held.pop());
        let mut conn = next.await.expect("accepted once a slot was freed");
        tokio::time::advance(CONNECTION_LIFETIME + Duration::from_millis(1)).await;
        let mut buf = [0u8; 1];
        let err = tokio::io::AsyncReadExt::read(&mut conn, &mut buf)
            .await
            .expect_err("cut at the end of its lifetime");
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
    }
}
