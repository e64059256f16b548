//! The Kubernetes controller and the deploy/ manifests against a real kube-apiserver (envtest:
//! `eval "$(../shared/tools/envtest/up)"`; `cargo xtask test` does it). Skipped when
//! K8S_TEST_KUBECONFIG is unset, unless CMX_REQUIRE_ENVTEST=1 (CI), where that is a failure.
//!
//! The controller runs as the gateway's service account (impersonated) with the Role from
//! deploy/base, so these tests also prove that those verbs are enough.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cmx_gateway::controller::{self, Controller, Settings};
use cmx_testbed::*;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::Client;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::config::Kubeconfig;
use serde_json::json;

const NS: &str = "cmxsafe";
const SA_USER: &str = "system:serviceaccount:cmxsafe:cmxsafe-gateway";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The admin kubeconfig, or None (test skipped) when no API server is configured.
fn envtest() -> Option<PathBuf> {
    match std::env::var_os("K8S_TEST_KUBECONFIG") {
        Some(p) => Some(PathBuf::from(p)),
        None if std::env::var("CMX_REQUIRE_ENVTEST").as_deref() == Ok("1") => {
            panic!("CMX_REQUIRE_ENVTEST=1 but K8S_TEST_KUBECONFIG is unset")
        }
        None => {
            eprintln!(
                "skipped: K8S_TEST_KUBECONFIG is unset (cargo xtask test starts an API server from KUBEBUILDER_ASSETS or CMX_ENVTEST_TOOL)"
            );
            None
        }
    }
}

fn kubectl(kubeconfig: &Path, args: &[&str]) -> std::process::Output {
    Command::new("kubectl")
        .env("KUBECONFIG", kubeconfig)
        .args(args)
        .output()
        .expect("run kubectl")
}

fn kubectl_ok(kubeconfig: &Path, args: &[&str]) -> String {
    let out = kubectl(kubeconfig, args);
    assert!(
        out.status.success(),
        "kubectl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// deploy/base applied for real (once per test process): the namespace, service account and
/// Role the controller runs under. Applying is admission, so this is also that test's setup.
fn ensure_deployed(kubeconfig: &Path) {
    static DONE: Mutex<bool> = Mutex::new(false);
    let mut done = DONE.lock().unwrap();
    if !*done {
        let base = repo_root().join("deploy/base");
        kubectl_ok(kubeconfig, &["apply", "-k", base.to_str().unwrap()]);
        *done = true;
    }
}

/// A kubeconfig that acts as the gateway's service account.
fn service_account_kubeconfig(admin: &Path, dir: &Path) -> PathBuf {
    let mut kc = Kubeconfig::read_from(admin).unwrap();
    for named in &mut kc.auth_infos {
        if let Some(auth) = named.auth_info.as_mut() {
            auth.impersonate = Some(SA_USER.into());
        }
    }
    let path = dir.join("kubeconfig-sa");
    // JSON is YAML: kubeconfig readers accept it.
    std::fs::write(&path, serde_json::to_vec(&kc).unwrap()).unwrap();
    path
}

async fn client(kubeconfig: &Path) -> Client {
    controller::run::client(Some(&kubeconfig.to_path_buf()))
        .await
        .unwrap()
}

/// A Pod object standing for one gateway replica (no kubelet runs: it stays Pending).
struct FakePod {
    api: Api<Pod>,
    name: String,
    uid: String,
}

impl FakePod {
    async fn create(admin: &Client, name: &str) -> FakePod {
        let api: Api<Pod> = Api::namespaced(admin.clone(), NS);
        let _ = api.delete(name, &DeleteParams::default().grace_period(0)).await;
        let pod: Pod = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": name, "labels": { "app.kubernetes.io/name": "cmxsafe-gateway-test" } },
            "spec": {
                "automountServiceAccountToken": false,
                "containers": [{ "name": "gateway", "image": "cmxsafe/cmx-gateway:test" }],
            },
        }))
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match api.create(&PostParams::default(), &pod).await {
                Ok(p) => {
                    return FakePod {
                        api,
                        name: name.into(),
                        uid: p.metadata.uid.unwrap(),
                    };
                }
                // A pod of the same name still terminating, or the namespace's default
                // service account not there yet.
                Err(e) if Instant::now() < deadline => {
                    eprintln!("creating pod {name}: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => panic!("cannot create pod {name}: {e}"),
            }
        }
    }

    fn settings(&self, ip: &str) -> Settings {
        Settings {
            namespace: NS.into(),
            pod_name: self.name.clone(),
            pod_uid: self.uid.clone(),
            pod_ip: ip.parse().unwrap(),
            service_prefix: "dynamic-service-".into(),
            domain: Some("iot.example.com".into()),
            service_type: "LoadBalancer".into(),
            service_port: 22,
            target_port: 2222,
        }
    }

    async fn delete(&self) {
        self.api
            .delete(&self.name, &DeleteParams::default().grace_period(0))
            .await
            .unwrap();
    }
}

