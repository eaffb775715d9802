//! vCPU threads: the KVM_RUN loop, dispatching exits to the I/O bus.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::devices::bus::{BusAction, IoBus};
use crate::exit::{ExitReason, VmExit};
use crate::metrics::VcpuMetrics;
use crate::state::VcpuState;

const MSR_IA32_TSC: u32 = 0x10;

/// Where vCPU threads park while the VM is paused.
///
/// Pausing sets the flag and kicks the vCPU threads out of KVM_RUN (the caller repeats the
/// kick until every thread has parked, because a kick can land just before a thread enters
/// KVM_RUN). A parked vCPU has saved its TSC; it restores it before running again, so the
/// guest's TSC, like its kvmclock (restored by the VMM), does not advance while paused.
#[derive(Default)]
pub struct VcpuGate {
    paused: AtomicBool,
    state: Mutex<GateState>,
    cv: Condvar,
}

#[derive(Default)]
struct GateState {
    want_pause: bool,
    parked: usize,
    /// The pause was given up: parked vCPUs must not restore their saved TSC.
    aborted: bool,
    /// vCPUs asked to save their state (parked vCPUs answer).
    save_requests: Vec<u8>,
    /// Their answers.
    saved: Vec<(u8, Result<VcpuState, String>)>,
}

impl VcpuGate {
    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks the vCPUs to park (they still need a kick to leave KVM_RUN).
    pub fn request_pause(&self) {
        let mut st = self.lock();
        st.want_pause = true;
        st.aborted = false;
        drop(st);
        self.paused.store(true, Ordering::Release);
    }

    /// Waits until `n` vCPUs are parked; `kick` is called every millisecond meanwhile.
    /// Returns false on timeout.
    pub fn wait_parked(&self, n: usize, timeout: Duration, mut kick: impl FnMut()) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        while st.parked < n {
            if Instant::now() >= deadline {
                return false;
            }
            drop(st);
            kick();
            st = self.lock();
            if st.parked < n {
                st = self
                    .cv
                    .wait_timeout(st, Duration::from_millis(1))
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
        }
        true
    }

    /// Asks the `n` parked vCPUs for their state and waits for every answer, at most
    /// `timeout`. The VM must be paused ([`VcpuGate::wait_parked`] returned true). Each
    /// state's TSC is the one the vCPU saved as it parked, so every vCPU's clock stands
    /// where the pause stopped it.
    pub fn save_all(&self, n: u8, timeout: Duration) -> Result<Vec<VcpuState>, String> {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        if !st.want_pause || (st.parked as u64) < u64::from(n) {
            return Err("the vCPUs are not all parked".into());
        }
        st.saved.clear();
        st.save_requests = (0..n).collect();
        self.cv.notify_all();
        while st.saved.len() < n as usize {
            let now = Instant::now();
            if now >= deadline {
                st.save_requests.clear();
                return Err(format!(
                    "{} of {n} vCPUs saved their state within {} ms",
                    st.saved.len(),
                    timeout.as_millis()
                ));
            }
            st = self
                .cv
                .wait_timeout(st, deadline - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        let mut saved = std::mem::take(&mut st.saved);
        drop(st);
        saved.sort_by_key(|(i, _)| *i);
        saved.into_iter().map(|(_, r)| r).collect()
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) {
        self.release(false);
    }

    /// Gives up a pause that did not complete: vCPUs that parked run on without restoring
    /// their TSC, since the guest clock was never stopped.
    pub fn abort(&self) {
        self.release(true);
    }

    fn release(&self, aborted: bool) {
        let mut st = self.lock();
        st.want_pause = false;
        st.aborted = aborted;
        self.paused.store(false, Ordering::Release);
        self.cv.notify_all();
    }

    fn park(&self, fd: &mut VcpuFd, index: u8, msr_list: &[u32]) {
        let st = self.lock();
        if !st.want_pause {
            return;
        }
        drop(st);
        complete_pending_exit(fd, index);
        let mut st = self.lock();
        if !st.want_pause {
            return;
        }
        let tsc = read_tsc(fd);
        if let Err(e) = &tsc {
            log::warn!("vcpu{index}: cannot save the TSC for the pause: {e}");
        }
        st.parked += 1;
        self.cv.notify_all();
        while st.want_pause {
            if let Some(pos) = st.save_requests.iter().position(|&i| i == index) {
                st.save_requests.swap_remove(pos);
                drop(st);
                let r = save_parked(fd, index, msr_list, tsc.as_ref().ok().copied());
                st = self.lock();
                st.saved.push((index, r));
                self.cv.notify_all();
                continue;
            }
            st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.parked -= 1;
        let aborted = st.aborted;
        drop(st);
        if aborted {
            return;
        }
        if let Ok(tsc) = tsc {
            if let Err(e) = write_tsc(fd, tsc) {
                log::warn!("vcpu{index}: cannot restore the TSC after the pause: {e}");
            }
        }
    }
}

/// Completes the I/O or MMIO exit this vCPU last returned to userspace for (KVM finishes it
/// on the next KVM_RUN: an IN's or MMIO read's value goes into the register, RIP moves
/// past the instruction). Until then its state as KVM reports it is inconsistent, and a
/// state saved then would repeat or lose the access ("userspace should ensure that the
/// operation is completed before performing a live migration", KVM's API documentation).
/// With `immediate_exit` set, KVM_RUN completes it and returns EINTR without running the
/// guest.
fn complete_pending_exit(fd: &mut VcpuFd, index: u8) {
    fd.set_kvm_immediate_exit(1);
    match fd.run() {
        Err(e) if e.errno() == libc::EINTR => {}
        Ok(exit) => log::warn!("vcpu{index}: completing its last exit returned {exit:?}"),
        Err(e) => log::warn!("vcpu{index}: completing its last exit failed: {e}"),
    }
    fd.set_kvm_immediate_exit(0);
}

/// The state of a parked vCPU, with the TSC it had when it parked.
fn save_parked(
    fd: &VcpuFd,
    index: u8,
    msr_list: &[u32],
    parked_tsc: Option<u64>,
) -> Result<VcpuState, String> {
    let mut state = VcpuState::save(fd, index, msr_list).map_err(|e| crate::error_chain(&e))?;
    if let Some(tsc) = parked_tsc {
        for m in state.msrs.iter_mut().filter(|m| m.index == MSR_IA32_TSC) {
            m.data = tsc;
        }
    }
    Ok(state)
}

fn read_tsc(fd: &VcpuFd) -> Result<u64, kvm_ioctls::Error> {
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_TSC,
        ..Default::default()
    }])
    .map_err(|_| kvm_ioctls::Error::new(libc::ENOMEM))?;
    fd.get_msrs(&mut msrs)?;
    Ok(msrs.as_slice()[0].data)
}

