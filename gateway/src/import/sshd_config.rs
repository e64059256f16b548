//! The parts of an OpenSSH `sshd_config` that decide who may forward what: global keywords and
//! `Match` blocks, each value with the line it came from. Keywords are case-insensitive; the
//! first value of a keyword wins, as in sshd (global values are the defaults a matching `Match`
//! block overrides).

use std::path::Path;

/// One keyword and its arguments, with the line it was on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setting {
    /// Lowercase keyword.
    pub keyword: String,
    pub args: Vec<String>,
    pub line: usize,
}

/// What a `Match` line selects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Criterion {
    /// `User` patterns (`*`, `?`, `!negation`), comma-separated in the file.
    User(Vec<String>),
    Group(Vec<String>),
    All,
    /// Anything else (`Address`, `Host`, `LocalPort`, ...): the block is not translated.
    Other(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MatchBlock {
    pub criteria: Vec<Criterion>,
    pub line: usize,
    pub settings: Vec<Setting>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SshdConfig {
    pub global: Vec<Setting>,
    pub blocks: Vec<MatchBlock>,
}

#[derive(Debug, thiserror::Error)]
pub enum SshdConfigError {
    #[error("{path}: cannot read it: {cause}")]
    Read { path: String, cause: std::io::Error },
    #[error("{path}:{line}: {message}")]
    Syntax {
        path: String,
        line: usize,
        message: String,
    },
}

impl SshdConfig {
    pub fn load(path: &Path) -> Result<SshdConfig, SshdConfigError> {
        let text = std::fs::read_to_string(path).map_err(|cause| SshdConfigError::Read {
            path: path.display().to_string(),
            cause,
        })?;
        SshdConfig::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<SshdConfig, SshdConfigError> {
        let mut config = SshdConfig::default();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let words = split_words(raw).map_err(|message| SshdConfigError::Syntax {
                path: path.display().to_string(),
                line,
                message,
            })?;
            let Some((keyword, args)) = words.split_first() else {
                continue;
            };
            // `Keyword=value` is allowed too.
            let (keyword, args) = match keyword.split_once('=') {
                Some((k, v)) if !v.is_empty() => {
                    let mut all = vec![v.to_string()];
                    all.extend(args.iter().cloned());
                    (k.to_ascii_lowercase(), all)
                }
                _ => (keyword.trim_end_matches('=').to_ascii_lowercase(), args.to_vec()),
            };
            if keyword == "match" {
                let criteria = parse_criteria(&args).map_err(|message| SshdConfigError::Syntax {
                    path: path.display().to_string(),
                    line,
                    message,
                })?;
                config.blocks.push(MatchBlock {
                    criteria,
                    line,
                    settings: Vec::new(),
                });
                continue;
            }
            let setting = Setting { keyword, args, line };
            match config.blocks.last_mut() {
                Some(block) => block.settings.push(setting),
                None => config.global.push(setting),
            }
        }
        Ok(config)
    }

    /// The first global value of `keyword`.
    pub fn global(&self, keyword: &str) -> Option<&Setting> {
        self.global.iter().find(|s| s.keyword == keyword)
    }
}

/// Words of a line, `#` comments removed, double quotes grouping.
fn split_words(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_quotes = false;
    let mut started = false;
    for c in line.chars() {
        match c {
            '"' => {
                in_quotes = !in_quotes;
                started = true;
            }
            '#' if !in_quotes => break,
            c if c.is_whitespace() && !in_quotes => {
                if started {
                    words.push(std::mem::take(&mut word));
                    started = false;
                }
            }
            c => {
                word.push(c);
                started = true;
            }
        }
    }
    if in_quotes {
        return Err("unterminated quote".into());
    }
    if started {
        words.push(word);
    }
    Ok(words)
}

fn parse_criteria(args: &[String]) -> Result<Vec<Criterion>, String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let kind = args[i].to_ascii_lowercase();
        if kind == "all" {
            out.push(Criterion::All);
            i += 1;
            continue;
        }
        let Some(value) = args.get(i + 1) else {
            return Err(format!("Match {} needs a value", args[i]));
        };
        let list = || value.split(',').map(str::to_string).collect();
        out.push(match kind.as_str() {
            "user" => Criterion::User(list()),
            "group" => Criterion::Group(list()),
            _ => Criterion::Other(format!("{} {value}", args[i])),
        });
        i += 2;
    }
    if out.is_empty() {
        return Err("Match without criteria".into());
    }
    Ok(out)
}

/// OpenSSH's pattern match (`*`, `?`) of one pattern against `name`.
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

/// OpenSSH's pattern-list match: some positive pattern matches and no `!negated` one does.
pub fn list_matches(patterns: &[String], name: &str) -> bool {
    let mut matched = false;
    for p in patterns {
        if let Some(negated) = p.strip_prefix('!') {
            if pattern_matches(negated, name) {
                return false;
            }
        } else if pattern_matches(p, name) {
            matched = true;
        }
    }
    matched
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_keywords_and_match_blocks_keep_their_lines() {
        let text = "# CMXsafe gateway\nAllowTcpForwarding no\nPermitOpen none\n\nMatch User srv1,srv2\n  AllowTcpForwarding remote\n  PermitListen localhost:1883 \"localhost:8080\"\nMatch Group devices Address 10.0.0.0/8\n  ForceCommand=/bin/false\n";
        let c = SshdConfig::parse(text, Path::new("sshd_config")).unwrap();
        assert_eq!(c.global("allowtcpforwarding").unwrap().args, ["no"]);
        assert_eq!(c.blocks.len(), 2);
        assert_eq!(
            c.blocks[0].criteria,
            [Criterion::User(vec!["srv1".into(), "srv2".into()])]
        );
        assert_eq!(c.blocks[0].settings[1].args, ["localhost:1883", "localhost:8080"]);
        assert_eq!(c.blocks[0].settings[1].line, 7);
        assert_eq!(
            c.blocks[1].criteria,
            [
                Criterion::Group(vec!["devices".into()]),
                Criterion::Other("Address 10.0.0.0/8".into())
            ]
        );
        assert_eq!(c.blocks[1].settings[0].keyword, "forcecommand");
        assert_eq!(c.blocks[1].settings[0].args, ["/bin/false"]);
    }

    #[test]
    fn errors_name_file_and_line() {
        let e = SshdConfig::parse("Port 22\nMatch User\n", Path::new("/etc/ssh/sshd_config")).unwrap_err();
        assert_eq!(e.to_string(), "/etc/ssh/sshd_config:2: Match User needs a value");
        let e = SshdConfig::parse("Banner \"oops\n", Path::new("c")).unwrap_err();
        assert_eq!(e.to_string(), "c:1: unterminated quote");
    }

    #[test]
    fn patterns_match_as_openssh_does() {
        let list: Vec<String> = ["dev*", "!dev9", "srv?"].iter().map(|s| s.to_string()).collect();
        assert!(list_matches(&list, "dev1"));
        assert!(!list_matches(&list, "dev9"));
        assert!(list_matches(&list, "srv1"));
        assert!(!list_matches(&list, "srv10"));
        assert!(!list_matches(&list, "admin"));
    }
}
