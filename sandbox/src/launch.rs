//! The launcher protocol. A jailed skiff cannot start its device processes itself: it runs
//! unprivileged in its own cell, and each device process goes into a cell of its own under
//! another uid. skiff-jailer's supervisor, which stays outside as root, starts them on
//! request (the launcher). The two talk over a `SOCK_SEQPACKET` socket pair that the jailer
//! creates; skiff gets its end with `--launcher-fd N`.
//!
//! One request, one reply, in order; the client holds a lock across both. Each message is
//! one datagram:
//!
//! | request | bytes | fds (SCM_RIGHTS) |
//! |---|---|---|
//! | launch | `L` binary `\0` targets `\0` arg `\0` arg ... | one per target |
//! | status | `S` pid | |
//! | kill   | `K` pid | |
//! | start a VMM | `V` binary | the hand-over socket |
//! | commit | `C` pid | |
//!
//! `binary` is a name relative to the cell's binary directory; `targets` are the fd numbers,
//! comma-separated, at which the device process finds the passed fds (the arguments name
//! them). Replies are `O` text (launch: the pid, with a pidfd; status: `running` or `exited
//! STATUS`, the raw wait status; kill: empty) or `E` and a message.
//!
//! `V` starts a new skiff (`binary` from the cell's binary directory) in a cell like the
//! requester's, with the arguments it was started with, its own launcher socket and the
//! hand-over socket (`--handover-fd`): the VMM's live upgrade. `C` pid tells the launcher
//! that this new skiff has taken the VM over: from the requester's end on, the launcher
//! serves and follows it instead (until then, the requester's end ends both).
//!
//! The launcher trusts nothing in a request: skiff runs the guest and may be compromised.
//! Sizes, counts and numbers are bounded here; what the launcher runs, and where, is its
//! own decision (skiff-jailer's `launcher` module).

use std::ffi::OsString;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

/// Largest message either side sends or accepts.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Most fds one launch passes (a device process gets its socket, image or TAPs, metrics page).
pub const MAX_FDS: usize = 8;
/// Most arguments one launch passes.
pub const MAX_ARGS: usize = 128;
/// Highest fd number a device process may be given an fd at.
pub const MAX_TARGET_FD: i32 = 1023;
/// How long the client waits for a reply (the launcher answers once the process has
/// exec'd, or failed to).
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of the launcher protocol.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// `--launcher-fd` is not a usable socket.
    #[error("--launcher-fd {0}: {1}")]
    BadSocket(RawFd, String),
    /// Sending or receiving failed.
    #[error("the launcher socket failed")]
    Io(#[source] io::Error),
    /// The other side closed the socket.
    #[error("the launcher closed its socket (skiff-jailer ended?)")]
    Closed,
    /// A message broke the protocol.
    #[error("malformed launcher message: {0}")]
    Malformed(String),
    /// The launcher refused or failed the request.
    #[error("the launcher refused: {0}")]
    Refused(String),
}

/// A request, as the launcher reads it.
#[derive(Debug)]
pub enum Request {
    /// Start `binary` with `args`; `fds[i]` goes to fd number `targets[i]`.
    Launch {
        /// Name relative to the binary directory.
        binary: PathBuf,
        /// Fd numbers in the new process, distinct, 3..=[`MAX_TARGET_FD`].
        targets: Vec<RawFd>,
        /// Arguments after argv[0].
        args: Vec<OsString>,
        /// The fds, in the order of `targets`.
        fds: Vec<OwnedFd>,
    },
    /// Has this process ended, and how?
    Status(u32),
    /// SIGKILL this process.
    Kill(u32),
    /// Start a new VMM from `binary`, handing it `handover`.
    StartVmm {
        /// Name relative to the binary directory.
        binary: PathBuf,
        /// The new VMM's end of the hand-over socket.
        handover: OwnedFd,
    },
    /// The new VMM `pid` has taken the VM over.
    Commit(u32),
}

