//! System calls made by the processes of a network namespace (the gateway host), counted by the
//! kernel: one counter per thread on the `raw_syscalls:sys_enter` tracepoint (`perf_event_open`,
//! as `perf stat -e raw_syscalls:sys_enter -p` does). Like the sleeps, this is a count, which a
//! noisy machine does not move: it shows a change that removes a read or a poll per message
//! where a 5-run timing cannot.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use anyhow::{Context, bail};

use crate::procs;

const TRACEPOINT: &str = "events/raw_syscalls/sys_enter/id";
const TRACEFS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// `struct perf_event_attr` as of PERF_ATTR_SIZE_VER0 (64 bytes): the kernel takes the size it
/// is given and reads the rest as zero. Counting, enabled, with `inherit` as the only flag.
#[repr(C)]
#[derive(Default)]
struct PerfEventAttr {
    kind: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    config1: u64,
}

const PERF_TYPE_TRACEPOINT: u32 = 2;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;
/// `perf_event_attr.inherit`: threads and processes that a counted thread starts later are
/// counted too, and a read sums them (stunnel starts a thread per connection, sshd a process).
const INHERIT: u64 = 1 << 1;

/// Counters on every thread the namespace's processes have when it starts, and on whatever
/// those start. A process that enters the namespace otherwise (none of the gateways under test
/// do) would not be counted.
pub struct SyscallCounter {
    threads: Vec<OwnedFd>,
}

impl SyscallCounter {
    pub fn start(netns: &str) -> anyhow::Result<SyscallCounter> {
        let id = tracepoint_id()?;
        let mut threads = Vec::new();
        for pid in procs::pids_in(netns) {
            let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
                continue; // exited meanwhile
            };
            for tid in tasks
                .flatten()
                .filter_map(|t| t.file_name().to_str()?.parse().ok())
            {
                match open_counter(id, tid) {
                    Ok(fd) => threads.push(fd),
                    // The thread exited between the listing and the open.
                    Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
                    Err(e) => {
                        return Err(e).with_context(|| {
                            format!("perf_event_open(raw_syscalls:sys_enter) on thread {tid} of pid {pid} in {netns}")
                        });
                    }
                }
            }
        }
        if threads.is_empty() {
            bail!("no process runs in network namespace {netns}: nothing to count");
        }
        Ok(SyscallCounter { threads })
    }

    /// System calls entered so far by the counted threads, exited ones included.
    pub fn count(&self) -> anyhow::Result<u64> {
        let mut total = 0u64;
        for fd in &self.threads {
            let mut value = 0u64;
            // SAFETY: reads 8 bytes into a u64 from a perf event fd this counter owns.
            let n = unsafe {
                libc::read(
                    fd.as_raw_fd(),
                    (&raw mut value).cast(),
                    std::mem::size_of::<u64>(),
                )
            };
            if n != std::mem::size_of::<u64>() as isize {
                return Err(std::io::Error::last_os_error()).context("reading a syscall counter");
            }
            total += value;
        }
        Ok(total)
    }
}

fn tracepoint_id() -> anyhow::Result<u64> {
    let Some(path) = TRACEFS
        .iter()
        .map(|root| Path::new(root).join(TRACEPOINT))
        .find(|p| p.exists())
    else {
        bail!(
            "no tracefs with {TRACEPOINT} under {}: mount it (mount -t tracefs nodev /sys/kernel/tracing)",
            TRACEFS.join(" or ")
        );
    };
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.trim()
        .parse()
        .with_context(|| format!("{}: not a tracepoint id: {text:?}", path.display()))
}

fn open_counter(tracepoint: u64, tid: libc::pid_t) -> std::io::Result<OwnedFd> {
    let attr = PerfEventAttr {
        kind: PERF_TYPE_TRACEPOINT,
        size: std::mem::size_of::<PerfEventAttr>() as u32,
        config: tracepoint,
        flags: INHERIT,
        ..Default::default()
    };
    // SAFETY: perf_event_open reads `attr` (valid for its declared size) and returns a new fd
    // or -1; group -1 (none), cpu -1 (any).
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &raw const attr,
            tid,
            -1 as libc::c_int,
            -1 as libc::c_int,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One count per system call, a new thread's included (this test's thread: the bench opens
    /// the same counter on each thread of a namespace's processes).
    #[test]
    fn a_thread_and_the_threads_it_starts_are_counted_once_per_system_call() {
        let id = match tracepoint_id() {
            Ok(id) => id,
            Err(e) => panic!("{e:#}"),
        };
        // SAFETY: gettid has no preconditions.
        let me = unsafe { libc::gettid() };
        let counter = SyscallCounter {
            threads: vec![open_counter(id, me).unwrap()],
        };
        let before = counter.count().unwrap();
        for _ in 0..1000 {
            // SAFETY: getppid has no preconditions and cannot fail (called raw: never cached).
            unsafe { libc::syscall(libc::SYS_getppid) };
        }
        let made = counter.count().unwrap() - before;
        assert!(
            (1000..1100).contains(&made),
            "{made} system calls counted for 1000"
        );

        // A thread started afterwards is counted in the same total (inherit).
        let before = counter.count().unwrap();
        std::thread::spawn(|| {
            for _ in 0..1000 {
                // SAFETY: as above.
                unsafe { libc::syscall(libc::SYS_getppid) };
            }
        })
        .join()
        .unwrap();
        let made = counter.count().unwrap() - before;
        assert!(
            (1000..1200).contains(&made),
            "{made} system calls counted for a new thread's 1000"
        );
    }
}
