//! `skiff-jailer`: starts skiff confined in a cell of its own (see `--help` and
//! docs/confinement.md).

mod args;
mod cell;
mod cgroup;
mod elf;
mod jail;
mod launcher;
mod supervise;

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;

/// The error and its causes on one line.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// Errors of the whole run.
#[derive(Debug, thiserror::Error)]
enum JailerError {
    #[error(transparent)]
    Args(#[from] args::ArgsError),
    #[error(transparent)]
    Cgroup(#[from] cgroup::CgroupError),
    #[error(transparent)]
    Cell(#[from] cell::CellError),
    #[error(transparent)]
    Supervise(#[from] supervise::SuperviseError),
    #[error("skiff-jailer must run as root (it creates namespaces, device nodes and cgroups)")]
    NotRoot,
}

fn run(args: args::Args) -> Result<i32, JailerError> {
    let started = Instant::now();
    let plan = args.validate()?;
    let (root, controllers) = cgroup::check(&plan)?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(JailerError::NotRoot);
    }
    // Nothing on the host was touched before this line; each step below undoes itself on
    // error, and the supervisor removes both when skiff ends.
    let cell = cell::Cell::create(&plan)?;
    let cgroup = match cgroup::Cgroup::create(&plan, &root, &controllers) {
        Ok(c) => c,
        Err(e) => {
            let mut cell = cell;
            let _ = cell.remove();
            return Err(e.into());
        }
    };
    Ok(supervise::run(&plan, cell, cgroup, started)?)
}

fn main() -> ExitCode {
    let args = args::Args::parse();
    match run(args) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("skiff-jailer: error: {}", chain(&e));
            ExitCode::from(1)
        }
    }
}
