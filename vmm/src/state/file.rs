//! The state file: `magic | version | flags | length | state | CRC-64`, all integers
//! little-endian, the state as JSON, the checksum (CRC-64/XZ) over everything before it.
//!
//! Versions: a skiff reads every version from [`MIN_VERSION`] to [`VERSION`]. A change to
//! [`VmState`] that an older file cannot be read into (a field without a default, a
//! renamed or re-shaped one) raises [`VERSION`] and adds a step to [`migrate`], which
//! rewrites an older state, as JSON, into the next version's shape; fields added with
//! `#[serde(default)]` need no new version. A file from a newer skiff is refused.
//!
//! Version 2: the devices may be on PCI (`--enable-pci`). An older skiff would drop the PCI
//! fields it does not know and rebuild the VM on virtio-mmio, leaving the guest without its
//! devices, so such a state is written as version 2, which it refuses; a VM on virtio-mmio
//! is still written as version 1, which every skiff reads (a rollback keeps working).

use super::VmState;

/// "SKIFFVMS".
const MAGIC: [u8; 8] = *b"SKIFFVMS";
/// The newest version this skiff reads and writes.
pub const VERSION: u32 = 2;
/// The oldest version this skiff reads.
pub const MIN_VERSION: u32 = 1;
/// The largest state accepted (a 32-vCPU VM's state is about 1 MiB).
pub const MAX_STATE: u64 = 64 << 20;

const HEADER: usize = 8 + 4 + 4 + 8;
const CRC: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);

/// Errors reading or writing a state file.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    /// Reading or writing the file.
    #[error("{0}")]
    Io(String, #[source] std::io::Error),
    /// Not a skiff state file.
    #[error("not a skiff state file (no SKIFFVMS header)")]
    NotStateFile,
    /// Written by a newer skiff.
    #[error(
        "state version {0} is newer than this skiff reads (versions {MIN_VERSION} to {VERSION})"
    )]
    FromTheFuture(u32),
    /// Older than this skiff reads.
    #[error(
        "state version {0} is older than this skiff reads (versions {MIN_VERSION} to {VERSION})"
    )]
    TooOld(u32),
    /// Flags this skiff does not know.
    #[error("state flags {0:#x} are unknown to this skiff")]
    Flags(u32),
    /// The length field and the file disagree.
    #[error(
        "the state is cut short or has trailing bytes: {0} bytes of state announced, {1} present"
    )]
    Length(u64, u64),
    /// Larger than [`MAX_STATE`].
    #[error("the state is {0} bytes, more than the {MAX_STATE} accepted")]
    TooLarge(u64),
    /// The checksum does not match.
    #[error("the state is corrupt: checksum {found:#018x}, expected {expected:#018x}")]
    Checksum {
        /// In the file.
        found: u64,
        /// Computed.
        expected: u64,
    },
    /// The checksum matches but the state cannot be read.
    #[error("the state cannot be read: {0}")]
    Decode(String),
    /// The state cannot be written.
    #[error("the state cannot be encoded")]
    Encode(#[source] serde_json::Error),
}

/// The version a state is written as: 2 for a VM on PCI, else 1 (see the module's doc).
pub fn version_for(pci: bool) -> u32 {
    if pci {
        2
    } else {
        1
    }
}

/// The file's bytes for `state`.
pub fn encode(state: &VmState) -> Result<Vec<u8>, StateFileError> {
    let payload = serde_json::to_vec(state).map_err(StateFileError::Encode)?;
    Ok(frame(version_for(state.pci), &payload))
}

/// Frames `payload` as a state file of `version`.
fn frame(version: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + payload.len() + 8);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    let crc = CRC.checksum(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

/// Reads a state from a file's bytes: header, version, length and checksum first, then the
/// state, migrated from an older version if needed.
pub fn decode(bytes: &[u8]) -> Result<VmState, StateFileError> {
    if bytes.len() < 8 || bytes[..8] != MAGIC {
        return Err(StateFileError::NotStateFile);
    }
    if bytes.len() < HEADER + 8 {
        return Err(StateFileError::Length(0, bytes.len() as u64));
    }
    let version = le_u32(&bytes[8..]);
    let flags = le_u32(&bytes[12..]);
    let len = le_u64(&bytes[16..]);
    if len > MAX_STATE {
        return Err(StateFileError::TooLarge(len));
    }
    let present = (bytes.len() - HEADER - 8) as u64;
    if len != present {
        return Err(StateFileError::Length(len, present));
    }
    let body_end = HEADER + len as usize;
    let expected = CRC.checksum(&bytes[..body_end]);
    let found = le_u64(&bytes[body_end..]);
    if found != expected {
        return Err(StateFileError::Checksum { found, expected });
    }
    if version > VERSION {
        return Err(StateFileError::FromTheFuture(version));
    }
    if version < MIN_VERSION {
        return Err(StateFileError::TooOld(version));
    }
    if flags != 0 {
        return Err(StateFileError::Flags(flags));
    }
    let value: serde_json::Value = serde_json::from_slice(&bytes[HEADER..body_end])
        .map_err(|e| StateFileError::Decode(e.to_string()))?;
    let value = migrate(version, value)?;
    serde_path_to_error::deserialize(value)
        .map_err(|e| StateFileError::Decode(format!("{}: {}", e.path(), e.inner())))
}

/// Rewrites a state of `version` into the shape of [`VERSION`], one version at a time.
fn migrate(version: u32, value: serde_json::Value) -> Result<serde_json::Value, StateFileError> {
    match version {
        VERSION => Ok(value),
        // Version 2 only adds what a version-1 state reads as absent (no PCI).
        1 => migrate(2, value),
        other => Err(StateFileError::TooOld(other)),
    }
}

/// Writes `state` to a new file at `path` (mode 0600; an existing file is replaced).
pub fn write(path: &std::path::Path, state: &VmState) -> Result<(), StateFileError> {
    write_bytes(path, &encode(state)?)
}

/// Writes an encoded state to a new file at `path` (mode 0600; an existing file is
/// replaced; a symbolic link is not followed).
pub fn write_bytes(path: &std::path::Path, bytes: &[u8]) -> Result<(), StateFileError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |e| StateFileError::Io(format!("cannot write the state to {}", path.display()), e);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(path)
        .map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)
}

