//! What the processes of a network namespace (the gateway host: cmx-gateway, or sshd and its
//! per-session children) cost: CPU time and memory (RSS and PSS; RSS counts shared pages once per
//! process, PSS shares them out).

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
            Some((utime + stime) / ticks_per_sec)
        })
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

fn kb_field(text: &str, key: &str) -> Option<u64> {
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
            rss + kb_field(&status, "VmRSS:").unwrap_or(0),
            pss + kb_field(&rollup, "Pss:").unwrap_or(0),
        )
    })
}
