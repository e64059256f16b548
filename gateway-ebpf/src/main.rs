//! cmxsafe's eBPF programs.
//!
//! - `cmx_sockops`: when an ID-sock (tagged by user space, keyed by socket cookie) connects to an
//!   identity address, both ends of the loopback connection enter the `cmx_socks` SOCKHASH under
//!   {ConnID, side}: the active end directly, the passive (Mir-sock accepted) end by matching its
//!   4-tuple, which the active end recorded in `cmx_passive`.
//! - `cmx_sk_msg`: bytes sent on one end of a pair are redirected into the other end's receive
//!   queue (BPF_F_INGRESS), skipping the loopback TCP stack. No peer yet: normal TCP (SK_PASS).
//! - `cmx_bind4/6`, `cmx_connect4/6` (cgroup): binds and connects into the identity prefix are
//!   allowed only to tagged sockets and only as the security contexts allow (`cmx_open`,
//!   `cmx_listen`, filled from the identity registry); a device's connection (a tagged ID-sock)
//!   anywhere else is checked against the egress list (`cmx_egress`). Refusals go to
//!   `cmx_denials`. The gateway's own sockets (untagged) outside the prefix are not policed.

#![no_std]
#![no_main]

use aya_ebpf::bindings::{
    BPF_ANY, BPF_F_INGRESS, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
    BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE, sk_action,
};
use aya_ebpf::helpers::bpf_get_socket_cookie;
use aya_ebpf::macros::{cgroup_sock_addr, map, sk_msg, sock_ops};
use aya_ebpf::maps::lpm_trie::Key as LpmKey;
use aya_ebpf::maps::{Array, HashMap, LpmTrie, PerCpuHashMap, RingBuf, SockHash};
use aya_ebpf::programs::{SkMsgContext, SockAddrContext, SockOpsContext};
use aya_log_ebpf::debug;
use cmx_ebpf_common::*;

const AF_INET6: u32 = 10;
const ALLOW: i32 = 1;
const DENY: i32 = 0;

#[map(name = "cmx_tags")]
static TAGS: HashMap<u64, Tag> = HashMap::pinned(cmx_ebpf_common::maps::TAGS_CAPACITY, 0);
#[map(name = "cmx_passive")]
static PASSIVE: HashMap<TupleKey, u64> = HashMap::pinned(1 << 14, 0);
/// Each spliced socket's own 4-tuple -> its place in the SOCKHASH (sk_msg cannot read cookies).
#[map(name = "cmx_pairs")]
static PAIRS: HashMap<TupleKey, PairKey> = HashMap::pinned(cmx_ebpf_common::maps::SOCKS_CAPACITY, 0);
#[map(name = "cmx_socks")]
static SOCKS: SockHash<PairKey> = SockHash::pinned(cmx_ebpf_common::maps::SOCKS_CAPACITY, 0);
/// Bytes spliced per {ConnID, side}, per CPU (user space sums): no atomics on the hot path.
#[map(name = "cmx_bytes")]
static BYTES: PerCpuHashMap<PairKey, u64> = PerCpuHashMap::pinned(cmx_ebpf_common::maps::SOCKS_CAPACITY, 0);
#[map(name = "cmx_open")]
static OPEN: HashMap<OpenKey, u8> = HashMap::pinned(1 << 16, 0);
#[map(name = "cmx_listen")]
static LISTEN: HashMap<ListenKey, u8> = HashMap::pinned(1 << 14, 0);
#[map(name = "cmx_prefix")]
static PREFIX: Array<PrefixConfig> = Array::pinned(1, 0);
#[map(name = "cmx_denials")]
static DENIALS: RingBuf = RingBuf::pinned(1 << 16, 0);
/// Where devices may not go outside the identity prefix (IPv4 as v4-mapped IPv6).
#[map(name = "cmx_egress")]
static EGRESS: LpmTrie<[u8; 16], u8> = LpmTrie::pinned(1 << 12, 0);

#[inline(always)]
fn octets(a: [u32; 4]) -> [u8; 16] {
    // The kernel stores IPv6 addresses in network byte order: the bytes are the octets.
    unsafe { core::mem::transmute(a) }
}