fn write_tsc(fd: &VcpuFd, tsc: u64) -> Result<(), kvm_ioctls::Error> {
    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_TSC,
        data: tsc,
        ..Default::default()
    }])
    .map_err(|_| kvm_ioctls::Error::new(libc::ENOMEM))?;
    fd.set_msrs(&msrs).map(|_| ())
}

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
    /// Pause/resume.
    pub gate: Arc<VcpuGate>,
    /// Exit counters.
    pub metrics: Arc<VcpuMetrics>,
    /// The MSRs a saved state holds (KVM_GET_MSR_INDEX_LIST).
    pub msr_list: Arc<Vec<u32>>,
}

impl Vcpu {
    /// Runs until the guest stops or `stop` is set.
    pub fn run(mut self) {
        let m = self.metrics.clone();
        let inc = VcpuMetrics::inc;
        while !self.stop.load(Ordering::Acquire) {
            if self.gate.paused.load(Ordering::Acquire) {
                self.gate.park(&mut self.fd, self.index, &self.msr_list);
                continue;
            }
            match self.fd.run() {
                Ok(exit) => match exit {
                    VcpuExit::IoIn(port, data) => {
                        inc(&m.io_in);
                        self.bus.pio_read(port, data)
                    }
                    VcpuExit::IoOut(port, data) => {
                        inc(&m.io_out);
                        if let BusAction::Reset(how) = self.bus.pio_write(port, data) {
                            self.exit
                                .report(ExitReason::Reset(format!("vCPU {}: {how}", self.index)));
                        }
                    }
                    VcpuExit::MmioRead(addr, data) => {
                        inc(&m.mmio_read);
                        self.bus.mmio_read(addr, data)
                    }
                    VcpuExit::MmioWrite(addr, data) => {
                        inc(&m.mmio_write);
                        self.bus.mmio_write(addr, data)
                    }
                    VcpuExit::Hlt => {
                        inc(&m.hlt);
                        log::debug!("vcpu{}: HLT with interrupts off", self.index);
                        self.exit.report(ExitReason::Halted);
                    }
                    VcpuExit::Shutdown => {
                        inc(&m.shutdown);
                        let rip = self.fd.get_regs().map(|r| r.rip).unwrap_or(0);
                        self.exit.report(ExitReason::Reset(format!(
                            "vCPU {}: triple fault (KVM_EXIT_SHUTDOWN) at rip {rip:#x}",
                            self.index
                        )));
                    }
                    VcpuExit::SystemEvent(kind, _) => {
                        inc(&m.system_event);
                        self.exit.report(ExitReason::Reset(format!(
                            "vCPU {}: KVM system event {kind}",
                            self.index
                        )));
                    }
                    VcpuExit::InternalError => {
                        inc(&m.failure);
                        self.exit.report(ExitReason::KvmFailure(format!(
                            "vCPU {}: KVM internal error (emulation failure)",
                            self.index
                        )));
                    }
                    VcpuExit::FailEntry(reason, cpu) => {
                        inc(&m.failure);
                        self.exit.report(ExitReason::KvmFailure(format!(
                            "vCPU {}: KVM entry failure, hardware reason {reason:#x} on host CPU {cpu}",
                            self.index
                        )));
                    }
                    other => {
                        inc(&m.other);
                        self.exit.report(ExitReason::KvmFailure(format!(
                            "vCPU {}: unexpected KVM exit {other:?}",
                            self.index
                        )));
                    }
                },
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    inc(&m.interrupted)
                }
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
