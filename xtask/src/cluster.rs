//! A real one-node cluster for the end-to-end tests (`../shared/tools/minicluster`, or
//! `CMX_MINICLUSTER_TOOL`): containerd, a kubelet, kube-proxy and the control plane, offline. The
//! images are built from the binaries this run already built (no compile inside an image) and
//! imported into the node's containerd; the cluster is taken down when the tests are done,
//! whatever happened.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::check;

/// The images the end-to-end tests use, all tagged `e2e`: (name, Dockerfile, context, build args).
fn images(root: &Path, binaries: &Path) -> Vec<(&'static str, PathBuf, PathBuf, Vec<String>)> {
    vec![
        (
            "cmxsafe/cmx-gateway:e2e",
            root.join("deploy/gateway/Dockerfile.prebuilt"),
            binaries.to_path_buf(),
            vec![],
        ),
        (
            "cmxsafe/cmx-agent:e2e",
            root.join("deploy/agent/Dockerfile.prebuilt"),
            binaries.to_path_buf(),
            vec![],
        ),
        (
            "cmxsafe/iot-host:e2e",
            root.join("kind/iot/Dockerfile"),
            root.join("kind/iot"),
            vec!["--build-arg".into(), "AGENT_IMAGE=cmxsafe/cmx-agent:e2e".into()],
        ),
    ]
}

/// A running minicluster; `down` on drop.
pub struct Minicluster {
    tool: PathBuf,
    pub kubeconfig: PathBuf,
}

impl Minicluster {
    /// Starts the cluster (installing what it needs the first time), or `Ok(None)` with a
    /// warning when the machine has no minicluster tool.
    pub fn up(root: &Path) -> anyhow::Result<Option<Minicluster>> {
        let tool = crate::shared_tool(root, "CMX_MINICLUSTER_TOOL", "minicluster");
        if !tool.join("up").is_file() {
            eprintln!(
                "xtask: WARNING: SKIPPING the end-to-end tests on a real cluster: no minicluster tool at {} (set CMX_MINICLUSTER_TOOL)",
                tool.display()
            );
            return Ok(None);
        }
        let run = |args: &[&str]| -> anyhow::Result<String> {
            let out = Command::new(tool.join(args[0]))
                .args(&args[1..])
                .output()
                .with_context(|| format!("cannot run minicluster {}", args[0]))?;
            eprint!("{}", String::from_utf8_lossy(&out.stderr));
            if !out.status.success() {
                bail!("minicluster {} failed ({})", args.join(" "), out.status);
            }
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        run(&["build", "--docker"])?;
        run(&["images", "base"])?;
        // From here on the cluster must come down again, whatever happens.
        let mut cluster = Minicluster {
            tool: tool.clone(),
            kubeconfig: PathBuf::new(),
        };
        let up = run(&["up", "--docker"])?;
        cluster.kubeconfig = up
            .lines()
            .find_map(|l| l.trim().strip_prefix("export KUBECONFIG="))
            .map(|v| PathBuf::from(v.trim_matches(['"', '\''])))
            .with_context(|| format!("minicluster up printed no KUBECONFIG: {up}"))?;
        eprintln!("xtask: minicluster up ({})", cluster.kubeconfig.display());
        Ok(Some(cluster))
    }

    /// Builds the gateway, agent and IoT host images from the release binaries in `release`
    /// (stripped into `staging` first) and imports them into the node.
    pub fn build_images(&self, root: &Path, release: &Path, staging: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(staging)?;
        for bin in ["cmx-gateway", "cmx-agent"] {
            let status = Command::new("strip")
                .arg("-o")
                .arg(staging.join(bin))
                .arg(release.join(bin))
                .status()
                .context("cannot run strip (binutils)")?;
            check(status, &format!("strip {bin}"))?;
        }
        for (tag, dockerfile, context, extra) in images(root, staging) {
            eprintln!("xtask: image {tag} from {}", dockerfile.display());
            let status = Command::new(self.tool.join("images"))
                .args(["build", "-t", tag, "-f"])
                .arg(&dockerfile)
                .args(&extra)
                .arg(&context)
                .status()
                .context("cannot run minicluster images")?;
            check(status, &format!("building image {tag}"))?;
        }
        self.check_sizes()
    }

    /// Reports the images' sizes and refuses a gateway image that carries debug information
    /// (its debug build is ~125 MB; stripped, 16 MB on a ~120 MB base).
    fn check_sizes(&self) -> anyhow::Result<()> {
        const GATEWAY_MAX_MB: u64 = 200;
        for (tag, _, _, _) in images(Path::new("."), Path::new(".")) {
            let out = Command::new("docker")
                .env("DOCKER_HOST", "unix:///run/cmxsafe-minicluster/docker.sock")
                .args(["image", "inspect", "--format", "{{.Size}}", tag])
                .output()
                .context("cannot run docker image inspect")?;
            let bytes: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0);
            let mb = bytes / 1_000_000;
            eprintln!("xtask: image {tag}: {mb} MB");
            if tag.starts_with("cmxsafe/cmx-gateway") && mb > GATEWAY_MAX_MB {
                bail!("image {tag} is {mb} MB (> {GATEWAY_MAX_MB}): is the binary stripped?");
            }
        }
        Ok(())
    }
}

impl Drop for Minicluster {
    fn drop(&mut self) {
        match Command::new(self.tool.join("down")).output() {
            Ok(out) if out.status.success() => eprintln!("xtask: minicluster down"),
            Ok(out) => eprintln!(
                "xtask: minicluster down failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => eprintln!("xtask: cannot run minicluster down: {e}"),
        }
    }
}
