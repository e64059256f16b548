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
