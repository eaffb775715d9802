//! What a dynamically linked binary needs in the cell: its ELF interpreter and the shared
//! libraries it names (DT_NEEDED), transitively, found where the host's loader finds them.
//! A static binary (the production build: `--target x86_64-unknown-linux-gnu` with
//! `-C target-feature=+crt-static`) needs nothing.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Where the host's dynamic loader looks when no cache is present (Debian's multiarch
/// directories first).
const LIB_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
];
/// Bound against a hostile or broken file: the most libraries followed.
const MAX_LIBS: usize = 64;

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;

/// Errors of reading an ELF file's needs.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    #[error("cannot read {}", .0.display())]
    Read(PathBuf, #[source] std::io::Error),
    #[error("{}: {why}", .path.display())]
    Malformed { path: PathBuf, why: &'static str },
    #[error("{}: needs {lib}, found in none of {}", .path.display(), LIB_DIRS.join(", "))]
    Missing { path: PathBuf, lib: String },
    #[error("{}: needs more than {MAX_LIBS} libraries", .0.display())]
    TooMany(PathBuf),
}

/// Reads at offsets of an ELF file (or of a byte slice, for tests): only the headers, the
/// dynamic section and the names are read, never the whole file.
trait At {
    fn bytes(&self, at: u64, len: usize) -> Option<Vec<u8>>;
}

impl At for [u8] {
    fn bytes(&self, at: u64, len: usize) -> Option<Vec<u8>> {
        let at = usize::try_from(at).ok()?;
        self.get(at..at.checked_add(len)?).map(<[u8]>::to_vec)
    }
}

impl At for std::fs::File {
    fn bytes(&self, at: u64, len: usize) -> Option<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let mut v = vec![0u8; len];
        self.read_exact_at(&mut v, at).ok()?;
        Some(v)
    }
}

fn u16_at(b: &(impl At + ?Sized), at: u64) -> Option<u16> {
    Some(u16::from_le_bytes(b.bytes(at, 2)?.try_into().ok()?))
}
fn u32_at(b: &(impl At + ?Sized), at: u64) -> Option<u32> {
    Some(u32::from_le_bytes(b.bytes(at, 4)?.try_into().ok()?))
}
fn u64_at(b: &(impl At + ?Sized), at: u64) -> Option<u64> {
    Some(u64::from_le_bytes(b.bytes(at, 8)?.try_into().ok()?))
}
/// A NUL-terminated name of at most 255 bytes at `at`.
fn cstr_at(b: &(impl At + ?Sized), at: u64) -> Option<String> {
    let mut v = Vec::new();
    for chunk in 0..4u64 {
        let piece = b
            .bytes(at.checked_add(chunk * 64)?, 64)
            .or_else(|| b.bytes(at.checked_add(chunk * 64)?, 1))?;
        if let Some(end) = piece.iter().position(|&c| c == 0) {
            v.extend_from_slice(&piece[..end]);
            return String::from_utf8(v).ok();
        }
        if piece.len() < 64 {
            // Near the end of the file: byte by byte.
            let mut at = at.checked_add(chunk * 64)?;
            loop {
                let c = *b.bytes(at, 1)?.first()?;
                if c == 0 {
                    return String::from_utf8(v).ok();
                }
                v.push(c);
                if v.len() > 255 {
                    return None;
                }
                at += 1;
            }
        }
        v.extend_from_slice(&piece);
    }
    None
}

