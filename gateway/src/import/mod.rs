//! `cmx-gateway import-openssh`: translates an OpenSSH-based CMXsafe deployment (a Linux user per
//! identity, `Match User`/`Match Group` blocks with `PermitListen`/`PermitOpen`/
//! `AllowTcpForwarding`, `authorized_keys` files with their options, `TrustedUserCAKeys`,
//! `RevokedKeys`) into an identity registry.
//!
//! The translation is exact or it says why not: every setting it cannot carry over exactly is a
//! `Gap` naming the file, the line and the reason, and the command's exit status says whether
//! there were any. Where cmx is stricter by design (it never runs commands or gives a TTY) the
//! OpenSSH setting needs no translation. Where cmx cannot express a restriction (a key's `from=`
//! or `expiry-time=`), the key is left out rather than let in more widely: the operator decides.

pub mod authorized_keys;
pub mod sshd_config;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};

use crate::identity::{Mac, Registry, RegistryContext, valid_name};
use authorized_keys::KeyLine;
use sshd_config::{Criterion, MatchBlock, Setting, SshdConfig, list_matches};

/// Where the users' `authorized_keys` files are.
#[derive(Clone, Debug)]
pub enum KeySource {
    /// `DIR/<user>` (as `AuthorizedKeysFile /etc/ssh/authorized_keys/%u`).
    Dir(PathBuf),
    /// `ROOT/<user>/.ssh/authorized_keys`.
    HomeRoot(PathBuf),
    None,
}

#[derive(Clone, Debug)]
pub struct ImportOptions {
    pub sshd_config: PathBuf,
    pub keys: KeySource,
    /// `/etc/group`-format file for `Match Group`.
    pub group_file: Option<PathBuf>,
    /// Users named by a MAC address get `mac =` (their address derives from it).
    pub mac_from_user: bool,
    pub context: RegistryContext,
}

/// Something the registry does not say exactly as OpenSSH did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gap {
    /// `file:line`.
    pub at: String,
    pub why: String,
}

/// The result: the registry text, what it could not carry over, and notes (what changed for
/// the agents, addresses it chose).
#[derive(Debug)]
pub struct Imported {
    pub registry: String,
    pub gaps: Vec<Gap>,
    pub notes: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error(transparent)]
    Config(#[from] sshd_config::SshdConfigError),
    #[error("{path}: cannot read it: {cause}")]
    Read { path: String, cause: std::io::Error },
    #[error("the imported registry does not load (a bug in the importer; please report it):\n{0}")]
    Invalid(String),
}

fn read(path: &Path) -> Result<String, ImportError> {
    std::fs::read_to_string(path).map_err(|cause| ImportError::Read {
        path: path.display().to_string(),
        cause,
    })
}

/// What `AllowTcpForwarding` allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Directions {
    Both,
    Local,
    Remote,
    Neither,
}

/// One user's effective forwarding settings (sshd's order: the first matching `Match` block
/// that sets a keyword wins over the global value).
struct Effective<'a> {
    settings: BTreeMap<String, &'a Setting>,
}

impl<'a> Effective<'a> {
    fn args(&self, keyword: &str) -> Option<&'a [String]> {
        self.settings.get(keyword).map(|s| s.args.as_slice())
    }
}

/// Keywords a `Match` block may hold that need nothing from cmx: it never runs commands, gives
/// no TTY, no X11 or agent forwarding, and authenticates with keys and certificates only.
const NOTHING_TO_DO: &[&str] = &[
    "forcecommand",
    "permittty",
    "x11forwarding",
    "allowagentforwarding",
    "passwordauthentication",
    "kbdinteractiveauthentication",
    "challengeresponseauthentication",
    "pubkeyauthentication",
    "banner",
    "printmotd",
    "clientaliveinterval",
    "clientalivecountmax",
    "maxsessions",
    "gatewayports",
    "permittunnel",
    "allowstreamlocalforwarding",
    "chrootdirectory",
    "authorizedkeysfile",
    "permitrootlogin",
];

/// The keywords this importer translates.
const TRANSLATED: &[&str] = &[
    "allowtcpforwarding",
    "disableforwarding",
    "permitopen",
    "permitlisten",
];

