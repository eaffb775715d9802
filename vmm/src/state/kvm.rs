//! The KVM side of the VM's state, as data: each vCPU's registers and the VM's interrupt
//! controllers, PIT and clock. Saved from a stopped vCPU (parked with its last exit
//! completed, or never run) and put back into a fresh one, CPUID first, then in QEMU's
//! order.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// Errors saving or restoring KVM state.
#[derive(Debug, thiserror::Error)]
pub enum KvmStateError {
    /// A vCPU ioctl failed.
    #[error("vCPU {index}: KVM refused to {what}")]
    Vcpu {
        /// vCPU index.
        index: u8,
        /// The operation.
        what: &'static str,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A VM ioctl failed.
    #[error("KVM refused to {0}")]
    Vm(&'static str, #[source] kvm_ioctls::Error),
    /// KVM took fewer MSRs than it was given.
    #[error("vCPU {index}: KVM refused MSR {msr:#x} ({done} of {total} restored)")]
    Msr {
        /// vCPU index.
        index: u8,
        /// The first MSR KVM did not take.
        msr: u32,
        /// MSRs taken.
        done: usize,
        /// MSRs given.
        total: usize,
    },
    /// A list too long for KVM's containers.
    #[error("vCPU {0}: {1} entries are more than KVM takes")]
    TooMany(u8, &'static str),
}

/// One vCPU's architectural state.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index (= APIC id).
    pub index: u8,
    /// The CPUID the guest sees.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Runnable, halted, waiting for SIPI, ...
    pub mp_state: kvm_mp_state,
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// FPU, SSE and AVX state (the legacy 4 KiB XSAVE area).
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// The local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// Every MSR KVM lists and lets us read, TSC and kvmclock included.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs and SMIs.
    pub events: kvm_vcpu_events,
    /// The guest's TSC frequency, when KVM reports it.
    pub tsc_khz: Option<u32>,
}

/// The VM-wide interrupt controllers, timer and clock.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KvmVmState {
    /// The master 8259.
    pub pic_master: kvm_irqchip,
    /// The slave 8259.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC.
    pub ioapic: kvm_irqchip,
    /// The 8254 PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock, as it stood when the vCPUs stopped.
    pub clock: kvm_clock_data,
}

fn vcpu_err(index: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> KvmStateError {
    move |source| KvmStateError::Vcpu {
        index,
        what,
        source,
    }
}

/// Reads the MSRs of `msr_list` that KVM lets us read. An MSR KVM lists but cannot read for
/// this vCPU (the list is the host's, not the guest CPUID's) is left out: it has no state.
fn read_msrs(
    fd: &VcpuFd,
    index: u8,
    msr_list: &[u32],
) -> Result<Vec<kvm_msr_entry>, KvmStateError> {
    let mut out = Vec::with_capacity(msr_list.len());
    let mut rest = msr_list;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&i| kvm_msr_entry {
                index: i,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|_| KvmStateError::TooMany(index, "MSR"))?;
        let n = fd
            .get_msrs(&mut msrs)
            .map_err(vcpu_err(index, "read MSRs"))?;
        out.extend_from_slice(&msrs.as_slice()[..n.min(chunk.len())]);
        // KVM stops at the first MSR it cannot read: skip that one.
        rest = &rest[(n + 1).min(rest.len())..];
    }
    Ok(out)
}

impl VcpuState {
    /// Saves the state of a vCPU that is not running. `msr_list` is KVM's
    /// (`KVM_GET_MSR_INDEX_LIST`).
    pub fn save(fd: &VcpuFd, index: u8, msr_list: &[u32]) -> Result<Self, KvmStateError> {
        let e = |what| vcpu_err(index, what);
        // Events last but MP state first, as the kernel documentation advises: reading MP
        // state lets KVM flush pending APIC events into it.
        let mp_state = fd.get_mp_state().map_err(e("read the MP state"))?;
        let regs = fd.get_regs().map_err(e("read the registers"))?;
        let sregs = fd.get_sregs().map_err(e("read the special registers"))?;
        let xsave = fd.get_xsave().map_err(e("read the XSAVE area"))?;
        let xcrs = fd.get_xcrs().map_err(e("read the XCRs"))?;
        let debug_regs = fd.get_debug_regs().map_err(e("read the debug registers"))?;
        let lapic = fd.get_lapic().map_err(e("read the LAPIC"))?;
        let tsc_khz = fd.get_tsc_khz().ok();
        let cpuid = fd
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(e("read CPUID"))?
            .as_slice()
            .to_vec();
        let msrs = read_msrs(fd, index, msr_list)?;
        let events = fd.get_vcpu_events().map_err(e("read the vCPU events"))?;
        Ok(VcpuState {
            index,
            cpuid,
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            msrs,
            events,
            tsc_khz,
        })
    }

