//! kubectl against the test cluster, and waiting for states.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The cluster the tests run against.
#[derive(Clone)]
pub struct Cluster {
    pub kubeconfig: PathBuf,
}

impl Cluster {
    /// The cluster `CMX_E2E_KUBECONFIG` names, or `None` (the test is skipped, and says so)
    /// when it is unset; with `CMX_REQUIRE_E2E=1` (CI) an unset one is a failure.
    pub fn from_env() -> Option<Cluster> {
        match std::env::var_os("CMX_E2E_KUBECONFIG") {
            Some(p) => Some(Cluster {
                kubeconfig: PathBuf::from(p),
            }),
            None if std::env::var("CMX_REQUIRE_E2E").as_deref() == Ok("1") => {
                panic!("CMX_REQUIRE_E2E=1 but CMX_E2E_KUBECONFIG is unset")
            }
            None => {
                eprintln!(
                    "SKIPPED: no cluster (cargo xtask test starts one where the minicluster tool exists)"
                );
                None
            }
        }
    }

    pub fn kubectl(&self, args: &[&str]) -> Command {
        let mut c = Command::new("kubectl");
        c.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        c
    }

    /// Runs kubectl; `Err` carries its stderr.
    pub fn try_run(&self, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
        let mut c = self.kubectl(args);
        c.stdout(Stdio::piped()).stderr(Stdio::piped());
        if stdin.is_some() {
            c.stdin(Stdio::piped());
        }
        let mut child = c.spawn().map_err(|e| format!("kubectl: {e}"))?;
        if let Some(text) = stdin {
            use std::io::Write;
            let mut pipe = child.stdin.take().expect("piped stdin");
            pipe.write_all(text.as_bytes()).map_err(|e| e.to_string())?;
        }
        let Output {
            status,
            stdout,
            stderr,
        } = child.wait_with_output().map_err(|e| e.to_string())?;
        if status.success() {
            Ok(String::from_utf8_lossy(&stdout).into_owned())
        } else {
            Err(format!(
                "kubectl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&stderr).trim()
            ))
        }
    }

    /// Runs kubectl and fails the test if it fails.
    pub fn run(&self, args: &[&str]) -> String {
        self.try_run(args, None).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `kubectl apply -f -` of `yaml`.
    pub fn apply(&self, yaml: &str) {
        self.try_run(&["apply", "-f", "-"], Some(yaml))
            .unwrap_or_else(|e| panic!("{e}\n--- applied:\n{yaml}"));
    }

    /// An object as JSON, or `None` if it does not exist.
    pub fn get(&self, namespace: &str, what: &str) -> Option<Value> {
        let out = self
            .try_run(&["-n", namespace, "get", what, "-o", "json"], None)
            .ok()?;
        serde_json::from_str(&out).ok()
    }
}

/// Polls `probe` until it returns `Some` (then returns it) or `timeout` passes (then fails the
/// test with `what` and the last thing `observe` saw). Tests wait for states this way; they
/// never assert how long something took.
pub fn poll<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Option<T>,
    observe: impl Fn() -> String,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(t) = probe() {
            return t;
        }
        if Instant::now() >= deadline {
            panic!("timed out waiting for: {what}\nlast seen:\n{}", observe());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}
