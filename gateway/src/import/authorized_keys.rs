//! OpenSSH `authorized_keys` lines: options, key, comment, each with its line number. Only the
//! options that decide forwarding and login are kept apart; the rest are listed as `other`.

use std::path::Path;

/// One key line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyLine {
    pub line: usize,
    /// `type base64 [comment]`, as the registry takes it.
    pub key: String,
    /// `restrict`: no forwarding unless `port-forwarding` turns it back on.
    pub restrict: bool,
    pub port_forwarding: Option<bool>,
    pub permit_open: Vec<String>,
    pub permit_listen: Vec<String>,
    pub cert_authority: bool,
    pub principals: Option<Vec<String>>,
    pub from: Option<String>,
    pub expiry_time: Option<String>,
    /// Options with no bearing on forwarding, or none cmx has (`command=`, `environment=`, ...).
    pub other: Vec<String>,
}

impl KeyLine {
    /// Whether this key may forward at all (OpenSSH: `restrict` or `no-port-forwarding` turn it
    /// off, `port-forwarding` back on).
    pub fn may_forward(&self) -> bool {
        self.port_forwarding.unwrap_or(!self.restrict)
    }
}

const KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "ssh-dss",
];

/// Parses a whole file; `Err` lines are `file:line: why` (the rest still parse).
pub fn parse(text: &str, path: &Path) -> (Vec<KeyLine>, Vec<String>) {
    let mut keys = Vec::new();
    let mut errors = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match parse_line(line, i + 1) {
            Ok(k) => keys.push(k),
            Err(e) => errors.push(format!("{}:{}: {e}", path.display(), i + 1)),
        }
    }
    (keys, errors)
}

fn parse_line(line: &str, number: usize) -> Result<KeyLine, String> {
    let first = line.split_whitespace().next().unwrap_or("");
    let (options, rest) = if KEY_TYPES.contains(&first) || first.ends_with("-cert-v01@openssh.com") {
        ("", line)
    } else {
        split_options(line)?
    };
    let mut k = KeyLine {
        line: number,
        ..KeyLine::default()
    };
    let mut parts = rest.split_whitespace();
    let (Some(kind), Some(blob)) = (parts.next(), parts.next()) else {
        return Err("no key after the options".into());
    };
    if !KEY_TYPES.contains(&kind) {
        return Err(format!("unknown key type '{}'", cmx_net::text::bounded(kind, 64)));
    }
    let comment: Vec<&str> = parts.collect();
    k.key = if comment.is_empty() {
        format!("{kind} {blob}")
    } else {
        format!("{kind} {blob} {}", comment.join(" "))
    };
    for option in options_list(options)? {
        let (name, value) = match option.split_once('=') {
            Some((n, v)) => (n.to_ascii_lowercase(), Some(v.trim_matches('"').to_string())),
            None => (option.to_ascii_lowercase(), None),
        };
        match (name.as_str(), value) {
            ("restrict", None) => k.restrict = true,
            ("port-forwarding", None) => k.port_forwarding = Some(true),
            ("no-port-forwarding", None) => k.port_forwarding = Some(false),
            ("permitopen", Some(v)) => k.permit_open.push(v),
            ("permitlisten", Some(v)) => k.permit_listen.push(v),
            ("cert-authority", None) => k.cert_authority = true,
            ("principals", Some(v)) => k.principals = Some(v.split(',').map(str::to_string).collect()),
            ("from", Some(v)) => k.from = Some(v),
            ("expiry-time", Some(v)) => k.expiry_time = Some(v),
            _ => k.other.push(option),
        }
    }
    Ok(k)
}

/// Splits `options key...` where options may contain quoted spaces.
fn split_options(line: &str) -> Result<(&str, &str), String> {
    let mut in_quotes = false;
    for (i, c) in line.char_indices() {
        match c {
            '"' => in_quotes = !in_quotes,
            c if c.is_whitespace() && !in_quotes => return Ok((&line[..i], line[i..].trim_start())),
            _ => {}
        }
    }
    Err(if in_quotes {
        "unterminated quote in the options".into()
    } else {
        "no key after the options".into()
    })
}

/// The comma-separated options, commas inside quotes kept.
fn options_list(options: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut in_quotes = false;
    for c in options.chars() {
        match c {
            '"' => {
                in_quotes = !in_quotes;
                current.push(c);
            }
            ',' if !in_quotes => out.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAOWeqz0RhxzjiASSGbF+lvtms00N1lGxLHlEZ2HCy5o";

    #[test]
    fn options_are_read_as_openssh_writes_them() {
        let text = format!(
            "# devices\n{KEY} plain\nrestrict,port-forwarding,permitopen=\"localhost:1883\",permitopen=\"srv1:8080\" {KEY} dev1\ncert-authority,principals=\"dev1,dev2\",from=\"10.0.0.0/8,!10.0.0.1\" {KEY} ca\nno-port-forwarding,command=\"/bin/true\",expiry-time=\"20301231\" {KEY}\n"
        );
        let (keys, errors) = parse(&text, Path::new("authorized_keys"));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(keys.len(), 4);
        assert_eq!(keys[0].key, format!("{KEY} plain"));
        assert!(keys[0].may_forward());
        assert!(keys[1].restrict && keys[1].may_forward());
        assert_eq!(keys[1].permit_open, ["localhost:1883", "srv1:8080"]);
        assert!(keys[2].cert_authority);
        assert_eq!(
            keys[2].principals.as_deref(),
            Some(&["dev1".to_string(), "dev2".to_string()][..])
        );
        assert_eq!(keys[2].from.as_deref(), Some("10.0.0.0/8,!10.0.0.1"));
        assert!(!keys[3].may_forward());
        assert_eq!(keys[3].expiry_time.as_deref(), Some("20301231"));
        assert_eq!(keys[3].other, ["command=\"/bin/true\""]);
        assert_eq!(keys[3].line, 5);
    }

    #[test]
    fn bad_lines_name_file_and_line_and_the_rest_still_parse() {
        let text = format!("restrict\nfoo-key AAAA BBBB\n{KEY}\n");
        let (keys, errors) = parse(&text, Path::new("/home/dev1/.ssh/authorized_keys"));
        assert_eq!(keys.len(), 1);
        assert_eq!(
            errors,
            [
                "/home/dev1/.ssh/authorized_keys:1: no key after the options",
                "/home/dev1/.ssh/authorized_keys:2: unknown key type 'AAAA'"
            ]
        );
    }
}
