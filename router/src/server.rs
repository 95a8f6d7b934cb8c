//! The HTTP front: the accept loop, worker threads, background tasks and shutdown.
//!
//! Connections are accepted on the caller's runtime and handed to worker threads, each
//! running its own single-threaded runtime with its own pool of endpoint connections. A
//! request is then served start to finish on one thread (client connection, routing,
//! endpoint connection, streaming), so a proxied request costs no cross-thread wake-ups;
//! workers share only the routing state (the dispatcher's lock, held for microseconds).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use kvtier_serve::{accept, Connections};
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tracing::{debug, error, info};

use crate::app::App;
use crate::config::RouterConfig;
use crate::discovery::Discovery;
use crate::dispatch::Dispatcher;
use crate::endpoint::EndpointSpec;
use crate::handler;
use crate::health;
use crate::metrics::{EndpointLabels, Metrics};
use crate::proxy::Upstream;

/// Time allowed for in-flight responses to finish after shutdown is asked for.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest read buffer per connection. Big enough that an agent request that is already in
/// the socket buffer arrives in one read, as one frame, which the router then uses in place
/// instead of concatenating frames.
const READ_BUFFER_BYTES: usize = 4 << 20;

/// What a connection serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Surface {
    /// The OpenAI API and the router's own routes.
    Api,
    /// `/metrics` only.
    Metrics,
}

/// Runs the router on `listener` (and `/metrics` also on `metrics_listener`) until
/// `shutdown` completes, then drains in-flight responses.
///
/// # Errors
/// When a worker thread cannot be started or the listener has no address.
pub async fn run(
    config: RouterConfig,
    listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    discovery: Arc<dyn Discovery>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut registry = Registry::default();
    let metrics = Metrics::new(&mut registry);
    let app = Arc::new(App { dispatcher: Dispatcher::new(&config), metrics, registry, config });
    let control = Upstream::new(&app.config.upstream);
    let mut tasks = JoinSet::new();
    let mut endpoints_rx = discovery.subscribe();
    let initial = endpoints_rx.borrow_and_update().clone();
    apply_endpoints(&app, &initial);
    {
        let app = app.clone();
        tasks.spawn(async move {
            while endpoints_rx.changed().await.is_ok() {
                let specs = endpoints_rx.borrow_and_update().clone();
                apply_endpoints(&app, &specs);
            }
        });
    }
    tasks.spawn(health::run(app.clone(), control.clone()));
    if let (Some(t), Some(cfg)) = (app.dispatcher.tiers(), &app.config.tiers) {
        for (node, url) in &cfg.feeds {
            tasks.spawn(crate::tiers::follow(node.clone(), url.clone(), t.clone()));
        }
        if let Some(agents) = cfg.agents.clone() {
            tasks.spawn(crate::tiers::follow_all(agents, t.clone()));
        }
        if let Some(p) = cfg.prefetch.clone() {
            tasks.spawn(crate::tiers::prefetch_loop(t.clone(), p));
        }
    }
    {
        let app = app.clone();
        let every = (app.config.session.idle_ttl / 4)
            .clamp(Duration::from_secs(1), Duration::from_secs(30));
        tasks.spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                app.dispatcher.sweep(Instant::now());
            }
        });
    }
    if let Some(l) = metrics_listener {
        info!(addr = %l.local_addr()?, "serving metrics");
        let app = app.clone();
        let control = control.clone();
        tasks.spawn(async move {
            let mut connections = Connections::new(serve_options(&app));
            tokio::pin!(let never = std::future::pending::<()>(););
            while let Some(stream) = accept(&l, never.as_mut()).await {
                serve_connection(&app, &control, &mut connections, stream, Surface::Metrics);
            }
        });
    }

    let workers = (0..app.config.workers.get())
        .map(|i| Worker::start(i, app.clone()))
        .collect::<std::io::Result<Vec<_>>>()?;
    info!(
        addr = %listener.local_addr()?,
        policy = app.config.policy.label(),
        workers = workers.len(),
        "router listening"
    );
    tokio::pin!(shutdown);
    let mut next = 0usize;
    while let Some(stream) = accept(&listener, shutdown.as_mut()).await {
        // Round-robin over workers; a connection stays on its worker for its life.
        match stream.into_std() {
            Ok(std) => {
                if workers[next % workers.len()].connections.send(std).is_err() {
                    error!("a worker thread is gone; connection dropped");
                }
                next = next.wrapping_add(1);
            }
            Err(error) => debug!(%error, "connection lost before hand-off"),
        }
    }
    // Closed now, not when draining ends: new connections are refused (and go to another
    // replica) instead of waiting in the backlog of a router that will never serve them.
    drop(listener);
    tasks.abort_all();
    info!("draining in-flight responses");
    let drained = workers.into_iter().map(Worker::stop);
    for done in drained {
        let _ = done.await;
    }
    Ok(())
}

