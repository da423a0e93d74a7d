//! Building and checking raw Ethernet/IPv4 and Ethernet/IPv6 packets for
//! BPF_PROG_TEST_RUN.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
pub const RST: u8 = 0x04;
pub const FIN: u8 = 0x01;

/// One's complement sum over `data`, folded, not inverted.
pub fn sum16(data: &[u8], mut acc: u32) -> u32 {
    for chunk in data.chunks(2) {
        let w = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        acc += w as u32;
    }
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc
}

pub fn checksum(data: &[u8]) -> u16 {
    !(sum16(data, 0) as u16)
}

fn pseudo(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(12);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&[0, proto]);
    p.extend_from_slice(&(len as u16).to_be_bytes());
    p
}

/// The IPv6 pseudo-header (RFC 8200 section 8.1): unlike IPv4's, its length
/// is 32 bits and the next-header byte comes last.
pub fn pseudo6(src: Ipv6Addr, dst: Ipv6Addr, proto: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(40);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&(len as u32).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, proto]);
    p
}

/// The pseudo-header of either family; mixed families are a test's bug.
fn pseudo_any(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> Vec<u8> {
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => pseudo(s, d, proto, len),
        (IpAddr::V6(s), IpAddr::V6(d)) => pseudo6(s, d, proto, len),
        _ => panic!("a packet from {src} to {dst} mixes address families"),
    }
}

const ETH_IPV4: [u8; 2] = [0x08, 0x00];
const ETH_IPV6: [u8; 2] = [0x86, 0xdd];

fn ethernet(ethertype: [u8; 2]) -> Vec<u8> {
    let mut eth = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    eth.extend_from_slice(&ethertype);
    eth
}

/// A parsed view of an output packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    pub ip_csum_ok: bool,
    /// None when the L4 checksum is absent (UDP zero).
    pub l4_csum_ok: Option<bool>,
    pub l4_csum: u16,
}

/// One frame: IPv4 or IPv6 by the family of `src` and `dst` (IPv6 has no
/// header options or fragment field here: `ip_options` and `frag` must stay 0).
pub struct Builder {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    pub payload: Vec<u8>,
    pub frag: u16,
    pub udp_zero_csum: bool,
    pub ip_options: usize,
    pub seq: u32,
}

impl Builder {
    pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16, flags: u8) -> Self {
        Self {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            sport,
            dport,
            proto: TCP,
            tcp_flags: flags,
            payload: vec![],
            frag: 0,
            udp_zero_csum: false,
            ip_options: 0,
            seq: 1000,
        }
    }

    pub fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Self {
        Self {
            proto: UDP,
            ..Self::tcp(src, sport, dst, dport, 0)
        }
    }

    pub fn build(&self) -> Vec<u8> {
        let mut l4 = vec![];
        if self.proto == TCP {
            l4.extend_from_slice(&self.sport.to_be_bytes());
            l4.extend_from_slice(&self.dport.to_be_bytes());
            l4.extend_from_slice(&self.seq.to_be_bytes());
            l4.extend_from_slice(&0u32.to_be_bytes());
            l4.extend_from_slice(&[0x50, self.tcp_flags, 0xff, 0xff, 0, 0, 0, 0]);
            l4.extend_from_slice(&self.payload);
            let mut s = pseudo_any(self.src, self.dst, TCP, l4.len());
            s.extend_from_slice(&l4);
            let c = checksum(&s);
            l4[16..18].copy_from_slice(&c.to_be_bytes());
        } else {
            let len = 8 + self.payload.len();
            l4.extend_from_slice(&self.sport.to_be_bytes());
            l4.extend_from_slice(&self.dport.to_be_bytes());
            l4.extend_from_slice(&(len as u16).to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
            l4.extend_from_slice(&self.payload);
            if !self.udp_zero_csum {
                let mut s = pseudo_any(self.src, self.dst, UDP, l4.len());
                s.extend_from_slice(&l4);
                let mut c = checksum(&s);
                if c == 0 {
                    c = 0xffff;
                }
                l4[6..8].copy_from_slice(&c.to_be_bytes());
            }
        }
        let (src, dst) = match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => (s, d),
            (IpAddr::V6(s), IpAddr::V6(d)) => return self.frame6(s, d, &l4),
            (s, d) => panic!("a packet from {s} to {d} mixes address families"),
        };
        let ihl = 20 + self.ip_options;
        let total = ihl + l4.len();
        let mut ip = vec![
            0x40 | (ihl / 4) as u8,
            0,
            (total >> 8) as u8,
            total as u8,
            0x12,
            0x34,
            (self.frag >> 8) as u8,
            self.frag as u8,
            64,
            self.proto,
            0,
            0,
        ];
        ip.extend_from_slice(&src.octets());
        ip.extend_from_slice(&dst.octets());
        // NOP options.
        ip.extend(std::iter::repeat_n(1u8, self.ip_options));
        let c = checksum(&ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        let mut pkt = ethernet(ETH_IPV4);
        pkt.extend_from_slice(&ip);
        pkt.extend_from_slice(&l4);
        pkt
    }

    /// `l4` behind a fixed IPv6 header (no extension headers; IPv6 has no
    /// header checksum, the L4 one already covers the addresses).
    fn frame6(&self, src: Ipv6Addr, dst: Ipv6Addr, l4: &[u8]) -> Vec<u8> {
        assert!(
            self.ip_options == 0 && self.frag == 0,
            "IPv4 options or fragment offset set on an IPv6 packet"
        );
        let mut pkt = ethernet(ETH_IPV6);
        // Version 6, traffic class and flow label 0.
        pkt.extend_from_slice(&[0x60, 0, 0, 0]);
        pkt.extend_from_slice(&(l4.len() as u16).to_be_bytes());
        pkt.extend_from_slice(&[self.proto, 64]);
        pkt.extend_from_slice(&src.octets());
        pkt.extend_from_slice(&dst.octets());
        pkt.extend_from_slice(l4);
        pkt
    }
}

