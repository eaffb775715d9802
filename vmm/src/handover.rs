//! The VMM's live upgrade, as data and on the wire: what the running VMM hands the process
//! that replaces it ([`Handover`]) and the fds that go with it, over a Unix stream socket
//! between the two (skiff-jailer's launcher starts the new process with its end).
//!
//! The conversation, each line `\n`-terminated ASCII:
//!
//! 1. new → old: `SKIFF-HANDOVER MIN MAX [FEATURE...]`, the state versions the new binary
//!    reads and what it can do beyond this list ([`Hello`]; unknown features are ignored).
//!    The old VMM checks that it writes one of those versions before it pauses anything.
//! 2. With the feature `prepare` ([`FEATURE_PREPARE`]), while the guest still runs:
//!    old → new `PREPARE BYTES` and the guest RAM memfd in one fd message; the new VMM
//!    maps it and creates its KVM VM, then new → old `PREPARED` or `ERROR why`. The
//!    hand-over (3) carries the memfd again: the new VMM checks it is the same file.
//! 3. old → new (the pause has begun): the hand-over: 8 bytes of length (little-endian),
//!    the [`Handover`] as JSON, then its fds in the order [`Handover::fd_count`] counts
//!    them, up to [`FDS_PER_MESSAGE`] per one-byte message.
//! 4. new → old: `READY` (the VM is rebuilt, its vCPUs parked) or `ERROR why`.
//! 5. old → new: `GO US`, once skiff-jailer's supervisor follows the new process, with the
//!    microseconds since the old VMM stopped its vCPUs; a hang-up before `GO` means abort
//!    (the old VMM resumes the guest) and one after `READY` with the old VMM gone means go
//!    on.
//! 6. new → old: `RUNNING US`, the whole pause: vCPUs stopped there → running here.
//! 7. Until the old VMM exits, it passes on over the same socket what its API still holds
//!    (requests and connections; see successor.rs).
//!
//! This is the first version of the conversation that shipped: a later one may add steps
//! only behind a feature of the hello, which this version parses and ignores.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use api_server::models::Logger;
use serde::{Deserialize, Serialize};

use crate::devices::virtio::vhost_user::{FrontendFds, FrontendState};
use crate::state::VmState;

/// Errors on the hand-over socket.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// Reading or writing the socket.
    #[error("the hand-over socket failed")]
    Io(#[source] std::io::Error),
    /// The other side hung up.
    #[error("the other VMM process hung up")]
    Closed,
    /// No answer in time.
    #[error("no answer within {0} ms")]
    Timeout(u128),
    /// A message broke the protocol.
    #[error("malformed hand-over message: {0}")]
    Malformed(String),
}

/// Fds per message (under the kernel's 253).
pub const FDS_PER_MESSAGE: usize = 200;
/// The largest hand-over accepted.
const MAX_HANDOVER: u64 = crate::state::file::MAX_STATE;
/// The longest line.
const MAX_LINE: usize = 4096;

/// Everything of the VM that is not in an fd.
#[derive(Debug, Serialize, Deserialize)]
pub struct Handover {
    /// The state version `state` is in.
    pub version: u32,
    /// The VM's state (device rings keep running: no positions in it).
    pub state: VmState,
    /// Per device, in transport order: what goes with its fds.
    pub devices: Vec<DeviceHandover>,
    /// The vCPUs were running (the new VMM resumes them).
    pub running: bool,
    /// The logger configuration, if one was set.
    pub logger: Option<Logger>,
    /// The metrics file, if one was set (reopened by the new VMM).
    pub metrics_path: Option<String>,
    /// The API's listening socket is the last fd.
    pub api_listener: bool,
    /// The lifecycle counters and pause histograms, to go on from.
    pub counters: crate::metrics::VmCounters,
    /// Console input read from stdin and not yet taken by the UART.
    #[serde(default)]
    pub console_pending: Vec<u8>,
}

/// One device's part of the hand-over.
#[derive(Debug, Serialize, Deserialize)]
pub struct DeviceHandover {
    /// drive_id or iface_id.
    pub id: String,
    /// The vhost-user front end.
    pub frontend: FrontendState,
    /// The device binary skiff started.
    pub binary: Option<PathBuf>,
    /// An external backend's socket path.
    pub socket: Option<PathBuf>,
    /// Image path or TAP name.
    pub backing: String,
    /// Read-only drive.
    pub read_only: bool,
    /// skiff-blk serves it through io_uring (absent from a skiff before 2026-12-07: sync).
    #[serde(default)]
    pub io_uring: bool,
    /// Times its process was replaced.
    pub restarts: u32,
    /// Times its process died.
    pub crashes: u32,
    /// How its process last died.
    pub last_exit: Option<String>,
    /// The guest MAC (net).
    pub mac: Option<String>,
    /// Its device process: pid and name (its pidfd is handed over).
    pub process: Option<(u32, String)>,
    /// Its metrics page is handed over.
    pub metrics: bool,
    /// Its TAP is handed over (net).
    pub tap: bool,
    /// Its image is handed over (block).
    pub image: bool,
}

