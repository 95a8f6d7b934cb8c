//! The reconcile loop: one `KVCachedInference` at a time, server-side apply of what
//! [`objects`] builds, status from what the server reports ([`status`]).
//!
//! - Idempotent: every pass applies the full desired state with one field manager and
//!   `force`, so an edit to a field the operator owns (drift) is put back on the next pass,
//!   which the `.owns()` watches trigger at once.
//! - A spec that fails the checks is refused in status (`ConfigValid=False` with the reasons)
//!   and nothing is changed; it waits for the next change of the resource instead of retrying.
//! - API errors requeue with exponential backoff (1 s doubling to 5 min) per resource.
//! - Deleting the resource deletes everything it owns through owner references.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{watcher, Controller};
use kube::{Api, Client, Resource, ResourceExt};
use kvtier_api::crd::{quantity_bytes, validate, CacheStrategy, KVCachedInference};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::metrics::{KindLabels, Metrics, ResultLabels};
use crate::objects::{self, Names, Settings, FIELD_MANAGER};
use crate::status::{self, Observed, Problem};

/// Longest wait between retries of a failing resource.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Resync of a healthy resource (watches normally trigger much sooner).
const RESYNC: Duration = Duration::from_secs(300);

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused or could not be reached.
    #[error("{action}: {}", describe(source))]
    Kube {
        /// What the operator was doing.
        action: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// A cluster-scoped resource; the CRD is namespaced, so this is a bad object.
    #[error("the resource has no namespace")]
    NoNamespace,
    /// The operator's own machine failed it (no randomness for a token).
    #[error("{0}")]
    Local(String),
}

impl Error {
    /// A bounded label for metrics.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kube { source: kube::Error::Api(s), .. } => match s.code {
                409 => "conflict",
                403 => "forbidden",
                404 => "not_found",
                400 | 422 => "invalid",
                500..=599 => "server",
                _ => "other",
            },
            Error::Kube {
                source: kube::Error::HyperError(_) | kube::Error::Service(_), ..
            } => "transport",
            _ => "other",
        }
    }
}

/// The server's own message for an API error (its Debug form repeats it), else the error.
fn describe(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) if !s.message.is_empty() => format!("{} ({})", s.message, s.code),
        other => other.to_string(),
    }
}

fn kube_err(action: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let action = action.into();
    move |source| Error::Kube { action, source }
}

/// What every reconcile shares.
pub struct Context {
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    recorder: Recorder,
    failures: Mutex<HashMap<ObjectRef<KVCachedInference>, u32>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context").field("settings", &self.settings).finish_non_exhaustive()
    }
}

impl Context {
    /// A context on `client`.
    #[must_use]
    pub fn new(client: Client, settings: Settings, metrics: Arc<Metrics>) -> Self {
        let reporter =
            Reporter { controller: FIELD_MANAGER.into(), instance: std::env::var("POD_NAME").ok() };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            settings,
            metrics,
            failures: Mutex::new(HashMap::new()),
        }
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectRef<KVCachedInference>, u32>> {
        self.failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Runs the controller until `shutdown` completes. `namespace`: watch one namespace, or all.
///
/// # Errors
/// When the CRD is not installed or the server cannot be reached at start.
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    namespace: Option<String>,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> anyhow::Result<()> {
    fn api<K>(c: &Client, ns: Option<&str>) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        match ns {
            Some(ns) => Api::namespaced(c.clone(), ns),
            None => Api::all(c.clone()),
        }
    }
    let ns = namespace.as_deref();
    let kvcis: Api<KVCachedInference> = api(&client, ns);
    kvcis.list(&ListParams::default().limit(1)).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot list KVCachedInferences ({e}); is the CRD installed? \
             kubectl apply -f crds/kvtier.dev_kvcachedinferences.yaml"
        )
    })?;
    let owned =
        watcher::Config::default().labels(&format!("app.kubernetes.io/managed-by={FIELD_MANAGER}"));
    let ctx = Arc::new(Context::new(client.clone(), settings, metrics.clone()));
    tracing::info!(namespace = ns.unwrap_or("*"), "controller starting");
    metrics.ready.store(true, std::sync::atomic::Ordering::Relaxed);
    Controller::new(kvcis, watcher::Config::default())
        .owns(api::<Deployment>(&client, ns), owned.clone())
        .owns(api::<DaemonSet>(&client, ns), owned.clone())
        .owns(api::<Service>(&client, ns), owned)
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            match r {
                Ok((o, _)) => tracing::debug!(object = %o, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile did not finish"),
            }
        })
        .await;
    metrics.ready.store(false, std::sync::atomic::Ordering::Relaxed);
    tracing::info!("controller stopped");
    Ok(())
}

