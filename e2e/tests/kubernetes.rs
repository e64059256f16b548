//! The gateway DaemonSet on a real kubelet: the shipped manifests (deploy/base through
//! deploy/overlays/e2e), the images this run built, agents and Mosquitto in pods. Every check is
//! on state (objects, logs, metrics, bytes that arrived), never on how long something took.
//!
//! The tests share one cluster and run one at a time, each in namespaces of its own.

use std::sync::Mutex;

use cmx_e2e::{Cluster, Gateway, GatewayPod, IotPod, RECONNECT, Role, SLOW, http_get, http_get_with, poll};
use cmx_testbed::{DEV1_ADDR, Key, RegistryText};
use serde_json::Value;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn registry(srv1: &Key, dev1: &Key, dev1_may_open: &str) -> String {
    RegistryText::default()
        .srv1(srv1, "permit_listen = [\"1883\"]")
        .dev1(dev1, &format!("permit_open = [\"{dev1_may_open}\"]"))
        .build()
}

/// The gateway pod's metrics, once it answers.
fn metrics(pod: &GatewayPod) -> String {
    poll(
        "the admin endpoint",
        SLOW,
        || http_get(&pod.ip, 9180, "/metrics").ok().map(|(_, body)| body),
        || format!("{pod:?}"),
    )
}