/// Reads a `__u32[4]` context field word by word at constant offsets: the verifier refuses a
/// context (or socket) pointer that was moved before being dereferenced, which is what copying
/// the whole array compiles to.
macro_rules! read_ip6 {
    ($field:expr) => {{
        // SAFETY: a field of the context (or socket) the kernel handed this program.
        let f = unsafe { &$field };
        unsafe {
            [
                core::ptr::read_volatile(&f[0]),
                core::ptr::read_volatile(&f[1]),
                core::ptr::read_volatile(&f[2]),
                core::ptr::read_volatile(&f[3]),
            ]
        }
    }};
}

/// The identity prefix is /64 or shorter (the gateway validates it), so the network part lies in
/// the first 8 bytes: one masked 64-bit comparison, no variable indexing (which the verifier
/// refuses on the stack).
#[inline(always)]
fn in_prefix(addr: &[u8; 16], prefix: &PrefixConfig) -> bool {
    let a = u64::from_be_bytes([
        addr[0], addr[1], addr[2], addr[3], addr[4], addr[5], addr[6], addr[7],
    ]);
    let p = &prefix.addr;
    let n = u64::from_be_bytes([p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7]]);
    let len = prefix.len.min(64);
    let mask = if len == 0 { 0 } else { u64::MAX << (64 - len) };
    (a ^ n) & mask == 0
}

#[inline(always)]
fn prefix() -> Option<&'static PrefixConfig> {
    PREFIX.get(0).filter(|p| p.enabled != 0)
}

// ---- sockops: build the pairs -------------------------------------------------------------

#[sock_ops]
pub fn cmx_sockops(ctx: SockOpsContext) -> u32 {
    if ctx.family() == AF_INET6 {
        sockops(&ctx);
    }
    0
}

/// The connection as this socket sees it.
#[inline(always)]
fn own_tuple(ctx: &SockOpsContext) -> TupleKey {
    TupleKey {
        local: octets(read_ip6!((*ctx.ops).local_ip6)),
        remote: octets(read_ip6!((*ctx.ops).remote_ip6)),
        local_port: ctx.local_port(),
        // remote_port holds the port in network order in its upper 16 bits.
        remote_port: u16::from_be((ctx.remote_port() >> 16) as u16) as u32,
    }
}

#[inline(always)]
fn sockops(ctx: &SockOpsContext) {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            let cookie = unsafe { bpf_get_socket_cookie(ctx.ops.cast()) };
            let Some(tag) = (unsafe { TAGS.get(&cookie) }) else {
                return;
            };
            let Some(prefix) = prefix() else { return };
            let me = own_tuple(ctx);
            if tag.kind != KIND_ID_SOCK || !in_prefix(&me.remote, prefix) {
                return;
            }
            let key = PairKey {
                conn_id: tag.conn_id,
                side: SIDE_ID,
                _pad: 0,
            };
            // The passive end will see this tuple reversed.
            let passive = TupleKey {
                local: me.remote,
                remote: me.local,
                local_port: me.remote_port,
                remote_port: me.local_port,
            };
            if join(ctx, &me, key).is_ok() {
                let _ = PASSIVE.insert(&passive, &tag.conn_id, BPF_ANY as u64);
                debug!(ctx, "cmx: pair {} ID side in sockhash", tag.conn_id);
            }
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            let me = own_tuple(ctx);
            let Some(conn_id) = (unsafe { PASSIVE.get(&me) }).copied() else {
                return;
            };
            let _ = PASSIVE.remove(&me);
            let key = PairKey {
                conn_id,
                side: SIDE_MIR,
                _pad: 0,
            };
            if join(ctx, &me, key).is_ok() {
                debug!(ctx, "cmx: pair {} Mir side in sockhash", conn_id);
            }
        }
        BPF_SOCK_OPS_STATE_CB => {
            if ctx.arg(1) == BPF_TCP_CLOSE {
                let _ = PAIRS.remove(&own_tuple(ctx));
            }
        }
        _ => {}
    }
}

#[inline(always)]
fn join(ctx: &SockOpsContext, me: &TupleKey, mut key: PairKey) -> Result<(), i32> {
    SOCKS.update(&mut key, unsafe { &mut *ctx.ops }, BPF_ANY as u64)?;
    PAIRS.insert(me, &key, BPF_ANY as u64).map_err(|e| e as i32)?;
    // Told when the socket closes, to forget it.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    Ok(())
}

