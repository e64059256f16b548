//! Line numbers for error messages about configuration files.

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
    fn offsets_to_lines() {
        let l = Lines::new("a\nbc\n\nd");
        assert_eq!([0, 1, 2, 4, 5, 6].map(|o| l.of(o)), [1, 1, 2, 2, 3, 4]);
    }
}
