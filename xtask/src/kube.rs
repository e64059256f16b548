//! Kubernetes checks for `cargo xtask test`: the manifests offline (kustomize renders,
//! kubernetes-validate against the 1.33 schemas, strict and not, shellcheck on kind/), and a
//! real API server (envtest) for the controller's tests.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::{check, deps};

/// The Kubernetes version the manifests are validated against.
const SCHEMA_VERSION: &str = "1.33.0";
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

pub const PACKAGES: &[(&str, &str)] = &[
    ("shellcheck", "lints the kind/ scripts"),
    ("python3-venv", "a virtualenv for kubernetes-validate"),
];

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// kubernetes-validate in a virtualenv cached under ~/.cache/cmxsafe.
fn kubernetes_validate() -> anyhow::Result<PathBuf> {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/root".into());
    let venv = home.join(".cache/cmxsafe/venv");
    let bin = venv.join("bin/kubernetes-validate");
    if !bin.is_file() {
        eprintln!("xtask: installing {KUBERNETES_VALIDATE} into {}", venv.display());
        check(
            Command::new("python3")
                .arg("-m")
                .arg("venv")
                .arg(&venv)
                .status()?,
            "python3 -m venv",
        )?;
        check(
            Command::new(venv.join("bin/pip"))
                .args(["install", "--quiet", KUBERNETES_VALIDATE])
                .status()?,
            "pip install kubernetes-validate",
        )?;
    }
    Ok(bin)
}

/// Renders every kustomization, validates everything against the Kubernetes schemas and lints
/// the kind scripts.
pub fn check_manifests(root: &Path, out: &Path) -> anyhow::Result<()> {
    deps::ensure(PACKAGES)?;
    std::fs::create_dir_all(out)?;
    let mut files: Vec<PathBuf> = Vec::new();
    if have("kubectl") {
        for (dir, name) in [
            ("deploy/base", "deploy-base.yaml"),
            ("kind/manifests", "kind.yaml"),
        ] {
            let rendered = Command::new("kubectl")
                .arg("kustomize")
                .arg(root.join(dir))
                .output()
                .context("cannot run kubectl kustomize")?;
            if !rendered.status.success() {
                bail!(
                    "kubectl kustomize {dir}: {}",
                    String::from_utf8_lossy(&rendered.stderr)
                );
            }
            let file = out.join(name);
            std::fs::write(&file, &rendered.stdout)?;
            files.push(file);
        }
    } else {
        eprintln!(
            "xtask: WARNING: kubectl not found: kustomizations not rendered; validating deploy/base's files one by one"
        );
        for entry in std::fs::read_dir(root.join("deploy/base"))? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "yaml") && !path.ends_with("kustomization.yaml") {
                files.push(path);
            }
        }
    }
    let validate = kubernetes_validate()?;
    // Strict catches unknown fields; the plain run reports type errors strict mode may stop
    // before (it stops at the first error of an object).
    for strict in [true, false] {
        let mut cmd = Command::new(&validate);
        cmd.args(["--quiet", "-k", SCHEMA_VERSION]);
        if strict {
            cmd.arg("--strict");
        }
        let status = cmd
            .args(&files)
            .status()
            .context("cannot run kubernetes-validate")?;
        check(
            status,
            &format!("kubernetes-validate{}", if strict { " --strict" } else { "" }),
        )?;
    }
    let scripts = ["kind/up.sh", "kind/down.sh", "kind/iot/entrypoint.sh"];
    let status = Command::new("shellcheck")
        .current_dir(root)
        .args(scripts)
        .status()
        .context("cannot run shellcheck")?;
    check(status, "shellcheck kind/")?;
    println!(
        "xtask: manifests: {} rendered files valid against Kubernetes {SCHEMA_VERSION} (strict and not); kind scripts shellcheck-clean",
        files.len()
    );
    Ok(())
}

/// A running envtest API server: `K8S_TEST_KUBECONFIG` for the tests; stopped on drop.
pub struct Envtest {
    tool: PathBuf,
    pub kubeconfig: PathBuf,
}

impl Envtest {
    /// Starts envtest: `$CMX_ENVTEST_TOOL`, else `shared/tools/envtest` next to the repository
    /// (the team's machines keep it in /work/shared; a CI clone may live elsewhere).
    /// `Ok(None)` with a warning when neither the tool nor kubectl is on this machine.
    pub fn up(root: &Path) -> anyhow::Result<Option<Envtest>> {
        let candidates: Vec<PathBuf> = match std::env::var_os("CMX_ENVTEST_TOOL") {
            Some(p) => vec![PathBuf::from(p)],
            None => vec![
                root.join("../shared/tools/envtest"),
                PathBuf::from("/work/shared/tools/envtest"),
            ],
        };
        let found = candidates.iter().find(|t| t.join("up").is_file());
        let tool = found.unwrap_or(&candidates[0]).clone();
        if found.is_none() || !have("kubectl") {
            eprintln!(
                "xtask: WARNING: SKIPPING the Kubernetes API server tests: no envtest at {} (set CMX_ENVTEST_TOOL) or no kubectl",
                tool.display()
            );
            return Ok(None);
        }
        let out = Command::new(tool.join("up"))
            .output()
            .context("cannot run envtest/up")?;
        if !out.status.success() {
            bail!("envtest/up failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let kubeconfig = stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix("export K8S_TEST_KUBECONFIG="))
            .map(|v| PathBuf::from(v.trim_matches(['"', '\''])))
            .with_context(|| format!("envtest/up printed no K8S_TEST_KUBECONFIG: {stdout}"))?;
        eprintln!("xtask: envtest API server up ({})", kubeconfig.display());
        Ok(Some(Envtest { tool, kubeconfig }))
    }

    /// Environment for `cargo test`: the kubeconfig, and a failure instead of a skip.
    pub fn apply(&self, cmd: &mut Command) {
        cmd.env("K8S_TEST_KUBECONFIG", &self.kubeconfig)
            .env("CMX_REQUIRE_ENVTEST", "1");
    }
}

impl Drop for Envtest {
    fn drop(&mut self) {
        let _ = Command::new(self.tool.join("down")).output();
    }
}
