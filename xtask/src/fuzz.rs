//! `cargo xtask fuzz`: builds the libFuzzer targets of `fuzz/` with coverage instrumentation and
//! runs each for a budget of CPU time, resuming from its corpus.
//!
//! Why no cargo-fuzz: it only adds the compiler flags below and a `--target`, and it wants
//! nightly for its sanitizer flags. The flags used here are stable (`-Cpasses`, `-Cllvm-args`),
//! so the machine's stable toolchain builds the targets without `RUSTC_BOOTSTRAP` and without
//! installing anything. There is no AddressSanitizer (it needs `-Zsanitizer`): the targets are
//! safe Rust, where the bugs a fuzzer finds are panics, hangs and unbounded memory, and libFuzzer
//! catches those itself (`-timeout`, `-rss_limit_mb`, `-malloc_limit_mb`).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

/// The targets, with the longest input each gets and the files of the repository that seed its
/// corpus besides `fuzz/seeds/<target>/`.
const TARGETS: &[(&str, usize, &[&str])] = &[
    ("gateway_config", 4096, &["gateway/config.example.toml"]),
    ("registry", 4096, &[]),
    ("agent_config", 4096, &["agent/config.example.toml"]),
    ("certificate", 2048, &[]),
    ("ssh_front_door", 16384, &[]),
];

/// SanitizerCoverage as cargo-fuzz configures it, plus the `fuzzing` cfg libfuzzer-sys expects
/// and the checks a debug build has.
const INSTRUMENT: &str = "-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
    -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks";

/// Longest wall-clock slice of one libFuzzer run: the CPU budget is checked between slices.
const SLICE: Duration = Duration::from_secs(120);

/// What one target did within its budget.
struct Outcome {
    target: &'static str,
    cpu_secs: f64,
    execs: u64,
    coverage: u64,
    features: u64,
    corpus: usize,
    crashes: Vec<PathBuf>,
    /// Inputs that took more than 10 s (libFuzzer's slow-unit report): not failures, but each
    /// is a CPU-amplification lead worth reading (one found the costly key exchanges).
    slow: Vec<PathBuf>,
}

