//! The frames every path carries, built from one template per size and checked byte for
//! byte at the far end: a sequence number at a fixed place, the rest a fixed pseudo-random
//! pattern, so a frame that arrives corrupted, twice, out of order or not at all shows.
//!
//! - 64-byte frames (60 bytes without the FCS, the Ethernet minimum) and 1514-byte frames
//!   (the largest without VLAN or FCS): Ethernet, EtherType 0x88B5 (local experimental),
//!   the sequence number, the pattern.
//! - TSO frames: one IPv4/TCP frame of 45 segments of 1448 bytes (65214 bytes: below the
//!   64 KiB that a device's `gso_max_size` allows a whole frame) with a virtio-net header
//!   asking for TCPv4 segmentation and a partial checksum, as a guest's TCP stack hands its
//!   largest frames to a virtio-net device.

/// Size of `struct virtio_net_hdr_v1` (VERSION_1: with `num_buffers`).
pub const VNET_HDR: usize = tapdev::VNET_HDR_LEN;
/// EtherType of the small frames.
const ETH_P_BENCH: u16 = 0x88b5;
/// EtherType of IPv4 (the TSO frames).
pub const ETH_P_IP: u16 = 0x0800;
const ETH_HDR: usize = 14;
const IP_HDR: usize = 20;
const TCP_HDR: usize = 20;
/// TCP's maximum segment size in the TSO header (1500 - 20 - 20 - 12 of timestamps).
const MSS: u16 = 1448;
/// virtio-net header flag: the checksum from `csum_start` is left to the device.
const F_NEEDS_CSUM: u8 = 1;
/// virtio-net header GSO type: TCPv4.
pub const GSO_TCPV4: u8 = 1;

/// What kind of frame a workload moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// 64-byte frames (60 on the wire here).
    Small,
    /// 1514-byte frames.
    Full,
    /// 64 KiB TCPv4 frames (65214 bytes) that the far end may segment.
    Tso,
}

impl Kind {
    /// Frame length without the virtio-net header.
    pub const fn len(self) -> usize {
        match self {
            Kind::Small => 60,
            Kind::Full => 1514,
            Kind::Tso => ETH_HDR + IP_HDR + TCP_HDR + 45 * MSS as usize,
        }
    }

    /// Where the sequence number sits in the frame.
    const fn seq_at(self) -> usize {
        match self {
            Kind::Small | Kind::Full => ETH_HDR,
            Kind::Tso => ETH_HDR + IP_HDR + TCP_HDR,
        }
    }

    /// The EtherType the far end's packet socket listens for.
    pub const fn ethertype(self) -> u16 {
        match self {
            Kind::Small | Kind::Full => ETH_P_BENCH,
            Kind::Tso => ETH_P_IP,
        }
    }

    /// The virtio-net header (v1, 12 bytes) the sender puts before the frame.
    pub fn vnet_hdr(self) -> [u8; VNET_HDR] {
        let mut h = [0u8; VNET_HDR];
        if self == Kind::Tso {
            h[0] = F_NEEDS_CSUM;
            h[1] = GSO_TCPV4;
            h[2..4].copy_from_slice(&((ETH_HDR + IP_HDR + TCP_HDR) as u16).to_le_bytes());
            h[4..6].copy_from_slice(&MSS.to_le_bytes());
            h[6..8].copy_from_slice(&((ETH_HDR + IP_HDR) as u16).to_le_bytes());
            // TCP's checksum field.
            h[8..10].copy_from_slice(&16u16.to_le_bytes());
        }
        h
    }
}

/// A workload's frame: the template, with the sequence number written per frame.
pub struct Template {
    /// The kind.
    pub kind: Kind,
    bytes: Vec<u8>,
}

/// What a received frame turned out to be.
#[derive(Debug, PartialEq, Eq)]
pub enum Check {
    /// Intact, with this sequence number.
    Seq(u64),
    /// Not a frame of this run (another EtherType or length): the kernel's own traffic.
    Stray,
    /// The right kind of frame with wrong bytes.
    Corrupt,
}

