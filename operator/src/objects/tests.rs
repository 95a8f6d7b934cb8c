//! The objects the operator makes of a resource, field by field.

use super::*;
use kvtier_api::crd::KVCachedInferenceSpec;

fn kvci(spec_yaml: &str) -> KVCachedInference {
    let spec: KVCachedInferenceSpec = serde_yaml::from_str(spec_yaml).expect("spec");
    let mut k = KVCachedInference::new("coder", spec);
    k.metadata.namespace = Some("agents".into());
    k.metadata.uid = Some("0000-1111".into());
    k
}

fn v<T: serde::Serialize>(x: &T) -> Value {
    serde_json::to_value(x).expect("serialises")
}

const TIERED: &str = "model: {name: MiniMaxAI/MiniMax-M2.5}\n\
    engine: {replicas: 2, tensorParallelSize: 2, nodeSelector: {gpu: mi300x},\n\
             resources: {requests: {memory: 200Gi}}}\n\
    cache: {strategy: tiered, dram: 64Gi, nvme: {size: 1Ti, path: /mnt/nvme0/kvtier}}";

#[test]
fn only_the_router_and_the_metrics_namespaces_reach_the_node_agents() {
    let k = kvci(TIERED);
    let mut s = Settings::default();
    let p = v(&node_agent_network_policy(&k, &s).expect("tiered has a policy"));
    assert_eq!(p["metadata"]["name"], "coder-node-agent");
    assert_eq!(p["metadata"]["ownerReferences"][0]["kind"], "KVCachedInference");
    assert_eq!(
        p["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"],
        "node-agent"
    );
    assert_eq!(p["spec"]["policyTypes"], json!(["Ingress"]));
    let rules = p["spec"]["ingress"].as_array().expect("rules");
    assert_eq!(rules.len(), 1, "the router only: {p}");
    let from = &rules[0]["from"][0]["podSelector"]["matchLabels"];
    assert_eq!(from["app.kubernetes.io/component"], "router");
    assert_eq!(from["app.kubernetes.io/instance"], "coder");
    assert_eq!(rules[0]["ports"][0]["port"], AGENT_METRICS_PORT);
    s.agent_metrics_namespaces = vec!["monitoring".into()];
    let p = v(&node_agent_network_policy(&k, &s).expect("policy"));
    assert_eq!(
        p["spec"]["ingress"][1]["from"][0]["namespaceSelector"]["matchLabels"]
            ["kubernetes.io/metadata.name"],
        "monitoring"
    );
    assert!(
        node_agent_network_policy(&kvci("model: {name: m}\ncache: {strategy: hbm}"), &s).is_none()
    );
}

#[test]
fn every_object_is_owned_and_labelled() {
    let k = kvci(TIERED);
    let s = Settings::default();
    let objects = [
        v(&engine_deployment(&k, &s)),
        v(&engine_service(&k)),
        v(&router_service_account(&k)),
        v(&router_role(&k)),
        v(&router_role_binding(&k)),
        v(&router_deployment(&k, &s)),
        v(&router_service(&k)),
        v(&node_agent_daemonset(&k, &s).expect("tiered has an agent")),
    ];
    for o in &objects {
        let m = &o["metadata"];
        assert_eq!(m["namespace"], "agents", "{o}");
        assert_eq!(m["ownerReferences"][0]["kind"], "KVCachedInference");
        assert_eq!(m["ownerReferences"][0]["uid"], "0000-1111");
        assert_eq!(m["ownerReferences"][0]["controller"], true);
        assert_eq!(m["labels"]["app.kubernetes.io/instance"], "coder");
        assert_eq!(m["labels"]["app.kubernetes.io/managed-by"], FIELD_MANAGER);
    }
    let names: Vec<&str> =
        objects.iter().map(|o| o["metadata"]["name"].as_str().unwrap_or("")).collect();
    assert_eq!(
        names,
        [
            "coder-engine",
            "coder-engine",
            "coder-router",
            "coder-router",
            "coder-router",
            "coder-router",
            "coder",
            "coder-node-agent"
        ]
    );
}

