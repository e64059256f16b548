//! The gateway as users deploy it: `deploy/base` through `deploy/overlays/e2e`, in a namespace of
//! the test's own, with a host key Secret and an identity registry ConfigMap of the test's.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use cmx_testbed::Key;
use serde_json::Value;

use crate::cluster::{Cluster, poll};

/// How long a pod may take to start, or a change to reach it (the kubelet syncs ConfigMap
/// volumes every 10 s on the minicluster).
pub const SLOW: Duration = Duration::from_secs(120);

/// The repository this test was built from.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e/ is in the repository")
        .to_path_buf()
}

/// One gateway DaemonSet in its own namespace; the namespace is deleted on drop.
pub struct Gateway {
    pub cluster: Cluster,
    pub namespace: String,
    /// Keys and rendered files of this deployment.
    pub dir: tempfile::TempDir,
    pub host_key: Key,
}

/// A running gateway pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayPod {
    pub name: String,
    pub uid: String,
    pub ip: String,
}

impl Gateway {
    /// Applies the e2e overlay into `namespace` with `registry` as the identity registry.
    pub fn deploy(cluster: &Cluster, namespace: &str, registry: &str) -> Gateway {
        Gateway::deploy_with(cluster, namespace, registry, None)
    }

    /// `deploy`, with the admin API's bearer token turned on as the shipped ConfigMap tells an
    /// operator to: the `cmxsafe-gateway-admin-token` Secret, and its `api_token_file` line
    /// uncommented.
    pub fn deploy_with_admin_token(
        cluster: &Cluster,
        namespace: &str,
        registry: &str,
        token: &str,
    ) -> Gateway {
        Gateway::deploy_with(cluster, namespace, registry, Some(token))
    }

    fn deploy_with(cluster: &Cluster, namespace: &str, registry: &str, admin_token: Option<&str>) -> Gateway {
        let dir = tempfile::tempdir().expect("temp dir");
        let overlay = relative(dir.path(), &repo_root().join("deploy/overlays/e2e"));
        std::fs::write(
            dir.path().join("kustomization.yaml"),
            format!(
                "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: {namespace}\nresources:\n  - {}\n",
                overlay.display()
            ),
        )
        .expect("write kustomization");
        let rendered = cluster.run(&["kustomize", &dir.path().display().to_string()]);
        let host_key = Key::generate(dir.path(), "ssh_host_ed25519_key");
        let gw = Gateway {
            cluster: cluster.clone(),
            namespace: namespace.to_string(),
            dir,
            host_key,
        };
        // Left by an interrupted run.
        let _ = cluster.try_run(
            &["delete", "namespace", namespace, "--wait=true", "--timeout=120s"],
            None,
        );
        // The namespace, host key and registry first, so that the gateway's first pod starts with
        // them; the base's empty registry template is never applied over the test's.
        let docs: Vec<&str> = rendered.split("\n---\n").collect();
        let (namespace_docs, rest): (Vec<&str>, Vec<&str>) =
            docs.into_iter().partition(|d| d.contains("kind: Namespace"));
        cluster.apply(&namespace_docs.join("\n---\n"));
        let key = gw.host_key.path.display().to_string();
        gw.apply_generated(&[
            "secret",
            "generic",
            "cmxsafe-gateway-host-key",
            &format!("--from-file=ssh_host_ed25519_key={key}"),
            &format!("--from-file=ssh_host_ed25519_key.pub={key}.pub"),
        ]);
        gw.set_registry(registry);
        let mut rest: Vec<String> = rest
            .into_iter()
            .filter(|d| !(d.contains("kind: ConfigMap") && d.contains("name: cmxsafe-registry")))
            .map(String::from)
            .collect();
        if let Some(token) = admin_token {
            gw.apply_generated(&[
                "secret",
                "generic",
                "cmxsafe-gateway-admin-token",
                &format!("--from-literal=token={token}"),
            ]);
            let commented = "# api_token_file = \"/etc/cmxsafe/admin-token/token\"";
            let config = rest
                .iter_mut()
                .find(|d| d.contains(commented))
                .expect("the shipped ConfigMap shows how to set api_token_file");
            *config = config.replace(commented, &commented[2..]);
        }
        cluster.apply(&rest.join("\n---\n"));
        gw
    }

