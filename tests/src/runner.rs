//! A small libtest-compatible runner for the guest test binary (`harness = false`), which also decides
//! where the tests run.
//!
//! Arguments as for libtest: `[FILTER...] [--exact] [--skip FILTER]... [--list] [--ignored]
//! [--include-ignored] [--nocapture] [--test-threads N] [-q]`; tests run one at a time.
//!
//! Where: tests of [`Kind::Host`] need only the KVM API (/dev/kvm), tests of [`Kind::Guest`] boot a
//! guest and need a KVM with VT-x/AMD-V. On a host whose /dev/kvm cannot boot guests (kvm_pvm, or no
//! vmx/svm flag), the guest tests are re-run inside the nested test host (`resources/nested/run-nested.sh`):
//! a script in the repo dir (which the nested host mounts read-write) execs this same binary with the
//! same arguments and `SKIFF_IN_NESTED=1 SKIFF_TEST_KIND=guest`; its exit status is propagated.
//! Without /dev/kvm everything goes there. Without /dev/kvm or qemu: failure under CI=true, else SKIPPED.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::host::{self, KvmHost};
use crate::Result;

/// Where a test can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Boots a guest: needs KVM with VT-x/AMD-V (or the nested test host).
    Guest,
    /// Needs only the KVM API (bad-input tests).
    Host,
    /// A long, heavy guest test (live-upgrade soak runs under fio or a TCP stream). Listed
    /// as ignored unless `--ignored` is given, as libtest does with `#[ignore]`: in the
    /// nested test host they currently crash the nested host's own kernel (a NULL pointer
    /// dereference in its kernel, cause not found), so CI cannot run them there. Run them
    /// with `cargo test -p tests --test guest -- --ignored` on a VT-x/AMD-V host.
    Soak,
}

impl Kind {
    /// Boots a guest (Guest or Soak).
    pub fn boots(self) -> bool {
        matches!(self, Kind::Guest | Kind::Soak)
    }
}

/// One test.
pub struct Test {
    pub name: &'static str,
    pub kind: Kind,
    /// Run in a private network namespace (TAP devices and guest traffic stay inside it).
    pub netns: bool,
    pub func: fn() -> Result,
}

#[derive(Default)]
struct Args {
    filters: Vec<String>,
    skips: Vec<String>,
    exact: bool,
    list: bool,
    ignored_only: bool,
    raw: Vec<String>,
}

fn parse_args() -> Args {
    let mut a = Args::default();
    let raw: Vec<String> = std::env::args().skip(1).collect();
    a.raw = raw.clone();
    let mut it = raw.into_iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--exact" => a.exact = true,
            "--list" => a.list = true,
            "--ignored" => a.ignored_only = true,
            "--skip" => a.skips.extend(it.next()),
            "--test-threads" | "--format" | "--color" | "-Z" | "--logfile" | "--report-time" => {
                if !arg.contains('=') {
                    it.next();
                }
            }
            s if s.starts_with('-') => {} // --nocapture, --include-ignored, -q, --show-output, ...
            s => a.filters.push(s.to_string()),
        }
    }
    a
}

impl Args {
    fn selects(&self, name: &str) -> bool {
        let hit = |f: &String| {
            if self.exact {
                name == f
            } else {
                name.contains(f.as_str())
            }
        };
        (self.filters.is_empty() || self.filters.iter().any(hit))
            && !self.skips.iter().any(|s| name.contains(s.as_str()))
    }
}

#[derive(Default, Clone, Copy)]
struct Counts {
    /// Guest tests run a second time after a nested-host triple fault.
    retried: usize,
    passed: usize,
    failed: usize,
    ignored: usize,
    filtered: usize,
}

impl Counts {
    fn line(&self, secs: f64) -> String {
        format!(
            "test result: {}. {} passed; {} failed; {} ignored; 0 measured; {} filtered out; finished in {secs:.2}s",
            if self.failed == 0 { "ok" } else { "FAILED" },
            self.passed,
            self.failed,
            self.ignored,
            self.filtered
        )
    }

    /// Parses a libtest `test result:` line.
    fn parse(line: &str) -> Option<Counts> {
        let num = |key: &str| -> Option<usize> {
            let end = line.find(key)?;
            line[..end]
                .trim_end()
                .rsplit([' ', '.', ';'])
                .next()?
                .parse()
                .ok()
        };
        Some(Counts {
            retried: 0,
            passed: num(" passed")?,
            failed: num(" failed")?,
            ignored: num(" ignored").unwrap_or(0),
            filtered: num(" filtered out").unwrap_or(0),
        })
    }
}

