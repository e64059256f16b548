//! The Kubernetes controller: for each server whose reverse forward this gateway pod holds, a
//! Service `dynamic-service-<server>` and an EndpointSlice pointing at this pod, so devices find
//! the replica that holds their server (see `objects` for the shape and why).
//!
//! - A forward that appears here claims the Service (server-side apply, forced, field manager
//!   `cmxsafe`): the server (re)connected to this replica, so this replica is where it lives now.
//!   Every replica applies with the same field manager, so a claim *replaces* the previous
//!   owner's ownerReference and endpoint instead of adding to them.
//! - The periodic resync lists the Services and plans (see [`plan`]): create what is missing,
//!   re-apply what this pod owns (drift repair, guarded by `resourceVersion` so it never undoes
//!   a concurrent takeover), yield what another pod took over, delete what this pod owns but no
//!   longer serves (orphans, e.g. after a missed event or a restart).
//! - The last forward of a server ending here deletes its Service, only if this pod still owns
//!   it (guarded by `resourceVersion`); the EndpointSlice is owned by the Service and goes with it.
//! - API errors are retried with backoff and never stop the gateway: forwarding does not depend
//!   on the API server, and the next resync repairs whatever a failure left behind.

pub mod objects;
pub mod pod;
pub mod run;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, Preconditions,
};

pub use objects::Settings;
pub use run::{Feed, run, start};

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("Kubernetes API error on {what}: {cause}")]
    Api { what: String, cause: Box<kube::Error> },
    #[error("cannot reach the Kubernetes API: {0}")]
    Client(String),
    #[error("the API server returned {what} without {field}")]
    Incomplete { what: String, field: &'static str },
}

impl ControllerError {
    /// A short kind for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            ControllerError::Api { cause, .. } => match cause.as_ref() {
                kube::Error::Api(s) if s.code == 409 => "conflict",
                kube::Error::Api(s) if s.code == 404 => "not-found",
                kube::Error::Api(s) if s.code >= 500 => "server",
                kube::Error::Api(_) => "rejected",
                _ => "transport",
            },
            ControllerError::Client(_) => "client",
            ControllerError::Incomplete { .. } => "incomplete",
        }
    }
}

fn api_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> ControllerError {
    let what = what.into();
    move |cause| ControllerError::Api {
        what,
        cause: Box::new(cause),
    }
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(status) if status.code == 404)
}

/// The EndpointSlice API: `discovery.k8s.io/v1`, or `v1beta1` before Kubernetes 1.21.
pub fn slice_resource(version: &str) -> ApiResource {
    ApiResource {
        group: "discovery.k8s.io".into(),
        version: version.into(),
        api_version: format!("discovery.k8s.io/{version}"),
        kind: "EndpointSlice".into(),
        plural: "endpointslices".into(),
    }
}

/// A managed Service as the last list showed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observed {
    pub server: String,
    /// Its ownerReferences name this pod.
    pub ours: bool,
    pub resource_version: Option<String>,
}

/// What a resync does for one server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Apply the objects; with `Some(rv)` only if the Service is still at that version.
    Apply {
        server: String,
        resource_version: Option<String>,
    },
    /// Another pod took the Service over: leave it alone.
    Yield { server: String },
    /// Ours, but no forward here any more: delete it if still at that version.
    Delete {
        server: String,
        resource_version: Option<String>,
    },
}

/// The resync plan: `held` are the servers with a forward on this pod, `observed` the managed
/// Services in the namespace. Pure, so every branch is unit-tested.
pub fn plan(held: &BTreeSet<String>, observed: &[Observed]) -> Vec<Action> {
    let by_server: BTreeMap<&str, &Observed> = observed.iter().map(|o| (o.server.as_str(), o)).collect();
    let mut actions = Vec::new();
    for server in held {
        actions.push(match by_server.get(server.as_str()) {
            None => Action::Apply {
                server: server.clone(),
                resource_version: None,
            },
            Some(o) if o.ours => Action::Apply {
                server: server.clone(),
                resource_version: o.resource_version.clone(),
            },
            Some(_) => Action::Yield {
                server: server.clone(),
            },
        });
    }
    for o in observed {
        if o.ours && !held.contains(&o.server) {
            actions.push(Action::Delete {
                server: o.server.clone(),
                resource_version: o.resource_version.clone(),
            });
        }
    }
    actions
}

pub struct Controller {
    pub settings: Settings,
    services: Api<Service>,
    slices: Api<DynamicObject>,
    slice_api_version: String,
}

impl Controller {
    /// `slice_version`: "v1" or "v1beta1" (see [`run::slice_version`]).
    pub fn new(client: Client, settings: Settings, slice_version: &str) -> Controller {
        let resource = slice_resource(slice_version);
        Controller {
            services: Api::namespaced(client.clone(), &settings.namespace),
            slices: Api::namespaced_with(client, &settings.namespace, &resource),
            slice_api_version: resource.api_version,
            settings,
        }
    }

    fn owned_by_us(&self, meta: &ObjectMeta) -> bool {
        meta.owner_references
            .iter()
            .flatten()
            .any(|o| o.uid == self.settings.pod_uid)
    }

