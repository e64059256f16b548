//! Every seed and regression input under `fuzz/seeds/<target>/` runs through its target on
//! each `cargo test`: an input that once crashed a target stays fixed. (The plain build links
//! libFuzzer without coverage instrumentation; given files, it runs each once.)

use std::path::Path;
use std::process::Command;

fn run_seeds(target: &str, bin: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds").join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no seeds in {}", dir.display());
    let out = Command::new(bin)
        .args(&files)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {bin}: {e}"));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{target} failed on its seeds:\n{log}");
    let executed = log.lines().filter(|l| l.starts_with("Executed ")).count();
    assert_eq!(executed, files.len(), "{target} did not run every seed:\n{log}");
}

#[test]
fn gateway_config_seeds() {
    run_seeds("gateway_config", env!("CARGO_BIN_EXE_gateway_config"));
}

#[test]
fn registry_seeds() {
    run_seeds("registry", env!("CARGO_BIN_EXE_registry"));
}

#[test]
fn agent_config_seeds() {
    run_seeds("agent_config", env!("CARGO_BIN_EXE_agent_config"));
}

#[test]
fn certificate_seeds() {
    run_seeds("certificate", env!("CARGO_BIN_EXE_certificate"));
}

#[test]
fn ssh_front_door_seeds() {
    run_seeds("ssh_front_door", env!("CARGO_BIN_EXE_ssh_front_door"));
}
