//! Kernel, initrd and command-line loading, and the boot information the kernel reads:
//! the Linux zero page (64-bit boot protocol) or the PVH `hvm_start_info`.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use crate::layout::*;
use crate::memory::ram_ranges;

/// Errors loading the kernel or writing boot information.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// The kernel or initrd could not be opened or read.
    #[error("cannot read {0}")]
    Open(String, #[source] std::io::Error),
    /// Neither an ELF vmlinux nor a bzImage.
    #[error("{0} is not a Linux kernel: it is neither an ELF vmlinux nor a bzImage")]
    NotAKernel(String),
    /// The ELF loader rejected the kernel.
    #[error("cannot load the ELF kernel {0}")]
    Elf(String, #[source] linux_loader::loader::Error),
    /// The bzImage loader rejected the kernel.
    #[error("cannot load the bzImage kernel {0}")]
    BzImage(String, #[source] linux_loader::loader::Error),
    /// The initrd does not fit in guest memory below the kernel's limit.
    #[error("initrd {path} ({size} bytes) does not fit in guest memory")]
    InitrdTooBig {
        /// Initrd path.
        path: String,
        /// Initrd size.
        size: u64,
    },
    /// The command line is too long.
    #[error("kernel command line is {0} bytes; the limit is {max}", max = CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong(usize),
    /// Writing into guest memory failed.
    #[error("cannot write boot information into guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
}

/// How the kernel is entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootEntry {
    /// 64-bit Linux boot protocol: long mode, RSI = zero page.
    Linux64(GuestAddress),
    /// PVH: 32-bit protected mode, EBX = `hvm_start_info`.
    Pvh(GuestAddress),
}

/// What the loader put in guest memory.
#[derive(Debug)]
pub struct LoadedKernel {
    /// Entry point and protocol.
    pub entry: BootEntry,
    /// The bzImage setup header, when the kernel was a bzImage.
    setup_header: Option<setup_header>,
    /// Initrd location and size.
    initrd: Option<(GuestAddress, u64)>,
}

const ELF_MAGIC: [u8; 4] = *b"\x7fELF";
const BZIMAGE_MAGIC: [u8; 4] = *b"HdrS";
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;

fn kernel_kind(file: &mut File, path: &str) -> Result<bool, LoaderError> {
    let mut head = [0u8; 0x206];
    let n = file
        .read(&mut head)
        .map_err(|e| LoaderError::Open(path.into(), e))?;
    if n >= 4 && head[..4] == ELF_MAGIC {
        return Ok(true);
    }
    if n >= 0x206 && head[0x202..0x206] == BZIMAGE_MAGIC {
        return Ok(false);
    }
    Err(LoaderError::NotAKernel(path.into()))
}

/// Loads an ELF vmlinux (PVH entry when it has the note) or a bzImage, and the initrd.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    kernel: &Path,
    initrd: Option<&Path>,
) -> Result<LoadedKernel, LoaderError> {
    let kpath = kernel.display().to_string();
    let mut file = File::open(kernel).map_err(|e| LoaderError::Open(kpath.clone(), e))?;
    let is_elf = kernel_kind(&mut file, &kpath)?;
    file.seek(SeekFrom::Start(0))
        .map_err(|e| LoaderError::Open(kpath.clone(), e))?;
    let (entry, setup_header, kernel_end) = if is_elf {
        let res = Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
            .map_err(|e| LoaderError::Elf(kpath.clone(), e))?;
        let entry = match res.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => BootEntry::Pvh(addr),
            _ => BootEntry::Linux64(res.kernel_load),
        };
        (entry, None, res.kernel_end)
    } else {
        let res = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
            .map_err(|e| LoaderError::BzImage(kpath.clone(), e))?;
        // The 64-bit entry of a bzImage is 0x200 bytes into the protected-mode code.
        let entry = BootEntry::Linux64(res.kernel_load.unchecked_add(0x200));
        (entry, res.setup_header, res.kernel_end)
    };
    let initrd = match initrd {
        Some(path) => Some(load_initrd(mem, path, kernel_end, setup_header.as_ref())?),
        None => None,
    };
    Ok(LoadedKernel {
        entry,
        setup_header,
        initrd,
    })
}

fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    hdr: Option<&setup_header>,
) -> Result<(GuestAddress, u64), LoaderError> {
    let ipath = path.display().to_string();
    let mut file = File::open(path).map_err(|e| LoaderError::Open(ipath.clone(), e))?;
    let size = file
        .metadata()
        .map_err(|e| LoaderError::Open(ipath.clone(), e))?
        .len();
    let low_end = mem
        .find_region(GuestAddress(0))
        .map(|r| r.len())
        .unwrap_or(0);
    let mut limit = low_end;
    if let Some(h) = hdr {
        if h.initrd_addr_max != 0 {
            limit = limit.min(u64::from(h.initrd_addr_max) + 1);
        }
    }
    let too_big = || LoaderError::InitrdTooBig {
        path: ipath.clone(),
        size,
    };
    let addr = limit.checked_sub(size).ok_or_else(too_big)? & !0xfff;
    if addr < kernel_end {
        return Err(too_big());
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(LoaderError::GuestMemory)?;
    Ok((GuestAddress(addr), size))
}

/// Writes the NUL-terminated command line at [`CMDLINE_START`].
pub fn load_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<(), LoaderError> {
    if cmdline.len() + 1 > CMDLINE_MAX_SIZE {
        return Err(LoaderError::CmdlineTooLong(cmdline.len()));
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(LoaderError::GuestMemory)
}

/// The e820 map for `mem_size` bytes of RAM: (address, size, type).
pub fn e820_map(mem_size: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, 0x10_0000 - EBDA_START, E820_RESERVED),
    ];
    for (base, len) in ram_ranges(mem_size) {
        if base.0 == 0 {
            map.push((HIMEM_START, len - HIMEM_START, E820_RAM));
        } else {
            map.push((base.0, len, E820_RAM));
        }
    }
    map
}

/// Writes the boot information for `kernel`'s protocol, with the ACPI RSDP's address if
/// the guest has ACPI tables.
pub fn write_boot_info(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline_len: usize,
    mem_size: u64,
    rsdp: Option<u64>,
) -> Result<(), LoaderError> {
    match kernel.entry {
        BootEntry::Pvh(_) => write_pvh_start_info(mem, kernel, mem_size, rsdp),
        BootEntry::Linux64(_) => write_zero_page(mem, kernel, cmdline_len, mem_size, rsdp),
    }
}

fn write_zero_page(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline_len: usize,
    mem_size: u64,
    rsdp: Option<u64>,
) -> Result<(), LoaderError> {
    let mut params = boot_params {
        acpi_rsdp_addr: rsdp.unwrap_or(0),
        ..Default::default()
    };
    if let Some(hdr) = kernel.setup_header {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32 + 1;
    if let Some((addr, size)) = kernel.initrd {
        params.hdr.ramdisk_image = addr.0 as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = e820_map(mem_size);
    for (i, (addr, size, type_)) in map.iter().enumerate() {
        params.e820_table[i].addr = *addr;
        params.e820_table[i].size = *size;
        params.e820_table[i].r#type = *type_;
    }
    params.e820_entries = map.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(LoaderError::GuestMemory)
}

fn write_pvh_start_info(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    mem_size: u64,
    rsdp: Option<u64>,
) -> Result<(), LoaderError> {
    let map = e820_map(mem_size);
    let mut info = hvm_start_info {
        rsdp_paddr: rsdp.unwrap_or(0),
        magic: XEN_HVM_START_MAGIC,
        // Version 1 carries the memory map; Linux BUG()s on version 0 without one.
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some((addr, size)) = kernel.initrd {
        let module = hvm_modlist_entry {
            paddr: addr.0,
            size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(PVH_MODLIST_START))
            .map_err(LoaderError::GuestMemory)?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
    }
    for (i, (addr, size, type_)) in map.iter().enumerate() {
        let entry = hvm_memmap_table_entry {
            addr: *addr,
            size: *size,
            type_: *type_,
            reserved: 0,
        };
        let at = PVH_MEMMAP_START + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(entry, GuestAddress(at))
            .map_err(LoaderError::GuestMemory)?;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_START))
        .map_err(LoaderError::GuestMemory)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_covers_ram_and_skips_the_hole() {
        let map = e820_map(4 << 30);
        let ram: u64 = map.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        // Everything but the EBDA..1 MiB gap is RAM.
        assert_eq!(ram, (4 << 30) - (0x10_0000 - EBDA_START));
        assert!(map
            .iter()
            .all(|e| e.0 + e.1 <= MMIO_HOLE_START || e.0 >= RAM_ABOVE_4G_START));
    }

    #[test]
    fn rejects_a_file_that_is_not_a_kernel() {
        let dir = std::env::temp_dir().join(format!("skiff-loader-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("not-a-kernel");
        std::fs::write(&path, vec![0x42u8; 4096]).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let err = load_kernel(&mem, &path, None).unwrap_err();
        assert!(matches!(err, LoaderError::NotAKernel(_)), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
