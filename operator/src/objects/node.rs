//! The node's side of a `tiered` resource: the node-agent DaemonSet, and the engine Pods'
//! deletion cost that keeps KV reachable through a scale-down.

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::ResourceExt;
use kvtier_api::crd::{quantity_bytes, CacheStrategy, KVCachedInference};
use serde_json::json;

use super::{
    control_volume, host_socket_dir, labels, meta, selector, typed, Component, Names, Settings,
    AGENT_METRICS_PORT, AGENT_OVERHEAD_BYTES, CONTROL_DIR, CONTROL_KEY, HOST_SOCKET_ROOT,
};
use crate::engine;

/// Bytes of writes the node-agent queues for the remote tier at most (its memory limit counts
/// them).
pub const REMOTE_QUEUE_BYTES: u64 = 256 << 20;
/// Where the remote tier's credentials are mounted in the node-agent.
const REMOTE_SECRET_DIR: &str = "/etc/kvtier/remote";
/// Where the node-agent finds the remote tier's CA (`spec.cache.remote.caSecret`).
const REMOTE_CA_DIR: &str = "/etc/kvtier/remote-ca";

/// The annotation the ReplicaSet controller reads to choose which Pods to remove first (the
/// lowest cost goes first).
pub const DELETION_COST: &str = "controller.kubernetes.io/pod-deletion-cost";

/// Deletion cost of each engine Pod so that a scale-down loses the least KV: a replica that
/// shares its node with other replicas of the resource goes first, because its
/// conversations' KV stays in the node's tier for the replicas that remain there; a replica
/// alone on its node goes last. `pods` are `(name, node)`; Pods not yet on a node are the
/// cheapest of all (they hold nothing).
#[must_use]
pub fn deletion_costs(pods: &[(String, Option<String>)]) -> Vec<(String, i32)> {
    let mut per_node: std::collections::HashMap<&str, i32> = std::collections::HashMap::new();
    for (_, node) in pods {
        if let Some(n) = node {
            *per_node.entry(n.as_str()).or_default() += 1;
        }
    }
    pods.iter()
        .map(|(name, node)| {
            let cost = match node {
                None => -1000,
                Some(n) => 1000 - 100 * (per_node[n.as_str()] - 1).min(10),
            };
            (name.clone(), cost)
        })
        .collect()
}

/// Who may reach a `tiered` resource's node-agents over the network: the resource's router
/// (the residency stream and prefetch, which also need the control token) and Pods in the
/// namespaces given for metrics scraping; nobody else, on any port. Engines reach the agent
/// through its Unix socket, which no NetworkPolicy governs. `None` for other strategies.
#[must_use]
pub fn node_agent_network_policy(kvci: &KVCachedInference, s: &Settings) -> Option<NetworkPolicy> {
    if kvci.spec.cache.strategy != CacheStrategy::Tiered {
        return None;
    }
    let n = Names::of(&kvci.name_any());
    let port = json!([{"protocol": "TCP", "port": AGENT_METRICS_PORT}]);
    let mut ingress = vec![json!({
        "from": [{"podSelector": {"matchLabels": selector(kvci, Component::Router)}}],
        "ports": port,
    })];
    if !s.agent_metrics_namespaces.is_empty() {
        let from: Vec<_> = s
            .agent_metrics_namespaces
            .iter()
            .map(|ns| {
                json!({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}})
            })
            .collect();
        ingress.push(json!({"from": from, "ports": port}));
    }
    Some(typed(json!({
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": meta(kvci, &n.node_agent, Component::NodeAgent),
        "spec": {
            "podSelector": {"matchLabels": selector(kvci, Component::NodeAgent)},
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    })))
}

