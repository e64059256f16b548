//! Hot reload of the identity registry: the file is re-read when its content changes (polled, so
//! Kubernetes' atomic ConfigMap symlink swaps are seen like any edit) or on SIGHUP. An invalid file
//! is reported and ignored: the previous registry stays in force. A valid one replaces it at once;
//! then sessions whose credential no longer holds are disconnected, and forwards no longer
//! permitted are closed. Changed rights apply to every new channel.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};

use crate::events::GatewayEvent;
use crate::gateway::Gateway;
use crate::identity::{Registry, RegistryContext};
use crate::sessions::disconnect;
use crate::{audit, auth};

fn content_hash(path: &Path) -> Option<u64> {
    let bytes = std::fs::read(path).ok()?;
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    Some(h.finish())
}

pub fn registry_context(gw_config: &crate::config::Config) -> RegistryContext {
    RegistryContext {
        prefix: gw_config.identity_prefix,
        service_prefix: gw_config.service_name_prefix.clone(),
    }
}

/// Watches the registry file until shutdown.
pub async fn watch(gw: Arc<Gateway>) {
    let path = gw.config.identities.clone();
    let interval = Duration::from_secs(gw.config.reload_interval_secs);
    let mut last = content_hash(&path);
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot install the SIGHUP handler; reloads happen on file changes only");
            None
        }
    };
    loop {
        let forced = tokio::select! {
            _ = gw.shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => false,
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
        };
        let now = content_hash(&path);
        if !forced && now == last {
            continue;
        }
        last = now;
        let why = if forced { "SIGHUP" } else { "file changed" };
        match Registry::load(&path, registry_context(&gw.config)) {
            Ok(registry) => apply(&gw, registry, why).await,
            Err(e) => {
                tracing::error!(path = %path.display(), trigger = why,
                    "identity registry reload failed; the previous registry stays in force:\n{e}");
                gw.events.emit(GatewayEvent::RegistryRejected {
                    trigger: why.to_string(),
                    error: e.to_string(),
                });
            }
        }
    }
}

/// Swaps the registry in and brings live sessions and forwards in line with it.
pub async fn apply(gw: &Arc<Gateway>, registry: Registry, why: &str) {
    let old = gw.replace_registry(registry);
    let new = gw.registry();
    tracing::info!(
        trigger = why,
        identities = new.len(),
        previous = old.len(),
        "identity registry reloaded"
    );

    for (id, entry) in gw.sessions.snapshot() {
        let verdict = auth::still_valid(&new, &entry.identity, &entry.credential).and_then(|()| {
            let before = old.get(&entry.identity).map(|i| i.address);
            let after = new.get(&entry.identity).map(|i| i.address);
            if before != after {
                Err(format!("the identity address of '{}' changed", entry.identity))
            } else {
                Ok(())
            }
        });
        if let Err(reason) = verdict {
            // The session's end is audited once, with this reason, when its task cleans up.
            gw.sessions.closing(id, &reason);
            let handle = entry.handle.clone();
            tokio::spawn(async move { disconnect(&handle, &reason).await });
        }
    }

    for ((addr, port), identity, session) in gw.mirrors.list() {
        if let Err(reason) = gw.authz.may_keep_listening(&new, &identity, addr, port)
            && gw.mirrors.remove(&(addr, port)).is_some()
        {
            audit::forward_removed(
                session,
                &identity,
                &format!("tcpip-forward [{addr}]:{port}"),
                &format!("no longer permitted: {reason}"),
            );
            gw.events.emit(GatewayEvent::ForwardRemoved {
                session,
                identity,
                addr,
                port,
            });
        }
    }
    // Emitted once live sessions and forwards were brought in line with the new registry.
    gw.events.emit(GatewayEvent::RegistryReloaded {
        trigger: why.to_string(),
        identities: new.len(),
        previous: old.len(),
    });
}
