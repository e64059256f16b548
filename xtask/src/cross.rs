//! `cargo xtask build-agent`: the device agent for the boards it runs on, built on this x86-64
//! machine, and the emulator that runs it in the tests.
//!
//! The machine's rustup toolchain has only the x86-64 standard library and cannot fetch
//! others. Debian's rustc-web (the same compiler version as its rust-web-src, which the eBPF
//! build already installs) builds the standard library for the target with `-Z build-std`
//! (`RUSTC_BOOTSTRAP=1`); Debian's cross gcc links and compiles the C in aws-lc and ring. The
//! result is linked statically against glibc (`+crt-static`): one file, no loader or libc
//! version to match on the device. (musl would be the usual choice, but Debian ships no musl
//! for ARM and no musl cross compiler; glibc >= 2.34 resolves names through /etc/hosts and DNS
//! without loading NSS modules, which is all the agent asks of it.)

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// A board family the agent is built for.
pub struct Target {
    /// The name `--target` takes.
    pub name: &'static str,
    pub triple: &'static str,
    /// Prefix of Debian's cross tools (`aarch64-linux-gnu-gcc`); `None` for the host.
    gnu_prefix: Option<&'static str>,
    /// The user-mode emulator that runs it here; `None` for the host.
    pub qemu: Option<&'static str>,
}

pub const TARGETS: &[Target] = &[
    Target {
        name: "aarch64",
        triple: "aarch64-unknown-linux-gnu",
        gnu_prefix: Some("aarch64-linux-gnu"),
        qemu: Some("qemu-aarch64-static"),
    },
    Target {
        name: "armv7",
        triple: "armv7-unknown-linux-gnueabihf",
        gnu_prefix: Some("arm-linux-gnueabihf"),
        qemu: Some("qemu-arm-static"),
    },
    Target {
        name: "x86_64",
        triple: "x86_64-unknown-linux-gnu",
        gnu_prefix: None,
        qemu: None,
    },
];

pub fn target(name: &str) -> anyhow::Result<&'static Target> {
    TARGETS.iter().find(|t| t.name == name).with_context(|| {
        let known: Vec<_> = TARGETS.iter().map(|t| t.name).collect();
        format!("no agent target '{name}' (targets: {})", known.join(", "))
    })
}

/// Builds `cmx-agent` for `t` with the `agent-release` profile into `cache`; returns the
/// binary, copied to `<target dir>/agent/<name>/cmx-agent`.
pub fn build(root: &Path, cache: &Path, out_dir: &Path, t: &Target) -> anyhow::Result<PathBuf> {
    let mut cmd = match t.gnu_prefix {
        // The host: the usual toolchain has its standard library.
        None => super::cargo(),
        Some(prefix) => {
            let mut c = Command::new("/usr/bin/cargo");
            c.current_dir(root)
                .env("RUSTC", "/usr/bin/rustc")
                .env("RUSTC_BOOTSTRAP", "1")
                .env_remove("RUSTC_WRAPPER")
                .env_remove("RUSTUP_TOOLCHAIN")
                .args(["-Z", "build-std=std,panic_abort"]);
            let var = t.triple.to_uppercase().replace('-', "_");
            let under = t.triple.replace('-', "_");
            c.env(format!("CARGO_TARGET_{var}_LINKER"), format!("{prefix}-gcc"))
                .env(format!("CC_{under}"), format!("{prefix}-gcc"))
                .env(format!("AR_{under}"), format!("{prefix}-ar"));
            c
        }
    };
    let var = t.triple.to_uppercase().replace('-', "_");
    cmd.args([
        "build",
        "--profile",
        "agent-release",
        "-p",
        "cmx-agent",
        "--target",
        t.triple,
    ])
    .env("CARGO_TARGET_DIR", cache)
    // Only the target's code: build scripts and proc macros run here, dynamically linked.
    .env(
        format!("CARGO_TARGET_{var}_RUSTFLAGS"),
        "-Ctarget-feature=+crt-static",
    );
    let status = cmd.status().context("cannot run cargo for the agent")?;
    super::check(status, &format!("building cmx-agent for {}", t.triple))?;
    let built = cache.join(t.triple).join("agent-release/cmx-agent");
    let dir = out_dir.join(t.name);
    std::fs::create_dir_all(&dir)?;
    let out = dir.join("cmx-agent");
    std::fs::copy(&built, &out).with_context(|| format!("cannot copy {}", built.display()))?;
    check_runs(t, &out)?;
    Ok(out)
}

/// The command that runs a binary of `t` on this machine (the emulator for ARM).
pub fn runner(t: &Target) -> Vec<String> {
    t.qemu.map(|q| vec![q.to_string()]).unwrap_or_default()
}

/// `cmx-agent --version` through the emulator: the binary is whole and static.
fn check_runs(t: &Target, bin: &Path) -> anyhow::Result<()> {
    let mut argv = runner(t);
    argv.push(bin.display().to_string());
    let out = Command::new(&argv[0])
        .args(&argv[1..])
        .arg("--version")
        .output()
        .with_context(|| format!("cannot run {}", argv.join(" ")))?;
    if !out.status.success() {
        bail!(
            "{} --version failed: {}",
            argv.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let size = std::fs::metadata(bin)?.len();
    println!(
        "{}: {} ({} bytes, {:.1} MiB, static, stripped)",
        t.name,
        bin.display(),
        size,
        size as f64 / (1024.0 * 1024.0)
    );
    Ok(())
}
