//! The gateway's own cgroup v2 child, where its cgroup programs are attached. The process moves
//! itself there before creating any identity socket (a socket belongs to the cgroup of the
//! process that creates it). A child left by a killed gateway (no processes in it) is removed at
//! start; a child with live processes belongs to another gateway and is an error.

use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "no cgroup v2 hierarchy is mounted (looked in /proc/self/mountinfo); mount one or set dataplane.cgroup"
    )]
    NoV2,
    #[error(
        "cgroup {path} is used by live processes ({pids}): another gateway? set dataplane.cgroup to another path"
    )]
    Busy { path: PathBuf, pids: String },
    #[error(
        "{path} is not in a cgroup v2 hierarchy ({ancestor} is not on a cgroup2 filesystem): set dataplane.cgroup to a directory under {mount}"
    )]
    NotCgroup {
        path: PathBuf,
        ancestor: PathBuf,
        mount: PathBuf,
    },
    #[error("cgroup {path}: {what}: {cause}")]
    Io {
        path: PathBuf,
        what: &'static str,
        cause: io::Error,
    },
}

fn io_err<'a>(path: &'a Path, what: &'static str) -> impl FnOnce(io::Error) -> CgroupError + 'a {
    move |cause| CgroupError::Io {
        path: path.to_path_buf(),
        what,
        cause,
    }
}

/// `CGROUP2_SUPER_MAGIC` from linux/magic.h: statfs's f_type for a cgroup v2 filesystem.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Whether `path` is on a cgroup v2 filesystem.
fn is_cgroup2(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the struct it is given; a zeroed statfs is a valid value.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid pointer.
    if unsafe { libc::statfs(c_path.as_ptr(), &mut fs) } != 0 {
        return false;
    }
    #[allow(clippy::unnecessary_cast)]
    let kind = fs.f_type as i64;
    kind == CGROUP2_SUPER_MAGIC
}

/// The mount point of the cgroup v2 hierarchy (see `cmx_net::mounts::cgroup2`).
pub fn v2_mount() -> Result<PathBuf, CgroupError> {
    cmx_net::mounts::cgroup2().ok_or(CgroupError::NoV2)
}

/// Where the gateway mounts the cgroup v2 hierarchy when nothing in its mount namespace shows it.
pub const OWN_V2_MOUNT: &str = "/run/cmxsafe/cgroup2";

/// The cgroup v2 hierarchy, mounted at `OWN_V2_MOUNT` first if this mount namespace has none.
/// That is the case in containers on hybrid-cgroup hosts (v1 controllers, v2 at
/// /sys/fs/cgroup/unified): runc mounts only the v1 hierarchies into them. Mounting needs
/// CAP_SYS_ADMIN, which the sockmap data plane needs anyway; the mount lives in the gateway's
/// own mount namespace and goes with it.
pub fn v2_mount_or_mount() -> Result<PathBuf, CgroupError> {
    if let Ok(mount) = v2_mount() {
        return Ok(mount);
    }
    let target = Path::new(OWN_V2_MOUNT);
    let failed = |cause| CgroupError::Io {
        path: target.to_path_buf(),
        what: "mounting the cgroup v2 hierarchy (none was mounted)",
        cause,
    };
    std::fs::create_dir_all(target).map_err(failed)?;
    super::bpffs::mount(c"cgroup2", target).map_err(failed)?;
    tracing::info!(
        path = OWN_V2_MOUNT,
        "no cgroup v2 hierarchy was mounted here: mounted one"
    );
    Ok(target.to_path_buf())
}

fn procs(path: &Path) -> String {
    std::fs::read_to_string(path.join("cgroup.procs"))
        .unwrap_or_default()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(",")
}

/// The cgroup the process is in now (the `0::` line of /proc/self/cgroup, under `mount`).
fn current(mount: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    Some(in_hierarchy(mount, &text))
}

