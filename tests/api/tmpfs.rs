//! A small disk for tests: a tmpfs of a fixed size, mounted as root, and a way to fill it.

use std::io::Write;
use std::path::Path;
use std::process::Command;

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A tmpfs of a fixed size mounted on a fresh directory; unmounted (lazily, so a process still
/// using it cannot keep it busy) when dropped, before the directory is removed.
pub struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `None` when root may not mount here (a container without the capability): said loudly.
    pub fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().expect("a mount point");
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if !out.status.success() && (said.contains("permission denied") || said.contains("not permitted")) {
            eprintln!("skipped: root may not mount a tmpfs here ({said}); the fail-writes hook test covers the logic");
            return None;
        }
        assert!(out.status.success(), "mount -t tmpfs failed ({}): {said}", out.status);
        Some(Tmpfs { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Bytes still free for an unprivileged writer.
    pub fn available(&self) -> u64 {
        let path = std::ffi::CString::new(self.path().as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: statvfs only writes the struct we pass; the path is a valid C string.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::statvfs(path.as_ptr(), &mut st) };
        assert_eq!(rc, 0, "statvfs: {}", std::io::Error::last_os_error());
        st.f_bavail as u64 * st.f_frsize as u64
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

/// Writes `path` until the file system has no room left (ENOSPC), in smaller and smaller
/// pieces so that not even a page is left; returns the bytes written.
pub fn fill_disk(path: &Path) -> u64 {
    let mut file = std::fs::File::create(path).expect("create the filler file");
    let mut written = 0u64;
    for piece in [1 << 16, 4096, 512, 1] {
        let buf = vec![0xa5u8; piece];
        loop {
            match file.write(&buf) {
                Ok(0) => break,
                Ok(n) => written += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("writing the filler file: {e}"),
            }
        }
    }
    written
}
