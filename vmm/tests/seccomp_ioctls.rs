//! The KVM ioctl numbers the seccomp filters name (sandbox, which must not depend on
//! kvm-bindings) are KVM's own.

use kvm_bindings::{kvm_clock_data, kvm_msrs, kvm_regs, kvm_sregs, kvm_vcpu_events, KVMIO};
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
}