struct Cluster {
    admin_kubeconfig: PathBuf,
    sa_kubeconfig: PathBuf,
    admin: Client,
    services: Api<Service>,
    slices: Api<DynamicObject>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    async fn connect() -> Option<Cluster> {
        let admin_kubeconfig = envtest()?;
        ensure_deployed(&admin_kubeconfig);
        let dir = tempfile::tempdir().unwrap();
        let sa_kubeconfig = service_account_kubeconfig(&admin_kubeconfig, dir.path());
        let admin = client(&admin_kubeconfig).await;
        let version = controller::run::slice_version(&admin).await.unwrap();
        Some(Cluster {
            services: Api::namespaced(admin.clone(), NS),
            slices: Api::namespaced_with(admin.clone(), NS, &controller::slice_resource(version)),
            admin,
            admin_kubeconfig,
            sa_kubeconfig,
            _dir: dir,
        })
    }

    /// A controller for `pod`, acting as the gateway's service account.
    async fn controller(&self, pod: &FakePod, ip: &str) -> Controller {
        let c = client(&self.sa_kubeconfig).await;
        let version = controller::run::slice_version(&c).await.unwrap();
        Controller::new(c, pod.settings(ip), version)
    }

    async fn service(&self, server: &str) -> Option<Service> {
        self.services
            .get_opt(&format!("dynamic-service-{server}"))
            .await
            .unwrap()
    }

    async fn slice(&self, server: &str) -> Option<DynamicObject> {
        self.slices
            .get_opt(&format!("dynamic-service-{server}"))
            .await
            .unwrap()
    }

    async fn affinity(&self, server: &str) -> Option<String> {
        self.service(server).await?.spec?.session_affinity
    }

