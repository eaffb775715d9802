//! What the runner does when a test hangs: show where every process it started is blocked
//! (threads, kernel wait channels and stacks), what their guests printed last and what the
//! kernel logged, then kill those processes so the test's own waits end.

use std::fs;
use std::time::Duration;

/// A process as /proc shows it.
struct Proc {
    pid: i32,
    ppid: i32,
    state: char,
    comm: String,
}

fn read_proc(pid: i32) -> Option<Proc> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let mut rest = stat.get(close + 2..)?.split(' ');
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some(Proc {
        pid,
        ppid,
        state,
        comm: stat.get(open + 1..close)?.to_string(),
    })
}

fn all_procs() -> Vec<Proc> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
        .filter_map(read_proc)
        .collect()
}

/// Every live descendant of this process, parents before children.
fn descendants() -> Vec<Proc> {
    let procs = all_procs();
    let mut out: Vec<Proc> = Vec::new();
    let mut parents = vec![std::process::id() as i32];
    while let Some(p) = parents.pop() {
        for c in procs.iter().filter(|c| c.ppid == p && c.state != 'Z') {
            parents.push(c.pid);
            out.push(Proc {
                pid: c.pid,
                ppid: c.ppid,
                state: c.state,
                comm: c.comm.clone(),
            });
        }
    }
    out
}

fn one_line(path: &str) -> String {
    fs::read_to_string(path)
        .map(|s| s.replace('\0', " ").trim().to_string())
        .unwrap_or_default()
}

/// A thread's state letter and wait channel; `base` is its /proc/PID/task/TID.
fn thread_state(base: &str) -> (char, String) {
    let state = one_line(&format!("{base}/stat"))
        .rsplit_once(") ")
        .and_then(|(_, r)| r.chars().next())
        .unwrap_or('?');
    (state, one_line(&format!("{base}/wchan")))
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
    let Ok(tasks) = fs::read_dir(format!("/proc/{}/task", p.pid)) else {
        return s;
    };
    for t in tasks.flatten() {
        let tid = t.file_name().to_string_lossy().into_owned();
        let base = format!("/proc/{}/task/{tid}", p.pid);
        let (state, wchan) = thread_state(&base);
        s += &format!(
            "  thread {tid} {} [{state}] wchan {wchan}\n",
            one_line(&format!("{base}/comm"))
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

/// CPU time (utime + stime, in clock ticks) of each thread of `pid`, with its name.
fn thread_times(pid: i32) -> Vec<(String, String, u64)> {
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out: Vec<(String, String, u64)> = tasks
        .flatten()
        .filter_map(|t| {
            let tid = t.file_name().to_string_lossy().into_owned();
            let stat = fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).ok()?;
            let (_, rest) = stat.rsplit_once(") ")?;
            let f: Vec<&str> = rest.split(' ').collect();
            // After "comm) ": state is field 0, utime 11, stime 12.
            let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
            let name = one_line(&format!("/proc/{pid}/task/{tid}/comm"));
            Some((tid, name, ticks))
        })
        .collect();
    out.sort();
    out
}

/// What each thread of process `pid` did over `window`: its state, wait channel and the
/// CPU it used (a stalled guest's vCPU threads either spin or sit idle in KVM_RUN); and
/// the most CPU, in ms, that one of its vCPU threads (named `vcpuN`) used.
pub fn thread_activity(pid: i32, window: Duration) -> (String, u64) {
    let before = thread_times(pid);
    if before.is_empty() {
        return (String::new(), 0);
    }
    std::thread::sleep(window);
    let after = thread_times(pid);
    // SAFETY: sysconf has no memory side effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let mut s = format!(
        "\n----- pid {pid} threads over {} ms: CPU used, state, wait channel -----\n",
        window.as_millis()
    );
    let mut busiest = 0;
    for (tid, name, ticks) in &after {
        let was = before
            .iter()
            .find(|(t, _, _)| t == tid)
            .map_or(*ticks, |b| b.2);
        let ms = ticks.saturating_sub(was) * 1000 / hz;
        if name.starts_with("vcpu") {
            busiest = busiest.max(ms);
        }
        let (state, wchan) = thread_state(&format!("/proc/{pid}/task/{tid}"));
        s += &format!("{tid} {name}: {ms} ms [{state}] {wchan}\n");
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
