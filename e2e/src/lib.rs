//! What the end-to-end tests stand on: a real Kubernetes API server, `kubectl` and `helm`.
//!
//! [`Cluster::get`] uses the cluster `KUBECONFIG` names when it is set (kind, k3d, a real
//! cluster). Otherwise it builds a local one with `e2e/k8s/build.sh` (kube-apiserver and
//! kube-controller-manager v1.20.2 from Debian's source package, cached after the first build
//! in `~/.cache/kvtier/k8s`) and starts it on free ports with `e2e/k8s/start.sh`; dropping
//! the [`Cluster`] stops it. No kubelet or scheduler runs: Pods stay Pending unless a test
//! writes their status as a kubelet would.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The repository root.
#[must_use]
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn scripts() -> PathBuf {
    repo().join("e2e/k8s")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn check(what: &str, out: std::io::Result<Output>) -> String {
    let out = out.unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A cluster to test against.
#[derive(Debug)]
pub struct Cluster {
    kubeconfig: PathBuf,
    /// The state folder of a cluster this process started (`None`: given by `KUBECONFIG`).
    local: Option<PathBuf>,
    helm_python: PathBuf,
}

impl Cluster {
    /// The cluster of `KUBECONFIG`, or a local one built and started now.
    ///
    /// # Panics
    /// When no cluster can be had: the message says what failed.
    #[must_use]
    pub fn get() -> Self {
        let helm_bin = check(
            "e2e/k8s/helm-setup.sh (helm-python-sdk from PyPI)",
            Command::new("bash").arg(scripts().join("helm-setup.sh")).output(),
        );
        let helm_python = PathBuf::from(helm_bin.trim()).join("python");
        if let Some(k) = std::env::var_os("KUBECONFIG").filter(|k| !k.is_empty()) {
            eprintln!("e2e: using the cluster of KUBECONFIG={}", k.to_string_lossy());
            return Self { kubeconfig: PathBuf::from(k), local: None, helm_python };
        }
        let t = Instant::now();
        let status = Command::new("bash")
            .arg(scripts().join("build.sh"))
            .status()
            .expect("running e2e/k8s/build.sh");
        assert!(status.success(), "e2e/k8s/build.sh failed: no local API server can be built");
        let state = std::env::temp_dir().join(format!("kvtier-e2e-{}", std::process::id()));
        let port = free_port();
        let etcd = loop {
            let p = free_port();
            if p != port
                && p != port + 1
                && std::net::TcpListener::bind(("127.0.0.1", p + 1)).is_ok()
            {
                break p;
            }
        };
        check(
            "e2e/k8s/start.sh",
            Command::new("bash")
                .arg(scripts().join("start.sh"))
                .env("K8S_STATE", &state)
                .env("K8S_PORT", port.to_string())
                .env("K8S_ETCD_PORT", etcd.to_string())
                .output(),
        );
        eprintln!("e2e: local API server on 127.0.0.1:{port} ready in {:?}", t.elapsed());
        Self { kubeconfig: state.join("kubeconfig"), local: Some(state), helm_python }
    }

    /// The admin kubeconfig.
    #[must_use]
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Whether this process started the cluster (and so can restart its API server).
    #[must_use]
    pub fn is_local(&self) -> bool {
        self.local.is_some()
    }

    /// A client with the admin credentials.
    ///
    /// # Panics
    /// When the kubeconfig cannot be read.
    pub async fn client(&self) -> kube::Client {
        self.client_from(&self.kubeconfig).await
    }

    /// A client from another kubeconfig file.
    ///
    /// # Panics
    /// When the kubeconfig cannot be read.
    pub async fn client_from(&self, path: &Path) -> kube::Client {
        let kc = kube::config::Kubeconfig::read_from(path).expect("kubeconfig");
        let cfg =
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .expect("kubeconfig config");
        kube::Client::try_from(cfg).expect("client")
    }

    /// A kubeconfig for the same server that authenticates with `token` instead.
    ///
    /// # Panics
    /// When the admin kubeconfig is not YAML.
    #[must_use]
    pub fn kubeconfig_with_token(&self, token: &str, path: &Path) -> PathBuf {
        let text = std::fs::read_to_string(&self.kubeconfig).expect("kubeconfig");
        let mut v: serde_yaml::Value = serde_yaml::from_str(&text).expect("kubeconfig YAML");
        if let Some(users) = v.get_mut("users").and_then(|u| u.as_sequence_mut()) {
            for u in users {
                u["user"] = serde_yaml::to_value(serde_json::json!({ "token": token }))
                    .expect("token YAML");
            }
        }
        std::fs::write(path, serde_yaml::to_string(&v).expect("YAML")).expect("write kubeconfig");
        path.to_owned()
    }

    /// `kubectl ARGS` against this cluster; panics with its output when it fails. Returns stdout.
    pub fn kubectl(&self, args: &[&str]) -> String {
        check(
            &format!("kubectl {}", args.join(" ")),
            Command::new("kubectl").arg("--kubeconfig").arg(&self.kubeconfig).args(args).output(),
        )
    }

    /// `kubectl ARGS`, returning whether it succeeded and its stdout+stderr.
    #[must_use]
    pub fn kubectl_try(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .expect("kubectl runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// `helm ARGS` (Helm v4 through its SDK) against this cluster.
    pub fn helm(&self, args: &[&str]) -> String {
        check(
            &format!("helm {}", args.join(" ")),
            Command::new(&self.helm_python)
                .arg(scripts().join("helm"))
                .args(args)
                .env("KUBECONFIG", &self.kubeconfig)
                .current_dir(repo())
                .output(),
        )
    }

    /// Stops the API server for `down` and starts it again (local clusters only).
    ///
    /// # Panics
    /// When the server does not come back.
    pub fn restart_apiserver(&self, down: Duration) {
        let state = self.local.as_ref().expect("only a local cluster can be restarted");
        check(
            "e2e/k8s/restart-apiserver.sh",
            Command::new("bash")
                .arg(scripts().join("restart-apiserver.sh"))
                .env("K8S_STATE", state)
                .env("DOWN", down.as_secs_f64().to_string())
                .output(),
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(state) = &self.local {
            let _ = Command::new("bash")
                .arg(scripts().join("stop.sh"))
                .env("K8S_STATE", state)
                .status();
            if std::env::var_os("KVTIER_E2E_KEEP").is_none() {
                let _ = std::fs::remove_dir_all(state);
            }
        }
    }
}

/// Polls `f` every 200 ms until it returns `Some` or `timeout` passes.
///
/// # Panics
/// On timeout, with `what` and the last value `last` describes.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    loop {
        match f().await {
            Ok(v) => return v,
            Err(last) if start.elapsed() > timeout => {
                panic!("{what}: not true after {timeout:?}; last: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}
