//! The BPF filesystem and the gateway's pin directory. Pins left by a gateway that was killed are
//! replaced: the directory is emptied at start and removed at clean shutdown.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into a zeroed struct we own; `c` is a valid C string.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// Makes sure the pin directory lies on a BPF filesystem. If its nearest existing ancestor is
/// not one (typically /sys/fs/bpf exists but nothing is mounted there, as on a fresh host without
/// systemd), a BPF filesystem is mounted on that ancestor, provided it is an empty directory:
/// never over a directory with content.
pub fn ensure_mounted(pin_dir: &Path) -> io::Result<()> {
    let existing = pin_dir.ancestors().find(|a| a.exists()).unwrap_or(Path::new("/"));
    if is_bpffs(existing) {
        return Ok(());
    }
    let target = mount_point(existing)?;
    mount(c"bpf", target)?;
    tracing::info!(path = %target.display(), "mounted the BPF filesystem");
    Ok(())
}

/// Mounts a pseudo filesystem of type `fstype` (its source named like it) on `target`, without
/// options: the bpf filesystem here, the cgroup v2 hierarchy in `cgroup`.
pub(super) fn mount(fstype: &CStr, target: &Path) -> io::Result<()> {
    let target_c = CString::new(target.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    // SAFETY: all pointers are valid C strings; no data argument.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target_c.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Where a BPF filesystem may be mounted for a pin directory whose nearest existing ancestor is
/// `existing`: that directory itself, if it is empty.
fn mount_point(existing: &Path) -> io::Result<&Path> {
    let empty = std::fs::read_dir(existing)?.next().is_none();
    if !existing.is_dir() || !empty || existing == Path::new("/") {
        return Err(io::Error::other(format!(
            "{} is not a BPF filesystem and not an empty directory to mount one on; mount one (mount -t bpf bpf /sys/fs/bpf) or choose a dataplane.pin_dir under one",
            existing.display()
        )));
    }
    Ok(existing)
}

/// Creates `dir` and takes an exclusive lock on it for as long as the returned file lives, so two
/// gateways never share a pin directory (the second would remove the first one's pins). Fails
/// with `WouldBlock` while another process holds it; the kernel releases it when the holder dies.
pub fn lock(dir: &Path) -> io::Result<File> {
    std::fs::create_dir_all(dir)?;
    let file = File::open(dir)?;
    // SAFETY: flock on a descriptor we own; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// Removes every pin in `dir` (stale ones from a killed gateway); returns how many.
pub fn clear(dir: &Path) -> io::Result<usize> {
    let mut removed = 0;
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for e in entries.flatten() {
                std::fs::remove_file(e.path())?;
                removed += 1;
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    std::fs::create_dir_all(dir)?;
    Ok(removed)
}

/// Pin directories beside `dir` that gateways which are gone left behind (with a pin directory
/// per pod, a deleted pod's pins are never reused): removes each directory whose entries are all
/// `cmx_` pins and whose lock nobody holds. A running gateway holds its own lock, so its pins
/// are never touched. Returns the directories removed.
pub fn remove_stale_siblings(dir: &Path) -> Vec<std::path::PathBuf> {
    let Some(parent) = dir.parent() else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for sibling in entries.flatten().map(|e| e.path()) {
        if sibling == dir || !sibling.is_dir() || !only_our_pins(&sibling) {
            continue;
        }
        // Locked by a live gateway: WouldBlock, and it stays.
        if let Ok(_held) = lock(&sibling) {
            remove(&sibling);
            removed.push(sibling);
        }
    }
    removed
}

/// Whether `dir` holds pins and nothing but `cmx_` pins.
fn only_our_pins(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return false;
    };
    let names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    !names.is_empty() && names.iter().all(|n| n.starts_with("cmx_"))
}

pub fn remove(dir: &Path) {
    let _ = clear(dir);
    let _ = std::fs::remove_dir(dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_siblings_go_and_live_or_foreign_ones_stay() {
        let root = tempfile::tempdir().unwrap();
        let dir = |name: &str, files: &[&str]| {
            let d = root.path().join(name);
            std::fs::create_dir_all(&d).unwrap();
            for f in files {
                std::fs::write(d.join(f), b"").unwrap();
            }
            d
        };
        let mine = dir("ns.gw-a", &["cmx_tags"]);
        let _mine_lock = lock(&mine).unwrap();
        let stale = dir("ns.gw-dead", &["cmx_tags", "cmx_socks"]);
        let live = dir("ns.gw-live", &["cmx_tags"]);
        let _live_lock = lock(&live).unwrap();
        let foreign = dir("tc", &["globals"]);
        let empty = dir("starting", &[]);
        assert_eq!(remove_stale_siblings(&mine), vec![stale.clone()]);
        assert!(!stale.exists());
        for stays in [&mine, &live, &foreign, &empty] {
            assert!(stays.exists(), "{} was removed", stays.display());
        }
    }

    #[test]
    fn bpffs_is_mounted_only_on_an_empty_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(mount_point(dir.path()).unwrap(), dir.path());
        std::fs::write(dir.path().join("x"), b"").unwrap();
        let e = mount_point(dir.path()).unwrap_err();
        assert!(e.to_string().contains("not an empty directory"), "{e}");
        assert!(mount_point(Path::new("/")).is_err());
    }
}