fn apply_endpoints(app: &App, specs: &[EndpointSpec]) {
    let change = app.dispatcher.set_endpoints(specs);
    for e in &change.added {
        info!(endpoint = %e.name, id = %e.id, "endpoint added");
    }
    for e in &change.removed {
        info!(endpoint = %e.name, id = %e.id, "endpoint removed");
        let labels = EndpointLabels { endpoint: e.name.clone() };
        app.metrics.in_flight_requests.remove(&labels);
        app.metrics.in_flight_tokens.remove(&labels);
        app.metrics.endpoint_healthy.remove(&labels);
    }
}

/// How the router serves its connections.
fn serve_options(app: &App) -> kvtier_serve::Options {
    kvtier_serve::Options {
        header_timeout: app.config.client.header_timeout,
        max_buf_size: Some(READ_BUFFER_BYTES),
        drain_timeout: DRAIN_TIMEOUT,
    }
}

/// Serves one connection on the current runtime until it closes or shutdown drains it.
fn serve_connection(
    app: &Arc<App>,
    upstream: &Upstream,
    connections: &mut Connections,
    stream: TcpStream,
    surface: Surface,
) {
    let service = {
        let (app, upstream) = (app.clone(), upstream.clone());
        service_fn(move |req| {
            let (app, upstream) = (app.clone(), upstream.clone());
            async move {
                Ok::<_, std::convert::Infallible>(match surface {
                    Surface::Api => handler::handle(&app, &upstream, req).await,
                    Surface::Metrics => handler::metrics_only(&app, &req),
                })
            }
        })
    };
    connections.serve(stream, service);
}

/// A worker thread with its own runtime and endpoint connection pool.
#[derive(Debug)]
struct Worker {
    connections: mpsc::UnboundedSender<std::net::TcpStream>,
    done: oneshot::Receiver<()>,
}

impl Worker {
    fn start(index: usize, app: Arc<App>) -> std::io::Result<Self> {
        let (connections, mut incoming) = mpsc::unbounded_channel::<std::net::TcpStream>();
        let (done_tx, done) = oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        std::thread::Builder::new().name(format!("kvtier-router-{index}")).spawn(move || {
            runtime.block_on(async move {
                let upstream = Upstream::new(&app.config.upstream);
                let mut connections = Connections::new(serve_options(&app));
                while let Some(std) = incoming.recv().await {
                    match TcpStream::from_std(std) {
                        Ok(stream) => {
                            serve_connection(
                                &app,
                                &upstream,
                                &mut connections,
                                stream,
                                Surface::Api,
                            );
                        }
                        Err(error) => debug!(%error, "connection lost in hand-off"),
                    }
                }
                connections.drain().await;
            });
            let _ = done_tx.send(());
        })?;
        Ok(Self { connections, done })
    }

    /// Stops taking connections; resolves once in-flight responses are drained.
    fn stop(self) -> oneshot::Receiver<()> {
        drop(self.connections);
        self.done
    }
}
