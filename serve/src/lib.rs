//! One way to serve HTTP/1 in kvtier: accept, serve each connection, stop accepting when
//! shutdown is asked for, then let in-flight responses finish (for a bounded time).
//!
//! Every HTTP server in the workspace goes through [`Connections`]: the router's worker
//! threads each hold one; the simulator, the node-agent, the operator's metrics port and the
//! test stand-ins use [`run`]. Dropping a [`Connections`] (or aborting the task running
//! [`run`]) cuts its connections at once, the way a crashed server would: tests use that to
//! kill a replica.
//!
//! [`node_tier`] is the node tier's HTTP surface (`/residency`, `/prefetch`), which the
//! node-agent and the simulator both serve.

pub mod node_tier;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tracing::{debug, warn};

pub use tokio_util::sync::CancellationToken;

/// How connections are served.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Longest wait for a request's head once a connection is open or between requests on it
    /// (holds slow or idle clients to a bound).
    pub header_timeout: Duration,
    /// Largest read buffer per connection (hyper's default when `None`).
    pub max_buf_size: Option<usize>,
    /// How long in-flight responses get to finish once shutdown is asked for; what is still
    /// running then is cut.
    pub drain_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            max_buf_size: None,
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// The connections one accept loop (or one thread) serves, watched for a graceful shutdown.
#[derive(Debug)]
pub struct Connections {
    options: Options,
    graceful: GracefulShutdown,
    tasks: JoinSet<()>,
}

impl Connections {
    /// No connections yet.
    #[must_use]
    pub fn new(options: Options) -> Self {
        Self { options, graceful: GracefulShutdown::new(), tasks: JoinSet::new() }
    }

    /// Serves `stream` with `service` on the current runtime until the connection closes or
    /// [`Connections::drain`] ends it after its current response.
    pub fn serve<S, B>(&mut self, stream: TcpStream, service: S)
    where
        S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        S::Future: Send + 'static,
        B: http_body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        // Reap connections that have ended, so the set stays as large as what is open.
        while self.tasks.try_join_next().is_some() {}
        let mut builder = http1::Builder::new();
        builder.timer(TokioTimer::new()).header_read_timeout(self.options.header_timeout);
        if let Some(n) = self.options.max_buf_size {
            builder.max_buf_size(n);
        }
        let conn = self.graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        self.tasks.spawn(async move {
            if let Err(error) = conn.await {
                debug!(%error, "connection ended with an error");
            }
        });
    }

    /// Open connections (ended ones not yet reaped may count).
    #[must_use]
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    /// Whether none is open.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }

    /// Lets every connection finish its current response and closes it; true when all did
    /// within the drain timeout (the rest are cut).
    pub async fn drain(mut self) -> bool {
        let drained =
            tokio::time::timeout(self.options.drain_timeout, self.graceful.shutdown()).await;
        if drained.is_err() {
            warn!(
                open = self.tasks.len(),
                "responses still in flight after the drain timeout were cut"
            );
            self.tasks.abort_all();
        }
        while self.tasks.join_next().await.is_some() {}
        drained.is_ok()
    }
}

/// The next connection on `listener`, with TCP_NODELAY set, or `None` once `shutdown`
/// completes. A failed accept (e.g. out of file descriptors) is logged and retried after a
/// pause: it must not stop the server.
pub async fn accept<F: Future<Output = ()>>(
    listener: &TcpListener,
    mut shutdown: Pin<&mut F>,
) -> Option<TcpStream> {
    loop {
        let accepted = tokio::select! {
            () = shutdown.as_mut() => return None,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                if let Err(error) = stream.set_nodelay(true) {
                    debug!(%error, "TCP_NODELAY not set");
                }
                return Some(stream);
            }
            Err(error) => {
                warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Serves `service` on `listener` until `shutdown` is cancelled, then stops accepting (the
/// listener closes) and drains in-flight responses. True when every response finished within
/// the drain timeout.
pub async fn run<S, B>(
    listener: TcpListener,
    service: S,
    shutdown: CancellationToken,
    options: Options,
) -> bool
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Clone + Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::Future: Send + 'static,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut connections = Connections::new(options);
    let stopped = shutdown.cancelled();
    tokio::pin!(stopped);
    while let Some(stream) = accept(&listener, stopped.as_mut()).await {
        connections.serve(stream, service.clone());
    }
    drop(listener);
    connections.drain().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A response that sends "a", waits for `release`, then sends "b".
    fn slow(
        release: std::sync::Arc<tokio::sync::Notify>,
    ) -> Response<http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>> {
        let body = futures_util::stream::unfold(0u8, move |n| {
            let release = release.clone();
            async move {
                match n {
                    0 => Some((Ok(Frame::data(Bytes::from_static(b"a"))), 1)),
                    1 => {
                        release.notified().await;
                        Some((Ok(Frame::data(Bytes::from_static(b"b"))), 2))
                    }
                    _ => None,
                }
            }
        });
        Response::new(StreamBody::new(body).boxed())
    }

    #[tokio::test]
    async fn shutdown_stops_accepting_and_lets_the_response_in_flight_finish() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let release = std::sync::Arc::new(tokio::sync::Notify::new());
        let r = release.clone();
        let service = hyper::service::service_fn(move |_req| {
            let r = r.clone();
            async move { Ok::<_, std::convert::Infallible>(slow(r)) }
        });
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(run(listener, service, shutdown.clone(), Options::default()));
        let mut c = TcpStream::connect(addr).await.expect("connect");
        c.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await.expect("write");
        let mut buf = vec![0u8; 256];
        let n = c.read(&mut buf).await.expect("head");
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        shutdown.cancel();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(TcpStream::connect(addr).await.is_err(), "no longer accepting");
        assert!(!server.is_finished(), "waits for the response in flight");
        release.notify_one();
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).await.expect("rest");
        let text = String::from_utf8_lossy(&rest);
        assert!(text.contains("\r\nb\r\n0\r\n\r\n"), "the response completed: {text:?}");
        assert!(server.await.expect("server"), "drained in time");
    }

    #[tokio::test]
    async fn a_response_past_the_drain_timeout_is_cut() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let never = std::sync::Arc::new(tokio::sync::Notify::new());
        let service = hyper::service::service_fn(move |_req| {
            let n = never.clone();
            async move { Ok::<_, std::convert::Infallible>(slow(n)) }
        });
        let shutdown = CancellationToken::new();
        let options = Options { drain_timeout: Duration::from_millis(200), ..Options::default() };
        let server = tokio::spawn(run(listener, service, shutdown.clone(), options));
        let mut c = TcpStream::connect(addr).await.expect("connect");
        c.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n").await.expect("write");
        let mut buf = vec![0u8; 256];
        let _ = c.read(&mut buf).await.expect("head");
        shutdown.cancel();
        assert!(!server.await.expect("server"), "reported as cut");
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest).await;
        assert!(!String::from_utf8_lossy(&rest).contains("0\r\n\r\n"), "never completed");
    }
}
