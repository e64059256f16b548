//! What this host has mounted where, from `/proc/self/mountinfo`.

use std::path::PathBuf;

/// The mount point of the cgroup v2 hierarchy: /sys/fs/cgroup on most systems, and
/// /sys/fs/cgroup/unified on hybrid setups (v1 controllers beside a v2 tree).
pub fn cgroup2() -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    first_of_type(&info, "cgroup2")
}

/// The first mount point of a filesystem of type `fstype` in a mountinfo text.
fn first_of_type(mountinfo: &str, fstype: &str) -> Option<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let kind = right.split_whitespace().next()?;
            let mount_point = left.split_whitespace().nth(4)?;
            (kind == fstype).then(|| PathBuf::from(mount_point))
        })
        .next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_of_a_hybrid_host() {
        let info = "\
25 30 0:23 / /sys rw,nosuid - sysfs sysfs rw
31 25 0:26 / /sys/fs/cgroup ro - tmpfs tmpfs ro,mode=755
32 31 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw,nsdelegate
33 31 0:28 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
";
        assert_eq!(
            first_of_type(info, "cgroup2"),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(first_of_type(info, "bpf"), None);
    }
}