    /// Puts the state into a vCPU that has not run (or is stopped).
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), KvmStateError> {
        let index = self.index;
        let e = |what| vcpu_err(index, what);
        let cpuid =
            CpuId::from_entries(&self.cpuid).map_err(|_| KvmStateError::TooMany(index, "CPUID"))?;
        fd.set_cpuid2(&cpuid).map_err(e("set CPUID"))?;
        if let Some(khz) = self.tsc_khz {
            // Only when it differs: on another host the guest keeps its TSC rate (scaled).
            if fd.get_tsc_khz().ok() != Some(khz) {
                fd.set_tsc_khz(khz).map_err(e("set the TSC frequency"))?;
            }
        }
        // QEMU's order (kvm_arch_put_registers), the one nested KVM sees most: registers,
        // FPU, control registers, MSRs, pending events, MP state, then the LAPIC.
        fd.set_regs(&self.regs).map_err(e("set the registers"))?;
        // SAFETY: the area was read from KVM by `save` (or decoded from a file into the same
        // fixed-size structure); KVM checks what it is given and the legacy 4 KiB area has
        // no trailing part to read past.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(e("set the XSAVE area"))?;
        fd.set_xcrs(&self.xcrs).map_err(e("set the XCRs"))?;
        fd.set_sregs(&self.sregs)
            .map_err(e("set the special registers"))?;
        // The TSC deadline goes in after the LAPIC: KVM_SET_LAPIC rearms the LAPIC timer and
        // forgets a deadline set before it (QEMU writes it last for the same reason).
        let (deadline, others): (Vec<kvm_msr_entry>, Vec<kvm_msr_entry>) = self
            .msrs
            .iter()
            .partition(|m| m.index == MSR_IA32_TSC_DEADLINE);
        set_msrs(fd, index, &others)?;
        fd.set_vcpu_events(&self.events)
            .map_err(e("set the vCPU events"))?;
        fd.set_mp_state(self.mp_state)
            .map_err(e("set the MP state"))?;
        fd.set_lapic(&self.lapic).map_err(e("set the LAPIC"))?;
        fd.set_debug_regs(&self.debug_regs)
            .map_err(e("set the debug registers"))?;
        set_msrs(fd, index, &deadline)?;
        Ok(())
    }
}

/// KVM's TSC-deadline timer MSR.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// Writes `entries`, failing on the first one KVM does not take.
fn set_msrs(fd: &VcpuFd, index: u8, entries: &[kvm_msr_entry]) -> Result<(), KvmStateError> {
    for chunk in entries.chunks(KVM_MAX_MSR_ENTRIES) {
        let msrs = Msrs::from_entries(chunk).map_err(|_| KvmStateError::TooMany(index, "MSR"))?;
        let n = fd.set_msrs(&msrs).map_err(vcpu_err(index, "set MSRs"))?;
        if n < chunk.len() {
            return Err(KvmStateError::Msr {
                index,
                msr: chunk[n].index,
                done: n,
                total: chunk.len(),
            });
        }
    }
    Ok(())
}

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, KvmStateError> {
    let mut c = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut c)
        .map_err(|e| KvmStateError::Vm("read an interrupt controller", e))?;
    Ok(c)
}

impl KvmVmState {
    /// Saves the irqchip and PIT of `vm`; `clock` is kvmclock as the pause read it.
    pub fn save(vm: &VmFd, clock: kvm_clock_data) -> Result<Self, KvmStateError> {
        Ok(KvmVmState {
            pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
            pit: vm
                .get_pit2()
                .map_err(|e| KvmStateError::Vm("read the PIT", e))?,
            clock,
        })
    }

