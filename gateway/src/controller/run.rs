//! The controller task: follows the gateway's forwards through its event stream and keeps the
//! Services in step, with a periodic resync. Started in the background: a missing API server
//! delays the controller, never the gateway.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio::sync::broadcast;
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Action, Controller, ControllerError, Settings, plan, retry};
use crate::events::GatewayEvent;
use crate::prune::PruneSchedule;

/// Attempts per event-driven call; what still fails is repaired by the next resync.
const ATTEMPTS: usize = 5;
/// How long a stopping pod spends handing its Services back.
const RELEASE_ON_STOP: Duration = Duration::from_secs(5);
/// How often one server's Service is brought in line at most. A server may request and cancel
/// its forward as fast as its session allows (thousands a second); each change would otherwise be
/// API calls and a Service created or deleted under every kube-proxy and DNS server following it.
pub const PER_SERVER: Duration = Duration::from_secs(1);

/// The servers whose Service must be brought in line with what this pod holds, each when its
/// turn comes: at once the first time, then no sooner than `PER_SERVER` after its last one. Any
/// number of events for a server in between make one turn, which acts on what holds then.
/// Marking, finding the next turn and taking turns cost O(log n) in the servers waiting (a
/// gateway restarting under thousands of servers marks each of them at once).
pub struct Pending {
    /// Servers waiting, by turn.
    queue: BTreeSet<(Instant, String)>,
    waiting: HashSet<String>,
    /// When each server's last turn was taken (forgotten a `PER_SERVER` later).
    last: HashMap<String, Instant>,
    prune: PruneSchedule,
}

impl Default for Pending {
    fn default() -> Pending {
        Pending {
            queue: BTreeSet::new(),
            waiting: HashSet::new(),
            last: HashMap::new(),
            prune: PruneSchedule::new(64),
        }
    }
}

impl Pending {
    /// Something changed for `server`.
    pub fn mark(&mut self, server: &str, now: Instant) {
        if self.waiting.contains(server) {
            return;
        }
        let turn = match self.last.get(server) {
            Some(last) if now.duration_since(*last) < PER_SERVER => *last + PER_SERVER,
            _ => now,
        };
        self.waiting.insert(server.to_string());
        self.queue.insert((turn, server.to_string()));
    }

    /// When the next server's turn comes.
    pub fn next(&self) -> Option<Instant> {
        self.queue.first().map(|(turn, _)| *turn)
    }

    /// The servers whose turn has come, by turn; their turn is recorded as taken `now`.
    pub fn take(&mut self, now: Instant) -> Vec<String> {
        let mut ready = Vec::new();
        while self.queue.first().is_some_and(|(turn, _)| *turn <= now) {
            let Some((_, server)) = self.queue.pop_first() else {
                break;
            };
            self.waiting.remove(&server);
            self.last.insert(server.clone(), now);
            ready.push(server);
        }
        if self.prune.due(self.last.len()) {
            self.last.retain(|_, last| now.duration_since(*last) < PER_SERVER);
            self.prune.walked(self.last.len());
        }
        ready
    }
}

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

/// The controller loop: follows the forwards (see [`Pending`]), points a server's Service here
/// while it has a forward here and releases it when the last one ends, resyncs every `resync`
/// (and at once after missing events), and on shutdown hands this pod's Services back so that
/// the servers' next replica claims them.
pub async fn run(controller: Controller, mut feed: Feed, resync: Duration) {
    let mut ticker = tokio::time::interval(resync);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pending = Pending::default();
    loop {
        let next = pending.next();
        tokio::select! {
            _ = feed.shutdown.cancelled() => break,
            ev = feed.events.recv() => match ev {
                Ok(GatewayEvent::ForwardAdded { identity, .. })
                | Ok(GatewayEvent::ForwardTakenOver { identity, .. })
                | Ok(GatewayEvent::ForwardRemoved { identity, .. }) => {
                    pending.mark(&identity, Instant::now());
                }
                Ok(_) => {}
                Err(RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "controller fell behind the gateway's events; resyncing");
                    ticker.reset_immediately();
                }
                Err(RecvError::Closed) => break,
            },
            _ = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                let held = (feed.held)();
                for server in pending.take(Instant::now()) {
                    if held.contains(&server) {
                        let _ = retry("claim", ATTEMPTS, || controller.claim(&server)).await;
                    } else {
                        let _ = retry("release", ATTEMPTS, || controller.release(&server)).await;
                    }
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_servers_first_change_goes_at_once_and_the_rest_wait_for_its_next_turn() {
        let t0 = Instant::now();
        let mut p = Pending::default();
        assert_eq!(p.next(), None);
        p.mark("srv1", t0);
        assert_eq!(p.next(), Some(t0));
        assert_eq!(p.take(t0), vec!["srv1"]);
        assert_eq!(p.next(), None);

        // Many changes within a second: one turn, a second after the last one.
        let t1 = t0 + Duration::from_millis(10);
        for i in 0..100 {
            p.mark("srv1", t1 + Duration::from_millis(i));
        }
        assert_eq!(p.next(), Some(t0 + PER_SERVER));
        assert!(p.take(t1 + Duration::from_millis(500)).is_empty());
        assert_eq!(p.take(t0 + PER_SERVER), vec!["srv1"]);
        assert_eq!(p.next(), None);

        // Another server is not held back by the first, and a quiet server goes at once again.
        let t2 = t0 + PER_SERVER + Duration::from_millis(1);
        p.mark("srv2", t2);
        assert_eq!(p.take(t2), vec!["srv2"]);
        let t3 = t0 + 3 * PER_SERVER;
        p.mark("srv1", t3);
        assert_eq!(p.next(), Some(t3));
        assert_eq!(p.take(t3), vec!["srv1"]);
    }
}
