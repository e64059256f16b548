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
    let config = SshdConfig::load(&options.sshd_config)?;
    let mut found = Findings {
        config_path: options.sshd_config.clone(),
        gaps: Vec::new(),
        notes: Vec::new(),
    };
    let groups = match &options.group_file {
        Some(p) => parse_groups(&read(p)?),
        None => BTreeMap::new(),
    };
    let blocks = per_user_blocks(&config, &mut found);
    name_untranslated_settings(&config, &blocks, &mut found);
    let keys_of = read_key_files(&options.keys, &mut found)?;
    let mut trust = read_trust(&config, &mut found)?;
    let mut addresses = AddressPool::new(&options.context);
    let mut drafts = Vec::new();
    for user in users(&keys_of, &blocks) {
        if !valid_name(&user) {
            found.gap(
                found.config_path.display().to_string(),
                format!(
                    "user '{}' is not a valid identity name (lowercase letters, digits, '-', '.'); left out",
                    cmx_net::text::bounded(&user, 64)
                ),
            );
            continue;
        }
        let effective = Effective::of(&user, &config, &blocks, &groups);
        let (listen, open) = effective.rights();
        let keys = UserKeys::read(&user, keys_of.get(&user), &mut trust, &mut found);
        let (listen, open) = keys.narrow(&user, listen, open, &mut found);
        let (place, address_note) = addresses.place(&user, options.mac_from_user);
        let draft = Draft::new(user, effective, keys, listen, open, place);
        if draft.listen.is_empty() && draft.open.is_empty() {
            found.note(format!(
                "user '{}' may not forward anything under this sshd_config; its identity permits nothing",
                draft.name
            ));
        }
        if let Some(note) = address_note {
            found.note(note);
        }
        drafts.push(draft);
    }
    name_loopback_targets(&mut drafts, &mut found);
    let registry = render(&options.sshd_config, trust, &drafts);
    Registry::parse(
        &registry,
        Path::new("<imported registry>"),
        options.context.clone(),
    )
    .map_err(|e| ImportError::Invalid(e.to_string()))?;
    Ok(Imported {
        registry,
        gaps: found.gaps,
        notes: found.notes,
    })
}

/// What the import could not carry over, and what it notes, in the order it found them.
struct Findings {
    config_path: PathBuf,
    gaps: Vec<Gap>,
    notes: Vec<String>,
}

impl Findings {
    /// `file:line` of the sshd_config.
    fn at(&self, line: usize) -> String {
        format!("{}:{line}", self.config_path.display())
    }

    fn gap(&mut self, at: String, why: String) {
        self.gaps.push(Gap { at, why });
    }

    fn note(&mut self, note: String) {
        self.notes.push(note);
    }
}

/// The `Match` blocks that select users. Blocks that depend on the connection (address, host,
/// port) cannot be decided per identity: each is a gap.
fn per_user_blocks<'a>(config: &'a SshdConfig, found: &mut Findings) -> Vec<&'a MatchBlock> {
    let mut blocks = Vec::new();
    for b in &config.blocks {
        let other: Vec<&str> = b
            .criteria
            .iter()
            .filter_map(|c| match c {
                Criterion::Other(o) => Some(o.as_str()),
                _ => None,
            })
            .collect();
        if other.is_empty() {
            blocks.push(b);
            continue;
        }
        found.gap(
            found.at(b.line),
            format!(
                "Match {} depends on the connection, not the user; its settings were not translated",
                other.join(", ")
            ),
        );
    }
    blocks
}

/// Settings that would change who may log in or forward, which the registry does not take
/// from sshd_config: each is a gap.
fn name_untranslated_settings(config: &SshdConfig, blocks: &[&MatchBlock], found: &mut Findings) {
    let in_blocks = || blocks.iter().flat_map(|b| b.settings.iter());
    for setting in config.global.iter().chain(in_blocks()) {
        let k = setting.keyword.as_str();
        if matches!(
            k,
            "authorizedprincipalsfile" | "authorizedkeyscommand" | "authorizedprincipalscommand"
        ) {
            found.gap(
                found.at(setting.line),
                format!("{k} is not translated: list the keys and principals in the registry"),
            );
        }
    }
    for setting in in_blocks() {
        let k = setting.keyword.as_str();
        if !TRANSLATED.contains(&k) && !NOTHING_TO_DO.contains(&k) && !k.starts_with("authorized") {
            found.gap(
                found.at(setting.line),
                format!("{k} in a Match block has no cmx equivalent; not translated"),
            );
        }
    }
}

