//! Reading an IPv6 TCP or UDP packet into a `Flow`: the fixed header, then
//! the extension headers a router or host may put before the upper layer
//! (hop-by-hop, routing, destination options, fragment), walked a bounded
//! number of times so the verifier sees a fixed cost. Of ICMPv6 only errors
//! quoting TCP/UDP are read (`icmp6.rs`): neighbour discovery, router
//! advertisements and MLD go on untouched and uncounted.
use network_types::ip::Ipv6Hdr;
use service_common::{FragKey6, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, Reason};

use crate::{
    access::Packet,
    family::V6,
    headers::*,
    icmp6,
    packet::{Flow, Parsed},
};

/// Extension headers walked at most. RFC 8200 recommends each appear once
/// (destination options twice), so a real chain is shorter; a longer one
/// is passed untouched and counted.
const EXT_HEADERS_MAX: usize = 6;

/// The fragment header of the packet, when it has one.
#[derive(Clone, Copy)]
struct Fragment {
    id: u32,
    /// The next header field of the fragment header: what the later
    /// fragments, which carry only that field, are keyed by.
    next: u8,
    first: bool,
}

#[inline(always)]
fn is_extension(next: u8) -> bool {
    next == NEXTHDR_HOP
        || next == NEXTHDR_ROUTING
        || next == NEXTHDR_DEST
        || next == NEXTHDR_FRAGMENT
}

#[inline(always)]
pub fn parse<P: Packet>(ctx: &P) -> Parsed<V6> {
    if ctx.read::<[u8; 2]>(ETH_TYPE_OFF) != Some(ETH_P_IPV6) {
        return Parsed::Other;
    }
    let Some(ip) = ctx.read::<Ipv6Hdr>(ETH_HLEN) else {
        return Parsed::Untouchable(Reason::MalformedIpv6);
    };
    if ip.vcf[0] >> 4 != 6 {
        return Parsed::Untouchable(Reason::MalformedIpv6);
    }
    let payload = u16::from_be_bytes(ip.payload_len) as usize;
    let ip_end = ETH_HLEN + IP6_HLEN + payload;
    if ip_end > ctx.size() {
        return Parsed::Untouchable(Reason::MalformedIpv6);
    }
    let mut next = ip.next_hdr;
    let mut off = ETH_HLEN + IP6_HLEN;
    let mut frag: Option<Fragment> = None;
    for _ in 0..EXT_HEADERS_MAX {
        if !is_extension(next) {
            break;
        }
        // Every extension header starts with its next header; all but the
        // fragment header then give their length in 8-byte units, less one.
        let Some(h) = ctx.read::<[u8; 8]>(off) else {
            return Parsed::Untouchable(Reason::MalformedIpv6);
        };
        if next == NEXTHDR_FRAGMENT {
            let field = u16::from_be_bytes([h[2], h[3]]);
            let f = Fragment {
                id: u32::from_be_bytes([h[4], h[5], h[6], h[7]]),
                next: h[0],
                first: field & IP6_MF != 0,
            };
            if field & IP6_OFFSET_MASK != 0 {
                if h[0] != IPPROTO_TCP && h[0] != IPPROTO_UDP {
                    return Parsed::Other;
                }
                return Parsed::LaterFragment(FragKey6 {
                    saddr: ip.src_addr,
                    daddr: ip.dst_addr,
                    id: f.id,
                    proto: h[0],
                    _pad: [0; 3],
                });
            }
            frag = Some(f);
            off += 8;
        } else {
            off += (h[1] as usize + 1) * 8;
        }
        next = h[0];
        if off > ip_end {
            return Parsed::Untouchable(Reason::MalformedIpv6);
        }
    }
    if is_extension(next) {
        return Parsed::Untouchable(Reason::Ipv6ExtChainTooLong);
    }
    if next == IPPROTO_ICMPV6 && frag.is_none() {
        return match icmp6::parse(ctx, (ip.src_addr, ip.dst_addr), off, ip_end) {
            Some(e) => Parsed::Icmp6Error(e),
            None => Parsed::Other,
        };
    }
    if next != IPPROTO_TCP && next != IPPROTO_UDP {
        return Parsed::Other;
    }
    let l4_min = if next == IPPROTO_TCP {
        TCP_HLEN
    } else {
        UDP_HLEN
    };
    if ip_end < off + l4_min {
        return Parsed::Untouchable(Reason::TruncatedL4);
    }
    let Some(ports) = ctx.read::<[u8; 4]>(off) else {
        return Parsed::Untouchable(Reason::TruncatedL4);
    };
    let mut tcp_flags = 0;
    if next == IPPROTO_TCP {
        let Some([_, flags]) = ctx.read::<[u8; 2]>(off + TCP_DOFF_OFF) else {
            return Parsed::Untouchable(Reason::TruncatedL4);
        };
        tcp_flags = flags;
    } else {
        // Zero is no checksum in IPv4 only; over IPv6 the receiver discards
        // such a datagram (RFC 8200 8.1), and the incremental update would
        // keep the zero, so it is not translated.
        let Some(check) = ctx.read::<[u8; 2]>(off + UDP_CSUM_OFF) else {
            return Parsed::Untouchable(Reason::TruncatedL4);
        };
        if check == [0, 0] {
            return Parsed::Untouchable(Reason::Ipv6UdpZeroChecksum);
        }
    }
    let (ip_id, frag_proto, first_fragment) = match frag {
        Some(f) => (f.id, f.next, f.first),
        None => (0, next, false),
    };
    Parsed::Flow(Flow {
        saddr: ip.src_addr,
        daddr: ip.dst_addr,
        sport: u16::from_be_bytes([ports[0], ports[1]]),
        dport: u16::from_be_bytes([ports[2], ports[3]]),
        proto: next,
        tcp_flags,
        l3_len: off - ETH_HLEN,
        ip_len: (ip_end - ETH_HLEN).min(u16::MAX as usize) as u16,
        ip_id,
        frag_proto,
        ttl: ip.hop_limit,
        first_fragment,
    })
}
