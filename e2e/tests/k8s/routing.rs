//! The router against the API server: it finds the engine Pods kubelets report Ready and
//! serves through them, and two router replicas watching the same Pods agree on every
//! session's replica and move it together when that replica goes.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Patch, PatchParams, PostParams};
use kube::Api;
use kvtier_e2e::eventually;
use serde_json::json;

use crate::support::*;

/// A router discovering `engines` (the llama-8b resource's engine Pods) sends a chat
/// completion through them, answers 503 while none is Ready, and serves again after.
pub async fn serves_through_ready_engine_pods(
    admin: &kube::Client,
    pods: &Api<Pod>,
    engines: &[String],
) {
    let sim_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let sim = kvtier_sim::Sim::serve(
        sim_listener,
        kvtier_sim::SimOptions {
            profile: kvtier_sim::Profile::load("llama-3.1-8b-h100").expect("profile"),
            strategy: kvtier_sim::Strategy::Hbm,
            time_scale: 1000.0,
            served_model: Some("llama-3.1-8b".into()),
            answer_tokens: None,
        },
    );
    let router_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let router_addr = router_listener.local_addr().expect("addr");
    let discovery = Arc::new(kvtier_router::PodDiscovery::start(
        admin.clone(),
        NS,
        "app.kubernetes.io/instance=llama-8b,app.kubernetes.io/component=engine",
        sim.addr().port(),
    ));
    let (router_stop, router_rx) = tokio::sync::oneshot::channel::<()>();
    let router = tokio::spawn(kvtier_router::run(
        kvtier_router::RouterConfig::new(Vec::new()),
        router_listener,
        None,
        discovery,
        async move {
            let _ = router_rx.await;
        },
    ));
    let chat =
        r#"{"model":"llama-3.1-8b","messages":[{"role":"user","content":"hello"}],"max_tokens":4}"#;
    let (code, body) = eventually("a chat completion through the router", WAIT, || async {
        let r = http_session(router_addr, "/v1/chat/completions", chat, "e2e").await;
        if r.0 == 200 {
            Ok(r)
        } else {
            Err(r.1)
        }
    })
    .await;
    assert_eq!(code, 200);
    assert!(body.contains("chat.completion"), "{body}");
    for p in engines {
        set_pod_ready(pods, p, false).await;
    }
    eventually("no Ready engine Pod: 503", WAIT, || async {
        let r = http_session(router_addr, "/v1/chat/completions", chat, "e2e").await;
        if r.0 == 503 {
            Ok(())
        } else {
            Err(r.1)
        }
    })
    .await;
    for p in engines {
        set_pod_ready(pods, p, true).await;
    }
    let _ = router_stop.send(());
    let _ = router.await;
}

/// Two routers with hash placement over two stand-in replicas (real Pods on the API server,
/// their IPs loopback addresses): the same session lands on the same replica through either,
/// and moves to the same one when its replica's Pod is deleted.
pub async fn router_replicas_agree_and_move_sessions_together(
    admin: &kube::Client,
    pods: &Api<Pod>,
) {
    let (l2, l3) = loop {
        let l2 = tokio::net::TcpListener::bind("127.0.0.2:0").await.expect("bind 127.0.0.2");
        let port = l2.local_addr().expect("addr").port();
        if let Ok(l3) = tokio::net::TcpListener::bind(("127.0.0.3", port)).await {
            break (l2, l3);
        }
    };
    let port = l2.local_addr().expect("addr").port();
    let _e2 = kvtier_testkit::StubEngine::serve(l2, "e-2");
    let _e3 = kvtier_testkit::StubEngine::serve(l3, "e-3");
    for (name, ip) in [("agree-2", "127.0.0.2"), ("agree-3", "127.0.0.3")] {
        let p: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"app": "e2e-agree"}},
            "spec": {"containers": [{"name": "engine", "image": "stand-in"}]},
        }))
        .expect("pod");
        pods.create(&PostParams::default(), &p).await.expect("create pod");
        let patch = json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                                      "conditions": [{"type": "Ready", "status": "True"}]}});
        pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .expect("pod status");
    }
    let mut routers = Vec::new();
    for _ in 0..2 {
        let mut config = kvtier_router::RouterConfig::new(Vec::new());
        config.session.placement = kvtier_router::SessionPlacement::Hash;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let discovery =
            Arc::new(kvtier_router::PodDiscovery::start(admin.clone(), NS, "app=e2e-agree", port));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(kvtier_router::run(config, listener, None, discovery, async {
            let _ = stopped.await;
        }));
        routers.push((addr, stop, task));
    }
    let served_by = |reply: &str| {
        reply
            .lines()
            .find_map(|l| l.strip_prefix("x-served-by: ").map(|v| v.trim().to_owned()))
            .unwrap_or_default()
    };
    let turn = |router: std::net::SocketAddr, sid: String| async move {
        let body = r#"{"model":"m","messages":[{"role":"user","content":"next turn"}]}"#;
        http_session(router, "/v1/chat/completions", body, &sid).await
    };
    for (addr, _, _) in &routers {
        eventually("each router sees both stand-ins", WAIT, || async {
            let mut seen = std::collections::BTreeSet::new();
            for i in 0..16 {
                let (code, r) = turn(*addr, format!("probe-{i}")).await;
                if code == 200 {
                    seen.insert(served_by(&r));
                }
            }
            if seen.len() == 2 {
                Ok(())
            } else {
                Err(format!("{seen:?}"))
            }
        })
        .await;
    }
    let (a, b) = (routers[0].0, routers[1].0);
    let mut on_e2 = Vec::new();
    for i in 0..12 {
        let sid = format!("agent-{i}");
        let first = served_by(&turn(a, sid.clone()).await.1);
        let second = served_by(&turn(b, sid.clone()).await.1);
        assert_eq!(first, second, "{sid}: the two router replicas agree");
        if first == "e-2" {
            on_e2.push(sid);
        }
    }
    assert!(!on_e2.is_empty(), "some sessions live on e-2");
    pods.delete("agree-2", &kube::api::DeleteParams::default()).await.expect("scale down");
    for sid in &on_e2 {
        let moved = eventually("the session moves off the removed replica", WAIT, || async {
            let r = served_by(&turn(a, sid.clone()).await.1);
            if r == "e-3" {
                Ok(r)
            } else {
                Err(r)
            }
        })
        .await;
        assert_eq!(served_by(&turn(b, sid.clone()).await.1), moved, "{sid}: both routers moved it");
    }
    for (_, stop, task) in routers {
        let _ = stop.send(());
        let _ = task.await;
    }
}
