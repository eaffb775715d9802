//! A minimal i8042 keyboard controller: enough for Linux's driver to probe it quickly and
//! for `reboot=k` (command 0xFE) to reset the machine, which ends the VMM.
//!
//! vm-superio's `I8042Device` answers every read with 0x00, which makes Linux believe a
//! controller is present and then wait for replies to its self-test commands (about half a
//! second each), so skiff answers the controller commands itself.

use std::collections::VecDeque;

use vm_superio::Trigger;

use super::IrqLine;
use crate::logger::LogThrottle;

/// Controller commands the guest sent that are not emulated (logged throttled).
static UNKNOWN_COMMANDS: LogThrottle = LogThrottle::new();

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_TEST_AUX: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_DISABLE_KBD: u8 = 0xad;
const CMD_ENABLE_KBD: u8 = 0xae;
const CMD_WRITE_OUTPUT: u8 = 0xd1;
const CMD_RESET_CPU: u8 = 0xfe;

const SB_OUT_FULL: u8 = 0x01;
const SB_SYSTEM: u8 = 0x04;
const SB_CMD_DATA: u8 = 0x08;
const SB_KBD_ENABLED: u8 = 0x10;
const CTR_KBD_INT: u8 = 0x01;
const CTR_SYSTEM: u8 = 0x04;
const CTR_TRANSLATE: u8 = 0x40;

/// Ctrl, Alt and Del pressed, then released, in scan code set 2 (what the keyboard sends)
/// and set 1 (what the controller hands on when the guest enabled translation).
const CTRL_ALT_DEL_SET2: &[u8] = &[
    0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14,
];
const CTRL_ALT_DEL_SET1: &[u8] = &[0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];
/// Bytes the guest may leave unread before a key press is refused, and the most the output
/// queue holds: a guest that writes commands and never reads the answers makes the
/// controller drop the newest, as a real keyboard's 16-byte buffer overflows.
const OUT_LIMIT: usize = 16;

const KBD_ACK: u8 = 0xfa;
const KBD_RESET: u8 = 0xff;
const KBD_GET_ID: u8 = 0xf2;
const KBD_SET_LEDS: u8 = 0xed;
const KBD_SET_RATE: u8 = 0xf3;

/// Offset of the status/command port from the data port (0x64 - 0x60).
pub const COMMAND_OFFSET: u8 = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum Expect {
    Command,
    CtrByte,
    OutputPort,
    KbdArgument,
}

/// The controller.
pub struct I8042 {
    kbd_irq: IrqLine,
    ctr: u8,
    status: u8,
    out: VecDeque<u8>,
    expect: Expect,
    /// The output queue overflowed once (logged then, not again).
    overflowed: bool,
}

/// The controller's state as data (snapshots, live upgrade).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042State {
    ctr: u8,
    status: u8,
    out: Vec<u8>,
    expect: Expect,
}

impl I8042 {
    /// The controller's state.
    pub fn state(&self) -> I8042State {
        I8042State {
            ctr: self.ctr,
            status: self.status,
            out: self.out.iter().copied().collect(),
            expect: self.expect,
        }
    }

    /// A controller in `state` (at most [`OUT_LIMIT`] unread bytes are kept) raising
    /// `kbd_irq`.
    pub fn from_state(kbd_irq: IrqLine, state: &I8042State) -> Self {
        let mut c = I8042::new(kbd_irq);
        c.ctr = state.ctr;
        c.status = state.status;
        c.out = state.out.iter().take(OUT_LIMIT).copied().collect();
        c.expect = state.expect;
        c
    }

    /// A controller that raises `kbd_irq` (IRQ 1); a reset is reported by [`I8042::write`].
    pub fn new(kbd_irq: IrqLine) -> Self {
        I8042 {
            kbd_irq,
            ctr: CTR_KBD_INT | CTR_SYSTEM,
            status: SB_SYSTEM | SB_KBD_ENABLED,
            out: VecDeque::with_capacity(OUT_LIMIT),
            expect: Expect::Command,
            overflowed: false,
        }
    }

