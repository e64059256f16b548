//! The sockmap data plane: loads the eBPF object built from `gateway-ebpf` (embedded at build
//! time), pins its maps under the pin directory, attaches its programs to the gateway's own
//! cgroup, keeps the kernel's policy maps in step with the identity registry, tags sockets, and
//! streams the kernel's denials and logs into the gateway's log.
//!
//! Tagging: each ID-sock and Mir-sock is tagged, before it binds, with its path's ConnID in
//! `cmx_tags`, keyed by its socket cookie (`SO_COOKIE`). Cookies are unique for the life of the
//! system and invisible to routing (unlike SO_MARK, which CNIs and kube-proxy use).

pub mod bpffs;
pub mod cgroup;
pub mod policy;

use std::collections::HashSet;
use std::hash::Hash;
use std::io;
use std::net::Ipv6Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use aya::maps::lpm_trie::{Key as LpmKey, LpmTrie};
use aya::maps::{Array, HashMap, Map, MapData, PerCpuHashMap, RingBuf, SockHash};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, SkMsg, SockOps};
use aya::{Ebpf, EbpfLoader, Pod};
use cmx_ebpf_common::{self as abi, Denial, ListenKey, OpenKey, PairKey, PrefixConfig, Tag};
use ipnet::Ipv6Net;
use socket2::Socket;
use tokio::io::unix::AsyncFd;

use tokio_util::sync::CancellationToken;

use crate::dataplane::{DataPlane, Occupancy, RegistryWatch, SocketRole, SocketTag, TagGuard};
use crate::events::ConnId;
use crate::identity::Registry;

/// The eBPF object, embedded by build.rs; empty when the gateway was built without the toolchain.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/cmx-gateway-ebpf.o"));
const UNAVAILABLE: &str = env!("CMX_EBPF_UNAVAILABLE");

/// The embedded object, or why there is none.
pub fn object() -> Result<&'static [u8], String> {
    if OBJECT.is_empty() {
        Err(format!(
            "this binary was built without the eBPF object ({UNAVAILABLE})"
        ))
    } else {
        Ok(OBJECT)
    }
}

#[derive(Clone, Debug)]
pub struct SockmapSettings {
    pub pin_dir: PathBuf,
    pub cgroup: PathBuf,
    pub prefix: Ipv6Net,
    /// Entries of cmx_tags (`dataplane.tags_capacity`).
    pub tags_capacity: u32,
}

type Shared<T> = Arc<Mutex<T>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct SockmapDataPlane {
    settings: SockmapSettings,
    /// Programs and their links: dropping it detaches everything.
    ebpf: Mutex<Option<Ebpf>>,
    cgroup: Mutex<Option<cgroup::OwnCgroup>>,
    /// Held while the pins are ours (see `bpffs::lock`); after `unload` removed the directory it
    /// locks nothing a later gateway could use.
    _pin_lock: std::fs::File,
    tags: Shared<HashMap<MapData, u64, Tag>>,
    bytes: Mutex<PerCpuHashMap<MapData, PairKey, u64>>,
    open: Mutex<HashMap<MapData, OpenKey, u8>>,
    listen: Mutex<HashMap<MapData, ListenKey, u8>>,
    prefix: Mutex<Array<MapData, PrefixConfig>>,
    egress: Mutex<LpmTrie<MapData, [u8; 16], u8>>,
    /// The SOCKHASH the sk_msg program is attached to: held open for the gateway's lifetime.
    _socks: SockHash<MapData, PairKey>,
    denials: Mutex<Option<RingBuf<MapData>>>,
    logger: Mutex<Option<aya_log::EbpfLogger<&'static dyn log::Log>>>,
    /// Sockets refused because `cmx_tags` was full (a metric: the limits did not keep it below
    /// its capacity).
    tags_full: std::sync::atomic::AtomicU64,
}

fn take<T: TryFrom<aya::maps::Map>>(ebpf: &mut Ebpf, name: &str) -> Result<T, String>
where
    T::Error: std::fmt::Display,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| format!("the eBPF object has no map {name}"))?;
    T::try_from(map).map_err(|e| format!("map {name}: {e}"))
}

