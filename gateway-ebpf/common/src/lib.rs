//! The eBPF ABI of cmxsafe: every type that crosses between the kernel programs
//! (`gateway-ebpf`) and the gateway, defined once and compiled by both sides. `#[repr(C)]` with
//! `bytemuck::Pod` (which rejects hidden padding at compile time); the `user` feature adds
//! `aya::Pod`. A test in the gateway compares these layouts with the BTF of the built object.
//!
//! Addresses are IPv6 in network byte order (`Ipv6Addr::octets()`), ports in host byte order.

#![no_std]

use bytemuck::{Pod, Zeroable};

/// Prefix of every map and program name (tools find and clean them up by it).
pub const NAME_PREFIX: &str = "cmx_";

/// What a tagged socket is for.
pub const KIND_ID_SOCK: u32 = 1;
pub const KIND_MIR_LISTENER: u32 = 2;

/// The two sockets of a forwarding pair.
pub const SIDE_ID: u32 = 0;
pub const SIDE_MIR: u32 = 1;

/// Operations a denial can be about.
pub const OP_BIND4: u32 = 1;
pub const OP_BIND6: u32 = 2;
pub const OP_CONNECT4: u32 = 3;
pub const OP_CONNECT6: u32 = 4;

/// Why the kernel refused.
pub const DENY_UNTAGGED: u32 = 1;
pub const DENY_NOT_PERMITTED: u32 = 2;
pub const DENY_WRONG_SOURCE: u32 = 3;
/// A device's connection to a range the egress list denies (loopback, link-local, the gateway's
/// own addresses, cluster networks).
pub const DENY_EGRESS: u32 = 4;

/// Values of the egress trie (`cmx_egress`): the longest matching prefix decides.
pub const EGRESS_DENY: u8 = 1;
pub const EGRESS_ALLOW: u8 = 2;

/// A socket's tag, keyed by its socket cookie (`SO_COOKIE`): which path it serves.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct Tag {
    pub conn_id: u64,
    pub kind: u32,
    pub _pad: u32,
    /// The identity address the socket serves (an ID-sock's source, a Mir-sock's listen address).
    pub addr: [u8; 16],
}

/// A socket of a forwarding pair in the SOCKHASH.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct PairKey {
    pub conn_id: u64,
    pub side: u32,
    pub _pad: u32,
}

/// A TCP connection as one end sees it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct TupleKey {
    pub local: [u8; 16],
    pub remote: [u8; 16],
    pub local_port: u32,
    pub remote_port: u32,
}

/// May `src` (an identity address) connect to `[dst]:port`? `dst` all zero = any host,
/// `port` 0 = any port. Derived from the identity registry's `permit_open`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct OpenKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub port: u32,
    pub _pad: u32,
}

/// May a Mir-sock of the identity whose address is `owner` listen on `[addr]:port`? `addr` all
/// zero = any address in the prefix, `port` 0 = any port. Derived from `permit_listen`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct ListenKey {
    pub owner: [u8; 16],
    pub addr: [u8; 16],
    pub port: u32,
}

/// The identity prefix: binds and connects into it are policed.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct PrefixConfig {
    pub addr: [u8; 16],
    pub len: u32,
    /// Nonzero once user space has filled the maps: until then nothing is enforced.
    pub enabled: u32,
}

/// A refused bind or connect, sent to user space through the denials ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct Denial {
    pub conn_id: u64,
    pub cookie: u64,
    pub op: u32,
    pub reason: u32,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub port: u32,
    pub _pad: u32,
}

/// Map names, shared so user space opens exactly what the programs define.
pub mod maps {
    pub const TAGS: &str = "cmx_tags";
    pub const PASSIVE: &str = "cmx_passive";
    pub const PAIRS: &str = "cmx_pairs";
    pub const SOCKS: &str = "cmx_socks";
    pub const BYTES: &str = "cmx_bytes";
    pub const OPEN: &str = "cmx_open";
    pub const LISTEN: &str = "cmx_listen";
    pub const PREFIX: &str = "cmx_prefix";
    pub const DENIALS: &str = "cmx_denials";
    /// LPM trie: {prefix length, IPv6 address (IPv4 as ::ffff:a.b.c.d)} -> EGRESS_DENY/ALLOW.
    pub const EGRESS: &str = "cmx_egress";

    /// Entries of `cmx_tags`: one per ID-sock (pair) and one per Mir-sock listener (forward).
    /// The default: the gateway sets its own at load (`dataplane.tags_capacity`).
    pub const TAGS_CAPACITY: u32 = 1 << 16;
    /// Entries of `cmx_pairs`, `cmx_socks` and `cmx_bytes`: two per spliced pair.
    pub const SOCKS_CAPACITY: u32 = 1 << 17;
}

/// Program names (the Rust function names in gateway-ebpf).
pub mod programs {
    pub const SOCKOPS: &str = "cmx_sockops";
    pub const SK_MSG: &str = "cmx_sk_msg";
    pub const BIND4: &str = "cmx_bind4";
    pub const BIND6: &str = "cmx_bind6";
    pub const CONNECT4: &str = "cmx_connect4";
    pub const CONNECT6: &str = "cmx_connect6";
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    // SAFETY: plain-old-data, `#[repr(C)]`, no padding (bytemuck::Pod checks it).
    unsafe impl aya::Pod for Tag {}
    unsafe impl aya::Pod for PairKey {}
    unsafe impl aya::Pod for TupleKey {}
    unsafe impl aya::Pod for OpenKey {}
    unsafe impl aya::Pod for ListenKey {}
    unsafe impl aya::Pod for PrefixConfig {}
    unsafe impl aya::Pod for Denial {}
}
