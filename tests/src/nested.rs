//! Running guest tests inside the nested test host (`resources/nested/run-nested.sh`), and
//! surviving the nested host's own failures.
//!
//! The runner outside writes a script into the repo dir (which the nested host mounts
//! read-write) that execs this same test binary with the names of the tests to run,
//! `--exact`, and `SKIFF_IN_NESTED=1`. The runner inside reports through a progress file
//! in the repo dir: `alive` every few seconds from a thread of its own, `start NAME` and
//! `end NAME ok|failed` around each test.
//!
//! The nested host (QEMU TCG emulating AMD-V) occasionally dies or freezes on its own
//! during long runs (its kernel oopsed under fio; it went silent for 20 minutes in a CI
//! run). Outside, no `alive` for [`SILENCE`] means it is frozen: its QEMU is killed. When
//! it froze, timed out or ended without a result, the tests it had not finished (the one
//! it was running included) run again in a new nested host, each announced by a RETRY line,
//! until [`STUCK`] nested hosts in a row finished no test or [`RESTARTS`] were started in
//! all. The tests it finished keep their results.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use crate::runner::Counts;

/// A nested host that reports nothing for this long is frozen (`SKIFF_NESTED_SILENCE`
/// seconds overrides it, for the rig's own tests).
const SILENCE: Duration = Duration::from_secs(150);
/// How long past a test's limit the runner inside may take to end it (its hang report, the
/// kills, up to 60 s for the test's thread) before the runner outside ends the nested host.
const HANG_GRACE: Duration = Duration::from_secs(180);
/// How often the runner inside says it is alive.
const ALIVE_EVERY: Duration = Duration::from_secs(5);
/// New nested hosts after one that died, per run, at most. A host lost costs up to
/// [`SILENCE`] and a boot, so this bounds the run's time: 6 losses add about 20 minutes.
const RESTARTS: usize = 6;
/// Nested hosts in a row that die before they finish a single test end the run: they die of
/// something the next one will too. A host that finished tests before it died is no such
/// sign: a clean-clone CI rehearsal on 2026-12-07 (late) lost five, the first three at
/// one test while the machine also built and benchmarked, the fifth after the Debian image's
/// test had passed in it, and the old limit of 3 new hosts left 21 tests unrun.
const STUCK: usize = 3;
/// A fresh nested host for the rest of the run, at most this many times per run, when a test's
/// attempts keep failing on the nested host's own faults (its guests triple-fault or stall):
/// a CI rehearsal on 2026-12-07 saw `jailed_vmm_upgrades_under_io` fail 5 attempts in a row
/// that way, and its sibling overrun with the runner inside stuck, in a nested host that had
/// run 20 tests; in the fresh nested host that replaced it the sibling passed at once. Not
/// counted among [`RESTARTS`].
const REFRESHES: usize = 3;
/// The progress line by which the runner inside asks for a fresh nested host: this prefix
/// and the name of the test that is to run again in it.
const REFRESH_LINE: &str = "refresh ";
/// The environment variable that names the progress file inside.
const PROGRESS_ENV: &str = "SKIFF_NESTED_PROGRESS";

/// True inside the nested test host.
pub fn in_nested() -> bool {
    std::env::var("SKIFF_IN_NESTED").is_ok_and(|v| v == "1")
}

/// The runner inside: appends to the progress file the outer runner reads, when there is one.
pub struct Progress(Option<PathBuf>);

impl Progress {
    /// Opens the progress file named by the outer runner, and starts the `alive` thread.
    pub fn from_env() -> Progress {
        let path = std::env::var_os(PROGRESS_ENV).map(PathBuf::from);
        if let Some(p) = path.clone() {
            std::thread::spawn(move || loop {
                append(&p, "alive");
                std::thread::sleep(ALIVE_EVERY);
            });
        }
        Progress(path)
    }

    /// A test starts, with `limit` to end in (re-runs included).
    pub fn start(&self, name: &str, limit: Duration) {
        if let Some(p) = &self.0 {
            append(p, &format!("start {name} {}", limit.as_secs()));
        }
    }

