//! Reading the headers the dataplane acts on. Reads go through
//! `bpf_skb_load_bytes`, so headers outside the linear area are still seen.
use aya_ebpf::programs::TcContext;
use network_types::ip::Ipv4Hdr;
use service_common::{FragKey, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, Reason};

use crate::icmp::{self, IcmpError};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: [u8; 2] = [0x08, 0x00];
pub const IP_SRC_OFF: usize = ETH_HLEN + 12;
pub const IP_DST_OFF: usize = ETH_HLEN + 16;
pub const IP_CSUM_OFF: usize = ETH_HLEN + 10;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// An IPv4 TCP or UDP packet, as the dataplane needs to see it.
#[derive(Clone, Copy)]
pub struct Flow {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    /// Header length of the IPv4 header in bytes (20..=60).
    pub ihl: usize,
    /// IPv4 total length, as the header says.
    pub ip_len: u16,
    /// The IPv4 identification, for fragments.
    pub ip_id: u16,
    /// The first fragment of a fragmented datagram: later ones follow it.
    pub first_fragment: bool,
}

impl Flow {
    #[inline(always)]
    pub fn l4_off(&self) -> usize {
        ETH_HLEN + self.ihl
    }

    /// Offset of the L4 checksum field.
    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        self.l4_off() + if self.proto == IPPROTO_TCP { 16 } else { 6 }
    }
}

pub enum Parsed {
    /// Not IPv4 TCP/UDP: none of the dataplane's business.
    Other,
    /// IPv4 the dataplane must not rewrite; passed on, counted.
    Untouchable(Reason),
    Flow(Flow),
    /// An ICMP error quoting a TCP/UDP packet.
    IcmpError(IcmpError),
    /// A fragment after the first: no L4 header.
    LaterFragment(FragKey),
}

#[inline(always)]
pub fn parse(ctx: &TcContext) -> Parsed {
    let Ok(ethertype) = ctx.load::<[u8; 2]>(12) else {
        return Parsed::Other;
    };
    if ethertype != ETH_P_IP {
        return Parsed::Other;
    }
    let Ok(ip) = ctx.load::<Ipv4Hdr>(ETH_HLEN) else {
        return Parsed::Untouchable(Reason::MalformedIp);
    };
    if ip.vihl >> 4 != 4 {
        return Parsed::Untouchable(Reason::MalformedIp);
    }
    let ihl = ((ip.vihl & 0x0f) as usize) * 4;
    let ip_len = u16::from_be_bytes(ip.tot_len);
    if ihl < 20 || (ip_len as usize) < ihl || ETH_HLEN + ip_len as usize > ctx.len() as usize {
        return Parsed::Untouchable(Reason::MalformedIp);
    }
    let proto = ip.proto;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != IPPROTO_ICMP {
        return Parsed::Other;
    }
    // A non-zero offset: no L4 header here; the first fragment decided.
    let frags = u16::from_be_bytes(ip.frags);
    let ip_id = u16::from_be_bytes(ip.id);
    if frags & 0x1fff != 0 {
        if proto == IPPROTO_ICMP {
            return Parsed::Other;
        }
        return Parsed::LaterFragment(FragKey {
            saddr: ip.src_addr,
            daddr: ip.dst_addr,
            id: ip_id,
            proto,
            _pad: 0,
        });
    }
    let first_fragment = frags & 0x2000 != 0;
    let l4_off = ETH_HLEN + ihl;
    if proto == IPPROTO_ICMP {
        return match icmp::parse(ctx, ip.dst_addr, l4_off, ETH_HLEN + ip_len as usize) {
            Some(e) => Parsed::IcmpError(e),
            None => Parsed::Other,
        };
    }
    let l4_min = if proto == IPPROTO_TCP { 20 } else { 8 };
    if (ip_len as usize) < ihl + l4_min {
        return Parsed::Untouchable(Reason::TruncatedL4);
    }
    let Ok(ports) = ctx.load::<[u8; 4]>(l4_off) else {
        return Parsed::Untouchable(Reason::TruncatedL4);
    };
    let mut tcp_flags = 0;
    if proto == IPPROTO_TCP {
        let Ok(f) = ctx.load::<u8>(l4_off + 13) else {
            return Parsed::Untouchable(Reason::TruncatedL4);
        };
        tcp_flags = f;
    }
    Parsed::Flow(Flow {
        saddr: ip.src_addr,
        daddr: ip.dst_addr,
        sport: u16::from_be_bytes([ports[0], ports[1]]),
        dport: u16::from_be_bytes([ports[2], ports[3]]),
        proto,
        tcp_flags,
        ihl,
        ip_len,
        ip_id,
        first_fragment,
    })
}