impl SockmapDataPlane {
    /// A second handle on the pinned map `name`. Counting a map's entries walks its keys, a
    /// syscall each; on this handle it never holds the locks that `tag` and `pair_closed` take for
    /// every connection (a metrics scrape must not stall new pairs).
    fn pinned<M: TryFrom<Map>>(&self, name: &str, variant: fn(MapData) -> Map) -> Option<M>
    where
        M::Error: std::fmt::Display,
    {
        let path = self.settings.pin_dir.join(name);
        let map = MapData::from_pin(&path)
            .map_err(|e| e.to_string())
            .and_then(|data| M::try_from(variant(data)).map_err(|e| e.to_string()));
        map.map_err(|e| tracing::debug!(map = name, error = %e, "cannot open the pinned map to count it"))
            .ok()
    }

    /// Loads and attaches everything. On error nothing stays attached, and the reason says
    /// what was missing (rights, kernel features, the object).
    pub fn load(settings: SockmapSettings) -> Result<SockmapDataPlane, String> {
        let object = object()?;
        bpffs::ensure_mounted(&settings.pin_dir).map_err(|e| {
            format!(
                "cannot mount the BPF filesystem at {}: {e}",
                settings.pin_dir.display()
            )
        })?;
        // The pin directory's lock and the cgroup first: either fails while another gateway uses
        // it, and then the pins (that gateway's) must stay. Once both are ours, pins are stale.
        let pin_lock = bpffs::lock(&settings.pin_dir).map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock => format!(
                "pin directory {} is in use by another running gateway; give each gateway its own dataplane.pin_dir and dataplane.cgroup",
                settings.pin_dir.display()
            ),
            _ => format!("cannot use pin directory {}: {e}", settings.pin_dir.display()),
        })?;
        for gone in bpffs::remove_stale_siblings(&settings.pin_dir) {
            tracing::warn!(pin_dir = %gone.display(), "removed the pins of a gateway that is gone");
        }
        // The lock is ours, so is the directory: a failure from here on removes it.
        let own_cgroup = match cgroup::OwnCgroup::enter(&settings.cgroup) {
            Ok(own) => own,
            Err(e) => {
                bpffs::remove(&settings.pin_dir);
                return Err(e.to_string());
            }
        };
        let stale = match bpffs::clear(&settings.pin_dir) {
            Ok(stale) => stale,
            Err(e) => {
                own_cgroup.leave();
                bpffs::remove(&settings.pin_dir);
                return Err(format!(
                    "cannot use pin directory {}: {e}",
                    settings.pin_dir.display()
                ));
            }
        };
        if stale > 0 {
            tracing::warn!(pin_dir = %settings.pin_dir.display(), stale, "replaced pins left by an earlier gateway");
        }
        match Self::attach(settings, object, own_cgroup, pin_lock) {
            Ok(dp) => Ok(dp),
            Err((reason, own_cgroup, pin_dir)) => {
                own_cgroup.leave();
                bpffs::remove(&pin_dir);
                Err(reason)
            }
        }
    }

    #[allow(clippy::result_large_err)]
    fn attach(
        settings: SockmapSettings,
        object: &[u8],
        own_cgroup: cgroup::OwnCgroup,
        pin_lock: std::fs::File,
    ) -> Result<SockmapDataPlane, (String, cgroup::OwnCgroup, PathBuf)> {
        let pin_dir = settings.pin_dir.clone();
        let fail = |reason: String, cg| (reason, cg, pin_dir.clone());
        let result = (|| -> Result<_, String> {
            let mut ebpf = EbpfLoader::new()
                .default_map_pin_directory(&settings.pin_dir)
                .map_max_entries(abi::maps::TAGS, settings.tags_capacity)
                .load(object)
                .map_err(|e| {
                    format!("loading the eBPF object failed (are CAP_BPF and CAP_NET_ADMIN granted?): {e}")
                })?;
            let logger = aya_log::EbpfLogger::init(&mut ebpf).ok();
            let socks: SockHash<MapData, PairKey> = take(&mut ebpf, abi::maps::SOCKS)?;
            let cg = own_cgroup
                .file()
                .map_err(|e| format!("cannot open cgroup {}: {e}", own_cgroup.path.display()))?;
            // Each program: find it, load it, attach it (`$attach` with `p` in scope), pin it.
            macro_rules! attach {
                ($ty:ty, $name:expr, |$p:ident| $attach:expr) => {{
                    let name = $name;
                    let err = |e: &dyn std::fmt::Display| format!("program {name}: {e}");
                    let $p: &mut $ty = ebpf
                        .program_mut(name)
                        .ok_or_else(|| err(&"missing from the object"))?
                        .try_into()
                        .map_err(|e| err(&e))?;
                    $p.load().map_err(|e| err(&e))?;
                    $attach.map_err(|e| err(&e))?;
                    $p.pin(settings.pin_dir.join(name)).map_err(|e| err(&e))?;
                }};
            }
            attach!(SockOps, abi::programs::SOCKOPS, |p| p
                .attach(&cg, CgroupAttachMode::Single));
            attach!(SkMsg, abi::programs::SK_MSG, |p| p.attach(socks.fd()));
            for name in [
                abi::programs::BIND4,
                abi::programs::BIND6,
                abi::programs::CONNECT4,
                abi::programs::CONNECT6,
            ] {
                attach!(CgroupSockAddr, name, |p| p.attach(&cg, CgroupAttachMode::Single));
            }

            Ok(SockmapDataPlane {
                tags: Arc::new(Mutex::new(take(&mut ebpf, abi::maps::TAGS)?)),
                bytes: Mutex::new(take(&mut ebpf, abi::maps::BYTES)?),
                open: Mutex::new(take(&mut ebpf, abi::maps::OPEN)?),
                listen: Mutex::new(take(&mut ebpf, abi::maps::LISTEN)?),
                prefix: Mutex::new(take(&mut ebpf, abi::maps::PREFIX)?),
                egress: Mutex::new(take(&mut ebpf, abi::maps::EGRESS)?),
                denials: Mutex::new(Some(take(&mut ebpf, abi::maps::DENIALS)?)),
                _socks: socks,
                tags_full: Default::default(),
                logger: Mutex::new(logger),
                ebpf: Mutex::new(Some(ebpf)),
                cgroup: Mutex::new(None),
                _pin_lock: pin_lock,
                settings: settings.clone(),
            })
        })();
        match result {
            Ok(dp) => {
                *lock(&dp.cgroup) = Some(own_cgroup);
                Ok(dp)
            }
            Err(reason) => Err(fail(reason, own_cgroup)),
        }
    }

    /// Detaches the programs, removes the pins, leaves and removes the cgroup. Once; later calls
    /// (and the drop) do nothing.
    pub fn unload(&self) {
        let Some(ebpf) = lock(&self.ebpf).take() else {
            return; // already unloaded
        };
        drop(ebpf);
        bpffs::remove(&self.settings.pin_dir);
        if let Some(cg) = lock(&self.cgroup).take() {
            cg.leave();
        }
        tracing::info!(pin_dir = %self.settings.pin_dir.display(), "eBPF programs detached, pins removed");
    }

    pub fn cgroup_path(&self) -> PathBuf {
        self.settings.cgroup.clone()
    }
}

