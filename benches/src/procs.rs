//! What the processes of a network namespace (the gateway host: cmx-gateway, or sshd and its
//! per-session children) cost: CPU time, sleeps (voluntary context switches) and memory (RSS and
//! PSS; RSS counts shared pages once per process, PSS shares them out).

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

fn netns_inode(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.ino())
}

/// Pids whose network namespace is `/run/netns/<name>`.
pub fn pids_in(netns: &str) -> Vec<u32> {
    let Some(want) = netns_inode(Path::new(&format!("/run/netns/{netns}"))) else {
        return vec![];
    };
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| netns_inode(Path::new(&format!("/proc/{pid}/ns/net"))) == Some(want))
        .collect()
}

/// User + system CPU seconds used so far by the processes in `netns`.
pub fn cpu_seconds(netns: &str) -> f64 {
    let (user, system) = cpu_split(netns);
    user + system
}

/// (user, system) CPU seconds used so far by the processes in `netns`: the gateway's own code
/// and the kernel's work on its behalf (its sockets, the TCP stack, its wake-ups of others).
pub fn cpu_split(netns: &str) -> (f64, f64) {
    // SAFETY: sysconf has no preconditions.
    let ticks_per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    pids_in(netns)
        .iter()
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // Fields after the command (which may contain spaces) in parentheses.
            let rest = &stat[stat.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = f.get(11)?.parse().ok()?;
            let stime: f64 = f.get(12)?.parse().ok()?;
            Some((utime / ticks_per_sec, stime / ticks_per_sec))
        })
        .fold((0.0, 0.0), |(u, s), (pu, ps)| (u + pu, s + ps))
}

/// Voluntary context switches so far of every thread of the processes in `netns`, by thread
/// id. A thread switches out voluntarily when it waits (epoll, a futex, a blocking read), so each
/// one is a sleep that a wake-up later ends. Unlike CPU time this is a count, which a noisy
/// machine barely moves.
pub fn sleeps(netns: &str) -> BTreeMap<u32, u64> {
    pids_in(netns)
        .iter()
        .filter_map(|pid| std::fs::read_dir(format!("/proc/{pid}/task")).ok())
        .flat_map(|tasks| tasks.flatten())
        .filter_map(|task| {
            let tid = task.file_name().to_str()?.parse().ok()?;
            let status = std::fs::read_to_string(task.path().join("status")).ok()?;
            Some((tid, status_field(&status, "voluntary_ctxt_switches:")?))
        })
        .collect()
}

/// The sleeps of `netns`'s threads since `before` (taken with [`sleeps`]): a thread started
/// since counts from zero; one that exited since is not counted at all, so this can only err low.
pub fn sleeps_since(netns: &str, before: &BTreeMap<u32, u64>) -> u64 {
    sleeps_between(before, &sleeps(netns))
}

fn sleeps_between(before: &BTreeMap<u32, u64>, after: &BTreeMap<u32, u64>) -> u64 {
    after
        .iter()
        .map(|(tid, n)| n.saturating_sub(before.get(tid).copied().unwrap_or(0)))
        .sum()
}

/// The whole machine's CPU seconds so far, every CPU together: (busy, all), from the first line
/// of `/proc/stat` (idle and iowait are not busy; steal is: the hypervisor took that time).
pub fn machine_cpu_seconds() -> (f64, f64) {
    // SAFETY: sysconf has no preconditions.
    let ticks_per_sec = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .map(|l| l.split_whitespace().filter_map(|f| f.parse().ok()).collect())
        .unwrap_or_default();
    // user nice system idle iowait irq softirq steal (guest time is inside user already).
    let all: f64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3).copied().unwrap_or(0.0) + ticks.get(4).copied().unwrap_or(0.0);
    ((all - idle) / ticks_per_sec, all / ticks_per_sec)
}

/// The number after `key` on its line of a /proc status file.
fn status_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// (RSS, PSS) in KiB, summed over the processes in `netns`.
pub fn memory_kib(netns: &str) -> (u64, u64) {
    pids_in(netns).iter().fold((0, 0), |(rss, pss), pid| {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
        (
            rss + status_field(&status, "VmRSS:").unwrap_or(0),
            pss + status_field(&rollup, "Pss:").unwrap_or(0),
        )
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::{sleeps_between, status_field};

    #[test]
    fn sleeps_count_per_thread_so_threads_that_come_and_go_do_not_skew_them() {
        // Thread 1 slept 5 more times, 2 exited (its 1000 are not taken off), 3 is new (7).
        let before = BTreeMap::from([(1, 10), (2, 1000)]);
        let after = BTreeMap::from([(1, 15), (3, 7)]);
        assert_eq!(sleeps_between(&before, &after), 12);
        assert_eq!(sleeps_between(&after, &after), 0);
    }

    #[test]
    fn reads_a_field_of_a_status_file_and_not_its_lookalike() {
        let status = "Name:\tcmx-gateway\nVmRSS:\t   35840 kB\nvoluntary_ctxt_switches:\t1234\nnonvoluntary_ctxt_switches:\t56\n";
        assert_eq!(status_field(status, "VmRSS:"), Some(35840));
        assert_eq!(status_field(status, "voluntary_ctxt_switches:"), Some(1234));
        assert_eq!(status_field(status, "nonvoluntary_ctxt_switches:"), Some(56));
        assert_eq!(status_field(status, "Pss:"), None);
    }
}