    /// Applies the Service (optionally only at `resource_version`), then its EndpointSlice,
    /// owned by the Service so that deleting the Service (or the Pod owning it) removes both.
    pub async fn apply(&self, server: &str, resource_version: Option<&str>) -> Result<(), ControllerError> {
        let name = self.settings.service_name(server);
        let pp = PatchParams::apply(objects::FIELD_MANAGER).force();
        let mut service = self.settings.service(server);
        if let Some(rv) = resource_version {
            service["metadata"]["resourceVersion"] = rv.into();
        }
        let applied = self
            .services
            .patch(&name, &pp, &Patch::Apply(&service))
            .await
            .map_err(api_err(format!("apply Service {name}")))?;
        let uid = applied.metadata.uid.ok_or_else(|| ControllerError::Incomplete {
            what: format!("Service {name}"),
            field: "metadata.uid",
        })?;
        let slice = self
            .settings
            .endpoint_slice(server, &self.slice_api_version, &uid);
        self.slices
            .patch(&name, &pp, &Patch::Apply(&slice))
            .await
            .map_err(api_err(format!("apply EndpointSlice {name}")))?;
        Ok(())
    }

    /// A forward of `server` appeared on this pod: point its Service here, whoever had it.
    pub async fn claim(&self, server: &str) -> Result<(), ControllerError> {
        self.apply(server, None).await?;
        tracing::info!(server, service = %self.settings.service_name(server),
            pod = %self.settings.pod_name, "service points at this pod");
        Ok(())
    }

    /// The last forward of `server` here ended: delete its Service if this pod still owns it.
    pub async fn release(&self, server: &str) -> Result<(), ControllerError> {
        let name = self.settings.service_name(server);
        let current = self
            .services
            .get_opt(&name)
            .await
            .map_err(api_err(format!("get Service {name}")))?;
        let Some(svc) = current else {
            return Ok(());
        };
        if !self.owned_by_us(&svc.metadata) {
            tracing::info!(server, service = %name, "service belongs to another pod now: left alone");
            return Ok(());
        }
        self.delete(server, svc.metadata.resource_version.as_deref())
            .await
    }

    /// Deletes the Service of `server` (its EndpointSlice follows by garbage collection), only
    /// if it is still at `resource_version`: a takeover in between makes this a 409.
    pub async fn delete(&self, server: &str, resource_version: Option<&str>) -> Result<(), ControllerError> {
        let name = self.settings.service_name(server);
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                resource_version: resource_version.map(str::to_string),
                uid: None,
            }),
            ..DeleteParams::background()
        };
        match self.services.delete(&name, &dp).await {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(api_err(format!("delete Service {name}"))(e)),
        }
        tracing::info!(server, service = %name, "service deleted: no forward of this server here");
        Ok(())
    }

    /// The managed Services of the namespace (one list call).
    pub async fn observe(&self) -> Result<Vec<Observed>, ControllerError> {
        let lp = ListParams::default().labels(&objects::managed_selector());
        let list = self.services.list(&lp).await.map_err(api_err("list Services"))?;
        Ok(list
            .items
            .into_iter()
            .filter_map(|s| {
                let ours = self.owned_by_us(&s.metadata);
                let server = s.metadata.labels.as_ref()?.get(objects::SERVER_LABEL)?.clone();
                Some(Observed {
                    server,
                    ours,
                    resource_version: s.metadata.resource_version,
                })
            })
            .collect())
    }
}

/// Retries `op` with exponential backoff (0.2 s doubling to 5 s), `attempts` times, logging each
/// failure with its kind.
pub async fn retry<T, F, Fut>(what: &str, attempts: usize, mut op: F) -> Result<T, ControllerError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ControllerError>>,
{
    let mut delay = Duration::from_millis(200);
    let mut attempt = 1;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if attempt >= attempts => {
                tracing::error!(what, attempt, error = %e, kind = e.kind(),
                    "Kubernetes call failed; giving up until the next resync");
                return Err(e);
            }
            Err(e) => {
                tracing::warn!(what, attempt, error = %e, kind = e.kind(), "Kubernetes call failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
                attempt += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    fn seen(server: &str, ours: bool, rv: &str) -> Observed {
        Observed {
            server: server.into(),
            ours,
            resource_version: Some(rv.into()),
        }
    }

    #[test]
    fn plan_creates_repairs_yields_and_deletes() {
        let observed = [
            seen("ours-held", true, "10"),
            seen("theirs-held", false, "11"),
            seen("ours-gone", true, "12"),
            seen("theirs-gone", false, "13"),
        ];
        let actions = plan(&held(&["missing", "ours-held", "theirs-held"]), &observed);
        assert_eq!(
            actions,
            vec![
                Action::Apply {
                    server: "missing".into(),
                    resource_version: None
                },
                Action::Apply {
                    server: "ours-held".into(),
                    resource_version: Some("10".into())
                },
                Action::Yield {
                    server: "theirs-held".into()
                },
                Action::Delete {
                    server: "ours-gone".into(),
                    resource_version: Some("12".into())
                },
            ]
        );
    }

    #[test]
    fn plan_with_nothing_held_deletes_only_our_services() {
        let observed = [seen("a", true, "1"), seen("b", false, "2")];
        assert_eq!(
            plan(&BTreeSet::new(), &observed),
            vec![Action::Delete {
                server: "a".into(),
                resource_version: Some("1".into())
            }]
        );
        assert!(plan(&BTreeSet::new(), &[]).is_empty());
    }
}
