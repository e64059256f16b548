//! Bad agent configuration files, each failing with the error its `# expect:` lines give
//! (`FILE` stands for the file's path).

use std::path::Path;

use cmx_agent::config::Config;

#[test]
fn invalid_configs_fail_with_their_expected_errors() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/configs/invalid");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert!(files.len() >= 10);
    let mut failures = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).unwrap();
        let expected: Vec<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# expect: "))
            .map(|l| l.replace("FILE", &path.display().to_string()))
            .collect();
        assert!(!expected.is_empty(), "{} has no '# expect:' line", path.display());
        match Config::load(&path) {
            Ok(_) => failures.push(format!("{} should be invalid", path.display())),
            Err(e) => {
                let actual = e.to_string();
                let actual: Vec<&str> = actual.lines().collect();
                if actual != expected {
                    failures.push(format!(
                        "{}:\n  got:  {actual:?}\n  want: {expected:?}",
                        path.display()
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
