//! The data-plane seam. Forwarding pairs always relay through user space (russh channel <-> TCP);
//! a data plane decides how the loopback hop between an ID-sock and its Mir-sock peer is carried.
//! The user-space data plane leaves it to the kernel's TCP stack. The eBPF data plane (sockmap)
//! will tag each path's sockets with its ConnID and splice the pair in the kernel.

use std::io;
use std::os::fd::RawFd;

use crate::events::ConnId;

pub trait DataPlane: Send + Sync + 'static {
    /// Short name for logs and metrics (`userspace`, `sockmap`).
    fn name(&self) -> &'static str;
    /// Human-readable state, including why this data plane was chosen.
    fn describe(&self) -> String;
    /// Called on a path's ID-sock before it binds and connects.
    fn prepare_id_socket(&self, fd: RawFd, conn_id: ConnId) -> io::Result<()>;
    /// Called when the Mir-sock side of a pair has been accepted and matched to its ConnID.
    fn pair_accepted(&self, conn_id: ConnId, mirror_side: RawFd);
    /// Called once both sides of a pair are closed.
    fn pair_closed(&self, conn_id: ConnId);
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
    fn prepare_id_socket(&self, _fd: RawFd, _conn_id: ConnId) -> io::Result<()> {
        Ok(())
    }
    fn pair_accepted(&self, _conn_id: ConnId, _mirror_side: RawFd) {}
    fn pair_closed(&self, _conn_id: ConnId) {}
}
