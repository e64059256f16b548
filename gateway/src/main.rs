//! The `cmx-gateway` command line: parse arguments, set up logging, hand over to the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use cmx_gateway::config::{self, Config};
use cmx_gateway::identity::{Mac, Registry};
use tokio_util::sync::CancellationToken;

/// cmxsafe gateway: terminates the SSH sessions of device and server agents, checks every forward
/// against the identities' security contexts, and joins device connections to server listeners
/// through identity sockets (ID-sock) and mirror sockets (Mir-sock).
#[derive(Parser)]
#[command(name = "cmx-gateway", version, about, long_about = None)]
struct Cli {
    /// Log format: human-readable text, or one JSON object per line.
    #[arg(long, value_enum, default_value_t = cmx_net::logging::LogFormat::Text, global = true)]
    log_format: cmx_net::logging::LogFormat,
    /// Log filter (tracing EnvFilter syntax); RUST_LOG overrides it.
    #[arg(long, default_value = "info", global = true)]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum DataPlaneArg {
    Auto,
    Sockmap,
    Userspace,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway until SIGTERM or SIGINT.
    Run {
        /// Gateway configuration (TOML). Every setting has a default: see `default-config`.
        #[arg(long, short)]
        config: PathBuf,
        /// Overrides dataplane.mode: auto (sockmap if it loads, else userspace), sockmap, userspace.
        #[arg(long, value_enum)]
        dataplane: Option<DataPlaneArg>,
        /// Run the Kubernetes controller with this kubeconfig (overrides kubernetes.kubeconfig
        /// and turns kubernetes.controller on). The pod identity still comes from POD_NAME,
        /// POD_NAMESPACE, POD_UID and POD_IP.
        #[arg(long, value_name = "FILE")]
        kubeconfig: Option<PathBuf>,
        /// Tests only: skip the user-space security-context checks (the kernel's still apply).
        #[arg(long, hide = true)]
        insecure_skip_userspace_policy: bool,
    },
    /// Validate a configuration and the identity registry it names; print every problem found.
    CheckConfig {
        /// Gateway configuration (TOML).
        #[arg(value_name = "CONFIG", required_unless_present = "config_flag")]
        config: Option<PathBuf>,
        /// The same, named as `run` takes it (`check-config --config gw.toml`).
        #[arg(
            short = 'c',
            long = "config",
            value_name = "CONFIG",
            conflicts_with = "config"
        )]
        config_flag: Option<PathBuf>,
    },
    /// Print the default configuration, with every setting documented.
    DefaultConfig,
    /// Translate an OpenSSH-based CMXsafe deployment (a user per identity, Match blocks with
    /// PermitListen/PermitOpen/AllowTcpForwarding, authorized_keys with their options,
    /// TrustedUserCAKeys, RevokedKeys) into an identity registry, printed on stdout. Whatever it
    /// cannot carry over exactly is listed on stderr with file:line and why; notes say what
    /// changes for the agents. Exit status: 0 complete, 2 complete but for the listed gaps,
    /// 1 error.
    ImportOpenssh {
        /// The deployment's sshd_config.
        #[arg(long, value_name = "FILE")]
        sshd_config: PathBuf,
        /// A directory of authorized_keys files named after their users
        /// (AuthorizedKeysFile /etc/ssh/authorized_keys/%u).
        #[arg(long, value_name = "DIR", conflicts_with = "home_root")]
        authorized_keys_dir: Option<PathBuf>,
        /// A directory of home directories: ROOT/<user>/.ssh/authorized_keys.
        #[arg(long, value_name = "DIR")]
        home_root: Option<PathBuf>,
        /// /etc/group-format file for Match Group blocks.
        #[arg(long, value_name = "FILE", default_value = "/etc/group")]
        group_file: PathBuf,
        /// Users named by a MAC address (a23ff868ec8f, a2-3f-f8-68-ec-8f) get `mac =`, so their
        /// identity address derives from it as in the Kubernetes CMXsafe setup.
        #[arg(long)]
        mac_from_user: bool,
        /// Identity prefix (addresses assigned to users without a MAC come from it).
        #[arg(long, default_value = "fd63:6d78::/64")]
        prefix: ipnet::Ipv6Net,
    },
    /// Print the identity address derived from a MAC (modified EUI-64 under the prefix).
    Address {
        /// MAC address, e.g. a2:3f:f8:68:ec:8f or a23ff868ec8f.
        mac: String,
        /// Identity prefix.
        #[arg(long, default_value = "fd63:6d78::/64")]
        prefix: ipnet::Ipv6Net,
    },
    /// Issue an OpenSSH user certificate for an enrolled identity (`cmx-agent enroll
    /// --fleet-ca` prints the request): signed by the fleet CA the registry's
    /// cert_authorities trust, the identity as key id and principal, permit-port-forwarding
    /// only, valid from 5 minutes ago (clock skew) for --validity. Writes KEY-cert.pub beside
    /// the key, as ssh-keygen does.
    Sign {
        /// The CA's private key (OpenSSH format, not encrypted).
        #[arg(long)]
        ca: PathBuf,
        /// The identity the certificate is for (its name in the registry).
        #[arg(long)]
        identity: String,
        /// How long it is valid: a number and s, m, h, d or w (at most 5 years).
        #[arg(long, default_value = "30d")]
        validity: String,
        /// Another principal to include (repeatable), when the identity has more than its name.
        #[arg(long = "principal")]
        principals: Vec<String>,
        /// Where to write the certificate (default: KEY-cert.pub, KEY without .pub).
        #[arg(long)]
        out: Option<PathBuf>,
        /// The device's public key (one OpenSSH line).
        key: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run {
            config,
            dataplane,
            kubeconfig,
            insecure_skip_userspace_policy,
        } => {
            // The audit lines are also kept in memory for the admin API (`/api/v1/audit`).
            cmx_net::logging::init_with(
                cli.log_format,
                &cli.log_level,
                Some(cmx_gateway::audit_log::layer()),
            );
            run(config, dataplane, kubeconfig, insecure_skip_userspace_policy)
        }
        Command::CheckConfig { config, config_flag } => match config.or(config_flag) {
            Some(config) => check_config(config),
            // clap requires one of the two; this only keeps the type honest.
            None => Err(anyhow::anyhow!("check-config needs a configuration file")),
        },
        Command::DefaultConfig => {
            print!("{}", config::EXAMPLE);
            Ok(())
        }
        Command::Address { mac, prefix } => address(&mac, prefix),
        Command::ImportOpenssh {
            sshd_config,
            authorized_keys_dir,
            home_root,
            group_file,
            mac_from_user,
            prefix,
        } => {
            let keys = match (authorized_keys_dir, home_root) {
                (Some(d), _) => cmx_gateway::import::KeySource::Dir(d),
                (None, Some(h)) => cmx_gateway::import::KeySource::HomeRoot(h),
                (None, None) => cmx_gateway::import::KeySource::None,
            };
            let options = cmx_gateway::import::ImportOptions {
                sshd_config,
                keys,
                group_file: group_file.exists().then_some(group_file),
                mac_from_user,
                context: cmx_gateway::identity::RegistryContext {
                    prefix,
                    service_prefix: "dynamic-service-".into(),
                },
            };
            return match import_openssh(&options) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(2),
                Err(e) => {
                    eprintln!("cmx-gateway: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
        Command::Sign {
            ca,
            identity,
            validity,
            principals,
            out,
            key,
        } => sign(&ca, &identity, &validity, &principals, out, &key),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cmx-gateway: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(
    path: PathBuf,
    dataplane: Option<DataPlaneArg>,
    kubeconfig: Option<PathBuf>,
    skip_policy: bool,
) -> anyhow::Result<()> {
    let mut config = Config::load(&path)?;
    if let Some(kubeconfig) = kubeconfig {
        config.kubernetes.kubeconfig = kubeconfig;
        config.kubernetes.controller = config::ControllerMode::On;
    }
    if let Some(mode) = dataplane {
        config.dataplane.mode = match mode {
            DataPlaneArg::Auto => config::DataPlaneMode::Auto,
            DataPlaneArg::Sockmap => config::DataPlaneMode::Sockmap,
            DataPlaneArg::Userspace => config::DataPlaneMode::Userspace,
        };
    }
    config.insecure_skip_userspace_policy = skip_policy;
    let runtime = tokio::runtime::Runtime::new().context("cannot start the async runtime")?;
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        cmx_net::signals::cancel_on_signals(shutdown.clone()).context("cannot install signal handlers")?;
        cmx_gateway::run(config, shutdown).await?;
        Ok(())
    })
}

fn check_config(path: PathBuf) -> anyhow::Result<()> {
    let config = Config::load(&path)?;
    let registry = Registry::load(&config.identities, cmx_gateway::reload::registry_context(&config))?;
    if !config.admin.api_token_file.as_os_str().is_empty() {
        cmx_gateway::api::read_token(&config.admin.api_token_file)?;
    }
    println!("{}: ok", path.display());
    for warning in config.warnings() {
        eprintln!("warning: {}: {warning}", path.display());
    }
    println!(
        "{}: ok, {} identities",
        config.identities.display(),
        registry.len()
    );
    for id in registry.iter() {
        println!("  {:<24} {:<6} {}", id.name, id.role.as_str(), id.address);
    }
    for warning in registry.warnings() {
        eprintln!("warning: {}: {warning}", config.identities.display());
    }
    Ok(())
}

/// Prints the registry; says on stderr what it could not translate. `Ok(true)`: complete.
fn import_openssh(options: &cmx_gateway::import::ImportOptions) -> anyhow::Result<bool> {
    let imported = cmx_gateway::import::import(options)?;
    print!("{}", imported.registry);
    for note in &imported.notes {
        eprintln!("note: {note}");
    }
    for gap in &imported.gaps {
        eprintln!("not translated: {}: {}", gap.at, gap.why);
    }
    if !imported.gaps.is_empty() {
        eprintln!(
            "cmx-gateway: {} setting(s) not translated exactly (listed above); review them before using this registry",
            imported.gaps.len()
        );
    }
    Ok(imported.gaps.is_empty())
}

fn address(mac: &str, prefix: ipnet::Ipv6Net) -> anyhow::Result<()> {
    let mac: Mac = mac.parse()?;
    anyhow::ensure!(prefix.prefix_len() <= 64, "prefix {prefix} is longer than /64");
    println!("{}", mac.identity_address(prefix));
    Ok(())
}

fn sign(
    ca_path: &std::path::Path,
    identity: &str,
    validity: &str,
    principals: &[String],
    out: Option<PathBuf>,
    key_path: &std::path::Path,
) -> anyhow::Result<()> {
    use cmx_gateway::sign;
    let validity = sign::parse_validity(validity)?;
    let ca_text =
        std::fs::read_to_string(ca_path).with_context(|| format!("cannot read {}", ca_path.display()))?;
    let ca = russh::keys::PrivateKey::from_openssh(&ca_text)
        .with_context(|| format!("{}: not an OpenSSH private key", ca_path.display()))?;
    let key_text =
        std::fs::read_to_string(key_path).with_context(|| format!("cannot read {}", key_path.display()))?;
    let key = russh::keys::PublicKey::from_openssh(key_text.trim())
        .with_context(|| format!("{}: not an OpenSSH public key line", key_path.display()))?;
    let request = sign::CertificateRequest {
        key: &key,
        identity,
        extra_principals: principals,
        validity,
        now: cmx_net::clock::now_unix(),
        serial: rand::random(),
    };
    let cert = sign::user_certificate(&ca, &request)?;
    let out = out.unwrap_or_else(|| {
        let text = key_path.display().to_string();
        PathBuf::from(format!("{}-cert.pub", text.strip_suffix(".pub").unwrap_or(&text)))
    });
    let encoded = cert.to_openssh().context("cannot encode the certificate")?;
    std::fs::write(&out, format!("{encoded}\n"))
        .with_context(|| format!("cannot write {}", out.display()))?;
    println!(
        "{}: certificate for identity '{identity}' (serial {}, principals [{}]) valid {} to {}, signed by {}",
        out.display(),
        cert.serial(),
        cert.valid_principals().join(", "),
        cmx_net::clock::utc(cert.valid_after()),
        cmx_net::clock::utc(cert.valid_before()),
        ca.public_key().fingerprint(russh::keys::HashAlg::Sha256)
    );
    Ok(())
}
