//! A small libtest-compatible runner for the guest test binary (`harness = false`), which also decides
//! where the tests run.
//!
//! Arguments as for libtest: `[FILTER...] [--exact] [--skip FILTER]... [--list] [--ignored]
//! [--include-ignored] [--nocapture] [--test-threads N] [-q]`; tests run one at a time.
//!
//! Where: tests of [`Kind::Host`] need only the KVM API (/dev/kvm), tests of [`Kind::Guest`] boot a
//! guest and need a KVM with VT-x/AMD-V. On a host whose /dev/kvm cannot boot guests (kvm_pvm, or no
//! vmx/svm flag), the guest tests run inside the nested test host (see [`crate::nested`], which
//! also starts a new nested host when one dies). Without /dev/kvm everything goes there. Without
//! /dev/kvm or qemu: failure under CI=true, else SKIPPED.
//!
//! A test that runs longer than its limit ([`time_limit`]) is called hung: the runner prints where
//! each process it started is blocked, what their guests printed last and the kernel's log, kills
//! them, and fails the test.

use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use crate::host::{self, KvmHost};
use crate::nested::{self, in_nested, Progress};
use crate::{hang, Result};

/// Where a test can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Boots a guest: needs KVM with VT-x/AMD-V (or the nested test host).
    Guest,
    /// Needs only the KVM API (bad-input tests).
    Host,
    /// A long, heavy guest test (live-upgrade soak runs under fio or a TCP stream). Listed
    /// as ignored unless `--ignored` is given, as libtest does with `#[ignore]`:
    /// `cargo test -p tests --test guest -- --ignored`.
    Soak,
    /// A guest test that hangs or freezes on purpose, so that the rig's own tests can check
    /// that the runner ends it: selected only when `SKIFF_RIG_FAULTS=1` (those tests set it
    /// for the test binary they start), otherwise not even listed.
    Fault,
}

impl Kind {
    /// Boots a guest (Guest, Soak or Fault).
    pub fn boots(self) -> bool {
        matches!(self, Kind::Guest | Kind::Soak | Kind::Fault)
    }
}

/// True when the rig's fault tests are wanted ([`Kind::Fault`]).
fn faults_wanted() -> bool {
    std::env::var("SKIFF_RIG_FAULTS").is_ok_and(|v| v == "1")
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
}

