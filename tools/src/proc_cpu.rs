//! CPU time of processes and threads from /proc, shared by the benchmarks that report CPU per
//! request (included with `#[path]`).

/// CPU time of every thread of process `pid` so far (`/proc/PID/task/*/schedstat`, ns).
pub fn cpu_ns(pid: u32) -> u64 {
    threads_cpu_ns(pid, |_| true)
}

/// CPU time so far of the threads of process `pid` whose name (`comm`) `keep` accepts, ns.
pub fn threads_cpu_ns(pid: u32, keep: impl Fn(&str) -> bool) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| keep(c.trim_end()))
        })
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// CPU time so far of the kernel's vhost worker of process `pid`, ns: on Linux 6.4 and
/// later a thread of that process named `vhost-PID`, before that a kernel thread of the same
/// name (`threads_cpu_ns` of the process misses that one). Also whether it is a thread of
/// the process (so that the process's own CPU time already counts it).
pub fn vhost_worker_cpu_ns(pid: u32) -> (u64, bool) {
    let name = format!("vhost-{pid}");
    let own = threads_cpu_ns(pid, |c| c == name);
    if own > 0 {
        return (own, true);
    }
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return (0, false);
    };
    let kthread = procs
        .flatten()
        .filter(|p| {
            p.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter(|p| {
            std::fs::read_to_string(p.path().join("comm")).is_ok_and(|c| c.trim_end() == name)
        })
        .filter_map(|p| std::fs::read_to_string(p.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    (kthread, false)
}

/// CPU time of this process so far, its ended threads included (getrusage), ns.
pub fn own_cpu_ns() -> u64 {
    // SAFETY: rusage is plain data; zero is a valid value of every field.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes one rusage into `ru`, valid across the call.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0;
    }
    let ns = |tv: libc::timeval| tv.tv_sec as u64 * 1_000_000_000 + tv.tv_usec as u64 * 1000;
    ns(ru.ru_utime) + ns(ru.ru_stime)
}
