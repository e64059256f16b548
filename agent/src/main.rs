//! The `cmx-agent` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use cmx_agent::config::{self, Config};
use cmx_agent::session;
use cmx_agent::shared::Shared;
use cmx_agent::status::Status;
use russh::keys::HashAlg;
use tokio_util::sync::CancellationToken;

/// cmxsafe agent: keeps one SSH session to a gateway and the device's or server's tunnels through
/// it up: reconnects with jittered backoff, fails over between gateways, pins the gateway's host
/// key, and restores every tunnel after a reconnect.
#[derive(Parser)]
#[command(name = "cmx-agent", version, about, long_about = None)]
struct Cli {
    /// Log format: human-readable text, or one JSON object per line.
    #[arg(long, value_enum, default_value_t = cmx_net::logging::LogFormat::Text, global = true)]
    log_format: cmx_net::logging::LogFormat,
    /// Log filter (tracing EnvFilter syntax); RUST_LOG overrides it.
    #[arg(long, default_value = "info,russh=warn", global = true)]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent until SIGTERM or SIGINT.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate the config, connect once, and report whether each local tunnel's target is
    /// allowed (by opening and closing one connection to it). Exits non-zero on any failure.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show the running agent's session and tunnels (from its status file). Exits 1 when the
    /// agent is not connected, so it can serve as a health check.
    Status {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Generate an ed25519 key (OpenSSH format) and print the line to register at the gateway.
    Keygen {
        /// Where to write the private key; the public key goes to PATH.pub.
        #[arg(long)]
        out: PathBuf,
        /// The identity name this key is for (the key's comment and the registry snippet).
        #[arg(long)]
        identity: String,
    },
    /// Enrol this device: make its key if there is none (ed25519), name its identity after its
    /// MAC address (12 hex digits; the identity address is the MAC's modified EUI-64 in the
    /// gateway's prefix) and print what the operator adds to the gateway's registry (or, with
    /// --fleet-ca, the line the fleet CA signs with `cmx-gateway sign`) and this agent's
    /// configuration.
    Enroll {
        /// The gateway this device will use, HOST or HOST:PORT (for the printed configuration).
        #[arg(long)]
        gateway: String,
        /// The device's MAC address (a2:3f:f8:68:ec:8f, a2-3f-..., a23ff868ec8f), or a network
        /// interface whose address to use (read from /sys/class/net/IFACE/address).
        #[arg(long)]
        mac: String,
        /// The private key; generated (with KEY.pub) when it does not exist.
        #[arg(long, default_value = "/etc/cmx-agent/id_ed25519")]
        key: PathBuf,
        /// What the identity does: a device opens connections, a server publishes services.
        #[arg(long, value_enum, default_value_t = cmx_agent::enroll::Role::Device)]
        role: cmx_agent::enroll::Role,
        /// The gateway's identity prefix (its identity_prefix setting).
        #[arg(long, default_value = "fd63:6d78::/64")]
        prefix: ipnet::Ipv6Net,
        /// The fleet logs in with certificates from a CA the gateway trusts: print a signing
        /// request instead of a key entry.
        #[arg(long)]
        fleet_ca: bool,
    },
    /// Print the example configuration, with every setting documented.
    DefaultConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config } => {
            cmx_net::logging::init(cli.log_format, &cli.log_level);
            run(config)
        }
        Command::Check { config } => {
            cmx_net::logging::init(cli.log_format, "warn");
            check(config)
        }
        Command::Status { config } => status(config),
        Command::Keygen { out, identity } => keygen(out, &identity),
        Command::Enroll {
            gateway,
            mac,
            key,
            role,
            prefix,
            fleet_ca,
        } => enroll(&gateway, &mac, &key, role, prefix, fleet_ca),
        Command::DefaultConfig => {
            print!("{}", config::EXAMPLE);
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cmx-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Runtime::new().context("cannot start the async runtime")
}

fn run(path: PathBuf) -> anyhow::Result<()> {
    let config = Config::load(&path)?;
    runtime()?.block_on(async {
        let shutdown = CancellationToken::new();
        cmx_net::signals::cancel_on_signals(shutdown.clone()).context("cannot install signal handlers")?;
        cmx_agent::run(config, shutdown).await?;
        Ok(())
    })
}

fn check(path: PathBuf) -> anyhow::Result<()> {
    let config = Config::load(&path)?;
    println!("{}: ok", path.display());
    let (key, cert) = cmx_agent::agent::load_key(&config)?;
    println!(
        "key {}: {}",
        config.key.display(),
        key.public_key().fingerprint(HashAlg::Sha256)
    );
    runtime()?.block_on(async {
        let status = Arc::new(Status::new(&config.identity, &std::env::temp_dir().join("cmx-agent-check.json"), vec![]));
        let shared = Arc::new(Shared::new(config.clone(), key, cert, status));
        let mut session = None;
        for (host, port) in &config.gateways {
            match session::connect(&shared, host, *port).await {
                Ok((s, _ended)) => {
                    println!("gateway {host}:{port}: connected and authenticated as '{}'", config.identity);
                    session = Some(s);
                    break;
                }
                Err(e) => println!("gateway {host}:{port}: FAILED: {e}"),
            }
        }
        let Some(session) = session else { bail!("no gateway accepted the session") };
        let mut failed = 0;
        for t in &config.locals {
            let (host, port) = t.target_host_port();
            match session.channel_open_direct_tcpip(host.clone(), u32::from(port), "127.0.0.1", 0).await {
                Ok(ch) => {
                    let _ = ch.close().await;
                    println!("tunnel {}: {} -> {}: allowed, target reachable", t.name, t.listen, t.target);
                }
                Err(e) => {
                    failed += 1;
                    let reason = shared.failure_reason(&format!("{host}:{port}")).await.unwrap_or_else(|| e.to_string());
                    println!("tunnel {}: {} -> {}: REFUSED: {reason}", t.name, t.listen, t.target);
                }
            }
        }
        for t in &config.publishes {
            println!(
                "tunnel {}: publish port {} -> {}: not probed (requesting it would take the forward over from a running agent)",
                t.name, t.port, t.to
            );
        }
        let _ = session.disconnect(russh::Disconnect::ByApplication, "check done", "en").await;
        if failed > 0 {
            bail!("{failed} tunnel(s) refused");
        }
        Ok(())
    })
}

fn status(path: PathBuf) -> anyhow::Result<()> {
    let config = Config::load(&path)?;
    let s = Status::read(&config.status_file).with_context(|| {
        format!(
            "cannot read {} (is the agent running?)",
            config.status_file.display()
        )
    })?;
    let age = cmx_net::clock::now_unix().saturating_sub(s.since_unix);
    let gateway = s
        .gateway
        .as_deref()
        .map(|g| format!(" ({g})"))
        .unwrap_or_default();
    println!(
        "identity {}: {}{gateway} for {age}s, reconnects: {}",
        s.identity, s.state, s.reconnects
    );
    if let Some(e) = &s.last_error {
        println!("last error: {e}");
    }
    if let Some(e) = &s.last_session_end {
        println!("last session ended: {e}");
    }
    println!(
        "{:<12} {:<8} {:<36} {:<10} {:>6} {:>7} {:>12} {:>12}  DETAIL",
        "TUNNEL", "KIND", "SPEC", "STATE", "CONNS", "REFUSED", "BYTES OUT", "BYTES IN"
    );
    for t in &s.tunnels {
        println!(
            "{:<12} {:<8} {:<36} {:<10} {:>6} {:>7} {:>12} {:>12}  {}",
            t.name,
            t.kind,
            t.spec,
            t.state,
            t.connections,
            t.refused,
            t.bytes_out,
            t.bytes_in,
            t.detail.as_deref().unwrap_or("")
        );
    }
    if s.state != "connected" {
        bail!("not connected");
    }
    Ok(())
}

fn keygen(out: PathBuf, identity: &str) -> anyhow::Result<()> {
    let key = cmx_agent::enroll::generate_key(&out, identity)?;
    let public = key
        .public_key()
        .to_openssh()
        .context("cannot encode the public key")?;
    println!("private key: {}", out.display());
    println!(
        "public key:  {}",
        cmx_agent::enroll::public_key_path(&out).display()
    );
    println!("fingerprint: {}", key.public_key().fingerprint(HashAlg::Sha256));
    println!(
        "\nregister it at the gateway (identity registry):\n\n[[identity]]\nname = \"{identity}\"\nkeys = [\"{public}\"]"
    );
    Ok(())
}

fn enroll(
    gateway: &str,
    mac: &str,
    key: &std::path::Path,
    role: cmx_agent::enroll::Role,
    prefix: ipnet::Ipv6Net,
    fleet_ca: bool,
) -> anyhow::Result<()> {
    use cmx_agent::enroll;
    let mac = enroll::mac_of(mac, std::path::Path::new("/sys/class/net"))?;
    let enrolment = enroll::enroll(mac, prefix, key)?;
    let request = enroll::Request {
        role,
        gateway,
        fleet_ca,
    };
    print!("{}", enroll::render(&enrolment, &request));
    Ok(())
}
