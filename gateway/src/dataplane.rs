//! The data-plane seam. Forwarding pairs always relay through user space (russh channel <-> TCP);
//! a data plane decides how the loopback hop between an ID-sock and its Mir-sock peer is carried,
//! and whether the kernel polices binds and connects into the identity prefix.
//!
//! - `userspace`: plain loopback TCP; user space alone enforces the security contexts.
//! - `sockmap` (`crate::ebpf`): sockets are tagged with their path's ConnID (by socket cookie);
//!   sockops + sk_msg splice each pair in the kernel, and cgroup hooks refuse binds and connects
//!   the identity registry does not allow, whatever user space does.

use std::io;
use std::net::Ipv6Addr;
use std::sync::Arc;

use socket2::Socket;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::events::ConnId;
use crate::identity::Registry;

/// The registry in force, and a notice each time it changes.
pub type RegistryWatch = watch::Receiver<Arc<Registry>>;

/// What a tagged socket serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SocketRole {
    /// An ID-sock: bound to a device's identity address, connecting for one path.
    IdSock,
    /// A Mir-sock: a server identity's listener.
    MirListener,
}

#[derive(Clone, Copy, Debug)]
pub struct SocketTag {
    pub conn_id: ConnId,
    pub role: SocketRole,
    /// The identity address the socket acts for (the device's, or the publishing server's).
    pub identity: Ipv6Addr,
}

/// Untags a socket when dropped (keep it as long as the socket).
pub struct TagGuard(Option<Box<dyn FnOnce() + Send + Sync>>);

impl TagGuard {
    pub fn none() -> Self {
        TagGuard(None)
    }
    pub fn new(undo: impl FnOnce() + Send + Sync + 'static) -> Self {
        TagGuard(Some(Box::new(undo)))
    }
}

impl Drop for TagGuard {
    fn drop(&mut self) {
        if let Some(undo) = self.0.take() {
            undo();
        }
    }
}

/// Kernel-side view for operators.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Occupancy {
    pub entries: Vec<(&'static str, usize)>,
    /// Per map: inserts refused because it was full, since start.
    pub full: Vec<(&'static str, u64)>,
}

pub trait DataPlane: Send + Sync + 'static {
    /// Short name for logs and metrics (`userspace`, `sockmap`).
    fn name(&self) -> &'static str;
    /// Human-readable state, including why this data plane was chosen.
    fn describe(&self) -> String;
    /// Tags a socket before it binds.
    fn tag(&self, socket: &Socket, tag: SocketTag) -> io::Result<TagGuard>;
    /// Called once a pair's relay ended: the kernel's byte counters (ID side sent, Mir side
    /// sent), which it then forgets.
    fn pair_closed(&self, conn_id: ConnId) -> Option<(u64, u64)>;
    /// Starts background work (policy sync with the registry, kernel logs) until `shutdown`.
    fn start(self: Arc<Self>, registry: RegistryWatch, shutdown: CancellationToken);
    /// Brings kernel policy in line with `registry` now.
    fn sync_policy(&self, registry: &Registry) -> Result<(), String>;
    /// Brings the kernel's egress list in line with `entries` (see `authz::Egress`).
    fn sync_egress(&self, _entries: &[crate::authz::KernelEgress]) -> Result<(), String> {
        Ok(())
    }
    fn occupancy(&self) -> Occupancy;
    /// Undoes everything the data plane set up (at clean shutdown).
    fn shutdown(&self) {}
}

/// Plain loopback TCP between the two sockets of a pair.
pub struct UserspaceDataPlane {
    reason: String,
}

impl UserspaceDataPlane {
    pub fn new(reason: impl Into<String>) -> Self {
        UserspaceDataPlane {
            reason: reason.into(),
        }
    }
}

impl DataPlane for UserspaceDataPlane {
    fn name(&self) -> &'static str {
        "userspace"
    }
    fn describe(&self) -> String {
        format!("userspace ({})", self.reason)
    }
    fn tag(&self, _socket: &Socket, _tag: SocketTag) -> io::Result<TagGuard> {
        Ok(TagGuard::none())
    }
    fn pair_closed(&self, _conn_id: ConnId) -> Option<(u64, u64)> {
        None
    }
    fn start(self: Arc<Self>, _registry: RegistryWatch, _shutdown: CancellationToken) {}
    fn sync_policy(&self, _registry: &Registry) -> Result<(), String> {
        Ok(())
    }
    fn occupancy(&self) -> Occupancy {
        Occupancy::default()
    }
}