    fn push(&mut self, bytes: &[u8]) {
        let room = OUT_LIMIT.saturating_sub(self.out.len());
        if bytes.len() > room && !self.overflowed {
            self.overflowed = true;
            log::warn!("i8042: the guest leaves its output unread; bytes beyond {OUT_LIMIT} are dropped (logged once)");
        }
        self.out.extend(&bytes[..bytes.len().min(room)]);
        if self.ctr & CTR_KBD_INT != 0 {
            if let Err(e) = self.kbd_irq.trigger() {
                log::warn!("i8042: cannot raise IRQ 1: {e}");
            }
        }
    }

    /// Presses and releases Ctrl+Alt+Del on the keyboard. Fails when the guest has not
    /// enabled the keyboard or is not reading it.
    pub fn press_ctrl_alt_del(&mut self) -> Result<(), String> {
        if self.status & SB_KBD_ENABLED == 0 || self.ctr & CTR_KBD_INT == 0 {
            return Err("the guest has not enabled the i8042 keyboard or its interrupt".into());
        }
        if self.out.len() + CTRL_ALT_DEL_SET2.len().max(CTRL_ALT_DEL_SET1.len()) > OUT_LIMIT {
            return Err(format!(
                "the guest is not reading the i8042 keyboard ({} bytes pending)",
                self.out.len()
            ));
        }
        let codes = if self.ctr & CTR_TRANSLATE != 0 {
            CTRL_ALT_DEL_SET1
        } else {
            CTRL_ALT_DEL_SET2
        };
        self.push(codes);
        Ok(())
    }

    /// A read from data port + `offset`.
    pub fn read(&mut self, offset: u8) -> u8 {
        if offset == COMMAND_OFFSET {
            let full = if self.out.is_empty() { 0 } else { SB_OUT_FULL };
            self.status | full
        } else {
            let v = self.out.pop_front().unwrap_or(0);
            if !self.out.is_empty() && self.ctr & CTR_KBD_INT != 0 {
                let _ = self.kbd_irq.trigger();
            }
            v
        }
    }

