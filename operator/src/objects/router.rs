//! The router's objects: ServiceAccount, Role (read Pods), RoleBinding, Deployment, and the
//! Service clients connect to.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
use kube::ResourceExt;
use kvtier_api::crd::{CacheStrategy, KVCachedInference, RoutingPolicy};
use serde_json::json;

use super::{
    control_volume, labels, meta, selector, selector_string, typed, Component, Names, Settings,
    AGENT_METRICS_PORT, CONTROL_DIR, CONTROL_KEY, ROUTER_PORT,
};
use crate::engine;

/// The router's ServiceAccount.
#[must_use]
pub fn router_service_account(kvci: &KVCachedInference) -> ServiceAccount {
    let n = Names::of(&kvci.name_any());
    typed(json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": meta(kvci, &n.router, Component::Router),
    }))
}

/// The router's Role: it reads Pods in its namespace to find the engine replicas, nothing
/// else.
#[must_use]
pub fn router_role(kvci: &KVCachedInference) -> Role {
    let n = Names::of(&kvci.name_any());
    typed(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": meta(kvci, &n.router, Component::Router),
        "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}],
    }))
}

/// Binds [`router_role`] to [`router_service_account`].
#[must_use]
pub fn router_role_binding(kvci: &KVCachedInference) -> RoleBinding {
    let n = Names::of(&kvci.name_any());
    typed(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": meta(kvci, &n.router, Component::Router),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": n.router},
        "subjects": [{"kind": "ServiceAccount", "name": n.router, "namespace": kvci.namespace()}],
    }))
}

/// The router's command line (after `kvtier`).
#[must_use]
pub fn router_args(kvci: &KVCachedInference) -> Vec<String> {
    let r = &kvci.spec.router;
    let policy = match r.policy {
        RoutingPolicy::Affinity => "affinity",
        RoutingPolicy::LeastLoad => "least-load",
        RoutingPolicy::RoundRobin => "round-robin",
    };
    let mut a: Vec<String> = vec![
        "router".into(),
        "--listen".into(),
        format!("0.0.0.0:{ROUTER_PORT}"),
        "--discover-pods".into(),
        selector_string(kvci, Component::Engine),
        "--discover-port".into(),
        engine::ENGINE_PORT.to_string(),
        "--policy".into(),
        policy.into(),
        "--session-ttl".into(),
        r.session_ttl.clone(),
        "--overload-bound-tokens".into(),
        r.overload_bound_tokens.to_string(),
    ];
    for h in &r.session_headers {
        a.push("--session-header".into());
        a.push(h.clone());
    }
    if r.replicas > 1 {
        // Router replicas agree on a session's replica without sharing state.
        a.extend(["--session-placement".into(), "hash".into()]);
    }
    if kvci.spec.cache.strategy == CacheStrategy::Tiered {
        // Tier-aware routing: follow this resource's node-agents' residency streams.
        a.extend([
            "--residency-pods".into(),
            selector_string(kvci, Component::NodeAgent),
            "--residency-port".into(),
            AGENT_METRICS_PORT.to_string(),
            "--agent-token-file".into(),
            format!("{CONTROL_DIR}/{CONTROL_KEY}"),
        ]);
        if kvci.spec.cache.hold_share > 0.0 {
            // Pass Anthropic `cache_control` breakpoints on as holds (ADR 0013).
            a.push("--cache-control-holds".into());
        }
    }
    a
}

/// The router Deployment.
#[must_use]
pub fn router_deployment(kvci: &KVCachedInference, s: &Settings) -> Deployment {
    let n = Names::of(&kvci.name_any());
    // With node tiers, the router presents the agents' control token.
    let (volumes, mounts) = if kvci.spec.cache.strategy == CacheStrategy::Tiered {
        let (v, m) = control_volume(kvci);
        (json!([v]), json!([m]))
    } else {
        (json!([]), json!([]))
    };
    typed(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(kvci, &n.router, Component::Router),
        "spec": {
            "replicas": kvci.spec.router.replicas,
            "selector": {"matchLabels": selector(kvci, Component::Router)},
            "template": {
                "metadata": {"labels": labels(kvci, Component::Router)},
                "spec": {
                    "serviceAccountName": n.router,
                    "securityContext": {"runAsNonRoot": true, "runAsUser": 65532},
                    "containers": [{
                        "name": "router",
                        "image": s.kvtier_image,
                        "imagePullPolicy": s.image_pull_policy,
                        "command": ["kvtier"],
                        "args": router_args(kvci),
                        "env": [{"name": "POD_NAMESPACE",
                                 "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                                {"name": "KVTIER_LOG_FORMAT", "value": "json"}],
                        "ports": [{"name": "http", "containerPort": ROUTER_PORT, "protocol": "TCP"}],
                        // Ready while an engine is healthy; alive while it serves.
                        "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"},
                                           "periodSeconds": 5},
                        "livenessProbe": {"httpGet": {"path": "/health", "port": "http"},
                                          "periodSeconds": 20},
                        "resources": {"requests": {"cpu": "500m", "memory": "256Mi"},
                                      "limits": {"memory": "1Gi"}},
                        "securityContext": {"allowPrivilegeEscalation": false,
                                            "readOnlyRootFilesystem": true,
                                            "capabilities": {"drop": ["ALL"]}},
                        "volumeMounts": mounts,
                    }],
                    "volumes": volumes,
                },
            },
        },
    }))
}

/// The router Service: `http://NAME.NAMESPACE.svc:8000/v1` is the OpenAI endpoint.
#[must_use]
pub fn router_service(kvci: &KVCachedInference) -> Service {
    let n = Names::of(&kvci.name_any());
    typed(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(kvci, &n.service, Component::Router),
        "spec": {
            "selector": selector(kvci, Component::Router),
            "ports": [{"name": "http", "port": ROUTER_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }))
}

/// The endpoint clients use, as the status reports it.
#[must_use]
pub fn router_endpoint(kvci: &KVCachedInference) -> String {
    format!(
        "http://{}.{}.svc:{ROUTER_PORT}/v1",
        Names::of(&kvci.name_any()).service,
        kvci.namespace().unwrap_or_else(|| "default".to_owned())
    )
}
