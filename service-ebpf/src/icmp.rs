//! ICMP errors about translated flows (fragmentation needed, port
//! unreachable, time exceeded) are rewritten like the packet they quote, so
//! path MTU discovery and error reporting work through a Service.
//!
//! The quoted packet travelled in one direction of a translated flow; the
//! conntrack entry of the other direction, looked up with the quoted tuple
//! reversed, says how that packet looked before translation and who sent it.
use aya_ebpf::programs::TcContext;
use network_types::ip::Ipv4Hdr;
use service_common::{CT_F_KERNEL, CtKey, IPPROTO_TCP, IPPROTO_UDP, Reason};

use crate::{
    access::Packet,
    csum::{half, word},
    family::V4,
    headers::*,
    lb,
    maps::CONNTRACK,
};

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROB: u8 = 12;

/// An ICMP error quoting a TCP or UDP packet.
pub struct IcmpError {
    pub outer_saddr: [u8; 4],
    pub outer_daddr: [u8; 4],
    /// Offset of the ICMP header.
    pub icmp_off: usize,
    /// The quoted packet's tuple, as quoted.
    pub inner: CtKey,
}

impl IcmpError {
    fn inner_ip_off(&self) -> usize {
        self.icmp_off + ICMP_HLEN
    }
    fn inner_l4_off(&self) -> usize {
        self.inner_ip_off() + IP_HLEN
    }
}

/// Recognises an ICMP error quoting TCP/UDP with a plain 20-byte header,
/// quoted inside the IP packet (not in bytes trailing it).
#[inline(always)]
pub fn parse<P: Packet>(
    ctx: &P,
    (saddr, daddr): ([u8; 4], [u8; 4]),
    l4_off: usize,
    ip_end: usize,
) -> Option<IcmpError> {
    // The quoted IP header and the quoted ports (4 bytes) must be there.
    if l4_off + ICMP_HLEN + IP_HLEN + 4 > ip_end {
        return None;
    }
    let [kind, _code] = ctx.read::<[u8; 2]>(l4_off)?;
    if kind != ICMP_DEST_UNREACH && kind != ICMP_TIME_EXCEEDED && kind != ICMP_PARAMETER_PROB {
        return None;
    }
    let inner = ctx.read::<Ipv4Hdr>(l4_off + ICMP_HLEN)?;
    // Version 4 with no options: the quoted ports are at a fixed place.
    if inner.vihl != 0x45 || (inner.proto != IPPROTO_TCP && inner.proto != IPPROTO_UDP) {
        return None;
    }
    let ports = ctx.read::<[u8; 4]>(l4_off + ICMP_HLEN + IP_HLEN)?;
    Some(IcmpError {
        outer_saddr: saddr,
        outer_daddr: daddr,
        icmp_off: l4_off,
        inner: CtKey {
            saddr: inner.src_addr,
            daddr: inner.dst_addr,
            sport: u16::from_be_bytes([ports[0], ports[1]]),
            dport: u16::from_be_bytes([ports[2], ports[3]]),
            proto: inner.proto,
            _pad: [0; 3],
        },
    })
}

pub enum IcmpVerdict<A = [u8; 4]> {
    NotOurs,
    /// `local_source`: the error now comes from one of this node's
    /// addresses (a NodePort), so it goes to its next hop directly.
    Translated {
        svc_id: u32,
        source: A,
        client: A,
        local_source: bool,
    },
    Failed(Reason),
}

