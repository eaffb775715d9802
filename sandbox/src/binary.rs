//! The programs skiff may start as device processes: checked here by the VMM, and again by
//! skiff-jailer's launcher when it starts them for a jailed VMM (one copy of the checks).
//!
//! The operator names one directory (`--device-bin-dir`, default the directory of the skiff
//! executable). Every device process, the first one of a device, a restart after a crash and
//! an upgrade that an API client asks for alike, runs a file from that directory and nothing
//! else:
//!
//! - the directory is owned by root or by skiff's own user and is writable by its owner only,
//!   so nobody else can add, replace or rename a program in it;
//! - a name is resolved with `openat2(RESOLVE_BENEATH)` from the directory, so `..`, absolute
//!   symbolic links and links that lead out of it are refused (links inside it work);
//! - the file is regular, owned by root or skiff's user, writable by its owner only,
//!   executable, and an ELF executable (no interpreter scripts);
//! - it is started through the descriptor that was checked (`/proc/self/fd/N`), so the file
//!   that runs is the file that was checked even if a name is swapped in between.
//!
//! The environment of a device process is cleared by skiff's `device_process` (or the launcher).

use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use crate::launch::LauncherClient;

/// Errors finding or checking a device binary.
#[derive(Debug, thiserror::Error)]
pub enum DeviceBinaryError {
    /// The directory cannot be opened.
    #[error("device binary directory {0}")]
    OpenDir(String, #[source] std::io::Error),
    /// skiff's own location is unknown (for the default directory).
    #[error("cannot find the directory of the skiff executable (give --device-bin-dir)")]
    NoExeDir(#[source] std::io::Error),
    /// The directory may be changed by others.
    #[error(
        "device binary directory {0} is writable by group or others (mode {1:o}): only its \
         owner may be able to add programs to it"
    )]
    DirWritable(String, u32),
    /// The directory is owned by another user.
    #[error("device binary directory {0} is owned by uid {1}, neither root nor skiff's user")]
    DirOwner(String, u32),
    /// The name is not a plain relative path inside the directory.
    #[error("device binary '{0}' is not in the device binary directory {1}")]
    Outside(String, String),
    /// The name cannot be opened beneath the directory (missing, or a link out of it).
    #[error("device binary '{0}' in {1}")]
    Open(String, String, #[source] std::io::Error),
    /// Not a regular file.
    #[error("device binary {0} is not a regular file")]
    NotRegular(String),
    /// Writable by others.
    #[error("device binary {0} is writable by group or others (mode {1:o})")]
    Writable(String, u32),
    /// Owned by another user.
    #[error("device binary {0} is owned by uid {1}, neither root nor skiff's user")]
    Owner(String, u32),
    /// No execute permission.
    #[error("device binary {0} is not executable (mode {1:o})")]
    NotExecutable(String, u32),
    /// Not an ELF file.
    #[error("device binary {0} is not an ELF executable (scripts are not started)")]
    NotElf(String),
}

/// The directory device binaries come from.
#[derive(Debug)]
pub struct BinaryDir {
    path: PathBuf,
    fd: OwnedFd,
    /// Under skiff-jailer: who starts the programs (see [`crate::launch`]).
    launcher: Option<Arc<LauncherClient>>,
}

/// A checked device binary, open: start it with [`DeviceBinary::exec_path`].
#[derive(Debug)]
pub struct DeviceBinary {
    path: PathBuf,
    launcher: Option<Arc<LauncherClient>>,
    /// The name relative to the directory.
    rel: PathBuf,
    fd: OwnedFd,
}

/// Whether `uid` may own device binaries: root or the user skiff runs as.
fn trusted_owner(uid: u32) -> bool {
    // SAFETY: geteuid has no preconditions.
    uid == 0 || uid == unsafe { libc::geteuid() }
}

impl BinaryDir {
    /// Opens and checks `dir`, or the directory of the running skiff when `None`.
    pub fn open(dir: Option<&Path>) -> Result<Self, DeviceBinaryError> {
        let path = match dir {
            Some(d) => d.to_path_buf(),
            None => std::env::current_exe()
                .map_err(DeviceBinaryError::NoExeDir)?
                .parent()
                .map(Path::to_path_buf)
                .ok_or_else(|| {
                    DeviceBinaryError::NoExeDir(std::io::Error::other("it has no parent"))
                })?,
        };
        let path = std::fs::canonicalize(&path)
            .map_err(|e| DeviceBinaryError::OpenDir(path.display().to_string(), e))?;
        let shown = path.display().to_string();
        let cpath = CString::new(path.as_os_str().as_bytes()).map_err(|_| {
            DeviceBinaryError::OpenDir(shown.clone(), std::io::Error::other("NUL in the path"))
        })?;
        // SAFETY: a NUL-terminated path; the result is checked.
        let fd = unsafe {
            libc::open(
                cpath.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(DeviceBinaryError::OpenDir(
                shown,
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: a fresh fd owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let meta = File::from(
            fd.try_clone()
                .map_err(|e| DeviceBinaryError::OpenDir(shown.clone(), e))?,
        )
        .metadata()
        .map_err(|e| DeviceBinaryError::OpenDir(shown.clone(), e))?;
        if !trusted_owner(meta.uid()) {
            return Err(DeviceBinaryError::DirOwner(shown, meta.uid()));
        }
        if meta.mode() & 0o022 != 0 {
            return Err(DeviceBinaryError::DirWritable(shown, meta.mode() & 0o7777));
        }
        Ok(BinaryDir {
            path,
            fd,
            launcher: None,
        })
    }

    /// Programs of this directory are started by `launcher` (skiff-jailer's, outside the
    /// cell, which checks them again in its own view of this directory) instead of by
    /// this process.
    pub fn with_launcher(mut self, launcher: Arc<LauncherClient>) -> Self {
        self.launcher = Some(launcher);
        self
    }

    /// Whether programs of this directory are started by a launcher.
    pub fn launched(&self) -> bool {
        self.launcher.is_some()
    }

    /// The launcher that starts programs of this directory, if any.
    pub fn launcher(&self) -> Option<&Arc<LauncherClient>> {
        self.launcher.as_ref()
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Opens and checks `name`: a path relative to the directory, or an absolute path that
    /// lies in it.
    pub fn resolve(&self, name: &Path) -> Result<DeviceBinary, DeviceBinaryError> {
        let dir = self.path.display().to_string();
        let outside = || DeviceBinaryError::Outside(name.display().to_string(), dir.clone());
        let rel = if name.is_absolute() {
            name.strip_prefix(&self.path).map_err(|_| outside())?
        } else {
            name
        };
        if rel.as_os_str().is_empty()
            || !rel.components().all(|c| matches!(c, Component::Normal(_)))
        {
            return Err(outside());
        }
        let crel = CString::new(rel.as_os_str().as_bytes()).map_err(|_| outside())?;
        let fd = open_read_only(
            self.fd.as_fd(),
            &crel,
            libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS,
        );
        let full = self.path.join(rel);
        let shown = full.display().to_string();
        let fd = fd.map_err(|e| match e.raw_os_error() {
            Some(libc::EXDEV) | Some(libc::ELOOP) => outside(),
            _ => DeviceBinaryError::Open(name.display().to_string(), dir.clone(), e),
        })?;
        let mut file = File::from(fd);
        let meta = file
            .metadata()
            .map_err(|e| DeviceBinaryError::Open(name.display().to_string(), dir.clone(), e))?;
        let mode = meta.mode() & 0o7777;
        if !meta.is_file() {
            return Err(DeviceBinaryError::NotRegular(shown));
        }
        if !trusted_owner(meta.uid()) {
            return Err(DeviceBinaryError::Owner(shown, meta.uid()));
        }
        if mode & 0o022 != 0 {
            return Err(DeviceBinaryError::Writable(shown, mode));
        }
        if mode & 0o100 == 0 {
            return Err(DeviceBinaryError::NotExecutable(shown, mode));
        }
        let mut magic = [0u8; 4];
        if file.read_exact(&mut magic).is_err() || &magic != b"\x7fELF" {
            return Err(DeviceBinaryError::NotElf(shown));
        }
        Ok(DeviceBinary {
            path: full,
            launcher: self.launcher.clone(),
            rel: rel.to_path_buf(),
            fd: file.into(),
        })
    }
}

/// `openat2(dir, path, O_RDONLY | O_CLOEXEC | O_NOCTTY, resolve)`: a file opened with the
/// kernel's own path-resolution limits (RESOLVE_BENEATH, RESOLVE_IN_ROOT, ...).
pub fn open_read_only(
    dir: std::os::fd::BorrowedFd<'_>,
    path: &std::ffi::CStr,
    resolve: u64,
) -> std::io::Result<OwnedFd> {
    // SAFETY: open_how is plain data; all zeroes is its "no flags" value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOCTTY) as u64;
    how.resolve = resolve;
    // SAFETY: openat2 with an open directory fd, a NUL-terminated path and an open_how of
    // the size passed; the result is checked.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

impl DeviceBinary {
    /// Its path in the directory (for messages and reports).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The launcher that starts it, under skiff-jailer.
    pub fn launcher(&self) -> Option<&Arc<LauncherClient>> {
        self.launcher.as_ref()
    }

    /// Its name relative to the directory (what a jailed VMM asks its launcher for).
    pub fn relative(&self) -> &Path {
        &self.rel
    }

    /// The open, checked file (`execveat(fd, "", AT_EMPTY_PATH)` runs exactly it).
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fd.as_fd()
    }

    /// The path that runs exactly the checked file, as long as `self` is open.
    pub fn exec_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }

    /// The file name, for the program's `argv[0]`.
    pub fn file_name(&self) -> &std::ffi::OsStr {
        self.path.file_name().unwrap_or(self.path.as_os_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn setup(label: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("skiff-bindir-{label}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir(&d).expect("mkdir");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::copy("/bin/true", d.join("good")).expect("copy");
        std::fs::set_permissions(d.join("good"), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        d
    }

    fn err(dir: &BinaryDir, name: &str) -> String {
        match dir.resolve(Path::new(name)) {
            Ok(b) => panic!("{name} was accepted as {}", b.path().display()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn only_checked_files_in_the_directory_resolve() {
        let d = setup("resolve");
        let dir = BinaryDir::open(Some(&d)).expect("open");
        let good = dir.resolve(Path::new("good")).expect("good");
        assert_eq!(good.path(), d.join("good"));
        dir.resolve(&d.join("good")).expect("absolute path inside");
        // Outside: absolute elsewhere, `..`, a link out of it.
        assert!(err(&dir, "/bin/true").contains("is not in the device binary directory"));
        assert!(err(&dir, "../x").contains("is not in"));
        std::os::unix::fs::symlink("/bin/true", d.join("out")).expect("symlink");
        assert!(err(&dir, "out").contains("is not in"));
        std::os::unix::fs::symlink("good", d.join("in")).expect("symlink");
        dir.resolve(Path::new("in"))
            .expect("a link inside the directory");
        assert!(err(&dir, "missing").contains("missing"));
        // Writable by others, not executable, a script, a directory.
        std::fs::copy("/bin/true", d.join("open")).expect("copy");
        std::fs::set_permissions(d.join("open"), std::fs::Permissions::from_mode(0o757))
            .expect("chmod");
        assert!(err(&dir, "open").contains("writable by group or others"));
        std::fs::copy("/bin/true", d.join("noexec")).expect("copy");
        std::fs::set_permissions(d.join("noexec"), std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
        assert!(err(&dir, "noexec").contains("not executable"));
        std::fs::write(d.join("script"), "#!/bin/sh\ntouch /tmp/x\n").expect("write");
        std::fs::set_permissions(d.join("script"), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        assert!(err(&dir, "script").contains("not an ELF executable"));
        std::fs::create_dir(d.join("sub")).expect("mkdir");
        assert!(err(&dir, "sub").contains("not a regular file"));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_directory_others_can_write_is_refused() {
        let d = setup("dirmode");
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let e = BinaryDir::open(Some(&d)).expect_err("a 0777 directory");
        assert!(e.to_string().contains("writable by group or others"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn the_checked_file_runs() {
        let d = setup("exec");
        let dir = BinaryDir::open(Some(&d)).expect("open");
        let b = dir.resolve(Path::new("good")).expect("good");
        let st = std::process::Command::new(b.exec_path())
            .status()
            .expect("run");
        assert!(st.success());
        let _ = std::fs::remove_dir_all(&d);
    }
}
