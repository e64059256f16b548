//! The agent's TOML configuration, as a device's operator writes it: an answer or an error
//! naming the file, never a panic.
#![no_main]

use std::path::Path;

use cmx_agent::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text, Path::new("agent.toml")) {
        Ok(config) => {
            let _ = config.keepalive_interval();
            for tunnel in &config.locals {
                let (host, port) = tunnel.target_host_port();
                assert!(
                    !host.is_empty() && port != 0,
                    "validated target {:?} does not split",
                    tunnel.target
                );
            }
        }
        Err(e) => assert!(
            e.to_string().contains("agent.toml"),
            "error without the file: {e}"
        ),
    }
});
