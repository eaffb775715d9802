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
    /// A file, at most a given size.
    File(CappedFile),
    /// Discarded.
    Null,
}

/// The note a capped console file starts with once older output was dropped.
const DROPPED_NOTE: &[u8] =
    b"[skiff: older console output was dropped: the console file is capped]\n";

/// A console file that never grows past `cap` bytes: a guest printing without end would
/// fill the host's disk. When a write would pass the cap, the newest half is kept (moved
/// to the start, after a note saying older output was dropped) and the file is cut there;
/// the first time is logged.
pub struct CappedFile {
    file: File,
    len: u64,
    cap: u64,
    dropped: bool,
}

impl CappedFile {
    /// Wraps `file` (opened for writing, not append) positioned at its end, capped at `cap`
    /// bytes (at least 4 KiB).
    pub fn new(file: File, cap: u64) -> std::io::Result<Self> {
        use std::io::Seek;
        let mut file = file;
        let len = file.seek(std::io::SeekFrom::End(0))?;
        let mut f = CappedFile {
            file,
            len,
            cap: cap.max(4096),
            dropped: false,
        };
        if f.len > f.cap {
            f.drop_oldest(0)?;
        }
        Ok(f)
    }

    /// Keeps the newest bytes so that `incoming` more fit under the cap.
    fn drop_oldest(&mut self, incoming: u64) -> std::io::Result<()> {
        use std::io::{Seek, SeekFrom};
        use std::os::unix::fs::FileExt;
        let keep = (self.cap / 2)
            .saturating_sub(incoming.min(self.cap / 2))
            .min(self.len);
        let mut tail = vec![0u8; keep as usize];
        self.file.read_exact_at(&mut tail, self.len - keep)?;
        self.file.write_all_at(DROPPED_NOTE, 0)?;
        self.file.write_all_at(&tail, DROPPED_NOTE.len() as u64)?;
        self.len = DROPPED_NOTE.len() as u64 + keep;
        self.file.set_len(self.len)?;
        self.file.seek(SeekFrom::Start(self.len))?;
        if !self.dropped {
            self.dropped = true;
            log::warn!(
                "the guest console reached the console file's cap of {} bytes; older output \
                 is dropped from now on (logged once)",
                self.cap
            );
        }
        Ok(())
    }
}

impl Write for CappedFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // What is larger than half the cap is cut to its newest half.
        let buf = &buf[buf.len().saturating_sub((self.cap / 2) as usize)..];
        if self.len + buf.len() as u64 > self.cap {
            self.drop_oldest(buf.len() as u64)?;
        }
        self.file.write_all(buf)?;
        self.len += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
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

/// vm-superio's receive FIFO (its `FIFO_SIZE`, not exported).
const UART_FIFO: usize = 64;

/// The UART's registers and unread input, as data (vm-superio's `SerialState`, which
/// has no serde support of its own).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialRegs {
    baud_divisor_low: u8,
    baud_divisor_high: u8,
    interrupt_enable: u8,
    interrupt_identification: u8,
    line_control: u8,
    line_status: u8,
    modem_control: u8,
    modem_status: u8,
    scratch: u8,
    in_buffer: Vec<u8>,
}

impl SerialRegs {
    /// The state of `serial`.
    pub fn of(serial: &SerialDevice) -> Self {
        let s = serial.state();
        SerialRegs {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// A UART in this state, raising `irq` and writing to `out`. Unread input beyond the
    /// FIFO's size is dropped (vm-superio refuses it).
    pub fn build(&self, irq: IrqLine, out: ConsoleOut) -> Result<SerialDevice, String> {
        let mut in_buffer = self.in_buffer.clone();
        in_buffer.truncate(UART_FIFO);
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: self.baud_divisor_low,
            baud_divisor_high: self.baud_divisor_high,
            interrupt_enable: self.interrupt_enable,
            interrupt_identification: self.interrupt_identification,
            line_control: self.line_control,
            line_status: self.line_status,
            modem_control: self.modem_control,
            modem_status: self.modem_status,
            scratch: self.scratch,
            in_buffer,
        };
        Serial::from_state(&state, irq, NoEvents, out).map_err(|e| format!("{e:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_console_file_stays_under_its_cap_and_keeps_the_newest_output() {
        let path = std::env::temp_dir().join(format!("skiff-console-cap-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .read(true)
            .open(&path)
            .unwrap();
        let cap = 8192u64;
        let mut f = CappedFile::new(file, cap).unwrap();
        for i in 0..10_000u32 {
            f.write_all(format!("line {i:05}\n").as_bytes()).unwrap();
            assert!(f.len <= cap);
        }
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.len() as u64 <= cap);
        assert!(text.starts_with("[skiff: older console output was dropped"));
        assert!(
            text.ends_with("line 09999\n"),
            "{}",
            &text[text.len() - 40..]
        );
        assert!(!text.contains("line 00000"));
        // A write larger than the cap keeps its newest half.
        f.write_all(&vec![b'x'; 3 * cap as usize]).unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() <= cap);
        let _ = std::fs::remove_file(&path);
    }

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
