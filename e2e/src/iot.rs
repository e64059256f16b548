//! IoT hosts as pods of the `cmxsafe/iot-host` image (kind/iot): cmx-agent, and for a server a
//! Mosquitto broker on its loopback. Their agent configuration, key and pinned host key come
//! from a ConfigMap and a Secret of their own.

use std::time::Duration;

use cmx_testbed::Key;

use crate::cluster::poll;
use crate::gateway::{Gateway, SLOW};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Runs Mosquitto on [::1]:1883 and publishes it as port 1883 with `preserve_source`.
    Server,
    /// Reaches `srv1:1883` on its own 127.0.0.1:1883.
    Device,
}

/// A pod running the IoT host image.
pub struct IotPod {
    pub name: String,
    namespace: String,
    cluster: crate::Cluster,
}

impl IotPod {
    /// Starts `name` as `identity` with `key`, connected to the gateway at `gateway:22` (an
    /// address, or a name the test keeps pointed with `point`).
    pub fn start(gw: &Gateway, name: &str, role: Role, identity: &str, key: &Key, gateway: &str) -> IotPod {
        let tunnel = match role {
            Role::Server => {
                "[[publish]]\nname = \"mqtt\"\nport = 1883\nto = \"[::1]:1883\"\npreserve_source = true\n"
            }
            Role::Device => {
                "[[local]]\nname = \"mqtt\"\nlisten = \"127.0.0.1:1883\"\ntarget = \"srv1:1883\"\n"
            }
        };
        let agent_toml = format!(
            "identity = \"{identity}\"\nkey = \"/etc/cmx-agent-key/id_ed25519\"\ngateways = [\"{gateway}:22\"]\n\
             known_hosts = \"/etc/cmx-agent/known_hosts\"\nstatus_file = \"/tmp/cmx-agent-status.json\"\n\
             [reconnect]\nmax_secs = 2\n{tunnel}"
        );
        // Port 22: known_hosts names the host alone (OpenSSH writes `[host]:port` for others).
        let known_hosts = format!("{gateway} {}\n", gw.host_key.public());
        let indent = |text: &str| text.lines().map(|l| format!("    {l}\n")).collect::<String>();
        let (mode, caps) = match role {
            // preserve_source: the agent adds the identity prefix's local route in its pod.
            Role::Server => ("server", "{capabilities: {add: [NET_ADMIN]}}"),
            Role::Device => ("device", "{}"),
        };
        let private = std::fs::read_to_string(&key.path).expect("read the agent key");
        gw.cluster.apply(&format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {name}, namespace: {ns}}}\ndata:\n  agent.toml: |\n{}  known_hosts: |\n{}\
             ---\napiVersion: v1\nkind: Secret\nmetadata: {{name: {name}-key, namespace: {ns}}}\nstringData:\n  id_ed25519: |\n{}\
             ---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {{app: iot}}}}\nspec:\n  \
             terminationGracePeriodSeconds: 2\n  containers:\n  - name: host\n    image: cmxsafe/iot-host:e2e\n    imagePullPolicy: Never\n    \
             args: [\"{mode}\"]\n    securityContext: {caps}\n    volumeMounts:\n    - {{name: config, mountPath: /etc/cmx-agent}}\n    \
             - {{name: key, mountPath: /etc/cmx-agent-key}}\n  volumes:\n  - {{name: config, configMap: {{name: {name}}}}}\n  \
             - {{name: key, secret: {{secretName: {name}-key, defaultMode: 0400}}}}\n",
            indent(&agent_toml),
            indent(&known_hosts),
            indent(&private),
            ns = gw.namespace,
        ));
        let pod = IotPod {
            name: name.to_string(),
            namespace: gw.namespace.clone(),
            cluster: gw.cluster.clone(),
        };
        poll(
            &format!("pod {name} running"),
            SLOW,
            || {
                let p = pod.cluster.get(&pod.namespace, &format!("pod/{name}"))?;
                (p["status"]["phase"] == "Running").then_some(())
            },
            || pod.logs(),
        );
        pod
    }

    /// Points host name `name` at `ip` in the pod's /etc/hosts: what DNS (ExternalDNS) does for
    /// devices in a real cluster, which this one has no DNS server for. The agent resolves its
    /// gateway's name at every connection attempt.
    pub fn point(&self, name: &str, ip: &str) {
        let script = format!(
            "grep -v ' {name}$' /etc/hosts > /tmp/hosts; echo '{ip} {name}' >> /tmp/hosts; cat /tmp/hosts > /etc/hosts"
        );
        self.exec(&["sh", "-c", &script])
            .unwrap_or_else(|e| panic!("pointing {name} at {ip}: {e}"));
    }

    /// `kubectl exec` of `args` in the pod; `Err` carries what it printed.
    pub fn exec(&self, args: &[&str]) -> Result<String, String> {
        let mut all = vec!["-n", self.namespace.as_str(), "exec", self.name.as_str(), "--"];
        all.extend_from_slice(args);
        self.cluster.try_run(&all, None)
    }

    /// Everything the pod printed (agent JSON lines, and Mosquitto's log on a server).
    pub fn logs(&self) -> String {
        self.cluster
            .try_run(&["-n", &self.namespace, "logs", &self.name], None)
            .unwrap_or_else(|e| e)
    }

    /// Publishes `message` to the broker behind the device's tunnel (QoS 1, client id `client`),
    /// retrying while the tunnel is not up yet.
    pub fn publish(&self, client: &str, message: &str) {
        self.publish_within(client, message, SLOW, || self.logs());
    }

    /// Publishes one message (QoS 1) through the pod's tunnel, retrying for `timeout`; panics with
    /// `diagnose()` if it never goes through.
    pub fn publish_within(
        &self,
        client: &str,
        message: &str,
        timeout: Duration,
        diagnose: impl Fn() -> String,
    ) {
        poll(
            &format!("{} publishes '{message}'", self.name),
            timeout,
            || self.exec(&mosquitto_pub(client, message)).ok(),
            diagnose,
        );
    }

    /// Whether a publish is refused now (the tunnel exists but the gateway refuses the path).
    pub fn publish_fails(&self, client: &str) -> bool {
        let mut args = vec!["timeout", "10"];
        let publish = mosquitto_pub(client, "refused?");
        args.extend(publish.iter().copied());
        self.exec(&args).is_err()
    }
}

/// How long an agent may take to notice a gateway went away and be back.
pub const RECONNECT: Duration = Duration::from_secs(120);

/// `mosquitto_pub` of `message` (QoS 1, topic sensors/e2e) to the pod's own tunnel entry.
fn mosquitto_pub<'a>(client: &'a str, message: &'a str) -> [&'a str; 13] {
    [
        "mosquitto_pub",
        "-h",
        "127.0.0.1",
        "-p",
        "1883",
        "-q",
        "1",
        "-i",
        client,
        "-t",
        "sensors/e2e",
        "-m",
        message,
    ]
}
