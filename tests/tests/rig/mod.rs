//! The rig's own tests: the runner ends a test past its limit and reports where it was stuck,
//! whatever the guest or the nested test host does.
//!
//! Each starts this same test binary on one [`Kind::Fault`](tests::runner::Kind::Fault) test
//! (a guest test that hangs or freezes on purpose, selected by `SKIFF_RIG_FAULTS=1`) with a
//! short limit, and checks what the runner printed and how long it took.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use tests::{ensure, host, Result, TestDir};

use crate::{boot, vmlinux};

/// What the freezing fault test prints when the nested host should be frozen.
const FREEZE_ME: &str = "RIGFAULT: freeze this nested host now";

/// Fault test: a guest whose vCPU spins forever while the test waits on its console.
pub fn guest_spins() -> Result {
    let dir = TestDir::new("rigspin")?;
    let cfg = dir.config(&vmlinux()?)?;
    let mut vm = boot(&cfg, &dir)?;
    vm.send("while :; do :; done\n")?;
    vm.wait_for(
        "a line this guest never prints",
        Duration::from_secs(24 * 3600),
    )?;
    Err("the guest printed what it cannot print".into())
}

/// Fault test: asks the rig test outside to freeze the nested host (SIGSTOP of its QEMU: no
/// vCPU of it runs again, as when its kernel hangs), then waits; in the nested host that
/// replaces the frozen one it passes.
pub fn nested_host_freezes() -> Result {
    ensure!(
        std::env::var("SKIFF_IN_NESTED").is_ok_and(|v| v == "1"),
        "this fault test runs only in the nested test host"
    );
    println!("{FREEZE_ME}");
    std::thread::sleep(Duration::from_secs(40));
    Ok(())
}

/// The counter file of [`nested_host_faults_thrice`] (in the repo dir, which every nested
/// host mounts read-write at the same path).
const COUNTER_ENV: &str = "SKIFF_RIG_COUNTER";

/// Fault test: fails as a triple-faulting guest would, 3 attempts in a row (counted in the
/// file `SKIFF_RIG_COUNTER` names, across nested hosts), then passes: the runner inside
/// must ask for a fresh nested host after the third, and the test pass in it.
pub fn nested_host_faults_thrice() -> Result {
    ensure!(
        std::env::var("SKIFF_IN_NESTED").is_ok_and(|v| v == "1"),
        "this fault test runs only in the nested test host"
    );
    let path = std::env::var(COUNTER_ENV).map_err(|_| format!("{COUNTER_ENV} is not set"))?;
    let n: u32 = std::fs::read_to_string(&path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
        + 1;
    std::fs::write(&path, n.to_string()).map_err(|e| format!("{path}: {e}"))?;
    if n <= 3 {
        return Err(format!(
            "RIGFAULT attempt {n}: skiff: INFO guest rebooted or powered off (vCPU 0: {} at rip 0xfff0)",
            tests::vm::TRIPLE_FAULT
        ));
    }
    Ok(())
}

/// A nested host in which a test keeps failing on the nested host's own faults is replaced:
/// after 3 such attempts the runner inside asks for a fresh one, and the runner outside runs
/// the test again there.
pub fn runner_refreshes_a_faulting_nested_host() -> Result {
    if host::kvm_host() == host::KvmHost::Usable {
        println!("(this host boots guests itself: there is no nested host to refresh)");
        return Ok(());
    }
    // In the repository (the one directory both nested hosts share read-write), whatever
    // CARGO_TARGET_DIR says: target/ may not exist there.
    let dir = tests::repo_root().join("target");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let counter = dir.join(format!(".rig-counter-{}", std::process::id()));
    let _ = std::fs::remove_file(&counter);
    let r = run_fault(
        "rigfault::nested_host_faults_thrice",
        &[(COUNTER_ENV, &counter.to_string_lossy())],
        Duration::from_secs(300),
        |_, _| {},
    );
    let count = std::fs::read_to_string(&counter).unwrap_or_default();
    let _ = std::fs::remove_file(&counter);
    let (out, status, took) = r?;
    let want = [
        "REFRESH (nested host): the guest triple-faulted during the test, 3 attempts in a row",
        "kept failing on the nested host's own faults; running it and the 0 test(s) after it in a fresh nested host (1 of at most",
        "test result: ok. 1 passed; 0 failed",
    ];
    for w in want {
        ensure!(out.contains(w), "the runner's output lacks {w:?}:\n{out}");
    }
    ensure!(status.success(), "the runner exited with {status}:\n{out}");
    ensure!(
        count.trim() == "4",
        "the fault test ran {count:?} times, want 4 (3 in the first nested host):\n{out}"
    );
    println!(
        "(the fresh nested host's run ended {} s after the start)",
        took.as_secs()
    );
    Ok(())
}

/// Runs this test binary on fault test `name` with `env`, at most `bound`; `on_line` sees each
/// output line (stdout and stderr) as it comes with the child's pid. Returns the output, the
/// exit status and the time it took.
fn run_fault(
    name: &str,
    env: &[(&str, &str)],
    bound: Duration,
    mut on_line: impl FnMut(&str, u32),
) -> Result<(String, ExitStatus, Duration)> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "exec \"$0\" \"$@\" 2>&1"])
        .arg(&exe)
        .args(["--exact", name])
        .env("SKIFF_RIG_FAULTS", "1")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    // SAFETY: the closure runs between fork and exec and only calls prctl: the child dies
    // with this test.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
    let pid = child.id();
    let out = child.stdout.take().ok_or("no stdout pipe")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out)
            .split(b'\n')
            .map_while(std::result::Result::ok)
        {
            if tx
                .send(String::from_utf8_lossy(&line).into_owned())
                .is_err()
            {
                break;
            }
        }
    });
    let mut text = String::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(1)) {
            Ok(line) => {
                on_line(&line, pid);
                text.push_str(&line);
                text.push('\n');
            }
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) if start.elapsed() > bound => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "the runner did not end fault test {name} within {} s; its output:\n{text}",
                    bound.as_secs()
                ));
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
    let status = child
        .wait()
        .map_err(|e| format!("waiting for the runner: {e}"))?;
    Ok((text, status, start.elapsed()))
}

