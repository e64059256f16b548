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

/// The routing protocol number cmxsafe marks its routes with (`ip route ... proto 203`): a
/// route with it was added by a cmxsafe process, so one that restarts after a crash knows the
/// route it finds is its own to remove. (Numbers above 200 are free for local use; 203 is
/// arbitrary.)
pub const ROUTE_PROTOCOL: u8 = 203;

/// Who added the local route for a prefix, as far as the routing table says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Existing {
    None,
    /// Marked with `ROUTE_PROTOCOL`: a cmxsafe process added it.
    Ours,
    /// Added by someone else (an operator, another tool): left alone.
    Foreign,
}

/// What `ip -6 route show table local exact <prefix>` says about the route.
fn parse_existing(out: &str) -> Existing {
    let Some(line) = out.lines().find(|l| l.starts_with("local ")) else {
        return Existing::None;
    };
    let mut words = line.split_whitespace();
    let ours = std::iter::from_fn(|| words.next())
        .collect::<Vec<_>>()
        .windows(2)
        .any(|w| w[0] == "proto" && w[1] == ROUTE_PROTOCOL.to_string());
    if ours { Existing::Ours } else { Existing::Foreign }
}

/// Whether `local <prefix>` is already in the local routing table, and whose it is.
pub fn existing_local_route(prefix: Ipv6Net) -> Result<Existing, NetSetupError> {
    let p = prefix.to_string();
    let out = ip(prefix, &["-6", "route", "show", "table", "local", "exact", &p])?;
    Ok(parse_existing(&out))
}

/// Whether `local <prefix>` is already in the local routing table.
pub fn local_route_exists(prefix: Ipv6Net) -> Result<bool, NetSetupError> {
    Ok(existing_local_route(prefix)? != Existing::None)
}

/// The local route for the identity prefix: a guard that removes it when dropped, if this
/// process added it.
#[derive(Debug)]
pub struct LocalRoute {
    prefix: Ipv6Net,
    added: bool,
}

impl LocalRoute {
    /// Makes `prefix` local. A route already there is kept: if it carries cmxsafe's protocol
    /// mark (a gateway or agent that was killed left it), it is adopted and removed at exit like
    /// one added now; otherwise it is someone else's and left as found.
    pub fn ensure(prefix: Ipv6Net) -> Result<LocalRoute, NetSetupError> {
        match existing_local_route(prefix)? {
            Existing::Ours => {
                tracing::info!(%prefix, "identity prefix already local, by a route an earlier cmxsafe process left (proto {ROUTE_PROTOCOL}): adopted, removed at exit");
                return Ok(LocalRoute { prefix, added: true });
            }
            Existing::Foreign => {
                tracing::info!(%prefix, "identity prefix already local (a route someone else added: left as found)");
                return Ok(LocalRoute { prefix, added: false });
            }
            Existing::None => {}
        }
        if !has_capability(CAP_NET_ADMIN) {
            return Err(NetSetupError::MissingCapability { prefix });
        }
        let p = prefix.to_string();
        let proto = ROUTE_PROTOCOL.to_string();
        ip(
            prefix,
            &["-6", "route", "add", "local", &p, "dev", "lo", "proto", &proto],
        )?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_route_s_owner_is_read_from_its_protocol() {
        assert_eq!(parse_existing(""), Existing::None);
        assert_eq!(
            parse_existing("local fd63:6d78::/64 dev lo proto 203 metric 1024 pref medium\n"),
            Existing::Ours
        );
        assert_eq!(
            parse_existing("local fd63:6d78::/64 dev lo proto boot metric 1024 pref medium\n"),
            Existing::Foreign
        );
        assert_eq!(
            parse_existing("local fd63:6d78::/64 dev lo metric 1024 proto 2030 pref medium\n"),
            Existing::Foreign
        );
    }
}
