//! Finding and driving the toolchain that builds `gateway-ebpf` for `bpfel-unknown-none`.
//! A crate of its own so that the gateway's build.rs (a build-dependency) and `cargo xtask
//! build-ebpf` share one recipe:
//!
//! - Debian route: `rustc-web` (rustc/cargo 1.96 in /usr/bin) with `rust-web-src` (core sources in
//!   /usr/lib/rustlib/src/rust), `RUSTC_BOOTSTRAP=1` for `-Z build-std=core`;
//! - rustup route: a nightly toolchain with the `rust-src` component;
//! - either way, `bpf-linker` on PATH, in ~/.cache/cmxsafe/bpf-linker/bin or ~/.cargo/bin.

use std::path::{Path, PathBuf};
use std::process::Command;

pub const INSTALL_HINT: &str = "install the eBPF toolchain: apt-get install rustc-web cargo-web rust-web-src llvm-22-dev, \
then `cargo xtask build-ebpf` (it installs bpf-linker with the llvm-22 feature); or use rustup: \
rustup toolchain install nightly --component rust-src && cargo install bpf-linker";

pub struct Toolchain {
    pub cargo: PathBuf,
    /// Extra arguments before `build` (`+nightly` for rustup).
    pub cargo_args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub linker_dir: PathBuf,
    pub description: String,
}

pub fn home() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
}

/// Where `cargo xtask build-ebpf` installs bpf-linker (cached across CI runs on a reused machine).
pub fn linker_install_root() -> PathBuf {
    home().join(".cache/cmxsafe/bpf-linker")
}

pub fn find_bpf_linker() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.push(linker_install_root().join("bin"));
    dirs.push(home().join(".cargo/bin"));
    dirs.into_iter().find(|d| d.join("bpf-linker").is_file())
}

fn version_at_least(rustc: &Path, minor: u32) -> bool {
    let Ok(out) = Command::new(rustc).arg("--version").output() else {
        return false;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .nth(1)
        .and_then(|v| v.split('.').nth(1))
        .and_then(|m| m.parse::<u32>().ok())
        .is_some_and(|m| m >= minor)
}

/// The first usable route, or what to install.
pub fn detect() -> Result<Toolchain, String> {
    let debian_rustc = Path::new("/usr/bin/rustc");
    let debian_src = Path::new("/usr/lib/rustlib/src/rust/library/core");
    let debian = debian_rustc.is_file()
        && Path::new("/usr/bin/cargo").is_file()
        && debian_src.is_dir()
        && version_at_least(debian_rustc, 87);
    let rustup_nightly = !debian
        && Command::new("rustup")
            .args(["+nightly", "component", "list", "--installed"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("rust-src"))
            .unwrap_or(false);
    if !debian && !rustup_nightly {
        return Err(format!(
            "no Rust toolchain that can build for bpfel-unknown-none: {INSTALL_HINT}"
        ));
    }
    let Some(linker_dir) = find_bpf_linker() else {
        return Err(format!("bpf-linker not found: {INSTALL_HINT}"));
    };
    Ok(if debian {
        Toolchain {
            cargo: PathBuf::from("/usr/bin/cargo"),
            cargo_args: vec![],
            env: vec![
                ("RUSTC".into(), "/usr/bin/rustc".into()),
                ("RUSTC_BOOTSTRAP".into(), "1".into()),
            ],
            linker_dir,
            description: "Debian rustc-web + rust-web-src".into(),
        }
    } else {
        Toolchain {
            cargo: PathBuf::from("cargo"),
            cargo_args: vec!["+nightly".into()],
            env: vec![],
            linker_dir,
            description: "rustup nightly + rust-src".into(),
        }
    })
}

/// Builds the eBPF object; returns its path.
pub fn build(tc: &Toolchain, ebpf_dir: &Path, target_dir: &Path) -> Result<PathBuf, String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![tc.linker_dir.clone()];
    dirs.extend(std::env::split_paths(&path));
    let mut cmd = Command::new(&tc.cargo);
    cmd.args(&tc.cargo_args)
        .args(["build", "--release", "--target-dir"])
        .arg(target_dir)
        .current_dir(ebpf_dir)
        .env("PATH", std::env::join_paths(dirs).map_err(|e| e.to_string())?);
    // Settings of an enclosing cargo run (a build script's environment) must not leak in.
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_MAKEFLAGS",
        "RUSTDOC",
    ] {
        cmd.env_remove(var);
    }
    for (k, v) in &tc.env {
        cmd.env(k, v);
    }
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {}: {e}", tc.cargo.display()))?;
    if !out.status.success() {
        return Err(format!(
            "building gateway-ebpf with {} failed:\n{}",
            tc.description,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(target_dir.join("bpfel-unknown-none/release/cmx-gateway-ebpf"))
}
