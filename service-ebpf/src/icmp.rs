//! ICMP errors about translated flows (fragmentation needed, port
//! unreachable, time exceeded) are rewritten like the packet they quote, so
//! path MTU discovery and error reporting work through a Service.
//!
//! The quoted packet travelled in one direction of a translated flow; the
//! conntrack entry of the other direction, looked up with the quoted tuple
//! reversed, says how that packet looked before translation and who sent it.
use aya_ebpf::programs::TcContext;
use network_types::ip::Ipv4Hdr;
use service_common::{CT_F_KERNEL, IPPROTO_TCP, IPPROTO_UDP};

use crate::{
    maps::CONNTRACK,
    packet::{IP_CSUM_OFF, IP_DST_OFF},
};
use service_common::CtKey;

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROB: u8 = 12;

/// An ICMP error quoting a TCP or UDP packet.
pub struct IcmpError {
    pub outer_daddr: [u8; 4],
    /// Offset of the ICMP header.
    pub icmp_off: usize,
    /// The quoted packet's tuple, as quoted.
    pub inner: CtKey,
}

impl IcmpError {
    fn inner_ip_off(&self) -> usize {
        self.icmp_off + 8
    }
    fn inner_l4_off(&self) -> usize {
        self.inner_ip_off() + 20
    }
}

/// Recognises an ICMP error quoting TCP/UDP with a plain 20-byte header,
/// quoted inside the IP packet (not in bytes trailing it).
#[inline(always)]
pub fn parse(ctx: &TcContext, daddr: [u8; 4], l4_off: usize, ip_end: usize) -> Option<IcmpError> {
    if l4_off + 8 + 24 > ip_end {
        return None;
    }
    let kind = ctx.load::<u8>(l4_off).ok()?;
    if kind != ICMP_DEST_UNREACH && kind != ICMP_TIME_EXCEEDED && kind != ICMP_PARAMETER_PROB {
        return None;
    }
    let inner = ctx.load::<Ipv4Hdr>(l4_off + 8).ok()?;
    if inner.vihl != 0x45 || (inner.proto != IPPROTO_TCP && inner.proto != IPPROTO_UDP) {
        return None;
    }
    let ports = ctx.load::<[u8; 4]>(l4_off + 8 + 20).ok()?;
    Some(IcmpError {
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

pub enum IcmpVerdict {
    NotOurs,
    Translated { svc_id: u32 },
    Failed,
}

fn word(a: [u8; 4]) -> u64 {
    u32::from_ne_bytes(a) as u64
}

fn half(p: u16) -> u64 {
    u16::from_ne_bytes(p.to_be_bytes()) as u64
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
    let Some(entry) = (unsafe { CONNTRACK.get(other_direction) }) else {
        return IcmpVerdict::NotOurs;
    };
    // Netfilter translates errors about the flows it translates.
    if entry.flags & CT_F_KERNEL != 0 {
        return IcmpVerdict::NotOurs;
    }
    // The quoted packet, before translation, was the reverse of what the
    // other direction is rewritten to; its sender gets the error.
    let (src, sport, dst, dport) = (
        entry.nat_daddr,
        entry.nat_dport,
        entry.nat_saddr,
        entry.nat_sport,
    );
    let svc_id = entry.svc_id;
    match rewrite(ctx, e, src, sport, dst, dport) {
        Ok(()) => IcmpVerdict::Translated { svc_id },
        Err(()) => IcmpVerdict::Failed,
    }
}

#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    e: &IcmpError,
    src: [u8; 4],
    sport: u16,
    dst: [u8; 4],
    dport: u16,
) -> Result<(), ()> {
    let icmp_csum = e.icmp_off + 2;
    let inner_ip = e.inner_ip_off();
    let inner_l4 = e.inner_l4_off();
    let q = e.inner;
    let old_inner_csum = ctx.load::<[u8; 2]>(inner_ip + 10).map_err(|_| ())?;
    // The quoted IP header keeps a valid checksum.
    ctx.l3_csum_replace(inner_ip + 10, word(q.saddr), word(src), 4)
        .map_err(|_| ())?;
    ctx.l3_csum_replace(inner_ip + 10, word(q.daddr), word(dst), 4)
        .map_err(|_| ())?;
    let new_inner_csum = ctx.load::<[u8; 2]>(inner_ip + 10).map_err(|_| ())?;
    // The ICMP checksum covers every quoted byte that changed (no pseudo-header).
    let changes: [(u64, u64, u64); 4] = [
        (word(q.saddr), word(src), 4),
        (word(q.daddr), word(dst), 4),
        (half(q.sport), half(sport), 2),
        (half(q.dport), half(dport), 2),
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
    ctx.store(inner_ip + 12, &src, 0).map_err(|_| ())?;
    ctx.store(inner_ip + 16, &dst, 0).map_err(|_| ())?;
    ctx.store(inner_l4, &sport.to_be_bytes(), 0)
        .map_err(|_| ())?;
    ctx.store(inner_l4 + 2, &dport.to_be_bytes(), 0)
        .map_err(|_| ())?;
    // The error goes to the quoted packet's original sender.
    if e.outer_daddr != src {
        ctx.l3_csum_replace(IP_CSUM_OFF, word(e.outer_daddr), word(src), 4)
            .map_err(|_| ())?;
        ctx.store(IP_DST_OFF, &src, 0).map_err(|_| ())?;
    }
    Ok(())
}