    /// Whether the runner outside can start a fresh nested host for the rest of the run
    /// (it has a progress file and a refresh left: `SKIFF_NESTED_REFRESH=1`).
    pub fn can_refresh(&self) -> bool {
        self.0.is_some() && std::env::var("SKIFF_NESTED_REFRESH").is_ok_and(|v| v == "1")
    }

    /// Asks the runner outside for a fresh nested host in which `name` and the tests after
    /// it run (see [`REFRESH_LINE`]).
    pub fn refresh(&self, name: &str) {
        if let Some(p) = &self.0 {
            append(p, &format!("{REFRESH_LINE}{name}"));
        }
    }

    pub fn end(&self, name: &str, ok: bool) {
        if let Some(p) = &self.0 {
            append(
                p,
                &format!("end {name} {}", if ok { "ok" } else { "failed" }),
            );
        }
    }
}

fn append(path: &Path, line: &str) {
    if let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(path) {
        let _ = f.write_all(format!("{line}\n").as_bytes());
    }
}

/// Strips ANSI escape sequences and CRs from a console line of the nested host.
fn clean(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\x1b' => {
                if chars.peek() == Some(&'[') {
                    chars.next();
                    for d in chars.by_ref() {
                        if d.is_ascii_alphabetic() {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            '\r' => {}
            c => out.push(c),
        }
    }
    out
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Removes a file when dropped.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// How one nested host ended.
struct Attempt {
    /// Its runner's `test result:` line, when it got that far.
    result: Option<Counts>,
    /// The tests it finished, with their outcome (true: ok).
    ended: Vec<(String, bool)>,
    /// Why it ended without a result.
    failure: Option<String>,
    /// A test that ran past its limit without the runner inside ending it.
    overdue: Option<String>,
    /// The test for which the runner inside asked for a fresh nested host.
    refresh: Option<String>,
}

/// Runs `names` (exact test names) inside the nested test host, in new nested hosts again
/// while one dies before finishing them; returns their counts.
pub(crate) fn run(names: &[&str], ignored: bool, only_guest: bool) -> Counts {
    let mut counts = Counts::default();
    let mut remaining: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    // Tests that overran in a nested host whose runner could not end them: such a host is
    // broken (its userspace answered, its runner's kills and reports did not finish), so
    // the test runs once more in a new one; a second overrun fails it.
    let mut overran: Vec<String> = Vec::new();
    let (mut restarts, mut refreshes, mut stuck) = (0, 0, 0);
    loop {
        let a = match run_once(&remaining, ignored, only_guest, refreshes < REFRESHES) {
            Ok(a) => a,
            Err(e) => {
                println!("error: {e}");
                counts.failed += remaining.len();
                return counts;
            }
        };
        if let Some(c) = a.result {
            counts.passed += c.passed;
            counts.failed += c.failed;
            counts.ignored += c.ignored;
            return counts;
        }
        for (_, ok) in &a.ended {
            if *ok {
                counts.passed += 1;
            } else {
                counts.failed += 1;
            }
        }
        stuck = if a.ended.is_empty() { stuck + 1 } else { 0 };
        remaining.retain(|n| !a.ended.iter().any(|(e, _)| e == n));
        if let Some(name) = a.overdue {
            if overran.contains(&name) {
                println!(
                    "---- {name} ----\nthe test hung: it overran its limit in two nested hosts\n"
                );
                counts.failed += 1;
                remaining.retain(|n| *n != name);
            } else {
                overran.push(name);
            }
        }
        let why = a.failure.unwrap_or_else(|| "no result".into());
        if remaining.is_empty() {
            println!(
                "note: the nested test host ended after its last test without a result line: {why}"
            );
            return counts;
        }
        if let Some(name) = a.refresh.filter(|_| refreshes < REFRESHES) {
            refreshes += 1;
            counts.retried += 1;
            println!(
                "RETRY (nested host): {name} kept failing on the nested host's own faults; running it and the {} test(s) after it in a fresh nested host ({refreshes} of at most {REFRESHES} such)",
                remaining.len().saturating_sub(1)
            );
            continue;
        }
        if restarts == RESTARTS || stuck == STUCK {
            let pattern = if stuck == STUCK {
                format!(" ({STUCK} in a row finished no test)")
            } else {
                String::new()
            };
            println!(
                "error: {why}; {} test(s) did not run to the end in {} nested hosts{pattern}: {}",
                remaining.len(),
                restarts + refreshes + 1,
                remaining.join(", ")
            );
            counts.failed += remaining.len();
            return counts;
        }
        restarts += 1;
        counts.retried += 1;
        println!(
            "RETRY (nested host): {why}; running the {} test(s) it had not finished in a new nested host: {}",
            remaining.len(),
            remaining.join(", ")
        );
    }
}

/// The test the progress file says is running (a `start` line with no `end` after it): its
/// name and limit.
fn running_test(progress: &str) -> Option<(String, Duration)> {
    let mut running = None;
    for line in progress.lines() {
        if let Some(rest) = line.strip_prefix("start ") {
            let (name, limit) = rest.rsplit_once(' ')?;
            running = Some((name.to_string(), Duration::from_secs(limit.parse().ok()?)));
        } else if line.starts_with("end ") {
            running = None;
        }
    }
    running
}

/// One nested host running `names`.
fn run_once(
    names: &[String],
    ignored: bool,
    only_guest: bool,
    can_refresh: bool,
) -> Result<Attempt, String> {
    let repo = crate::repo_root();
    let runner = repo.join("resources").join("nested").join("run-nested.sh");
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let tag = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
    );
    let script_name = format!(".nested-tests-{tag}.sh");
    let script = repo.join(&script_name);
    let progress = repo.join(format!(".nested-progress-{tag}"));
    std::fs::write(&progress, "").map_err(|e| format!("{}: {e}", progress.display()))?;
    let _progress_cleanup = Cleanup(progress.clone());
    let mut body = String::from("#!/bin/sh\n# generated by the skiff test runner; removed when it ends\nexport SKIFF_IN_NESTED=1\n");
    body.push_str(&format!(
        "export {PROGRESS_ENV}={}\n",
        sh_quote(&progress.to_string_lossy())
    ));
    if only_guest {
        body.push_str("export SKIFF_TEST_KIND=guest\n");
    }
    if can_refresh {
        body.push_str("export SKIFF_NESTED_REFRESH=1\n");
    }
    if let Ok(g) = crate::guest_artifacts() {
        body.push_str(&format!(
            "export SKIFF_ARTIFACTS={}\n",
            sh_quote(&g.dir.to_string_lossy())
        ));
    }
    // Test knobs reach the tests inside too.
    for var in [
        "SKIFF_UPGRADES",
        "SKIFF_VMM_UPGRADES",
        "SKIFF_KILLS",
        "SKIFF_TEST_VERBOSE",
        "SKIFF_KEEP_TMP",
        "SKIFF_FC_PYTHON",
        "SKIFF_TEST_TIMEOUT",
        "SKIFF_STATE_FIXTURE",
        "RUST_LOG",
    ] {
        if let Ok(v) = std::env::var(var) {
            body.push_str(&format!("export {var}={}\n", sh_quote(&v)));
        }
    }
    body.push_str(&format!(
        "exec {} --exact",
        sh_quote(&exe.to_string_lossy())
    ));
    if ignored {
        body.push_str(" --ignored");
    }
    for n in names {
        body.push(' ');
        body.push_str(&sh_quote(n));
    }
    body.push('\n');
    std::fs::write(&script, body).map_err(|e| format!("{}: {e}", script.display()))?;
    let _script_cleanup = Cleanup(script.clone());

    let limit = std::env::var("SKIFF_NESTED_TIMEOUT").unwrap_or_else(|_| "3000".into());
    let mut cmd = Command::new("bash");
    cmd.arg(&runner)
        .args(["-m", "8192", "-t", &limit, &script_name])
        .current_dir(&repo)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .process_group(0);
    // If this runner is killed (a CI or `timeout` limit), run-nested.sh dies too, and it
    // takes the nested host's QEMU with it (setpriv --pdeathsig there).
    // SAFETY: the closure runs between fork and exec and only calls prctl.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", runner.display()))?;
    let out = child
        .stdout
        .take()
        .ok_or("run-nested.sh has no stdout pipe")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out)
            .split(b'\n')
            .map_while(std::result::Result::ok)
        {
            if tx.send(clean(&String::from_utf8_lossy(&line))).is_err() {
                break;
            }
        }
    });

    let silence = std::env::var("SKIFF_NESTED_SILENCE")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(SILENCE, Duration::from_secs);
    let mut result = None;
    let mut frozen = None;
    let mut overdue = None;
    let mut seen = 0u64;
    let mut last_sign = Instant::now();
    // The test running inside: its name, when the runner outside saw it start, its limit.
    let mut current: Option<(String, Instant, Duration)> = None;
    loop {
        match rx.recv_timeout(ALIVE_EVERY) {
            Ok(line) => {
                if line.starts_with("test result:") {
                    result = Counts::parse(&line);
                }
                println!("[nested] {line}");
            }
            Err(RecvTimeoutError::Disconnected) => break,
            Err(RecvTimeoutError::Timeout) => {}
        }
        let size = std::fs::metadata(&progress).map_or(0, |m| m.len());
        if size != seen {
            seen = size;
            last_sign = Instant::now();
            current = running_test(&std::fs::read_to_string(&progress).unwrap_or_default()).map(
                |(name, limit)| match current.take() {
                    Some(c) if c.0 == name => c,
                    _ => (name, Instant::now(), limit),
                },
            );
        }
        let kill = if last_sign.elapsed() > silence {
            frozen = Some(format!(
                "the nested test host gave no sign of life for {} s (frozen); its QEMU was killed",
                silence.as_secs()
            ));
            true
        } else if let Some((name, since, limit)) = current
            .as_ref()
            .filter(|c| c.1.elapsed() > c.2 + HANG_GRACE)
        {
            // The runner inside ends a test at its limit; one that is still running this
            // long after it means that runner is stuck itself. The limit holds anyway.
            overdue = Some(name.clone());
            frozen = Some(format!(
                "{name} ran for {} s, past its limit of {} s, and the runner inside the nested host did not end it; its QEMU was killed (the nested host's console above is all there is to show)",
                since.elapsed().as_secs(),
                limit.as_secs()
            ));
            true
        } else {
            false
        };
        if kill {
            // SAFETY: kill(2) on the process group run-nested.sh leads (process_group(0)):
            // it, timeout, QEMU and tee; no memory is touched.
            unsafe {
                libc::kill(-(child.id() as i32), libc::SIGKILL);
            }
            break;
        }
    }
    let status = child.wait().map_err(|e| format!("run-nested.sh: {e}"))?;
    let text = std::fs::read_to_string(&progress).unwrap_or_default();
    let ended: Vec<(String, bool)> = text
        .lines()
        .filter_map(|l| l.strip_prefix("end "))
        .filter_map(|l| l.rsplit_once(' '))
        .map(|(name, how)| (name.to_string(), how == "ok"))
        .collect();
    // A test that overran its limit with the runner inside stuck: the caller runs it once
    // more in a new nested host.
    if let Some(name) = &overdue {
        println!(
            "---- {name} ----\nthe test overran: {}\n",
            frozen.as_deref().unwrap_or_default()
        );
    }
    let failure = match (frozen, status.code(), result) {
        (Some(f), _, _) => Some(f),
        (None, Some(0 | 101), Some(_)) => None,
        (None, Some(124), _) => Some(format!(
            "the nested test host timed out after {limit} s (SKIFF_NESTED_TIMEOUT)"
        )),
        (None, Some(125), _) => {
            Some("the nested test host died (run-nested.sh exit 125)".to_string())
        }
        (None, code, _) => Some(format!(
            "the nested test run ended with {code:?} and no test result line"
        )),
    };
    let refresh = text
        .lines()
        .find_map(|l| l.strip_prefix(REFRESH_LINE))
        .map(str::to_string);
    Ok(Attempt {
        result: if failure.is_none() { result } else { None },
        ended,
        failure,
        overdue,
        refresh,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn running_test_is_the_last_start_without_an_end() {
        assert_eq!(running_test(""), None);
        assert_eq!(running_test("alive\nalive\n"), None);
        let p = "alive\nstart guest::a 600\nalive\nend guest::a ok\nstart guest::b 2400\nalive\n";
        assert_eq!(
            running_test(p),
            Some(("guest::b".to_string(), Duration::from_secs(2400)))
        );
        assert_eq!(
            running_test("start guest::a 600\nend guest::a failed\n"),
            None
        );
    }
}
