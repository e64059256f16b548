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

/// deploy/base uses kustomize's `labels:` field (labels without selectors), which needs the
/// kustomize of kubectl >= 1.21 (kustomize >= 4.1); Debian's kubectl 1.20 embeds v2.0.3 and
/// fails with `json: unknown field "labels"`. Says so instead.
fn kubectl_renders_labels() -> anyhow::Result<()> {
    let out = Command::new("kubectl")
        .args(["version", "--client", "-o", "json"])
        .output()
        .context("cannot run kubectl version")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let minor: Option<u32> = text
        .split("\"minor\"")
        .nth(1)
        .and_then(|rest| rest.split('"').nth(1))
        .and_then(|m| m.trim_end_matches('+').parse().ok());
    match minor {
        Some(m) if m < 21 => bail!(
            "kubectl 1.{m} embeds a kustomize older than 4.1, which cannot render deploy/base (its `labels:` field); install kubectl >= 1.21 or kustomize >= 4.1"
        ),
        _ => Ok(()),
    }
}

/// Renders every kustomization, validates everything against the Kubernetes schemas and lints
/// the kind scripts.
pub fn check_manifests(root: &Path, out: &Path) -> anyhow::Result<()> {
    deps::ensure(PACKAGES)?;
    std::fs::create_dir_all(out)?;
    let mut files: Vec<PathBuf> = Vec::new();
    if have("kubectl") {
        kubectl_renders_labels()?;
        for (dir, name) in [
            ("deploy/base", "deploy-base.yaml"),
            ("deploy/overlays/e2e", "deploy-e2e.yaml"),
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

/// A running test API server for the controller's tests: `K8S_TEST_KUBECONFIG`; stopped on drop.
pub struct Envtest {
    kubeconfig: PathBuf,
    /// Whether a kube-controller-manager runs (garbage collection of owned objects).
    garbage_collector: bool,
    stop: Stop,
}

enum Stop {
    /// An envtest tool directory (`up`/`down` scripts).
    Script(PathBuf),
    /// Processes this xtask started from KUBEBUILDER_ASSETS, and their state directory.
    Processes(Vec<std::process::Child>, PathBuf),
}

impl Envtest {
    /// Starts a test API server, the first of:
    /// 1. `KUBEBUILDER_ASSETS` (Kubernetes' convention, as setup-envtest prints it): a directory
    ///    with `kube-apiserver` and `etcd` (and, if present, `kube-controller-manager` for the
    ///    garbage-collection test); etcd may also come from PATH;
    /// 2. `CMX_ENVTEST_TOOL`: a directory with `up` and `down` scripts;
    /// 3. `shared/tools/envtest` beside the repository (the team's machines).
    ///
    /// `Ok(None)` with a warning when none is there or kubectl is missing.
    pub fn up(root: &Path) -> anyhow::Result<Option<Envtest>> {
        if !have("kubectl") {
            eprintln!("xtask: WARNING: SKIPPING the Kubernetes API server tests: no kubectl");
            return Ok(None);
        }
        if let Some(assets) = std::env::var_os("KUBEBUILDER_ASSETS") {
            return assets::start(Path::new(&assets)).map(Some);
        }
        let tool = crate::shared_tool(root, "CMX_ENVTEST_TOOL", "envtest");
        if !tool.join("up").is_file() {
            eprintln!(
                "xtask: WARNING: SKIPPING the Kubernetes API server tests: set KUBEBUILDER_ASSETS (setup-envtest) or CMX_ENVTEST_TOOL; nothing at {}",
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
        Ok(Some(Envtest {
            kubeconfig,
            garbage_collector: true,
            stop: Stop::Script(tool),
        }))
    }

    /// Environment for `cargo test`: the kubeconfig, and a failure instead of a skip.
    pub fn apply(&self, cmd: &mut Command) {
        cmd.env("K8S_TEST_KUBECONFIG", &self.kubeconfig)
            .env("CMX_REQUIRE_ENVTEST", "1");
        if !self.garbage_collector {
            cmd.env("CMX_ENVTEST_NO_GC", "1");
        }
    }
}

impl Drop for Envtest {
    fn drop(&mut self) {
        match &mut self.stop {
            Stop::Script(tool) => {
                let _ = Command::new(tool.join("down")).output();
            }
            Stop::Processes(children, dir) => {
                for c in children.iter_mut().rev() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }
}

/// An API server from setup-envtest's binaries: fresh PKI and token, etcd on loopback, RBAC on.
mod assets {
    use super::*;

    const PORT: u16 = 17443;

    fn openssl(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .context("cannot run openssl")?;
        if !out.status.success() {
            bail!(
                "openssl {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    fn binary(assets: &Path, name: &str) -> Option<PathBuf> {
        let p = assets.join(name);
        if p.is_file() {
            return Some(p);
        }
        have(name).then(|| PathBuf::from(name))
    }

    fn spawn(dir: &Path, program: &Path, args: &[String], log: &str) -> anyhow::Result<std::process::Child> {
        let log = std::fs::File::create(dir.join(log))?;
        Command::new(program)
            .args(args)
            .current_dir(dir)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))
    }

    /// Writes the CA, the API server's certificate, a service-account key and an admin token.
    fn pki(dir: &Path) -> anyhow::Result<String> {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "ca.key",
                "-out",
                "ca.crt",
                "-days",
                "3",
                "-subj",
                "/CN=cmxsafe-envtest-ca",
            ],
        )?;
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "apiserver.key",
                "-out",
                "apiserver.csr",
                "-subj",
                "/CN=kube-apiserver",
            ],
        )?;
        std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1,DNS:localhost\n")?;
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                "apiserver.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "apiserver.crt",
                "-days",
                "3",
                "-extfile",
                "ext.cnf",
            ],
        )?;
        openssl(dir, &["genrsa", "-out", "sa.key", "2048"])?;
        openssl(dir, &["rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub"])?;
        let token: String = std::fs::read("/proc/sys/kernel/random/uuid")
            .map(|b| String::from_utf8_lossy(&b).trim().replace('-', ""))
            .context("cannot make a token")?;
        std::fs::write(
            dir.join("tokens.csv"),
            format!("{token},admin,admin-uid,system:masters\n"),
        )?;
        Ok(token)
    }

    fn kubeconfig(dir: &Path, token: &str) -> anyhow::Result<PathBuf> {
        let path = dir.join("kubeconfig");
        let ca = dir.join("ca.crt");
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: envtest\n  cluster: {{server: \"https://127.0.0.1:{PORT}\", certificate-authority: {}}}\nusers:\n- name: admin\n  user: {{token: {token}}}\ncontexts:\n- name: admin\n  context: {{cluster: envtest, user: admin, namespace: default}}\ncurrent-context: admin\n",
                ca.display()
            ),
        )?;
        Ok(path)
    }

    fn apiserver_args(dir: &Path, etcd_port: u16) -> Vec<String> {
        vec![
            format!("--etcd-servers=http://127.0.0.1:{etcd_port}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            format!("--secure-port={PORT}"),
            "--tls-cert-file=apiserver.crt".into(),
            "--tls-private-key-file=apiserver.key".into(),
            "--client-ca-file=ca.crt".into(),
            "--token-auth-file=tokens.csv".into(),
            "--authorization-mode=RBAC".into(),
            "--service-cluster-ip-range=10.96.0.0/16".into(),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            "--service-account-key-file=sa.pub".into(),
            "--service-account-signing-key-file=sa.key".into(),
            format!("--cert-dir={}", dir.join("certs").display()),
            "--allow-privileged=true".into(),
        ]
    }

    fn ready(kubeconfig: &Path) -> bool {
        (0..120).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(500));
            Command::new("kubectl")
                .arg("--kubeconfig")
                .arg(kubeconfig)
                .args(["get", "--raw", "/readyz"])
                .output()
                .is_ok_and(|o| o.status.success())
        })
    }

    pub fn start(assets: &Path) -> anyhow::Result<Envtest> {
        let missing = |what: &str| format!("KUBEBUILDER_ASSETS={} has no {what}", assets.display());
        let apiserver = binary(assets, "kube-apiserver").with_context(|| missing("kube-apiserver"))?;
        let etcd = binary(assets, "etcd").with_context(|| missing("etcd (nor is it on PATH)"))?;
        let dir = std::env::temp_dir().join(format!("cmx-envtest-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let kubeconfig = kubeconfig(&dir, &pki(&dir)?)?;
        let etcd_port = PORT + 1000;
        let etcd_args = [
            format!("--data-dir={}", dir.join("etcd").display()),
            format!("--listen-client-urls=http://127.0.0.1:{etcd_port}"),
            format!("--advertise-client-urls=http://127.0.0.1:{etcd_port}"),
            format!("--listen-peer-urls=http://127.0.0.1:{}", etcd_port + 1),
        ];
        // Owned by the Envtest from the first process on: an error stops what was started.
        let mut envtest = Envtest {
            kubeconfig,
            garbage_collector: false,
            stop: Stop::Processes(Vec::new(), dir.clone()),
        };
        let Stop::Processes(children, _) = &mut envtest.stop else {
            unreachable!("made just above");
        };
        children.push(spawn(&dir, &etcd, &etcd_args, "etcd.log")?);
        children.push(spawn(
            &dir,
            &apiserver,
            &apiserver_args(&dir, etcd_port),
            "apiserver.log",
        )?);
        if !ready(&envtest.kubeconfig) {
            bail!(
                "kube-apiserver from KUBEBUILDER_ASSETS did not become ready; see {}",
                dir.join("apiserver.log").display()
            );
        }
        match binary(assets, "kube-controller-manager") {
            Some(kcm) => {
                let args: Vec<String> = vec![
                    format!("--kubeconfig={}", envtest.kubeconfig.display()),
                    "--leader-elect=false".into(),
                    "--controllers=garbagecollector,namespace,endpoint,endpointslice,serviceaccount,serviceaccount-token".into(),
                    "--service-account-private-key-file=sa.key".into(),
                    "--root-ca-file=ca.crt".into(),
                    "--bind-address=127.0.0.1".into(),
                    format!("--secure-port={}", PORT + 2),
                ];
                if let Stop::Processes(children, _) = &mut envtest.stop {
                    children.push(spawn(&dir, &kcm, &args, "kcm.log")?);
                }
                envtest.garbage_collector = true;
            }
            None => eprintln!(
                "xtask: KUBEBUILDER_ASSETS has no kube-controller-manager: the garbage-collection test will say it was skipped"
            ),
        }
        eprintln!(
            "xtask: API server from KUBEBUILDER_ASSETS up ({})",
            envtest.kubeconfig.display()
        );
        Ok(envtest)
    }
}
