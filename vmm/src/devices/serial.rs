//! The 8250 UART on COM1 (vm-superio) wired to the console, and the console output sink,
//! which also notices a guest kernel panic in the byte stream.

use std::fs::File;
use std::io::Write;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use vm_superio::serial::NoEvents;
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use super::IrqLine;
use crate::metrics::SerialMetrics;

/// Where the guest console goes.
pub enum ConsoleSink {
    /// skiff's stdout.
    Stdout(std::io::Stdout),
    /// A file.
    File(File),
    /// Discarded.
    Null,
}

const PANIC_MARKER: &[u8] = b"Kernel panic - not syncing";

/// Console output. The guest writes one byte per VM exit; bytes are collected and written
/// to the sink a line at a time (one syscall per line instead of per byte). A partial line
/// (a shell prompt) signals `flush_evt` once, and the event loop calls [`ConsoleOut::drain`].
/// The current line is also scanned for "Kernel panic - not syncing: ...".
pub struct ConsoleOut {
    sink: ConsoleSink,
    line: Vec<u8>,
    out: Vec<u8>,
    flush_evt: Option<EventFd>,
    flush_requested: bool,
    panic: Arc<Mutex<Option<String>>>,
    metrics: Option<Arc<SerialMetrics>>,
}

const OUT_BUFFER: usize = 4096;

impl ConsoleOut {
    /// A console writing to `sink`; the first panic line seen is stored in `panic`.
    pub fn new(
        sink: ConsoleSink,
        panic: Arc<Mutex<Option<String>>>,
        flush_evt: Option<EventFd>,
    ) -> Self {
        ConsoleOut {
            sink,
            line: Vec::with_capacity(256),
            out: Vec::with_capacity(OUT_BUFFER),
            flush_evt,
            flush_requested: false,
            panic,
            metrics: None,
        }
    }

    /// Counts output bytes and write errors in `m`.
    pub fn with_metrics(mut self, m: Arc<SerialMetrics>) -> Self {
        self.metrics = Some(m);
        self
    }

    /// Writes out everything buffered.
    pub fn drain(&mut self) -> std::io::Result<()> {
        self.flush_requested = false;
        if self.out.is_empty() {
            return Ok(());
        }
        let res = match &mut self.sink {
            ConsoleSink::Stdout(s) => s.write_all(&self.out).and_then(|_| s.flush()),
            ConsoleSink::File(f) => f.write_all(&self.out),
            ConsoleSink::Null => Ok(()),
        };
        self.out.clear();
        if res.is_err() {
            if let Some(m) = &self.metrics {
                m.write_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        res
    }

    fn scan(&mut self, buf: &[u8]) {
        for &b in buf {
            if b == b'\n' {
                if let Some(pos) = self
                    .line
                    .windows(PANIC_MARKER.len())
                    .position(|w| w == PANIC_MARKER)
                {
                    let text = String::from_utf8_lossy(&self.line[pos..])
                        .trim_end()
                        .to_string();
                    if let Ok(mut p) = self.panic.lock() {
                        p.get_or_insert(text);
                    }
                }
                self.line.clear();
            } else if self.line.len() < 1024 {
                self.line.push(b);
            }
        }
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(m) = &self.metrics {
            m.bytes_out.fetch_add(buf.len() as u64, Ordering::Relaxed);
        }
        self.scan(buf);
        self.out.extend_from_slice(buf);
        if buf.contains(&b'\n') || self.out.len() >= OUT_BUFFER || self.flush_evt.is_none() {
            self.drain()?;
        } else if !self.flush_requested {
            self.flush_requested = true;
            if let Some(evt) = &self.flush_evt {
                evt.write(1)?;
            }
        }
        Ok(buf.len())
    }

    /// vm-superio flushes after every byte; the line buffering above decides instead.
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The guest's COM1.
pub type SerialDevice = Serial<IrqLine, NoEvents, ConsoleOut>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_lines_wait_for_the_event_loop() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let panic = Arc::new(Mutex::new(None));
        let mut out = ConsoleOut::new(ConsoleSink::Null, panic, Some(evt.try_clone().unwrap()));
        out.write_all(b"# ").unwrap();
        out.write_all(b"x").unwrap();
        assert_eq!(evt.read().unwrap(), 1);
        assert_eq!(out.out, b"# x");
        out.write_all(b"\n").unwrap();
        assert!(out.out.is_empty());
    }

    #[test]
    fn panic_line_is_caught_across_writes() {
        let panic = Arc::new(Mutex::new(None));
        let mut out = ConsoleOut::new(ConsoleSink::Null, panic.clone(), None);
        out.write_all(b"[ 1.0] Kernel pan").unwrap();
        out.write_all(b"ic - not syncing: Attempted to kill init!\r\nmore\n")
            .unwrap();
        assert_eq!(
            panic.lock().unwrap().as_deref(),
            Some("Kernel panic - not syncing: Attempted to kill init!")
        );
    }
}
