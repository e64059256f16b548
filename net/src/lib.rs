//! cmx-net: the networking pieces that both ends of a cmxsafe SSH session need. The gateway and
//! the agent depend on this crate, never on each other, so the device agent compiles only what
//! runs on a device.
//!
//! # Layout
//! - `relay`: SSH channel <-> TCP byte moving with backpressure and half-close.
//! - `sockets`: identity sockets (bound to an identity address with `IP_FREEBIND`), listeners,
//!   socket cookies.
//! - `route`: the local route that makes an identity prefix bindable on this host.
//! - `signals`: one cancellation token fed by SIGTERM and SIGINT.
//! - `logging`: `tracing` to stderr, text or JSON lines.
//! - `mounts`: where this host mounts the cgroup v2 hierarchy.
//! - `ssh`: SSH algorithm names as configuration files spell them.
//! - `text`: line numbers for error messages about configuration files; bounded log strings.
//! - `clock`: wall-clock seconds for certificates and status files.
//! - `host`: this host's own addresses.
//! - `eui64`: MAC addresses and the identity addresses derived from them (modified EUI-64); the
//!   gateway's registry and the agent's enrolment compute them the same way.

pub mod clock;
pub mod eui64;
pub mod host;
pub mod logging;
pub mod mounts;
pub mod relay;
pub mod route;
pub mod signals;
pub mod sockets;
pub mod ssh;
pub mod text;
pub mod toml_doc;