/// One pass over one resource.
///
/// # Errors
/// An API error; the controller retries with backoff.
pub async fn reconcile(kvci: Arc<KVCachedInference>, ctx: Arc<Context>) -> Result<Action, Error> {
    let start = Instant::now();
    let out = Box::pin(reconcile_inner(&kvci, &ctx)).await;
    ctx.metrics.duration.observe(start.elapsed().as_secs_f64());
    if let Ok(result) = &out {
        ctx.failures().remove(&ObjectRef::from_obj(kvci.as_ref()));
        ctx.metrics.reconciles.get_or_create(&ResultLabels { result }).inc();
    }
    out.map(
        |result| {
            if result == "refused" {
                Action::await_change()
            } else {
                Action::requeue(RESYNC)
            }
        },
    )
}

async fn reconcile_inner(kvci: &KVCachedInference, ctx: &Context) -> Result<&'static str, Error> {
    let ns = kvci.namespace().ok_or(Error::NoNamespace)?;
    let name = kvci.name_any();
    let c = &ctx.client;
    let n = Names::of(&name);

    let mut why = validate(&kvci.spec).err().unwrap_or_default();
    if why.is_empty() {
        why.extend(node_problems(kvci, c).await);
    }
    if !why.is_empty() {
        tracing::warn!(%ns, %name, reasons = %why.join("; "), "spec refused");
        let seen = observe(c, &ns, &n).await;
        publish_status(kvci, ctx, &seen, Some(&Problem::Invalid(why))).await?;
        return Ok("refused");
    }

    match Box::pin(apply_all(kvci, ctx, &ns, &n)).await {
        Ok(seen) => {
            publish_status(kvci, ctx, &seen, None).await?;
            tracing::info!(%ns, %name, "applied");
            Ok("applied")
        }
        Err(e) => {
            let seen = observe(c, &ns, &n).await;
            // Best effort: the server may be the thing that failed.
            let _ = publish_status(kvci, ctx, &seen, Some(&Problem::Apply(e.to_string()))).await;
            Err(e)
        }
    }
}