/// A reply, as the launcher sends it.
#[derive(Debug)]
pub enum Reply {
    /// The process runs (it has exec'd).
    Launched {
        /// Its pid (in the launcher's pid namespace).
        pid: u32,
        /// A pidfd of it: readable once it ends.
        pidfd: OwnedFd,
    },
    /// `None` while it runs, else its raw wait status.
    Status(Option<i32>),
    /// Done (kill).
    Done,
    /// Refused or failed, and why.
    Error(String),
}

fn send(sock: BorrowedFd<'_>, data: &[u8], fds: &[RawFd], flags: libc::c_int) -> io::Result<()> {
    if fds.len() > MAX_FDS || data.len() > MAX_MESSAGE {
        return Err(io::Error::other("message too large"));
    }
    crate::fdpass::send(sock, data, fds, flags).map(drop)
}

/// A datagram's bytes and the fds it carried.
type Datagram = (Vec<u8>, Vec<OwnedFd>);

/// One datagram and its fds (close-on-exec); `None` at end of stream (or an empty datagram,
/// which neither side sends: a launcher that gets one stops serving that skiff).
fn recv(sock: BorrowedFd<'_>) -> Result<Option<Datagram>, LaunchError> {
    let (data, fds, truncated) =
        crate::fdpass::recv(sock, MAX_MESSAGE, MAX_FDS).map_err(LaunchError::Io)?;
    if truncated {
        return Err(LaunchError::Malformed(format!(
            "a message larger than {MAX_MESSAGE} bytes or with more than {MAX_FDS} fds"
        )));
    }
    if data.is_empty() {
        return Ok(None);
    }
    Ok(Some((data, fds)))
}

fn parse_pid(body: &[u8]) -> Result<u32, LaunchError> {
    std::str::from_utf8(body)
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .filter(|p| *p > 0 && *p <= i32::MAX as u32)
        .ok_or_else(|| LaunchError::Malformed("not a pid".into()))
}

/// Reads one request (launcher side); `None` when skiff closed its end.
pub fn read_request(sock: BorrowedFd<'_>) -> Result<Option<Request>, LaunchError> {
    let Some((data, fds)) = recv(sock)? else {
        return Ok(None);
    };
    let (kind, body) = data
        .split_first()
        .ok_or_else(|| LaunchError::Malformed("empty".into()))?;
    let req = match kind {
        b'S' | b'K' | b'C' if !fds.is_empty() => {
            return Err(LaunchError::Malformed(
                "fds with a status, kill or commit".into(),
            ))
        }
        b'S' => Request::Status(parse_pid(body)?),
        b'K' => Request::Kill(parse_pid(body)?),
        b'C' => Request::Commit(parse_pid(body)?),
        b'V' => {
            let [handover]: [OwnedFd; 1] = fds
                .try_into()
                .map_err(|_| LaunchError::Malformed("a VMM start without one fd".into()))?;
            if body.is_empty() || body.contains(&0) {
                return Err(LaunchError::Malformed("no binary".into()));
            }
            Request::StartVmm {
                binary: PathBuf::from(OsString::from_vec(body.to_vec())),
                handover,
            }
        }
        b'L' => {
            let mut fields = body.split(|b| *b == 0);
            let binary = fields.next().unwrap_or_default();
            if binary.is_empty() {
                return Err(LaunchError::Malformed("no binary".into()));
            }
            let binary = PathBuf::from(OsString::from_vec(binary.to_vec()));
            let targets_text = fields
                .next()
                .ok_or_else(|| LaunchError::Malformed("no fd numbers".into()))?;
            let targets: Vec<RawFd> = if targets_text.is_empty() {
                Vec::new()
            } else {
                std::str::from_utf8(targets_text)
                    .map_err(|_| LaunchError::Malformed("fd numbers".into()))?
                    .split(',')
                    .map(|t| t.parse::<RawFd>())
                    .collect::<Result<_, _>>()
                    .map_err(|_| LaunchError::Malformed("fd numbers".into()))?
            };
            if fds.len() > MAX_FDS {
                return Err(LaunchError::Malformed(format!(
                    "{} fds (at most {MAX_FDS})",
                    fds.len()
                )));
            }
            if targets.len() != fds.len() {
                return Err(LaunchError::Malformed(format!(
                    "{} fd numbers for {} fds",
                    targets.len(),
                    fds.len()
                )));
            }
            for (i, t) in targets.iter().enumerate() {
                if !(3..=MAX_TARGET_FD).contains(t) || targets[..i].contains(t) {
                    return Err(LaunchError::Malformed(format!(
                        "fd number {t} (3 to {MAX_TARGET_FD}, each once)"
                    )));
                }
            }
            let args: Vec<OsString> = fields.map(|a| OsString::from_vec(a.to_vec())).collect();
            if args.len() > MAX_ARGS {
                return Err(LaunchError::Malformed(format!(
                    "{} arguments (at most {MAX_ARGS})",
                    args.len()
                )));
            }
            Request::Launch {
                binary,
                targets,
                args,
                fds,
            }
        }
        other => {
            return Err(LaunchError::Malformed(format!(
                "unknown request {:?}",
                char::from(*other)
            )))
        }
    };
    Ok(Some(req))
}

