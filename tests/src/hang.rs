//! What the runner does when a test hangs: show where every process it started is blocked
//! (threads, kernel wait channels and stacks), what their guests printed last and what the
//! kernel logged, then kill those processes so the test's own waits end.

use std::fs;
use std::time::Duration;

use crate::host;

/// A process of this test's tree.
struct Proc {
    pid: i32,
    ppid: i32,
    state: char,
    comm: String,
}

/// Every live descendant of this process, parents before children.
fn descendants() -> Vec<Proc> {
    let mut procs: Vec<Proc> = host::pids()
        .into_iter()
        .filter_map(|pid| {
            let st = host::read_stat(&format!("/proc/{pid}/stat"))?;
            Some(Proc {
                pid,
                ppid: st.ppid,
                state: st.state,
                comm: st.comm,
            })
        })
        .filter(|p| p.state != 'Z')
        .collect();
    let mut out: Vec<Proc> = Vec::new();
    let mut parents = vec![std::process::id() as i32];
    while let Some(parent) = parents.pop() {
        let (children, rest): (Vec<Proc>, Vec<Proc>) =
            procs.into_iter().partition(|c| c.ppid == parent);
        procs = rest;
        parents.extend(children.iter().map(|c| c.pid));
        out.extend(children);
    }
    out
}

fn one_line(path: &str) -> String {
    fs::read_to_string(path)
        .map(|s| s.replace('\0', " ").trim().to_string())
        .unwrap_or_default()
}

/// One process: its command line, then per thread its state, wait channel and, for a
/// thread blocked in the kernel, its kernel stack (root only).
fn describe(p: &Proc) -> String {
    let mut s = format!(
        "pid {} (parent {}) {} [{}]: {}\n",
        p.pid,
        p.ppid,
        p.comm,
        p.state,
        one_line(&format!("/proc/{}/cmdline", p.pid))
    );
    for (tid, st) in threads(p.pid) {
        let base = format!("/proc/{}/task/{tid}", p.pid);
        let state = st.state;
        s += &format!(
            "  thread {tid} {} [{state}] wchan {}\n",
            st.comm,
            one_line(&format!("{base}/wchan"))
        );
        if state == 'D' || (state == 'S' && p.comm.starts_with("skiff")) {
            for frame in one_line(&format!("{base}/stack")).lines().take(12) {
                s += &format!("    {frame}\n");
            }
        }
    }
    s
}

/// The kernel's last log lines (dmesg), when readable.
fn kernel_log_tail() -> String {
    match std::process::Command::new("dmesg").output() {
        Ok(o) if o.status.success() => {
            let text = String::from_utf8_lossy(&o.stdout);
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(40)..].join("\n")
        }
        Ok(o) => format!(
            "(dmesg failed: {})",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => format!("(dmesg: {e})"),
    }
}

/// Everything worth knowing about a hung test, as one text.
pub fn diagnostics() -> String {
    let mut s = String::from("----- processes this test started -----\n");
    for p in descendants() {
        s += &describe(&p);
    }
    s += &crate::vm::live_vm_diagnostics();
    s += "----- kernel log (tail) -----\n";
    s += &kernel_log_tail();
    s += "\n-----";
    s
}

/// [`diagnostics`], given up after `limit`: reading a process's /proc entries blocks while the
/// kernel holds that process (its command line needs its memory map's lock), and a runner
/// stuck there ended no test (a guest test overran its limit by 3 minutes that way in the
/// nested test host, 2026-12-07).
pub fn diagnostics_within(limit: Duration) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("hang-diagnostics".into())
        .spawn(move || {
            let _ = tx.send(diagnostics());
        });
    match spawned {
        Ok(_) => rx.recv_timeout(limit).unwrap_or_else(|_| {
            format!(
                "(the diagnostics did not finish within {} s: a process's /proc entries did not \
                 answer, as when the kernel holds that process; left behind)",
                limit.as_secs()
            )
        }),
        Err(e) => format!("(cannot start the diagnostics: {e})"),
    }
}

/// SIGKILLs every descendant of this process (children first, so that none is re-parented
/// and missed) and waits up to `grace` for them to go.
pub fn kill_descendants(grace: Duration) {
    let deadline = std::time::Instant::now() + grace;
    loop {
        let left = descendants();
        if left.is_empty() || std::time::Instant::now() >= deadline {
            return;
        }
        for p in left.iter().rev() {
            // SAFETY: kill(2) on a pid of our own process tree; no memory is touched.
            unsafe {
                libc::kill(p.pid, libc::SIGKILL);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Each thread of `pid`: its id, name and stat.
fn threads(pid: i32) -> Vec<(String, host::ProcStat)> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out: Vec<(String, host::ProcStat)> = tasks
        .flatten()
        .filter_map(|t| {
            let tid = t.file_name().to_string_lossy().into_owned();
            let st = host::read_stat(&format!("/proc/{pid}/task/{tid}/stat"))?;
            Some((tid, st))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// What each thread of process `pid` did over `window`: its state, wait channel and the
/// CPU it used (a stalled guest's vCPU threads either spin or sit idle in KVM_RUN); and
/// the most CPU, in ms, that one of its vCPU threads (named `vcpuN`) used.
pub fn thread_activity(pid: i32, window: Duration) -> (String, u64) {
    let before = threads(pid);
    if before.is_empty() {
        return (String::new(), 0);
    }
    std::thread::sleep(window);
    // SAFETY: sysconf has no memory side effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let mut s = format!(
        "\n----- pid {pid} threads over {} ms: CPU used, state, wait channel -----\n",
        window.as_millis()
    );
    let mut busiest = 0;
    for (tid, st) in threads(pid) {
        let was = before
            .iter()
            .find(|(t, _)| *t == tid)
            .map_or(st.cpu_ticks, |(_, b)| b.cpu_ticks);
        let ms = st.cpu_ticks.saturating_sub(was) * 1000 / hz;
        if st.comm.starts_with("vcpu") {
            busiest = busiest.max(ms);
        }
        let wchan = one_line(&format!("/proc/{pid}/task/{tid}/wchan"));
        s += &format!("{tid} {}: {ms} ms [{}] {wchan}\n", st.comm, st.state);
    }
    s += "-----";
    (s, busiest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn thread_activity_sees_a_spinning_vcpu_thread() {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let spinner = std::thread::Builder::new()
            .name("vcpu7".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
            .expect("spawn");
        let (text, busiest) = thread_activity(std::process::id() as i32, Duration::from_secs(1));
        stop.store(true, Ordering::Relaxed);
        spinner.join().expect("join");
        assert!(text.contains("vcpu7"), "{text}");
        // Flat out would be 1000 ms; a loaded 2-CPU machine may give it less.
        assert!(
            busiest >= 300,
            "busiest vCPU thread used {busiest} ms:\n{text}"
        );
    }

    #[test]
    fn thread_activity_of_a_missing_process_is_empty() {
        assert_eq!(
            thread_activity(i32::MAX, Duration::from_millis(10)),
            (String::new(), 0)
        );
    }
}
