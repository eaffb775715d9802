//! Device processes (`skiff-blk`, `skiff-net`): started per device, watched through a
//! pidfd, stopped and reaped at the end.

use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Errors starting a device process.
#[derive(Debug, thiserror::Error)]
pub enum DeviceProcessError {
    /// The binary could not be started.
    #[error("cannot start {bin}")]
    Spawn {
        /// Binary.
        bin: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// pidfd_open failed.
    #[error("cannot watch {0}")]
    Pidfd(String, #[source] std::io::Error),
}

/// A running device process.
pub struct DeviceProcess {
    /// e.g. "skiff-blk for drive rootfs".
    pub name: String,
    child: Child,
    /// Readable when the process exits.
    pub pidfd: OwnedFd,
    /// Its vhost-user socket.
    pub socket: PathBuf,
}

/// Finds a device binary: `dir` when given, else next to the running skiff, else PATH.
pub fn find_binary(name: &str, dir: Option<&Path>) -> PathBuf {
    if let Some(d) = dir {
        return d.join(name);
    }
    if let Some(here) = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
    {
        let p = here.join(name);
        if p.exists() {
            return p;
        }
    }
    PathBuf::from(name)
}

impl DeviceProcess {
    /// Starts `bin args...`; it must listen on `socket`.
    pub fn spawn(
        name: String,
        bin: &Path,
        args: &[String],
        socket: PathBuf,
    ) -> Result<Self, DeviceProcessError> {
        let mut cmd = Command::new(bin);
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::null());
        // SAFETY: the closure runs in the child between fork and exec and calls only
        // async-signal-safe functions (prctl, sigprocmask).
        unsafe {
            cmd.pre_exec(|| {
                // Die with the VMM, whatever way it ends.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The VMM blocks SIGTERM/SIGINT to read them from a signalfd; the child
                // must not inherit that.
                let mut empty: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut empty);
                libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|source| DeviceProcessError::Spawn {
            bin: bin.display().to_string(),
            source,
        })?;
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
        if fd < 0 {
            return Err(DeviceProcessError::Pidfd(
                name,
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: fd is a fresh pidfd owned by nobody else.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        log::debug!("started {name} (pid {})", child.id());
        Ok(DeviceProcess {
            name,
            child,
            pidfd,
            socket,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Err(description)` when the process has exited.
    pub fn check_alive(&mut self) -> Result<(), String> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(format!(
                "{} (pid {}) exited: {status}",
                self.name,
                self.pid()
            )),
            Err(e) => Err(format!(
                "{} (pid {}): cannot check it: {e}",
                self.name,
                self.pid()
            )),
        }
    }

    /// Waits up to `grace` for the process to exit on its own (its frontend has hung up),
    /// then kills it; reaps it either way.
    pub fn stop(mut self, grace: Duration) {
        let deadline = Instant::now() + grace;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => {
                    log::debug!("{} exited: {status}", self.name);
                    return;
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                _ => break,
            }
        }
        log::warn!(
            "{} (pid {}) did not exit; killing it",
            self.name,
            self.pid()
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