/// Each user's key file and its lines; a line that does not parse is a gap.
type KeysOf = BTreeMap<String, (PathBuf, Vec<KeyLine>)>;

fn read_key_files(source: &KeySource, found: &mut Findings) -> Result<KeysOf, ImportError> {
    let mut keys_of = BTreeMap::new();
    for (user, path) in key_files(source)? {
        let (keys, errors) = authorized_keys::parse(&read(&path)?, &path);
        for e in errors {
            let (at, why) = e
                .rsplit_once(": ")
                .map(|(a, w)| (a.to_string(), w.to_string()))
                .unwrap_or((e.clone(), String::new()));
            found.gap(at, format!("key line not translated: {why}"));
        }
        keys_of.insert(user, (path, keys));
    }
    Ok(keys_of)
}

/// Who the users are: those with key files, and those a `Match User` block names literally.
fn users(keys_of: &KeysOf, blocks: &[&MatchBlock]) -> BTreeSet<String> {
    let mut users: BTreeSet<String> = keys_of.keys().cloned().collect();
    for b in blocks {
        for c in &b.criteria {
            if let Criterion::User(list) = c {
                users.extend(list.iter().filter(|u| !u.contains(['*', '?', '!'])).cloned());
            }
        }
    }
    users
}

/// The registry's trust: the CAs (`TrustedUserCAKeys`, `cert-authority` keys) and the revoked
/// keys (`RevokedKeys`, unless it is a binary KRL, which is a gap).
struct Trust {
    cert_authorities: Vec<String>,
    revoked: Vec<String>,
}

/// The non-empty, non-comment lines of a text.
fn entries(text: &str) -> impl Iterator<Item = String> + '_ {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
}

fn read_trust(config: &SshdConfig, found: &mut Findings) -> Result<Trust, ImportError> {
    let mut trust = Trust {
        cert_authorities: Vec::new(),
        revoked: Vec::new(),
    };
    if let Some(s) = config.global("trustedusercakeys") {
        for path in &s.args {
            trust.cert_authorities.extend(entries(&read(Path::new(path))?));
        }
    }
    if let Some(s) = config.global("revokedkeys") {
        for path in &s.args {
            let bytes = std::fs::read(path).map_err(|cause| ImportError::Read {
                path: path.clone(),
                cause,
            })?;
            if bytes.starts_with(b"SSHKRL") {
                found.gap(
                    found.at(s.line),
                    format!(
                        "{path} is a binary key revocation list (KRL); list the revoked keys in revoked_keys"
                    ),
                );
                continue;
            }
            trust.revoked.extend(entries(&String::from_utf8_lossy(&bytes)));
        }
    }
    Ok(trust)
}

impl<'a> Effective<'a> {
    /// `user`'s settings: the first matching block that sets a keyword wins, then the global one.
    fn of(
        user: &str,
        config: &'a SshdConfig,
        blocks: &[&'a MatchBlock],
        groups: &BTreeMap<String, BTreeSet<String>>,
    ) -> Effective<'a> {
        let member_of: Vec<&String> = groups
            .iter()
            .filter(|(_, members)| members.contains(user))
            .map(|(g, _)| g)
            .collect();
        let mut settings = BTreeMap::new();
        for b in blocks {
            let applies = b.criteria.iter().all(|c| match c {
                Criterion::User(list) => list_matches(list, user),
                Criterion::Group(list) => member_of.iter().any(|g| list_matches(list, g)),
                Criterion::All => true,
                Criterion::Other(_) => false,
            });
            if applies {
                for s in &b.settings {
                    settings.entry(s.keyword.clone()).or_insert(s);
                }
            }
        }
        for s in &config.global {
            settings.entry(s.keyword.clone()).or_insert(s);
        }
        Effective { settings }
    }

