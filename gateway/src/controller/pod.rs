//! Who this gateway pod is, from the downward API (see deploy/base/daemonset.yaml), and whether
//! the controller runs at all.

use std::net::IpAddr;

use super::Settings;
use crate::config::{Config, ControllerMode};

/// The environment variables the DaemonSet fills from the downward API.
pub const POD_ENV: [&str; 4] = ["POD_NAME", "POD_NAMESPACE", "POD_UID", "POD_IP"];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PodError {
    #[error(
        "kubernetes.controller is on but {0} is not set: give the pod's {1} through the downward API (see deploy/base/daemonset.yaml)"
    )]
    Missing(&'static str, &'static str),
    #[error("POD_IP '{0}' is not an IP address")]
    BadIp(String),
}

/// Whether the controller should run: `on`, or `auto` inside a cluster (the service account's
/// `KUBERNETES_SERVICE_HOST` is set) or with an explicit kubeconfig.
pub fn enabled(config: &Config, env: &dyn Fn(&str) -> Option<String>) -> bool {
    match config.kubernetes.controller {
        ControllerMode::On => true,
        ControllerMode::Off => false,
        ControllerMode::Auto => {
            env("KUBERNETES_SERVICE_HOST").is_some() || !config.kubernetes.kubeconfig.as_os_str().is_empty()
        }
    }
}

/// The controller's settings: this pod from `env`, the Services' shape from `config`.
/// `ssh_port` is the port the gateway really listens on (the EndpointSlice's port).
pub fn settings(
    config: &Config,
    ssh_port: u16,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Settings, PodError> {
    let get = |var: &'static str, what: &'static str| {
        env(var)
            .filter(|v| !v.is_empty())
            .ok_or(PodError::Missing(var, what))
    };
    let k = &config.kubernetes;
    let namespace = if k.namespace.is_empty() {
        get("POD_NAMESPACE", "metadata.namespace")?
    } else {
        k.namespace.clone()
    };
    let ip = get("POD_IP", "status.podIP")?;
    Ok(Settings {
        namespace,
        pod_name: get("POD_NAME", "metadata.name")?,
        pod_uid: get("POD_UID", "metadata.uid")?,
        pod_ip: ip.parse::<IpAddr>().map_err(|_| PodError::BadIp(ip))?,
        service_prefix: config.service_name_prefix.clone(),
        domain: (!k.domain.is_empty()).then(|| k.domain.clone()),
        service_type: k.service_type.clone(),
        service_port: k.service_port,
        target_port: ssh_port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    const POD: [(&str, &str); 4] = [
        ("POD_NAME", "gw-1"),
        ("POD_NAMESPACE", "cmxsafe"),
        ("POD_UID", "u-1"),
        ("POD_IP", "10.0.0.5"),
    ];

    #[test]
    fn auto_means_in_a_cluster_or_with_a_kubeconfig() {
        let mut c = Config::default();
        assert!(!enabled(&c, &env_of(&[])));
        assert!(enabled(&c, &env_of(&[("KUBERNETES_SERVICE_HOST", "10.96.0.1")])));
        c.kubernetes.kubeconfig = "/etc/kube.conf".into();
        assert!(enabled(&c, &env_of(&[])));
        c.kubernetes.controller = ControllerMode::Off;
        assert!(!enabled(&c, &env_of(&[("KUBERNETES_SERVICE_HOST", "x")])));
    }

    #[test]
    fn settings_come_from_the_downward_api_and_the_config() {
        let mut c = Config::default();
        c.kubernetes.domain = "iot.example".into();
        let s = settings(&c, 2222, &env_of(&POD)).unwrap();
        assert_eq!(
            (s.namespace.as_str(), s.pod_name.as_str(), s.pod_uid.as_str()),
            ("cmxsafe", "gw-1", "u-1")
        );
        assert_eq!(s.pod_ip, "10.0.0.5".parse::<IpAddr>().unwrap());
        assert_eq!(s.domain.as_deref(), Some("iot.example"));
        assert_eq!(s.target_port, 2222);
        assert_eq!(s.service_prefix, "dynamic-service-");
    }

    #[test]
    fn missing_or_bad_pod_identity_is_named() {
        let c = Config::default();
        let without_uid: Vec<_> = POD.iter().copied().filter(|(k, _)| *k != "POD_UID").collect();
        let e = settings(&c, 2222, &env_of(&without_uid)).unwrap_err();
        assert_eq!(e, PodError::Missing("POD_UID", "metadata.uid"));
        assert!(e.to_string().contains("POD_UID is not set"), "{e}");
        let mut bad_ip = POD.to_vec();
        bad_ip[3] = ("POD_IP", "pending");
        assert_eq!(
            settings(&c, 2222, &env_of(&bad_ip)).unwrap_err().to_string(),
            "POD_IP 'pending' is not an IP address"
        );
    }
}