pub fn import(options: &ImportOptions) -> Result<Imported, ImportError> {
    let config_path = &options.sshd_config;
    let config = SshdConfig::load(config_path)?;
    let at = |line: usize| format!("{}:{line}", config_path.display());
    let mut gaps = Vec::new();
    let mut notes = Vec::new();
    let groups = match &options.group_file {
        Some(p) => parse_groups(&read(p)?),
        None => BTreeMap::new(),
    };

    // Blocks that depend on the connection (address, host, port) cannot be decided per identity.
    let blocks: Vec<&MatchBlock> = config
        .blocks
        .iter()
        .filter(|b| {
            let other: Vec<&str> = b
                .criteria
                .iter()
                .filter_map(|c| match c {
                    Criterion::Other(o) => Some(o.as_str()),
                    _ => None,
                })
                .collect();
            if other.is_empty() {
                return true;
            }
            gaps.push(Gap {
                at: at(b.line),
                why: format!(
                    "Match {} depends on the connection, not the user; its settings were not translated",
                    other.join(", ")
                ),
            });
            false
        })
        .collect();
    for setting in config
        .global
        .iter()
        .chain(blocks.iter().flat_map(|b| b.settings.iter()))
    {
        let k = setting.keyword.as_str();
        if matches!(
            k,
            "authorizedprincipalsfile" | "authorizedkeyscommand" | "authorizedprincipalscommand"
        ) {
            gaps.push(Gap {
                at: at(setting.line),
                why: format!("{k} is not translated: list the keys and principals in the registry"),
            });
        }
    }
    for setting in blocks.iter().flat_map(|b| b.settings.iter()) {
        let k = setting.keyword.as_str();
        if !TRANSLATED.contains(&k) && !NOTHING_TO_DO.contains(&k) && !k.starts_with("authorized") {
            gaps.push(Gap {
                at: at(setting.line),
                why: format!("{k} in a Match block has no cmx equivalent; not translated"),
            });
        }
    }

    // Who the users are: those with key files, and those a Match User block names literally.
    let mut keys_of: BTreeMap<String, (PathBuf, Vec<KeyLine>)> = BTreeMap::new();
    for (user, path) in key_files(&options.keys)? {
        let (keys, errors) = authorized_keys::parse(&read(&path)?, &path);
        for e in errors {
            let (at, why) = e
                .rsplit_once(": ")
                .map(|(a, w)| (a.to_string(), w.to_string()))
                .unwrap_or((e.clone(), String::new()));
            gaps.push(Gap {
                at,
                why: format!("key line not translated: {why}"),
            });
        }
        keys_of.insert(user, (path, keys));
    }
    let mut users: BTreeSet<String> = keys_of.keys().cloned().collect();
    for b in &blocks {
        for c in &b.criteria {
            if let Criterion::User(list) = c {
                users.extend(list.iter().filter(|u| !u.contains(['*', '?', '!'])).cloned());
            }
        }
    }

    let mut cert_authorities: Vec<String> = Vec::new();
    let mut revoked: Vec<String> = Vec::new();
    if let Some(s) = config.global("trustedusercakeys") {
        for path in &s.args {
            for line in read(Path::new(path))?
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
            {
                cert_authorities.push(line.to_string());
            }
        }
    }
    if let Some(s) = config.global("revokedkeys") {
        for path in &s.args {
            let bytes = std::fs::read(path).map_err(|cause| ImportError::Read {
                path: path.clone(),
                cause,
            })?;
            if bytes.starts_with(b"SSHKRL") {
                gaps.push(Gap {
                    at: at(s.line),
                    why: format!(
                        "{path} is a binary key revocation list (KRL); list the revoked keys in revoked_keys"
                    ),
                });
                continue;
            }
            let text = String::from_utf8_lossy(&bytes);
            revoked.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(String::from),
            );
        }
    }

    // Each user's identity.
    struct Draft {
        name: String,
        role: &'static str,
        keys: Vec<String>,
        principals: Option<Vec<String>>,
        place: String,
        listen: Vec<String>,
        open: Vec<String>,
        origin: String,
    }
    let mut drafts: Vec<Draft> = Vec::new();
    let mut next_address: u128 = 0x100;
    for user in &users {
        if !valid_name(user) {
            gaps.push(Gap {
                at: config_path.display().to_string(),
                why: format!(
                    "user '{}' is not a valid identity name (lowercase letters, digits, '-', '.'); left out",
                    cmx_net::text::bounded(user, 64)
                ),
            });
            continue;
        }
        let member_of: Vec<&String> = groups
            .iter()
            .filter(|(_, members)| members.contains(user))
            .map(|(g, _)| g)
            .collect();
        let mut effective = Effective {
            settings: BTreeMap::new(),
        };
        for b in &blocks {
            let applies = b.criteria.iter().all(|c| match c {
                Criterion::User(list) => list_matches(list, user),
                Criterion::Group(list) => member_of.iter().any(|g| list_matches(list, g)),
                Criterion::All => true,
                Criterion::Other(_) => false,
            });
            if applies {
                for s in &b.settings {
                    effective.settings.entry(s.keyword.clone()).or_insert(s);
                }
            }
        }
        for s in &config.global {
            effective.settings.entry(s.keyword.clone()).or_insert(s);
        }
        let mut directions = match effective
            .args("allowtcpforwarding")
            .and_then(|a| a.first())
            .map(|v| v.to_ascii_lowercase())
            .as_deref()
        {
            None | Some("yes") | Some("all") => Directions::Both,
            Some("local") => Directions::Local,
            Some("remote") => Directions::Remote,
            _ => Directions::Neither,
        };
        if effective
            .args("disableforwarding")
            .and_then(|a| a.first())
            .is_some_and(|v| v.eq_ignore_ascii_case("yes"))
        {
            directions = Directions::Neither;
        }
        let list = |keyword: &str| -> Vec<String> {
            match effective.args(keyword) {
                None => vec!["any".to_string()],
                Some(a) if a.iter().any(|v| v.eq_ignore_ascii_case("none")) => Vec::new(),
                Some(a) => a.to_vec(),
            }
        };
        let mut listen = if matches!(directions, Directions::Both | Directions::Remote) {
            list("permitlisten")
        } else {
            Vec::new()
        };
        let mut open = if matches!(directions, Directions::Both | Directions::Local) {
            list("permitopen")
        } else {
            Vec::new()
        };

        // Keys, and what their options restrict further.
        let (key_path, lines) = keys_of.get(user).cloned().unwrap_or_default();
        let mut keys = Vec::new();
        let mut principals = None;
        let mut key_opens: Vec<Vec<String>> = Vec::new();
        let mut key_listens: Vec<Vec<String>> = Vec::new();
        for k in &lines {
            let place = format!("{}:{}", key_path.display(), k.line);
            if let Some(from) = &k.from {
                gaps.push(Gap { at: place, why: format!("from=\"{from}\": cmx has no per-key source restriction; key left out (a certificate's source-address does this)") });
                continue;
            }
            if let Some(expiry) = &k.expiry_time {
                gaps.push(Gap { at: place, why: format!("expiry-time=\"{expiry}\": cmx keys do not expire; key left out (a certificate's validity does this)") });
                continue;
            }
            if k.cert_authority {
                cert_authorities.push(k.key.clone());
                let p = k.principals.clone().unwrap_or_else(|| vec![user.clone()]);
                notes.push(format!("{place}: cert-authority: cmx trusts this CA for every identity; a certificate logs in as the identity whose principals it names ({})", p.join(", ")));
                principals.get_or_insert_with(Vec::new).extend(p);
                continue;
            }
            if !k.may_forward() {
                gaps.push(Gap { at: place, why: "this key may not forward (restrict or no-port-forwarding), which is all cmx does; key left out".into() });
                continue;
            }
            if !k.permit_open.is_empty() {
                key_opens.push(k.permit_open.clone());
            }
            if !k.permit_listen.is_empty() {
                key_listens.push(k.permit_listen.clone());
            }
            keys.push(k.key.clone());
        }
        for (key_lists, rights, what) in [
            (&key_opens, &mut open, "permitopen"),
            (&key_listens, &mut listen, "permitlisten"),
        ] {
            if key_lists.is_empty() {
                continue;
            }
            if key_lists.len() != keys.len() || key_lists.windows(2).any(|w| w[0] != w[1]) {
                gaps.push(Gap {
                    at: key_path.display().to_string(),
                    why: format!("the keys of '{user}' have different {what}= options; cmx rights are per identity: the identity gets what every key allows"),
                });
            }
            // Rights in both the config and every key (OpenSSH checks both).
            let allowed_by_keys: Vec<&String> = key_lists[0]
                .iter()
                .filter(|r| key_lists.iter().all(|l| l.contains(r)))
                .collect();
            let from_config = std::mem::take(rights);
            *rights = if from_config == ["any"] {
                allowed_by_keys.into_iter().cloned().collect()
            } else {
                from_config
                    .into_iter()
                    .filter(|r| allowed_by_keys.contains(&r))
                    .collect()
            };
        }
        let role = match (listen.is_empty(), open.is_empty()) {
            (false, false) => "both",
            (false, true) => "server",
            _ => "device",
        };
        if listen.is_empty() && open.is_empty() {
            notes.push(format!(
                "user '{user}' may not forward anything under this sshd_config; its identity permits nothing"
            ));
        }
        let place = match (options.mac_from_user, user.parse::<Mac>()) {
            (true, Ok(mac)) => format!("mac = \"{mac}\""),
            _ => {
                let base = u128::from(options.context.prefix.network());
                let address = Ipv6Addr::from(base + next_address);
                next_address += 1;
                notes.push(format!("'{user}' gets the identity address {address} (no MAC in its name; set your own in the registry)"));
                format!("address = \"{address}\"")
            }
        };
        let origin = effective
            .settings
            .values()
            .filter(|s| TRANSLATED.contains(&s.keyword.as_str()))
            .map(|s| s.line.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        drafts.push(Draft {
            name: user.clone(),
            role,
            keys,
            principals,
            place,
            listen,
            open,
            origin,
        });
    }

    // Devices reached servers through the gateway's loopback (`-L x:localhost:PORT` to the port
    // a server's `-R` holds there); cmx names the server instead.
    let servers_on: BTreeMap<u16, Vec<String>> =
        drafts
            .iter()
            .filter(|d| d.role != "device")
            .fold(BTreeMap::new(), |mut m, d| {
                for rule in &d.listen {
                    if let Some(port) = rule.rsplit(':').next().and_then(|p| p.parse::<u16>().ok()) {
                        m.entry(port).or_insert_with(Vec::new).push(d.name.clone());
                    }
                }
                m
            });
    for d in &mut drafts {
        let mut translated = Vec::new();
        for rule in std::mem::take(&mut d.open) {
            let (host, port) = rule.rsplit_once(':').unwrap_or((&rule, ""));
            let loopback = matches!(host, "localhost" | "127.0.0.1" | "[::1]" | "::1");
            if !loopback {
                translated.push(rule);
                continue;
            }
            match port.parse::<u16>().ok().and_then(|p| servers_on.get(&p)) {
                Some(servers) if servers.len() == 1 => {
                    let target = format!("{}:{port}", servers[0]);
                    notes.push(format!("'{}': PermitOpen {rule} is {target} (the server that publishes port {port}); its agent forwards to {target} instead of {rule}", d.name));
                    translated.push(target);
                }
                Some(servers) => gaps.push(Gap {
                    at: config_path.display().to_string(),
                    why: format!("'{}': PermitOpen {rule}: several servers publish port {port} ({}); not translated", d.name, servers.join(", ")),
                }),
                None => gaps.push(Gap {
                    at: config_path.display().to_string(),
                    why: format!("'{}': PermitOpen {rule}: no server publishes port {port}, and cmx refuses the gateway's own loopback; not translated", d.name),
                }),
            }
        }
        d.open = translated;
    }

    let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let qlist = |l: &[String]| format!("[{}]", l.iter().map(|s| q(s)).collect::<Vec<_>>().join(", "));
    let mut out = format!(
        "# Imported by `cmx-gateway import-openssh` from {}.\n",
        config_path.display()
    );
    cert_authorities.sort();
    cert_authorities.dedup();
    let _ = writeln!(out, "cert_authorities = {}", qlist(&cert_authorities));
    let _ = writeln!(out, "revoked_keys = {}", qlist(&revoked));
    for d in &drafts {
        let _ = write!(out, "\n[[identity]]\n");
        if !d.origin.is_empty() {
            let _ = writeln!(out, "# sshd_config lines {}", d.origin);
        }
        let _ = writeln!(out, "name = {}", q(&d.name));
        let _ = writeln!(out, "role = \"{}\"", d.role);
        let _ = writeln!(out, "keys = {}", qlist(&d.keys));
        let _ = writeln!(out, "{}", d.place);
        if let Some(p) = &d.principals {
            let mut p = p.clone();
            p.sort();
            p.dedup();
            let _ = writeln!(out, "principals = {}", qlist(&p));
        }
        if d.role != "device" {
            let _ = writeln!(out, "permit_listen = {}", qlist(&d.listen));
        }
        if d.role != "server" {
            let _ = writeln!(out, "permit_open = {}", qlist(&d.open));
        }
    }
    Registry::parse(&out, Path::new("<imported registry>"), options.context.clone())
        .map_err(|e| ImportError::Invalid(e.to_string()))?;
    Ok(Imported {
        registry: out,
        gaps,
        notes,
    })
}

/// `/etc/group` lines: group -> members.
fn parse_groups(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?.trim();
            let members = f.nth(2)?;
            Some((
                name.to_string(),
                members
                    .split(',')
                    .map(|m| m.trim().to_string())
                    .filter(|m| !m.is_empty())
                    .collect(),
            ))
        })
        .collect()
}

/// (user, file) for every key file the source holds, by user name.
fn key_files(source: &KeySource) -> Result<Vec<(String, PathBuf)>, ImportError> {
    let (dir, per_user): (&Path, fn(&Path) -> PathBuf) = match source {
        KeySource::None => return Ok(Vec::new()),
        KeySource::Dir(d) => (d, |p| p.to_path_buf()),
        KeySource::HomeRoot(d) => (d, |p| p.join(".ssh/authorized_keys")),
    };
    let entries = std::fs::read_dir(dir).map_err(|cause| ImportError::Read {
        path: dir.display().to_string(),
        cause,
    })?;
    let mut out: Vec<(String, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let user = e.file_name().to_str()?.to_string();
            let file = per_user(&e.path());
            file.is_file().then_some((user, file))
        })
        .collect();
    out.sort();
    Ok(out)
}