/// How skiff reports a guest triple fault on its stderr.
const TRIPLE_FAULT: &str = "triple fault (KVM_EXIT_SHUTDOWN)";
/// How `TestVm::wait_ready` reports a guest that never reached userspace.
const NEVER_READY: &str = "\"GUEST-READY\" did not appear on the console";

fn in_nested() -> bool {
    std::env::var("SKIFF_IN_NESTED").is_ok_and(|v| v == "1")
}

fn run_one(t: &Test) -> Result {
    let f = t.func;
    let netns = t.netns;
    // A fresh thread per test: a private network namespace dies with it.
    let handle = std::thread::Builder::new()
        .name(t.name.to_string())
        .spawn(move || -> Result {
            if netns {
                host::enter_private_netns()?;
            }
            match catch_unwind(AssertUnwindSafe(f)) {
                Ok(r) => r,
                Err(p) => Err(p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_string()))
                    .unwrap_or_else(|| "panicked".into())),
            }
        })
        .map_err(|e| format!("cannot spawn test thread: {e}"))?;
    handle
        .join()
        .unwrap_or_else(|_| Err("test thread panicked".into()))
}

fn run_tests(tests: &[&Test]) -> Counts {
    let mut c = Counts::default();
    let mut failures = Vec::new();
    println!(
        "\nrunning {} test{}",
        tests.len(),
        if tests.len() == 1 { "" } else { "s" }
    );
    for t in tests {
        print!("test {} ... ", t.name);
        let _ = std::io::stdout().flush();
        let start = Instant::now();
        let mut result = run_one(t);
        // Known issue (see tests/tests/guest.rs `boot`): in the nested test host a guest
        // occasionally triple-faults (skiff reports KVM_EXIT_SHUTDOWN), cause not yet found.
        // There, and only for that signature, a guest test is run once more, loudly; any
        // other failure, and a second triple fault, fail the test.
        // The same holds for a guest that never reached userspace (a stall during boot) in a
        // test that boots through the API, where `boot`'s own retry does not apply. At most
        // two more runs.
        for attempt in 2..=3 {
            let Err(e) = &result else { break };
            let why = if e.contains(TRIPLE_FAULT) {
                "the guest triple-faulted during the test"
            } else if e.contains(NEVER_READY) {
                "the guest never reached userspace"
            } else {
                break;
            };
            if !t.kind.boots() || !in_nested() {
                break;
            }
            println!("RETRY (nested host): {why}; running the test again (attempt {attempt}). Failed attempt:\n{e}");
            c.retried += 1;
            result = run_one(t);
        }
        match result {
            Ok(()) => {
                println!("ok ({:.1}s)", start.elapsed().as_secs_f64());
                c.passed += 1;
            }
            Err(e) => {
                println!("FAILED ({:.1}s)", start.elapsed().as_secs_f64());
                c.failed += 1;
                failures.push((t.name, e));
            }
        }
    }
    if !failures.is_empty() {
        println!("\nfailures:\n");
        for (name, e) in &failures {
            println!("---- {name} ----\n{e}\n");
        }
        println!("failures:");
        for (name, _) in &failures {
            println!("    {name}");
        }
    }
    c
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
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

/// Runs the selected tests again inside the nested test host; returns their counts (or an error).
fn run_nested(raw_args: &[String], only_guest: bool) -> std::result::Result<Counts, String> {
    let repo = crate::repo_root();
    let runner = repo.join("resources").join("nested").join("run-nested.sh");
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let script_name = format!(".nested-tests-{}.sh", std::process::id());
    let script = repo.join(&script_name);
    let mut body = String::from("#!/bin/sh\n# generated by the skiff test runner; removed when it ends\nexport SKIFF_IN_NESTED=1\n");
    if only_guest {
        body.push_str("export SKIFF_TEST_KIND=guest\n");
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
        "SKIFF_KILLS",
        "SKIFF_TEST_VERBOSE",
        "SKIFF_KEEP_TMP",
        "SKIFF_FC_PYTHON",
        "RUST_LOG",
    ] {
        if let Ok(v) = std::env::var(var) {
            body.push_str(&format!("export {var}={}\n", sh_quote(&v)));
        }
    }
    body.push_str(&format!("exec {}", sh_quote(&exe.to_string_lossy())));
    for a in raw_args {
        body.push(' ');
        body.push_str(&sh_quote(a));
    }
    body.push('\n');
    std::fs::write(&script, body).map_err(|e| format!("{}: {e}", script.display()))?;
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _cleanup = Cleanup(script.clone());

    let limit = std::env::var("SKIFF_NESTED_TIMEOUT").unwrap_or_else(|_| "3000".into());
    let mut cmd = Command::new("bash");
    cmd.arg(&runner)
        .args(["-m", "8192", "-t", &limit, &script_name])
        .current_dir(&repo)
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
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
    let mut last_result = None;
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out)
            .split(b'\n')
            .map_while(std::result::Result::ok)
        {
            let line = clean(&String::from_utf8_lossy(&line));
            if line.starts_with("test result:") {
                last_result = Counts::parse(&line);
            }
            println!("[nested] {line}");
        }
    }
    let status = child.wait().map_err(|e| format!("run-nested.sh: {e}"))?;
    match (status.code(), last_result) {
        (Some(0 | 101), Some(c)) => Ok(c),
        (Some(124), _) => Err(format!(
            "the nested test host timed out after {limit} s (SKIFF_NESTED_TIMEOUT)"
        )),
        (Some(125), _) => {
            Err("the nested test host failed to run the tests (run-nested.sh exit 125)".into())
        }
        (code, _) => Err(format!(
            "nested test run ended with {code:?} and no test result line"
        )),
    }
}

