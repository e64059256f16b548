//! Hot reload of the identity registry: the file is re-read when its content changes (polled, so
//! Kubernetes' atomic ConfigMap symlink swaps are seen like any edit) or on SIGHUP, and parsed
//! once it has stayed the same for `SETTLE` (a file caught half-written is not). An invalid file
//! is reported and ignored: the previous registry stays in force. So is a valid one that looks
//! like an accident (empty, or removing more than `reload_max_removed_percent` of the identities):
//! SIGUSR1 applies it anyway. An accepted one replaces the registry at once; then sessions whose
//! credential no longer holds are disconnected, and forwards no longer permitted are closed.
//! Changed rights apply to every new channel.

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

/// How long the registry file must stay the same before it is parsed. A file caught while it
/// is written in place (`cp`, `cat >`, an editor saving without a rename) can parse as a
/// registry that lacks the identities not yet written, and they would be disconnected; the
/// shrink guard only catches a large loss.
pub const SETTLE: Duration = Duration::from_secs(1);
/// Reads before a file that keeps changing is taken as it is.
const SETTLE_READS: u32 = 10;

fn content_hash(read: &std::io::Result<Vec<u8>>) -> Option<u64> {
    let bytes = read.as_ref().ok()?;
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    Some(h.finish())
}

/// Reads `path` again, `SETTLE` after `read`, until two reads agree; None if the gateway shuts
/// down meanwhile.
async fn settled(
    path: &Path,
    mut read: std::io::Result<Vec<u8>>,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Option<std::io::Result<Vec<u8>>> {
    for _ in 0..SETTLE_READS {
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(SETTLE) => {}
        }
        let again = std::fs::read(path);
        let same = match (&read, &again) {
            (Ok(a), Ok(b)) => a == b,
            (Err(a), Err(b)) => a.kind() == b.kind(),
            _ => false,
        };
        if same {
            return Some(again);
        }
        tracing::info!(path = %path.display(), settle_ms = SETTLE.as_millis() as u64,
            "the identity registry file changed while it was read; waiting until it stays the same");
        read = again;
    }
    tracing::warn!(path = %path.display(), reads = SETTLE_READS,
        "the identity registry file kept changing; reading it as it is now");
    Some(read)
}

pub fn registry_context(gw_config: &crate::config::Config) -> RegistryContext {
    RegistryContext {
        prefix: gw_config.identity_prefix,
        service_prefix: gw_config.service_name_prefix.clone(),
    }
}

/// The `trigger` of a reload the admin API asked for.
pub const API_TRIGGER: &str = "admin API";

/// What made the gateway read the registry file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Trigger {
    Changed,
    Hup,
    /// SIGUSR1: a reload that accepts a large shrink, once.
    Usr1,
    /// `POST /api/v1/registry/reload` on the admin API.
    Api,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Trigger::Changed => "file changed",
            Trigger::Hup => "SIGHUP",
            Trigger::Usr1 => "SIGUSR1",
            Trigger::Api => API_TRIGGER,
        }
    }
}

fn signal_or_warn(kind: SignalKind, name: &str) -> Option<tokio::signal::unix::Signal> {
    signal(kind)
        .map_err(|e| tracing::warn!(error = %e, signal = name, "cannot install a signal handler; reloads happen on file changes"))
        .ok()
}

