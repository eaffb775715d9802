//! Per-thread seccomp filters for skiff's processes: the mechanism both the VMM and the
//! device processes link (choosing the built-in filters or an operator's JSON file,
//! installing a thread's filter, the SIGSYS report of a violation) and the built-in allow
//! lists themselves ([`filters`]), which the VMM needs too: a device process it forks keeps
//! the VMM's filter, so that one must allow what the device processes do.
//!
//! Also the other confinement mechanisms two programs share: the checks of a device binary
//! ([`binary`]: the VMM's and the launcher's) and the launcher protocol ([`launch`]: a
//! jailed VMM asks skiff-jailer to start its device processes).
//!
//! Depends on no other crate of the workspace (DESIGN.md's arrows: vmm, devices and jailer
//! may use it).

pub mod allow;
pub mod binary;
pub mod fdpass;
pub mod filters;
pub mod launch;
pub mod syscalls;
mod trap;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use seccompiler::BpfProgram;

pub use allow::{AllowError, AllowList, Cond};

/// Errors choosing, compiling or installing filters.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The `--seccomp-filter` file cannot be read.
    #[error("cannot read the seccomp filter file {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// The `--seccomp-filter` file is not a valid filter file.
    #[error("seccomp filter file {0}")]
    Json(PathBuf, #[source] seccompiler::Error),
    /// The file lacks the filter of a thread kind this process has.
    #[error("seccomp filter file {file} has no \"{kind}\" filter (this program needs {needed})")]
    Missing {
        /// The file.
        file: PathBuf,
        /// The missing key.
        kind: String,
        /// Every key the program needs.
        needed: String,
    },
    /// A built-in list does not compile (a bug).
    #[error("built-in seccomp filter \"{0}\"")]
    BuiltIn(String, #[source] AllowError),
    /// No filter of that kind was loaded (a bug).
    #[error("no seccomp filter \"{0}\" was loaded")]
    Unknown(String),
    /// The SIGSYS handler cannot be installed.
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] std::io::Error),
    /// The kernel refused the filter.
    #[error("cannot install the seccomp filter \"{0}\"")]
    Install(String, #[source] seccompiler::Error),
}

/// The seccomp flags of every skiff program (`skiff`, `skiff-blk`, `skiff-net`).
#[derive(clap::Args, Clone, Debug, Default, PartialEq, Eq)]
pub struct SeccompArgs {
    /// Install no seccomp filter (as Firecracker's --no-seccomp). The default is the
    /// built-in per-thread filters: a forbidden system call kills the process by SIGSYS
    /// after a line on stderr naming the call and the thread.
    #[arg(long, global = true)]
    pub no_seccomp: bool,
    /// Install the per-thread filters of FILE instead of the built-in ones: seccompiler's
    /// JSON format, one filter per thread kind keyed by name (vmm, api, vcpu, reaper;
    /// blk_main, blk_worker; net_main, net_worker); each program takes its own keys and
    /// refuses a file that lacks one. `skiff --print-seccomp-filters` prints the built-in
    /// ones in this format.
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with = "no_seccomp",
        global = true
    )]
    pub seccomp_filter: Option<PathBuf>,
}

impl SeccompArgs {
    /// The choice the flags make.
    pub fn choice(&self) -> SeccompChoice {
        SeccompChoice::from_flags(self.no_seccomp, self.seccomp_filter.as_deref())
    }
}

/// Which filters a process installs (`--no-seccomp`, `--seccomp-filter FILE`, or the
/// built-in ones by default).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum SeccompChoice {
    /// The built-in filters.
    #[default]
    BuiltIn,
    /// The filters of a JSON file (seccompiler's format, one filter per thread kind).
    File(PathBuf),
    /// No filters.
    Off,
}

impl SeccompChoice {
    /// From the two command-line flags (clap makes them exclusive).
    pub fn from_flags(no_seccomp: bool, file: Option<&Path>) -> Self {
        match (no_seccomp, file) {
            (true, _) => SeccompChoice::Off,
            (false, Some(f)) => SeccompChoice::File(f.to_path_buf()),
            (false, None) => SeccompChoice::BuiltIn,
        }
    }

    /// The same choice as command-line arguments of a device process.
    pub fn to_args(&self) -> Vec<String> {
        match self {
            SeccompChoice::BuiltIn => Vec::new(),
            SeccompChoice::File(f) => vec!["--seccomp-filter".into(), f.display().to_string()],
            SeccompChoice::Off => vec!["--no-seccomp".into()],
        }
    }
}

/// The compiled filters of one process, by thread kind; empty when seccomp is off.
#[derive(Clone, Debug, Default)]
pub struct ThreadFilters {
    programs: HashMap<String, BpfProgram>,
    /// clone3 answers ENOSYS (see [`filters::THREADS_ONLY`]).
    no_clone3: BpfProgram,
    on: bool,
}

