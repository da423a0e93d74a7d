//! Rewriting addresses and ports in place, with incremental checksum updates
//! done by the kernel helpers (they also keep CHECKSUM_PARTIAL and
//! CHECKSUM_COMPLETE skbs consistent). The address field and the checksums
//! covering it are the family's (`Family::rewrite_addr`); ports are alike.
use aya_ebpf::{bindings::BPF_F_MARK_MANGLED_0, programs::TcContext};
use service_common::IPPROTO_UDP;

use crate::{csum::half, family::Family, packet::Flow};

/// The 4-tuple a packet is rewritten to.
#[derive(Clone, Copy)]
pub struct Target<F: Family> {
    pub saddr: F::Addr,
    pub sport: u16,
    pub daddr: F::Addr,
    pub dport: u16,
}

impl<F: Family> Target<F> {
    /// A placeholder for a step to fill in.
    #[inline(always)]
    pub fn none() -> Self {
        Target {
            saddr: F::ANY,
            sport: 0,
            daddr: F::ANY,
            dport: 0,
        }
    }
}

pub struct RewriteFailed;

#[inline(always)]
fn l4_flags<F: Family>(flow: &Flow<F>) -> u64 {
    // A zero UDP checksum means "none" and must stay zero; a computed zero
    // is written as 0xffff (IPv6's UDP never arrives here with zero).
    if flow.proto == IPPROTO_UDP {
        BPF_F_MARK_MANGLED_0 as u64
    } else {
        0
    }
}

#[inline(always)]
fn rewrite_addr<F: Family>(
    ctx: &TcContext,
    flow: &Flow<F>,
    field_off: usize,
    old: F::Addr,
    new: F::Addr,
) -> Result<(), RewriteFailed> {
    if old == new {
        return Ok(());
    }
    let l4 = Some((flow.l4_csum_off(), l4_flags(flow)));
    F::rewrite_addr(ctx, l4, field_off, old, new).map_err(|_| RewriteFailed)
}

#[inline(always)]
fn rewrite_port<F: Family>(
    ctx: &TcContext,
    flow: &Flow<F>,
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
pub fn rewrite_addresses<F: Family>(
    ctx: &TcContext,
    old: (F::Addr, F::Addr),
    new: (F::Addr, F::Addr),
) -> Result<(), RewriteFailed> {
    for (off, o, n) in [(F::SRC_OFF, old.0, new.0), (F::DST_OFF, old.1, new.1)] {
        if o != n {
            F::rewrite_addr(ctx, None, off, o, n).map_err(|_| RewriteFailed)?;
        }
    }
    Ok(())
}

/// Writes `to` into the packet's addresses and ports.
#[inline(always)]
pub fn rewrite_tuple<F: Family>(
    ctx: &TcContext,
    flow: &Flow<F>,
    to: &Target<F>,
) -> Result<(), RewriteFailed> {
    let l4 = flow.l4_off();
    rewrite_addr(ctx, flow, F::DST_OFF, flow.daddr, to.daddr)?;
    rewrite_addr(ctx, flow, F::SRC_OFF, flow.saddr, to.saddr)?;
    rewrite_port(ctx, flow, l4 + 2, flow.dport, to.dport)?;
    rewrite_port(ctx, flow, l4, flow.sport, to.sport)
}