impl DeviceHandover {
    /// Fds of this device: the front end's, then metrics page, TAP, image, pidfd.
    pub fn fd_count(&self) -> usize {
        FrontendFds::count(&self.frontend)
            + usize::from(self.metrics)
            + usize::from(self.tap)
            + usize::from(self.image)
            + usize::from(self.process.is_some())
    }
}

impl Handover {
    /// Fds that go with it: the guest RAM memfd, each device's, the API listener.
    pub fn fd_count(&self) -> usize {
        1 + self
            .devices
            .iter()
            .map(DeviceHandover::fd_count)
            .sum::<usize>()
            + usize::from(self.api_listener)
    }
}

/// The hello's feature: the new VMM builds its KVM VM before the pause (step 2).
pub const FEATURE_PREPARE: &str = "prepare";
/// Features a hello may list.
const MAX_FEATURES: usize = 16;

/// The new VMM's first line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Oldest state version it reads.
    pub min: u32,
    /// Newest state version it reads.
    pub max: u32,
    /// What it can do beyond the base protocol.
    pub features: Vec<String>,
}

impl Hello {
    /// `SKIFF-HANDOVER MIN MAX [FEATURE...]`, or None if `line` is not a hello.
    pub fn parse(line: &str) -> Option<Hello> {
        let mut words = line.strip_prefix("SKIFF-HANDOVER ")?.split(' ');
        let min = words.next()?.parse().ok()?;
        let max = words.next()?.parse().ok()?;
        // Features beyond the first MAX_FEATURES are not looked at.
        let features: Vec<String> = words.take(MAX_FEATURES).map(str::to_string).collect();
        if features.iter().any(String::is_empty) {
            return None;
        }
        Some(Hello { min, max, features })
    }

    /// The line for this hello.
    pub fn line(&self) -> String {
        let mut l = format!("SKIFF-HANDOVER {} {}", self.min, self.max);
        for f in &self.features {
            l.push(' ');
            l.push_str(f);
        }
        l
    }

    /// It lists `feature`.
    pub fn has(&self, feature: &str) -> bool {
        self.features.iter().any(|f| f == feature)
    }
}

/// Step 2, old side: `PREPARE BYTES` and the guest RAM memfd.
pub fn send_prepare(s: &UnixStream, mem_bytes: u64, memfd: RawFd) -> Result<(), HandoverError> {
    send_line(s, &format!("PREPARE {mem_bytes}"))?;
    let n = sandbox::fdpass::send(s.as_fd(), b"F", &[memfd], 0).map_err(io)?;
    if n != 1 {
        return Err(HandoverError::Malformed(
            "an fd message was cut short".into(),
        ));
    }
    Ok(())
}

/// Step 2, new side: the guest RAM's size and memfd.
pub fn recv_prepare(s: &UnixStream, timeout: Duration) -> Result<(u64, OwnedFd), HandoverError> {
    let line = read_line(s, timeout)?;
    let bytes = line
        .strip_prefix("PREPARE ")
        .and_then(|b| b.parse::<u64>().ok())
        .ok_or_else(|| HandoverError::Malformed(format!("{line:?}, not PREPARE BYTES")))?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    let (data, mut got, truncated) = sandbox::fdpass::recv(s.as_fd(), 1, 1).map_err(io)?;
    if data.is_empty() {
        return Err(HandoverError::Closed);
    }
    if truncated || data != b"F" || got.len() != 1 {
        return Err(HandoverError::Malformed("the PREPARE fd message".into()));
    }
    let fd = got
        .pop()
        .ok_or_else(|| HandoverError::Malformed("no memfd".into()))?;
    Ok((bytes, fd))
}

fn io(e: std::io::Error) -> HandoverError {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => HandoverError::Timeout(0),
        _ => HandoverError::Io(e),
    }
}

/// Sends one line.
pub fn send_line(s: &UnixStream, line: &str) -> Result<(), HandoverError> {
    let mut w = s;
    w.write_all(format!("{line}\n").as_bytes()).map_err(io)
}

/// Reads one line, waiting at most `timeout`.
pub fn read_line(s: &UnixStream, timeout: Duration) -> Result<String, HandoverError> {
    let deadline = Instant::now() + timeout;
    let mut line = Vec::new();
    let mut r = s;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HandoverError::Timeout(timeout.as_millis()));
        }
        s.set_read_timeout(Some(left)).map_err(io)?;
        let mut b = [0u8; 1];
        match r.read(&mut b) {
            Ok(0) => return Err(HandoverError::Closed),
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) => line.push(b[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(match io(e) {
                    HandoverError::Timeout(_) => HandoverError::Timeout(timeout.as_millis()),
                    other => other,
                })
            }
        }
        if line.len() > MAX_LINE {
            return Err(HandoverError::Malformed("a line too long".into()));
        }
    }
    String::from_utf8(line).map_err(|_| HandoverError::Malformed("not text".into()))
}

