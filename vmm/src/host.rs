//! Facts about the host that decide what skiff can do: the KVM flavour and the memory.

use std::path::Path;

/// Whether /dev/kvm is kvm_pvm on a CPU without VT-x/AMD-V: such a KVM runs only
/// PVM-enabled guest kernels; an ordinary Linux guest stops with emulation failures.
pub fn is_pvm_host() -> bool {
    if !Path::new("/sys/module/kvm_pvm").exists() {
        return false;
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    !cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// The explanation printed when a guest fails on a PVM host.
pub const PVM_EXPLANATION: &str = "this host's /dev/kvm is kvm_pvm (a shadow-paging KVM without \
VT-x/AMD-V), which runs only PVM-enabled guest kernels; an ordinary Linux kernel stops with \
emulation failures. Boot on a host with VT-x or AMD-V, or inside the nested test host \
(resources/nested/run-nested.sh)";

/// Host RAM plus swap in bytes (the most a guest could ever be given).
pub fn host_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    };
    Some(field("MemTotal:")? + field("SwapTotal:").unwrap_or(0))
}