impl Template {
    /// The template for `kind`.
    pub fn new(kind: Kind) -> Template {
        let len = kind.len();
        let mut b = vec![0u8; len];
        b[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
        b[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
        b[12..14].copy_from_slice(&kind.ethertype().to_be_bytes());
        let mut x: u32 = 0x2545_f491;
        for byte in &mut b[kind.seq_at() + 8..] {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *byte = x as u8;
        }
        if kind == Kind::Tso {
            let ip = &mut b[ETH_HDR..ETH_HDR + IP_HDR];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&((len - ETH_HDR) as u16).to_be_bytes());
            ip[6] = 0x40; // don't fragment
            ip[8] = 64;
            ip[9] = 6; // TCP
            ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
            ip[16..20].copy_from_slice(&[10, 0, 0, 2]);
            let sum = checksum(ip);
            ip[10..12].copy_from_slice(&sum.to_be_bytes());
            let tcp = &mut b[ETH_HDR + IP_HDR..ETH_HDR + IP_HDR + TCP_HDR];
            tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
            tcp[2..4].copy_from_slice(&5001u16.to_be_bytes());
            tcp[12] = 5 << 4;
            tcp[13] = 0x18; // PSH, ACK
            tcp[14..16].copy_from_slice(&0xffffu16.to_be_bytes());
        }
        Template { kind, bytes: b }
    }

    /// The frame's length.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// The whole template (sequence number 0).
    #[cfg(test)]
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Where the sequence number sits, and its 8 bytes for `seq`.
    pub fn seq_field(&self, seq: u64) -> (usize, [u8; 8]) {
        (self.kind.seq_at(), seq.to_le_bytes())
    }

    /// Frame `seq`, written into `out` (at least [`Template::len`] bytes).
    pub fn write(&self, seq: u64, out: &mut [u8]) {
        let at = self.kind.seq_at();
        out[..self.bytes.len()].copy_from_slice(&self.bytes);
        out[at..at + 8].copy_from_slice(&seq.to_le_bytes());
    }

    /// Checks a received frame against the template.
    pub fn check(&self, frame: &[u8]) -> Check {
        let at = self.kind.seq_at();
        if frame.len() < ETH_HDR || frame[12..14] != self.bytes[12..14] {
            return Check::Stray;
        }
        if frame.len() != self.bytes.len() {
            return if self.kind == Kind::Tso {
                // An IPv4 packet of another length: not ours.
                Check::Stray
            } else {
                Check::Corrupt
            };
        }
        if frame[..at] != self.bytes[..at] || frame[at + 8..] != self.bytes[at + 8..] {
            return Check::Corrupt;
        }
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&frame[at..at + 8]);
        Check::Seq(u64::from_le_bytes(seq))
    }
}

/// The Internet checksum of `data` (RFC 1071).
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Counts the sequence numbers that arrive at one end: in order, with gaps counted as lost
/// and anything older than the last one counted as out of order.
#[derive(Debug, Default)]
pub struct Order {
    /// The next sequence number expected.
    pub next: u64,
    /// Frames that never came (gaps).
    pub lost: u64,
    /// Frames that came after a later one, or twice.
    pub out_of_order: u64,
}

impl Order {
    /// Notes the arrival of `seq`; whether it was in order.
    pub fn arrived(&mut self, seq: u64) -> bool {
        if seq < self.next {
            self.out_of_order += 1;
            return false;
        }
        self.lost += seq - self.next;
        self.next = seq + 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_check_out_and_damage_shows() {
        for kind in [Kind::Small, Kind::Full, Kind::Tso] {
            let t = Template::new(kind);
            let mut f = vec![0u8; t.len()];
            t.write(77, &mut f);
            assert_eq!(t.check(&f), Check::Seq(77), "{kind:?}");
            for at in [0, 13, f.len() / 2, f.len() - 1] {
                let mut bad = f.clone();
                bad[at] ^= 0x10;
                assert_ne!(t.check(&bad), Check::Seq(77), "{kind:?} byte {at}");
            }
            assert_ne!(t.check(&f[..f.len() - 1]), Check::Seq(77));
        }
        let t = Template::new(Kind::Small);
        let mut ipv6 = vec![0u8; 60];
        ipv6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
        assert_eq!(t.check(&ipv6), Check::Stray);
    }

    #[test]
    fn the_tso_frame_is_a_valid_ipv4_tcp_packet() {
        let t = Template::new(Kind::Tso);
        let ip = &t.bytes()[ETH_HDR..ETH_HDR + IP_HDR];
        assert_eq!(checksum(ip), 0, "header checksum verifies");
        assert_eq!(
            usize::from(u16::from_be_bytes([ip[2], ip[3]])),
            t.len() - ETH_HDR
        );
        let h = Kind::Tso.vnet_hdr();
        assert_eq!((h[0], h[1]), (F_NEEDS_CSUM, GSO_TCPV4));
        assert_eq!(Kind::Small.vnet_hdr(), [0u8; VNET_HDR]);
    }

    #[test]
    fn gaps_are_lost_and_late_frames_out_of_order() {
        let mut o = Order::default();
        assert!(o.arrived(0));
        assert!(o.arrived(3));
        assert_eq!(o.lost, 2);
        assert!(!o.arrived(2));
        assert!(!o.arrived(3));
        assert_eq!(o.out_of_order, 2);
        assert_eq!(o.next, 4);
    }
}
