//! What test gateways leave on the node while they run: a pin directory under /sys/fs/bpf and a
//! cgroup under the cgroup v2 mount, each below a shared `cmxsafe-test` parent.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Parent of every test gateway's cgroup and pin directory.
const TEST_PARENT: &str = "cmxsafe-test";

pub fn cgroup_v2_mount() -> PathBuf {
    cmx_net::mounts::cgroup2().expect("a cgroup v2 hierarchy is mounted")
}

/// The cgroup of the test gateway named `name`.
pub fn test_cgroup(name: &str) -> PathBuf {
    cgroup_v2_mount().join(TEST_PARENT).join(name)
}

/// The pin directory of the test gateway named `name`.
pub fn test_pin_dir(name: &str) -> PathBuf {
    Path::new("/sys/fs/bpf").join(TEST_PARENT).join(name)
}

/// Test gateways of this process whose cgroup and pin directory may exist under the shared
/// parents. Parents are removed only when none is left, under this lock, so that one test's
/// clean-up never removes a parent while another test's gateway is creating its child in it.
static LIVE_GATEWAYS: Mutex<usize> = Mutex::new(0);

/// Held by each test gateway for its whole life (taken before it starts).
pub(crate) struct UsesTestParents(());

impl UsesTestParents {
    pub(crate) fn take() -> UsesTestParents {
        *LIVE_GATEWAYS.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        UsesTestParents(())
    }
}

impl Drop for UsesTestParents {
    /// The last gateway out removes the shared parents once they are empty (each gateway removes
    /// its own cgroup and pins on exit; a killed one leaves them, and then the parents stay).
    fn drop(&mut self) {
        let mut live = LIVE_GATEWAYS.lock().unwrap_or_else(|p| p.into_inner());
        *live -= 1;
        if *live == 0 {
            let _ = std::fs::remove_dir(Path::new("/sys/fs/bpf").join(TEST_PARENT));
            if let Some(mount) = cmx_net::mounts::cgroup2() {
                let _ = std::fs::remove_dir(mount.join(TEST_PARENT));
            }
        }
    }
}
