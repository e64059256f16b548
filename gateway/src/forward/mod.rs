//! Forwarding: reverse forwards become Mir-socks (`mirror`), direct forwards open ID-socks
//! (`direct`), and an ID-sock connecting to a Mir-sock of this gateway forms a forwarding pair,
//! matched on the Mir-sock side by its source address (`pairs`).

pub mod carried;
pub mod direct;
pub mod mirror;
pub mod pairs;
pub mod published;
