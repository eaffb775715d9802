//! The two kernel events the launch benchmark times, read from an ftrace instance of its
//! own: a process's exec (`sched:sched_process_exec`) and a thread's KVM_RUN ioctl
//! (`syscalls:sys_enter_ioctl` filtered on `cmd == KVM_RUN`), both on CLOCK_MONOTONIC.
//!
//! The kernel stamps them where they happen, so nothing runs inside the measured processes
//! (no ptrace, as under strace, which slows every system call of the VMM it traces and so
//! penalizes the VMM that makes more of them).

use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// `KVM_RUN`: `_IO(KVMIO, 0x80)`.
const KVM_RUN: u32 = 0xae80;
const TRACEFS: &str = "/sys/kernel/tracing";
/// The events recorded, as tracefs names them (`events/<this>/`).
const EVENTS: [&str; 2] = ["sched/sched_process_exec", "syscalls/sys_enter_ioctl"];

/// Errors setting up the trace.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// tracefs is missing and could not be mounted.
    #[error("tracefs is not mounted at {TRACEFS} and mounting it failed (needs root): {0}")]
    Mount(String),
    /// A tracefs file could not be written.
    #[error("{0}: {1}")]
    Write(PathBuf, #[source] std::io::Error),
    /// The kernel lacks an event.
    #[error("the kernel has no {0} trace event (events/{0} in tracefs; CONFIG_FTRACE_SYSCALLS, tracepoints)")]
    NoEvent(&'static str),
}

/// One event, at `t` seconds of CLOCK_MONOTONIC.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Event {
    /// Process `pid` exec'd.
    Exec { pid: u32, t: f64 },
    /// A thread of process `tgid` entered KVM_RUN.
    KvmRun { tgid: u32, t: f64 },
}

/// An ftrace instance recording exec and KVM_RUN; removed when dropped.
pub struct Trace {
    dir: PathBuf,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
}

/// Sends each event read from the trace pipe `file` (non-blocking) until `stop` is set or
/// nobody listens.
fn read_events(file: File, tx: &mpsc::Sender<Event>, stop: &AtomicBool) {
    let mut lines = BufReader::new(file);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        match lines.read_line(&mut line) {
            Ok(0) => std::thread::sleep(Duration::from_millis(5)),
            Ok(_) if line.ends_with('\n') => {
                if let Some(ev) = parse(&line) {
                    if tx.send(ev).is_err() {
                        return;
                    }
                }
                line.clear();
            }
            // A partial line: the rest follows.
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let mut pfd = libc::pollfd {
                    fd: lines.get_ref().as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd, for at most 100 ms.
                unsafe { libc::poll(&mut pfd, 1, 100) };
            }
            Err(_) => return,
        }
    }
}

impl Trace {
    /// Creates the instance `skiff-launchbench-PID` and starts recording; events arrive on
    /// the returned channel (a thread reads the instance's trace_pipe).
    pub fn start() -> Result<(Trace, Receiver<Event>), TraceError> {
        let root = Path::new(TRACEFS);
        if !root.join("instances").is_dir() {
            let out = std::process::Command::new("mount")
                .args(["-t", "tracefs", "nodev", TRACEFS])
                .output()
                .map_err(|e| TraceError::Mount(e.to_string()))?;
            if !out.status.success() {
                return Err(TraceError::Mount(
                    String::from_utf8_lossy(&out.stderr).trim().to_string(),
                ));
            }
        }
        if let Some(missing) = EVENTS
            .iter()
            .find(|e| !root.join("events").join(e).is_dir())
        {
            return Err(TraceError::NoEvent(missing));
        }
        remove_stale(&root.join("instances"));
        let dir = root
            .join("instances")
            .join(format!("skiff-launchbench-{}", std::process::id()));
        if !dir.is_dir() {
            fs::create_dir(&dir).map_err(|e| TraceError::Write(dir.clone(), e))?;
        }
        let mut trace = Trace {
            dir,
            stop: Arc::new(AtomicBool::new(false)),
            reader: None,
        };
        trace.write("trace_clock", "mono")?;
        trace.write("options/record-tgid", "1")?;
        trace.write("buffer_size_kb", "4096")?;
        trace.write(
            "events/syscalls/sys_enter_ioctl/filter",
            &format!("cmd == {KVM_RUN:#x}"),
        )?;
        enable(&trace.dir, true)?;
        trace.write("tracing_on", "1")?;
        let pipe = trace.dir.join("trace_pipe");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&pipe)
            .map_err(|e| TraceError::Write(pipe, e))?;
        let (tx, rx) = mpsc::channel();
        let stop = trace.stop.clone();
        trace.reader = Some(std::thread::spawn(move || read_events(file, &tx, &stop)));
        Ok((trace, rx))
    }

    fn write(&self, file: &str, value: &str) -> Result<(), TraceError> {
        let path = self.dir.join(file);
        fs::write(&path, value).map_err(|e| TraceError::Write(path, e))
    }
}

