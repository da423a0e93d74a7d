//! Routing a translated packet: one FIB lookup for tc and XDP, and the tc
//! side's redirect to the next hop. tc needs it when the rewritten source is
//! one of this node's own addresses (NodePort replies, source-NATed
//! requests): the IP input path would drop such a packet as a martian, since
//! a forwarded packet may not claim a local source.
use core::{ffi::c_void, mem::size_of};

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, TC_ACT_REDIRECT,
        bpf_fib_lookup,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect_neigh},
    programs::TcContext,
};

use crate::{access::skb_ifindex, family::Family};

/// What a packet sent from `saddr` to `daddr` needs to leave.
pub struct Hop {
    /// The egress interface.
    pub ifindex: u32,
    /// Whether the next hop's MAC is known; without it only the kernel's
    /// neighbour code (tc's redirect_neigh) can send the packet.
    pub resolved: bool,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

/// The routing table's answer for the packet `ctx` (an skb or an xdp_md, as
/// the helper takes either) arriving on `ifindex`, or None without a route.
#[inline(always)]
pub fn route<F: Family>(
    ctx: *mut c_void,
    ifindex: u32,
    (saddr, daddr): (F::Addr, F::Addr),
    proto: u8,
    ip_len: u16,
) -> Option<Hop> {
    // SAFETY: bpf_fib_lookup is a plain C struct of integers, for which all
    // zeroes is a valid value (and what the helper expects in unused fields).
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    F::fib_addrs(&mut p, saddr, daddr);
    p.l4_protocol = proto;
    p.__bindgen_anon_1.tot_len = ip_len;
    p.ifindex = ifindex;
    // SAFETY: `ctx` is the program's own context pointer and `p` a stack
    // struct of the size passed; the verifier checks both.
    let rc = unsafe { fib_lookup(ctx, &mut p, size_of::<bpf_fib_lookup>() as i32, 0) };
    let resolved = match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => true,
        BPF_FIB_LKUP_RET_NO_NEIGH => false,
        _ => return None,
    };
    Some(Hop {
        ifindex: p.ifindex,
        resolved,
        smac: p.smac,
        dmac: p.dmac,
    })
}

/// Redirects the packet to its egress interface, letting the kernel fill in
/// the neighbour's MAC. Falls back to the normal path (TC_ACT_OK) when there
/// is no usable route.
#[inline(always)]
pub fn to_next_hop<F: Family>(
    ctx: &TcContext,
    saddr: F::Addr,
    daddr: F::Addr,
    proto: u8,
    ip_len: u16,
) -> i32 {
    let ifindex = skb_ifindex(ctx);
    let Some(hop) = route::<F>(ctx.skb.skb.cast(), ifindex, (saddr, daddr), proto, ip_len) else {
        return TC_ACT_OK as i32;
    };
    // SAFETY: a helper call without pointers; the kernel checks the ifindex.
    let r = unsafe { bpf_redirect_neigh(hop.ifindex, core::ptr::null_mut(), 0, 0) };
    if r == TC_ACT_REDIRECT as i64 {
        TC_ACT_REDIRECT as i32
    } else {
        TC_ACT_OK as i32
    }
}