/// A filter that answers clone3 with ENOSYS and lets every other call through (to the
/// allow list installed with it): glibc then starts threads with clone, whose flags a
/// filter can check, where clone3's are behind a pointer it cannot read.
fn no_clone3() -> Result<BpfProgram, SandboxError> {
    let bad = |e| SandboxError::BuiltIn("clone3 answers ENOSYS".into(), AllowError::Backend(e));
    let rules = std::iter::once((libc::SYS_clone3, Vec::new())).collect();
    seccompiler::SeccompFilter::new(
        rules,
        seccompiler::SeccompAction::Allow,
        seccompiler::SeccompAction::Errno(libc::ENOSYS as u32),
        seccompiler::TargetArch::x86_64,
    )
    .and_then(TryInto::try_into)
    .map_err(bad)
}

impl ThreadFilters {
    /// Compiles the filters of `kinds` (keys of [`filters`]) for program `program` as
    /// `choice` says, and prepares the process for them (the SIGSYS handler; glibc's
    /// malloc told its arena limit now, as it would otherwise read
    /// /sys/devices/system/cpu/online from whichever thread first needs a new arena).
    pub fn load(
        choice: &SeccompChoice,
        program: &str,
        kinds: &[&str],
    ) -> Result<Self, SandboxError> {
        let programs = match choice {
            SeccompChoice::Off => return Ok(ThreadFilters::default()),
            SeccompChoice::BuiltIn => kinds
                .iter()
                .map(|&k| {
                    let list =
                        filters::built_in(k).ok_or_else(|| SandboxError::Unknown(k.into()))?;
                    let prog = list
                        .compile()
                        .map_err(|e| SandboxError::BuiltIn(k.into(), e))?;
                    Ok((k.to_string(), prog))
                })
                .collect::<Result<HashMap<_, _>, SandboxError>>()?,
            SeccompChoice::File(path) => {
                let file =
                    std::fs::File::open(path).map_err(|e| SandboxError::Read(path.clone(), e))?;
                let mut map = seccompiler::compile_from_json(file, seccompiler::TargetArch::x86_64)
                    .map_err(|e| SandboxError::Json(path.clone(), e))?;
                // A file handed over as an inherited fd (skiff passes its filter file so to
                // its device processes) is read once: the fd is closed, not kept for life.
                if let Some(fd) = path
                    .to_str()
                    .and_then(|p| p.strip_prefix("/proc/self/fd/"))
                    .and_then(|n| n.parse::<i32>().ok())
                    .filter(|n| *n > 2)
                {
                    // SAFETY: closes an inherited fd nothing else in this process uses.
                    unsafe { libc::close(fd) };
                }
                let mut programs = HashMap::new();
                for &k in kinds {
                    let prog = map.remove(k).ok_or_else(|| SandboxError::Missing {
                        file: path.clone(),
                        kind: k.into(),
                        needed: kinds.join(", "),
                    })?;
                    programs.insert(k.to_string(), prog);
                }
                programs
            }
        };
        trap::set_program(program);
        trap::install_handler().map_err(SandboxError::Handler)?;
        limit_malloc_arenas();
        Ok(ThreadFilters {
            programs,
            no_clone3: no_clone3()?,
            on: true,
        })
    }

    /// Whether filters are installed at all (not `--no-seccomp`).
    pub fn is_on(&self) -> bool {
        self.on
    }

    /// Installs the filter of `kind` on the calling thread (nothing when seccomp is off).
    /// Threads it starts afterwards keep it.
    pub fn install(&self, kind: &str) -> Result<(), SandboxError> {
        if !self.on {
            return Ok(());
        }
        let prog = self
            .programs
            .get(kind)
            .ok_or_else(|| SandboxError::Unknown(kind.into()))?;
        trap::set_thread_filter(kind);
        if filters::THREADS_ONLY.contains(&kind) {
            seccompiler::apply_filter(&self.no_clone3)
                .map_err(|e| SandboxError::Install(kind.into(), e))?;
        }
        seccompiler::apply_filter(prog).map_err(|e| SandboxError::Install(kind.into(), e))?;
        log::debug!(
            "seccomp filter \"{kind}\" installed ({} instructions)",
            prog.len()
        );
        Ok(())
    }
}

/// Sets glibc's malloc arena limit to its own default (8 per CPU on 64-bit), so that it
/// never reads the CPU count from sysfs under a filter that forbids open.
fn limit_malloc_arenas() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let arenas = libc::c_int::try_from(cpus.saturating_mul(8)).unwrap_or(libc::c_int::MAX);
    // SAFETY: mallopt only sets a malloc tunable.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) };
}
