//! Per-vCPU CPUID, derived from what KVM supports on this host: APIC ids, topology
//! (one socket, `n` cores, one thread each) and the hypervisor bit.

use kvm_bindings::CpuId;

/// Leaf 1 ECX: running under a hypervisor.
const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 ECX: TSC deadline timer.
const ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 EDX: hyper-threading (the logical-processor count field is valid).
const EDX_HTT: u32 = 1 << 28;

fn bits_for(n: u32) -> u32 {
    32 - (n.max(1) - 1).leading_zeros()
}

/// Adjusts `cpuid` (KVM's supported set) for vCPU `index` of `count`.
pub fn configure(cpuid: &mut CpuId, index: u8, count: u8, tsc_deadline: bool) {
    let count = u32::from(count);
    let apic_id = u32::from(index);
    let core_bits = bits_for(count);
    for e in cpuid.as_mut_slice() {
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | (count << 16) | (8 << 8);
                e.ecx |= ECX_HYPERVISOR;
                if tsc_deadline {
                    e.ecx |= ECX_TSC_DEADLINE;
                }
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            0x4 => {
                // Deterministic cache parameters: cores per package and sharing.
                let cache_level = (e.eax >> 5) & 0x7;
                let sharing = if cache_level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((sharing & 0xfff) << 14) | ((count - 1).min(63) << 26);
            }
            0x6 => {
                // No power management (APERF/MPERF, turbo) inside the guest.
                e.eax = 0;
                e.ecx &= !1;
            }
            0xa => {
                // No architectural PMU.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xb | 0x1f => {
                e.edx = apic_id;
                match e.index {
                    0 => {
                        // SMT level: one thread per core.
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = count;
                        e.ecx = (2 << 8) | 1;
                    }
                    i => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = i;
                    }
                }
            }
            0x8000_0008 => {
                // AMD: number of cores minus one, and the APIC-id width.
                e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | (count - 1);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn apic_id_and_topology() {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 0,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
        ];
        let mut cpuid = CpuId::from_entries(&entries).unwrap();
        configure(&mut cpuid, 3, 4, true);
        let e = cpuid.as_slice();
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert!(e[0].ecx & ECX_HYPERVISOR != 0);
        assert_eq!(e[1].edx, 3);
        assert_eq!(e[2].ebx, 4);
        assert_eq!(e[2].eax, 2);
    }
}
