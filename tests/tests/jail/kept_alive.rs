//! API connections across a VMM upgrade, spoken as raw HTTP/1.1: `ApiClient` sends a request
//! again on a new connection when the server closed a kept one without answering, which
//! would hide exactly the loss these checks look for.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tests::{ensure, Result};

/// One keep-alive connection to the API.
pub struct KeptAlive {
    sock: PathBuf,
    s: UnixStream,
    /// The server ended the connection after an answer (`Connection: close`).
    closed: bool,
}

impl KeptAlive {
    pub fn connect(sock: &Path) -> Result<KeptAlive> {
        let s = UnixStream::connect(sock).map_err(|e| format!("{}: {e}", sock.display()))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        Ok(KeptAlive {
            sock: sock.to_path_buf(),
            s,
            closed: false,
        })
    }

    /// The server ended the connection after its last answer.
    pub fn closed(&self) -> bool {
        self.closed
    }

    /// `GET /skiff/vm` on this connection: the pid of the VMM that answered. Fails on any
    /// answer but 200, and when the connection ends without one. A connection the server
    /// closed after its last answer is opened again first (that is the client's job).
    pub fn skiff_pid(&mut self) -> Result<u32> {
        if self.closed {
            *self = KeptAlive::connect(&self.sock)?;
        }
        self.s
            .write_all(b"GET /skiff/vm HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .map_err(|e| format!("writing on a kept connection: {e}"))?;
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match self.s.read(&mut b) {
                Ok(1) => head.push(b[0]),
                Ok(_) => {
                    return Err(format!(
                        "the kept connection ended without an answer (after {:?})",
                        String::from_utf8_lossy(&head)
                    ))
                }
                Err(e) => return Err(format!("reading on a kept connection: {e}")),
            }
        }
        let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        self.s
            .read_exact(&mut body)
            .map_err(|e| format!("the answer's body: {e}"))?;
        let body = String::from_utf8_lossy(&body).into_owned();
        ensure!(
            head.starts_with("http/1.1 200 "),
            "GET /skiff/vm: {head}{body}"
        );
        self.closed = head.contains("connection: close");
        let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
        v["pid"]
            .as_u64()
            .map(|p| p as u32)
            .ok_or_else(|| format!("GET /skiff/vm without a pid: {body}"))
    }
}

/// A client asking `GET /skiff/vm` on one keep-alive connection, again and again, until
/// told to stop: returns how many it asked and the pids that answered, or the first failure.
pub struct Chatter {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<(usize, Vec<u32>)>>,
}

impl Chatter {
    pub fn start(sock: &Path) -> Result<Chatter> {
        let mut c = KeptAlive::connect(sock)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let (mut n, mut pids) = (0, Vec::new());
            while !flag.load(Ordering::Acquire) {
                let pid = c.skiff_pid().map_err(|e| format!("request {n}: {e}"))?;
                n += 1;
                if pids.last() != Some(&pid) {
                    pids.push(pid);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok((n, pids))
        });
        Ok(Chatter { stop, thread })
    }

    pub fn stop(self) -> Result<(usize, Vec<u32>)> {
        self.stop.store(true, Ordering::Release);
        self.thread
            .join()
            .map_err(|_| "the API chatter thread panicked".to_string())?
    }
}
