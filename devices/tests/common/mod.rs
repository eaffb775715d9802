//! Helpers the device-process tests share (each test file includes this module and uses
//! part of it).
#![allow(dead_code)]

pub mod frontend;

use std::io::{self, Read};
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The fd number a device process inherits the test's fd as.
pub const CHILD_FD: RawFd = 100;

/// `bin --socket SOCKET args...` with stdin and stdout closed and `fd` (if any) inherited
/// as [`CHILD_FD`].
pub fn command(bin: &str, socket: &Path, args: &[&str], fd: Option<RawFd>) -> Command {
    let mut cmd = command_with_fds(bin, &[], fd.map(|f| (f, CHILD_FD)).as_slice());
    cmd.arg("--socket").arg(socket).args(args);
    cmd
}

/// `bin args...` with stdin and stdout closed and each `(fd, number)` of `fds` inherited as
/// `number` (numbers past the test's own fds, e.g. 100 and up).
pub fn command_with_fds(bin: &str, args: &[&str], fds: &[(RawFd, RawFd)]) -> Command {
    let mut cmd = Command::new(bin);
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::null());
    let fds = fds.to_vec();
    if !fds.is_empty() {
        // SAFETY: the closure only calls dup2, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                for &(src, dst) in &fds {
                    if libc::dup2(src, dst) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }
    cmd
}

/// Runs `bin` with `args` on a socket that cannot be created (so it only checks its
/// options and exits): its exit code and stderr.
pub fn run(bin: &str, args: &[&str], fd: Option<RawFd>) -> (i32, String) {
    let Output { status, stderr, .. } =
        command(bin, Path::new("/nonexistent-dir/x.sock"), args, fd)
            .output()
            .expect("run the device process");
    (
        status.code().expect("exit code"),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

/// Waits until `child` listens on `socket`; panics with its stderr if it exits first.
pub fn wait_listening(child: &mut Child, socket: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        if let Some(status) = child.try_wait().expect("try_wait") {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("the device process exited ({status}) instead of listening: {err}");
        }
        assert!(
            Instant::now() < deadline,
            "the device process did not listen"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A child process that is killed and reaped when this is dropped, so that a failing test
/// leaves nothing running.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Kills and reaps `child`.
pub fn stop(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}