/// A guest that spins forever is ended at the test's limit, with a hang report that shows the
/// vCPU thread running and the guest's console, and it is not run again.
pub fn runner_ends_a_spinning_guest() -> Result {
    // A boot (10-20 s in the nested host, more when it is retried) and a few seconds of
    // spinning fit; every second of it is CI time.
    let limit = 60;
    // The nested host's start, the hang report and the kills come on top of the limit.
    let bound = Duration::from_secs(limit + 240);
    // The nested host's own faults (a guest kernel that crashes or triple-faults before it
    // spins) end the fault test early instead of hanging it: run it once more then, as the
    // runner does for guest tests, loudly.
    let mut attempt = 1;
    let (out, status, took) = loop {
        let r = run_fault(
            "rigfault::guest_spins",
            &[("SKIFF_TEST_TIMEOUT", &limit.to_string())],
            bound,
            |_, _| {},
        )?;
        let env_fault = [
            "guest kernel panicked",
            "triple fault",
            "never reached userspace",
        ]
        .iter()
        .any(|f| r.0.contains(f));
        if attempt == 1 && !r.0.contains("the test hung") && env_fault {
            println!("RETRY (nested host): the spinning guest died before it spun; running the fault test again. Its output:\n{}", r.0);
            attempt += 1;
            continue;
        }
        break r;
    };
    let hung = format!("the test hung: it did not end within its limit of {limit} s");
    let want = [
        hung.as_str(),
        "----- processes this test started -----",
        "vcpu0 [R]",
        "console (tail)",
        "test result: FAILED. 0 passed; 1 failed",
    ];
    for w in want {
        ensure!(out.contains(w), "the runner's output lacks {w:?}:\n{out}");
    }
    // Runs before the hang that the nested host's own faults ended (a guest that died before
    // it spun) are the runner's business; after the hang nothing runs again.
    let after_hang = out.find("the test hung").map_or("", |at| &out[at..]);
    ensure!(
        !after_hang.contains("RETRY (nested host)"),
        "a hung test was run again:\n{out}"
    );
    ensure!(
        status.code() == Some(101),
        "the runner exited with {status}, want 101:\n{out}"
    );
    println!(
        "(the spinning guest's test was ended {} s after it started)",
        took.as_secs()
    );
    Ok(())
}

/// A nested host that freezes (its QEMU stopped: no vCPU runs, as when its kernel hangs) is
/// found silent, killed and replaced, and the test it was running runs again in the new one.
pub fn runner_replaces_a_frozen_nested_host() -> Result {
    if host::kvm_host() == host::KvmHost::Usable {
        println!("(this host boots guests itself: there is no nested host to freeze)");
        return Ok(());
    }
    let silence = 20;
    let mut frozen: Option<(i32, Instant)> = None;
    let mut freeze_error = None;
    let (out, status, _) = run_fault(
        "rigfault::nested_host_freezes",
        &[("SKIFF_NESTED_SILENCE", &silence.to_string())],
        Duration::from_secs(600),
        |line, runner| {
            if frozen.is_none() && freeze_error.is_none() && line.contains(FREEZE_ME) {
                match nested_qemu(runner) {
                    // SAFETY: kill(2) on the nested host's QEMU that this test's runner started.
                    Some(pid) if unsafe { libc::kill(pid, libc::SIGSTOP) } == 0 => {
                        frozen = Some((pid, Instant::now()))
                    }
                    Some(pid) => freeze_error = Some(format!("SIGSTOP of QEMU {pid} failed")),
                    None => freeze_error = Some("no QEMU of the runner's nested host found".into()),
                }
            }
        },
    )?;
    if let Some(e) = freeze_error {
        return Err(format!("{e}:\n{out}"));
    }
    let Some((qemu, at)) = frozen else {
        return Err(format!("the fault test never asked for the freeze:\n{out}"));
    };
    let want = [
        format!("gave no sign of life for {silence} s (frozen); its QEMU was killed"),
        "RETRY (nested host)".to_string(),
        "test result: ok. 1 passed; 0 failed".to_string(),
    ];
    for w in &want {
        ensure!(
            out.contains(w.as_str()),
            "the runner's output lacks {w:?}:\n{out}"
        );
    }
    ensure!(status.success(), "the runner exited with {status}:\n{out}");
    ensure!(
        !std::path::Path::new(&format!("/proc/{qemu}")).exists(),
        "the frozen nested host's QEMU (pid {qemu}) is still there"
    );
    println!(
        "(the frozen nested host was replaced; the run ended {} s after the freeze)",
        at.elapsed().as_secs()
    );
    Ok(())
}

/// The QEMU of the nested host that the test runner `runner` started (its script name
/// carries the runner's pid).
fn nested_qemu(runner: u32) -> Option<i32> {
    let tag = format!(".nested-tests-{runner}-");
    host::pids().into_iter().find(|pid| {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        comm.starts_with("qemu-system") && String::from_utf8_lossy(&cmdline).contains(tag.as_str())
    })
}
