//! The objects one `KVCachedInference` owns, built as pure functions of the resource and the
//! operator's settings. Reconcile applies exactly what these return (server-side apply), so
//! every flag, mount and label is decided here and unit-tested here.
//!
//! For a resource `NAME`:
//!
//! | object | name | when |
//! | --- | --- | --- |
//! | engine Deployment | `NAME-engine` | always |
//! | headless Service over the engines | `NAME-engine` | always |
//! | router ServiceAccount, Role (read Pods), RoleBinding | `NAME-router` | always |
//! | router Deployment | `NAME-router` | always |
//! | router Service, the OpenAI entry point | `NAME` | always |
//! | node-agent DaemonSet | `NAME-node-agent` | strategy `tiered` |
//!
//! Every object carries the resource as its controller owner, so deleting the resource lets
//! the garbage collector remove them all.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::{Resource, ResourceExt};
use kvtier_api::crd::{CacheStrategy, KVCachedInference};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use crate::engine;

mod node;
mod router;

pub use node::{deletion_costs, node_agent_daemonset, node_agent_network_policy, DELETION_COST};
pub use router::{
    router_args, router_deployment, router_endpoint, router_role, router_role_binding,
    router_service, router_service_account,
};

/// Port the router serves the OpenAI API on, in its Pod and on its Service.
pub const ROUTER_PORT: u16 = 8000;
/// Port the node-agent serves `/metrics` and `/residency` on.
pub const AGENT_METRICS_PORT: u16 = 9400;
/// Where the connector's Python package is put in engine Pods (on `PYTHONPATH`).
pub const CONNECTOR_PATH: &str = "/kvtier/python";
/// Where the kvtier image keeps the connector's Python package.
pub const CONNECTOR_SOURCE: &str = "/opt/kvtier/python";
/// Node directory under which each tiered resource's agent socket lives.
pub const HOST_SOCKET_ROOT: &str = "/run/kvtier";
/// Memory the node-agent needs beyond its pool (index, buffers, runtime).
pub const AGENT_OVERHEAD_BYTES: u64 = 512 << 20;
/// The field manager of every apply.
pub const FIELD_MANAGER: &str = "kvtier-operator";

/// Settings of the operator itself (its flags), as opposed to a resource's spec.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Image with the `kvtier` binary and the connector's Python package (router, node-agent,
    /// connector init container).
    pub kvtier_image: String,
    /// Pull policy of that image.
    pub image_pull_policy: String,
    /// The node-agent's `--mlock`: `required`, `best-effort` or `off`.
    pub agent_mlock: String,
    /// Namespaces whose Pods may scrape the node-agents' `/metrics` (e.g. Prometheus'); the
    /// agents' NetworkPolicy lets in only these and the resource's own router.
    pub agent_metrics_namespaces: Vec<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            kvtier_image: format!("ghcr.io/kvtier/kvtier:{}", env!("CARGO_PKG_VERSION")),
            image_pull_policy: "IfNotPresent".to_owned(),
            agent_mlock: "best-effort".to_owned(),
            agent_metrics_namespaces: Vec::new(),
        }
    }
}

/// Which part of a resource an object belongs to (`app.kubernetes.io/component`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    /// vLLM replicas.
    Engine,
    /// kvtier's router.
    Router,
    /// The node's KV tiers.
    NodeAgent,
}

impl Component {
    /// The label value.
    #[must_use]
    pub fn label(self) -> &'static str {
        match self {
            Component::Engine => "engine",
            Component::Router => "router",
            Component::NodeAgent => "node-agent",
        }
    }
}

/// Names of the objects a resource owns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Names {
    /// Engine Deployment and its headless Service.
    pub engine: String,
    /// Router Deployment, ServiceAccount, Role and RoleBinding.
    pub router: String,
    /// The router Service: what clients connect to.
    pub service: String,
    /// The node-agent DaemonSet.
    pub node_agent: String,
    /// The Secret holding the node-agents' control token (the router presents it).
    pub control: String,
}