fn parse_args() -> Args {
    let mut a = Args::default();
    let raw: Vec<String> = std::env::args().skip(1).collect();
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

/// A run's results.
#[derive(Default, Clone, Copy)]
pub(crate) struct Counts {
    /// Guest tests run again after a nested-host guest triple fault or stall, and nested
    /// hosts started again after one died.
    pub retried: usize,
    pub passed: usize,
    pub failed: usize,
    pub ignored: usize,
    pub filtered: usize,
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
    pub(crate) fn parse(line: &str) -> Option<Counts> {
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
use crate::vm::TRIPLE_FAULT;
/// How `TestVm::wait_ready` reports a guest that never reached userspace.
const NEVER_READY: &str = "\"GUEST-READY\" did not appear on the console";
/// How a test that does not boot to the shell reports a guest that never reached
/// userspace (e.g. `init=/bin/false`).
pub const NEVER_USERSPACE: &str = "the guest never reached userspace";
/// How `TestVm::diagnostics` marks a guest that spins with its console silent (how the
/// nested test host's guests stall).
pub const GUEST_SPINS: &str = "STALL: the guest spins with its console silent";
/// How `TestVm`'s waits report a guest whose kernel printed a soft lockup (a CPU stuck in
/// the kernel for over 20 s: in the nested test host a udev worker of the Debian image spun
/// so, printing it every 28 s while the boot stood still, 2026-12-07).
pub const SOFT_LOCKUP: &str = "SOFT LOCKUP: the guest's kernel reported a CPU stuck";

/// How `TestVm`'s nudge marks a guest of a peer VMM (QEMU in the interop tests) that had
/// lost an interrupt of the peer's own devices and woke on a console newline (seen in a CI
/// run on 2026-12-06: QEMU's serial transmit interrupt, QEMU's KVM in the nested host).
pub const PEER_LOST_INTERRUPT: &str = "LOST INTERRUPT: a peer VMM's guest lost an interrupt";

/// How [`run_one`] reports a test that did not end in time.
const HUNG: &str = "the test hung";

/// Runs of a guest test in the nested host at most, first run included, when its failures
/// are the nested host's own (triple fault, never reached userspace, stall). The test's one
/// limit bounds them all; a CI rehearsal on 2026-12-04 saw three triple faults in a row, one
/// on 2026-12-07 four triple faults and a stall in a row, all in the guest's early boot
/// (`jailed_vmm_upgrades_under_io` failed after 5 attempts in 160 s): an attempt the nested
/// host ends that early costs little, so the limit, not a count, should end the retries.
const MAX_ATTEMPTS: usize = 8;

/// After this many attempts of a test in a row failed on the nested host's own faults, the
/// runner inside asks for a fresh nested host (when the runner outside has one to give).
const REFRESH_AFTER: usize = 3;

/// The runner inside's exit status when it asks for a fresh nested host.
const REFRESH_EXIT: i32 = 3;

/// A re-run starts only with at least this much of the test's limit left.
const MIN_RERUN: Duration = Duration::from_secs(60);

/// Guest tests that boot a whole distribution, with their limit in seconds. The Debian
/// image's boot takes 2-4 minutes in the nested test host, so the guest tests' 600 s held
/// only two attempts of it, and on 2026-12-07 three runs of it in a row ran out that way
/// (a stall and a triple fault of the nested host's, then the limit).
const LONG_GUEST_TESTS: &[(&str, u64)] = &[("guest::debian_image_boots_with_cloud_init", 900)];

/// How long a test may run, re-runs included, before the runner calls it hung: `SKIFF_TEST_TIMEOUT` seconds,
/// else [`LONG_GUEST_TESTS`]' figure, else by kind (guest tests under TCG in the nested host
/// are the slow ones).
pub(crate) fn time_limit(t: &Test) -> Duration {
    if let Some(s) = std::env::var("SKIFF_TEST_TIMEOUT")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return Duration::from_secs(s);
    }
    if let Some((_, s)) = LONG_GUEST_TESTS.iter().find(|(n, _)| *n == t.name) {
        return Duration::from_secs(*s);
    }
    Duration::from_secs(match t.kind {
        Kind::Host => 180,
        Kind::Guest => 600,
        Kind::Soak => 2400,
        Kind::Fault => 600,
    })
}

/// Runs `t` once; a run still going at `deadline` is called hung, shown and killed.
/// [`run_one`]; when the test failed and one of its guests triple-faulted meanwhile, the
/// error says so. A guest that triple-faults ends skiff, and the test may then fail on
/// something else (its API socket gone): the retry rule for the nested host's triple faults
/// must still apply.
fn run_naming_triple_faults(t: &Test, deadline: Instant) -> Result {
    let before = crate::vm::triple_faults_seen();
    run_one(t, deadline).map_err(|mut e| {
        if crate::vm::triple_faults_seen() > before && !e.contains(TRIPLE_FAULT) {
            e.push_str(&format!(
                "\n(a guest of this test reported a {TRIPLE_FAULT})"
            ));
        }
        e
    })
}

fn run_one(t: &Test, deadline: Instant) -> Result {
    let f = t.func;
    let netns = t.netns;
    let (tx, done) = mpsc::channel();
    // A fresh thread per test: a private network namespace dies with it.
    let handle = std::thread::Builder::new()
        .name(t.name.to_string())
        .spawn(move || {
            let r = (|| {
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
            })();
            let _ = tx.send(r);
        })
        .map_err(|e| format!("cannot spawn test thread: {e}"))?;
    let limit = time_limit(t);
    match done.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        Ok(r) => {
            let _ = handle.join();
            r
        }
        Err(RecvTimeoutError::Disconnected) => Err("test thread panicked".into()),
        Err(RecvTimeoutError::Timeout) => {
            // Show where everything is stuck before killing it; the kills end the test's
            // own waits (console reads, process waits), so its thread can finish.
            let diag = hang::diagnostics_within(Duration::from_secs(30));
            hang::kill_descendants(Duration::from_secs(10));
            let late = match done.recv_timeout(Duration::from_secs(60)) {
                Ok(_) => String::new(),
                Err(_) => "\n(its thread did not end within 60 s after its processes were killed, and is left behind)".into(),
            };
            Err(format!(
                "{HUNG}: it did not end within its limit of {} s, re-runs included (SKIFF_TEST_TIMEOUT sets the limit){late}\n{diag}",
                limit.as_secs()
            ))
        }
    }
}

fn run_tests(tests: &[&Test]) -> Counts {
    let progress = Progress::from_env();
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
        // One limit for the test, re-runs included: a test that fails slowly and is run
        // again must not get the limit anew each time (a guest test ran for more than 20
        // minutes under a 10-minute limit that way).
        let limit = time_limit(t);
        let deadline = start + limit;
        progress.start(t.name, limit);
        let unkillable = crate::vm::unkillable_seen();
        let mut result = run_naming_triple_faults(t, deadline);
        // Known issue (see tests/tests/guest.rs `boot`): in the nested test host a guest
        // occasionally triple-faults (skiff reports KVM_EXIT_SHUTDOWN). Evidence for the cause
        // (2026-12-06, README "Current limits"): a stalled guest's vCPU was found running at
        // the nested host kernel's own post-VMRUN address, host state put into the guest's.
        // There, and only for that signature, a guest test is run once more, loudly; any
        // other failure, and a second triple fault, fail the test.
        // The same holds for a guest that never reached userspace (a stall during boot) in a
        // test that boots through the API, where `boot`'s own retry does not apply, and for
        // a guest that stalled later with a vCPU spinning and its console silent (seen
        // mid-`cat` at a shell prompt, with no device I/O going on), and for a guest of a
        // peer VMM (QEMU) that lost one of the peer's interrupts. At most MAX_ATTEMPTS
        // runs in all, within the one limit of the test.
        for attempt in 2..=MAX_ATTEMPTS {
            let Err(e) = &result else { break };
            // A hung test used up its limit: it is reported, never run again.
            let why = if e.starts_with(HUNG) {
                break;
            } else if e.contains(TRIPLE_FAULT) {
                "the guest triple-faulted during the test"
            } else if e.contains(NEVER_READY) || e.contains(NEVER_USERSPACE) {
                "the guest never reached userspace"
            } else if e.contains(GUEST_SPINS) {
                "the guest stalled (a vCPU spinning, its console silent)"
            } else if e.contains(SOFT_LOCKUP) {
                "the guest's kernel reported a soft lockup"
            } else if e.contains(PEER_LOST_INTERRUPT) {
                "a peer VMM's guest lost an interrupt"
            } else {
                break;
            };
            if !t.kind.boots() || !in_nested() {
                break;
            }
            if deadline.saturating_duration_since(Instant::now()) < MIN_RERUN {
                println!("NO RETRY (nested host): {why}, but less than {} s of the test's {} s limit is left", MIN_RERUN.as_secs(), limit.as_secs());
                break;
            }
            // A VMM of this test that SIGKILL did not end: the nested host's kernel holds
            // it, and the next attempt would meet the same kernel.
            let held = crate::vm::unkillable_seen() > unkillable;
            if (attempt > REFRESH_AFTER || held) && progress.can_refresh() {
                // This nested host may be the trouble (see nested::REFRESHES): the runner
                // outside runs this test and the rest in a fresh one. Nothing of this one is
                // needed any more; its end powers it off.
                let times = if held {
                    "and a VMM of it did not end after SIGKILL".to_string()
                } else {
                    format!("{} attempts in a row", attempt - 1)
                };
                println!("REFRESH (nested host): {why}, {times}; asking for a fresh nested host. Failed attempt:\n{e}");
                progress.refresh(t.name);
                let _ = std::io::stdout().flush();
                std::process::exit(REFRESH_EXIT);
            }
            println!("RETRY (nested host): {why}; running the test again (attempt {attempt}). Failed attempt:\n{e}");
            c.retried += 1;
            result = run_naming_triple_faults(t, deadline);
        }
        progress.end(t.name, result.is_ok());
        match result {
            Ok(()) => {
                println!("ok ({:.1}s)", start.elapsed().as_secs_f64());
                c.passed += 1;
            }
            Err(e) => {
                println!("FAILED ({:.1}s)", start.elapsed().as_secs_f64());
                // In the nested host, at once: the nested host may die before the end.
                if in_nested() {
                    println!("---- {} ----\n{e}\n", t.name);
                }
                c.failed += 1;
                failures.push((t.name, e));
            }
        }
    }
    if !failures.is_empty() {
        println!("\nfailures:\n");
        for (name, e) in &failures {
            if in_nested() {
                println!("---- {name} ---- (shown above)");
            } else {
                println!("---- {name} ----\n{e}\n");
            }
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

/// Entry point of a `harness = false` test binary.
pub fn main(tests: &[Test]) -> ! {
    let args = parse_args();
    let start = Instant::now();
    let tests: Vec<&Test> = tests
        .iter()
        .filter(|t| t.kind != Kind::Fault || faults_wanted())
        .collect();
    if args.list {
        for t in &tests {
            if args.selects(t.name) {
                println!("{}: test", t.name);
            }
        }
        std::process::exit(0);
    }
    let only_guest = std::env::var("SKIFF_TEST_KIND").is_ok_and(|k| k == "guest");
    let mut counts = Counts::default();
    let selected: Vec<&Test> = tests
        .into_iter()
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

    let kvm = if in_nested() {
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
            let names: Vec<&str> = away.iter().map(|t| t.name).collect();
            let c = nested::run(&names, args.ignored_only, kvm == KvmHost::ApiOnly);
            counts.passed += c.passed;
            counts.failed += c.failed;
            counts.ignored += c.ignored;
            counts.retried += c.retried;
        }
    }
    if counts.retried > 0 {
        println!(
            "\nRETRY: {} time(s) a guest test or the nested test host was started again (see the RETRY lines)",
            counts.retried
        );
    }
    println!("\n{}", counts.line(start.elapsed().as_secs_f64()));
    std::process::exit(if counts.failed == 0 { 0 } else { 101 });
}
