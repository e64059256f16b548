//! Configuration files in TOML: deserialized with the line and the key a problem is at, so
//! that `max_sessions = "many"` is reported as `FILE:3: limits.max_sessions: invalid type:
//! string "many", expected usize`, not just by its line.

use std::fmt;

use serde::de::DeserializeOwned;

use crate::text::Lines;

/// Why a TOML document did not deserialize.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TomlProblem {
    /// 1-based.
    pub line: usize,
    /// The dotted key the problem is at (`limits.max_sessions`, `identity[2].role`; for an
    /// unknown key, which the message names, the table that does not know it), when it is
    /// within one.
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for TomlProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            Some(key) => write!(f, "{key}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// Deserializes `text` as a `T`.
pub fn from_toml<T: DeserializeOwned>(text: &str) -> Result<T, TomlProblem> {
    let problem = |e: toml::de::Error, key: Option<String>| TomlProblem {
        line: e.span().map(|s| Lines::new(text).of(s.start)).unwrap_or(1),
        key,
        message: e.message().trim().to_string(),
    };
    let document = toml::Deserializer::parse(text).map_err(|e| problem(e, None))?;
    serde_path_to_error::deserialize(document).map_err(|e| {
        let mut keys = keys_of(e.path());
        let e = e.into_inner();
        // The message names an unknown key itself: say which table does not know it.
        if e.message().starts_with("unknown field") {
            keys.pop();
        }
        problem(e, join(&keys))
    })
}

/// The keys (`"limits"`, `"max_sessions"`) and array indices (`"[2]"`) down to the problem.
fn keys_of(path: &serde_path_to_error::Path) -> Vec<String> {
    use serde_path_to_error::Segment;
    path.iter()
        .filter_map(|segment| match segment {
            Segment::Seq { index } => Some(format!("[{index}]")),
            // A `toml::Spanned` value is a map of private fields underneath: not a key.
            Segment::Map { key } if key.starts_with("$__") => None,
            Segment::Map { key } | Segment::Enum { variant: key } => Some(key.clone()),
            Segment::Unknown => Some("?".to_string()),
        })
        .collect()
}

/// `a.b[0].c`; `None` at the top level.
fn join(keys: &[String]) -> Option<String> {
    let mut key = String::new();
    for k in keys {
        if !key.is_empty() && !k.starts_with('[') {
            key.push('.');
        }
        key.push_str(k);
    }
    (!key.is_empty()).then_some(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Doc {
        name: String,
        #[serde(default)]
        limits: Limits,
        #[serde(default)]
        item: Vec<Item>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Limits {
        max: Option<u32>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Item {
        role: toml::Spanned<String>,
    }

    fn problem(text: &str) -> String {
        let p = from_toml::<Doc>(text).unwrap_err();
        format!("{}: {p}", p.line)
    }

    #[test]
    fn a_problem_names_its_line_and_key() {
        assert_eq!(
            problem("name = \"x\"\n[limits]\nmax = \"many\"\n"),
            "3: limits.max: invalid type: string \"many\", expected u32"
        );
        assert_eq!(
            problem("name = \"x\"\n[[item]]\nrole = \"a\"\n[[item]]\nrole = 5\n"),
            "5: item[1].role: invalid type: integer `5`, expected a string"
        );
        let unknown = problem("name = \"x\"\n[limits]\nmxa = 1\n");
        assert_eq!(unknown, "3: limits: unknown field `mxa`, expected `max`");
        assert!(problem("name = \"x\"\nmax = 1\n").starts_with("2: unknown field `max`, expected one of"));
        assert_eq!(problem("limits = {}\n"), "1: missing field `name`");
        assert!(
            problem("name = \n").starts_with("1: "),
            "a syntax error has its line"
        );
    }
}
