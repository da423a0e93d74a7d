//! Sending a translated packet straight to its next hop. Needed when the
//! rewritten source is one of this node's own addresses (NodePort replies,
//! source-NATed requests): the IP input path would drop such a packet as a
//! martian, since a forwarded packet may not claim a local source.
use core::mem::{size_of, zeroed};

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_OK, TC_ACT_REDIRECT,
        bpf_fib_lookup,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect_neigh},
    programs::TcContext,
};

const AF_INET: u8 = 2;

/// Looks up the route to `daddr` and redirects the packet to its egress
/// interface, letting the kernel fill in the neighbour's MAC. Falls back to
/// the normal path (TC_ACT_OK) when there is no usable route.
#[inline(always)]
pub fn to_next_hop(ctx: &TcContext, saddr: [u8; 4], daddr: [u8; 4], proto: u8, ip_len: u16) -> i32 {
    let mut p: bpf_fib_lookup = unsafe { zeroed() };
    p.family = AF_INET;
    p.l4_protocol = proto;
    p.__bindgen_anon_1.tot_len = ip_len;
    p.ifindex = unsafe { (*ctx.skb.skb).ifindex };
    p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(saddr);
    p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(daddr);
    let rc = unsafe {
        fib_lookup(
            ctx.skb.skb.cast(),
            &mut p,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 && rc != BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        return TC_ACT_OK as i32;
    }
    let r = unsafe { bpf_redirect_neigh(p.ifindex, core::ptr::null_mut(), 0, 0) };
    if r == TC_ACT_REDIRECT as i64 {
        TC_ACT_REDIRECT as i32
    } else {
        TC_ACT_OK as i32
    }
}