/// Rewrites the ICMP error if it quotes a translated flow.
#[inline(always)]
pub fn translate(ctx: &TcContext, e: &IcmpError) -> IcmpVerdict {
    let q = e.inner;
    let other_direction = CtKey {
        saddr: q.daddr,
        daddr: q.saddr,
        sport: q.dport,
        dport: q.sport,
        proto: q.proto,
        _pad: [0; 3],
    };
    // SAFETY: the kernel keeps a looked-up hash map value alive until the
    // program returns (RCU); a concurrent update of the same flow can at
    // worst mix its old and new translation, each of them a valid one.
    let Some(entry) = (unsafe { CONNTRACK.get(other_direction) }) else {
        return IcmpVerdict::NotOurs;
    };
    // Netfilter translates errors about the flows it translates.
    if entry.flags & CT_F_KERNEL != 0 {
        return IcmpVerdict::NotOurs;
    }
    // The quoted packet, before translation, was the reverse of what the
    // other direction is rewritten to; its sender gets the error.
    let original = Quoted {
        src: entry.nat_daddr,
        sport: entry.nat_dport,
        dst: entry.nat_saddr,
        dport: entry.nat_sport,
    };
    match rewrite(ctx, e, &original) {
        Ok(source) => IcmpVerdict::Translated {
            svc_id: entry.svc_id,
            source,
            client: original.src,
            local_source: source != e.outer_saddr && lb::is_node_address::<V4>(source),
        },
        Err(()) => IcmpVerdict::Failed(Reason::RewriteFailed),
    }
}

/// The quoted packet as its sender sent it.
struct Quoted {
    src: [u8; 4],
    sport: u16,
    dst: [u8; 4],
    dport: u16,
}

#[inline(always)]
/// Rewrites the quoted packet to `to` and the error's addresses to match;
/// gives the error's source as it leaves.
fn rewrite(ctx: &TcContext, e: &IcmpError, to: &Quoted) -> Result<[u8; 4], ()> {
    let icmp_csum = e.icmp_off + 2;
    let inner_ip = e.inner_ip_off();
    let inner_l4 = e.inner_l4_off();
    let q = e.inner;
    let (src, dst) = (to.src, to.dst);
    let old_inner_csum = ctx.load::<[u8; 2]>(inner_ip + IPH_CSUM).map_err(|_| ())?;
    // The quoted IP header keeps a valid checksum.
    ctx.l3_csum_replace(inner_ip + IPH_CSUM, word(q.saddr), word(src), 4)
        .map_err(|_| ())?;
    ctx.l3_csum_replace(inner_ip + IPH_CSUM, word(q.daddr), word(dst), 4)
        .map_err(|_| ())?;
    let new_inner_csum = ctx.load::<[u8; 2]>(inner_ip + IPH_CSUM).map_err(|_| ())?;
    // The ICMP checksum covers every quoted byte that changed (no pseudo-header).
    let changes: [(u64, u64, u64); 4] = [
        (word(q.saddr), word(src), 4),
        (word(q.daddr), word(dst), 4),
        (half(q.sport), half(to.sport), 2),
        (half(q.dport), half(to.dport), 2),
    ];
    for (old, new, size) in changes {
        if old != new {
            ctx.l4_csum_replace(icmp_csum, old, new, size)
                .map_err(|_| ())?;
        }
    }
    ctx.l4_csum_replace(
        icmp_csum,
        u16::from_ne_bytes(old_inner_csum) as u64,
        u16::from_ne_bytes(new_inner_csum) as u64,
        2,
    )
    .map_err(|_| ())?;
    ctx.store(inner_ip + IPH_SRC, &src, 0).map_err(|_| ())?;
    ctx.store(inner_ip + IPH_DST, &dst, 0).map_err(|_| ())?;
    ctx.store(inner_l4, &to.sport.to_be_bytes(), 0)
        .map_err(|_| ())?;
    ctx.store(inner_l4 + 2, &to.dport.to_be_bytes(), 0)
        .map_err(|_| ())?;
    // The error goes to the quoted packet's original sender.
    if e.outer_daddr != src {
        ctx.l3_csum_replace(IP_CSUM_OFF, word(e.outer_daddr), word(src), 4)
            .map_err(|_| ())?;
        ctx.store(IP_DST_OFF, &src, 0).map_err(|_| ())?;
    }
    // An error the backend sent itself (a UDP port unreachable) names an
    // address its receiver never talked to: it is made to come from the
    // frontend, so the client's stack and its firewall match it to the flow.
    // Errors from routers on the way keep their source.
    if e.outer_saddr == q.daddr && q.daddr != dst {
        ctx.l3_csum_replace(IP_CSUM_OFF, word(e.outer_saddr), word(dst), 4)
            .map_err(|_| ())?;
        ctx.store(IP_SRC_OFF, &dst, 0).map_err(|_| ())?;
        return Ok(dst);
    }
    Ok(e.outer_saddr)
}