async fn next_signal(s: &mut Option<tokio::signal::unix::Signal>) {
    match s.as_mut() {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

/// Watches the registry file until shutdown.
pub async fn watch(gw: Arc<Gateway>) {
    let path = gw.config.identities.clone();
    let interval = Duration::from_secs(gw.config.reload_interval_secs);
    let mut last = content_hash(&std::fs::read(&path));
    let mut hup = signal_or_warn(SignalKind::hangup(), "SIGHUP");
    let mut usr1 = signal_or_warn(SignalKind::user_defined1(), "SIGUSR1");
    loop {
        let trigger = tokio::select! {
            _ = gw.shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => Trigger::Changed,
            _ = next_signal(&mut hup) => Trigger::Hup,
            _ = next_signal(&mut usr1) => Trigger::Usr1,
            _ = gw.reload_requested.notified() => Trigger::Api,
        };
        let read = std::fs::read(&path);
        if trigger == Trigger::Changed && content_hash(&read) == last {
            continue;
        }
        let Some(read) = settled(&path, read, &gw.shutdown).await else {
            return;
        };
        last = content_hash(&read);
        let why = trigger.as_str();
        let loaded = Registry::from_read(read, &path, registry_context(&gw.config))
            .map_err(|e| e.to_string())
            .and_then(|new| {
                if trigger == Trigger::Usr1 {
                    return Ok(new);
                }
                shrink_guard(&gw.registry(), &new, gw.config.reload_max_removed_percent).map(|()| new)
            });
        match loaded {
            Ok(registry) => apply(&gw, registry, why).await,
            Err(e) => {
                tracing::error!(path = %path.display(), trigger = why,
                    "identity registry reload refused; the previous registry stays in force:\n{e}");
                gw.events.emit(GatewayEvent::RegistryRejected {
                    trigger: why.to_string(),
                    error: e,
                });
            }
        }
    }
}

/// Refuses a new registry that looks like an accident: empty where the one in force is not, or
/// without more than `max_removed_percent` of the identities in force.
fn shrink_guard(old: &Registry, new: &Registry, max_removed_percent: u8) -> Result<(), String> {
    if old.is_empty() {
        return Ok(());
    }
    let removed: Vec<&str> = old
        .iter()
        .map(|i| i.name.as_str())
        .filter(|n| new.get(n).is_none())
        .collect();
    let escape = "send SIGUSR1 to apply it anyway, or restart the gateway";
    if new.is_empty() {
        return Err(format!(
            "the new registry has no identities and would disconnect all {} identities in force (an empty or truncated file?); {escape}",
            old.len()
        ));
    }
    let percent = removed.len() * 100 / old.len();
    if percent > usize::from(max_removed_percent) {
        let named: Vec<&str> = removed.iter().take(5).copied().collect();
        return Err(format!(
            "the new registry removes {} of {} identities ({percent} %, more than reload_max_removed_percent = {max_removed_percent}: {}{}); a half-written file?; {escape}",
            removed.len(),
            old.len(),
            named.join(", "),
            if removed.len() > named.len() { ", ..." } else { "" }
        ));
    }
    Ok(())
}

/// Swaps the registry in and brings live sessions and forwards in line with it.
/// Logs what the registry allows that is probably not meant (see `Registry::warnings`).
pub fn log_warnings(registry: &Registry, path: &std::path::Path) {
    for warning in registry.warnings() {
        tracing::warn!(path = %path.display(), "identity registry: {warning}");
    }
}

pub async fn apply(gw: &Arc<Gateway>, registry: Registry, why: &str) {
    log_warnings(&registry, &gw.config.identities);
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
    // The gateway's own addresses may have changed since: the egress list follows.
    crate::sync_egress(gw);
    // Emitted once live sessions and forwards were brought in line with the new registry.
    gw.events.emit(GatewayEvent::RegistryReloaded {
        trigger: why.to_string(),
        identities: new.len(),
        previous: old.len(),
    });
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn registry(names: &[&str]) -> Registry {
        let mut text = String::from(
            "cert_authorities = [\"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAOWeqz0RhxzjiASSGbF+lvtms00N1lGxLHlEZ2HCy5o ca\"]\n",
        );
        for (i, n) in names.iter().enumerate() {
            text.push_str(&format!(
                "[[identity]]\nname = \"{n}\"\nrole = \"device\"\naddress = \"fd63:6d78::{}\"\n",
                i + 1
            ));
        }
        let ctx = RegistryContext {
            prefix: "fd63:6d78::/64".parse().unwrap(),
            service_prefix: "dynamic-service-".into(),
        };
        Registry::parse(&text, Path::new("t.toml"), ctx).unwrap()
    }

    #[test]
    fn an_empty_or_much_smaller_registry_is_refused() {
        let four = registry(&["a", "b", "c", "d"]);
        let err = shrink_guard(&four, &registry(&[]), 50).unwrap_err();
        assert!(
            err.starts_with("the new registry has no identities and would disconnect all 4"),
            "{err}"
        );
        let err = shrink_guard(&four, &registry(&["a"]), 50).unwrap_err();
        assert!(
            err.starts_with("the new registry removes 3 of 4 identities (75 %"),
            "{err}"
        );
        assert!(err.contains(": b, c, d)"), "{err}");
        // Up to the limit is fine; so are additions and any change of an empty registry.
        assert!(shrink_guard(&four, &registry(&["a", "b"]), 50).is_ok());
        assert!(shrink_guard(&four, &registry(&["a", "b", "c", "d", "e"]), 50).is_ok());
        assert!(shrink_guard(&registry(&[]), &registry(&[]), 50).is_ok());
        assert!(shrink_guard(&four, &registry(&["a"]), 100).is_ok());
    }
}
