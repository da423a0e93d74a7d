//! Reading the IPv4 headers the dataplane acts on, the same for tc and XDP
//! (`packet6.rs` reads IPv6 into the same `Flow`).
use network_types::ip::Ipv4Hdr;
use service_common::{FragKey, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, Reason};

use crate::{
    access::Packet,
    family::{Family, V4},
    headers::*,
    icmp::{self, IcmpError},
    icmp6::Icmp6Error,
};

/// A TCP or UDP packet of family `F`, as the dataplane needs to see it.
#[derive(Clone, Copy)]
pub struct Flow<F: Family> {
    // The 5-tuple: addresses in packet order, ports in host order.
    pub saddr: F::Addr,
    pub daddr: F::Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub tcp_flags: u8,
    /// Bytes of IP header before the L4 header: IPv4's with its options
    /// (20..=60), or IPv6's with its extension headers.
    pub l3_len: usize,
    /// The IP packet's length, as its header says (IPv6: 40 + payload length).
    pub ip_len: u16,
    /// The identification of a fragmented datagram (IPv4's 16 bits, or the
    /// IPv6 fragment header's 32).
    pub ip_id: u32,
    /// IPv6: the next header of the fragment header, what its later
    /// fragments are keyed by (IPv4: the protocol).
    pub frag_proto: u8,
    /// TTL or hop limit.
    pub ttl: u8,
    /// The first fragment of a fragmented datagram: later ones follow it.
    pub first_fragment: bool,
}

impl<F: Family> Flow<F> {
    /// Whether this packet may open a flow: any UDP datagram; a TCP segment
    /// only as a SYN without ACK, FIN or RST (no stack opens with those
    /// beside it; scanners and attacks do, and the kernel's conntrack
    /// refuses them too).
    #[inline(always)]
    pub fn may_open(&self) -> bool {
        self.proto != IPPROTO_TCP
            || self.tcp_flags & (TCP_SYN | TCP_ACK | TCP_FIN | TCP_RST) == TCP_SYN
    }

    #[inline(always)]
    pub fn l4_off(&self) -> usize {
        ETH_HLEN + self.l3_len
    }

    /// Offset of the L4 checksum field.
    #[inline(always)]
    pub fn l4_csum_off(&self) -> usize {
        self.l4_off()
            + if self.proto == IPPROTO_TCP {
                TCP_CSUM_OFF
            } else {
                UDP_CSUM_OFF
            }
    }
}

pub enum Parsed<F: Family> {
    /// Not TCP/UDP of the family: none of the dataplane's business.
    Other,
    /// A packet the dataplane must not rewrite; passed on, counted.
    Untouchable(Reason),
    Flow(Flow<F>),
    /// An ICMP error quoting a TCP/UDP packet.
    IcmpError(IcmpError),
    /// The same over IPv6.
    Icmp6Error(Icmp6Error),
    /// A fragment after the first: no L4 header.
    LaterFragment(F::FragKey),
}

#[inline(always)]
pub fn parse<P: Packet>(ctx: &P) -> Parsed<V4> {
    if ctx.read::<[u8; 2]>(ETH_TYPE_OFF) != Some(ETH_P_IP) {
        return Parsed::Other;
    }
    let Some(ip) = ctx.read::<Ipv4Hdr>(ETH_HLEN) else {
        return Parsed::Untouchable(Reason::MalformedIp);
    };
    if ip.vihl >> 4 != 4 {
        return Parsed::Untouchable(Reason::MalformedIp);
    }
    let ihl = ((ip.vihl & 0x0f) as usize) * 4;
    let ip_len = u16::from_be_bytes(ip.tot_len);
    if ihl < IP_HLEN || (ip_len as usize) < ihl || ETH_HLEN + ip_len as usize > ctx.size() {
        return Parsed::Untouchable(Reason::MalformedIp);
    }
    let proto = ip.proto;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != IPPROTO_ICMP {
        return Parsed::Other;
    }
    // A non-zero offset: no L4 header here; the first fragment decided.
    let frags = u16::from_be_bytes(ip.frags);
    let ip_id = u16::from_be_bytes(ip.id);
    if frags & IP_OFFSET_MASK != 0 {
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
    let l4_off = ETH_HLEN + ihl;
    if proto == IPPROTO_ICMP {
        return match icmp::parse(
            ctx,
            (ip.src_addr, ip.dst_addr),
            l4_off,
            ETH_HLEN + ip_len as usize,
        ) {
            Some(e) => Parsed::IcmpError(e),
            None => Parsed::Other,
        };
    }
    let l4_min = if proto == IPPROTO_TCP {
        TCP_HLEN
    } else {
        UDP_HLEN
    };
    if (ip_len as usize) < ihl + l4_min {
        return Parsed::Untouchable(Reason::TruncatedL4);
    }
    let Some(ports) = ctx.read::<[u8; 4]>(l4_off) else {
        return Parsed::Untouchable(Reason::TruncatedL4);
    };
    let mut tcp_flags = 0;
    if proto == IPPROTO_TCP {
        let Some([_, flags]) = ctx.read::<[u8; 2]>(l4_off + TCP_DOFF_OFF) else {
            return Parsed::Untouchable(Reason::TruncatedL4);
        };
        tcp_flags = flags;
    }
    Parsed::Flow(Flow {
        saddr: ip.src_addr,
        daddr: ip.dst_addr,
        sport: u16::from_be_bytes([ports[0], ports[1]]),
        dport: u16::from_be_bytes([ports[2], ports[3]]),
        proto,
        tcp_flags,
        l3_len: ihl,
        ip_len,
        ip_id: ip_id as u32,
        frag_proto: proto,
        ttl: ip.ttl,
        first_fragment: frags & IP_MF != 0,
    })
}
