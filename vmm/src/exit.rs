//! How a VM ends: the first reason reported wins and wakes the event loop.

use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

/// Why the VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest rebooted or powered off; how (i8042 reset, ACPI S5 or reset register, triple fault, system event).
    Reset(String),
    /// A vCPU halted with interrupts off.
    Halted,
    /// The guest kernel panicked; the console line that said so.
    Panic(String),
    /// KVM could not run the guest.
    KvmFailure(String),
    /// A device process died.
    DeviceFailure(String),
    /// SIGTERM or SIGINT.
    Signal(i32),
    /// A new VMM process (this pid) took the VM over: a live upgrade.
    HandedOver(u32),
}

/// The shared "VM is over" latch.
pub struct VmExit {
    reason: Mutex<Option<ExitReason>>,
    /// Written once when the first reason arrives.
    pub evt: EventFd,
}

impl VmExit {
    /// A new latch.
    pub fn new() -> std::io::Result<Self> {
        Ok(VmExit {
            reason: Mutex::new(None),
            evt: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
        })
    }

    /// Records `reason` if none was recorded yet, and wakes the event loop.
    pub fn report(&self, reason: ExitReason) {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            *r = Some(reason);
            if let Err(e) = self.evt.write(1) {
                log::error!("cannot signal the VM's end: {e}");
            }
        }
    }

    /// The recorded reason.
    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
