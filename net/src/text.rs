//! Text helpers: line numbers for error messages about configuration files, and bounds for
//! strings a peer controls before they reach a log line.

use std::borrow::Cow;

/// Longest client-supplied string written to a log line (OpenSSH cuts its log lines at about
/// 1 KiB); longer ones are cut and say how long they were.
pub const LOG_STRING_MAX: usize = 256;

/// `s`, cut to at most `max` bytes (at a character boundary) with a note of its full length, and
/// with control characters escaped so that a peer cannot forge log lines.
pub fn bounded(s: &str, max: usize) -> Cow<'_, str> {
    let clean = !s.chars().any(char::is_control);
    if s.len() <= max && clean {
        return Cow::Borrowed(s);
    }
    let mut cut = s.len().min(max);
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut out = String::with_capacity(cut + 24);
    for c in s[..cut].chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    if cut < s.len() {
        out.push_str(&format!("...({} bytes)", s.len()));
    }
    Cow::Owned(out)
}

/// `bounded(s, LOG_STRING_MAX)`: the form every client-supplied string takes in a log line.
pub fn for_log(s: &str) -> Cow<'_, str> {
    bounded(s, LOG_STRING_MAX)
}

/// Maps byte offsets of a text to 1-based line numbers.
pub struct Lines(Vec<usize>);

impl Lines {
    pub fn new(text: &str) -> Self {
        Lines(text.match_indices('\n').map(|(i, _)| i).collect())
    }

    pub fn of(&self, offset: usize) -> usize {
        self.0.partition_point(|&nl| nl < offset) + 1
    }
}

#[cfg(test)]
mod tests {
    use super::Lines;

    #[test]
    fn log_strings_are_cut_and_escaped() {
        assert_eq!(super::bounded("srv1", 8), "srv1");
        assert_eq!(super::bounded("abcdefghij", 4), "abcd...(10 bytes)");
        // Never inside a character: 'é' is two bytes.
        assert_eq!(super::bounded("ééé", 3), "é...(6 bytes)");
        assert_eq!(super::bounded("a\nforged line", 64), "a\\nforged line");
        assert_eq!(
            super::for_log(&"x".repeat(250_000)).len(),
            256 + "...(250000 bytes)".len()
        );
    }

    #[test]
    fn offsets_to_lines() {
        let l = Lines::new("a\nbc\n\nd");
        assert_eq!([0, 1, 2, 4, 5, 6].map(|o| l.of(o)), [1, 1, 2, 2, 3, 4]);
    }
}
