//! Everything written into the guest or its vCPUs before the first KVM_RUN.

pub mod acpi;
pub mod cpuid;
pub mod loader;
pub mod mptable;
pub mod regs;
