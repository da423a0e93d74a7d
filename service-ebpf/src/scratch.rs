//! Per-CPU room for one packet's IPv6 state. The verifier gives a call
//! chain 512 bytes of stack, and IPv6's flow, frontend and backend choice
//! (with the 40- to 56-byte keys and values the steps build beside them)
//! do not fit one chain; held here, they cost each step a pointer, and the
//! steps run as siblings under a thin caller (`tc.rs`), as Cilium keeps
//! large state in per-CPU scratch maps.
//!
//! A program runs to its end on its CPU before another tc program starts
//! there (softirq, or egress with bottom halves off), and a redirect is
//! carried out after the program returns, so a slot is never shared by two
//! packets at once; ingress and egress have a slot each all the same.
//! XDP has its own too: it finishes with a frame before tc sees it, but
//! generic XDP runs from the receive path that tc egress may also be
//! reached from, and a slot of its own leaves nothing to reason about.
use aya_ebpf::{btf_maps::PerCpuArray, macros::btf_map};

use crate::{family::V6, icmp6::Icmp6Error, lb::Frontend, opening::Choice, packet::Flow};

pub struct Scratch6 {
    pub flow: Flow<V6>,
    /// A later fragment's key, when the parse found one.
    pub frag: <V6 as crate::family::Family>::FragKey,
    /// An ICMPv6 error quoting a flow, when the parse found one.
    pub icmp: Icmp6Error,
    pub fe: Frontend<V6>,
    pub choice: Choice<V6>,
}

pub const SLOT_INGRESS: u32 = 0;
pub const SLOT_EGRESS: u32 = 1;
pub const SLOT_XDP: u32 = 2;

/// Not pinned: what it holds lives for one packet.
#[btf_map]
static SCRATCH6: PerCpuArray<Scratch6, 3> = PerCpuArray::new();

/// This CPU's slot `slot`.
#[inline(always)]
pub fn slot6(slot: u32) -> Option<&'static mut Scratch6> {
    let p = SCRATCH6.get_ptr_mut(slot)?;
    // SAFETY: this CPU's copy of an in-bounds slot, used by one packet at a
    // time (see above); the kernel keeps map memory alive for the program.
    Some(unsafe { &mut *p })
}