/// The interpreter and the DT_NEEDED names of one ELF64 little-endian file.
fn needs_of(b: &(impl At + ?Sized)) -> Result<(Option<String>, Vec<String>), &'static str> {
    let ident = b.bytes(0, 6).ok_or("not a 64-bit little-endian ELF file")?;
    if ident[..4] != *b"\x7fELF" || ident[4] != 2 || ident[5] != 1 {
        return Err("not a 64-bit little-endian ELF file");
    }
    let bad = "truncated or inconsistent ELF headers";
    let phoff = u64_at(b, 0x20).ok_or(bad)?;
    let phentsize = u64::from(u16_at(b, 0x36).ok_or(bad)?);
    let phnum = u64::from(u16_at(b, 0x38).ok_or(bad)?);
    if phentsize < 56 {
        return Err(bad);
    }
    let mut interp = None;
    let mut dynamic = None;
    let mut loads = Vec::new();
    for i in 0..phnum {
        let p = phoff.checked_add(i * phentsize).ok_or(bad)?;
        let field = |off: u64| p.checked_add(off).and_then(|at| u64_at(b, at)).ok_or(bad);
        let kind = u32_at(b, p).ok_or(bad)?;
        let (offset, vaddr, filesz) = (field(8)?, field(16)?, field(32)?);
        match kind {
            PT_INTERP => interp = Some(cstr_at(b, offset).ok_or(bad)?),
            PT_DYNAMIC => dynamic = Some((offset, filesz)),
            PT_LOAD => loads.push((vaddr, offset, filesz)),
            _ => {}
        }
    }
    let Some((dyn_off, dyn_len)) = dynamic else {
        return Ok((interp, Vec::new()));
    };
    let mut strtab = None;
    let mut needed = Vec::new();
    let mut at = dyn_off;
    // At most 4096 entries: a dynamic section is a few dozen.
    while at.saturating_add(16) <= dyn_off.saturating_add(dyn_len.min(4096 * 16)) {
        let tag = u64_at(b, at).ok_or(bad)?;
        let val = u64_at(b, at.saturating_add(8)).ok_or(bad)?;
        match tag {
            DT_NULL => break,
            DT_NEEDED => needed.push(val),
            DT_STRTAB => strtab = Some(val),
            _ => {}
        }
        at += 16;
    }
    if needed.is_empty() {
        return Ok((interp, Vec::new()));
    }
    let strtab = strtab.ok_or(bad)?;
    // DT_STRTAB is an address: the file offset is found through the PT_LOAD holding it.
    let (vaddr, offset, _) = loads
        .iter()
        .find(|(v, _, sz)| strtab >= *v && strtab < v.saturating_add(*sz))
        .ok_or(bad)?;
    let base = (strtab - vaddr).checked_add(*offset).ok_or(bad)?;
    let names = needed
        .iter()
        .map(|n| cstr_at(b, base.checked_add(*n)?))
        .collect::<Option<Vec<_>>>()
        .ok_or(bad)?;
    Ok((interp, names))
}

fn open(path: &Path) -> Result<std::fs::File, ElfError> {
    std::fs::File::open(path).map_err(|e| ElfError::Read(path.to_path_buf(), e))
}

/// Every file (absolute host paths, the same paths inside the cell) that `binaries` need to
/// run: their interpreter and libraries, transitively. Empty for static binaries.
pub fn runtime_files(binaries: &[PathBuf]) -> Result<BTreeSet<PathBuf>, ElfError> {
    let mut out = BTreeSet::new();
    let mut todo: Vec<PathBuf> = binaries.to_vec();
    let mut seen = BTreeSet::new();
    while let Some(path) = todo.pop() {
        if !seen.insert(path.clone()) {
            continue;
        }
        if seen.len() > MAX_LIBS {
            return Err(ElfError::TooMany(path));
        }
        let file = open(&path)?;
        let (interp, needed) = needs_of(&file).map_err(|why| ElfError::Malformed {
            path: path.clone(),
            why,
        })?;
        if let Some(i) = interp {
            let i = PathBuf::from(i);
            out.insert(i.clone());
            todo.push(i);
        }
        for lib in needed {
            if lib.contains('/') {
                return Err(ElfError::Malformed {
                    path,
                    why: "names a library by path",
                });
            }
            let found = LIB_DIRS
                .iter()
                .map(|d| Path::new(d).join(&lib))
                .find(|p| p.is_file())
                .ok_or_else(|| ElfError::Missing {
                    path: path.clone(),
                    lib: lib.clone(),
                })?;
            out.insert(found.clone());
            todo.push(found);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamic_test_binary_needs_libc_and_its_loader() {
        let exe = std::env::current_exe().expect("exe");
        let files = runtime_files(&[exe]).expect("needs");
        assert!(
            files
                .iter()
                .any(|f| f.to_string_lossy().contains("libc.so")),
            "{files:?}"
        );
        assert!(
            files
                .iter()
                .any(|f| f.to_string_lossy().contains("ld-linux")),
            "{files:?}"
        );
    }

    #[test]
    fn garbage_is_refused_not_followed() {
        assert!(needs_of(&b"not an elf"[..]).is_err());
        let mut b = [0u8; 64];
        b[..6].copy_from_slice(b"\x7fELF\x02\x01");
        b[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        b[0x38..0x3a].copy_from_slice(&3u16.to_le_bytes());
        assert!(needs_of(&b[..]).is_err());
    }
}
