//! The guest's serial console for upgradebench-guest: skiff's stdout collected by a
//! thread, its stdin typed into a little at a time, and commands run in the guest's shell
//! between unique markers.

use std::io::{Read, Write};
use std::process::{Child, ChildStdin};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

type Result<T> = std::result::Result<T, String>;

/// What skiff printed on the guest's console, and whether its stdout has closed.
#[derive(Default)]
struct Output {
    bytes: Vec<u8>,
    closed: bool,
}

/// The guest's serial console: skiff's stdout, collected by a thread, and its stdin.
pub struct Console {
    out: Arc<(Mutex<Output>, Condvar)>,
    stdin: ChildStdin,
    cursor: usize,
    token: u32,
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl Console {
    pub fn new(child: &mut Child) -> Result<Console> {
        let mut stdout = child.stdout.take().ok_or("skiff has no stdout pipe")?;
        let stdin = child.stdin.take().ok_or("skiff has no stdin pipe")?;
        let out = Arc::new((Mutex::new(Output::default()), Condvar::new()));
        let sink = out.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                let n = match stdout.read(&mut buf) {
                    Ok(0) | Err(_) => 0,
                    Ok(n) => n,
                };
                let (lock, cv) = &*sink;
                let mut v = lock.lock().unwrap_or_else(|p| p.into_inner());
                v.bytes.extend_from_slice(&buf[..n]);
                v.closed = n == 0;
                cv.notify_all();
                if n == 0 {
                    return;
                }
            }
        });
        Ok(Console {
            out,
            stdin,
            cursor: 0,
            token: 0,
        })
    }

    /// Waits until `f` finds something in the output after the cursor; `f` returns a
    /// value and the offset to move the cursor to.
    fn wait<T>(
        &mut self,
        timeout: Duration,
        what: &str,
        f: impl Fn(&[u8]) -> Option<(T, usize)>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.out;
        let mut v = lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let tail = &v.bytes[self.cursor.min(v.bytes.len())..];
            if let Some((x, end)) = f(tail) {
                self.cursor += end;
                return Ok(x);
            }
            let now = Instant::now();
            if v.closed || now >= deadline {
                let from = v.bytes.len().saturating_sub(2000);
                let why = if v.closed {
                    "skiff exited (see skiff.log in the output dir)".to_string()
                } else {
                    format!("not within {timeout:?}")
                };
                return Err(format!(
                    "waiting for {what}: {why}; console tail:\n{}",
                    String::from_utf8_lossy(&v.bytes[from..])
                ));
            }
            v = cv
                .wait_timeout(v, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    pub fn wait_for(&mut self, pat: &str, timeout: Duration) -> Result<()> {
        self.wait(timeout, pat, |b| {
            find(b, pat.as_bytes()).map(|i| ((), i + pat.len()))
        })
    }

    pub fn send(&mut self, text: &str) -> Result<()> {
        // In small pieces: the serial port's receive FIFO is short.
        for chunk in text.as_bytes().chunks(32) {
            self.stdin
                .write_all(chunk)
                .and_then(|()| self.stdin.flush())
                .map_err(|e| format!("console write: {e}"))?;
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Types `cmd` to run in the shell's foreground and waits until its output begins
    /// (the echo of the typed line holds `XBEG%s`, never the token itself).
    pub fn start(&mut self, cmd: &str) -> Result<Pending> {
        self.token += 1;
        let t = self.token;
        self.send(&format!(
            "printf 'XBEG%s\\n' {t}; {cmd}; printf 'XEND%s:%d\\n' {t} $?\n"
        ))?;
        let begin = format!("XBEG{t}");
        self.wait(
            Duration::from_secs(60),
            &format!("the start of {cmd:?}"),
            |b| {
                let i = find(b, begin.as_bytes())?;
                let after = &b[i + begin.len()..];
                // "XBEG1" must not match "XBEG12"; the tty ends the line with "\r\n".
                if !matches!(after.first(), Some(b'\r' | b'\n')) {
                    return None;
                }
                let nl = find(after, b"\n")?;
                Some(((), i + begin.len() + nl + 1))
            },
        )?;
        Ok(Pending {
            token: t,
            cmd: cmd.to_string(),
        })
    }

    /// Waits for a command to end; its output, which must come with exit status 0.
    pub fn finish(&mut self, p: Pending, timeout: Duration) -> Result<String> {
        let Pending { token: t, cmd } = p;
        let end = format!("XEND{t}:");
        let (out, code) = self.wait(timeout, &format!("the end of {cmd:?}"), |b| {
            let e = find(b, end.as_bytes())?;
            let at = e + end.len();
            let len = b[at..].iter().position(|c| !c.is_ascii_digit())?;
            let code: i32 = std::str::from_utf8(&b[at..at + len]).ok()?.parse().ok()?;
            let out = String::from_utf8_lossy(&b[..e]).replace('\r', "");
            Some(((out, code), at + len))
        })?;
        if code != 0 {
            return Err(format!("guest command {cmd:?} exited {code}:\n{out}"));
        }
        Ok(out)
    }

    pub fn run(&mut self, cmd: &str, timeout: Duration) -> Result<String> {
        let t = self.start(cmd)?;
        self.finish(t, timeout)
    }
}

/// A command typed by [`Console::start`], not yet collected.
pub struct Pending {
    token: u32,
    cmd: String,
}
