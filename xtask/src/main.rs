//! Developer tasks for cmxsafe, run as `cargo xtask <task>`.
//!
//! - `demo`: a local demo with real MQTT traffic through the gateway, in network namespaces.
//! - `test`: installs what the integration tests need, then runs every test of the workspace.
//! - `deps`: installs the system packages the demo and tests need (Debian/Ubuntu, as root).

mod deps;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

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
        Task::Test { args } => {
            require_root("the tests create network namespaces")?;
            deps::ensure(deps::ALL)?;
            let status = cargo().args(["test", "--workspace"]).args(&args).status()?;
            check(status, "cargo test")
        }
        Task::Demo { messages } => {
            require_root("the demo creates network namespaces")?;
            deps::ensure(deps::ALL)?;
            let status = cargo()
                .args(["build", "--release", "-p", "cmx-gateway", "-p", "cmx-agent"])
                .status()?;
            check(status, "cargo build")?;
            let root = workspace_root();
            let status = Command::new("bash")
                .arg(root.join("xtask/demo.sh"))
                .arg(target_dir(&root).join("release"))
                .arg(messages.to_string())
                .status()
                .context("cannot run xtask/demo.sh")?;
            check(status, "the demo")
        }
    }
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
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