impl Drop for Trace {
    fn drop(&mut self) {
        let _ = self.write("tracing_on", "0");
        let _ = enable(&self.dir, false);
        self.stop.store(true, Ordering::Relaxed);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        for _ in 0..20 {
            if fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        log::warn!(
            "could not remove the ftrace instance {}",
            self.dir.display()
        );
    }
}

/// Turns [`EVENTS`] on or off in the instance at `dir`.
fn enable(dir: &Path, on: bool) -> Result<(), TraceError> {
    for e in EVENTS {
        let path = dir.join("events").join(e).join("enable");
        fs::write(&path, if on { "1" } else { "0" }).map_err(|err| TraceError::Write(path, err))?;
    }
    Ok(())
}

/// Removes the instances of earlier runs that were killed before they could (their pid
/// gone), so that none keeps tracing.
fn remove_stale(instances: &Path) {
    let Ok(entries) = fs::read_dir(instances) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(pid) = name.strip_prefix("skiff-launchbench-") else {
            continue;
        };
        if Path::new("/proc").join(pid).exists() {
            continue;
        }
        let _ = enable(&e.path(), false);
        let _ = fs::remove_dir(e.path());
    }
}

/// Reads one trace_pipe line with record-tgid on, e.g.
/// `  vcpu0-1234  (   1230) [001] ..... 812.345678: sys_ioctl(fd: 0x000c, cmd: 0xae80, arg: 0x0000)`
/// `  skiff-1230  (   1230) [000] ..... 812.301234: sched_process_exec: filename=/x pid=1230 old_pid=1230`
fn parse(line: &str) -> Option<Event> {
    let (head, rest) = if let Some(i) = line.find(": sys_ioctl(") {
        (&line[..i], &line[i..])
    } else if let Some(i) = line.find(": sched_process_exec:") {
        (&line[..i], &line[i..])
    } else {
        return None;
    };
    let t: f64 = head.rsplit(' ').next()?.parse().ok()?;
    if rest.starts_with(": sys_ioctl(") {
        // The last parenthesis: a task name may hold some of its own.
        let open = head.rfind('(')?;
        let close = head[open..].find(')')? + open;
        let tgid = head[open + 1..close].trim().parse().ok()?;
        Some(Event::KvmRun { tgid, t })
    } else {
        let pid = rest
            .split_whitespace()
            .find_map(|w| w.strip_prefix("pid="))?
            .parse()
            .ok()?;
        Some(Event::Exec { pid, t })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_kvm_run_and_exec_lines() {
        assert_eq!(
            parse("           vcpu0-1234    (   1230) [001] ..... 812.345678: sys_ioctl(fd: 0x0000000c, cmd: 0x0000ae80, arg: 0x00000000)"),
            Some(Event::KvmRun { tgid: 1230, t: 812.345678 })
        );
        assert_eq!(
            parse("           skiff-1230    (   1230) [000] ..... 812.301234: sched_process_exec: filename=/usr/bin/skiff pid=1230 old_pid=1230"),
            Some(Event::Exec { pid: 1230, t: 812.301234 })
        );
        // A task name with spaces and parentheses of its own.
        assert_eq!(
            parse("  CPU 0/KVM(a)-77  (     70) [000] d.... 5.000001: sys_ioctl(fd: 0x1, cmd: 0xae80, arg: 0x0)"),
            Some(Event::KvmRun { tgid: 70, t: 5.000001 })
        );
        assert_eq!(parse("# tracer: nop"), None);
    }
}
