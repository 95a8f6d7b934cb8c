//! `kvtier operator` flags; each can also come from a `KVTIER_OPERATOR_*` variable.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;

use crate::metrics::{self, Metrics};
use crate::objects::Settings;

/// Flags of `kvtier operator`.
#[derive(Debug, clap::Args)]
pub struct OperatorArgs {
    /// Watch only this namespace (default: every namespace).
    #[arg(long, env = "KVTIER_OPERATOR_NAMESPACE")]
    pub namespace: Option<String>,
    /// Image with the `kvtier` binary and the connector (router, node-agent, connector copy).
    #[arg(long, env = "KVTIER_OPERATOR_KVTIER_IMAGE")]
    pub kvtier_image: Option<String>,
    /// Pull policy for that image.
    #[arg(long, env = "KVTIER_OPERATOR_IMAGE_PULL_POLICY", default_value = "IfNotPresent")]
    pub image_pull_policy: String,
    /// The node-agents' `--mlock`: `required`, `best-effort` or `off`.
    #[arg(long, env = "KVTIER_OPERATOR_AGENT_MLOCK", default_value = "best-effort")]
    pub agent_mlock: String,
    /// A namespace whose Pods may scrape the node-agents' `/metrics` (Prometheus'); repeat
    /// or comma-separate. The agents' NetworkPolicy admits these and the resource's router.
    #[arg(long, env = "KVTIER_OPERATOR_AGENT_METRICS_NAMESPACES", value_delimiter = ',')]
    pub agent_metrics_namespace: Vec<String>,
    /// Serve `/metrics`, `/healthz` and `/readyz` here.
    #[arg(long, env = "KVTIER_OPERATOR_METRICS_LISTEN", default_value = "0.0.0.0:8080")]
    pub metrics_listen: SocketAddr,
}

/// Runs the operator with `args` until `shutdown` completes. The cluster comes from
/// `KUBECONFIG` (or `~/.kube/config`) or, inside a Pod, its service account.
///
/// # Errors
/// Bad flags, no cluster, or a missing CRD.
pub async fn run(
    args: OperatorArgs,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> anyhow::Result<()> {
    if !["required", "best-effort", "off"].contains(&args.agent_mlock.as_str()) {
        anyhow::bail!("--agent-mlock is {:?}: use required, best-effort or off", args.agent_mlock);
    }
    let mut settings = Settings {
        image_pull_policy: args.image_pull_policy,
        agent_mlock: args.agent_mlock,
        agent_metrics_namespaces: args.agent_metrics_namespace,
        ..Settings::default()
    };
    if let Some(image) = args.kvtier_image {
        settings.kvtier_image = image;
    }
    let listener = tokio::net::TcpListener::bind(args.metrics_listen)
        .await
        .with_context(|| format!("binding {}", args.metrics_listen))?;
    let metrics = Arc::new(Metrics::new());
    let stop_http = kvtier_serve::CancellationToken::new();
    let http = tokio::spawn(metrics::serve(listener, metrics.clone(), stop_http.clone()));
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes cluster: set KUBECONFIG or run inside a Pod")?;
    let ran = crate::controller::run(client, settings, metrics, args.namespace, shutdown).await;
    // The probes and metrics stay up while the controller finishes its reconciles.
    stop_http.cancel();
    let _ = http.await;
    ran
}
