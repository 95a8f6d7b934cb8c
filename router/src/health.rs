//! Active health checks: every endpoint's `/health` is probed on an interval, so an
//! endpoint that died is skipped before a request finds out, and one that came back is used
//! again. Passive checks (refused connections, 5xx answers) live in the request path.

use std::sync::Arc;

use futures_util::future::join_all;
use tracing::{info, warn};

use crate::app::App;
use crate::proxy::Upstream;

/// Probes every endpoint once.
pub(crate) async fn probe_all(app: &App, upstream: &Upstream) {
    let endpoints = app.dispatcher.endpoints();
    let timeout = app.config.health.timeout;
    let results = join_all(endpoints.iter().map(|e| upstream.get(e, "/health", timeout))).await;
    for (endpoint, result) in endpoints.iter().zip(results) {
        match result {
            Ok(_) => {
                if endpoint.health.record_success() {
                    info!(endpoint = %endpoint.name, "endpoint healthy again");
                }
            }
            Err(error) => {
                if endpoint.health.mark_down() {
                    warn!(endpoint = %endpoint.name, %error, "endpoint failed its health probe");
                }
            }
        }
    }
}

/// Probes forever on the configured interval.
pub(crate) async fn run(app: Arc<App>, upstream: Upstream) {
    let mut tick = tokio::time::interval(app.config.health.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        probe_all(&app, &upstream).await;
    }
}