/// Sends one reply (launcher side), without blocking.
pub fn write_reply(sock: BorrowedFd<'_>, reply: &Reply) -> Result<(), LaunchError> {
    let (text, fds) = match reply {
        Reply::Launched { pid, pidfd } => (format!("O{pid}"), vec![pidfd.as_raw_fd()]),
        Reply::Status(None) => ("Orunning".to_string(), Vec::new()),
        Reply::Status(Some(st)) => (format!("Oexited {st}"), Vec::new()),
        Reply::Done => ("O".to_string(), Vec::new()),
        Reply::Error(why) => {
            // A message that fits.
            let mut w = format!("E{why}");
            if w.len() > 4096 {
                let mut cut = 4096;
                while !w.is_char_boundary(cut) {
                    cut -= 1;
                }
                w.truncate(cut);
            }
            (w, Vec::new())
        }
    };
    // Never blocks: a skiff that sends requests without reading the replies fills its
    // socket; the launcher then stops serving it rather than wait (it has signals to pass
    // on and children to reap).
    send(sock, text.as_bytes(), &fds, libc::MSG_DONTWAIT).map_err(LaunchError::Io)
}

/// skiff's end of the launcher socket.
#[derive(Debug)]
pub struct LauncherClient {
    /// The socket, and whether a call failed midway (a reply may still come and would be
    /// taken for the next call's: no call is made after that).
    sock: Mutex<(OwnedFd, bool)>,
}

