//! The process's file descriptor limit. Every session is a socket, every forwarding pair two,
//! every published forward a listener: what `[limits]` allow at once by default needs about
//! 117,000 descriptors. A service manager's soft limit is often 1024 (systemd's default), and
//! Rust, unlike Go, does not raise it: one identity within its own limits (2 ×
//! `max_pairs_per_identity` sockets) could then use up the process's descriptors, and every
//! `accept` would fail with EMFILE: no one else could log in. At start the gateway raises its
//! limit to what `[limits]` need (the hard limit too, when it may: root or CAP_SYS_RESOURCE, up
//! to `fs.nr_open`), else as far as the hard limit allows, and says what it got.

use crate::config::Config;

/// Descriptors that are not sessions, pairs or forwards: the log, epoll and timers, eBPF maps
/// and programs, the registry and host key being read, DNS lookups.
const RESERVE: u64 = 256;

/// Descriptors the gateway may hold at once within `config`'s limits, and how that adds up.
pub fn needed(config: &Config) -> (u64, String) {
    let l = &config.limits;
    let parts = [
        ("max_sessions", l.max_sessions as u64, 1),
        ("max_pairs", l.max_pairs as u64, 2),
        ("max_forwards", l.max_forwards as u64, 1),
        ("max_startups", l.max_startups.full as u64, 1),
        ("known_source_startups", l.known_source_startups as u64, 1),
        ("admin.max_connections", config.admin.max_connections as u64, 1),
    ];
    let total = parts.iter().fold(RESERVE, |sum, (_, n, each)| {
        sum.saturating_add(n.saturating_mul(*each))
    });
    let sum: Vec<String> = parts
        .iter()
        .map(|(name, n, each)| match each {
            1 => format!("{name} {n}"),
            _ => format!("{each} × {name} {n}"),
        })
        .collect();
    (
        total,
        format!("{} + {RESERVE} for the gateway itself", sum.join(" + ")),
    )
}

/// What `raise` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Raised {
    /// The limit was already enough.
    Enough { limit: u64 },
    /// Raised from `from` to `to`, which is enough.
    To { from: u64, to: u64 },
    /// As far as it could go (`to`, from `from`), which is less than needed.
    Short { from: u64, to: u64 },
}

/// Raises the soft limit (and the hard limit, where allowed) to `needed`.
pub fn raise(needed: u64) -> std::io::Result<Raised> {
    let (soft, hard) = get()?;
    if soft >= needed {
        return Ok(Raised::Enough { limit: soft });
    }
    // `fs.nr_open` caps both limits; the hard limit goes up first, where we may.
    let want = needed.min(nr_open().unwrap_or(u64::MAX));
    let to = match want > hard && set(want, want).is_ok() {
        true => want,
        false => {
            set(want.min(hard), hard)?;
            want.min(hard)
        }
    };
    Ok(match to >= needed {
        true => Raised::To { from: soft, to },
        false => Raised::Short { from: soft, to },
    })
}

fn get() -> std::io::Result<(u64, u64)> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we pass and nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((r.rlim_cur, r.rlim_max))
}

fn set(soft: u64, hard: u64) -> std::io::Result<()> {
    let r = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads the struct we pass; it changes only this process's limit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The kernel's ceiling for any process's descriptor limit.
fn nr_open() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Raises the limit for `config` and logs what it got.
pub fn raise_for(config: &Config) {
    let (needed, sum) = needed(config);
    match raise(needed) {
        Ok(Raised::Enough { limit }) => {
            tracing::debug!(limit, needed, "file descriptor limit is enough for [limits]");
        }
        Ok(Raised::To { from, to }) => {
            tracing::info!(
                from,
                to,
                needed,
                "file descriptor limit raised from {from} to {to}: what [limits] allow ({sum})"
            );
        }
        Ok(Raised::Short { from, to }) => {
            tracing::warn!(
                from,
                to,
                needed,
                "file descriptor limit is {to} (raised from {from}), below the {needed} that [limits] allow ({sum}): \
                 past it new connections fail; raise the hard limit (systemd LimitNOFILE=, docker --ulimit nofile=) or lower the limits"
            );
        }
        Err(e) => {
            tracing::warn!(error = %e, needed, "cannot read or raise the file descriptor limit; [limits] allow {needed} ({sum})");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_need_adds_up_every_limit_with_its_sockets() {
        let config = Config::default();
        let (n, sum) = needed(&config);
        let l = &config.limits;
        assert_eq!(
            n,
            (l.max_sessions
                + 2 * l.max_pairs
                + l.max_forwards
                + l.max_startups.full
                + l.known_source_startups
                + config.admin.max_connections) as u64
                + RESERVE
        );
        assert!(sum.contains("2 × max_pairs 49152"), "{sum}");
    }
}