impl Drop for SockmapDataPlane {
    fn drop(&mut self) {
        self.unload();
    }
}

/// Makes `map` hold exactly `want` (value 1).
fn sync_set<K: Pod + Eq + Hash>(
    map: &mut HashMap<MapData, K, u8>,
    want: &HashSet<K>,
) -> Result<(usize, usize), String> {
    let have: HashSet<K> = map.keys().filter_map(Result::ok).collect();
    let mut removed = 0;
    for k in have.difference(want) {
        map.remove(k).map_err(|e| e.to_string())?;
        removed += 1;
    }
    let mut added = 0;
    for k in want.difference(&have) {
        map.insert(*k, 1, 0).map_err(|e| e.to_string())?;
        added += 1;
    }
    Ok((added, removed))
}

impl DataPlane for SockmapDataPlane {
    fn name(&self) -> &'static str {
        "sockmap"
    }

    fn describe(&self) -> String {
        format!(
            "sockmap (eBPF programs attached to cgroup {}, pins in {})",
            self.settings.cgroup.display(),
            self.settings.pin_dir.display()
        )
    }

    fn tag(&self, socket: &Socket, tag: SocketTag) -> io::Result<TagGuard> {
        let cookie = cmx_net::sockets::cookie(socket)?;
        let kind = match tag.role {
            SocketRole::IdSock => abi::KIND_ID_SOCK,
            SocketRole::MirListener => abi::KIND_MIR_LISTENER,
        };
        let value = Tag {
            conn_id: tag.conn_id,
            kind,
            _pad: 0,
            addr: tag.identity.octets(),
        };
        lock(&self.tags).insert(cookie, value, 0).map_err(|e| {
            let full = matches!(&e, aya::maps::MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::E2BIG));
            if !full {
                return io::Error::other(e);
            }
            self.tags_full.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let capacity = self.settings.tags_capacity;
            tracing::error!(map = abi::maps::TAGS, capacity, conn_id = tag.conn_id,
                "kernel map cmx_tags is full: this connection is refused (raise dataplane.tags_capacity, or lower limits.max_pairs and limits.max_forwards below it)");
            io::Error::other(format!(
                "the kernel map cmx_tags is full ({capacity} entries, dataplane.tags_capacity)"
            ))
        })?;
        let tags = self.tags.clone();
        Ok(TagGuard::new(move || {
            let _ = lock(&tags).remove(&cookie);
        }))
    }

    fn pair_closed(&self, conn_id: ConnId) -> Option<(u64, u64)> {
        let mut bytes = lock(&self.bytes);
        let mut side = |side| {
            let key = PairKey {
                conn_id,
                side,
                _pad: 0,
            };
            let total = bytes.get(&key, 0).ok().map(|per_cpu| per_cpu.iter().sum::<u64>());
            let _ = bytes.remove(&key);
            total
        };
        let (id, mir) = (side(abi::SIDE_ID), side(abi::SIDE_MIR));
        (id.is_some() || mir.is_some()).then(|| (id.unwrap_or(0), mir.unwrap_or(0)))
    }

    fn sync_policy(&self, registry: &Registry) -> Result<(), String> {
        let (open_added, open_removed) = sync_set(&mut lock(&self.open), &policy::open_entries(registry))?;
        let (listen_added, listen_removed) =
            sync_set(&mut lock(&self.listen), &policy::listen_entries(registry))?;
        let prefix = PrefixConfig {
            addr: self.settings.prefix.network().octets(),
            len: u32::from(self.settings.prefix.prefix_len()),
            enabled: 1,
        };
        lock(&self.prefix).set(0, prefix, 0).map_err(|e| e.to_string())?;
        tracing::info!(
            open_added,
            open_removed,
            listen_added,
            listen_removed,
            "kernel policy in step with the registry"
        );
        Ok(())
    }

    fn sync_egress(&self, entries: &[crate::authz::KernelEgress]) -> Result<(), String> {
        let mut map = lock(&self.egress);
        let want: std::collections::HashMap<(u32, [u8; 16]), u8> = entries
            .iter()
            .map(|e| {
                let value = if e.allow {
                    abi::EGRESS_ALLOW
                } else {
                    abi::EGRESS_DENY
                };
                ((u32::from(e.prefix_len), e.addr.octets()), value)
            })
            .collect();
        let have: Vec<(u32, [u8; 16])> = map
            .keys()
            .filter_map(Result::ok)
            .map(|k| (k.prefix_len(), k.data()))
            .collect();
        for (len, addr) in have.iter().filter(|k| !want.contains_key(k)) {
            map.remove(&LpmKey::new(*len, *addr)).map_err(|e| e.to_string())?;
        }
        for ((len, addr), value) in &want {
            map.insert(&LpmKey::new(*len, *addr), *value, 0)
                .map_err(|e| format!("egress entry {}/{len}: {e}", Ipv6Addr::from(*addr)))?;
        }
        tracing::info!(entries = want.len(), "kernel egress list in step");
        Ok(())
    }

    fn occupancy(&self) -> Occupancy {
        let tags = self.pinned::<HashMap<MapData, u64, Tag>>(abi::maps::TAGS, Map::HashMap);
        let socks = self.pinned::<SockHash<MapData, PairKey>>(abi::maps::SOCKS, Map::SockHash);
        let bytes = self.pinned::<PerCpuHashMap<MapData, PairKey, u64>>(abi::maps::BYTES, Map::PerCpuHashMap);
        let open = self.pinned::<HashMap<MapData, OpenKey, u8>>(abi::maps::OPEN, Map::HashMap);
        let listen = self.pinned::<HashMap<MapData, ListenKey, u8>>(abi::maps::LISTEN, Map::HashMap);
        let entries = [
            (abi::maps::TAGS, tags.map(|m| m.keys().count())),
            (abi::maps::SOCKS, socks.map(|m| m.keys().count())),
            (abi::maps::BYTES, bytes.map(|m| m.keys().count())),
            (abi::maps::OPEN, open.map(|m| m.keys().count())),
            (abi::maps::LISTEN, listen.map(|m| m.keys().count())),
        ];
        Occupancy {
            entries: entries
                .into_iter()
                .filter_map(|(name, n)| Some((name, n?)))
                .collect(),
            full: vec![(
                abi::maps::TAGS,
                self.tags_full.load(std::sync::atomic::Ordering::Relaxed),
            )],
        }
    }

    fn start(self: Arc<Self>, registry: RegistryWatch, shutdown: CancellationToken) {
        if let Some(ring) = lock(&self.denials).take() {
            tokio::spawn(read_denials(ring, registry.clone(), shutdown.clone()));
        }
        if let Some(logger) = lock(&self.logger).take() {
            tokio::spawn(read_logs(logger, shutdown.clone()));
        }
        tokio::spawn(async move {
            let mut registry = registry;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = registry.changed() => if r.is_err() { return },
                }
                let snapshot = registry.borrow_and_update().clone();
                if let Err(e) = self.sync_policy(&snapshot) {
                    tracing::error!(error = %e, "cannot update the kernel policy maps");
                }
            }
        });
    }

    fn shutdown(&self) {
        self.unload();
    }
}