/// The node-agent DaemonSet of a `tiered` resource, on the engine's nodes; `None` for other
/// strategies. Unprivileged: it adds only `IPC_LOCK` (to lock the pool), shares no IPC
/// namespace (the pool travels as a file descriptor over the socket) and mounts only its
/// socket directory and, with an NVMe tier, that tier's directory.
#[must_use]
pub fn node_agent_daemonset(kvci: &KVCachedInference, s: &Settings) -> Option<DaemonSet> {
    let spec = &kvci.spec;
    if spec.cache.strategy != CacheStrategy::Tiered {
        return None;
    }
    let dram = quantity_bytes(spec.cache.dram.as_ref()?).ok()?;
    let n = Names::of(&kvci.name_any());
    let slot = u64::from(kvtier_api::agent::DEFAULT_SLOT_BYTES);
    let slots = u32::try_from(dram / slot).unwrap_or(u32::MAX);
    let staging = u64::from(kvtier_api::agent::default_staging_slots(slots)) * slot;
    // Everything the agent holds is charged to this container: the pool, its staging area,
    // the remote tier's write queue, and the agent's own memory.
    let queue = if spec.cache.remote.is_some() { REMOTE_QUEUE_BYTES } else { 0 };
    let memory = (dram + staging + queue + AGENT_OVERHEAD_BYTES).to_string();
    let mut args: Vec<String> = vec![
        "node-agent".into(),
        "--socket".into(),
        engine::AGENT_SOCKET.into(),
        "--dram".into(),
        dram.to_string(),
        "--staging".into(),
        staging.to_string(),
        "--mlock".into(),
        s.agent_mlock.clone(),
        "--metrics-listen".into(),
        format!("0.0.0.0:{AGENT_METRICS_PORT}"),
        // The residency stream names every conversation on the node, and prefetch moves
        // its chunks: only the router, which holds the token, may use them.
        "--control-token-file".into(),
        format!("{CONTROL_DIR}/{CONTROL_KEY}"),
        // What `cache_control` breakpoints may keep warm (0: none; ADR 0013).
        "--hold-share".into(),
        spec.cache.hold_share.to_string(),
    ];
    let (control_volume, control_mount) = control_volume(kvci);
    let mut mounts = vec![json!({"name": "socket", "mountPath": HOST_SOCKET_ROOT}), control_mount];
    let mut volumes = vec![
        json!({"name": "socket",
            "hostPath": {"path": host_socket_dir(kvci), "type": "DirectoryOrCreate"}}),
        control_volume,
    ];
    if let Some(nvme) = &spec.cache.nvme {
        let bytes = quantity_bytes(&nvme.size).ok()?;
        args.extend([
            "--nvme-dir".into(),
            "/nvme".into(),
            "--nvme-bytes".into(),
            bytes.to_string(),
        ]);
        mounts.push(json!({"name": "nvme", "mountPath": "/nvme"}));
        // One directory per resource under the node's path: two resources given the same
        // path never read or evict each other's chunks.
        let dir = format!(
            "{}/{}/{}",
            nvme.path.trim_end_matches('/'),
            kvci.namespace().unwrap_or_else(|| "default".to_owned()),
            kvci.name_any()
        );
        volumes.push(json!({"name": "nvme",
            "hostPath": {"path": dir, "type": "DirectoryOrCreate"}}));
    }
    let mut env = vec![json!({"name": "KVTIER_LOG_FORMAT", "value": "json"})];
    if let Some(remote) = &spec.cache.remote {
        args.extend([
            "--remote".into(),
            remote.urls.join(","),
            // One namespace per resource: resources sharing a store never see each other's
            // chunks, and an ACL can confine each to `kvtier:<namespace>/<name>:*`.
            "--remote-namespace".into(),
            format!(
                "{}/{}",
                kvci.namespace().unwrap_or_else(|| "default".to_owned()),
                kvci.name_any()
            ),
            "--remote-ttl".into(),
            remote.ttl.clone(),
            "--remote-queue".into(),
            REMOTE_QUEUE_BYTES.to_string(),
        ]);
        if remote.cluster {
            args.push("--remote-cluster".into());
        }
        if let Some(secret) = &remote.credentials_secret {
            // The password as a file from the Secret (never in the spec, the args or the
            // environment), mounted into this container alone (readable by the image's
            // non-root user); the ACL user, when the Secret has one, from the environment.
            args.extend(["--remote-password-file".into(), format!("{REMOTE_SECRET_DIR}/password")]);
            mounts.push(json!({"name": "remote-credentials", "mountPath": REMOTE_SECRET_DIR,
                "readOnly": true}));
            volumes.push(json!({"name": "remote-credentials", "secret": {
                "secretName": secret, "defaultMode": 0o444,
                "items": [{"key": "password", "path": "password"}]}}));
            env.push(json!({"name": "KVTIER_AGENT_REMOTE_USER", "valueFrom": {"secretKeyRef": {
                "name": secret, "key": "username", "optional": true}}}));
        }
        if let Some(secret) = &remote.ca_secret {
            args.extend(["--remote-ca-file".into(), format!("{REMOTE_CA_DIR}/ca.crt")]);
            mounts.push(json!({"name": "remote-ca", "mountPath": REMOTE_CA_DIR, "readOnly": true}));
            volumes.push(json!({"name": "remote-ca", "secret": {
                "secretName": secret, "defaultMode": 0o444,
                "items": [{"key": "ca.crt", "path": "ca.crt"}]}}));
        }
    }
    Some(typed(json!({
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": meta(kvci, &n.node_agent, Component::NodeAgent),
        "spec": {
            "selector": {"matchLabels": selector(kvci, Component::NodeAgent)},
            "template": {
                "metadata": {"labels": labels(kvci, Component::NodeAgent)},
                "spec": {
                    "nodeSelector": spec.engine.node_selector,
                    "tolerations": spec.engine.tolerations,
                    "hostIPC": false,
                    "hostPID": false,
                    "hostNetwork": false,
                    "containers": [{
                        "name": "node-agent",
                        "image": s.kvtier_image,
                        "imagePullPolicy": s.image_pull_policy,
                        "command": ["kvtier"],
                        "args": args,
                        "env": env,
                        "ports": [{"name": "metrics", "containerPort": AGENT_METRICS_PORT, "protocol": "TCP"}],
                        // The pool is charged to this container: its limit is the pool plus
                        // the agent's own memory, requested whole so the node reserves it.
                        "resources": {"requests": {"cpu": "250m", "memory": memory},
                                      "limits": {"memory": memory}},
                        "readinessProbe": {"httpGet": {"path": "/metrics", "port": "metrics"},
                                           "periodSeconds": 10},
                        "securityContext": {
                            "privileged": false,
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "capabilities": {"drop": ["ALL"], "add": ["IPC_LOCK"]},
                        },
                        "volumeMounts": mounts,
                    }],
                    "volumes": volumes,
                },
            },
        },
    })))
}