/// Sends the hand-over and its fds.
pub fn send(s: &UnixStream, h: &Handover, fds: &[RawFd]) -> Result<(), HandoverError> {
    if fds.len() != h.fd_count() {
        return Err(HandoverError::Malformed(format!(
            "{} fds for a hand-over of {}",
            fds.len(),
            h.fd_count()
        )));
    }
    let json = serde_json::to_vec(h).map_err(|e| HandoverError::Malformed(e.to_string()))?;
    let mut w = s;
    w.write_all(&(json.len() as u64).to_le_bytes())
        .and_then(|()| w.write_all(&json))
        .map_err(io)?;
    for chunk in fds.chunks(FDS_PER_MESSAGE) {
        let n = sandbox::fdpass::send(s.as_fd(), b"F", chunk, 0).map_err(io)?;
        if n != 1 {
            return Err(HandoverError::Malformed(
                "an fd message was cut short".into(),
            ));
        }
    }
    Ok(())
}

/// Receives the hand-over and its fds, waiting at most `timeout` in all.
pub fn recv(s: &UnixStream, timeout: Duration) -> Result<(Handover, Vec<OwnedFd>), HandoverError> {
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    let mut r = s;
    let mut len = [0u8; 8];
    r.read_exact(&mut len).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => HandoverError::Closed,
        _ => io(e),
    })?;
    let len = u64::from_le_bytes(len);
    if len > MAX_HANDOVER {
        return Err(HandoverError::Malformed(format!(
            "{len} bytes of hand-over"
        )));
    }
    let mut json = vec![0u8; len as usize];
    r.read_exact(&mut json).map_err(io)?;
    let h: Handover =
        serde_json::from_slice(&json).map_err(|e| HandoverError::Malformed(e.to_string()))?;
    let want = h.fd_count();
    let mut fds = Vec::with_capacity(want);
    while fds.len() < want {
        let (data, got, truncated) =
            sandbox::fdpass::recv(s.as_fd(), 1, FDS_PER_MESSAGE).map_err(io)?;
        if data.is_empty() {
            return Err(HandoverError::Closed);
        }
        if truncated || data != b"F" || got.is_empty() {
            return Err(HandoverError::Malformed("an fd message".into()));
        }
        fds.extend(got);
    }
    if fds.len() != want {
        return Err(HandoverError::Malformed(format!(
            "{} fds for a hand-over of {want}",
            fds.len()
        )));
    }
    Ok((h, fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn hello_lists_versions_and_features() {
        let h = Hello::parse("SKIFF-HANDOVER 1 3 prepare later").unwrap();
        assert_eq!((h.min, h.max), (1, 3));
        assert!(h.has(FEATURE_PREPARE) && h.has("later") && !h.has("other"));
        assert_eq!(Hello::parse(&h.line()), Some(h));
        // A hello of a binary from before features were listed.
        let old = Hello::parse("SKIFF-HANDOVER 90 99").unwrap();
        assert!(old.features.is_empty() && !old.has(FEATURE_PREPARE));
        // Features past the 16th are not looked at.
        let many = Hello::parse(&format!("SKIFF-HANDOVER 1 1{} prepare", " f".repeat(16))).unwrap();
        assert_eq!(many.features.len(), 16);
        assert!(!many.has(FEATURE_PREPARE));
        for bad in [
            "SKIFF-HANDOVER 1",
            "SKIFF-HANDOVER x 1",
            "SKIFF-HANDOVER 1 1  prepare",
            "HELLO 1 1",
        ] {
            assert_eq!(Hello::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn prepare_carries_the_size_and_the_memfd() {
        let (a, b) = UnixStream::pair().unwrap();
        let f = tempfile_in_memory();
        send_prepare(&a, 1 << 20, f.as_raw_fd()).unwrap();
        let (bytes, fd) = recv_prepare(&b, Duration::from_secs(5)).unwrap();
        assert_eq!(bytes, 1 << 20);
        let got = std::fs::File::from(fd).metadata().unwrap();
        let want = f.metadata().unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!((got.dev(), got.ino()), (want.dev(), want.ino()));
        // Anything else in its place is refused, naming what came.
        send_line(&a, "READY").unwrap();
        let e = recv_prepare(&b, Duration::from_secs(5)).unwrap_err();
        assert!(e.to_string().contains("READY"), "{e}");
        drop(a);
        assert!(matches!(
            recv_prepare(&b, Duration::from_secs(5)),
            Err(HandoverError::Closed)
        ));
    }

    fn tempfile_in_memory() -> std::fs::File {
        // SAFETY: memfd_create with a NUL-terminated name; the fd returned is ours.
        let fd = unsafe { libc::memfd_create(c"handover-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fd was just created and is owned by nothing else.
        unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) }
    }
}
