//! Test harness for skiff: finds the guest artifacts and the built binaries, starts `skiff` with a
//! Firecracker-format config file or raw CLI arguments, drives the guest's serial console, and checks
//! the host for what a VM may leave behind (device processes, TAP devices).
//!
//! The guest-booting tests live in `tests/guest.rs` (one binary, run by [`runner`]), the dependency
//! arrows of DESIGN.md in `tests/deps.rs`.

pub mod artifacts;
mod hang;
pub mod host;
mod nested;
pub mod runner;
pub mod vm;

pub use artifacts::{
    binary, debian_artifacts, guest_artifacts, repo_root, stock_artifacts, GuestArtifacts,
};
pub use vm::{DriveSpec, NetSpec, TestDir, TestVm, VmConfig, DEFAULT_BOOT_ARGS};

/// What every harness function and test returns: the error is the message shown for a failed test.
pub type Result<T = ()> = std::result::Result<T, String>;

/// Fails the current test with a formatted message unless the condition holds.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err(format!($($arg)+));
        }
    };
}
