//! ICMPv6 errors about translated flows (Packet Too Big above all, then
//! destination unreachable, time exceeded, parameter problem) are rewritten
//! like the packet they quote, as `icmp.rs` does for IPv4, so path MTU
//! discovery and error reporting work through a Service.
//!
//! What differs from IPv4: no header checksums, and the ICMPv6 checksum
//! covers a pseudo-header of the outer addresses besides the message.
//! Neighbour discovery, router advertisements and MLD (types 128 and up)
//! are never looked at.
use aya_ebpf::{bindings::BPF_F_PSEUDO_HDR, helpers::bpf_csum_diff, programs::TcContext};
use network_types::ip::Ipv6Hdr;
use service_common::{Addr6, CT_F_KERNEL, CtKey6, CtValue6, IPPROTO_TCP, IPPROTO_UDP, Reason};

use crate::{
    access::Packet, csum::half, family::V6, headers::*, icmp::IcmpVerdict, lb, maps::CONNTRACK6,
};

const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PARAMETER_PROB: u8 = 4;

/// An ICMPv6 error quoting a TCP or UDP packet.
#[derive(Clone, Copy)]
pub struct Icmp6Error {
    pub outer_saddr: Addr6,
    pub outer_daddr: Addr6,
    /// Offset of the ICMPv6 header.
    pub icmp_off: usize,
    /// The quoted packet's tuple, as quoted.
    pub inner: CtKey6,
}

impl Icmp6Error {
    fn inner_ip_off(&self) -> usize {
        self.icmp_off + ICMP_HLEN
    }
}

/// Recognises an ICMPv6 error (types 1 to 4) quoting TCP/UDP right after
/// the quoted fixed header (a quoted extension header chain is not walked).
#[inline(always)]
pub fn parse<P: Packet>(
    ctx: &P,
    (saddr, daddr): (Addr6, Addr6),
    l4_off: usize,
    ip_end: usize,
) -> Option<Icmp6Error> {
    if l4_off + ICMP_HLEN + IP6_HLEN + 4 > ip_end {
        return None;
    }
    let [kind, _code] = ctx.read::<[u8; 2]>(l4_off)?;
    if !(ICMPV6_DEST_UNREACH..=ICMPV6_PARAMETER_PROB).contains(&kind) {
        return None;
    }
    let inner = ctx.read::<Ipv6Hdr>(l4_off + ICMP_HLEN)?;
    if inner.vcf[0] >> 4 != 6 || (inner.next_hdr != IPPROTO_TCP && inner.next_hdr != IPPROTO_UDP) {
        return None;
    }
    let ports = ctx.read::<[u8; 4]>(l4_off + ICMP_HLEN + IP6_HLEN)?;
    Some(Icmp6Error {
        outer_saddr: saddr,
        outer_daddr: daddr,
        icmp_off: l4_off,
        inner: CtKey6 {
            saddr: inner.src_addr,
            daddr: inner.dst_addr,
            sport: u16::from_be_bytes([ports[0], ports[1]]),
            dport: u16::from_be_bytes([ports[2], ports[3]]),
            proto: inner.next_hdr,
            _pad: [0; 3],
        },
    })
}

/// Rewrites the ICMPv6 error if it quotes a translated flow.
#[inline(always)]
pub fn translate(ctx: &TcContext, e: &Icmp6Error) -> IcmpVerdict<Addr6> {
    let q = e.inner;
    let other_direction = CtKey6 {
        saddr: q.daddr,
        daddr: q.saddr,
        sport: q.dport,
        dport: q.sport,
        proto: q.proto,
        _pad: [0; 3],
    };
    // SAFETY: as in icmp::translate: alive until the program returns, and
    // any interleaving with an update is one valid translation or another.
    let Some(entry) = (unsafe { CONNTRACK6.get(other_direction) }) else {
        return IcmpVerdict::NotOurs;
    };
    if entry.flags & CT_F_KERNEL != 0 {
        return IcmpVerdict::NotOurs;
    }
    let svc_id = entry.svc_id;
    match rewrite(ctx, e, entry) {
        Ok(source) => IcmpVerdict::Translated {
            svc_id,
            source,
            client: entry.nat_daddr,
            local_source: source != e.outer_saddr && lb::is_node_address::<V6>(source),
        },
        Err(()) => IcmpVerdict::Failed(Reason::RewriteFailed),
    }
}

/// Writes `new` over the 16 bytes at `off`, adding the difference to the
/// ICMPv6 checksum; `pseudo`: the field is an outer address, which the
/// checksum covers through its pseudo-header.
#[inline(always)]
fn replace_addr(
    ctx: &TcContext,
    csum_off: usize,
    off: usize,
    mut old: Addr6,
    mut new: Addr6,
    pseudo: bool,
) -> Result<(), ()> {
    if old == new {
        return Ok(());
    }
    // SAFETY: two 16-byte stack arrays, of the sizes given.
    let diff =
        unsafe { bpf_csum_diff(old.as_mut_ptr().cast(), 16, new.as_mut_ptr().cast(), 16, 0) };
    if diff < 0 {
        return Err(());
    }
    let flags = if pseudo { BPF_F_PSEUDO_HDR as u64 } else { 0 };
    ctx.l4_csum_replace(csum_off, 0, diff as u32 as u64, flags)
        .map_err(|_| ())?;
    ctx.store(off, &new, 0).map_err(|_| ())
}

#[inline(always)]
fn replace_port(
    ctx: &TcContext,
    csum_off: usize,
    off: usize,
    old: u16,
    new: u16,
) -> Result<(), ()> {
    if old == new {
        return Ok(());
    }
    ctx.l4_csum_replace(csum_off, half(old), half(new), 2)
        .map_err(|_| ())?;
    ctx.store(off, &new.to_be_bytes(), 0).map_err(|_| ())
}

/// Rewrites the quoted packet to what it was before translation (the
/// reverse of what `other`, the other direction's entry, rewrites packets
/// into) and the error's addresses to match; gives the error's source as
/// it leaves.
#[inline(always)]
fn rewrite(ctx: &TcContext, e: &Icmp6Error, other: &CtValue6) -> Result<Addr6, ()> {
    let csum = e.icmp_off + 2;
    let inner_ip = e.inner_ip_off();
    let inner_l4 = inner_ip + IP6_HLEN;
    let q = &e.inner;
    let (src, dst) = (other.nat_daddr, other.nat_saddr);
    replace_addr(ctx, csum, inner_ip + 8, q.saddr, src, false)?;
    replace_addr(ctx, csum, inner_ip + 24, q.daddr, dst, false)?;
    replace_port(ctx, csum, inner_l4, q.sport, other.nat_dport)?;
    replace_port(ctx, csum, inner_l4 + 2, q.dport, other.nat_sport)?;
    // The error goes to the quoted packet's original sender.
    replace_addr(ctx, csum, IP6_DST_OFF, e.outer_daddr, src, true)?;
    // An error the backend sent itself names an address its receiver never
    // talked to: it is made to come from the frontend. Errors from routers
    // on the way keep their source.
    if e.outer_saddr == q.daddr && q.daddr != dst {
        replace_addr(ctx, csum, IP6_SRC_OFF, e.outer_saddr, dst, true)?;
        return Ok(dst);
    }
    Ok(e.outer_saddr)
}
