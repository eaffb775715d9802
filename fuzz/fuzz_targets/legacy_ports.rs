//! The legacy devices a guest reaches through port I/O: the i8042 controller and the 8250
//! UART with skiff's console sink. Any byte stream to their ports never panics and never
//! grows the VMM's memory without bound (libFuzzer's -rss_limit_mb and -malloc_limit_mb
//! catch growth).
//!
//! Input: records of 3 bytes: op, offset, value. op & 1 picks the device (i8042, UART);
//! op & 2 read or write.
#![no_main]

use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use vmm::devices::i8042::I8042;
use vmm::devices::serial::{ConsoleOut, ConsoleSink, SerialDevice};
use vmm::devices::IrqLine;
use vmm_sys_util::eventfd::EventFd;

fn line() -> IrqLine {
    IrqLine(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).expect("eventfd"))
}

fuzz_target!(|data: &[u8]| {
    let mut kbd = I8042::new(line());
    let panic = Arc::new(Mutex::new(None));
    let out = ConsoleOut::new(ConsoleSink::Null, panic, None);
    let mut uart = SerialDevice::new(line(), out);
    for r in data.chunks_exact(3) {
        let (op, offset, value) = (r[0], r[1], r[2]);
        if op & 1 == 0 {
            // Ports 0x60 and 0x64: offsets 0 and 4.
            let off = if offset & 1 == 0 { 0 } else { 4 };
            if op & 2 == 0 {
                let _ = kbd.read(off);
            } else {
                let _ = kbd.write(off, value);
            }
        } else {
            let off = offset % 8;
            if op & 2 == 0 {
                let _ = uart.read(off);
            } else {
                let _ = uart.write(off, value);
            }
        }
    }
    if data.first() == Some(&0xff) {
        let _ = kbd.press_ctrl_alt_del();
    }
});
