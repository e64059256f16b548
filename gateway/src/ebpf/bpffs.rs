//! The BPF filesystem and the gateway's pin directory. Pins left by a gateway that was killed are
//! replaced: the directory is emptied at start and removed at clean shutdown.

use std::ffi::CString;
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

/// Makes sure the pin directory lies on a BPF filesystem: if its nearest existing ancestor is
/// not one (typically /sys/fs/bpf not mounted), mounts one at the pin directory's parent.
pub fn ensure_mounted(pin_dir: &Path) -> io::Result<()> {
    let existing = pin_dir.ancestors().find(|a| a.exists()).unwrap_or(Path::new("/"));
    if is_bpffs(existing) {
        return Ok(());
    }
    let root = pin_dir.parent().unwrap_or(Path::new("/sys/fs/bpf"));
    std::fs::create_dir_all(root)?;
    let target = CString::new(root.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
    let fstype = CString::new("bpf").map_err(io::Error::other)?;
    // SAFETY: all pointers are valid C strings; no data argument.
    let rc = unsafe {
        libc::mount(
            fstype.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    tracing::info!(path = %root.display(), "mounted the BPF filesystem");
    Ok(())
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

pub fn remove(dir: &Path) {
    let _ = clear(dir);
    let _ = std::fs::remove_dir(dir);
}
