//! Builds the hostile guest of the attack test (guest-attack/attack.c): freestanding x86_64
//! code linked at 16 MiB that skiff boots as an ELF kernel. Needs only the C compiler that
//! links Rust programs on this host; `SKIFF_GUEST_ATTACK_ELF` names the result.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let src = PathBuf::from("guest-attack/attack.c");
    println!("cargo:rerun-if-changed={}", src.display());
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let elf = out.join("guest-attack.elf");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    let status = Command::new(&cc)
        .args([
            "-O2",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-ffreestanding",
            "-fno-stack-protector",
            "-fno-pic",
            "-no-pie",
            "-mno-red-zone",
            "-mgeneral-regs-only",
            "-nostdlib",
            "-static",
            "-Wl,-Ttext-segment=0x1000000",
            "-Wl,-e,_start",
            "-Wl,--build-id=none",
            "-o",
        ])
        .arg(&elf)
        .arg(&src)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run the C compiler {cc:?} for {}: {e}",
                src.display()
            )
        });
    assert!(
        status.success(),
        "{cc} failed ({status}) building the attack test's guest {}",
        src.display()
    );
    println!("cargo:rustc-env=SKIFF_GUEST_ATTACK_ELF={}", elf.display());
}
