//! Developer tasks for cmxsafe, run as `cargo xtask <task>`.
//!
//! - `demo`: a local demo with real MQTT traffic through the gateway, in network namespaces.
//! - `test`: installs what the integration tests need, checks the Kubernetes manifests, starts a
//!   real API server (envtest) when the machine has one, then runs every test of the workspace.
//! - `deps`: installs the system packages the demo and tests need (Debian/Ubuntu, as root).

mod cluster;
mod cross;
mod deps;
mod fuzz;
mod kube;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use cmx_ebpf_toolchain as toolchain;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "cmxsafe developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Run the local demo: device, gateway and server hosts in network namespaces, cmx-agent on
    /// the server host, stock OpenSSH on the device host, a mosquitto broker and MQTT messages.
    Demo {
        /// Number of MQTT messages the device publishes.
        #[arg(long, default_value_t = 5)]
        messages: u32,
    },
    /// Install test dependencies, then run `cargo test --workspace` (needs root: the tests create
    /// network namespaces). Extra arguments go to cargo test.
    Test {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Install the system packages the demo and the tests need.
    Deps,
    /// Benchmarks: every workload through every gateway (direct path, OpenSSH, cmx-gateway in both
    /// data planes, cmx-agent), interleaved runs, one table; results in benches/results/latest.
    Bench {
        /// Smoke sizes (~2 minutes): checks the harness, measures nothing meaningful.
        #[arg(long)]
        quick: bool,
        /// Interleaved measured runs per variant (a goal is met only when all of them meet it).
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// Soak: 2,000 idle sessions and 300 new forwarded connections/s through one cmx-gateway
    /// (sockmap, cmx-agent) for N minutes; prints open fds, RSS and eBPF map entries every
    /// minute and fails if they grew after the warm-up. `test` runs a one-minute smoke of it.
    Soak {
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
    },
    /// Fuzz what peers, files and operators hand cmxsafe (gateway and agent configuration, the
    /// identity registry, OpenSSH certificates, the SSH front door before authentication) with
    /// libFuzzer: builds the targets of fuzz/ with coverage instrumentation (stable toolchain),
    /// runs each for a CPU-time budget from its corpus (kept in ~/.cache/cmxsafe/fuzz), prints
    /// executions, coverage and crashes, and fails on a crash, keeping the input.
    Fuzz {
        /// CPU-seconds per target (the bar before calling a target clean: 1800).
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Only this target (repeatable): gateway_config, registry, agent_config, certificate,
        /// ssh_front_door.
        #[arg(long = "target")]
        targets: Vec<String>,
    },
    /// Build the device agent for its boards: static, size-tuned (profile agent-release)
    /// cmx-agent binaries for aarch64 (aarch64-unknown-linux-gnu) and 32-bit ARMv7
    /// (armv7-unknown-linux-gnueabihf) with Debian's rustc, std sources and cross gcc, and for
    /// x86_64; each is run once (under qemu for ARM). Into <target dir>/agent/<target>/.
    BuildAgent {
        /// aarch64, armv7 or x86_64 (repeatable; default: all three).
        #[arg(long = "target")]
        targets: Vec<String>,
    },
    /// The device agent's footprint (binary, idle memory and CPU with four tunnels, memory per
    /// connection): cmx-agent on x86_64 and its aarch64 and armv7 builds under qemu, beside
    /// autossh + OpenSSH; prints the table agent/README.md shows.
    Footprint {
        /// Seconds of idleness over which CPU is measured.
        #[arg(long, default_value_t = 60)]
        idle_secs: u64,
    },
    /// Build the eBPF programs (gateway-ebpf), installing what they need: Debian's rustc-web,
    /// rust-web-src and llvm-22-dev, and bpf-linker. The gateway's build embeds the result.
    BuildEbpf,
    /// Only the end-to-end tests on a real one-node cluster (part of `test`): bring the
    /// minicluster up, build the images from this run's release binaries, deploy the DaemonSet
    /// through deploy/overlays/e2e, run agents and Mosquitto in pods, take the cluster down.
    E2eK8s,
}

fn main() -> ExitCode {
    match run(Cli::parse().task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> anyhow::Result<()> {
    match task {
        Task::Deps => deps::ensure(deps::ALL),
        Task::Bench { quick, runs } => bench(quick, runs),
        Task::Soak { minutes } => {
            require_root("the soak creates network namespaces")?;
            deps::ensure(deps::ALL)?;
            build_ebpf()?;
            soak(&workspace_root(), minutes, 60)
        }
        Task::BuildEbpf => {
            let object = build_ebpf()?;
            println!(
                "eBPF object: {} ({} bytes)",
                object.display(),
                std::fs::metadata(&object)?.len()
            );
            Ok(())
        }
        Task::Test { args } => test(&args),
        Task::BuildAgent { targets } => {
            let names: Vec<&str> = if targets.is_empty() {
                cross::TARGETS.iter().map(|t| t.name).collect()
            } else {
                targets.iter().map(String::as_str).collect()
            };
            for name in names {
                build_agent(&workspace_root(), cross::target(name)?)?;
            }
            Ok(())
        }
        Task::Footprint { idle_secs } => {
            require_root("the footprint bench creates network namespaces")?;
            deps::ensure(deps::ALL)?;
            footprint(&workspace_root(), idle_secs)
        }
        Task::Fuzz { seconds, targets } => fuzz::run(&workspace_root(), &fuzz_cache(), seconds, &targets),
        Task::E2eK8s => {
            require_root("the cluster runs a kubelet, containerd and kube-proxy")?;
            deps::ensure(deps::ALL)?;
            build_ebpf()?;
            e2e_k8s(&workspace_root())
        }
        Task::Demo { messages } => demo(messages),
    }
}

/// A machine's tool (`minicluster`, `envtest`): where `$env` says, else beside the checkout in
/// ../shared/tools/<name> (.ci/run exports the variables when it finds the tools).
fn shared_tool(root: &Path, env: &str, name: &str) -> PathBuf {
    match std::env::var_os(env) {
        Some(p) => PathBuf::from(p),
        None => root.join("../shared/tools").join(name),
    }
}

/// `cargo build --release` of `packages`, with the eBPF object required.
fn build_release(packages: &[&str]) -> anyhow::Result<()> {
    let mut cmd = cargo();
    cmd.args(["build", "--release"]);
    for p in packages {
        cmd.args(["-p", p]);
    }
    check(cmd.env("CMX_EBPF", "require").status()?, "cargo build --release")
}

fn bench(quick: bool, runs: usize) -> anyhow::Result<()> {
    require_root("the benchmarks create network namespaces, users and cgroups")?;
    deps::ensure(deps::ALL)?;
    build_ebpf()?;
    build_release(&["cmx-gateway", "cmx-agent", "cmx-bench"])?;
    let boringtun = install_boringtun()?;
    let root = workspace_root();
    let mut cmd = Command::new(target_dir(&root).join("release/cmx-bench"));
    cmd.current_dir(&root)
        .args(["run", "--runs", &runs.to_string()])
        .env("CMX_BORINGTUN", &boringtun);
    if quick {
        cmd.args(["--quick", "--out", "target/bench-quick"]);
    }
    check(cmd.status().context("cannot run cmx-bench")?, "cmx-bench")
}

/// The agent for `t` (installing the cross toolchain when missing).
fn build_agent(root: &Path, t: &cross::Target) -> anyhow::Result<PathBuf> {
    deps::ensure(deps::EBPF)?;
    deps::ensure(deps::CROSS)?;
    let cache = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
        .join(".cache/cmxsafe/cross-target");
    cross::build(root, &cache, &target_dir(root).join("agent"), t)
}

/// cmx-bench footprint for every agent build and autossh, then the table.
fn footprint(root: &Path, idle_secs: u64) -> anyhow::Result<()> {
    build_release(&["cmx-gateway", "cmx-bench"])?;
    let bench = target_dir(root).join("release/cmx-bench");
    let out = target_dir(root).join("footprint.jsonl");
    let _ = std::fs::remove_file(&out);
    let run = |variant: &str, extra: &[&str], env: &[(&str, String)]| -> anyhow::Result<()> {
        let status = Command::new(&bench)
            .current_dir(root)
            .args([
                "footprint",
                "--variant",
                variant,
                "--idle-secs",
                &idle_secs.to_string(),
                "--out",
            ])
            .arg(&out)
            .args(extra)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .status()
            .context("cannot run cmx-bench")?;
        check(status, &format!("the footprint of {variant}"))
    };
    for t in cross::TARGETS {
        let bin = build_agent(root, t)?;
        let env = [
            ("CMX_AGENT_BIN", bin.display().to_string()),
            ("CMX_AGENT_RUNNER", cross::runner(t).join(" ")),
        ];
        let label = match t.qemu {
            Some(q) => format!("cmx-agent {} (under {q})", t.name),
            None => format!("cmx-agent {}", t.name),
        };
        run(&label, &[], &env)?;
    }
    run("autossh + OpenSSH client x86_64", &["--autossh"], &[])?;
    let status = Command::new(&bench).arg("footprint-table").arg(&out).status()?;
    check(status, "rendering the footprint table")
}

/// The agent's core scenarios with the ARM builds under qemu, against the x86-64 gateway.
fn emulated_agent_tests(root: &Path) -> anyhow::Result<()> {
    for name in ["aarch64", "armv7"] {
        let t = cross::target(name)?;
        let bin = build_agent(root, t)?;
        let status = cargo()
            .args(["test", "-p", "cmx-agent", "--test", "agent_gateway", "--"])
            .args(EMULATED_SCENARIOS)
            .env("CMX_AGENT_BIN", &bin)
            .env("CMX_AGENT_RUNNER", cross::runner(t).join(" "))
            .env("CMX_EBPF", "require")
            .status()?;
        check(
            status,
            &format!("the agent's scenarios with the {name} build under qemu"),
        )?;
    }
    Ok(())
}

/// The agent tests the ARM builds run (name filters of agent/tests/agent_gateway.rs): a
/// published service and a local tunnel carrying 1 MiB each way across a gateway restart, MQTT
/// with the device identity delivered, tunnels back after a kill -9.
const EMULATED_SCENARIOS: &[&str] = &[
    "a_mebibyte_each_way_through_two_agents_before_and_after_a_gateway_restart",
    "mqtt_through_two_agents_and_the_broker_sees_the_device_identity",
    "tunnels_come_back_after_the_gateway_is_killed_and_restarted",
];

/// `cmx-bench soak` for `minutes`, sampling every `interval_secs`.
fn soak(root: &Path, minutes: f64, interval_secs: u64) -> anyhow::Result<()> {
    build_release(&["cmx-gateway", "cmx-agent", "cmx-bench"])?;
    let status = Command::new(target_dir(root).join("release/cmx-bench"))
        .current_dir(root)
        .args(["soak", "--minutes", &minutes.to_string()])
        .args(["--interval-secs", &interval_secs.to_string()])
        .status()
        .context("cannot run cmx-bench")?;
    check(status, "the soak")
}

fn test(args: &[String]) -> anyhow::Result<()> {
    require_root("the tests create network namespaces")?;
    deps::ensure(deps::ALL)?;
    build_ebpf()?;
    let root = workspace_root();
    kube::check_manifests(&root, &target_dir(&root).join("manifests"))?;
    let envtest = kube::Envtest::up(&root)?;
    // Everything, with the sockmap data plane (the build must embed the eBPF object)...
    let mut all = cargo();
    all.args(["test", "--workspace", "--exclude", "cmx-e2e"])
        .args(args)
        .env("CMX_EBPF", "require");
    if let Some(e) = &envtest {
        e.apply(&mut all);
    }
    check(all.status()?, "cargo test")?;
    // ...and the gateway's integration tests again with the user-space data plane (not the
    // envtest ones: they need the API server, which ran for the first pass only).
    let status = cargo()
        .args(["test", "-p", "cmx-gateway"])
        .args(integration_tests_except(&root, &["controller_envtest"])?)
        .args(args)
        .env("CMX_EBPF", "require")
        .env("CMX_TEST_DATAPLANE", "userspace")
        .status()?;
    check(status, "cargo test (user-space data plane)")?;
    drop(envtest);
    // ...the device agent's ARM builds under emulation...
    emulated_agent_tests(&root)?;
    // ...a one-minute soak (release binaries, reused by the cluster images below)...
    soak(&root, 1.0, 15)?;
    // ...and the DaemonSet on a real kubelet, when the machine has one.
    e2e_k8s(&root)
}

/// The end-to-end tests on a real cluster (see `cluster`), or a warning that they were skipped.
fn e2e_k8s(root: &Path) -> anyhow::Result<()> {
    let Some(cluster) = cluster::Minicluster::up(root)? else {
        return Ok(());
    };
    build_release(&["cmx-gateway", "cmx-agent"])?;
    let target = target_dir(root);
    cluster.build_images(root, &target.join("release"), &target.join("images/context"))?;
    let status = cargo()
        .args(["test", "-p", "cmx-e2e", "--", "--test-threads=1"])
        .env("CMX_E2E_KUBECONFIG", &cluster.kubeconfig)
        .env("CMX_REQUIRE_E2E", "1")
        .status()?;
    check(status, "the end-to-end tests on the cluster")
}

fn demo(messages: u32) -> anyhow::Result<()> {
    require_root("the demo creates network namespaces")?;
    deps::ensure(deps::ALL)?;
    build_ebpf()?;
    build_release(&["cmx-gateway", "cmx-agent"])?;
    let root = workspace_root();
    let status = Command::new("bash")
        .arg(root.join("xtask/demo.sh"))
        .arg(target_dir(&root).join("release"))
        .arg(messages.to_string())
        .status()
        .context("cannot run xtask/demo.sh")?;
    check(status, "the demo")
}

/// Installs the eBPF toolchain when missing, then builds the object into target/bpf.
fn build_ebpf() -> anyhow::Result<PathBuf> {
    let tc = match toolchain::detect() {
        Ok(tc) => tc,
        Err(first) => {
            eprintln!("xtask: {first}");
            if !Path::new("/usr/lib/rustlib/src/rust/library/core").is_dir() {
                deps::ensure(deps::EBPF)?;
            }
            if toolchain::find_bpf_linker().is_none() {
                install_bpf_linker()?;
            }
            toolchain::detect().map_err(|e| anyhow::anyhow!(e))?
        }
    };
    let root = workspace_root();
    let object = toolchain::build(&tc, &root.join("gateway-ebpf"), &target_dir(&root).join("bpf"))
        .map_err(|e| anyhow::anyhow!(e))?;
    Ok(object)
}

/// bpf-linker against Debian's LLVM 22 (plain `cargo install bpf-linker` wants LLVM 23), into a
/// cache directory that a reused machine keeps.
fn install_bpf_linker() -> anyhow::Result<()> {
    let root = toolchain::linker_install_root();
    eprintln!("xtask: installing bpf-linker into {}", root.display());
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["install", "--locked", "--root"])
        .arg(&root)
        .args(["bpf-linker", "--no-default-features", "--features", "llvm-22"])
        .env("LLVM_SYS_221_PREFIX", "/usr/lib/llvm-22")
        .env("LLVM_PREFIX", "/usr/lib/llvm-22")
        .status()
        .context("cannot run cargo install")?;
    check(status, "cargo install bpf-linker")
}

/// boringtun-cli, the userspace WireGuard the benchmarks compare with (this machine's kernel has
/// no WireGuard module), installed once under ~/.cache/cmxsafe/tools.
fn install_boringtun() -> anyhow::Result<PathBuf> {
    let root = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
        .join(".cache/cmxsafe/tools");
    let bin = root.join("bin/boringtun-cli");
    if bin.exists() {
        return Ok(bin);
    }
    eprintln!("xtask: installing boringtun-cli into {}", root.display());
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["install", "--locked", "--version", "0.7.1", "--root"])
        .arg(&root)
        .arg("boringtun-cli")
        .status()
        .context("cannot run cargo install")?;
    check(status, "cargo install boringtun-cli")?;
    Ok(bin)
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

/// The workspace this xtask was invoked in. `cargo run` (the `cargo xtask` alias) sets
/// CARGO_MANIFEST_DIR at run time; that one wins over the build-time path, because a target
/// directory shared by several clones (CI on a reused machine) may hand any clone an xtask binary
/// built in another one.
fn workspace_root() -> PathBuf {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// `--test NAME` for each of the gateway's integration tests (gateway/tests/*.rs) but `except`.
fn integration_tests_except(root: &Path, except: &[&str]) -> anyhow::Result<Vec<String>> {
    let dir = root.join("gateway/tests");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        let Some(name) = path.file_stem().and_then(|n| n.to_str()) else {
            continue;
        };
        if path.extension().is_some_and(|e| e == "rs") && !except.contains(&name) {
            names.push(name.to_string());
        }
    }
    names.sort();
    Ok(names
        .into_iter()
        .flat_map(|n| ["--test".to_string(), n])
        .collect())
}

/// Where fuzzing keeps its instrumented build, corpora and crash inputs between runs.
fn fuzz_cache() -> PathBuf {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache/cmxsafe/fuzz")
}

fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}

fn check(status: std::process::ExitStatus, what: &str) -> anyhow::Result<()> {
    if status.success() {
        Ok(())
    } else {
        bail!("{what} failed ({status})")
    }
}

fn require_root(why: &str) -> anyhow::Result<()> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .context("cannot run id -u")?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        bail!("run this as root: {why} (e.g. sudo -E env \"PATH=$PATH\" cargo xtask ...)");
    }
    Ok(())
}