/// The value of a sample line `name` in a metrics text.
fn sample(metrics: &str, name: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Waits until `dynamic-service-<server>` is owned by `pod` and its EndpointSlice points at it.
fn service_follows(gw: &Gateway, server: &str, pod: &GatewayPod) {
    let name = format!("dynamic-service-{server}");
    poll(
        &format!("{name} owned by {} and pointing at {}", pod.name, pod.ip),
        SLOW,
        || {
            let svc = gw.cluster.get(&gw.namespace, &format!("service/{name}"))?;
            let owner = svc["metadata"]["ownerReferences"][0]["uid"].as_str()?;
            let slices = gw.cluster.try_run(
                &[
                    "-n",
                    &gw.namespace,
                    "get",
                    "endpointslices",
                    "-l",
                    &format!("kubernetes.io/service-name={name}"),
                    "-o",
                    "json",
                ],
                None,
            );
            let slices: Value = serde_json::from_str(&slices.ok()?).ok()?;
            let ip = slices["items"][0]["endpoints"][0]["addresses"][0].as_str()?;
            (owner == pod.uid && ip == pod.ip).then_some(())
        },
        || gw.describe(),
    );
}

/// A server pod publishing its broker and a device pod reaching it through
/// `dynamic-service-srv1`, and the device's first messages through.
struct Fleet {
    server: IotPod,
    device: IotPod,
}

/// The name devices dial for srv1's replica (ExternalDNS's record in a real cluster).
const SRV1_NAME: &str = "dynamic-service-srv1.e2e.cmxsafe.test";

fn fleet(gw: &Gateway, pod: &GatewayPod, srv1: &Key, dev1: &Key) -> Fleet {
    let server = IotPod::start(
        gw,
        "iot-server",
        Role::Server,
        "srv1",
        srv1,
        &gw.cluster_ip("cmxsafe-gw"),
    );
    service_follows(gw, "srv1", pod);
    let device = IotPod::start(gw, "iot-device", Role::Device, "dev1", dev1, SRV1_NAME);
    device.point(SRV1_NAME, &gw.cluster_ip("dynamic-service-srv1"));
    device.publish("dev1-first", "hello");
    Fleet { server, device }
}

impl Fleet {
    /// The broker received a message from `client`, which connected from dev1's identity address.
    fn broker_got(&self, client: &str) {
        poll(
            &format!("the broker received {client}'s message from dev1's identity address"),
            SLOW,
            || {
                let log = self.server.logs();
                let from_dev1 = log.lines().any(|l| {
                    l.contains(&format!("New client connected from {DEV1_ADDR}")) && l.contains(client)
                });
                let published = log.contains(&format!("Received PUBLISH from {client}"));
                (from_dev1 && published).then_some(())
            },
            || self.server.logs(),
        );
    }
}

#[test]
fn mqtt_from_a_device_pod_reaches_the_broker_through_the_daemonset_with_the_device_identity() {
    let Some(cluster) = Cluster::from_env() else {
        return;
    };
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let [srv1, dev1] = ["srv1", "dev1"].map(|n| Key::generate(dir.path(), n));
    // With the admin API's token turned on as the ConfigMap's comment says.
    let token = "e2e-admin-token-5f1c9a7d3b2e4f60";
    let gw =
        Gateway::deploy_with_admin_token(&cluster, "e2e-mqtt", &registry(&srv1, &dev1, "srv1:1883"), token);
    let pod = gw.ready_pod(None);

    // Ready through /readyz, with the sockmap data plane inside the pod.
    assert_eq!(http_get(&pod.ip, 9180, "/readyz").map(|r| r.0), Ok(200));
    let m = metrics(&pod);
    assert_eq!(
        sample(&m, "cmxsafe_dataplane_info{mode=\"sockmap\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(sample(&m, "cmxsafe_identities"), Some(2.0), "{m}");

    let fleet = fleet(&gw, &pod, &srv1, &dev1);
    fleet.broker_got("dev1-first");
    // The admin API, from outside the pod: the token from the Secret opens it, nothing else does.
    let sessions = |headers: &[(&str, &str)]| {
        http_get_with(&pod.ip, 9180, "/api/v1/sessions", headers).unwrap_or_else(|e| panic!("{e}"))
    };
    let (status, body) = sessions(&[]);
    assert_eq!(status, 401, "no token: {body}");
    let (status, _) = sessions(&[("Authorization", "Bearer e2e-admin-token-5f1c9a7d3b2e4f61")]);
    assert_eq!(status, 401, "a wrong token");
    let bearer = format!("Bearer {token}");
    let (status, body) = sessions(&[("Authorization", &bearer)]);
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    let mut connected: Vec<&str> = body["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["identity"].as_str())
        .collect();
    connected.sort();
    assert_eq!(connected, ["dev1", "srv1"], "{body}");
    // The kernel carried the pair's loopback hop: the gateway's audit line says so.
    let spliced = poll(
        "a pair-closed audit line",
        SLOW,
        || {
            gw.log_lines(&pod)
                .into_iter()
                .find(|l| l["event"] == "pair-closed" && l["identity"] == "dev1")
        },
        || gw.logs(),
    );
    assert_eq!(spliced["spliced"], true, "{spliced}");
    assert!(spliced["spliced_to_target"].as_u64() > Some(0), "{spliced}");

    // A registry change through the ConfigMap applies without a restart: dev1 loses srv1:1883...
    gw.set_registry(&registry(&srv1, &dev1, "srv1:1884"));
    poll(
        "dev1 refused after the registry change",
        SLOW,
        || fleet.device.publish_fails("dev1-refused").then_some(()),
        || gw.logs(),
    );
    let denied = gw
        .log_lines(&pod)
        .into_iter()
        .any(|l| l["event"] == "forward" && l["decision"] == "deny" && l["identity"] == "dev1");
    assert!(denied, "the refusal is audited:\n{}", gw.logs());
    // ...and gets it back.
    gw.set_registry(&registry(&srv1, &dev1, "srv1:1883"));
    fleet.device.publish("dev1-again", "back");
    fleet.broker_got("dev1-again");
    assert_eq!(gw.restarts(&pod), 0, "the registry changed without a restart");
    assert_eq!(gw.ready_pod(None), pod, "the same pod served throughout");

    // The RBAC and NetworkPolicy objects were admitted with the rest.
    for object in [
        "role/cmxsafe-gateway",
        "rolebinding/cmxsafe-gateway",
        "networkpolicy/cmxsafe-gateway",
    ] {
        assert!(
            gw.cluster.get(&gw.namespace, object).is_some(),
            "{object} missing"
        );
    }

    // In the pod, the API server (KUBERNETES_SERVICE_HOST) is refused to a device even on a
    // wildcard rule, although the shipped config lists no cluster network: stock `ssh -W` as
    // dev1, from this host to the pod's SSH port, asks for the API server's ClusterIP.
    let api_server = gw
        .cluster
        .get("default", "service/kubernetes")
        .and_then(|s| s["spec"]["clusterIP"].as_str().map(str::to_string))
        .expect("the kubernetes Service's ClusterIP");
    gw.set_registry(&registry(&srv1, &dev1, "*:443"));
    let refusal = poll(
        "dev1's stdio forward to the API server refused as such",
        SLOW,
        || {
            let said = ssh_stdio_forward(&pod, &dev1, &format!("{api_server}:443"));
            said.contains("the Kubernetes API server").then_some(said)
        },
        || gw.logs(),
    );
    assert!(refusal.contains("open failed"), "{refusal}");
}

/// What stock `ssh -W target` as dev1 to `pod`'s SSH port printed (stdin closed at once).
fn ssh_stdio_forward(pod: &GatewayPod, dev1: &Key, target: &str) -> String {
    let out = std::process::Command::new("ssh")
        .args(["-i"])
        .arg(&dev1.path)
        .args([
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "ConnectTimeout=10",
            "-p",
            "2222",
            "-W",
            target,
        ])
        .arg(format!("dev1@{}", pod.ip))
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run ssh");
    String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout)
}

#[test]
fn services_and_agents_follow_a_rolling_update_and_a_deleted_pod() {
    let Some(cluster) = Cluster::from_env() else {
        return;
    };
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let [srv1, dev1] = ["srv1", "dev1"].map(|n| Key::generate(dir.path(), n));
    let gw = Gateway::deploy(&cluster, "e2e-roll", &registry(&srv1, &dev1, "srv1:1883"));
    let first = gw.ready_pod(None);
    let fleet = fleet(&gw, &first, &srv1, &dev1);

    // A rolling update replaces the pod: the new one holds srv1's Service, the agents are back.
    gw.cluster.run(&[
        "-n",
        &gw.namespace,
        "patch",
        "daemonset",
        "cmxsafe-gateway",
        "--type=merge",
        "-p",
        r#"{"spec":{"template":{"metadata":{"annotations":{"e2e/rollout":"1"}}}}}"#,
    ]);
    let second = gw.ready_pod(Some(&first));
    service_follows(&gw, "srv1", &second);
    // The old pod handed the Service back when it stopped; the new one created it again, so its
    // address may be new: the name follows it, as DNS does.
    fleet
        .device
        .point(SRV1_NAME, &gw.cluster_ip("dynamic-service-srv1"));
    // The device publishes again after the update.
    fleet
        .device
        .publish_within("dev1-rolled", "rolled", RECONNECT, || gw.describe());
    fleet.broker_got("dev1-rolled");

    // Deleting the pod: its Services go with it (owner references), the DaemonSet's next pod
    // takes srv1 back when the server agent reconnects, and the device follows.
    gw.cluster
        .run(&["-n", &gw.namespace, "delete", "pod", &second.name, "--wait=false"]);
    let third = gw.ready_pod(Some(&second));
    service_follows(&gw, "srv1", &third);
    fleet
        .device
        .point(SRV1_NAME, &gw.cluster_ip("dynamic-service-srv1"));
    // The device publishes again after the pod was deleted.
    fleet
        .device
        .publish_within("dev1-deleted", "deleted", RECONNECT, || gw.describe());
    fleet.broker_got("dev1-deleted");
    let services = gw
        .cluster
        .run(&["-n", &gw.namespace, "get", "services", "-o", "json"]);
    let services: Value = serde_json::from_str(&services).unwrap();
    let dynamic: Vec<&Value> = services["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| {
            s["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("dynamic-service-"))
        })
        .collect();
    assert_eq!(
        dynamic.len(),
        1,
        "one Service per server, no leftovers: {dynamic:?}"
    );
}

#[test]
fn two_gateways_on_one_node_both_run_the_sockmap_data_plane() {
    let Some(cluster) = Cluster::from_env() else {
        return;
    };
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let a = Gateway::deploy(&cluster, "e2e-two-a", "");
    let b = Gateway::deploy(&cluster, "e2e-two-b", "");
    let (pa, pb) = (a.ready_pod(None), b.ready_pod(None));
    for pod in [&pa, &pb] {
        let m = metrics(pod);
        assert_eq!(
            sample(&m, "cmxsafe_dataplane_info{mode=\"sockmap\"}"),
            Some(1.0),
            "{}: {m}",
            pod.name
        );
        // Each pod pins under a directory of its own on the node.
        let pins = std::path::Path::new("/sys/fs/bpf/cmxsafe").join(&pod.uid);
        assert!(
            pins.join("cmx_tags").exists(),
            "{} has no pins in {}",
            pod.name,
            pins.display()
        );
        // ...and its cgroup below its own container's cgroup, not at the node's cgroup root.
        let cgroup = gateway_cgroup(&pod.uid);
        assert!(
            cgroup.as_ref().is_some_and(|c| c.join("cgroup.procs").exists()),
            "{}: no cmxsafe-gateway cgroup below its pod's cgroup",
            pod.name
        );
    }
    // A gateway that stops cleanly takes its pins with it; the other keeps running.
    drop(b);
    let gone = std::path::Path::new("/sys/fs/bpf/cmxsafe").join(&pb.uid);
    assert!(!gone.exists(), "{} left its pins behind", pb.name);
    let m = metrics(&pa);
    assert_eq!(sample(&m, "cmxsafe_ready"), Some(1.0), "{m}");
    let root = cmx_testbed::cgroup_v2_mount().join("cmxsafe-gateway");
    assert!(
        !root.exists(),
        "a gateway made its cgroup at the node's root: {}",
        root.display()
    );
}

/// The `cmxsafe-gateway` cgroup below the pod `uid`'s cgroup on this node, if there is one
/// (`<v2 mount>/kubepods/<qos>/pod<uid>/<container>/cmxsafe-gateway`).
fn gateway_cgroup(uid: &str) -> Option<std::path::PathBuf> {
    let kubepods = cmx_testbed::cgroup_v2_mount().join("kubepods");
    let pod_dir = format!("pod{uid}");
    let mut dirs = vec![kubepods];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).ok()?.flatten() {
            let path = entry.path();
            if !path.is_dir() {
                continue;
            }
            if path.file_name().is_some_and(|n| n == "cmxsafe-gateway")
                && path.to_string_lossy().contains(&pod_dir)
            {
                return Some(path);
            }
            dirs.push(path);
        }
    }
    None
}
