//! A DNS server for a namespace's processes: it takes the address(es) `/etc/resolv.conf` names
//! (inside the namespace only), answers the names it is given with their IPv4 address, and never
//! answers any other name, as a DNS server that is down or dropped by a firewall does. The
//! system resolver then waits out its timeouts (`RES_OPTIONS` sets them per process).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use crate::hosts::{Netns, ip};

/// The running server; stops when dropped.
pub struct SlowDns {
    stop: Arc<AtomicBool>,
    unanswered: Arc<AtomicUsize>,
}

/// The name servers `/etc/resolv.conf` lists (glibc's default, 127.0.0.1, when it lists none).
pub fn name_servers() -> Vec<IpAddr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let listed: Vec<IpAddr> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().split('%').next()?.parse().ok())
        .collect();
    if listed.is_empty() {
        vec![IpAddr::V4(Ipv4Addr::LOCALHOST)]
    } else {
        listed
    }
}

/// Whether the system resolver asks DNS servers itself (`hosts: files dns` in
/// /etc/nsswitch.conf), as this server needs, rather than a local resolver daemon.
pub fn resolver_asks_dns_itself() -> bool {
    let text = std::fs::read_to_string("/etc/nsswitch.conf").unwrap_or_default();
    text.lines()
        .find_map(|l| l.trim().strip_prefix("hosts:"))
        .is_some_and(|services| {
            services
                .split_whitespace()
                .all(|s| s == "files" || s == "dns" || s.starts_with('['))
        })
}

impl SlowDns {
    /// Serves `answers` (name -> IPv4) in `ns` on every name server of /etc/resolv.conf.
    pub fn start(ns: &Netns, answers: &[(&str, Ipv4Addr)]) -> SlowDns {
        let stop = Arc::new(AtomicBool::new(false));
        let unanswered = Arc::new(AtomicUsize::new(0));
        let answers: Arc<HashMap<String, Ipv4Addr>> =
            Arc::new(answers.iter().map(|(n, a)| (n.to_string(), *a)).collect());
        for server in name_servers() {
            if !server.is_loopback() {
                let prefix = if server.is_ipv4() { 32 } else { 128 };
                ip(&[
                    "-n",
                    &ns.name,
                    "addr",
                    "add",
                    &format!("{server}/{prefix}"),
                    "dev",
                    "lo",
                ]);
            }
            let socket = ns.enter(move || UdpSocket::bind(SocketAddr::new(server, 53)));
            let socket = socket.unwrap_or_else(|e| panic!("bind {server}:53 in {}: {e}", ns.name));
            socket.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
            let (stop, unanswered, answers) = (stop.clone(), unanswered.clone(), answers.clone());
            std::thread::spawn(move || serve(&socket, &answers, &stop, &unanswered));
        }
        SlowDns { stop, unanswered }
    }

    /// Queries received and left unanswered so far.
    pub fn unanswered(&self) -> usize {
        self.unanswered.load(Ordering::Relaxed)
    }
}

impl Drop for SlowDns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(
    socket: &UdpSocket,
    answers: &HashMap<String, Ipv4Addr>,
    stop: &AtomicBool,
    unanswered: &AtomicUsize,
) {
    let mut buf = [0u8; 512];
    while !stop.load(Ordering::Relaxed) {
        let Ok((n, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        match reply(&buf[..n], answers) {
            Some(r) => {
                let _ = socket.send_to(&r, from);
            }
            None => {
                unanswered.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// The answer to `query` when it asks for a name of `answers`: its address for an A question,
/// no records for any other type (so the resolver does not wait for those either).
fn reply(query: &[u8], answers: &HashMap<String, Ipv4Addr>) -> Option<Vec<u8>> {
    let mut labels = Vec::new();
    let mut i = 12;
    loop {
        let len = *query.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(query.get(i..i + len)?).to_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*query.get(i)?, *query.get(i + 1)?]);
    let question_end = i + 4;
    let address = answers.get(&labels.join("."))?;
    let is_a = qtype == 1;
    let mut r = Vec::with_capacity(question_end + 16);
    r.extend_from_slice(query.get(..2)?); // ID
    r.extend_from_slice(&[0x81, 0x80]); // response, recursion desired and available, no error
    r.extend_from_slice(&[0, 1, 0, u8::from(is_a), 0, 0, 0, 0]);
    r.extend_from_slice(query.get(12..question_end)?);
    if is_a {
        // A pointer to the question's name, type A, class IN, TTL 60 s, 4 bytes of address.
        r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        r.extend_from_slice(&address.octets());
    }
    Some(r)
}