fn op_name(op: u32) -> &'static str {
    match op {
        abi::OP_BIND4 => "bind4",
        abi::OP_BIND6 => "bind6",
        abi::OP_CONNECT4 => "connect4",
        abi::OP_CONNECT6 => "connect6",
        _ => "unknown",
    }
}

fn reason_text(reason: u32) -> &'static str {
    match reason {
        abi::DENY_UNTAGGED => "untagged socket: not opened by the gateway for an authorized path",
        abi::DENY_NOT_PERMITTED => "not allowed by the identity's security context",
        abi::DENY_WRONG_SOURCE => "socket bound to another identity's address",
        abi::DENY_EGRESS => "a device may not reach this address ([egress])",
        _ => "refused",
    }
}

async fn read_denials(ring: RingBuf<MapData>, registry: RegistryWatch, shutdown: CancellationToken) {
    // SAFETY: the ring buffer owns its map fd, which stays open and is not replaced while the
    // AsyncFd owns it.
    let Ok(mut fd) = (unsafe { AsyncFd::register(ring) }) else {
        return;
    };
    loop {
        let mut guard = tokio::select! {
            _ = shutdown.cancelled() => return,
            g = fd.readable_mut() => match g { Ok(g) => g, Err(_) => return },
        };
        let registry = registry.borrow().clone();
        while let Some(item) = guard.get_inner_mut().next() {
            if item.len() < std::mem::size_of::<Denial>() {
                continue;
            }
            let d: Denial = bytemuck::pod_read_unaligned(&item[..std::mem::size_of::<Denial>()]);
            log_denial(&registry, &d);
        }
        guard.clear_ready();
    }
}

