//! Minimal stderr logger behind the `log` facade.
//!
//! The level comes from `RUST_LOG` (`off`, `error`, `warn`, `info`, `debug`, `trace`);
//! the default is `info`. Every line is prefixed with the program name.

use std::io::Write;
use std::sync::OnceLock;

use log::{LevelFilter, Log, Metadata, Record};

/// Errors raised while installing the logger.
#[derive(Debug, thiserror::Error)]
pub enum LoggerError {
    /// A logger was already installed in this process.
    #[error("a logger is already installed")]
    AlreadySet,
}

struct StderrLogger {
    program: &'static str,
    level: LevelFilter,
}

impl Log for StderrLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut err = std::io::stderr().lock();
        // Logging must never fail the caller; a closed stderr is ignored.
        let _ = writeln!(
            err,
            "{}: {} {}",
            self.program,
            record.level().as_str().to_ascii_lowercase(),
            record.args()
        );
    }

    fn flush(&self) {
        let _ = std::io::stderr().flush();
    }
}

static LOGGER: OnceLock<StderrLogger> = OnceLock::new();

/// Parses a `RUST_LOG`-style level; unknown values give `info`.
pub fn parse_level(value: Option<&str>) -> LevelFilter {
    match value.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
        Some("off") => LevelFilter::Off,
        Some("error") => LevelFilter::Error,
        Some("warn") => LevelFilter::Warn,
        Some("debug") => LevelFilter::Debug,
        Some("trace") => LevelFilter::Trace,
        _ => LevelFilter::Info,
    }
}

/// Installs the stderr logger for `program`, level from `RUST_LOG`, and names the process
/// `program`: skiff starts device processes through the fd of the checked binary
/// (`/proc/self/fd/N`), which would leave the fd number as the name `ps` and `top` show.
pub fn init(program: &'static str) -> Result<(), LoggerError> {
    if let Ok(name) = std::ffi::CString::new(program) {
        // SAFETY: PR_SET_NAME reads a NUL-terminated string (truncated to 15 bytes).
        unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
    }
    let level = parse_level(std::env::var("RUST_LOG").ok().as_deref());
    let logger = LOGGER.get_or_init(|| StderrLogger { program, level });
    log::set_logger(logger).map_err(|_| LoggerError::AlreadySet)?;
    log::set_max_level(level);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_levels() {
        assert_eq!(parse_level(None), LevelFilter::Info);
        assert_eq!(parse_level(Some("debug")), LevelFilter::Debug);
        assert_eq!(parse_level(Some("WARN")), LevelFilter::Warn);
        assert_eq!(parse_level(Some("off")), LevelFilter::Off);
        assert_eq!(parse_level(Some("bogus")), LevelFilter::Info);
    }
}
