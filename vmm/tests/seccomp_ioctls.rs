//! The KVM ioctl numbers the seccomp filters name (sandbox, which must not depend on
//! kvm-bindings) are KVM's own.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid2, kvm_debugregs, kvm_irq_routing, kvm_irqchip, kvm_irqfd,
    kvm_lapic_state, kvm_mp_state, kvm_msrs, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events,
    kvm_xcrs, kvm_xsave, KVMIO,
};
use sandbox::filters::kvm;
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

ioctl_io_nr!(KVM_GET_API_VERSION, KVMIO, 0x00);
ioctl_io_nr!(KVM_CREATE_VM, KVMIO, 0x01);
ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
ioctl_iow_nr!(KVM_SET_MSRS, KVMIO, 0x89, kvm_msrs);
ioctl_iow_nr!(KVM_SET_CLOCK, KVMIO, 0x7b, kvm_clock_data);
ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
ioctl_iowr_nr!(KVM_GET_CPUID2, KVMIO, 0x91, kvm_cpuid2);
ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_irqchip);
ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_pit_state2);
ioctl_iow_nr!(KVM_IRQFD, KVMIO, 0x76, kvm_irqfd);
ioctl_iow_nr!(KVM_SET_GSI_ROUTING, KVMIO, 0x6a, kvm_irq_routing);

#[test]
fn kvm_ioctl_numbers_match_kvm_bindings() {
    assert_eq!(kvm::GET_API_VERSION, KVM_GET_API_VERSION());
    assert_eq!(kvm::CREATE_VM, KVM_CREATE_VM());
    assert_eq!(kvm::RUN, KVM_RUN());
    assert_eq!(kvm::GET_REGS, KVM_GET_REGS());
    assert_eq!(kvm::GET_SREGS, KVM_GET_SREGS());
    assert_eq!(kvm::GET_VCPU_EVENTS, KVM_GET_VCPU_EVENTS());
    assert_eq!(kvm::GET_MSRS, KVM_GET_MSRS());
    assert_eq!(kvm::SET_MSRS, KVM_SET_MSRS());
    assert_eq!(kvm::SET_CLOCK, KVM_SET_CLOCK());
    assert_eq!(kvm::GET_CLOCK, KVM_GET_CLOCK());
    assert_eq!(kvm::GET_MP_STATE, KVM_GET_MP_STATE());
    assert_eq!(kvm::GET_XSAVE, KVM_GET_XSAVE());
    assert_eq!(kvm::GET_XCRS, KVM_GET_XCRS());
    assert_eq!(kvm::GET_DEBUGREGS, KVM_GET_DEBUGREGS());
    assert_eq!(kvm::GET_LAPIC, KVM_GET_LAPIC());
    assert_eq!(kvm::GET_TSC_KHZ, KVM_GET_TSC_KHZ());
    assert_eq!(kvm::GET_CPUID2, KVM_GET_CPUID2());
    assert_eq!(kvm::GET_IRQCHIP, KVM_GET_IRQCHIP());
    assert_eq!(kvm::GET_PIT2, KVM_GET_PIT2());
    assert_eq!(kvm::IRQFD, KVM_IRQFD());
    assert_eq!(kvm::SET_GSI_ROUTING, KVM_SET_GSI_ROUTING());
}
