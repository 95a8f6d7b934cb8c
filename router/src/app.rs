//! What every request handler shares, on every thread: the configuration, the routing state,
//! the metrics and their registry. The server builds it; handlers, health checks and the
//! models route read it.

use prometheus_client::registry::Registry;

use crate::config::RouterConfig;
use crate::dispatch::Dispatcher;
use crate::metrics::Metrics;

/// Everything a request handler needs, shared by all threads.
#[derive(Debug)]
pub(crate) struct App {
    pub(crate) config: RouterConfig,
    pub(crate) dispatcher: Dispatcher,
    pub(crate) metrics: Metrics,
    pub(crate) registry: Registry,
}
