//! Makes an identity prefix local to this host: `ip -6 route add local <prefix> dev lo`, so the
//! gateway (or an agent with `preserve_source`) can bind any identity address (with
//! `IP_FREEBIND`) and connect between them. The route is removed at exit only if this process
//! added it.

use std::process::Command;

use ipnet::Ipv6Net;

const CAP_NET_ADMIN: u32 = 12;

#[derive(Debug, thiserror::Error)]
pub enum NetSetupError {
    #[error(
        "making the identity prefix {prefix} local needs CAP_NET_ADMIN, which this process lacks. Run as root or with CAP_NET_ADMIN, or add the route yourself (ip -6 route add local {prefix} dev lo) and set manage_local_route = false"
    )]
    MissingCapability { prefix: Ipv6Net },
    #[error(
        "cannot run 'ip' (iproute2) to manage the local route for {prefix}: {source}. Install iproute2, or add the route yourself (ip -6 route add local {prefix} dev lo) and set manage_local_route = false"
    )]
    NoIpTool {
        prefix: Ipv6Net,
        #[source]
        source: std::io::Error,
    },
    #[error("'ip {args}' failed: {stderr}")]
    Command { args: String, stderr: String },
}

/// Whether the effective capability set holds `cap` (from /proc/self/status).
pub fn has_capability(cap: u32) -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|mask| mask & (1u64 << cap) != 0)
}

fn ip(prefix: Ipv6Net, args: &[&str]) -> Result<String, NetSetupError> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| NetSetupError::NoIpTool { prefix, source })?;
    if !out.status.success() {
        return Err(NetSetupError::Command {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether `local <prefix>` is already in the local routing table.
pub fn local_route_exists(prefix: Ipv6Net) -> Result<bool, NetSetupError> {
    let p = prefix.to_string();
    let out = ip(prefix, &["-6", "route", "show", "table", "local", "exact", &p])?;
    Ok(out.lines().any(|l| l.starts_with("local ")))
}

/// The local route for the identity prefix: a guard that removes it when dropped, if this
/// process added it.
#[derive(Debug)]
pub struct LocalRoute {
    prefix: Ipv6Net,
    added: bool,
}

impl LocalRoute {
    pub fn ensure(prefix: Ipv6Net) -> Result<LocalRoute, NetSetupError> {
        if local_route_exists(prefix)? {
            tracing::info!(%prefix, "identity prefix already local (route present, left as found)");
            return Ok(LocalRoute { prefix, added: false });
        }
        if !has_capability(CAP_NET_ADMIN) {
            return Err(NetSetupError::MissingCapability { prefix });
        }
        let p = prefix.to_string();
        ip(prefix, &["-6", "route", "add", "local", &p, "dev", "lo"])?;
        tracing::info!(%prefix, "identity prefix made local: ip -6 route add local {prefix} dev lo");
        Ok(LocalRoute { prefix, added: true })
    }

    pub fn added(&self) -> bool {
        self.added
    }

    /// Removes the route now if this process added it (dropping the guard does the same).
    pub fn remove(self) {
        drop(self);
    }
}

impl Drop for LocalRoute {
    /// The route goes with its owner, on every exit path (errors after set-up included).
    fn drop(&mut self) {
        if !self.added {
            return;
        }
        let p = self.prefix.to_string();
        match ip(
            self.prefix,
            &["-6", "route", "del", "local", &p, "dev", "lo", "table", "local"],
        ) {
            Ok(_) => tracing::info!(prefix = %self.prefix, "local route for the identity prefix removed"),
            Err(e) => tracing::warn!(prefix = %self.prefix, error = %e, "could not remove the local route"),
        }
    }
}
