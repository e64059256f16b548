//! System packages: the one list of what the demo and the tests install (Debian/Ubuntu).

use std::process::Command;

use anyhow::{Context, bail};

/// Package -> why it is needed.
pub const ALL: &[(&str, &str)] = &[
    ("openssh-client", "ssh and ssh-keygen: stock OpenSSH agents"),
    (
        "openssh-server",
        "sshd: the OpenSSH-based CMXsafe gateway the agent must interoperate with",
    ),
    (
        "iproute2",
        "ip: network namespaces, veth links, the identity prefix route",
    ),
    ("mosquitto", "the MQTT broker on the server host"),
    ("mosquitto-clients", "mosquitto_pub and mosquitto_sub"),
    ("procps", "ps and pkill, for cleanup"),
    (
        "bpftool",
        "the eBPF object's BTF and the loaded programs, inspected by tests",
    ),
    ("util-linux", "nsenter and setpriv, used by tests"),
    (
        "autossh",
        "the agent footprint bench's alternative (autossh + OpenSSH client)",
    ),
    (
        "chromium",
        "the real browser the dashboard test drives (headless)",
    ),
    (
        "chromium-driver",
        "chromedriver: WebDriver for that browser, driven from the Rust test",
    ),
    (
        "python3-paramiko",
        "a hand-built SSH client for the attacks russh's client cannot send (WINDOW_ADJUST floods)",
    ),
    (
        "stunnel4",
        "the benchmarks' TLS alternative (mutual TLS 1.3 through a re-encrypting relay)",
    ),
    (
        "wireguard-tools",
        "wg: configures the benchmarks' WireGuard alternative (boringtun)",
    ),
    ("openssl", "the benchmarks' TLS certificates"),
];

/// The eBPF toolchain (Debian route; see the cmx-ebpf-toolchain crate, gateway-ebpf/toolchain).
pub const EBPF: &[(&str, &str)] = &[
    ("rustc-web", "rustc/cargo 1.96 for the eBPF crate"),
    ("cargo-web", "its cargo"),
    ("rust-web-src", "core's sources, for -Z build-std=core"),
    ("llvm-22-dev", "LLVM 22, which bpf-linker links against"),
];

/// Cross builds of the device agent and running them under emulation (`build-agent`), beside
/// EBPF's Debian rustc and std sources (the machine's rustup has no other targets).
pub const CROSS: &[(&str, &str)] = &[
    (
        "gcc-aarch64-linux-gnu",
        "linker and C compiler (aws-lc, ring) for aarch64",
    ),
    (
        "libc6-dev-arm64-cross",
        "glibc for aarch64, static archives included",
    ),
    (
        "gcc-arm-linux-gnueabihf",
        "linker and C compiler for 32-bit ARMv7 (hard float)",
    ),
    ("libc6-dev-armhf-cross", "glibc for ARMv7"),
    (
        "qemu-user-static",
        "qemu-aarch64-static and qemu-arm-static: the ARM agents run in the tests",
    ),
];

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

/// Installs whatever is missing with apt-get, or says exactly what to install.
pub fn ensure(packages: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| !installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if Command::new("apt-get").arg("--version").output().is_err() {
        let why: Vec<String> = packages
            .iter()
            .filter(|(p, _)| missing.contains(p))
            .map(|(p, w)| format!("  {p}: {w}"))
            .collect();
        bail!(
            "missing packages and no apt-get to install them; install:\n{}",
            why.join("\n")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    let update = Command::new("apt-get")
        .args(["update", "-qq"])
        .status()
        .context("apt-get update")?;
    if !update.success() {
        bail!("apt-get update failed");
    }
    let status = Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("apt-get install")?;
    if !status.success() {
        bail!("apt-get install {} failed", missing.join(" "));
    }
    Ok(())
}
