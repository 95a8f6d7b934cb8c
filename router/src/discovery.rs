//! Where endpoints come from. The router only ever reads the current set through
//! [`Discovery`]: static flags, or Kubernetes Pods by label ([`PodDiscovery`]).

use tokio::sync::watch;

use crate::endpoint::EndpointSpec;

/// A source of endpoints.
///
/// Implementations must keep the receiver's value equal to the full current set (not a
/// delta) and change it whenever the set changes; the router keeps the state of endpoints
/// that stay and drops the state of endpoints that go.
pub trait Discovery: Send + Sync + 'static {
    /// The current set, and its future changes.
    fn subscribe(&self) -> watch::Receiver<Vec<EndpointSpec>>;
}

/// A fixed set given on the command line. [`StaticDiscovery::set`] replaces it, which tests
/// use to add and remove endpoints while the router runs.
#[derive(Debug)]
pub struct StaticDiscovery {
    tx: watch::Sender<Vec<EndpointSpec>>,
}

impl StaticDiscovery {
    /// Discovery that always answers `endpoints`.
    #[must_use]
    pub fn new(endpoints: Vec<EndpointSpec>) -> Self {
        Self { tx: watch::Sender::new(endpoints) }
    }

    /// Replaces the set.
    pub fn set(&self, endpoints: Vec<EndpointSpec>) {
        self.tx.send_replace(endpoints);
    }
}

impl Discovery for StaticDiscovery {
    fn subscribe(&self) -> watch::Receiver<Vec<EndpointSpec>> {
        self.tx.subscribe()
    }
}

/// The engine replicas a Kubernetes label selector names: every Pod that is Ready, has an IP
/// and is not terminating becomes `http://IP:port`. Watches Pods, which every server version
/// serves (EndpointSlices are not on old servers), and retries with backoff when the API
/// server goes away, keeping the last set meanwhile.
#[derive(Debug)]
pub struct PodDiscovery {
    tx: watch::Sender<Vec<EndpointSpec>>,
}

impl PodDiscovery {
    /// Starts watching Pods matching `selector` in `namespace`; endpoints listen on `port`.
    #[must_use]
    pub fn start(client: kube::Client, namespace: &str, selector: &str, port: u16) -> Self {
        use futures_util::StreamExt;
        use k8s_openapi::api::core::v1::Pod;
        use kube::runtime::{reflector, watcher, WatchStreamExt};

        let tx = watch::Sender::new(Vec::new());
        let api: kube::Api<Pod> = kube::Api::namespaced(client, namespace);
        let (reader, writer) = reflector::store();
        let stream = reflector(
            writer,
            watcher(api, watcher::Config::default().labels(selector)).default_backoff(),
        );
        let out = tx.clone();
        let (ns, sel) = (namespace.to_owned(), selector.to_owned());
        tokio::spawn(async move {
            tokio::pin!(stream);
            while let Some(event) = stream.next().await {
                match event {
                    Ok(watcher::Event::InitApply(_) | watcher::Event::Init) => continue,
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, namespace = %ns, selector = %sel,
                                       "watching engine Pods; retrying");
                        continue;
                    }
                }
                let mut set: Vec<EndpointSpec> =
                    reader.state().iter().filter_map(|p| pod_endpoint(p, port)).collect();
                set.sort_by(|a, b| a.authority().as_str().cmp(b.authority().as_str()));
                out.send_if_modified(|cur| {
                    if *cur == set {
                        return false;
                    }
                    tracing::info!(endpoints = set.len(), "engine Pods changed");
                    *cur = std::mem::take(&mut set);
                    true
                });
            }
        });
        Self { tx }
    }
}

impl Discovery for PodDiscovery {
    fn subscribe(&self) -> watch::Receiver<Vec<EndpointSpec>> {
        self.tx.subscribe()
    }
}

/// `http://IP:port` for a Pod that can take requests: Ready, with an IP, not terminating.
#[must_use]
pub fn pod_endpoint(pod: &k8s_openapi::api::core::v1::Pod, port: u16) -> Option<EndpointSpec> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = pod.status.as_ref()?;
    let ready =
        status.conditions.as_ref()?.iter().any(|c| c.type_ == "Ready" && c.status == "True");
    let ip: std::net::IpAddr = status.pod_ip.as_deref()?.parse().ok()?;
    if !ready {
        return None;
    }
    let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
    EndpointSpec::parse(&format!("http://{}", std::net::SocketAddr::new(ip, port)))
        .ok()
        .map(|e| e.with_node(node))
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Pod;

    fn pod(json: serde_json::Value) -> Pod {
        serde_json::from_value(json).expect("pod")
    }

    #[test]
    fn only_ready_pods_with_an_ip_become_endpoints() {
        let ready = serde_json::json!([{"type": "Ready", "status": "True"}]);
        let p = pod(serde_json::json!({"metadata": {"name": "a"}, "spec": {"nodeName": "gpu-3",
            "containers": []}, "status": {"podIP": "10.0.0.7", "conditions": ready}}));
        assert_eq!(
            pod_endpoint(&p, 8000).and_then(|e| e.node().map(str::to_owned)).as_deref(),
            Some("gpu-3")
        );
        assert_eq!(
            pod_endpoint(&p, 8000).map(|e| e.authority().to_string()),
            Some("10.0.0.7:8000".to_owned())
        );
        let v6 = pod(serde_json::json!({"metadata": {"name": "b"},
            "status": {"podIP": "fd00::7", "conditions": ready}}));
        assert_eq!(
            pod_endpoint(&v6, 8000).map(|e| e.authority().to_string()),
            Some("[fd00::7]:8000".to_owned())
        );
        let not_ready = pod(serde_json::json!({"metadata": {"name": "c"},
            "status": {"podIP": "10.0.0.8", "conditions": [{"type": "Ready", "status": "False"}]}}));
        assert!(pod_endpoint(&not_ready, 8000).is_none());
        let no_ip = pod(serde_json::json!({"metadata": {"name": "d"},
            "status": {"conditions": ready}}));
        assert!(pod_endpoint(&no_ip, 8000).is_none());
        let leaving = pod(serde_json::json!({"metadata": {"name": "e",
            "deletionTimestamp": "2026-01-01T00:00:00Z"},
            "status": {"podIP": "10.0.0.9", "conditions": ready}}));
        assert!(pod_endpoint(&leaving, 8000).is_none());
    }
}
