//! vCPU threads: the KVM_RUN loop, dispatching exits to the I/O bus.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::devices::bus::{BusAction, IoBus};
use crate::exit::{ExitReason, VmExit};

/// The signal used to kick a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) handler for [`kick_signal`]: its only job is to make KVM_RUN
/// return EINTR.
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
}

/// One vCPU and what it needs at run time.
pub struct Vcpu {
    /// vCPU index (= APIC id).
    pub index: u8,
    /// The KVM vCPU.
    pub fd: VcpuFd,
    /// Devices.
    pub bus: Arc<IoBus>,
    /// Where the VM's end is reported.
    pub exit: Arc<VmExit>,
    /// Set when the VM is stopping.
    pub stop: Arc<AtomicBool>,
}

impl Vcpu {
    /// Runs until the guest stops or `stop` is set.
    pub fn run(mut self) {
        while !self.stop.load(Ordering::Acquire) {
            match self.fd.run() {
                Ok(exit) => match exit {
                    VcpuExit::IoIn(port, data) => self.bus.pio_read(port, data),
                    VcpuExit::IoOut(port, data) => {
                        if self.bus.pio_write(port, data) == BusAction::Reset {
                            self.exit.report(ExitReason::Reset(format!(
                                "vCPU {}: i8042 reset command",
                                self.index
                            )));
                        }
                    }
                    VcpuExit::MmioRead(addr, data) => self.bus.mmio_read(addr, data),
                    VcpuExit::MmioWrite(addr, data) => self.bus.mmio_write(addr, data),
                    VcpuExit::Hlt => {
                        log::debug!("vcpu{}: HLT with interrupts off", self.index);
                        self.exit.report(ExitReason::Halted);
                    }
                    VcpuExit::Shutdown => {
                        let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
                        self.exit.report(ExitReason::Reset(format!(
                            "vCPU {}: triple fault (KVM_EXIT_SHUTDOWN) at rip {rip:#x}",
                            self.index
                        )));
                    }
                    VcpuExit::SystemEvent(kind, _) => {
                        self.exit.report(ExitReason::Reset(format!(
                            "vCPU {}: KVM system event {kind}",
                            self.index
                        )));
                    }
                    VcpuExit::InternalError => {
                        self.exit.report(ExitReason::KvmFailure(format!(
                            "vCPU {}: KVM internal error (emulation failure)",
                            self.index
                        )));
                    }
                    VcpuExit::FailEntry(reason, cpu) => {
                        self.exit.report(ExitReason::KvmFailure(format!(
                            "vCPU {}: KVM entry failure, hardware reason {reason:#x} on host CPU {cpu}",
                            self.index
                        )));
                    }
                    other => {
                        self.exit.report(ExitReason::KvmFailure(format!(
                            "vCPU {}: unexpected KVM exit {other:?}",
                            self.index
                        )));
                    }
                },
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => {
                    self.exit.report(ExitReason::KvmFailure(format!(
                        "vCPU {}: KVM_RUN failed: {e}",
                        self.index
                    )));
                }
            }
        }
    }
}