impl LauncherClient {
    /// Takes `fd` (from `--launcher-fd`): it must be a unix SOCK_SEQPACKET socket. It is made
    /// close-on-exec, so no child inherits it.
    pub fn from_raw_fd(fd: RawFd) -> Result<Self, LaunchError> {
        let bad = |why: &str| LaunchError::BadSocket(fd, why.to_string());
        let mut ty: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `ty`.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_TYPE,
                (&mut ty as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(bad(&format!(
                "not an open socket ({})",
                io::Error::last_os_error()
            )));
        }
        if ty != libc::SOCK_SEQPACKET {
            return Err(bad("not a SOCK_SEQPACKET socket"));
        }
        // SAFETY: the fd is open (getsockopt succeeded) and skiff was given it to own.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: fcntl on an fd we own.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
            return Err(LaunchError::Io(io::Error::last_os_error()));
        }
        let tv = libc::timeval {
            tv_sec: REPLY_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: setsockopt reads a timeval of the size given.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(LaunchError::Io(io::Error::last_os_error()));
        }
        Ok(LauncherClient {
            sock: Mutex::new((sock, false)),
        })
    }

    fn call(&self, data: &[u8], fds: &[RawFd]) -> Result<(String, Vec<OwnedFd>), LaunchError> {
        use std::os::fd::AsFd;
        let mut state = self.sock.lock().unwrap_or_else(|p| p.into_inner());
        if state.1 {
            return Err(LaunchError::Malformed(
                "an earlier request failed midway; the launcher socket is out of step".into(),
            ));
        }
        let sock = state.0.as_fd();
        let exchanged = send(sock, data, fds, 0)
            .map_err(LaunchError::Io)
            .and_then(|()| recv(sock)?.ok_or(LaunchError::Closed));
        let (reply, fds) = match exchanged {
            Ok(r) => r,
            Err(e) => {
                state.1 = true;
                return Err(e);
            }
        };
        match reply.split_first() {
            Some((b'O', text)) => Ok((String::from_utf8_lossy(text).into_owned(), fds)),
            Some((b'E', text)) => Err(LaunchError::Refused(
                String::from_utf8_lossy(text).into_owned(),
            )),
            _ => Err(LaunchError::Malformed("reply".into())),
        }
    }

    /// Starts `binary` (relative to the cell's binary directory) with `args`; each of `fds`
    /// is at the same number in the new process as here. Returns its pid and a pidfd.
    pub fn launch(
        &self,
        binary: &Path,
        args: &[String],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(u32, OwnedFd), LaunchError> {
        let mut data = vec![b'L'];
        data.extend_from_slice(binary.as_os_str().as_bytes());
        data.push(0);
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let targets: Vec<String> = raw.iter().map(|f| f.to_string()).collect();
        data.extend_from_slice(targets.join(",").as_bytes());
        for a in args {
            data.push(0);
            data.extend_from_slice(a.as_bytes());
        }
        let (text, mut got) = self.call(&data, &raw)?;
        let pid = parse_pid(text.as_bytes())?;
        if got.len() != 1 {
            return Err(LaunchError::Malformed(
                "a launch reply without its pidfd".into(),
            ));
        }
        Ok((pid, got.remove(0)))
    }

    /// `None` while `pid` runs, else its raw wait status.
    pub fn status(&self, pid: u32) -> Result<Option<i32>, LaunchError> {
        let (text, _) = self.call(format!("S{pid}").as_bytes(), &[])?;
        if text == "running" {
            return Ok(None);
        }
        text.strip_prefix("exited ")
            .and_then(|s| s.parse().ok())
            .map(Some)
            .ok_or_else(|| LaunchError::Malformed(format!("status {text:?}")))
    }

    /// SIGKILLs `pid`.
    pub fn kill(&self, pid: u32) -> Result<(), LaunchError> {
        self.call(format!("K{pid}").as_bytes(), &[]).map(|_| ())
    }

    /// Starts a new skiff from `binary` (relative to the cell's binary directory) that
    /// takes `handover` as its hand-over socket. Returns its pid and a pidfd.
    pub fn start_vmm(
        &self,
        binary: &Path,
        handover: BorrowedFd<'_>,
    ) -> Result<(u32, OwnedFd), LaunchError> {
        let mut data = vec![b'V'];
        data.extend_from_slice(binary.as_os_str().as_bytes());
        let (text, mut got) = self.call(&data, &[handover.as_raw_fd()])?;
        let pid = parse_pid(text.as_bytes())?;
        if got.len() != 1 {
            return Err(LaunchError::Malformed(
                "a VMM start reply without its pidfd".into(),
            ));
        }
        Ok((pid, got.remove(0)))
    }

    /// Tells the launcher that the new skiff `pid` has taken the VM over.
    pub fn commit_vmm(&self, pid: u32) -> Result<(), LaunchError> {
        self.call(format!("C{pid}").as_bytes(), &[]).map(|_| ())
    }
}

