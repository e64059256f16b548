//! cmx-testbed: the hosts, processes and peers every cmxsafe test suite and the benchmarks run
//! against. Real parts only: network namespaces for hosts, the real `cmx-gateway` and
//! `cmx-agent` binaries, stock OpenSSH clients and sshd, keys and certificates from ssh-keygen.
//! A dev-only crate: nothing shipped depends on it.
//!
//! # Layout
//! - `hosts`: device, gateway and server hosts as network namespaces (`Hosts`, `Netns`).
//! - `bins`: finding the workspace's binaries from a test or benchmark.
//! - `keys`: OpenSSH keys and user certificates.
//! - `registry`: identity registry text and the usual identities (srv1, dev1).
//! - `gateway`: a `cmx-gateway` process (`GatewayProc`), its data plane settings and log.
//! - `agents`: `cmx-agent` processes and stock `ssh -N` agents.
//! - `logbook`: a process's JSON log, waited on as typed events and audit records.
//! - `nodefs`: the pin directories and cgroups test gateways use on the node.
//! - `services`: echo, banner and stalling apps behind the tunnels; byte-exact exchanges.
//! - `openssh`: stock sshd configured as a CMXsafe gateway, with a Linux user per identity.
//! - `raw`: a scriptable russh client, for attacks stock OpenSSH cannot make.
//! - `dns`: a DNS server that answers some names and never the rest (a resolver that hangs).
//!
//! Tests import everything: `use cmx_testbed::*;`.

pub mod agents;
pub mod bins;
pub mod browser;
pub mod dns;
pub mod gateway;
pub mod hosts;
pub mod keys;
pub mod logbook;
pub mod nodefs;
pub mod openssh;
pub mod raw;
pub mod registry;
pub mod services;

pub use agents::*;
pub use bins::*;
pub use browser::Browser;
pub use cmx_events::{AuditEvent, AuditRecord, CloseCause, GatewayEvent, SessionId, Verdict};
pub use dns::SlowDns;
pub use gateway::*;
pub use hosts::*;
pub use keys::*;
pub use logbook::*;
pub use nodefs::cgroup_v2_mount;
pub use openssh::*;
pub use raw::*;
pub use registry::*;
pub use services::*;

use std::sync::atomic::{AtomicUsize, Ordering};

/// A number unique in this process: names of namespaces and files made by tests.
pub(crate) fn unique() -> usize {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    COUNTER.fetch_add(1, Ordering::Relaxed)
}
