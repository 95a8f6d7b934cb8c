//! The operator's metrics (`kvtier_operator_*`) and its small HTTP side: `/metrics`,
//! `/healthz` (the process runs) and `/readyz` (the controller's watches are up).

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// A bounded label: what kind of failure.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// `invalid_spec`, `conflict`, `forbidden`, `not_found`, `invalid`, `server`, `transport`,
    /// `other`.
    pub kind: &'static str,
}

/// A bounded label: how a reconcile ended.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `applied`, `refused` or `error`.
    pub result: &'static str,
}

/// Every operator metric.
#[derive(Debug)]
pub struct Metrics {
    /// Seconds per reconcile.
    pub duration: Histogram,
    /// Reconciles by result.
    pub reconciles: Family<ResultLabels, Counter>,
    /// Failures by kind.
    pub errors: Family<KindLabels, Counter>,
    /// Set once the controller runs.
    pub ready: AtomicBool,
    registry: Registry,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    #[must_use]
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("kvtier_operator");
        let duration = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        let reconciles = Family::<ResultLabels, Counter>::default();
        let errors = Family::<KindLabels, Counter>::default();
        registry.register("reconcile_duration_seconds", "Seconds per reconcile", duration.clone());
        registry.register("reconciles", "Reconciles by result", reconciles.clone());
        registry.register("reconcile_errors", "Reconcile failures by kind", errors.clone());
        Self { duration, reconciles, errors, ready: AtomicBool::new(false), registry }
    }

    /// Prometheus' text format.
    #[must_use]
    pub fn text(&self) -> String {
        let mut s = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut s, &self.registry);
        s
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown` is cancelled,
/// then lets requests in flight finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    shutdown: kvtier_serve::CancellationToken,
) {
    let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let m = metrics.clone();
        async move {
            let (status, body) = match req.uri().path() {
                "/metrics" => (200, m.text()),
                "/healthz" => (200, "ok\n".to_owned()),
                "/readyz" if m.ready.load(Ordering::Relaxed) => (200, "ok\n".to_owned()),
                "/readyz" => (503, "the controller is not running yet\n".to_owned()),
                _ => (404, "not found\n".to_owned()),
            };
            let mut res = hyper::Response::new(Full::new(Bytes::from(body)));
            *res.status_mut() =
                hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
            Ok::<_, Infallible>(res)
        }
    });
    kvtier_serve::run(listener, svc, shutdown, kvtier_serve::Options::default()).await;
}
