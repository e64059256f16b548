//! Gateway residence time (issue 15, part 1): how long a message spends in the gateway host,
//! from its (encrypted) segment arriving on one side to the (re-encrypted) segment leaving on the
//! other, taken from packet timestamps inside the gateway namespace. End-to-end RTT with stock
//! agents on both ends mixes in four crypto passes on two cores; this isolates the gateway's
//! share.
//!
//! An `AF_PACKET` socket in the gateway namespace sees every frame its interfaces receive and
//! send, each with a kernel timestamp (`SO_TIMESTAMPNS`: taken when the frame reaches the packet
//! tap, on receive and on transmit alike). While a 64 B ping-pong runs (one message in flight at
//! a time), each data-carrying segment (TCP payload or UDP datagram) arriving from one side is
//! paired with the next data-carrying frame leaving towards the other side. Frames on loopback
//! (the user-space data plane's internal hop) are not the gateway's edges and are ignored; pure
//! ACKs carry no data and are ignored too.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use cmx_testbed::Netns;
use hdrhistogram::Histogram;

use crate::stats::{histogram, record};

/// Which side of the gateway a frame's other end is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    /// The device network (10.1.0.0/16).
    Device,
    /// The server network (10.2.0.0/16).
    Server,
}

/// One data-carrying frame at the gateway's edge.
#[derive(Clone, Copy, Debug)]
struct Frame {
    at: Duration,
    side: Side,
    incoming: bool,
}

/// The IPv4 frame's other end and whether it carries data (TCP payload or a UDP datagram).
fn classify(frame: &[u8], incoming: bool) -> Option<Side> {
    // Ethernet (veth): 14 bytes, IPv4 only (the testbed's links are IPv4).
    let ip = frame.get(14..)?;
    if frame.get(12..14)? != [0x08, 0x00] || ip.first()? >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
    let other = if incoming {
        ip.get(12..16)?
    } else {
        ip.get(16..20)?
    };
    let side = match (other[0], other[1]) {
        (10, 1) => Side::Device,
        (10, 2) => Side::Server,
        _ => return None,
    };
    let payload = match ip.get(9)? {
        6 => {
            let doff = usize::from(ip.get(ihl + 12)? >> 4) * 4;
            total.checked_sub(ihl + doff)?
        }
        17 => total.checked_sub(ihl + 8)?,
        _ => return None,
    };
    (payload > 0).then_some(side)
}

/// A capture running on its own thread in the gateway namespace until `stop`.
pub struct Capture {
    stop: Arc<AtomicBool>,
    armed: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<Vec<Frame>>>>,
}

impl Capture {
    /// Opens the capture on a thread in the gateway's namespace `gw`. It keeps nothing until
    /// the flag `armed()` returns is set (when the measured messages start).
    pub fn start(gw: &Netns) -> anyhow::Result<Capture> {
        let stop = Arc::new(AtomicBool::new(false));
        let armed = Arc::new(AtomicBool::new(false));
        let (flag, keep) = (stop.clone(), armed.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = gw.spawn_in(move || {
            let socket = match open() {
                Ok(s) => s,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return Err(e);
                }
            };
            let _ = ready_tx.send(Ok(()));
            read_frames(&socket, &flag, &keep)
        });
        ready_rx
            .recv()
            .context("the capture thread ended")?
            .map_err(anyhow::Error::msg)?;
        Ok(Capture {
            stop,
            armed,
            thread: Some(thread),
        })
    }

    /// Set it to start keeping frames.
    pub fn armed(&self) -> Arc<AtomicBool> {
        self.armed.clone()
    }

    /// Stops and returns the residence times (nanoseconds), both directions together.
    pub fn finish(mut self) -> anyhow::Result<Histogram<u64>> {
        self.stop.store(true, Ordering::Relaxed);
        let frames = self
            .thread
            .take()
            .context("the capture already finished")?
            .join()
            .map_err(|_| anyhow::anyhow!("the capture thread panicked"))??;
        let mut h = histogram();
        let mut arrived: Option<Frame> = None;
        for f in frames {
            match (arrived, f.incoming) {
                (_, true) => arrived = Some(f),
                (Some(a), false) if a.side != f.side && f.at >= a.at => {
                    record(&mut h, f.at - a.at);
                    arrived = None;
                }
                _ => {}
            }
        }
        anyhow::ensure!(!h.is_empty(), "no message crossed the gateway during the capture");
        Ok(h)
    }
}