    /// `kubectl create ARGS --dry-run=client -o yaml | kubectl apply -f -` in this namespace.
    fn apply_generated(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.namespace, "create"];
        all.extend_from_slice(args);
        all.extend(["--dry-run=client", "-o", "yaml"]);
        let yaml = self.cluster.run(&all);
        self.cluster.apply(&yaml);
    }

    /// Replaces the identity registry (the ConfigMap the gateway hot-reloads).
    pub fn set_registry(&self, text: &str) {
        let file = self.dir.path().join("identities.toml");
        std::fs::write(&file, text).expect("write registry");
        self.apply_generated(&[
            "configmap",
            "cmxsafe-registry",
            &format!("--from-file=identities.toml={}", file.display()),
        ]);
    }

    /// The gateway pods (JSON) of this namespace.
    fn pods(&self) -> Vec<Value> {
        let args = [
            "-n",
            &self.namespace,
            "get",
            "pods",
            "-l",
            "app.kubernetes.io/name=cmxsafe-gateway",
            "-o",
            "json",
        ];
        self.cluster
            .try_run(&args, None)
            .ok()
            .and_then(|out| serde_json::from_str::<Value>(&out).ok())
            .and_then(|v| v["items"].as_array().cloned())
            .unwrap_or_default()
    }

    /// Waits for exactly one gateway pod, Ready and not terminating, other than `not`.
    pub fn ready_pod(&self, not: Option<&GatewayPod>) -> GatewayPod {
        poll(
            "a Ready gateway pod",
            SLOW,
            || {
                let ready: Vec<GatewayPod> = self
                    .pods()
                    .iter()
                    .filter(|p| p["metadata"]["deletionTimestamp"].is_null() && is_ready(p))
                    .map(|p| GatewayPod {
                        name: p["metadata"]["name"].as_str().unwrap_or("").to_string(),
                        uid: p["metadata"]["uid"].as_str().unwrap_or("").to_string(),
                        ip: p["status"]["podIP"].as_str().unwrap_or("").to_string(),
                    })
                    .filter(|p| Some(p) != not)
                    .collect();
                (ready.len() == 1).then(|| ready[0].clone())
            },
            || self.describe(),
        )
    }

    /// What a failing test prints: the pods and the gateway's recent log.
    pub fn describe(&self) -> String {
        let pods = self
            .cluster
            .try_run(&["-n", &self.namespace, "get", "pods", "-o", "wide"], None)
            .unwrap_or_else(|e| e);
        let iot = self
            .cluster
            .try_run(
                &[
                    "-n",
                    &self.namespace,
                    "logs",
                    "-l",
                    "app=iot",
                    "--tail=30",
                    "--prefix",
                ],
                None,
            )
            .unwrap_or_else(|e| e);
        format!("{pods}\n--- gateway log:\n{}\n--- IoT pods:\n{iot}", self.logs())
    }

    pub fn logs(&self) -> String {
        self.cluster
            .try_run(
                &[
                    "-n",
                    &self.namespace,
                    "logs",
                    "-l",
                    "app.kubernetes.io/name=cmxsafe-gateway",
                    "--tail=60",
                ],
                None,
            )
            .unwrap_or_else(|e| e)
    }

    /// The gateway's log lines (all of the pod's output) parsed as JSON.
    pub fn log_lines(&self, pod: &GatewayPod) -> Vec<Value> {
        let text = self
            .cluster
            .try_run(&["-n", &self.namespace, "logs", &pod.name], None)
            .unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The ClusterIP of Service `name`, once it has one.
    pub fn cluster_ip(&self, service: &str) -> String {
        poll(
            &format!("Service {service}"),
            SLOW,
            || {
                let s = self.cluster.get(&self.namespace, &format!("service/{service}"))?;
                s["spec"]["clusterIP"].as_str().map(str::to_string)
            },
            || self.describe(),
        )
    }

    /// Restarts count of the gateway container of `pod`.
    pub fn restarts(&self, pod: &GatewayPod) -> u64 {
        self.cluster
            .get(&self.namespace, &format!("pod/{}", pod.name))
            .and_then(|p| p["status"]["containerStatuses"][0]["restartCount"].as_u64())
            .unwrap_or(0)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- {} at the failure:\n{}", self.namespace, self.describe());
            if std::env::var_os("CMX_E2E_KEEP").is_some() {
                eprintln!("CMX_E2E_KEEP: namespace {} kept for inspection", self.namespace);
                return;
            }
        }
        let _ = self.cluster.try_run(
            &[
                "delete",
                "namespace",
                &self.namespace,
                "--wait=true",
                "--timeout=120s",
            ],
            None,
        );
    }
}

/// `to` as a path relative to the directory `from` (both absolute): kustomize takes no
/// absolute resource paths.
fn relative(from: &Path, to: &Path) -> PathBuf {
    let ups = from.components().count() - 1;
    let mut out: PathBuf = std::iter::repeat_n("..", ups).collect();
    out.push(to.strip_prefix("/").unwrap_or(to));
    out
}

fn is_ready(pod: &Value) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .is_some_and(|c| c.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
}

/// `GET path` from the node to `ip:port` (pod IPs are routed on the node): (status, body).
pub fn http_get(ip: &str, port: u16, path: &str) -> Result<(u16, String), String> {
    http_get_with(ip, port, path, &[])
}

/// `http_get` with extra request headers (`Authorization`, ...).
pub fn http_get_with(
    ip: &str,
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String), String> {
    let addr = format!("{ip}:{port}");
    let mut s = std::net::TcpStream::connect_timeout(
        &addr.parse().map_err(|e| format!("{addr}: {e}"))?,
        Duration::from_secs(5),
    )
    .map_err(|e| format!("{addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {ip}\r\nConnection: close\r\n{extra}\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut response = String::new();
    s.read_to_string(&mut response).map_err(|e| e.to_string())?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("not HTTP: {response}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}