impl Names {
    /// The names for resource `name`.
    #[must_use]
    pub fn of(name: &str) -> Self {
        Self {
            engine: format!("{name}-engine"),
            router: format!("{name}-router"),
            service: name.to_owned(),
            node_agent: format!("{name}-node-agent"),
            control: format!("{name}-kvtier-control"),
        }
    }
}

/// The labels that select one component's Pods.
#[must_use]
pub fn selector(kvci: &KVCachedInference, c: Component) -> Value {
    json!({
        "app.kubernetes.io/name": "kvtier",
        "app.kubernetes.io/instance": kvci.name_any(),
        "app.kubernetes.io/component": c.label(),
    })
}

/// [`selector`] as a label-selector string (`k=v,k=v`).
#[must_use]
pub fn selector_string(kvci: &KVCachedInference, c: Component) -> String {
    let Value::Object(m) = selector(kvci, c) else { unreachable!("selector is an object") };
    m.iter()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
        .collect::<Vec<_>>()
        .join(",")
}

fn labels(kvci: &KVCachedInference, c: Component) -> Value {
    let mut l = selector(kvci, c);
    l["app.kubernetes.io/managed-by"] = json!(FIELD_MANAGER);
    l
}

/// The controller owner reference to `kvci`.
#[must_use]
pub fn owner(kvci: &KVCachedInference) -> OwnerReference {
    kvci.controller_owner_ref(&()).unwrap_or_else(|| OwnerReference {
        api_version: KVCachedInference::api_version(&()).into_owned(),
        kind: KVCachedInference::kind(&()).into_owned(),
        name: kvci.name_any(),
        uid: String::new(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    })
}

fn meta(kvci: &KVCachedInference, name: &str, c: Component) -> Value {
    json!({
        "name": name,
        "namespace": kvci.namespace(),
        "labels": labels(kvci, c),
        "ownerReferences": [owner(kvci)],
    })
}

/// Where the control token's Secret is mounted in the node-agent and router containers.
pub const CONTROL_DIR: &str = "/etc/kvtier/control";

/// The control token's file in [`CONTROL_DIR`].
pub const CONTROL_KEY: &str = "token";

/// The Secret holding the node-agents' control token, `token` being its value (made once by
/// the controller, never rotated by a reconcile).
#[must_use]
pub fn control_secret(kvci: &KVCachedInference, token: &str) -> k8s_openapi::api::core::v1::Secret {
    let n = Names::of(&kvci.name_any());
    typed(json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta(kvci, &n.control, Component::NodeAgent),
        "type": "Opaque",
        "stringData": {CONTROL_KEY: token},
    }))
}

/// The volume and mount of the control token's Secret.
pub(crate) fn control_volume(kvci: &KVCachedInference) -> (Value, Value) {
    let n = Names::of(&kvci.name_any());
    (
        // Readable by the container's user whoever it is; the Pod is the boundary.
        json!({"name": "control", "secret": {"secretName": n.control, "defaultMode": 0o444}}),
        json!({"name": "control", "mountPath": CONTROL_DIR, "readOnly": true}),
    )
}

/// Node directory holding this resource's agent socket, one per resource so that several
/// tiered resources can share a node.
#[must_use]
pub fn host_socket_dir(kvci: &KVCachedInference) -> String {
    format!(
        "{HOST_SOCKET_ROOT}/{}/{}",
        kvci.namespace().unwrap_or_else(|| "default".to_owned()),
        kvci.name_any()
    )
}

fn typed<T: DeserializeOwned>(v: Value) -> T {
    // Every builder's JSON is a fixed shape checked by the unit tests; a failure here is a bug
    // in this file, not bad input.
    serde_json::from_value(v).expect("builder JSON matches the Kubernetes type")
}

/// The engine container's command: vLLM's OpenAI server and the strategy's flags. The status
/// reports it as `engineCommand`.
#[must_use]
pub fn engine_command(kvci: &KVCachedInference) -> Vec<String> {
    let mut c = vec!["vllm".to_owned(), "serve".to_owned()];
    c.extend(engine::args(&kvci.spec));
    c
}