/// A connected SOCK_SEQPACKET pair, close-on-exec: (launcher's end, skiff's end).
pub fn socket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two fds socketpair writes.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, IntoRawFd};

    fn serve_one(server: OwnedFd, reply: impl FnOnce(Request) -> Reply + Send + 'static) {
        std::thread::spawn(move || {
            let req = read_request(server.as_fd())
                .expect("read")
                .expect("a request");
            write_reply(server.as_fd(), &reply(req)).expect("reply");
        });
    }

    #[test]
    fn a_launch_carries_binary_args_and_fds() {
        let (server, client) = socket_pair().expect("pair");
        let client = LauncherClient::from_raw_fd(client.into_raw_fd()).expect("client");
        let (a, _b) = socket_pair().expect("an fd to pass");
        let passed = a.as_raw_fd();
        serve_one(server, move |req| match req {
            Request::Launch {
                binary,
                targets,
                args,
                fds,
            } => {
                assert_eq!(binary, PathBuf::from("skiff-blk"));
                assert_eq!(targets, vec![passed]);
                assert_eq!(args, vec![OsString::from("--x"), OsString::from("")]);
                assert_eq!(fds.len(), 1);
                Reply::Launched {
                    pid: 42,
                    pidfd: fds.into_iter().next().expect("fd"),
                }
            }
            other => panic!("{other:?}"),
        });
        let (pid, _fd) = client
            .launch(
                Path::new("skiff-blk"),
                &["--x".into(), String::new()],
                &[a.as_fd()],
            )
            .expect("launch");
        assert_eq!(pid, 42);
    }

    #[test]
    fn status_kill_and_refusals() {
        let (server, client) = socket_pair().expect("pair");
        let client = LauncherClient::from_raw_fd(client.into_raw_fd()).expect("client");
        std::thread::spawn(move || {
            let answers = [
                Reply::Status(None),
                Reply::Status(Some(9)),
                Reply::Done,
                Reply::Error("no such binary".into()),
            ];
            for a in answers {
                let _ = read_request(server.as_fd()).expect("read");
                write_reply(server.as_fd(), &a).expect("reply");
            }
        });
        assert_eq!(client.status(7).expect("status"), None);
        assert_eq!(client.status(7).expect("status"), Some(9));
        client.kill(7).expect("kill");
        let e = client.status(7).expect_err("refused");
        assert!(e.to_string().contains("no such binary"), "{e}");
    }

    #[test]
    fn hostile_requests_are_refused() {
        let (server, client) = socket_pair().expect("pair");
        let cases: &[&[u8]] = &[
            b"",
            b"X1",
            b"S0",
            b"Sabc",
            b"S99999999999",
            b"L",
            b"Lskiff-blk",
            b"Lskiff-blk\x003",
            b"Lskiff-blk\x00x",
        ];
        for c in cases {
            send(client.as_fd(), c, &[], 0).expect("send");
            match read_request(server.as_fd()) {
                Err(LaunchError::Malformed(_)) => {}
                // An empty datagram reads as end of stream: never accepted as a request.
                Ok(None) if c.is_empty() => {}
                other => panic!("{:?} gave {other:?}", String::from_utf8_lossy(c)),
            }
        }
        // An fd number below 3, twice the same, and too many arguments.
        let (a, b) = socket_pair().expect("fds");
        for (text, fds) in [
            (&b"Lb\x002"[..], vec![a.as_raw_fd()]),
            (&b"Lb\x005,5"[..], vec![a.as_raw_fd(), b.as_raw_fd()]),
        ] {
            send(client.as_fd(), text, &fds, 0).expect("send");
            assert!(matches!(
                read_request(server.as_fd()),
                Err(LaunchError::Malformed(_))
            ));
        }
        let mut many = b"Lb\x00".to_vec();
        for _ in 0..=MAX_ARGS {
            many.extend_from_slice(b"\x00a");
        }
        send(client.as_fd(), &many, &[], 0).expect("send");
        assert!(matches!(
            read_request(server.as_fd()),
            Err(LaunchError::Malformed(_))
        ));
        // Not a seqpacket socket.
        let mut p = [0; 2];
        // SAFETY: room for two fds.
        let rc = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, p.as_mut_ptr()) };
        assert_eq!(rc, 0);
        let e = LauncherClient::from_raw_fd(p[0]).expect_err("a stream socket");
        assert!(e.to_string().contains("SOCK_SEQPACKET"), "{e}");
        // SAFETY: closing the fds made above.
        unsafe {
            libc::close(p[0]);
            libc::close(p[1]);
        }
    }
}
