//! The stack on a real Kubernetes API server: `helm install` the chart, `kubectl apply` the
//! examples, and check what the operator makes of them, step by step: objects and flags per
//! strategy, readiness as kubelets would report it, the router finding engine Pods and
//! serving through them, drift put back, traps refused without changes, an API server
//! restart, and deletion.
//!
//! The operator runs in this process with the credentials of the chart's ServiceAccount, so
//! the chart's RBAC is what is tested. One test, because the steps share one cluster and
//! follow each other.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Pod, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, Role};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::Api;
use kvtier_api::crd::KVCachedInference;
use kvtier_e2e::{eventually, repo, Cluster};
use kvtier_operator::metrics::Metrics;
use kvtier_operator::objects::Settings;
use serde_json::json;

mod routing;
mod support;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::too_many_lines)] // one story, told in order
async fn the_stack_on_a_real_api_server() {
    let cluster = tokio::task::spawn_blocking(Cluster::get).await.expect("cluster");
    let admin = cluster.client().await;

    step("helm lint and install the chart");
    let lint = cluster.helm(&["lint", "--strict", "charts/kvtier"]);
    assert!(lint.contains("0 failed"), "{lint}");
    cluster.helm(&["install", "kvtier", "charts/kvtier", "-n", SYSTEM, "--create-namespace"]);
    eventually("the CRD is established", WAIT, || async {
        let (ok, out) = cluster.kubectl_try(&[
            "get",
            "crd",
            "kvcachedinferences.kvtier.dev",
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Established\")].status}",
        ]);
        if ok && out.trim() == "True" {
            Ok(())
        } else {
            Err(out)
        }
    })
    .await;
    let role: ClusterRole =
        Api::all(admin.clone()).get("kvtier-operator").await.expect("the operator's ClusterRole");
    for rule in role.rules.unwrap_or_default() {
        let all =
            [rule.verbs, rule.resources.unwrap_or_default(), rule.api_groups.unwrap_or_default()];
        assert!(!all.iter().flatten().any(|v| v == "*"), "a wildcard in the operator's RBAC");
    }
    let op: Deployment =
        Api::namespaced(admin.clone(), SYSTEM).get("kvtier-operator").await.expect("operator");
    assert_eq!(args_of(&op).first().map(String::as_str), Some("operator"));

    step("run the operator with the chart's ServiceAccount");
    let token = service_account_token(&admin).await;
    let dir = std::env::temp_dir().join(format!("kvtier-e2e-sa-{}", std::process::id()));
    let sa_config = cluster.kubeconfig_with_token(&token, &dir);
    let sa = cluster.client_from(&sa_config).await;
    let metrics = Arc::new(Metrics::new());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let operator = tokio::spawn(kvtier_operator::controller::run(
        sa,
        Settings::default(),
        metrics.clone(),
        None,
        async move {
            let _ = stop_rx.await;
        },
    ));

    step("kubectl apply the examples and a none-strategy baseline");
    cluster.kubectl(&["create", "namespace", NS]);
    let examples = repo().join("examples");
    cluster.kubectl(&["apply", "-n", NS, "-f", &examples.to_string_lossy()]);
    let baseline = scratch("baseline");
    std::fs::write(
        &baseline,
        "apiVersion: kvtier.dev/v1alpha1\nkind: KVCachedInference\nmetadata: {name: baseline}\n\
         spec: {model: {name: m}, cache: {strategy: none}}\n",
    )
    .expect("write baseline");
    cluster.kubectl(&["apply", "-n", NS, "-f", &baseline.to_string_lossy()]);

    let kvcis: Api<KVCachedInference> = Api::namespaced(admin.clone(), NS);
    let deps: Api<Deployment> = Api::namespaced(admin.clone(), NS);
    let dss: Api<DaemonSet> = Api::namespaced(admin.clone(), NS);
    let svcs: Api<Service> = Api::namespaced(admin.clone(), NS);
    let pods: Api<Pod> = Api::namespaced(admin.clone(), NS);

    step("tiered (MiniMax on MI300X): connector, agent socket, node-agent DaemonSet");
    let minimax = deployment(&deps, "minimax-engine").await;
    let a = args_of(&minimax);
    let cfg = a.iter().skip_while(|x| *x != "--kv-transfer-config").nth(1).expect("connector");
    assert!(cfg.contains("\"kv_connector_module_path\":\"kvtier.connector\""), "{cfg}");
    assert!(cfg.contains("\"kv_load_failure_policy\":\"recompute\""), "{cfg}");
    assert!(a.contains(&"--enable-prefix-caching".to_owned()));
    assert!(a.windows(2).any(|w| w == ["--tensor-parallel-size", "2"]));
    let pod = minimax.spec.as_ref().and_then(|s| s.template.spec.clone()).expect("pod spec");
    let c = &pod.containers[0];
    assert_eq!(
        c.resources
            .as_ref()
            .and_then(|r| r.limits.as_ref())
            .and_then(|l| l.get("amd.com/gpu"))
            .map(|q| q.0.as_str()),
        Some("2")
    );
    assert!(c
        .env
        .iter()
        .flatten()
        .any(|e| e.name == "PYTHONHASHSEED" && e.value.as_deref() == Some("0")));
    assert_eq!(pod.init_containers.as_ref().map(Vec::len), Some(1), "connector copy");
    let agent = eventually("the node-agent DaemonSet", WAIT, || async {
        dss.get_opt("minimax-node-agent")
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "missing".into())
    })
    .await;
    let ac = &agent.spec.and_then(|s| s.template.spec).expect("agent pod").containers[0];
    let caps = ac.security_context.as_ref().and_then(|s| s.capabilities.clone()).expect("caps");
    assert_eq!(caps.add, Some(vec!["IPC_LOCK".to_owned()]));
    for name in ["minimax", "minimax-engine"] {
        svcs.get(name).await.expect(name);
    }
    let router_args = args_of(&deployment(&deps, "minimax-router").await);
    assert!(router_args.iter().any(|x| x == "--residency-pods"), "tier-aware: {router_args:?}");
    // The agents' control routes: a token the operator made once, presented by the router.
    assert!(ac.args.iter().flatten().any(|a| a == "--control-token-file"), "{:?}", ac.args);
    assert!(router_args.iter().any(|x| x == "--agent-token-file"), "{router_args:?}");
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(admin.clone(), NS);
    let token =
        |s: k8s_openapi::api::core::v1::Secret| s.data.and_then(|d| d.get("token").cloned());
    let first = token(secrets.get("minimax-kvtier-control").await.expect("control Secret"));
    assert!(first.as_ref().is_some_and(|t| t.0.len() == 64), "a 32-byte token in hex");
    assert!(
        router_args.windows(2).any(|w| w == ["--session-placement", "hash"]),
        "two router replicas agree: {router_args:?}"
    );
    // Only the resource's router reaches the agents' HTTP port.
    let policy =
        Api::<k8s_openapi::api::networking::v1::NetworkPolicy>::namespaced(admin.clone(), NS)
            .get("minimax-node-agent")
            .await
            .expect("the node-agents' NetworkPolicy");
    let policy = serde_json::to_value(&policy).expect("json");
    assert_eq!(
        policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
            ["app.kubernetes.io/component"],
        "router",
        "{policy}"
    );
    Api::<Role>::namespaced(admin.clone(), NS).get("minimax-router").await.expect("router role");
    Api::<ServiceAccount>::namespaced(admin.clone(), NS).get("minimax-router").await.expect("sa");

    step("a remote tier: a real Redis, its password from a Secret, its reachability in status");
    let mut redis = kvtier_testkit::redis::RedisServer::start(&[]);
    cluster.kubectl(&[
        "create",
        "secret",
        "generic",
        "minimax-valkey",
        "-n",
        NS,
        "--from-literal=password=e2e-remote-password",
    ]);
    let remote = format!(
        r#"{{"spec":{{"cache":{{"remote":{{"urls":["{}"],"credentialsSecret":"minimax-valkey"}}}}}}}}"#,
        redis.url()
    );
    cluster.kubectl(&merge_patch("minimax", &remote));
    let url = redis.url();
    let agent = eventually("the node-agents use the remote tier", WAIT, || async {
        let ds = dss.get("minimax-node-agent").await.map_err(|e| e.to_string())?;
        let args = ds
            .spec
            .as_ref()
            .and_then(|s| s.template.spec.as_ref())
            .and_then(|p| p.containers[0].args.clone())
            .unwrap_or_default();
        if args.windows(2).any(|w| w[0] == "--remote" && w[1] == url) {
            Ok(ds)
        } else {
            Err(format!("{args:?}"))
        }
    })
    .await;
    let text = serde_json::to_string(&agent).expect("json");
    assert!(text.contains("--remote-password-file"), "{text}");
    assert!(text.contains("\"secretName\":\"minimax-valkey\""), "{text}");
    assert!(!text.contains("e2e-remote-password"), "the password stays in its Secret");
    kvci_where(&kvcis, "minimax", "the remote tier is reachable", |k| {
        conditions(k).get("RemoteTierReachable").is_some_and(|c| c.0 == "True")
    })
    .await;
    redis.kill();
    cluster.kubectl(&["annotate", "kvci", "minimax", "-n", NS, "e2e/poke-remote=1"]);
    kvci_where(&kvcis, "minimax", "a lost remote tier is reported", |k| {
        conditions(k).get("RemoteTierReachable").is_some_and(|c| c.0 == "False")
    })
    .await;

    step("scale-down order: replicas sharing a node go first, a node's lone replica last");
    let mm = pods_of(&pods, "minimax", "engine", 4).await;
    for (pod, node) in [(&mm[0], "mi300x-a"), (&mm[1], "mi300x-a"), (&mm[2], "mi300x-b")] {
        let binding = json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": pod},
                             "target": {"apiVersion": "v1", "kind": "Node", "name": node}});
        pods.create_subresource::<_, serde_json::Value>(
            "binding",
            pod,
            &PostParams::default(),
            &binding,
        )
        .await
        .expect("bind the Pod as a scheduler would");
    }
    cluster.kubectl(&["annotate", "kvci", "minimax", "-n", NS, "e2e/poke=1"]);
    let costs = eventually("deletion costs follow the nodes", WAIT, || async {
        let mut c = BTreeMap::new();
        for p in &mm {
            let pod = pods.get(p).await.map_err(|e| e.to_string())?;
            let v = pod
                .metadata
                .annotations
                .unwrap_or_default()
                .get("controller.kubernetes.io/pod-deletion-cost")
                .cloned()
                .ok_or_else(|| format!("{p} not marked"))?;
            c.insert(p.clone(), v.parse::<i32>().map_err(|e| e.to_string())?);
        }
        if c[&mm[0]] < c[&mm[2]] {
            Ok(c)
        } else {
            Err(format!("{c:?}"))
        }
    })
    .await;
    assert_eq!(costs[&mm[0]], costs[&mm[1]]);
    assert!(costs[&mm[3]] < costs[&mm[0]], "an unscheduled Pod goes first: {costs:?}");

    step("hbm (8B on H100) and none: their flags, no connector, no agent");
    let llama = deployment(&deps, "llama-8b-engine").await;
    let a = args_of(&llama);
    assert!(a.contains(&"--enable-prefix-caching".to_owned()), "{a:?}");
    assert!(!a.iter().any(|x| x == "--kv-transfer-config"));
    let limits = llama
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.containers[0].resources.clone())
        .and_then(|r| r.limits)
        .expect("limits");
    assert_eq!(limits.get("nvidia.com/gpu").map(|q| q.0.as_str()), Some("1"));
    assert!(dss.get_opt("llama-8b-node-agent").await.expect("get").is_none());
    let base = deployment(&deps, "baseline-engine").await;
    assert!(args_of(&base).contains(&"--no-enable-prefix-caching".to_owned()));

    step("status: valid, not ready while no kubelet reports a Pod");
    let k = kvci_where(&kvcis, "minimax", "minimax reports EnginesNotReady", |k| {
        conditions(k).get("Ready").is_some_and(|c| c.1 == "EnginesNotReady")
    })
    .await;
    assert_eq!(conditions(&k)["ConfigValid"].0, "True");
    let st = k.status.expect("status");
    assert_eq!(st.router_endpoint.as_deref(), Some("http://minimax.e2e.svc:8000/v1"));
    assert_eq!(st.engine_command[..2], ["vllm", "serve"]);

    step("Pods reported Ready make the resource Ready");
    let engines = pods_of(&pods, "llama-8b", "engine", 2).await;
    let routers = pods_of(&pods, "llama-8b", "router", 1).await;
    for p in engines.iter().chain(&routers) {
        set_pod_ready(&pods, p, true).await;
    }
    let k = kvci_where(&kvcis, "llama-8b", "llama-8b is Ready", |k| {
        conditions(k).get("Ready").is_some_and(|c| c.0 == "True")
    })
    .await;
    assert_eq!(k.status.as_ref().map(|s| s.ready_replicas), Some(2));

    step("the router finds the Ready engine Pods and serves through them");
    routing::serves_through_ready_engine_pods(&admin, &pods, &engines).await;

    step("two router replicas agree on each session's replica and move it together when it goes");
    routing::router_replicas_agree_and_move_sessions_together(&admin, &pods).await;

    step("drift: an edited engine command and a manual scale are put back");
    let before = args_of(&deployment(&deps, "llama-8b-engine").await);
    cluster.kubectl(&[
        "patch", "deployment", "llama-8b-engine", "-n", NS, "--type=json", "-p",
        r#"[{"op":"replace","path":"/spec/template/spec/containers/0/args","value":["--model","tampered"]}]"#,
    ]);
    cluster.kubectl(&["scale", "deployment", "llama-8b-engine", "-n", NS, "--replicas=5"]);
    eventually("the operator restores the engine Deployment", WAIT, || async {
        let d = deps.get("llama-8b-engine").await.map_err(|e| e.to_string())?;
        let replicas = d.spec.as_ref().and_then(|s| s.replicas);
        if args_of(&d) == before && replicas == Some(2) {
            Ok(())
        } else {
            Err(format!("{replicas:?} {:?}", args_of(&d)))
        }
    })
    .await;

    step("traps are refused with their reason and change nothing");
    let trap = scratch("trap");
    std::fs::write(
        &trap,
        "apiVersion: kvtier.dev/v1alpha1\nkind: KVCachedInference\nmetadata: {name: trap}\n\
         spec:\n  model: {name: m}\n  engine: {extraArgs: [--no-enable-prefix-caching]}\n  \
         cache: {strategy: tiered, dram: 64Gi}\n",
    )
    .expect("write trap");
    let (accepted, out) = cluster.kubectl_try(&["apply", "-n", NS, "-f", &trap.to_string_lossy()]);
    if accepted {
        // No CEL on this server: the operator refuses it.
        let k = kvci_where(&kvcis, "trap", "the trap is refused in status", |k| {
            conditions(k).get("ConfigValid").is_some_and(|c| c.0 == "False")
        })
        .await;
        let msg = &conditions(&k)["ConfigValid"].2;
        assert!(msg.contains("--no-enable-prefix-caching"), "{msg}");
        assert!(deps.get_opt("trap-engine").await.expect("get").is_none(), "nothing created");
        eventually("a Warning event says so", WAIT, || async {
            let (_, ev) = cluster.kubectl_try(&[
                "get",
                "events.events.k8s.io",
                "-n",
                NS,
                "-o",
                "jsonpath={range .items[*]}{.regarding.name}/{.reason}/{.type} {end}",
            ]);
            if ev.contains("trap/ConfigValidFalse/Warning") {
                Ok(())
            } else {
                Err(ev)
            }
        })
        .await;
        let refused = |t: &str| counter(t, "kvtier_operator_reconciles_total{result=\"refused\"}");
        let r0 = refused(&metrics.text());
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(refused(&metrics.text()) <= r0 + 1.0, "a refused spec must not hot-loop");
    } else {
        assert!(out.contains("prefix caching"), "the server's CEL rule says why: {out}");
    }
    // A valid resource turned into a trap keeps running as it was.
    let served = args_of(&deps.get("llama-8b-engine").await.expect("engine"));
    let (accepted, out) = cluster.kubectl_try(&merge_patch(
        "llama-8b",
        r#"{"spec":{"engine":{"extraArgs":["--kv-offloading-size=64"]}}}"#,
    ));
    if accepted {
        let k = kvci_where(&kvcis, "llama-8b", "the edit is refused", |k| {
            conditions(k).get("ConfigValid").is_some_and(|c| c.0 == "False")
        })
        .await;
        assert!(conditions(&k)["ConfigValid"].2.contains("--kv-offloading-size"));
        assert_eq!(args_of(&deps.get("llama-8b-engine").await.expect("engine")), served);
        cluster.kubectl(&merge_patch("llama-8b", r#"{"spec":{"engine":{"extraArgs":null}}}"#));
        kvci_where(&kvcis, "llama-8b", "valid again", |k| {
            conditions(k).get("ConfigValid").is_some_and(|c| c.0 == "True")
        })
        .await;
    } else {
        assert!(out.contains("KV offloading"), "{out}");
    }
    // A DRAM tier no selected node can hold.
    let node = scratch("node");
    std::fs::write(
        &node,
        "apiVersion: v1\nkind: Node\nmetadata: {name: gpu-small, labels: {kvtier-e2e/pool: small}}\n",
    )
    .expect("write node");
    cluster.kubectl(&["apply", "-f", &node.to_string_lossy()]);
    Api::<k8s_openapi::api::core::v1::Node>::all(admin.clone())
        .patch_status(
            "gpu-small",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"allocatable": {"memory": "32Gi"},
                                            "capacity": {"memory": "32Gi"}}})),
        )
        .await
        .expect("node status");
    let big = scratch("big");
    std::fs::write(
        &big,
        "apiVersion: kvtier.dev/v1alpha1\nkind: KVCachedInference\nmetadata: {name: big}\n\
         spec:\n  model: {name: m}\n  engine: {nodeSelector: {kvtier-e2e/pool: small}}\n  \
         cache: {strategy: tiered, dram: 64Gi}\n",
    )
    .expect("write big");
    cluster.kubectl(&["apply", "-n", NS, "-f", &big.to_string_lossy()]);
    let k = kvci_where(&kvcis, "big", "a DRAM tier larger than the node is refused", |k| {
        conditions(k).get("ConfigValid").is_some_and(|c| c.0 == "False")
    })
    .await;
    assert!(conditions(&k)["ConfigValid"].2.contains("node gpu-small allows 32Gi"));
    assert!(deps.get_opt("big-engine").await.expect("get").is_none());
    cluster.kubectl(&["delete", "node", "gpu-small"]);

    if cluster.is_local() {
        step("the API server restarts; the operator resumes");
        tokio::task::block_in_place(|| cluster.restart_apiserver(Duration::from_secs(3)));
        assert!(!operator.is_finished(), "the operator survived the restart");
        cluster.kubectl(&merge_patch("llama-8b", r#"{"spec":{"engine":{"replicas":3}}}"#));
        eventually("the scale after the restart is applied", WAIT, || async {
            let d = deps.get("llama-8b-engine").await.map_err(|e| e.to_string())?;
            let r = d.spec.and_then(|s| s.replicas);
            if r == Some(3) {
                Ok(())
            } else {
                Err(format!("{r:?}"))
            }
        })
        .await;
    } else {
        step("skipping the API server restart: KUBECONFIG names a cluster this test did not start");
    }

    step("deleting a resource removes everything it owns");
    cluster.kubectl(&["delete", "kvci", "minimax", "-n", NS]);
    eventually("minimax's objects are collected", WAIT, || async {
        let sel = ListParams::default().labels("app.kubernetes.io/instance=minimax");
        let left = deps.list(&sel).await.map_err(|e| e.to_string())?.items.len()
            + dss.list(&sel).await.map_err(|e| e.to_string())?.items.len()
            + svcs.list(&sel).await.map_err(|e| e.to_string())?.items.len()
            + Api::<Role>::namespaced(admin.clone(), NS)
                .list(&sel)
                .await
                .map_err(|e| e.to_string())?
                .items
                .len()
            + Api::<ServiceAccount>::namespaced(admin.clone(), NS)
                .list(&sel)
                .await
                .map_err(|e| e.to_string())?
                .items
                .len();
        if left == 0 {
            Ok(())
        } else {
            Err(format!("{left} objects left"))
        }
    })
    .await;

    step("metrics counted the work; stop the operator; helm uninstall keeps the CRD");
    let text = metrics.text();
    assert!(
        counter(&text, "kvtier_operator_reconciles_total{result=\"applied\"}") >= 3.0,
        "{text}"
    );
    assert!(text.contains("kvtier_operator_reconcile_duration_seconds_count"));
    let _ = stop_tx.send(());
    operator.await.expect("operator task").expect("operator ran");
    cluster.helm(&["uninstall", "kvtier", "-n", SYSTEM]);
    let (kept, _) = cluster.kubectl_try(&["get", "crd", "kvcachedinferences.kvtier.dev"]);
    assert!(kept, "the CRD stays after uninstall");
    if !cluster.is_local() {
        let _ = cluster.kubectl_try(&["delete", "namespace", NS, "--wait=false"]);
        let _ = cluster.kubectl_try(&["delete", "secret", "kvtier-e2e-token", "-n", SYSTEM]);
    }
    let _ = std::fs::remove_file(&sa_config);
    for f in [baseline, trap, node, big] {
        let _ = std::fs::remove_file(f);
    }
}