// ---- sk_msg: splice -----------------------------------------------------------------------

#[sk_msg]
pub fn cmx_sk_msg(ctx: SkMsgContext) -> u32 {
    let md = ctx.msg;
    let tuple = TupleKey {
        local: octets(read_ip6!((*md).local_ip6)),
        remote: octets(read_ip6!((*md).remote_ip6)),
        local_port: unsafe { (*md).local_port },
        remote_port: u16::from_be((unsafe { (*md).remote_port } >> 16) as u16) as u32,
    };
    let Some(me) = (unsafe { PAIRS.get(&tuple) }).copied() else {
        return sk_action::SK_PASS;
    };
    let mut peer = PairKey {
        conn_id: me.conn_id,
        side: me.side ^ 1,
        _pad: 0,
    };
    if SOCKS.redirect_msg(&ctx, &mut peer, BPF_F_INGRESS as u64) as u32 != sk_action::SK_PASS {
        // The peer is not (or no longer) in the map: let TCP carry the bytes.
        return sk_action::SK_PASS;
    }
    let size = ctx.size() as u64;
    match BYTES.get_ptr_mut(&me) {
        Some(counter) => unsafe { *counter += size },
        None => {
            let _ = BYTES.insert(&me, &size, BPF_ANY as u64);
        }
    }
    sk_action::SK_PASS
}

// ---- cgroup hooks: the security contexts in the kernel -----------------------------------

#[inline(always)]
fn deny(
    ctx: &SockAddrContext,
    tag: Option<&Tag>,
    op: u32,
    reason: u32,
    src: [u8; 16],
    dst: [u8; 16],
    port: u32,
) -> i32 {
    if let Some(mut entry) = DENIALS.reserve::<Denial>(0) {
        entry.write(Denial {
            conn_id: tag.map(|t| t.conn_id).unwrap_or(0),
            cookie: unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) },
            op,
            reason,
            src,
            dst,
            port,
            _pad: 0,
        });
        entry.submit(0);
    }
    DENY
}

#[inline(always)]
fn tag_of(ctx: &SockAddrContext) -> Option<&'static Tag> {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) };
    unsafe { TAGS.get(&cookie) }
}

#[inline(always)]
fn user_port(ctx: &SockAddrContext) -> u32 {
    // user_port is the port in network byte order in the low 16 bits.
    u16::from_be(unsafe { (*ctx.sock_addr).user_port } as u16) as u32
}

#[cgroup_sock_addr(bind6)]
pub fn cmx_bind6(ctx: SockAddrContext) -> i32 {
    let Some(prefix) = prefix() else { return ALLOW };
    let addr = octets(read_ip6!((*ctx.sock_addr).user_ip6));
    if !in_prefix(&addr, prefix) {
        return ALLOW;
    }
    let port = user_port(&ctx);
    let Some(tag) = tag_of(&ctx) else {
        return deny(&ctx, None, OP_BIND6, DENY_UNTAGGED, [0; 16], addr, port);
    };
    let allowed = match tag.kind {
        KIND_ID_SOCK => tag.addr == addr,
        KIND_MIR_LISTENER => {
            let owner = tag.addr;
            let keys = [
                ListenKey { owner, addr, port },
                ListenKey { owner, addr, port: 0 },
                ListenKey {
                    owner,
                    addr: [0; 16],
                    port,
                },
                ListenKey {
                    owner,
                    addr: [0; 16],
                    port: 0,
                },
            ];
            let mut hit = false;
            let mut i = 0;
            while i < keys.len() {
                if unsafe { LISTEN.get(&keys[i]) }.is_some() {
                    hit = true;
                }
                i += 1;
            }
            hit
        }
        _ => false,
    };
    // For a bind, `src` is who binds (the tag's identity) and `dst` where.
    if allowed {
        ALLOW
    } else {
        deny(
            &ctx,
            Some(tag),
            OP_BIND6,
            DENY_NOT_PERMITTED,
            tag.addr,
            addr,
            port,
        )
    }
}