/// Builds the targets and runs those named in `only` (all when empty) for `cpu_secs` each.
pub fn run(root: &Path, cache: &Path, cpu_secs: u64, only: &[String]) -> anyhow::Result<()> {
    for name in only {
        if !TARGETS.iter().any(|(t, _, _)| t == name) {
            let known: Vec<_> = TARGETS.iter().map(|(t, _, _)| *t).collect();
            bail!("no fuzz target '{name}' (targets: {})", known.join(", "));
        }
    }
    let bins = build(root, &cache.join("target"))?;
    let mut outcomes = Vec::new();
    for (target, max_len, seeds) in TARGETS {
        if !only.is_empty() && !only.iter().any(|o| o == target) {
            continue;
        }
        let corpus = prepare_corpus(root, &cache.join("corpus").join(target), target, seeds)?;
        let artifacts = cache.join("artifacts").join(target);
        std::fs::create_dir_all(&artifacts)?;
        outcomes.push(fuzz(
            target,
            &bins.join(target),
            *max_len,
            &corpus,
            &artifacts,
            cpu_secs,
        )?);
    }
    report(&outcomes);
    let crashed: Vec<_> = outcomes.iter().flat_map(|o| &o.crashes).collect();
    if !crashed.is_empty() {
        bail!(
            "{} input(s) crashed a target; reproduce with the target binary and the file, then add it to fuzz/seeds/<target>/ as a regression: {}",
            crashed.len(),
            crashed
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    Ok(())
}

/// `cargo build` of the fuzz package with instrumentation. `--target` keeps the flags off build
/// scripts and proc macros, which must not link libFuzzer's coverage hooks.
fn build(root: &Path, target_dir: &Path) -> anyhow::Result<PathBuf> {
    let host = "x86_64-unknown-linux-gnu";
    let status = super::cargo()
        .current_dir(root)
        .args(["build", "--release", "-p", "cmx-fuzz", "--bins", "--target", host])
        .env("CARGO_TARGET_DIR", target_dir)
        .env("RUSTFLAGS", INSTRUMENT)
        .status()
        .context("cannot run cargo build for the fuzz targets")?;
    super::check(status, "building the fuzz targets")?;
    Ok(target_dir.join(host).join("release"))
}

/// The working corpus (kept between runs under the cache), seeded from `fuzz/seeds/<target>/`
/// and the repository's example files.
fn prepare_corpus(root: &Path, dir: &Path, target: &str, extra: &[&str]) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let seeds = root.join("fuzz/seeds").join(target);
    let mut files: Vec<PathBuf> = extra.iter().map(|f| root.join(f)).collect();
    if seeds.is_dir() {
        for entry in std::fs::read_dir(&seeds)? {
            files.push(entry?.path());
        }
    }
    for file in files {
        let name = file.file_name().context("a seed file has a name")?;
        std::fs::copy(&file, dir.join(name))
            .with_context(|| format!("cannot copy seed {}", file.display()))?;
    }
    Ok(dir.to_path_buf())
}

/// Runs one target in slices until it has used `cpu_secs` of CPU or crashed.
fn fuzz(
    target: &'static str,
    bin: &Path,
    max_len: usize,
    corpus: &Path,
    artifacts: &Path,
    cpu_secs: u64,
) -> anyhow::Result<Outcome> {
    let mut outcome = Outcome {
        target,
        cpu_secs: 0.0,
        execs: 0,
        coverage: 0,
        features: 0,
        corpus: 0,
        crashes: Vec::new(),
        slow: Vec::new(),
    };
    eprintln!("xtask: fuzzing {target} for {cpu_secs} CPU-seconds");
    while outcome.cpu_secs < cpu_secs as f64 && outcome.crashes.is_empty() {
        let remaining = (cpu_secs as f64 - outcome.cpu_secs).ceil() as u64;
        let slice = remaining.clamp(1, SLICE.as_secs());
        let before = children_cpu_secs();
        let output = Command::new(bin)
            .arg(corpus)
            .arg(format!("-max_total_time={slice}"))
            .arg(format!("-max_len={max_len}"))
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .args([
                "-timeout=20",
                "-rss_limit_mb=2048",
                "-malloc_limit_mb=512",
                "-print_final_stats=1",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .with_context(|| format!("cannot run {}", bin.display()))?;
        outcome.cpu_secs += children_cpu_secs() - before;
        let log = String::from_utf8_lossy(&output.stderr);
        absorb(&mut outcome, &log);
        let (slow, failed): (Vec<_>, Vec<_>) = saved_inputs(artifacts, &log)
            .into_iter()
            .partition(|p| is_slow_unit(p));
        outcome.slow.extend(slow);
        eprintln!(
            "xtask: {target}: {:.0} of {cpu_secs} CPU-seconds, {} executions, {} edges, corpus {}",
            outcome.cpu_secs, outcome.execs, outcome.coverage, outcome.corpus
        );
        if !output.status.success() {
            outcome.crashes = failed;
            eprintln!("{}", tail(&log, 60));
            if outcome.crashes.is_empty() {
                bail!(
                    "fuzz target {target} failed ({}) without leaving an input",
                    output.status
                );
            }
        }
    }
    Ok(outcome)
}

/// Adds a slice's statistics (libFuzzer's `-print_final_stats` and its last status line).
fn absorb(outcome: &mut Outcome, log: &str) {
    for line in log.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("stat::number_of_executed_units:"), Some(n)) => {
                outcome.execs += n.parse::<u64>().unwrap_or(0);
            }
            (Some(first), _) if first.starts_with('#') => {
                let field = |name: &str| -> Option<u64> {
                    let rest = line.split(name).nth(1)?;
                    rest.split(|c: char| !c.is_ascii_digit())
                        .find(|s| !s.is_empty())?
                        .parse()
                        .ok()
                };
                outcome.coverage = field("cov: ").unwrap_or(outcome.coverage);
                outcome.features = field("ft: ").unwrap_or(outcome.features);
                outcome.corpus = field("corp: ").map(|n| n as usize).unwrap_or(outcome.corpus);
            }
            _ => {}
        }
    }
}

/// The inputs libFuzzer saved (`crash-*`, `timeout-*`, `oom-*`, `slow-unit-*`
/// are named on its "Test unit written to" lines).
fn saved_inputs(artifacts: &Path, log: &str) -> Vec<PathBuf> {
    log.lines()
        .filter_map(|l| l.split("Test unit written to ").nth(1))
        .map(|p| PathBuf::from(p.trim()))
        .filter(|p| p.starts_with(artifacts))
        .collect()
}

fn is_slow_unit(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with("slow-unit-"))
}

fn tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// CPU time (user + system) of this process's waited-for children so far.
fn children_cpu_secs() -> f64 {
    // SAFETY: getrusage writes into the struct it is given; a zeroed rusage is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_CHILDREN with a valid pointer.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

fn report(outcomes: &[Outcome]) {
    println!();
    println!(
        "| target | CPU-seconds | executions | exec/s | coverage (edges) | features | corpus | crashes | slow inputs |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for o in outcomes {
        let rate = if o.cpu_secs > 0.0 {
            o.execs as f64 / o.cpu_secs
        } else {
            0.0
        };
        println!(
            "| {} | {:.0} | {} | {:.0} | {} | {} | {} | {} | {} |",
            o.target,
            o.cpu_secs,
            o.execs,
            rate,
            o.coverage,
            o.features,
            o.corpus,
            o.crashes.len(),
            o.slow.len()
        );
    }
    for slow in outcomes.iter().flat_map(|o| &o.slow) {
        println!(
            "slow input (read it: a peer may make the gateway spend this much CPU): {}",
            slow.display()
        );
    }
}
