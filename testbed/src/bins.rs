//! The workspace's binaries, as the running test or benchmark finds them.

use std::path::PathBuf;

/// A binary of this workspace: next to the running executable (a benchmark in
/// target/<profile>/), or one level up (a test in target/<profile>/deps/). Cargo builds every
/// member's binaries before running the tests of `cargo test --workspace`.
pub fn workspace_bin(name: &str) -> String {
    let exe = std::env::current_exe().expect("executable path");
    let candidates: Vec<PathBuf> = exe.ancestors().skip(1).take(2).map(|d| d.join(name)).collect();
    match candidates.iter().find(|p| p.is_file()) {
        Some(p) => p.display().to_string(),
        None => panic!(
            "{name} is missing next to {} (build it first: cargo build -p {name})",
            exe.display()
        ),
    }
}

pub fn gateway_bin() -> String {
    workspace_bin("cmx-gateway")
}

/// How the tests start `cmx-agent`: this workspace's build, or the one `CMX_AGENT_BIN` names
/// (an ARM build from `cargo xtask build-agent`), behind `CMX_AGENT_RUNNER` when that is set
/// (the emulator, e.g. `qemu-aarch64-static`). Program first, then its leading arguments.
pub fn agent_argv() -> Vec<String> {
    let bin = std::env::var("CMX_AGENT_BIN")
        .ok()
        .filter(|b| !b.is_empty())
        .unwrap_or_else(|| workspace_bin("cmx-agent"));
    let mut argv: Vec<String> = std::env::var("CMX_AGENT_RUNNER")
        .unwrap_or_default()
        .split_whitespace()
        .map(String::from)
        .collect();
    argv.push(bin);
    argv
}