/// Reads the state file at `path`.
pub fn read(path: &std::path::Path) -> Result<VmState, StateFileError> {
    use std::io::Read;
    let io = |e| StateFileError::Io(format!("cannot read the state file {}", path.display()), e);
    let f = std::fs::File::open(path).map_err(io)?;
    let size = f.metadata().map_err(io)?.len();
    if size > MAX_STATE + (HEADER as u64) + 8 {
        return Err(StateFileError::TooLarge(size));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    f.take(MAX_STATE + HEADER as u64 + 8)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    decode(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state file of version 1: a snapshot of a running 2-vCPU, 256 MiB guest with a
    /// drive and a network interface, taken by the guest test
    /// `snapshot_load_twice_and_bad_loads` in the nested test host (SKIFF_STATE_FIXTURE).
    /// Every later skiff must read it.
    pub(crate) const FIXTURE_V1: &[u8] = include_bytes!("../../tests/fixtures/state-v1.bin");

    #[test]
    fn fixture_of_version_1_still_reads() {
        let s = decode(FIXTURE_V1).expect("version 1 fixture");
        assert_eq!(s.vcpus.len(), 2);
        assert_eq!(s.mem_bytes, 256 << 20);
        let ids: Vec<&str> = s.devices.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["rootfs", "eth0"]);
        assert!(s
            .devices
            .iter()
            .all(|d| d.transport.active && !d.rings.is_empty()));
        assert!(!s.vcpus[0].msrs.is_empty());
        assert_eq!(s.vcpus[1].index, 1);
        // Written before ACPI: its guest has no power button, whatever today's default is.
        assert!(!s.acpi);
        // And before virtio-pci: its devices are on virtio-mmio.
        assert!(!s.pci && s.devices.iter().all(|d| d.transport.pci.is_none()));
    }

    #[test]
    fn a_vm_on_pci_is_written_as_version_2_and_one_on_mmio_as_version_1() {
        let mut s = decode(FIXTURE_V1).expect("fixture");
        assert_eq!(le_u32(&encode(&s).expect("encode")[8..]), 1);
        s.pci = true;
        let v2 = encode(&s).expect("encode");
        assert_eq!(le_u32(&v2[8..]), 2);
        assert!(decode(&v2).expect("decode").pci);
    }

    #[test]
    fn damaged_files_are_refused_with_the_reason() {
        let good = FIXTURE_V1.to_vec();
        let msg = |b: &[u8]| match decode(b) {
            Ok(_) => panic!("accepted"),
            Err(e) => e.to_string(),
        };
        assert!(msg(b"hello world, not a state").contains("not a skiff state file"));
        let mut flipped = good.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 1;
        assert!(msg(&flipped).contains("checksum"), "{}", msg(&flipped));
        assert!(msg(&good[..good.len() - 1]).contains("cut short"));
        let mut longer = good.clone();
        longer.push(0);
        assert!(msg(&longer).contains("trailing"));
        // A version from the future, with a valid checksum.
        let payload = &good[HEADER..good.len() - 8];
        let future = frame(VERSION + 1, payload);
        assert!(msg(&future).contains("newer than this skiff reads"));
        let past = frame(0, payload);
        assert!(msg(&past).contains("older than this skiff reads"));
        // Valid framing around a state of the wrong shape names the field.
        let wrong = frame(VERSION, br#"{"config":{}}"#);
        assert!(msg(&wrong).contains("cannot be read"), "{}", msg(&wrong));
        let huge = {
            let mut h = good[..HEADER].to_vec();
            h[16..24].copy_from_slice(&(MAX_STATE + 1).to_le_bytes());
            h.extend_from_slice(&[0; 8]);
            h
        };
        assert!(msg(&huge).contains("more than"));
    }

    #[test]
    fn encode_then_decode_is_the_same_state() {
        let s = decode(FIXTURE_V1).expect("fixture");
        let again = encode(&s).expect("encode");
        let back = decode(&again).expect("decode");
        assert_eq!(
            serde_json::to_value(&back).expect("json"),
            serde_json::to_value(&s).expect("json")
        );
    }
}
