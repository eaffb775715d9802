//! The process logger behind the `log` facade. Until `PUT /logger` (or a config file's
//! `logger` section) names a file or FIFO, records go to stderr as `skiff: LEVEL message`,
//! level from RUST_LOG (default info). After it, each record is one line in that file:
//! `2026-11-23T03:45:31.123456Z [skiff:ID:thread] LEVEL file:line message`, with the level
//! and origin shown as configured. A FIFO whose reader is slow loses lines rather than
//! stalling the VMM; lost lines are counted.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use api_server::models::{LogLevel, Logger as LoggerConfig};
use log::{LevelFilter, Log, Metadata, Record};

/// Errors configuring the logger.
#[derive(Debug, thiserror::Error)]
pub enum LoggerError {
    /// The log file could not be opened.
    #[error("cannot open log_path {0}")]
    Open(String, #[source] std::io::Error),
}

/// Throttles a log line that a guest can trigger at will: [`LogThrottle::hit`] counts one
/// occurrence and is true for the 1st, 2nd, 4th, 8th, ... so a guest doing it in a loop
/// cannot flood the log, and the count says how often it happened.
#[derive(Debug, Default)]
pub struct LogThrottle(AtomicU64);

impl LogThrottle {
    /// A throttle that has seen nothing.
    pub const fn new() -> Self {
        LogThrottle(AtomicU64::new(0))
    }

    /// Counts one occurrence; true when it deserves a log line.
    pub fn hit(&self) -> bool {
        (self.0.fetch_add(1, Ordering::Relaxed) + 1).is_power_of_two()
    }

    /// Occurrences so far.
    pub fn count(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

struct Target {
    file: File,
    show_level: bool,
    show_origin: bool,
    module: Option<String>,
}

struct SkiffLogger {
    target: Mutex<Option<Target>>,
    id: Mutex<String>,
}

/// Lines that could not be written (FIFO full, disk full).
pub static MISSED_LINES: AtomicU64 = AtomicU64::new(0);
/// Lines written to the configured target.
pub static LINES: AtomicU64 = AtomicU64::new(0);

static LOGGER: SkiffLogger = SkiffLogger {
    target: Mutex::new(None),
    id: Mutex::new(String::new()),
};

/// `secs` since the epoch as a UTC date and time (proleptic Gregorian calendar).
fn civil(secs: u64) -> (i64, u32, u32, u32, u32, u32) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y,
        m,
        d,
        (rem / 3600) as u32,
        (rem / 60 % 60) as u32,
        (rem % 60) as u32,
    )
}

fn timestamp() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let (y, mo, d, h, mi, s) = civil(now.as_secs());
    format!(
        "{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{:06}Z",
        now.subsec_micros()
    )
}

impl Log for SkiffLogger {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= log::max_level()
    }

    fn log(&self, r: &Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        // Formatted before taking the lock: a Display impl that logs must not deadlock.
        let msg = r.args().to_string();
        let mut target = self.target.lock().unwrap_or_else(|p| p.into_inner());
        let Some(t) = target.as_mut() else {
            // One write per line, so lines from threads do not interleave. \r keeps lines
            // readable when the console has put the terminal in raw mode.
            let line = format!("skiff: {} {msg}\r\n", r.level());
            let _ = std::io::stderr().lock().write_all(line.as_bytes());
            return;
        };
        if let Some(m) = &t.module {
            if !r.module_path().unwrap_or("").starts_with(m.as_str()) {
                return;
            }
        }
        let id = self.id.lock().map(|i| i.clone()).unwrap_or_default();
        let thread = std::thread::current();
        let mut line = format!(
            "{} [skiff:{id}:{}] ",
            timestamp(),
            thread.name().unwrap_or("?")
        );
        if t.show_level {
            line.push_str(&format!("{} ", r.level()));
        }
        if t.show_origin {
            line.push_str(&format!(
                "{}:{} ",
                r.file().unwrap_or("?"),
                r.line().unwrap_or(0)
            ));
        }
        line.push_str(&msg);
        line.push('\n');
        match t.file.write(line.as_bytes()) {
            Ok(n) if n == line.len() => LINES.fetch_add(1, Ordering::Relaxed),
            _ => MISSED_LINES.fetch_add(1, Ordering::Relaxed),
        };
    }

    fn flush(&self) {}
}

/// Installs the logger (stderr, level from RUST_LOG).
pub fn init() {
    let level = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.parse::<LevelFilter>().ok())
        .unwrap_or(LevelFilter::Info);
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(level);
    }
}

/// Sets the instance id shown on each line.
pub fn set_instance_id(id: &str) {
    if let Ok(mut i) = LOGGER.id.lock() {
        *i = id.to_string();
    }
}

fn level_filter(l: LogLevel) -> LevelFilter {
    match l {
        LogLevel::Off => LevelFilter::Off,
        LogLevel::Error => LevelFilter::Error,
        LogLevel::Warning => LevelFilter::Warn,
        LogLevel::Info => LevelFilter::Info,
        LogLevel::Debug => LevelFilter::Debug,
        LogLevel::Trace => LevelFilter::Trace,
    }
}

/// Applies `PUT /logger`: opens `log_path` (a file, created if absent and appended to, or
/// a FIFO, opened without blocking) and sets level and line format. Without `log_path`
/// only the level and format change.
pub fn configure(cfg: &LoggerConfig) -> Result<(), LoggerError> {
    let mut target = LOGGER.target.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(path) = &cfg.log_path {
        // O_RDWR keeps a FIFO open without a reader; O_NONBLOCK turns a full FIFO into a
        // missed line instead of a stalled VMM.
        let file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .mode(0o600)
            .open(path)
            .map_err(|e| LoggerError::Open(path.clone(), e))?;
        *target = Some(Target {
            file,
            show_level: false,
            show_origin: false,
            module: None,
        });
    }
    if let Some(t) = target.as_mut() {
        t.show_level = cfg.show_level.unwrap_or(t.show_level);
        t.show_origin = cfg.show_log_origin.unwrap_or(t.show_origin);
        if cfg.module.is_some() {
            t.module = cfg.module.clone();
        }
    }
    drop(target);
    // As Firecracker: a request without a level keeps the current one.
    if let Some(l) = cfg.level {
        log::set_max_level(level_filter(l));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil(0), (1970, 1, 1, 0, 0, 0));
        // 2026-11-23T03:45:31Z
        assert_eq!(civil(1_795_405_531), (2026, 11, 23, 3, 45, 31));
        // 2000-02-29T23:59:59Z (leap day)
        assert_eq!(civil(951_868_799), (2000, 2, 29, 23, 59, 59));
    }
}