fn error_policy(kvci: Arc<KVCachedInference>, err: &Error, ctx: Arc<Context>) -> Action {
    let kind = err.kind();
    ctx.metrics.errors.get_or_create(&KindLabels { kind }).inc();
    ctx.metrics.reconciles.get_or_create(&ResultLabels { result: "error" }).inc();
    let n = {
        let mut f = ctx.failures();
        let n = f.entry(ObjectRef::from_obj(kvci.as_ref())).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let wait = Duration::from_secs(1u64 << n.min(9).saturating_sub(1)).min(MAX_BACKOFF);
    tracing::warn!(
        namespace = kvci.namespace().unwrap_or_default(),
        name = kvci.name_any(),
        error = %err,
        kind,
        failures = n,
        retry_in_s = wait.as_secs(),
        "reconcile failed"
    );
    Action::requeue(wait)
}

async fn apply<K>(c: &Client, ns: &str, obj: &K) -> Result<K, Error>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Serialize
        + DeserializeOwned
        + Clone
        + std::fmt::Debug,
{
    let name = obj.meta().name.clone().unwrap_or_default();
    let api: Api<K> = Api::namespaced(c.clone(), ns);
    api.patch(&name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(obj))
        .await
        .map_err(kube_err(format!("applying {} {ns}/{name}", K::kind(&()))))
}

async fn apply_all(
    kvci: &KVCachedInference,
    ctx: &Context,
    ns: &str,
    n: &Names,
) -> Result<Observed, Error> {
    let (c, s) = (&ctx.client, &ctx.settings);
    apply(c, ns, &objects::router_service_account(kvci)).await?;
    apply(c, ns, &objects::router_role(kvci)).await?;
    apply(c, ns, &objects::router_role_binding(kvci)).await?;
    apply(c, ns, &objects::engine_service(kvci)).await?;
    apply(c, ns, &objects::router_service(kvci)).await?;
    let agent = match objects::node_agent_daemonset(kvci, s) {
        Some(ds) => {
            ensure_control_secret(kvci, c, ns, &n.control).await?;
            if let Some(policy) = objects::node_agent_network_policy(kvci, s) {
                apply(c, ns, &policy).await?;
            }
            Some(apply(c, ns, &ds).await?)
        }
        None => {
            // The strategy moved away from tiered: the agent goes, and its policy.
            let api: Api<DaemonSet> = Api::namespaced(c.clone(), ns);
            match api.delete(&n.node_agent, &DeleteParams::background()).await {
                Ok(_) => tracing::info!(%ns, name = %n.node_agent, "node-agent removed"),
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(kube_err("removing the node-agent")(e)),
            }
            let api: Api<k8s_openapi::api::networking::v1::NetworkPolicy> =
                Api::namespaced(c.clone(), ns);
            match api.delete(&n.node_agent, &DeleteParams::background()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(kube_err("removing the node-agent's NetworkPolicy")(e)),
            }
            None
        }
    };
    let engine = apply(c, ns, &objects::engine_deployment(kvci, s)).await?;
    let router = apply(c, ns, &objects::router_deployment(kvci, s)).await?;
    if kvci.spec.cache.strategy == CacheStrategy::Tiered {
        set_deletion_costs(kvci, c, ns).await?;
    }
    Ok(Observed { engine: Some(engine), router: Some(router), agent, remote: None })
}

/// Creates the node-agents' control token once: a reconcile must not rotate it under running
/// agents and routers.
async fn ensure_control_secret(
    kvci: &KVCachedInference,
    c: &Client,
    ns: &str,
    name: &str,
) -> Result<(), Error> {
    use k8s_openapi::api::core::v1::Secret;
    let api: Api<Secret> = Api::namespaced(c.clone(), ns);
    match api.get_opt(name).await.map_err(kube_err(format!("reading Secret {ns}/{name}")))? {
        Some(_) => Ok(()),
        None => {
            let token = random_token().map_err(|e| Error::Local(format!("a random token: {e}")))?;
            let secret = objects::control_secret(kvci, &token);
            match api.create(&kube::api::PostParams::default(), &secret).await {
                Ok(_) => Ok(()),
                // Another reconcile made it first: that one stands.
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
                Err(e) => Err(kube_err(format!("creating Secret {ns}/{name}"))(e)),
            }
        }
    }
}

/// 32 random bytes from the kernel, in hex.
fn random_token() -> std::io::Result<String> {
    use std::io::Read;
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut b)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Marks each engine Pod with its deletion cost ([`objects::deletion_costs`]), so that a
/// scale-down removes first the replicas whose node tier keeps their conversations' KV.
async fn set_deletion_costs(kvci: &KVCachedInference, c: &Client, ns: &str) -> Result<(), Error> {
    use k8s_openapi::api::core::v1::Pod;
    let pods: Api<Pod> = Api::namespaced(c.clone(), ns);
    let sel = objects::selector_string(kvci, objects::Component::Engine);
    let list = pods
        .list(&ListParams::default().labels(&sel))
        .await
        .map_err(kube_err("listing engine Pods"))?;
    let named: Vec<(String, Option<String>)> = list
        .items
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| (p.name_any(), p.spec.as_ref().and_then(|s| s.node_name.clone())))
        .collect();
    for (name, cost) in objects::deletion_costs(&named) {
        let current = list
            .items
            .iter()
            .find(|p| p.name_any() == name)
            .and_then(|p| p.annotations().get(objects::DELETION_COST).cloned());
        if current.as_deref() == Some(cost.to_string().as_str()) {
            continue;
        }
        let patch = serde_json::json!({"metadata": {"annotations": {objects::DELETION_COST: cost.to_string()}}});
        match pods.patch(&name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => {}
            // Gone since the list: nothing to mark.
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(kube_err(format!("marking Pod {ns}/{name}"))(e)),
        }
    }
    Ok(())
}

/// Whether any of the remote tier's `urls` accepts a TCP connection within 2 s: the address
/// that did, or why none did. (A connection, not a login: the credentials are the agents'.)
async fn probe(urls: &[String]) -> Result<String, String> {
    let mut why = Vec::new();
    for url in urls {
        let rest = url.split_once("://").map_or(url.as_str(), |(_, r)| r);
        let authority = rest.split('/').next().unwrap_or(rest);
        let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        let addr = if host_port.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok()) {
            host_port.to_owned()
        } else {
            format!("{host_port}:6379")
        };
        let connect = tokio::net::TcpStream::connect(addr.clone());
        match tokio::time::timeout(std::time::Duration::from_secs(2), connect).await {
            Ok(Ok(_)) => return Ok(addr),
            Ok(Err(e)) => why.push(format!("{addr}: {e}")),
            Err(_) => why.push(format!("{addr}: no answer within 2 s")),
        }
    }
    Err(why.join("; "))
}

/// What exists now, without changing anything (for a refused spec or a failed apply).
async fn observe(c: &Client, ns: &str, n: &Names) -> Observed {
    let deployments: Api<Deployment> = Api::namespaced(c.clone(), ns);
    let daemonsets: Api<DaemonSet> = Api::namespaced(c.clone(), ns);
    Observed {
        engine: deployments.get_opt(&n.engine).await.ok().flatten(),
        router: deployments.get_opt(&n.router).await.ok().flatten(),
        agent: daemonsets.get_opt(&n.node_agent).await.ok().flatten(),
        remote: None,
    }
}