/// Entry point of a `harness = false` test binary.
pub fn main(tests: &[Test]) -> ! {
    let args = parse_args();
    let start = Instant::now();
    if args.list {
        for t in tests {
            if args.selects(t.name) {
                println!("{}: test", t.name);
            }
        }
        std::process::exit(0);
    }
    let only_guest = std::env::var("SKIFF_TEST_KIND").is_ok_and(|k| k == "guest");
    let mut counts = Counts::default();
    let selected: Vec<&Test> = tests
        .iter()
        .filter(|t| {
            let wanted = args.selects(t.name) && (!only_guest || t.kind.boots());
            // Soak tests run only with --ignored; everything else only without it.
            let keep = wanted && (args.ignored_only == (t.kind == Kind::Soak));
            if wanted && !keep && t.kind == Kind::Soak && !in_nested() {
                println!(
                    "test {} ... ignored, soak test (run with -- --ignored)",
                    t.name
                );
                counts.ignored += 1;
            } else {
                counts.filtered += usize::from(!keep);
            }
            keep
        })
        .collect();

    let in_nested = std::env::var("SKIFF_IN_NESTED").is_ok_and(|v| v == "1");
    let kvm = if in_nested {
        KvmHost::Usable
    } else {
        host::kvm_host()
    };
    let (here, away): (Vec<&Test>, Vec<&Test>) = selected.iter().partition(|t| match kvm {
        KvmHost::Usable => true,
        KvmHost::ApiOnly => t.kind == Kind::Host,
        KvmHost::Missing => false,
    });

    if !here.is_empty() || away.is_empty() {
        let c = run_tests(&here);
        counts.passed += c.passed;
        counts.retried += c.retried;
        counts.failed += c.failed;
        if !away.is_empty() {
            println!("\non this host: {} passed; {} failed", c.passed, c.failed);
        }
    }
    if !away.is_empty() {
        let qemu = host::which("qemu-system-x86_64").is_some();
        let why = match kvm {
            KvmHost::Missing => "there is no /dev/kvm",
            _ => "host KVM is kvm_pvm without VT-x/AMD-V",
        };
        if !qemu {
            if in_ci() {
                println!("\nerror: {why} and qemu-system-x86_64 is missing, so the {} guest tests cannot run (apt-get install qemu-system-x86)", away.len());
                counts.failed += away.len();
            } else {
                println!("\n!!!!! SKIPPED {} guest tests: {why} and qemu-system-x86_64 is missing (apt-get install qemu-system-x86 to run them in the nested test host) !!!!!", away.len());
                counts.ignored += away.len();
            }
        } else {
            println!("\n{why}: running the guest tests inside the nested test host (resources/nested/run-nested.sh)");
            let _ = std::io::stdout().flush();
            match run_nested(&args.raw, kvm == KvmHost::ApiOnly) {
                Ok(c) => {
                    counts.passed += c.passed;
                    counts.failed += c.failed;
                    counts.ignored += c.ignored;
                }
                Err(e) => {
                    println!("error: {e}");
                    counts.failed += away.len().max(1);
                }
            }
        }
    }
    if counts.retried > 0 {
        println!(
            "\nRETRY: {} guest test(s) were run twice after a nested-host guest triple fault",
            counts.retried
        );
    }
    println!("\n{}", counts.line(start.elapsed().as_secs_f64()));
    std::process::exit(if counts.failed == 0 { 0 } else { 101 });
}