/// The engine Deployment.
#[must_use]
pub fn engine_deployment(kvci: &KVCachedInference, s: &Settings) -> Deployment {
    let spec = &kvci.spec;
    let e = &spec.engine;
    let n = Names::of(&kvci.name_any());
    let tiered = spec.cache.strategy == CacheStrategy::Tiered;
    let gpu = e.accelerator.resource();

    let mut resources =
        serde_json::to_value(e.resources.clone().unwrap_or_default()).expect("resources serialise");
    for side in ["requests", "limits"] {
        if !resources[side].is_object() {
            resources[side] = json!({});
        }
        resources[side][gpu] = json!(e.tensor_parallel_size.to_string());
    }

    let mut env: Vec<Value> =
        engine::env(spec).into_iter().map(|(k, v)| json!({"name": k, "value": v})).collect();
    let mut mounts = vec![json!({"name": "dshm", "mountPath": "/dev/shm"})];
    let mut volumes = vec![json!({"name": "dshm", "emptyDir": {"medium": "Memory"}})];
    let mut init = Vec::new();
    if tiered {
        env.push(json!({"name": "PYTHONPATH", "value": CONNECTOR_PATH}));
        mounts.push(
            json!({"name": "kvtier-connector", "mountPath": CONNECTOR_PATH, "readOnly": true}),
        );
        mounts.push(json!({"name": "kvtier-agent", "mountPath": HOST_SOCKET_ROOT}));
        volumes.push(json!({"name": "kvtier-connector", "emptyDir": {}}));
        volumes.push(json!({"name": "kvtier-agent",
            "hostPath": {"path": host_socket_dir(kvci), "type": "DirectoryOrCreate"}}));
        // The connector reaches the stock engine image by copy: the kvtier image carries the
        // Python package, this container puts it on a volume the engine has on its path.
        init.push(json!({
            "name": "kvtier-connector",
            "image": s.kvtier_image,
            "imagePullPolicy": s.image_pull_policy,
            // The image has no shell and no `cp`: the binary copies its own package.
            "command": ["kvtier", "install-connector", "/install", "--from", CONNECTOR_SOURCE],
            "volumeMounts": [{"name": "kvtier-connector", "mountPath": "/install"}],
            "securityContext": {"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true},
        }));
    }

    let command = engine_command(kvci);
    let probe = |period: u32, failures: u32| {
        json!({"httpGet": {"path": "/health", "port": "http"},
               "periodSeconds": period, "failureThreshold": failures, "timeoutSeconds": 5})
    };
    typed(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(kvci, &n.engine, Component::Engine),
        "spec": {
            "replicas": e.replicas,
            "selector": {"matchLabels": selector(kvci, Component::Engine)},
            // GPU nodes have no spare accelerators for a surge Pod: replace one at a time.
            "strategy": {"type": "RollingUpdate",
                         "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
            "template": {
                "metadata": {"labels": labels(kvci, Component::Engine)},
                "spec": {
                    "nodeSelector": e.node_selector,
                    "tolerations": e.tolerations,
                    "terminationGracePeriodSeconds": 60,
                    "initContainers": init,
                    "containers": [{
                        "name": "engine",
                        "image": e.image,
                        "command": command[..2],
                        "args": command[2..],
                        "env": env,
                        "ports": [{"name": "http", "containerPort": engine::ENGINE_PORT, "protocol": "TCP"}],
                        "resources": resources,
                        "volumeMounts": mounts,
                        // Loading weights takes minutes: the startup probe allows 30 of them
                        // before liveness applies.
                        "startupProbe": probe(10, 180),
                        "readinessProbe": probe(5, 3),
                        "livenessProbe": probe(20, 3),
                    }],
                    "volumes": volumes,
                },
            },
        },
    }))
}

/// The headless Service over the engine replicas (stable per-Pod DNS, no load balancing: the
/// router chooses).
#[must_use]
pub fn engine_service(kvci: &KVCachedInference) -> Service {
    let n = Names::of(&kvci.name_any());
    typed(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(kvci, &n.engine, Component::Engine),
        "spec": {
            "clusterIP": "None",
            "selector": selector(kvci, Component::Engine),
            "ports": [{"name": "http", "port": engine::ENGINE_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }))
}

#[cfg(test)]
mod tests;