/// Writes the status when it changed and records an event for each condition that turned.
async fn publish_status(
    kvci: &KVCachedInference,
    ctx: &Context,
    seen: &Observed,
    problem: Option<&Problem>,
) -> Result<(), Error> {
    let mut seen = seen.clone();
    seen.remote = match &kvci.spec.cache.remote {
        Some(r) if kvci.spec.cache.strategy == CacheStrategy::Tiered => Some(probe(&r.urls).await),
        _ => None,
    };
    let new = status::compute(kvci, &seen, problem, Timestamp::now());
    let old = kvci.status.clone().unwrap_or_default();
    if new == old {
        return Ok(());
    }
    let ns = kvci.namespace().ok_or(Error::NoNamespace)?;
    let api: Api<KVCachedInference> = Api::namespaced(ctx.client.clone(), &ns);
    let patch = serde_json::json!({ "status": new });
    api.patch_status(&kvci.name_any(), &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(kube_err("writing the status"))?;
    for c in &new.conditions {
        let before = status::condition(&old, &c.type_).map(|o| o.status.as_str());
        if before == Some(c.status.as_str()) {
            continue;
        }
        let healthy = match c.type_.as_str() {
            status::DEGRADED => c.status == "False",
            status::PROGRESSING => true,
            _ => c.status == "True",
        };
        let ev = Event {
            type_: if healthy { EventType::Normal } else { EventType::Warning },
            reason: format!("{}{}", c.type_, if c.status == "True" { "" } else { "False" }),
            note: Some(truncate(&format!("{}: {}", c.reason, c.message), 1000)),
            action: "Reconcile".into(),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&ev, &kvci.object_ref(&())).await {
            tracing::warn!(error = %e, "could not record an event");
        }
    }
    Ok(())
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// For `tiered`: nodes the agent would run on whose allocatable memory cannot hold the DRAM
/// tier and the agent. A server that does not let the operator list nodes skips the check.
async fn node_problems(kvci: &KVCachedInference, c: &Client) -> Vec<String> {
    if kvci.spec.cache.strategy != CacheStrategy::Tiered {
        return Vec::new();
    }
    let selector = kvci
        .spec
        .engine
        .node_selector
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let nodes: Api<Node> = Api::all(c.clone());
    match nodes.list(&ListParams::default().labels(&selector)).await {
        Ok(list) => dram_misfits(kvci, &list.items),
        Err(e) => {
            tracing::info!(error = %e, "cannot list nodes; the DRAM size check is skipped");
            Vec::new()
        }
    }
}

/// The nodes among `nodes` whose allocatable memory is below the DRAM tier plus the agent's
/// overhead, each as a reason.
#[must_use]
pub fn dram_misfits(kvci: &KVCachedInference, nodes: &[Node]) -> Vec<String> {
    let Some(Ok(dram)) = kvci.spec.cache.dram.as_ref().map(quantity_bytes) else {
        return Vec::new();
    };
    let need = dram + objects::AGENT_OVERHEAD_BYTES;
    nodes
        .iter()
        .filter_map(|node| {
            let q = node.status.as_ref()?.allocatable.as_ref()?.get("memory")?;
            let have = quantity_bytes(q).ok()?;
            (have < need).then(|| {
                format!(
                    "spec.cache.dram is {} but node {} allows {} of memory (the tier and the \
                     agent need {need} bytes): lower cache.dram or select larger nodes",
                    kvci.spec.cache.dram.as_ref().map_or("", |q| q.0.as_str()),
                    node.name_any(),
                    q.0
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_dram_tier_larger_than_a_node_is_named() {
        let kvci: KVCachedInference = serde_json::from_value(json!({
            "apiVersion": "kvtier.dev/v1alpha1", "kind": "KVCachedInference",
            "metadata": {"name": "coder", "namespace": "agents"},
            "spec": {"model": {"name": "m"}, "cache": {"strategy": "tiered", "dram": "64Gi"}},
        }))
        .expect("kvci");
        let node = |name: &str, mem: &str| -> Node {
            serde_json::from_value(json!({"metadata": {"name": name},
                                          "status": {"allocatable": {"memory": mem}}}))
            .expect("node")
        };
        let nodes = [node("big", "512Gi"), node("small", "32Gi"), node("edge", "64Gi")];
        let why = dram_misfits(&kvci, &nodes);
        assert_eq!(why.len(), 2, "{why:?}");
        assert!(why[0].contains("node small allows 32Gi"), "{}", why[0]);
        assert!(why[1].contains("node edge"), "{}", why[1]);
        assert!(dram_misfits(&kvci, &nodes[..1]).is_empty());
    }

    #[test]
    fn long_notes_are_cut_on_a_character_boundary() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("ok", 10), "ok");
    }
}
