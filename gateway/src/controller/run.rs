//! The controller task: follows the gateway's forwards through its event stream and keeps the
//! Services in step, with a periodic resync. Started in the background: a missing API server
//! delays the controller, never the gateway.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

use super::{Action, Controller, ControllerError, Settings, plan, retry};
use crate::events::GatewayEvent;

/// Attempts per event-driven call; what still fails is repaired by the next resync.
const ATTEMPTS: usize = 5;
/// How long a stopping pod spends handing its Services back.
const RELEASE_ON_STOP: Duration = Duration::from_secs(5);

/// A client from `kubeconfig`, or else the in-cluster service account (or `$KUBECONFIG`).
pub async fn client(kubeconfig: Option<&PathBuf>) -> Result<Client, ControllerError> {
    let err = |e: &dyn std::fmt::Display| ControllerError::Client(e.to_string());
    match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|e| err(&format!("{}: {e}", path.display())))?;
            let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| err(&format!("{}: {e}", path.display())))?;
            Client::try_from(config).map_err(|e| err(&e))
        }
        None => Client::try_default().await.map_err(|e| err(&e)),
    }
}

/// "v1" where the cluster serves discovery.k8s.io/v1 (Kubernetes >= 1.21), else "v1beta1".
pub async fn slice_version(client: &Client) -> Result<&'static str, ControllerError> {
    let groups = client
        .list_api_groups()
        .await
        .map_err(super::api_err("list API groups"))?;
    let discovery = groups.groups.iter().find(|g| g.name == "discovery.k8s.io");
    Ok(match discovery {
        Some(g) if g.versions.iter().any(|v| v.version == "v1") => "v1",
        _ => "v1beta1",
    })
}

/// What the controller follows: the gateway's events, the set of servers holding a forward
/// here right now, and when to stop.
pub struct Feed {
    pub events: broadcast::Receiver<GatewayEvent>,
    pub held: Box<dyn Fn() -> BTreeSet<String> + Send + Sync>,
    pub shutdown: CancellationToken,
}

/// Connects (retrying with backoff until it works or the gateway stops), then runs the
/// controller until the gateway stops.
pub fn start(
    feed: Feed,
    settings: Settings,
    kubeconfig: Option<PathBuf>,
    resync: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut delay = Duration::from_secs(1);
        let controller = loop {
            let attempt = async {
                let c = client(kubeconfig.as_ref()).await?;
                let v = slice_version(&c).await?;
                Ok::<_, ControllerError>(Controller::new(c, settings.clone(), v))
            };
            tokio::select! {
                _ = feed.shutdown.cancelled() => return,
                r = attempt => match r {
                    Ok(c) => break c,
                    Err(e) => tracing::warn!(error = %e, retry_in = ?delay,
                        "Kubernetes controller cannot start yet; forwarding is not affected"),
                },
            }
            tokio::select! {
                _ = feed.shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(30));
        };
        tracing::info!(namespace = %settings.namespace, pod = %settings.pod_name,
            endpoint_slices = %controller.slice_api_version, "Kubernetes controller started");
        run(controller, feed, resync).await;
    })
}

/// The controller loop: claims on new forwards, releases when a server's last forward here
/// ends, resyncs every `resync` (and at once after missing events), and on shutdown hands this
/// pod's Services back so that the servers' next replica claims them.
pub async fn run(controller: Controller, mut feed: Feed, resync: Duration) {
    let mut ticker = tokio::time::interval(resync);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = feed.shutdown.cancelled() => break,
            ev = feed.events.recv() => match ev {
                Ok(GatewayEvent::ForwardAdded { identity, .. })
                | Ok(GatewayEvent::ForwardTakenOver { identity, .. }) => {
                    let _ = retry("claim", ATTEMPTS, || controller.claim(&identity)).await;
                }
                Ok(GatewayEvent::ForwardRemoved { identity, .. }) => {
                    if !(feed.held)().contains(&identity) {
                        let _ = retry("release", ATTEMPTS, || controller.release(&identity)).await;
                    }
                }
                Ok(_) => {}
                Err(RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "controller fell behind the gateway's events; resyncing");
                    ticker.reset_immediately();
                }
                Err(RecvError::Closed) => break,
            },
            // The first tick fires at once: the initial sync.
            _ = ticker.tick() => resync_once(&controller, &(feed.held)()).await,
        }
    }
    let release_all = async {
        if let Ok(observed) = controller.observe().await {
            for o in observed.into_iter().filter(|o| o.ours) {
                let _ = controller.delete(&o.server, o.resource_version.as_deref()).await;
            }
        }
    };
    if tokio::time::timeout(RELEASE_ON_STOP, release_all).await.is_err() {
        tracing::warn!(
            "could not hand every service back before stopping; the pod's deletion will collect them"
        );
    }
}

/// One resync: list, plan, act. Failures are logged and left to the next resync.
pub async fn resync_once(controller: &Controller, held: &BTreeSet<String>) {
    let observed = match controller.observe().await {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!(error = %e, kind = e.kind(), "resync: cannot list services; next resync retries");
            return;
        }
    };
    for action in plan(held, &observed) {
        let result = match &action {
            Action::Apply {
                server,
                resource_version,
            } => controller.apply(server, resource_version.as_deref()).await,
            Action::Yield { server } => {
                tracing::debug!(server, "resync: another pod holds the service");
                Ok(())
            }
            Action::Delete {
                server,
                resource_version,
            } => {
                tracing::info!(
                    server,
                    "resync: deleting a service of this pod whose server has no forward here"
                );
                controller.delete(server, resource_version.as_deref()).await
            }
        };
        if let Err(e) = result {
            tracing::warn!(action = ?action, error = %e, kind = e.kind(), "resync action failed; next resync retries");
        }
    }
}