/// The tuple of an Ethernet/IPv6/TCP|UDP frame without extension headers,
/// and whether its L4 checksum holds: (src, sport, dst, dport, ok).
pub fn parse6(pkt: &[u8]) -> (Ipv6Addr, u16, Ipv6Addr, u16, bool) {
    assert_eq!(pkt[12..14], ETH_IPV6, "not an IPv6 frame");
    let ip = &pkt[14..];
    let len = u16::from_be_bytes([ip[4], ip[5]]) as usize;
    let proto = ip[6];
    let addr = |o: usize| Ipv6Addr::from(<[u8; 16]>::try_from(&ip[o..o + 16]).unwrap());
    let (src, dst) = (addr(8), addr(24));
    let l4 = &ip[40..40 + len];
    let mut s = pseudo6(src, dst, proto, l4.len());
    s.extend_from_slice(l4);
    (
        src,
        u16::from_be_bytes([l4[0], l4[1]]),
        dst,
        u16::from_be_bytes([l4[2], l4[3]]),
        checksum(&s) == 0,
    )
}

/// Parses an Ethernet/IPv4/TCP|UDP packet and verifies its checksums.
pub fn parse(pkt: &[u8]) -> Seen {
    let ip = &pkt[14..];
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let proto = ip[9];
    let l4 = &ip[ihl..total];
    let ip_csum_ok = checksum(&ip[..ihl]) == 0;
    let (sport, dport) = if proto == ICMP {
        (0, 0)
    } else {
        (
            u16::from_be_bytes([l4[0], l4[1]]),
            u16::from_be_bytes([l4[2], l4[3]]),
        )
    };
    let csum_off = match proto {
        TCP => 16,
        UDP => 6,
        _ => 2,
    };
    let l4_csum = u16::from_be_bytes([l4[csum_off], l4[csum_off + 1]]);
    let l4_csum_ok = if proto == UDP && l4_csum == 0 {
        None
    } else if proto == ICMP {
        Some(checksum(l4) == 0)
    } else {
        let mut s = pseudo(src, dst, proto, l4.len());
        s.extend_from_slice(l4);
        Some(checksum(&s) == 0)
    };
    Seen {
        src,
        dst,
        proto,
        sport,
        dport,
        ip_csum_ok,
        l4_csum_ok,
        l4_csum,
    }
}

/// An ICMP error (`kind`/`code`) from `from` to `to` quoting `quoted` (an
/// Ethernet frame; its IP header and the first 8 bytes of L4 are quoted).
pub fn icmp_error(from: &str, to: &str, kind: u8, code: u8, quoted: &[u8]) -> Vec<u8> {
    let inner = &quoted[14..14 + 28];
    let mut icmp = vec![kind, code, 0, 0, 0, 0, 0x05, 0xdc];
    icmp.extend_from_slice(inner);
    let c = checksum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let total = 20 + icmp.len();
    let from: Ipv4Addr = from.parse().unwrap();
    let to: Ipv4Addr = to.parse().unwrap();
    let mut ip = vec![
        0x45,
        0,
        (total >> 8) as u8,
        total as u8,
        0,
        1,
        0,
        0,
        64,
        ICMP,
        0,
        0,
    ];
    ip.extend_from_slice(&from.octets());
    ip.extend_from_slice(&to.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut pkt = ethernet(ETH_IPV4);
    pkt.extend_from_slice(&ip);
    pkt.extend_from_slice(&icmp);
    pkt
}

/// The quoted tuple of an ICMP error frame, and whether the quoted IP header's checksum holds.
pub fn quoted(pkt: &[u8]) -> (Ipv4Addr, u16, Ipv4Addr, u16, bool) {
    let inner = &pkt[14 + 20 + 8..];
    (
        Ipv4Addr::new(inner[12], inner[13], inner[14], inner[15]),
        u16::from_be_bytes([inner[20], inner[21]]),
        Ipv4Addr::new(inner[16], inner[17], inner[18], inner[19]),
        u16::from_be_bytes([inner[22], inner[23]]),
        checksum(&inner[..20]) == 0,
    )
}