/// A device's connection outside the identity prefix: refused where the egress trie's longest
/// matching prefix says deny.
#[inline(always)]
fn egress(ctx: &SockAddrContext, tag: &Tag, op: u32, dst: [u8; 16], port: u32) -> i32 {
    let key = LpmKey::new(128, dst);
    match EGRESS.get(&key) {
        Some(v) if *v == EGRESS_DENY => deny(ctx, Some(tag), op, DENY_EGRESS, tag.addr, dst, port),
        _ => ALLOW,
    }
}

#[cgroup_sock_addr(connect6)]
pub fn cmx_connect6(ctx: SockAddrContext) -> i32 {
    let Some(prefix) = prefix() else { return ALLOW };
    let dst = octets(read_ip6!((*ctx.sock_addr).user_ip6));
    if !in_prefix(&dst, prefix) {
        return match tag_of(&ctx) {
            Some(tag) if tag.kind == KIND_ID_SOCK => egress(&ctx, tag, OP_CONNECT6, dst, user_port(&ctx)),
            _ => ALLOW,
        };
    }
    let port = user_port(&ctx);
    let sk = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    let src = if sk.is_null() {
        [0; 16]
    } else {
        octets(read_ip6!((*sk).src_ip6))
    };
    let Some(tag) = tag_of(&ctx) else {
        return deny(&ctx, None, OP_CONNECT6, DENY_UNTAGGED, src, dst, port);
    };
    if tag.kind != KIND_ID_SOCK || tag.addr != src {
        return deny(&ctx, Some(tag), OP_CONNECT6, DENY_WRONG_SOURCE, src, dst, port);
    }
    let keys = [
        OpenKey {
            src,
            dst,
            port,
            _pad: 0,
        },
        OpenKey {
            src,
            dst,
            port: 0,
            _pad: 0,
        },
        OpenKey {
            src,
            dst: [0; 16],
            port,
            _pad: 0,
        },
        OpenKey {
            src,
            dst: [0; 16],
            port: 0,
            _pad: 0,
        },
    ];
    let mut i = 0;
    while i < keys.len() {
        if unsafe { OPEN.get(&keys[i]) }.is_some() {
            return ALLOW;
        }
        i += 1;
    }
    deny(&ctx, Some(tag), OP_CONNECT6, DENY_NOT_PERMITTED, src, dst, port)
}

/// Identity addresses are IPv6: a tagged socket never binds IPv4.
#[cgroup_sock_addr(bind4)]
pub fn cmx_bind4(ctx: SockAddrContext) -> i32 {
    match tag_of(&ctx) {
        Some(tag) if prefix().is_some() => deny(
            &ctx,
            Some(tag),
            OP_BIND4,
            DENY_NOT_PERMITTED,
            [0; 16],
            [0; 16],
            user_port(&ctx),
        ),
        _ => ALLOW,
    }
}

/// A device's connection to an IPv4 host (a tagged ID-sock without an identity source): the
/// egress list decides; the gateway's own IPv4 sockets are untagged and not policed.
#[cgroup_sock_addr(connect4)]
pub fn cmx_connect4(ctx: SockAddrContext) -> i32 {
    let Some(tag) = tag_of(&ctx) else { return ALLOW };
    if prefix().is_none() {
        return ALLOW;
    }
    if tag.kind != KIND_ID_SOCK {
        let port = user_port(&ctx);
        return deny(
            &ctx,
            Some(tag),
            OP_CONNECT4,
            DENY_NOT_PERMITTED,
            [0; 16],
            [0; 16],
            port,
        );
    }
    // user_ip4 is in network byte order: its bytes are the octets.
    let v4: [u8; 4] = unsafe { (*ctx.sock_addr).user_ip4 }.to_ne_bytes();
    let dst = [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ];
    egress(&ctx, tag, OP_CONNECT4, dst, user_port(&ctx))
}

/// Every ABI type, as members, so the object's BTF describes them all.
#[repr(C)]
pub struct AbiTypes {
    pub tag: Tag,
    pub pair: PairKey,
    pub tuple: TupleKey,
    pub open: OpenKey,
    pub listen: ListenKey,
    pub prefix: PrefixConfig,
    pub denial: Denial,
}

/// Never called: its signature puts every ABI type into the object's BTF, where the gateway's
/// layout test reads their sizes and field offsets and compares them with the Rust definitions.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn cmx_abi_types(types: *const AbiTypes) -> *const AbiTypes {
    types
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