/// A capture that is dropped unfinished (its measurement failed) stops its thread.
impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The packet socket, in this thread's namespace.
fn open() -> anyhow::Result<OwnedFd> {
    let protocol = (libc::ETH_P_ALL as u16).to_be() as i32;
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, protocol) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("socket(AF_PACKET)");
    }
    // SAFETY: fd is a fresh socket this function owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let on: libc::c_int = 1;
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 100_000,
    };
    // SAFETY: setsockopt with pointers to locals of the sizes given.
    unsafe {
        if libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        ) != 0
            || libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            ) != 0
        {
            return Err(std::io::Error::last_os_error()).context("setsockopt");
        }
    }
    Ok(socket)
}

fn read_frames(socket: &OwnedFd, stop: &AtomicBool, armed: &AtomicBool) -> anyhow::Result<Vec<Frame>> {
    let mut frames = Vec::new();
    let mut buf = [0u8; 128];
    let mut control = [0u64; 16];
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: zeroed sockaddr_ll/msghdr are valid "empty" values; every pointer below points
        // into locals that outlive the recvmsg call, with their true lengths.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = (&mut from as *mut libc::sockaddr_ll).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        // SAFETY: msg is fully set up above; a truncated frame (MSG_TRUNC) still gives its
        // headers, which is all we read.
        let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_TRUNC) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
            ) {
                continue;
            }
            return Err(e).context("recvmsg on the packet socket");
        }
        if !armed.load(Ordering::Relaxed) {
            continue;
        }
        let incoming = match from.sll_pkttype {
            0 => true,  // PACKET_HOST
            4 => false, // PACKET_OUTGOING
            _ => continue,
        };
        let len = (n as usize).min(buf.len());
        let Some(side) = classify(&buf[..len], incoming) else {
            continue;
        };
        let Some(at) = timestamp(&msg) else { continue };
        frames.push(Frame { at, side, incoming });
    }
    Ok(frames)
}

/// The SCM_TIMESTAMPNS control message's time.
fn timestamp(msg: &libc::msghdr) -> Option<Duration> {
    // SAFETY: CMSG_* walk the control buffer recvmsg filled, within msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                return Some(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32));
            }
            c = libc::CMSG_NXTHDR(msg, c);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(src: [u8; 4], dst: [u8; 4], proto: u8, payload: usize) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0x08, 0x00]);
        let l4 = if proto == 6 { 20 } else { 8 };
        let total = (20 + l4 + payload) as u16;
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, proto, 0, 0];
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        f.extend_from_slice(&ip);
        let mut l4h = vec![0u8; l4];
        if proto == 6 {
            l4h[12] = 5 << 4;
        }
        f.extend_from_slice(&l4h);
        f.extend(std::iter::repeat_n(0u8, payload));
        f
    }

    #[test]
    fn data_segments_are_told_apart_from_acks_and_sides_by_the_other_end() {
        let dev = [10, 1, 0, 2];
        let gw = [10, 1, 0, 1];
        let srv = [10, 2, 0, 2];
        assert_eq!(classify(&frame(dev, gw, 6, 120), true), Some(Side::Device));
        assert_eq!(classify(&frame(gw, dev, 6, 0), false), None, "a pure ACK");
        assert_eq!(
            classify(&frame([10, 2, 0, 1], srv, 6, 120), false),
            Some(Side::Server)
        );
        assert_eq!(
            classify(&frame(srv, [10, 2, 0, 1], 17, 96), true),
            Some(Side::Server)
        );
        assert_eq!(
            classify(&frame([127, 0, 0, 1], [127, 0, 0, 1], 6, 64), true),
            None
        );
        assert_eq!(
            classify(&frame(dev, gw, 6, 120)[..20], true),
            None,
            "a truncated frame"
        );
    }
}