    /// Puts the irqchip and PIT into `vm` (created with both). The clock is set when the
    /// vCPUs resume, as after any pause.
    pub fn restore(&self, vm: &VmFd) -> Result<(), KvmStateError> {
        vm.set_pit2(&self.pit)
            .map_err(|e| KvmStateError::Vm("set the PIT", e))?;
        for chip in [&self.pic_master, &self.pic_slave, &self.ioapic] {
            vm.set_irqchip(chip)
                .map_err(|e| KvmStateError::Vm("set an interrupt controller", e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! Against the host's real KVM (on our development and CI machines, kvm_pvm: vCPUs and
    //! their state work, guests other than PVM ones do not run).
    use super::*;
    use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
    use kvm_ioctls::Kvm;

    const MSR_IA32_TSC: u32 = 0x10;

    fn vm(kvm: &Kvm) -> VmFd {
        let vm = kvm
            .create_vm()
            .expect("KVM_CREATE_VM (is /dev/kvm usable?)");
        vm.create_irq_chip().expect("irqchip");
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .expect("PIT");
        vm
    }

    fn vcpu(kvm: &Kvm, vm: &VmFd) -> VcpuFd {
        let fd = vm.create_vcpu(0).expect("vCPU");
        let mut c = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .expect("cpuid");
        crate::boot::cpuid::configure(&mut c, 0, 1, false);
        fd.set_cpuid2(&c).expect("set cpuid");
        crate::boot::regs::setup_msrs(&fd).expect("msrs");
        crate::boot::regs::setup_fpu(&fd).expect("fpu");
        crate::boot::regs::setup_lapic(&fd).expect("lapic");
        fd
    }

    /// The state as JSON, without the TSC (it runs on between two reads).
    fn comparable(s: &VcpuState) -> serde_json::Value {
        let mut v = serde_json::to_value(s).expect("json");
        let msrs: Vec<&kvm_msr_entry> = s.msrs.iter().filter(|m| m.index != MSR_IA32_TSC).collect();
        v["msrs"] = serde_json::to_value(msrs).expect("json");
        v
    }

    #[test]
    fn vcpu_state_survives_save_serialise_restore_into_a_new_vm() {
        let kvm = Kvm::new().expect("/dev/kvm");
        let list = kvm
            .get_msr_index_list()
            .expect("msr list")
            .as_slice()
            .to_vec();
        let vm1 = vm(&kvm);
        let a = vcpu(&kvm, &vm1);
        let mut regs = a.get_regs().expect("regs");
        regs.rax = 0x1122_3344_5566_7788;
        regs.rip = 0x10_0000;
        regs.rflags = 0x2;
        a.set_regs(&regs).expect("regs");
        let mut dr = a.get_debug_regs().expect("debugregs");
        dr.db[0] = 0xdead_b000;
        a.set_debug_regs(&dr).expect("debugregs");
        let saved = VcpuState::save(&a, 0, &list).expect("save");
        assert!(
            saved.msrs.iter().any(|m| m.index == MSR_IA32_TSC),
            "the TSC is among the saved MSRs"
        );
        let json = serde_json::to_vec(&saved).expect("serialise");
        let back: VcpuState = serde_json::from_slice(&json).expect("deserialise");

        let vm2 = vm(&kvm);
        let b = vm2.create_vcpu(0).expect("vCPU");
        back.restore(&b).expect("restore");
        let again = VcpuState::save(&b, 0, &list).expect("save again");
        assert_eq!(again.regs.rax, 0x1122_3344_5566_7788);
        assert_eq!(again.debug_regs.db[0], 0xdead_b000);
        assert_eq!(comparable(&again), comparable(&saved));
    }

    #[test]
    fn vm_state_survives_save_serialise_restore_into_a_new_vm() {
        let kvm = Kvm::new().expect("/dev/kvm");
        let vm1 = vm(&kvm);
        let mut ioapic = kvm_irqchip {
            chip_id: KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        };
        vm1.get_irqchip(&mut ioapic).expect("ioapic");
        // SAFETY: the IOAPIC variant of the union is the one KVM filled for this chip id.
        unsafe { ioapic.chip.ioapic.redirtbl[3].bits = 0x1_0000_0035 };
        vm1.set_irqchip(&ioapic).expect("ioapic");
        let clock = vm1.get_clock().expect("clock");
        let saved = KvmVmState::save(&vm1, clock).expect("save");
        let json = serde_json::to_vec(&saved).expect("serialise");
        let back: KvmVmState = serde_json::from_slice(&json).expect("deserialise");
        let vm2 = vm(&kvm);
        back.restore(&vm2).expect("restore");
        let again = KvmVmState::save(&vm2, clock).expect("save again");
        // SAFETY: as above.
        let bits = unsafe { again.ioapic.chip.ioapic.redirtbl[3].bits };
        assert_eq!(bits, 0x1_0000_0035);
        for (a, b) in [
            (&again.pic_master, &saved.pic_master),
            (&again.pic_slave, &saved.pic_slave),
            (&again.ioapic, &saved.ioapic),
        ] {
            assert_eq!(
                serde_json::to_value(a).expect("json"),
                serde_json::to_value(b).expect("json")
            );
        }
    }
}