    /// (listen, open) rights as the config grants them: `AllowTcpForwarding` /
    /// `DisableForwarding` decide the directions, `PermitListen` / `PermitOpen` the rules.
    fn rights(&self) -> (Vec<String>, Vec<String>) {
        let mut directions = match self
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
        if self
            .args("disableforwarding")
            .and_then(|a| a.first())
            .is_some_and(|v| v.eq_ignore_ascii_case("yes"))
        {
            directions = Directions::Neither;
        }
        let list = |keyword: &str| -> Vec<String> {
            match self.args(keyword) {
                None => vec!["any".to_string()],
                Some(a) if a.iter().any(|v| v.eq_ignore_ascii_case("none")) => Vec::new(),
                Some(a) => a.to_vec(),
            }
        };
        let listen = if matches!(directions, Directions::Both | Directions::Remote) {
            list("permitlisten")
        } else {
            Vec::new()
        };
        let open = if matches!(directions, Directions::Both | Directions::Local) {
            list("permitopen")
        } else {
            Vec::new()
        };
        (listen, open)
    }

    /// The sshd_config lines of the settings this importer translated.
    fn origin(&self) -> String {
        self.settings
            .values()
            .filter(|s| TRANSLATED.contains(&s.keyword.as_str()))
            .map(|s| s.line.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A user's keys as the registry takes them, and what their options restrict further.
struct UserKeys {
    path: PathBuf,
    keys: Vec<String>,
    /// From `cert-authority` keys: the principals a certificate may name for this identity.
    principals: Option<Vec<String>>,
    /// Each key's `permitopen=` / `permitlisten=` (keys without one are not listed).
    opens: Vec<Vec<String>>,
    listens: Vec<Vec<String>>,
}

impl UserKeys {
    /// Keys whose options cmx cannot express are left out (a gap each), never let in more widely.
    fn read(
        user: &str,
        file: Option<&(PathBuf, Vec<KeyLine>)>,
        trust: &mut Trust,
        found: &mut Findings,
    ) -> UserKeys {
        let (path, lines) = file.cloned().unwrap_or_default();
        let mut out = UserKeys {
            path,
            keys: Vec::new(),
            principals: None,
            opens: Vec::new(),
            listens: Vec::new(),
        };
        for k in &lines {
            let place = format!("{}:{}", out.path.display(), k.line);
            if let Some(from) = &k.from {
                found.gap(place, format!("from=\"{from}\": cmx has no per-key source restriction; key left out (a certificate's source-address does this)"));
                continue;
            }
            if let Some(expiry) = &k.expiry_time {
                found.gap(place, format!("expiry-time=\"{expiry}\": cmx keys do not expire; key left out (a certificate's validity does this)"));
                continue;
            }
            if k.cert_authority {
                trust.cert_authorities.push(k.key.clone());
                let p = k.principals.clone().unwrap_or_else(|| vec![user.to_string()]);
                found.note(format!("{place}: cert-authority: cmx trusts this CA for every identity; a certificate logs in as the identity whose principals it names ({})", p.join(", ")));
                out.principals.get_or_insert_with(Vec::new).extend(p);
                continue;
            }
            if !k.may_forward() {
                found.gap(place, "this key may not forward (restrict or no-port-forwarding), which is all cmx does; key left out".into());
                continue;
            }
            if !k.permit_open.is_empty() {
                out.opens.push(k.permit_open.clone());
            }
            if !k.permit_listen.is_empty() {
                out.listens.push(k.permit_listen.clone());
            }
            out.keys.push(k.key.clone());
        }
        out
    }

    /// The config's rights narrowed to what every key allows (OpenSSH checks both); keys that
    /// disagree are a gap, since cmx rights are per identity.
    fn narrow(
        &self,
        user: &str,
        mut listen: Vec<String>,
        mut open: Vec<String>,
        found: &mut Findings,
    ) -> (Vec<String>, Vec<String>) {
        for (key_lists, rights, what) in [
            (&self.opens, &mut open, "permitopen"),
            (&self.listens, &mut listen, "permitlisten"),
        ] {
            if key_lists.is_empty() {
                continue;
            }
            if key_lists.len() != self.keys.len() || key_lists.windows(2).any(|w| w[0] != w[1]) {
                found.gap(
                    self.path.display().to_string(),
                    format!("the keys of '{user}' have different {what}= options; cmx rights are per identity: the identity gets what every key allows"),
                );
            }
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
        (listen, open)
    }
}

/// Identity addresses for users whose name is no MAC address, in order from the prefix.
struct AddressPool {
    base: u128,
    next: u128,
}

impl AddressPool {
    fn new(context: &RegistryContext) -> AddressPool {
        AddressPool {
            base: u128::from(context.prefix.network()),
            next: 0x100,
        }
    }

    /// The registry line that places `user`: its MAC when asked to and its name is one, else
    /// the next free address, with a note saying which.
    fn place(&mut self, user: &str, mac_from_user: bool) -> (String, Option<String>) {
        if mac_from_user && let Ok(mac) = user.parse::<Mac>() {
            return (format!("mac = \"{mac}\""), None);
        }
        let address = Ipv6Addr::from(self.base + self.next);
        self.next += 1;
        (
            format!("address = \"{address}\""),
            Some(format!(
                "'{user}' gets the identity address {address} (no MAC in its name; set your own in the registry)"
            )),
        )
    }
}

/// One identity as it will be written.
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

impl Draft {
    fn new(
        name: String,
        effective: Effective,
        keys: UserKeys,
        listen: Vec<String>,
        open: Vec<String>,
        place: String,
    ) -> Draft {
        let role = match (listen.is_empty(), open.is_empty()) {
            (false, false) => "both",
            (false, true) => "server",
            _ => "device",
        };
        Draft {
            role,
            keys: keys.keys,
            principals: keys.principals,
            place,
            listen,
            open,
            origin: effective.origin(),
            name,
        }
    }
}

/// Devices reached servers through the gateway's loopback (`-L x:localhost:PORT` to the port a
/// server's `-R` holds there); cmx names the server instead, when exactly one publishes it.
fn name_loopback_targets(drafts: &mut [Draft], found: &mut Findings) {
    let mut servers_on: BTreeMap<u16, Vec<String>> = BTreeMap::new();
    for d in drafts.iter().filter(|d| d.role != "device") {
        for rule in &d.listen {
            if let Some(port) = rule.rsplit(':').next().and_then(|p| p.parse::<u16>().ok()) {
                servers_on.entry(port).or_default().push(d.name.clone());
            }
        }
    }
    let config = found.config_path.display().to_string();
    for d in drafts.iter_mut() {
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
                    found.note(format!("'{}': PermitOpen {rule} is {target} (the server that publishes port {port}); its agent forwards to {target} instead of {rule}", d.name));
                    translated.push(target);
                }
                Some(servers) => found.gap(
                    config.clone(),
                    format!("'{}': PermitOpen {rule}: several servers publish port {port} ({}); not translated", d.name, servers.join(", ")),
                ),
                None => found.gap(
                    config.clone(),
                    format!("'{}': PermitOpen {rule}: no server publishes port {port}, and cmx refuses the gateway's own loopback; not translated", d.name),
                ),
            }
        }
        d.open = translated;
    }
}

/// The registry text.
fn render(config_path: &Path, mut trust: Trust, drafts: &[Draft]) -> String {
    let q = |s: &str| serde_json::to_string(s).unwrap_or_default();
    let qlist = |l: &[String]| format!("[{}]", l.iter().map(|s| q(s)).collect::<Vec<_>>().join(", "));
    let mut out = format!(
        "# Imported by `cmx-gateway import-openssh` from {}.\n",
        config_path.display()
    );
    trust.cert_authorities.sort();
    trust.cert_authorities.dedup();
    let _ = writeln!(out, "cert_authorities = {}", qlist(&trust.cert_authorities));
    let _ = writeln!(out, "revoked_keys = {}", qlist(&trust.revoked));
    for d in drafts {
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
    out
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
