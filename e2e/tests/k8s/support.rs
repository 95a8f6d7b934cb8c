//! What the API-server test's steps share: finding and waiting for objects, writing Pod
//! status as a kubelet would, HTTP with a session, the chart's ServiceAccount token.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use kvtier_api::crd::KVCachedInference;
use kvtier_e2e::eventually;
use serde_json::json;

pub const NS: &str = "e2e";
pub const SYSTEM: &str = "kvtier-system";
pub const WAIT: Duration = Duration::from_secs(90);

/// A file for a manifest this test writes.
pub fn scratch(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("kvtier-e2e-{}-{name}.yaml", std::process::id()))
}

pub fn step(s: &str) {
    eprintln!("e2e: {s}");
}

/// `kubectl` arguments merging `patch` (JSON) into KVCachedInference `name`.
pub fn merge_patch<'a>(name: &'a str, patch: &'a str) -> [&'a str; 8] {
    ["patch", "kvci", name, "-n", NS, "--type=merge", "-p", patch]
}

pub fn args_of(d: &Deployment) -> Vec<String> {
    d.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.containers.first())
        .and_then(|c| c.args.clone())
        .unwrap_or_default()
}

pub fn conditions(k: &KVCachedInference) -> BTreeMap<String, (String, String, String)> {
    k.status
        .iter()
        .flat_map(|s| s.conditions.iter())
        .map(|c| (c.type_.clone(), (c.status.clone(), c.reason.clone(), c.message.clone())))
        .collect()
}

pub async fn kvci_where(
    api: &Api<KVCachedInference>,
    name: &str,
    what: &str,
    pred: impl Fn(&KVCachedInference) -> bool,
) -> KVCachedInference {
    eventually(what, WAIT, || async {
        let k = api.get(name).await.map_err(|e| e.to_string())?;
        if pred(&k) {
            Ok(k)
        } else {
            Err(format!("{:?}", conditions(&k)))
        }
    })
    .await
}

pub async fn deployment(api: &Api<Deployment>, name: &str) -> Deployment {
    eventually(&format!("Deployment {name} exists"), WAIT, || async {
        api.get_opt(name).await.map_err(|e| e.to_string())?.ok_or_else(|| "missing".to_owned())
    })
    .await
}

/// Writes a Pod's status as its kubelet would: running on 127.0.0.1, Ready or not.
pub async fn set_pod_ready(pods: &Api<Pod>, name: &str, ready: bool) {
    let s = if ready { "True" } else { "False" };
    let patch = json!({"status": {
        "phase": "Running", "podIP": "127.0.0.1", "podIPs": [{"ip": "127.0.0.1"}],
        "conditions": [{"type": "Ready", "status": s}, {"type": "ContainersReady", "status": s}],
    }});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("pod status");
}

pub async fn pods_of(pods: &Api<Pod>, instance: &str, component: &str, n: usize) -> Vec<String> {
    let sel =
        format!("app.kubernetes.io/instance={instance},app.kubernetes.io/component={component}");
    eventually(&format!("{n} {component} Pods of {instance}"), WAIT, || async {
        let l = pods.list(&ListParams::default().labels(&sel)).await.map_err(|e| e.to_string())?;
        let names: Vec<String> = l
            .items
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        if names.len() == n {
            Ok(names)
        } else {
            Err(format!("{names:?}"))
        }
    })
    .await
}

pub fn counter(text: &str, line_prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// One HTTP/1.1 request carrying session `sid`, with `Connection: close`; returns (status,
/// the whole response text).
pub async fn http_session(
    addr: std::net::SocketAddr,
    path: &str,
    body: &str,
    sid: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         X-Session-ID: {sid}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read");
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, text)
}

/// A token for the chart's ServiceAccount (a token Secret works on every server version).
pub async fn service_account_token(client: &Client) -> String {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), SYSTEM);
    let s: Secret = serde_json::from_value(json!({
        "metadata": {"name": "kvtier-e2e-token",
                     "annotations": {"kubernetes.io/service-account.name": "kvtier"}},
        "type": "kubernetes.io/service-account-token",
    }))
    .expect("secret");
    secrets.create(&PostParams::default(), &s).await.expect("token secret");
    eventually("the token controller fills the token", WAIT, || async {
        let s = secrets.get("kvtier-e2e-token").await.map_err(|e| e.to_string())?;
        s.data
            .and_then(|d| d.get("token").cloned())
            .map(|t| String::from_utf8_lossy(&t.0).into_owned())
            .ok_or_else(|| "no token yet".to_owned())
    })
    .await
}
