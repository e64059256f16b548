//! Builds the eBPF object (gateway-ebpf) when its toolchain is present and embeds it; otherwise the
//! gateway is built with the user-space data plane only, and says why at run time.
//!
//! CMX_EBPF=off skips the eBPF build; CMX_EBPF=require fails the build without it (CI).

use cmx_ebpf_toolchain as toolchain;
use std::path::PathBuf;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let ebpf_dir = manifest.join("../gateway-ebpf");
    for p in ["src", "common/src", "Cargo.toml", ".cargo/config.toml"] {
        println!("cargo::rerun-if-changed={}", ebpf_dir.join(p).display());
    }
    println!("cargo::rerun-if-env-changed=CMX_EBPF");
    // A toolchain installed later must be noticed: these paths are watched.
    println!("cargo::rerun-if-changed=/usr/lib/rustlib/src/rust/library/core");
    println!(
        "cargo::rerun-if-changed={}",
        toolchain::linker_install_root().join("bin/bpf-linker").display()
    );
    println!("cargo::rustc-check-cfg=cfg(cmx_ebpf)");

    let object = out.join("cmx-gateway-ebpf.o");
    let mode = std::env::var("CMX_EBPF").unwrap_or_default();
    let result = if mode == "off" {
        Err("the eBPF build was disabled (CMX_EBPF=off)".to_string())
    } else {
        toolchain::detect().and_then(|tc| toolchain::build(&tc, &ebpf_dir, &out.join("ebpf-target")))
    };
    match result {
        Ok(built) => {
            std::fs::copy(&built, &object).expect("copy the eBPF object into OUT_DIR");
            let _ = std::fs::remove_file(out.join("ebpf-build.log"));
            println!("cargo::rustc-cfg=cmx_ebpf");
            println!("cargo::rustc-env=CMX_EBPF_UNAVAILABLE=");
        }
        Err(reason) => {
            let _ = std::fs::write(out.join("ebpf-build.log"), &reason);
            if mode == "require" {
                panic!("CMX_EBPF=require, but the eBPF object cannot be built: {reason}");
            }
            println!(
                "cargo::warning=building without the eBPF data plane: {} (details: {})",
                first_line(&reason),
                out.join("ebpf-build.log").display()
            );
            std::fs::write(&object, b"").expect("write an empty eBPF object placeholder");
            println!("cargo::rustc-env=CMX_EBPF_UNAVAILABLE={}", first_line(&reason));
        }
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}
