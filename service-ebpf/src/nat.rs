//! Rewriting addresses and ports in place, with incremental checksum updates
//! done by the kernel helpers (they also keep CHECKSUM_PARTIAL and
//! CHECKSUM_COMPLETE skbs consistent).
use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use service_common::IPPROTO_UDP;

use crate::{
    csum::{half, word},
    headers::{IP_CSUM_OFF, IP_DST_OFF, IP_SRC_OFF},
    packet::Flow,
};

/// The 4-tuple a packet is rewritten to.
#[derive(Clone, Copy)]
pub struct Target {
    pub saddr: [u8; 4],
    pub sport: u16,
    pub daddr: [u8; 4],
    pub dport: u16,
}

pub struct RewriteFailed;

#[inline(always)]
fn l4_flags(flow: &Flow) -> u64 {
    // A zero UDP checksum means "none" and must stay zero; a computed zero is written as 0xffff.
    if flow.proto == IPPROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    }
}

#[inline(always)]
fn rewrite_addr(
    ctx: &TcContext,
    flow: &Flow,
    field_off: usize,
    old: [u8; 4],
    new: [u8; 4],
) -> Result<(), RewriteFailed> {
    if old == new {
        return Ok(());
    }
    let (o, n) = (word(old), word(new));
    let l4 = l4_flags(flow) | BPF_F_PSEUDO_HDR as u64 | 4;
    ctx.l4_csum_replace(flow.l4_csum_off(), o, n, l4)
        .map_err(|_| RewriteFailed)?;
    ctx.l3_csum_replace(IP_CSUM_OFF, o, n, 4)
        .map_err(|_| RewriteFailed)?;
    ctx.store(field_off, &new, 0).map_err(|_| RewriteFailed)
}

#[inline(always)]
fn rewrite_port(
    ctx: &TcContext,
    flow: &Flow,
    field_off: usize,
    old: u16,
    new: u16,
) -> Result<(), RewriteFailed> {
    if old == new {
        return Ok(());
    }
    let (o, n) = (half(old), half(new));
    ctx.l4_csum_replace(flow.l4_csum_off(), o, n, l4_flags(flow) | 2)
        .map_err(|_| RewriteFailed)?;
    ctx.store(field_off, &new.to_be_bytes(), 0)
        .map_err(|_| RewriteFailed)
}

/// Rewrites only the addresses (a later fragment has no L4 header to fix).
#[inline(always)]
pub fn rewrite_addresses(
    ctx: &TcContext,
    old: (&[u8; 4], &[u8; 4]),
    new: (&[u8; 4], &[u8; 4]),
) -> Result<(), RewriteFailed> {
    for (off, o, n) in [(IP_SRC_OFF, old.0, new.0), (IP_DST_OFF, old.1, new.1)] {
        if o != n {
            ctx.l3_csum_replace(IP_CSUM_OFF, word(*o), word(*n), 4)
                .map_err(|_| RewriteFailed)?;
            ctx.store(off, n, 0).map_err(|_| RewriteFailed)?;
        }
    }
    Ok(())
}

/// Writes `to` into the packet's addresses and ports.
#[inline(always)]
pub fn rewrite_tuple(ctx: &TcContext, flow: &Flow, to: &Target) -> Result<(), RewriteFailed> {
    let l4 = flow.l4_off();
    rewrite_addr(ctx, flow, IP_DST_OFF, flow.daddr, to.daddr)?;
    rewrite_addr(ctx, flow, IP_SRC_OFF, flow.saddr, to.saddr)?;
    rewrite_port(ctx, flow, l4 + 2, flow.dport, to.dport)?;
    rewrite_port(ctx, flow, l4, flow.sport, to.sport)
}
