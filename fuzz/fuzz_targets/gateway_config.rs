//! The gateway's TOML configuration: whatever an operator (or a broken deploy) puts in the
//! file, `Config::parse` answers a configuration or an error naming the file, never a panic.
#![no_main]

use std::path::Path;

use cmx_gateway::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text, Path::new("gateway.toml")) {
        Ok(config) => {
            // What the gateway computes from a valid configuration before it binds anything.
            let _ = config.warnings();
            let _ = config.login_grace_time();
            let _ = config.forward_open_timeout();
            let _ = cmx_gateway::reload::registry_context(&config);
        }
        Err(e) => assert!(
            e.to_string().contains("gateway.toml"),
            "error without the file: {e}"
        ),
    }
});