/// The cgroup v2 path a /proc/self/cgroup text names, under `mount` (`0::/` is the root).
fn in_hierarchy(mount: &Path, proc_cgroup: &str) -> PathBuf {
    let rel = proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("/")
        .trim();
    // A process in a cgroup namespace may see its own cgroup as "/": that is the mount.
    mount.join(rel.trim_start_matches('/'))
}

/// The default cgroup of the gateway: `cmxsafe-gateway` below the cgroup it runs in, so that
/// in a container it stays under the container's cgroup (the pod's limits keep applying, and
/// two gateways on one host never meet), and on a plain host it sits below its service.
pub fn default_path() -> Result<PathBuf, CgroupError> {
    let mount = v2_mount_or_mount()?;
    let own = current(&mount).unwrap_or_else(|| mount.clone());
    Ok(own.join("cmxsafe-gateway"))
}

pub struct OwnCgroup {
    pub path: PathBuf,
    previous: Option<PathBuf>,
}

impl OwnCgroup {
    /// Creates `path` (replacing a stale one) and moves this process into it.
    pub fn enter(path: &Path) -> Result<OwnCgroup, CgroupError> {
        let mount = v2_mount_or_mount()?;
        if path.exists() {
            let pids = procs(path);
            if !pids.is_empty() {
                return Err(CgroupError::Busy {
                    path: path.to_path_buf(),
                    pids,
                });
            }
            // Left by a gateway that was killed: its links died with it; the directory goes.
            std::fs::remove_dir(path).map_err(io_err(path, "removing a stale cgroup"))?;
            tracing::warn!(cgroup = %path.display(), "removed a stale cgroup left by an earlier gateway");
        }
        // A plain directory would take the mkdir and even a "cgroup.procs" file, and the failure
        // would only come at attach time, leaving both behind.
        let ancestor = path.ancestors().find(|a| a.exists()).unwrap_or(Path::new("/"));
        if !is_cgroup2(ancestor) {
            return Err(CgroupError::NotCgroup {
                path: path.to_path_buf(),
                ancestor: ancestor.to_path_buf(),
                mount,
            });
        }
        let previous = current(&mount);
        std::fs::create_dir_all(path).map_err(io_err(path, "creating"))?;
        let moved = std::fs::OpenOptions::new()
            .write(true)
            .open(path.join("cgroup.procs"))
            .and_then(|mut f| std::io::Write::write_all(&mut f, std::process::id().to_string().as_bytes()));
        if let Err(cause) = moved {
            let _ = std::fs::remove_dir(path);
            return Err(io_err(path, "moving the gateway into it")(cause));
        }
        Ok(OwnCgroup {
            path: path.to_path_buf(),
            previous,
        })
    }

    pub fn file(&self) -> io::Result<std::fs::File> {
        std::fs::File::open(&self.path)
    }

    /// Moves the process back and removes the cgroup (its attachments go with it).
    pub fn leave(self) {
        if let Some(prev) = &self.previous {
            let _ = std::fs::write(prev.join("cgroup.procs"), std::process::id().to_string());
        }
        match std::fs::remove_dir(&self.path) {
            Ok(()) => tracing::info!(cgroup = %self.path.display(), "cgroup removed"),
            Err(e) => {
                tracing::warn!(cgroup = %self.path.display(), error = %e, "could not remove the cgroup")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_own_cgroup_is_read_from_the_unified_line() {
        let mount = Path::new("/sys/fs/cgroup/unified");
        let hybrid = "12:cpu,cpuacct:/kubepods/besteffort/pod1/abc\n1:name=systemd:/kubepods/x\n0::/kubepods/besteffort/pod1/abc\n";
        assert_eq!(
            in_hierarchy(mount, hybrid),
            Path::new("/sys/fs/cgroup/unified/kubepods/besteffort/pod1/abc")
        );
        assert_eq!(in_hierarchy(mount, "0::/\n"), mount);
        assert_eq!(in_hierarchy(mount, ""), mount, "no v2 line: the root");
    }
}
