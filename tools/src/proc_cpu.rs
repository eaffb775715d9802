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
