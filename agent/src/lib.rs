//! cmx-agent: keeps a device's or server's tunnels to a cmxsafe gateway up.
//!
//! # Layout
//! - `config`: the agent's TOML configuration and its validation.
//! - `agent`: the supervisor (listeners, reconnect loop, failover, shutdown).
//! - `session`: one SSH session: connect, host key trust (`trust`), authentication, and the
//!   channels the gateway opens towards us; `heard` keeps what the gateway says before its
//!   version line (why it refused a connection).
//! - `tunnels`: local (`-L`-like) and publish (`-R`-like) tunnels.
//! - `forwarded`: connections the gateway forwards to a published tunnel's local service.
//! - `shared`: what every session of the agent shares (config, key, status, refusal texts).
//! - `status`: the operator's view, written to a JSON file for `cmx-agent status`.
//! - `backoff`: jittered exponential backoff.
//! - `enroll`: a new device's key, identity and the registry entry its operator adds.
//!
//! The byte relay, socket helpers, local route and logging come from `cmx-net`, shared with the
//! gateway; the agent does not depend on the gateway.

pub mod agent;
pub mod backoff;
pub mod config;
pub mod enroll;
pub mod forwarded;
pub mod heard;
pub mod session;
pub mod shared;
pub mod status;
pub mod trust;
pub mod tunnels;

pub use agent::run;