    /// A write to data port + `offset`. Returns `true` when the guest asked for a reset.
    pub fn write(&mut self, offset: u8, value: u8) -> bool {
        if offset == COMMAND_OFFSET {
            self.status |= SB_CMD_DATA;
            self.expect = Expect::Command;
            match value {
                CMD_READ_CTR => self.push(&[self.ctr]),
                CMD_WRITE_CTR => self.expect = Expect::CtrByte,
                CMD_WRITE_OUTPUT => self.expect = Expect::OutputPort,
                CMD_SELF_TEST => self.push(&[0x55]),
                CMD_KBD_TEST | CMD_TEST_AUX => self.push(&[0x00]),
                CMD_DISABLE_KBD => self.status &= !SB_KBD_ENABLED,
                CMD_ENABLE_KBD => self.status |= SB_KBD_ENABLED,
                CMD_DISABLE_AUX | CMD_ENABLE_AUX => {}
                CMD_RESET_CPU => return true,
                other => {
                    if UNKNOWN_COMMANDS.hit() {
                        log::debug!("i8042: ignoring controller command {other:#x}");
                    }
                }
            }
            return false;
        }
        self.status &= !SB_CMD_DATA;
        match std::mem::replace(&mut self.expect, Expect::Command) {
            Expect::CtrByte => self.ctr = value,
            Expect::OutputPort => {}
            Expect::KbdArgument => self.push(&[KBD_ACK]),
            Expect::Command => match value {
                KBD_RESET => self.push(&[KBD_ACK, 0xaa]),
                KBD_GET_ID => self.push(&[KBD_ACK, 0xab, 0x83]),
                KBD_SET_LEDS | KBD_SET_RATE => {
                    self.expect = Expect::KbdArgument;
                    self.push(&[KBD_ACK]);
                }
                _ => self.push(&[KBD_ACK]),
            },
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn ctrl_alt_del_follows_translation() {
        let (mut d, irq) = dev();
        d.press_ctrl_alt_del().unwrap();
        assert!(irq.read().unwrap() >= 1);
        let got: Vec<u8> = (0..CTRL_ALT_DEL_SET2.len()).map(|_| d.read(0)).collect();
        assert_eq!(got, CTRL_ALT_DEL_SET2);
        d.write(COMMAND_OFFSET, CMD_WRITE_CTR);
        d.write(0, CTR_KBD_INT | CTR_SYSTEM | CTR_TRANSLATE);
        d.press_ctrl_alt_del().unwrap();
        let got: Vec<u8> = (0..CTRL_ALT_DEL_SET1.len()).map(|_| d.read(0)).collect();
        assert_eq!(got, CTRL_ALT_DEL_SET1);
        d.write(COMMAND_OFFSET, CMD_DISABLE_KBD);
        assert!(d.press_ctrl_alt_del().unwrap_err().contains("not enabled"));
    }

    fn dev() -> (I8042, EventFd) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        (I8042::new(IrqLine(irq.try_clone().unwrap())), irq)
    }

    /// A guest that writes commands and never reads the answers cannot grow the VMM's heap.
    #[test]
    fn unread_output_is_capped() {
        let (mut d, _) = dev();
        for _ in 0..100_000 {
            d.write(COMMAND_OFFSET, CMD_SELF_TEST);
            d.write(0, KBD_GET_ID);
        }
        assert_eq!(d.out.len(), OUT_LIMIT);
        assert!(d.press_ctrl_alt_del().is_err());
        // The oldest answers are kept, in order.
        assert_eq!(d.read(0), 0x55);
        assert_eq!(d.read(0), KBD_ACK);
        while d.read(COMMAND_OFFSET) & SB_OUT_FULL != 0 {
            d.read(0);
        }
        d.press_ctrl_alt_del().unwrap();
    }

    #[test]
    fn state_round_trips() {
        let (mut c, _evt) = dev();
        c.write(COMMAND_OFFSET, CMD_WRITE_CTR);
        c.write(0, CTR_KBD_INT | CTR_TRANSLATE);
        c.write(COMMAND_OFFSET, CMD_SELF_TEST);
        c.write(0, KBD_SET_LEDS);
        let st = c.state();
        let json = serde_json::to_string(&st).unwrap();
        let back: I8042State = serde_json::from_str(&json).unwrap();
        assert_eq!(back, st);
        let mut d = I8042::from_state(IrqLine(EventFd::new(0).unwrap()), &back);
        assert_eq!(d.state(), st);
        // The pending argument of SET_LEDS is still expected: the next write is acked.
        assert_eq!(d.read(0), 0x55);
        assert_eq!(d.read(0), KBD_ACK);
        d.write(0, 0);
        assert_eq!(d.read(0), KBD_ACK);
    }

    #[test]
    fn self_test_and_ctr() {
        let (mut d, _) = dev();
        assert_eq!(d.read(COMMAND_OFFSET) & SB_OUT_FULL, 0);
        d.write(COMMAND_OFFSET, CMD_SELF_TEST);
        assert_ne!(d.read(COMMAND_OFFSET) & SB_OUT_FULL, 0);
        assert_eq!(d.read(0), 0x55);
        d.write(COMMAND_OFFSET, CMD_WRITE_CTR);
        d.write(0, 0x47);
        d.write(COMMAND_OFFSET, CMD_READ_CTR);
        assert_eq!(d.read(0), 0x47);
    }

    #[test]
    fn reset_is_reported_and_keyboard_answers_with_irq() {
        let (mut d, irq) = dev();
        assert!(d.write(COMMAND_OFFSET, CMD_RESET_CPU));
        assert!(!d.write(0, KBD_GET_ID));
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!((d.read(0), d.read(0), d.read(0)), (KBD_ACK, 0xab, 0x83));
    }
}