    /// Waits until both objects of `server` are gone (garbage collection is asynchronous).
    async fn wait_gone(&self, server: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let (svc, slice) = (self.service(server).await, self.slice(server).await);
            if svc.is_none() && slice.is_none() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "objects of {server} still there: service {} slice {}",
                svc.is_some(),
                slice.is_some()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

fn owner_uids(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Vec<String> {
    meta.owner_references
        .iter()
        .flatten()
        .map(|o| o.uid.clone())
        .collect()
}

fn endpoint_ips(slice: &DynamicObject) -> Vec<String> {
    slice.data["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|e| e["addresses"].as_array().unwrap().iter())
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn a_server_moving_to_another_replica_moves_its_service_without_duplicates() {
    let Some(k8s) = Cluster::connect().await else {
        return;
    };
    let (pod_a, pod_b) = (
        FakePod::create(&k8s.admin, "takeover-gw-a").await,
        FakePod::create(&k8s.admin, "takeover-gw-b").await,
    );
    let a = k8s.controller(&pod_a, "10.244.1.10").await;
    let b = k8s.controller(&pod_b, "10.244.2.20").await;
    let server = "takeover-srv1";

    a.claim(server).await.unwrap();
    let svc = k8s.service(server).await.expect("service created");
    assert_eq!(owner_uids(&svc.metadata), vec![pod_a.uid.clone()]);
    let spec = svc.spec.clone().unwrap();
    assert_eq!(spec.selector, None, "selector-less: the EndpointSlice decides");
    assert_eq!(spec.type_.as_deref(), Some("LoadBalancer"));
    assert_eq!(spec.session_affinity.as_deref(), Some("ClientIP"));
    assert_eq!(
        spec.session_affinity_config
            .unwrap()
            .client_ip
            .unwrap()
            .timeout_seconds,
        Some(86400)
    );
    assert_eq!(
        svc.metadata.annotations.unwrap()["external-dns.alpha.kubernetes.io/hostname"],
        "dynamic-service-takeover-srv1.iot.example.com"
    );
    let slice = k8s.slice(server).await.expect("endpoint slice created");
    assert_eq!(endpoint_ips(&slice), vec!["10.244.1.10"]);
    assert_eq!(
        owner_uids(&slice.metadata),
        vec![svc.metadata.uid.clone().unwrap()],
        "the slice is owned by its Service"
    );
    assert_eq!(slice.data["ports"][0]["port"], 2222);

    // The server reconnects to replica B: one Service, same object, now B's only.
    b.claim(server).await.unwrap();
    let moved = k8s.service(server).await.unwrap();
    assert_eq!(
        moved.metadata.uid, svc.metadata.uid,
        "updated in place, not recreated"
    );
    assert_eq!(owner_uids(&moved.metadata), vec![pod_b.uid.clone()]);
    assert_eq!(
        endpoint_ips(&k8s.slice(server).await.unwrap()),
        vec!["10.244.2.20"]
    );

    // A's stale session ends: A neither deletes nor takes back B's Service, on the event path
    // or on resync (it still thinks it holds the server: its old session lingers).
    a.release(server).await.unwrap();
    controller::run::resync_once(&a, &BTreeSet::from([server.to_string()])).await;
    let kept = k8s.service(server).await.expect("B's service kept");
    assert_eq!(owner_uids(&kept.metadata), vec![pod_b.uid.clone()]);
    assert_eq!(
        kept.metadata.resource_version, moved.metadata.resource_version,
        "no flapping"
    );
    assert_eq!(
        endpoint_ips(&k8s.slice(server).await.unwrap()),
        vec!["10.244.2.20"]
    );

    // B's server leaves: both objects go.
    b.release(server).await.unwrap();
    k8s.wait_gone(server, Duration::from_secs(60)).await;
    pod_a.delete().await;
    pod_b.delete().await;
}

#[tokio::test]
async fn deleting_the_pod_garbage_collects_its_services_and_slices() {
    let Some(k8s) = Cluster::connect().await else {
        return;
    };
    if std::env::var_os("CMX_ENVTEST_NO_GC").is_some() {
        // KUBEBUILDER_ASSETS without kube-controller-manager: nothing collects garbage.
        eprintln!("SKIPPED: this API server runs no garbage collector (no kube-controller-manager)");
        return;
    }
    let pod = FakePod::create(&k8s.admin, "gc-gw").await;
    let c = k8s.controller(&pod, "10.244.3.30").await;
    for server in ["gc-srv1", "gc-srv2"] {
        c.claim(server).await.unwrap();
        assert!(k8s.slice(server).await.is_some());
    }
    pod.delete().await;
    for server in ["gc-srv1", "gc-srv2"] {
        k8s.wait_gone(server, Duration::from_secs(90)).await;
    }
}

#[tokio::test]
async fn resync_repairs_drift_recreates_deleted_objects_and_removes_orphans() {
    let Some(k8s) = Cluster::connect().await else {
        return;
    };
    let pod = FakePod::create(&k8s.admin, "resync-gw").await;
    let c = k8s.controller(&pod, "10.244.4.40").await;
    for server in ["resync-kept", "resync-orphan", "resync-deleted"] {
        c.claim(server).await.unwrap();
    }
    // Someone else edits a field we own, and deletes another Service.
    let name = "dynamic-service-resync-kept";
    let edit = json!({ "apiVersion": "v1", "kind": "Service",
        "spec": { "sessionAffinity": "None" } });
    k8s.services
        .patch(
            name,
            &PatchParams::apply("intruder").force(),
            &Patch::Apply(&edit),
        )
        .await
        .unwrap();
    assert_eq!(k8s.affinity("resync-kept").await.as_deref(), Some("None"));
    k8s.services
        .delete("dynamic-service-resync-deleted", &DeleteParams::default())
        .await
        .unwrap();

    // "resync-orphan" has no forward here any more (say a release failed while the API was down).
    let held = BTreeSet::from(["resync-kept".to_string(), "resync-deleted".to_string()]);
    controller::run::resync_once(&c, &held).await;

    assert_eq!(
        k8s.affinity("resync-kept").await.as_deref(),
        Some("ClientIP"),
        "drift repaired"
    );
    let recreated = k8s.service("resync-deleted").await.expect("recreated");
    assert_eq!(owner_uids(&recreated.metadata), vec![pod.uid.clone()]);
    let deadline = Instant::now() + Duration::from_secs(60);
    // The slice of the deleted Service was collected with it and must come back too.
    while k8s.slice("resync-deleted").await.map(|s| owner_uids(&s.metadata))
        != Some(vec![recreated.metadata.uid.clone().unwrap()])
    {
        assert!(
            Instant::now() < deadline,
            "slice of the recreated service not restored"
        );
        controller::run::resync_once(&c, &held).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    k8s.wait_gone("resync-orphan", Duration::from_secs(60)).await;
    pod.delete().await;
}

#[test]
fn the_service_account_may_do_exactly_what_the_controller_does() {
    let Some(kubeconfig) = envtest() else { return };
    ensure_deployed(&kubeconfig);
    let can = |verb: &str, resource: &str, ns: Option<&str>| {
        let mut args = vec!["auth", "can-i", verb, resource, "--as", SA_USER];
        match ns {
            Some(ns) => args.extend(["-n", ns]),
            None => args.push("--all-namespaces"),
        }
        let out = kubectl(&kubeconfig, &args);
        String::from_utf8_lossy(&out.stdout).trim() == "yes"
    };
    let allowed = [
        ("get", "services"),
        ("list", "services"),
        ("create", "services"),
        ("patch", "services"),
        ("delete", "services"),
        ("create", "endpointslices.discovery.k8s.io"),
        ("patch", "endpointslices.discovery.k8s.io"),
    ];
    for (verb, resource) in allowed {
        assert!(can(verb, resource, Some(NS)), "{verb} {resource} must be allowed");
    }
    let denied = [
        ("update", "services", Some(NS)),
        ("watch", "services", Some(NS)),
        ("delete", "endpointslices.discovery.k8s.io", Some(NS)),
        ("get", "pods", Some(NS)),
        ("patch", "pods", Some(NS)),
        ("create", "pods/exec", Some(NS)),
        ("list", "secrets", Some(NS)),
        ("get", "secrets", Some(NS)),
        ("create", "daemonsets.apps", Some(NS)),
        ("patch", "configmaps", Some(NS)),
        ("create", "services", Some("default")),
        ("create", "services", Some("kube-system")),
        ("create", "namespaces", None),
        ("create", "clusterrolebindings.rbac.authorization.k8s.io", None),
        ("patch", "nodes", None),
        ("list", "services", None),
    ];
    for (verb, resource, ns) in denied {
        assert!(
            !can(verb, resource, ns),
            "{verb} {resource} in {ns:?} must be refused"
        );
    }
}

/// `dir`'s kustomization rendered, minus the MetalLB custom resources (their CRDs are not
/// installed here), in a file for `kubectl apply -f`; the namespaces it uses exist.
fn rendered_for_dry_run(kubeconfig: &Path, dir: &str) -> (tempfile::TempDir, PathBuf) {
    ensure_deployed(kubeconfig);
    let rendered = kubectl_ok(
        kubeconfig,
        &["kustomize", repo_root().join(dir).to_str().unwrap()],
    );
    let docs: Vec<&str> = rendered
        .split("\n---\n")
        .filter(|d| !d.contains("apiVersion: metallb.io/"))
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("rendered.yaml");
    std::fs::write(&file, docs.join("\n---\n")).unwrap();
    // A dry run does not create namespaces.
    for ns in ["external-dns", "cmxsafe-dns"] {
        let _ = kubectl(kubeconfig, &["create", "namespace", ns]);
    }
    (tmp, file)
}

#[test]
fn every_manifest_is_admitted_by_the_api_server() {
    let Some(kubeconfig) = envtest() else { return };
    ensure_deployed(&kubeconfig);
    // deploy/base went in for real above; the kind demo's manifests go in as a server dry run.
    let root = repo_root();
    let out = kubectl_ok(
        &kubeconfig,
        &[
            "apply",
            "--dry-run=server",
            "-k",
            root.join("deploy/base").to_str().unwrap(),
        ],
    );
    assert!(out.contains("daemonset.apps/cmxsafe-gateway"), "{out}");
    let (_tmp, file) = rendered_for_dry_run(&kubeconfig, "kind/manifests");
    let out = kubectl_ok(
        &kubeconfig,
        &["apply", "--dry-run=server", "-f", file.to_str().unwrap()],
    );
    for object in [
        "daemonset.apps/cmxsafe-gateway",
        "deployment.apps/external-dns",
        "deployment.apps/bind",
    ] {
        assert!(out.contains(object), "{object} not applied: {out}");
    }
}

/// The gateway.toml each deployment ships is one the gateway accepts, and it serves what the
/// DaemonSet expects of it: SSH on the `ssh` port, the admin endpoint (the probes) on `admin`.
#[test]
fn shipped_gateway_configs_are_valid_and_serve_the_daemonsets_ports_and_probes() {
    let Some(kubeconfig) = envtest() else { return };
    for dir in ["deploy/base", "kind/manifests"] {
        let (_tmp, file) = rendered_for_dry_run(&kubeconfig, dir);
        let out = kubectl_ok(
            &kubeconfig,
            &[
                "apply",
                "--dry-run=server",
                "-o",
                "json",
                "-f",
                file.to_str().unwrap(),
            ],
        );
        let list: serde_json::Value = serde_json::from_str(&out).unwrap();
        let object = |kind: &str, name: &str| {
            list["items"]
                .as_array()
                .unwrap()
                .iter()
                .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
                .unwrap_or_else(|| panic!("{dir}: no {kind} {name}"))
                .clone()
        };
        let toml = object("ConfigMap", "cmxsafe-gateway")["data"]["gateway.toml"]
            .as_str()
            .unwrap()
            .to_string();
        let config = cmx_gateway::config::Config::parse(&toml, Path::new("gateway.toml"))
            .unwrap_or_else(|e| panic!("{dir}: {e}"));
        let ds = object("DaemonSet", "cmxsafe-gateway");
        let container = &ds["spec"]["template"]["spec"]["containers"][0];
        let port = |name: &str| {
            container["ports"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == name)
                .and_then(|p| p["containerPort"].as_u64())
                .unwrap_or_else(|| panic!("{dir}: no container port {name}"))
        };
        assert_eq!(u64::from(config.listen.port()), port("ssh"), "{dir}");
        assert!(config.admin.enabled, "{dir}: the probes need [admin] enabled");
        assert!(
            config.admin.listen.ip().is_unspecified(),
            "{dir}: the kubelet probes the pod IP, so admin.listen must not be loopback"
        );
        assert_eq!(u64::from(config.admin.listen.port()), port("admin"), "{dir}");
        for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
            assert_eq!(container[probe]["httpGet"]["path"], path, "{dir}: {probe}");
            assert_eq!(container[probe]["httpGet"]["port"], "admin", "{dir}: {probe}");
        }
    }
}

/// The real gateway binary, as in the DaemonSet: `--kubeconfig` (the service account's) and the
/// downward-API environment. A server publishing through it gets its Service; the Service goes
/// when the server does, and a stopping gateway hands its Services back.
#[tokio::test]
async fn a_running_gateway_keeps_a_service_for_each_server_it_holds() {
    let Some(k8s) = Cluster::connect().await else {
        return;
    };
    let InCluster {
        pod,
        hosts,
        keys,
        mut gw,
        _api_server,
    } = InCluster::launch(&k8s, "e2e-gw", &["e2e-srv1", "e2e-srv2"], "").await;
    let agent = SshAgent::start(
        &hosts,
        &hosts.srv,
        "e2e-srv1",
        &keys[0],
        &["-R", "1883:127.0.0.1:1883"],
    );
    agent
        .wait_output("remote forward success", Duration::from_secs(20))
        .await;
    let svc = wait_for(&k8s, "e2e-srv1", Duration::from_secs(30)).await;
    assert_eq!(owner_uids(&svc.metadata), vec![pod.uid.clone()]);
    assert_eq!(
        svc.spec.unwrap().ports.unwrap()[0].target_port,
        Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(
            SSH_PORT.into()
        ))
    );
    assert_eq!(
        endpoint_ips(&k8s.slice("e2e-srv1").await.unwrap()),
        vec!["10.244.5.50"]
    );

    // The server goes away: its Service goes too.
    drop(agent);
    k8s.wait_gone("e2e-srv1", Duration::from_secs(30)).await;
    gw.log
        .wait("service deleted", Duration::from_secs(5), |v| {
            field(v, "message").starts_with("service deleted") && field(v, "server") == "e2e-srv1"
        })
        .await;

    // Another server is here when the gateway stops: its Service is handed back on SIGTERM.
    let agent2 = SshAgent::start(
        &hosts,
        &hosts.srv,
        "e2e-srv2",
        &keys[1],
        &["-R", "1883:127.0.0.1:1883"],
    );
    agent2
        .wait_output("remote forward success", Duration::from_secs(20))
        .await;
    wait_for(&k8s, "e2e-srv2", Duration::from_secs(30)).await;
    gw.signal(libc::SIGTERM);
    assert!(gw.wait_exit(Duration::from_secs(30)).await.success());
    k8s.wait_gone("e2e-srv2", Duration::from_secs(30)).await;
    pod.delete().await;
}

/// A server identity may request and cancel its forward as often as it likes, within its
/// `max_forwards_per_identity`. Each request used to be a claim (two writes to the API server)
/// and each cancel a release (a read and a delete): one server, or one stolen server key, made
/// the gateway hammer the cluster's API server and flap the Service that every kube-proxy and DNS
/// server in the cluster follows. The controller now brings each server's Service in line at most
/// once a second, with whatever holds at that moment, so the flapping reaches the cluster as at
/// most one change per second, and the Service still ends as the server left it.
#[tokio::test]
async fn a_server_flapping_its_forward_cannot_flap_its_service() {
    let Some(k8s) = Cluster::connect().await else {
        return;
    };
    const SERVER: &str = "e2e-flap";
    const CHURN: Duration = Duration::from_secs(3);
    // With the gateway's rate of forward requests off (as an operator may set it): the
    // controller holds on its own.
    let no_rate = "[limits]\nmax_new_forwards_per_identity_per_sec = 0\n";
    let running = InCluster::launch(&k8s, "e2e-gw-flap", &[SERVER], no_rate).await;
    let mut session = raw_session(&running.hosts.srv, &format!("{GW_SRV_IP}:{SSH_PORT}"))
        .await
        .unwrap();
    assert!(try_login(&mut session, SERVER, &running.keys[0]).await.unwrap());

    // Every change to the Service that the cluster sees, from before the first request on.
    let name = format!("dynamic-service-{SERVER}");
    let watched = k8s
        .services
        .watch(
            &WatchParams::default().fields(&format!("metadata.name={name}")),
            "0",
        )
        .await
        .unwrap();
    let changes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counting = {
        let changes = changes.clone();
        tokio::spawn(async move {
            let mut watched = std::pin::pin!(watched);
            while let Some(event) = watched.next().await {
                match event {
                    Ok(WatchEvent::Added(_)) | Ok(WatchEvent::Deleted(_)) => {
                        changes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(e) => panic!("watching {name}: {e}"),
                }
            }
        })
    };

    let (started, mut cycles) = (Instant::now(), 0);
    while started.elapsed() < CHURN {
        session.tcpip_forward("localhost", 1883).await.unwrap();
        session.cancel_tcpip_forward("localhost", 1883).await.unwrap();
        cycles += 1;
    }
    let churned = started.elapsed();
    // The server settles with its forward in place: so does its Service.
    session.tcpip_forward("localhost", 1883).await.unwrap();
    let svc = wait_for(&k8s, SERVER, Duration::from_secs(30)).await;
    assert_eq!(owner_uids(&svc.metadata), vec![running.pod.uid.clone()]);
    // Let whatever the gateway still had queued reach the API server before counting.
    tokio::time::sleep(Duration::from_secs(3)).await;
    counting.abort();
    let changes = changes.load(std::sync::atomic::Ordering::SeqCst);
    // One creation and one deletion per second of churn at most, and the creation after it.
    let allowed = 2 * (churned.as_secs() as usize + 1) + 4;
    eprintln!(
        "{cycles} forward/cancel cycles in {churned:?}: the Service was created or deleted {changes} times (at most {allowed} allowed)"
    );
    assert!(
        changes <= allowed,
        "{cycles} forward/cancel cycles in {churned:?} created or deleted the Service {changes} times"
    );
    assert!(k8s.service(SERVER).await.is_some(), "the Service flapped away");

    // Cancelled for good: the Service goes.
    session.cancel_tcpip_forward("localhost", 1883).await.unwrap();
    k8s.wait_gone(SERVER, Duration::from_secs(30)).await;
    running.pod.delete().await;
}

/// The real gateway binary in `hosts.gw`, as in the DaemonSet (the service account's
/// `--kubeconfig`, the downward-API environment, pod IP 10.244.5.50), with a server identity
/// (address fd63:6d78::N, may publish localhost:1883) for each name in `servers`, and
/// `extra_config` (top-level keys or tables) in its config.
struct InCluster {
    pod: FakePod,
    hosts: Hosts,
    keys: Vec<Key>,
    gw: GatewayProc,
    _api_server: tokio::task::JoinHandle<()>,
}

impl InCluster {
    async fn launch(k8s: &Cluster, pod_name: &str, servers: &[&str], extra_config: &str) -> InCluster {
        let pod = FakePod::create(&k8s.admin, pod_name).await;
        let hosts = Hosts::new();
        let api_server = forward_api_server_into(&hosts.gw, &k8s.admin_kubeconfig);
        let mut registry = RegistryText::default();
        let mut keys = Vec::new();
        for (i, server) in servers.iter().enumerate() {
            let key = Key::generate(hosts.dir.path(), server);
            registry = registry.identity(
                server,
                "server",
                &[&key],
                &[
                    &format!("address = \"fd63:6d78::{}\"", i + 1),
                    "permit_listen = [\"localhost:1883\"]",
                ],
            );
            keys.push(key);
        }
        std::fs::write(hosts.path("identities.toml"), registry.build()).unwrap();
        std::fs::write(
            hosts.path("gateway.toml"),
            format!(
                "listen = \"0.0.0.0:{SSH_PORT}\"\n{}\n{extra_config}\n[kubernetes]\nresync_secs = 2\ndomain = \"iot.example.com\"\n",
                dataplane_config(&hosts.gw, "userspace")
            ),
        )
        .unwrap();
        let sa = k8s.sa_kubeconfig.to_str().unwrap().to_string();
        let env = [
            ("POD_NAME", pod_name),
            ("POD_NAMESPACE", NS),
            ("POD_UID", pod.uid.as_str()),
            ("POD_IP", "10.244.5.50"),
        ];
        let gw = GatewayProc::launch_with_env(&hosts, &["--kubeconfig", &sa], &env).await;
        gw.log
            .wait("controller started", Duration::from_secs(30), |v| {
                field(v, "message") == "Kubernetes controller started"
            })
            .await;
        InCluster {
            pod,
            hosts,
            keys,
            gw,
            _api_server: api_server,
        }
    }
}

async fn wait_for(k8s: &Cluster, server: &str, timeout: Duration) -> Service {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = k8s.service(server).await
            && k8s.slice(server).await.is_some()
        {
            return s;
        }
        assert!(Instant::now() < deadline, "no service for {server}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The API server listens on the host's loopback; the gateway runs in its own namespace. A
/// listener on the same address inside that namespace relays to it, so the kubeconfig's server
/// URL (and its certificate) work unchanged.
fn forward_api_server_into(ns: &Netns, kubeconfig: &Path) -> tokio::task::JoinHandle<()> {
    let kc = Kubeconfig::read_from(kubeconfig).unwrap();
    let url: http::Uri = kc.clusters[0]
        .cluster
        .as_ref()
        .unwrap()
        .server
        .clone()
        .unwrap()
        .parse()
        .unwrap();
    let addr = format!("{}:{}", url.host().unwrap(), url.port_u16().unwrap());
    let listener = ns.listen(&addr);
    tokio::spawn(async move {
        loop {
            let Ok((mut inside, _)) = listener.accept().await else {
                return;
            };
            let addr = addr.clone();
            tokio::spawn(async move {
                if let Ok(mut host) = tokio::net::TcpStream::connect(&addr).await {
                    let _ = tokio::io::copy_bidirectional(&mut inside, &mut host).await;
                }
            });
        }
    })
}
