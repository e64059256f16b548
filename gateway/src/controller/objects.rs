//! The objects the controller keeps for each server whose forward this pod holds: a selector-less
//! Service `dynamic-service-<server>` owned by the Pod, and an EndpointSlice pointing at this
//! pod's SSH port owned by the Service. If the pod goes away Kubernetes garbage-collects the
//! Service, and with it the EndpointSlice; deleting the Service deletes both.
//!
//! Why selector-less + EndpointSlice rather than a selector on a per-pod label: the gateway then
//! needs no right to modify Pods (a label patch right applies to every pod of the namespace and
//! could redirect other Services), the endpoint follows the session at once instead of waiting
//! for the endpoints controller, and a takeover is one apply of two objects.

use std::net::IpAddr;

use serde_json::{Value, json};

/// Who this gateway pod is and how its Services look.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub namespace: String,
    pub pod_name: String,
    pub pod_uid: String,
    pub pod_ip: IpAddr,
    /// `dynamic-service-`: the Service of server `srv1` is `dynamic-service-srv1`.
    pub service_prefix: String,
    /// ExternalDNS domain: the Service is announced as `<service name>.<domain>`.
    pub domain: Option<String>,
    /// ClusterIP, NodePort or LoadBalancer.
    pub service_type: String,
    /// The Service's SSH port (agents connect there) and the pod's (the gateway's listen port).
    pub service_port: u16,
    pub target_port: u16,
}

pub const FIELD_MANAGER: &str = "cmxsafe";
pub const MANAGED_BY: &str = "cmxsafe";
pub const SERVER_LABEL: &str = "cmxsafe.io/server";
/// A label value: no slash allowed (the API server checks it), hence not "cmxsafe.io/gateway".
const SLICE_MANAGER: &str = "gateway.cmxsafe.io";

/// The label selector of every object this controller manages.
pub fn managed_selector() -> String {
    format!("app.kubernetes.io/managed-by={MANAGED_BY}")
}

impl Settings {
    pub fn service_name(&self, server: &str) -> String {
        format!("{}{server}", self.service_prefix)
    }

    fn pod_owner(&self) -> Value {
        json!([{ "apiVersion": "v1", "kind": "Pod", "name": self.pod_name, "uid": self.pod_uid }])
    }

    fn labels(&self, server: &str) -> Value {
        json!({ "app.kubernetes.io/managed-by": MANAGED_BY, SERVER_LABEL: server })
    }

    pub fn service(&self, server: &str) -> Value {
        let name = self.service_name(server);
        let mut meta = json!({
            "name": name,
            "namespace": self.namespace,
            "labels": self.labels(server),
            "ownerReferences": self.pod_owner(),
        });
        if let Some(domain) = &self.domain {
            meta["annotations"] =
                json!({ "external-dns.alpha.kubernetes.io/hostname": format!("{name}.{domain}") });
        }
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": meta,
            "spec": {
                "type": self.service_type,
                "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": { "clientIP": { "timeoutSeconds": 86400 } },
                "ports": [{ "name": "ssh", "protocol": "TCP", "port": self.service_port, "targetPort": self.target_port }],
            },
        })
    }

    /// `api_version`: `discovery.k8s.io/v1`, or `v1beta1` on clusters older than 1.21 (only the
    /// fields both versions share are used). `service_uid`: the Service's, its owner.
    pub fn endpoint_slice(&self, server: &str, api_version: &str, service_uid: &str) -> Value {
        let name = self.service_name(server);
        let mut labels = self.labels(server);
        labels["kubernetes.io/service-name"] = json!(name);
        labels["endpointslice.kubernetes.io/managed-by"] = json!(SLICE_MANAGER);
        json!({
            "apiVersion": api_version,
            "kind": "EndpointSlice",
            "metadata": { "name": name, "namespace": self.namespace, "labels": labels, "ownerReferences": [{ "apiVersion": "v1", "kind": "Service", "name": name, "uid": service_uid }] },
            "addressType": if self.pod_ip.is_ipv4() { "IPv4" } else { "IPv6" },
            "endpoints": [{
                "addresses": [self.pod_ip.to_string()],
                "conditions": { "ready": true },
                "targetRef": { "kind": "Pod", "name": self.pod_name, "namespace": self.namespace, "uid": self.pod_uid },
            }],
            "ports": [{ "name": "ssh", "protocol": "TCP", "port": self.target_port }],
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn settings() -> Settings {
        Settings {
            namespace: "cmxsafe".into(),
            pod_name: "cmxsafe-gw-abcde".into(),
            pod_uid: "11111111-2222-3333-4444-555555555555".into(),
            pod_ip: "10.244.1.7".parse().unwrap(),
            service_prefix: "dynamic-service-".into(),
            domain: Some("cmx.example.com".into()),
            service_type: "LoadBalancer".into(),
            service_port: 22,
            target_port: 2222,
        }
    }

    #[test]
    fn service_is_selector_less_owned_by_the_pod_and_announced() {
        let s = settings().service("srv1");
        assert_eq!(s["metadata"]["name"], "dynamic-service-srv1");
        assert_eq!(
            s["metadata"]["annotations"]["external-dns.alpha.kubernetes.io/hostname"],
            "dynamic-service-srv1.cmx.example.com"
        );
        assert_eq!(
            s["metadata"]["ownerReferences"][0]["uid"],
            "11111111-2222-3333-4444-555555555555"
        );
        assert!(
            s["spec"].get("selector").is_none(),
            "selector-less: our EndpointSlice decides"
        );
        assert_eq!(s["spec"]["sessionAffinity"], "ClientIP");
        assert_eq!(
            s["spec"]["sessionAffinityConfig"]["clientIP"]["timeoutSeconds"],
            86400
        );
        assert_eq!(s["spec"]["ports"][0]["targetPort"], 2222);
    }

    #[test]
    fn endpoint_slice_points_at_this_pod() {
        let e = settings().endpoint_slice("srv1", "discovery.k8s.io/v1", "svc-uid");
        assert_eq!(e["metadata"]["ownerReferences"][0]["kind"], "Service");
        assert_eq!(e["metadata"]["ownerReferences"][0]["uid"], "svc-uid");
        assert_eq!(
            e["metadata"]["labels"]["kubernetes.io/service-name"],
            "dynamic-service-srv1"
        );
        assert_eq!(
            e["metadata"]["labels"]["endpointslice.kubernetes.io/managed-by"],
            "gateway.cmxsafe.io"
        );
        assert_eq!(e["addressType"], "IPv4");
        assert_eq!(e["endpoints"][0]["addresses"][0], "10.244.1.7");
        assert_eq!(e["ports"][0]["port"], 2222);
        let mut v6 = settings();
        v6.pod_ip = "fd00::7".parse().unwrap();
        assert_eq!(
            v6.endpoint_slice("srv1", "discovery.k8s.io/v1beta1", "u")["addressType"],
            "IPv6"
        );
    }
}