#[test]
fn the_tiered_engine_gets_the_connector_socket_gpus_and_probes() {
    let k = kvci(TIERED);
    let d = v(&engine_deployment(&k, &Settings::default()));
    let spec = &d["spec"];
    assert_eq!(spec["replicas"], 2);
    assert_eq!(spec["strategy"]["rollingUpdate"]["maxSurge"], 0);
    let pod = &spec["template"]["spec"];
    assert_eq!(pod["nodeSelector"]["gpu"], "mi300x");
    let c = &pod["containers"][0];
    assert_eq!(c["image"], kvtier_api::crd::DEFAULT_ENGINE_IMAGE);
    assert_eq!(c["command"], json!(["vllm", "serve"]));
    let args: Vec<String> = serde_json::from_value(c["args"].clone()).expect("args");
    assert_eq!(args, engine::args(&k.spec));
    assert!(args.contains(&"--kv-transfer-config".to_owned()));
    assert_eq!(c["resources"]["limits"]["amd.com/gpu"], "2");
    assert_eq!(c["resources"]["requests"]["amd.com/gpu"], "2");
    assert_eq!(c["resources"]["requests"]["memory"], "200Gi");
    let env = c["env"].to_string();
    assert!(env.contains(r#""name":"PYTHONHASHSEED","value":"0""#), "{env}");
    assert!(env.contains(CONNECTOR_PATH), "{env}");
    for p in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert_eq!(c[p]["httpGet"]["path"], "/health", "{p}");
    }
    let mounts = c["volumeMounts"].to_string();
    for m in ["/dev/shm", CONNECTOR_PATH, HOST_SOCKET_ROOT] {
        assert!(mounts.contains(m), "{m} not in {mounts}");
    }
    let vols = pod["volumes"].to_string();
    assert!(vols.contains(r#""medium":"Memory""#), "{vols}");
    assert!(vols.contains("/run/kvtier/agents/coder"), "{vols}");
    let init = &pod["initContainers"][0];
    assert_eq!(init["image"], Settings::default().kvtier_image);
    assert!(init["command"].to_string().contains("install-connector"));
    assert!(init["command"].to_string().contains(CONNECTOR_SOURCE));
    assert!(engine::AGENT_SOCKET.starts_with(HOST_SOCKET_ROOT));
}

#[test]
fn the_agents_control_routes_are_closed_to_all_but_the_router() {
    let k = kvci(TIERED);
    let s = Settings::default();
    let secret = v(&control_secret(&k, "t0ken"));
    assert_eq!(secret["metadata"]["name"], "coder-kvtier-control");
    assert_eq!(secret["metadata"]["ownerReferences"][0]["uid"], "0000-1111");
    assert_eq!(secret["stringData"][CONTROL_KEY], "t0ken");
    let file = format!("{CONTROL_DIR}/{CONTROL_KEY}");
    let agent = v(&node_agent_daemonset(&k, &s).expect("tiered"));
    let router = v(&router_deployment(&k, &s));
    for (pod, flag) in [(&agent, "--control-token-file"), (&router, "--agent-token-file")] {
        let pod = &pod["spec"]["template"]["spec"];
        let args: Vec<String> =
            serde_json::from_value(pod["containers"][0]["args"].clone()).expect("args");
        let at = args.iter().position(|a| a == flag).expect(flag);
        assert_eq!(args[at + 1], file);
        assert!(pod["containers"][0]["volumeMounts"].to_string().contains(CONTROL_DIR));
        assert!(pod["volumes"].to_string().contains("coder-kvtier-control"), "{pod}");
    }
    // Without node tiers there is no agent, and the router mounts no token.
    let hbm = kvci("model: {name: m}");
    let router = v(&router_deployment(&hbm, &s));
    assert!(!router.to_string().contains("kvtier-control"));
}

#[test]
fn hbm_and_none_engines_have_no_connector_and_nvidia_asks_for_nvidia_gpus() {
    for (yaml, flag) in [
        ("model: {name: m}\nengine: {accelerator: nvidia}", "--enable-prefix-caching"),
        (
            "model: {name: m}\nengine: {accelerator: nvidia}\ncache: {strategy: none}",
            "--no-enable-prefix-caching",
        ),
    ] {
        let k = kvci(yaml);
        let d = v(&engine_deployment(&k, &Settings::default()));
        let pod = &d["spec"]["template"]["spec"];
        let c = &pod["containers"][0];
        assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"], "1");
        assert!(c["resources"]["limits"].get("amd.com/gpu").is_none());
        assert!(c["args"].to_string().contains(flag));
        assert!(!c["args"].to_string().contains("kv-transfer-config"));
        assert!(pod.get("initContainers").is_none_or(|i| i == &json!([])), "{pod}");
        assert!(!pod["volumes"].to_string().contains("hostPath"), "{pod}");
        assert!(node_agent_daemonset(&k, &Settings::default()).is_none());
    }
}

#[test]
fn the_router_discovers_this_resources_engines_with_the_spec_settings() {
    let k = kvci(
        "model: {name: m}\nrouter: {policy: least-load, sessionTtl: 1h, replicas: 2,\n\
         overloadBoundTokens: 4096, sessionHeaders: [X-Session-ID, X-Claude-Code-Session-Id]}",
    );
    let a = router_args(&k);
    let pair = |f: &str, val: &str| a.windows(2).any(|w| w[0] == f && w[1] == val);
    assert!(pair("--discover-pods", &selector_string(&k, Component::Engine)));
    assert!(selector_string(&k, Component::Engine).contains("app.kubernetes.io/component=engine"));
    assert!(pair("--policy", "least-load"));
    assert!(pair("--session-ttl", "1h"));
    assert!(pair("--overload-bound-tokens", "4096"));
    assert!(pair("--session-header", "X-Claude-Code-Session-Id"));
    assert!(pair("--session-placement", "hash"), "two router replicas must agree");
    assert!(!router_args(&kvci(TIERED)).iter().any(|x| x == "--session-placement"));
    let d = v(&router_deployment(&k, &Settings::default()));
    assert_eq!(d["spec"]["replicas"], 2);
    assert_eq!(d["spec"]["template"]["spec"]["serviceAccountName"], "coder-router");
    let role = v(&router_role(&k));
    assert_eq!(
        role["rules"],
        json!([{"apiGroups": [""], "resources": ["pods"],
                                      "verbs": ["get", "list", "watch"]}])
    );
    assert!(!a.iter().any(|x| x == "--residency-pods"), "hbm: no node tiers to follow");
    let tiered = router_args(&kvci(TIERED));
    let sel = selector_string(&kvci(TIERED), Component::NodeAgent);
    assert!(tiered.windows(2).any(|w| w[0] == "--residency-pods" && w[1] == sel));
    assert!(!tiered.iter().any(|x| x == "--cache-control-holds"), "holds are off by default");
    // A hold share passes breakpoints on (router) and keeps them (node-agent).
    let held = kvci(
        "model: {name: MiniMaxAI/MiniMax-M2.5}\n\
         cache: {strategy: tiered, dram: 64Gi, holdShare: 0.2}",
    );
    assert!(router_args(&held).iter().any(|x| x == "--cache-control-holds"));
    let ds = v(&node_agent_daemonset(&held, &Settings::default()).expect("agent"));
    let args = ds["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(args.contains(r#""--hold-share","0.2""#), "{args}");
    let svc = v(&router_service(&k));
    assert_eq!(svc["spec"]["selector"]["app.kubernetes.io/component"], "router");
    assert_eq!(router_endpoint(&k), "http://coder.agents.svc:8000/v1");
    let headless = v(&engine_service(&k));
    assert_eq!(headless["spec"]["clusterIP"], "None");
}

#[test]
fn scale_down_removes_replicas_whose_node_keeps_their_kv_first() {
    let pods = vec![
        ("a1".to_owned(), Some("node-a".to_owned())),
        ("a2".to_owned(), Some("node-a".to_owned())),
        ("b1".to_owned(), Some("node-b".to_owned())),
        ("p".to_owned(), None),
    ];
    let c: std::collections::HashMap<String, i32> = deletion_costs(&pods).into_iter().collect();
    assert!(c["p"] < c["a1"], "a Pod on no node holds nothing");
    assert_eq!(c["a1"], c["a2"]);
    assert!(c["a1"] < c["b1"], "the lone replica of node-b keeps its node's KV reachable");
}

#[test]
fn the_node_agent_is_unprivileged_sized_from_the_spec_and_on_the_engine_nodes() {
    let k = kvci(TIERED);
    let ds = v(&node_agent_daemonset(&k, &Settings::default()).expect("agent"));
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["nodeSelector"]["gpu"], "mi300x");
    assert_eq!(pod["hostIPC"], false);
    let c = &pod["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["add"], json!(["IPC_LOCK"]));
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    let args: Vec<String> = serde_json::from_value(c["args"].clone()).expect("args");
    let pair = |f: &str, val: &str| args.windows(2).any(|w| w[0] == f && w[1] == val);
    assert!(pair("--dram", &(64u64 << 30).to_string()), "{args:?}");
    assert!(pair("--nvme-bytes", &(1u64 << 40).to_string()), "{args:?}");
    assert!(pair("--socket", engine::AGENT_SOCKET));
    // The pool, its staging area (an eighth) and the agent's own memory.
    assert!(pair("--staging", &(8u64 << 30).to_string()), "{args:?}");
    let mem = ((64u64 << 30) + (8u64 << 30) + AGENT_OVERHEAD_BYTES).to_string();
    assert_eq!(c["resources"]["limits"]["memory"], mem);
    assert_eq!(c["resources"]["requests"]["memory"], mem);
    assert!(!args.iter().any(|a| a.starts_with("--remote")), "no remote tier unless named");
    assert!(pair("--hold-share", "0"), "no holds unless asked: {args:?}");
    let vols = pod["volumes"].to_string();
    assert!(vols.contains("/mnt/nvme0/kvtier/agents/coder"), "one NVMe directory per resource");
    assert!(vols.contains("/run/kvtier/agents/coder"));
}

#[test]
fn the_remote_tier_reaches_the_node_agent_with_its_credentials_from_the_secret() {
    let k = kvci(
        "model: {name: MiniMaxAI/MiniMax-M2.5}\n\
         cache: {strategy: tiered, dram: 64Gi, remote: {urls: ['redis://valkey-0:6379', \
         'redis://valkey-1:6379'], cluster: true, credentialsSecret: valkey-kvtier, ttl: 2h}}",
    );
    assert!(kvtier_api::crd::validate(&k.spec).is_ok());
    let ds = v(&node_agent_daemonset(&k, &Settings::default()).expect("agent"));
    let pod = &ds["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let args: Vec<String> = serde_json::from_value(c["args"].clone()).expect("args");
    let pair = |f: &str, val: &str| args.windows(2).any(|w| w[0] == f && w[1] == val);
    assert!(pair("--remote", "redis://valkey-0:6379,redis://valkey-1:6379"), "{args:?}");
    assert!(args.contains(&"--remote-cluster".to_owned()));
    assert!(pair("--remote-namespace", "agents/coder"), "{args:?}");
    assert!(pair("--remote-ttl", "2h"));
    assert!(pair("--remote-password-file", "/etc/kvtier/remote/password"));
    // The password is a file from the Secret, in no arg and no env value.
    assert!(!ds.to_string().contains("hunter"), "no credentials inline");
    let vols = pod["volumes"].as_array().expect("volumes");
    let secret = vols.iter().find(|v| v["name"] == "remote-credentials").expect("secret volume");
    assert_eq!(secret["secret"]["secretName"], "valkey-kvtier");
    let env = c["env"].to_string();
    assert!(env.contains("KVTIER_AGENT_REMOTE_USER") && env.contains("\"optional\":true"), "{env}");
    // The write queue is charged to the container with the pool and the staging area.
    let mem = ((64u64 << 30) + (8u64 << 30) + node::REMOTE_QUEUE_BYTES + AGENT_OVERHEAD_BYTES)
        .to_string();
    assert_eq!(c["resources"]["limits"]["memory"], mem);
}

#[test]
fn a_private_ca_for_the_remote_tier_is_mounted_from_its_secret() {
    let k = kvci(
        "model: {name: MiniMaxAI/MiniMax-M2.5}\n\
         cache: {strategy: tiered, dram: 64Gi, remote: {urls: ['rediss://valkey:6380'], \
         caSecret: valkey-ca}}",
    );
    assert!(kvtier_api::crd::validate(&k.spec).is_ok());
    let ds = v(&node_agent_daemonset(&k, &Settings::default()).expect("agent"));
    let pod = &ds["spec"]["template"]["spec"];
    let args: Vec<String> =
        serde_json::from_value(pod["containers"][0]["args"].clone()).expect("args");
    assert!(
        args.windows(2)
            .any(|w| w[0] == "--remote-ca-file" && w[1] == "/etc/kvtier/remote-ca/ca.crt"),
        "{args:?}"
    );
    let vols = pod["volumes"].as_array().expect("volumes");
    let ca = vols.iter().find(|v| v["name"] == "remote-ca").expect("CA volume");
    assert_eq!(ca["secret"]["secretName"], "valkey-ca");
    assert_eq!(ca["secret"]["items"][0]["key"], "ca.crt");
    // A CA without TLS is a mistake the spec's check names.
    let plain = kvci(
        "model: {name: MiniMaxAI/MiniMax-M2.5}\n\
         cache: {strategy: tiered, dram: 64Gi, remote: {urls: ['redis://valkey:6379'], \
         caSecret: valkey-ca}}",
    );
    let why = kvtier_api::crd::validate(&plain.spec).expect_err("refused").join(" ");
    assert!(why.contains("caSecret"), "{why}");
}
