//! cmx-e2e: helpers for the end-to-end tests on a real cluster (a kubelet, containerd, kube-proxy:
//! `../shared/tools/minicluster` on the build machines, started by `cargo xtask test`). The
//! shipped manifests are applied through `deploy/overlays/e2e` into a namespace of each test's
//! own, with the images this run built; agents and Mosquitto run in pods. Dev only.
//!
//! # Layout
//! - `Cluster`: kubectl against the cluster named by `CMX_E2E_KUBECONFIG`.
//! - `Gateway`: one deployment of the gateway in its own namespace (removed on drop).
//! - `IotPod`: a pod of the IoT host image (cmx-agent, Mosquitto) as a server or a device.
//! - `poll`: waiting for a state, with the last observation in the failure message.

mod cluster;
mod gateway;
mod iot;

pub use cluster::{Cluster, poll};
pub use gateway::{Gateway, GatewayPod, SLOW, http_get, http_get_with, repo_root};
pub use iot::{IotPod, RECONNECT, Role};