fn log_denial(registry: &Registry, d: &Denial) {
    let src = Ipv6Addr::from(d.src);
    let dst = Ipv6Addr::from(d.dst);
    let name = |a: &Ipv6Addr| {
        registry
            .by_address(a)
            .map(|i| i.name.clone())
            .unwrap_or_else(|| "-".into())
    };
    // `src` is the identity acting (the socket's tag or bound address), `dst` where to.
    let identity = name(&src);
    let address = match dst.to_ipv4_mapped() {
        Some(v4) => format!("{v4}:{}", d.port),
        None => format!("[{dst}]:{}", d.port),
    };
    let (event, decision) = crate::audit::Decision::KernelDeny.record();
    tracing::warn!(
        target: crate::audit::TARGET,
        event,
        decision,
        identity,
        conn_id = d.conn_id,
        op = op_name(d.op),
        address,
        reason = reason_text(d.reason),
        "the kernel refused a {} ({}) to {address}",
        op_name(d.op),
        reason_text(d.reason)
    );
}

async fn read_logs(logger: aya_log::EbpfLogger<&'static dyn log::Log>, stop: CancellationToken) {
    // SAFETY: as above: the logger owns its ring buffer's fd for as long as the AsyncFd lives.
    let Ok(mut fd) = (unsafe { AsyncFd::register(logger) }) else {
        return;
    };
    loop {
        let mut guard = tokio::select! {
            _ = stop.cancelled() => return,
            g = fd.readable_mut() => match g { Ok(g) => g, Err(_) => return },
        };
        guard.get_inner_mut().flush();
        guard.clear_ready();
    }
}
