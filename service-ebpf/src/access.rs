//! Reading packet bytes the same way from tc and XDP, so both programs share
//! one parser. tc reads through `bpf_skb_load_bytes` (headers outside the
//! linear area are still seen); XDP reads the frame directly, after a bounds
//! check the verifier tracks.
use core::{mem::size_of, ptr};

use aya_ebpf::programs::{TcContext, XdpContext};

pub trait Packet {
    /// A copy of the `T` at byte `off`, if the packet holds all of it.
    fn read<T: Copy>(&self, off: usize) -> Option<T>;
    /// Bytes in the packet, from the Ethernet header on.
    fn size(&self) -> usize;
}

impl Packet for TcContext {
    #[inline(always)]
    fn read<T: Copy>(&self, off: usize) -> Option<T> {
        self.load::<T>(off).ok()
    }

    #[inline(always)]
    fn size(&self) -> usize {
        self.len() as usize
    }
}

/// The interface the skb arrived on.
#[inline(always)]
pub fn skb_ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: `skb` is the context the program was called with, valid for
    // the whole run; the verifier allows reading its ifindex.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// A pointer to the `T` at byte `off` of an XDP frame, if the frame holds all of it.
#[inline(always)]
pub fn xdp_ptr<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    // The frame's bounds are read afresh (volatile) for each access: the
    // verifier only accepts an access it sees checked against data_end, and
    // the compiler would otherwise drop a check it can prove from earlier
    // ones (the IPv4 total length against the frame size), which the
    // verifier cannot follow.
    // SAFETY: `ctx.ctx` is the xdp_md the program was called with, valid for
    // the whole run; reading its data and data_end fields is what the
    // verifier expects of packet access.
    let (data, end) = unsafe {
        (
            ptr::read_volatile(&(*ctx.ctx).data) as usize,
            ptr::read_volatile(&(*ctx.ctx).data_end) as usize,
        )
    };
    let at = data + off;
    if at + size_of::<T>() > end {
        return None;
    }
    Some(at as *mut T)
}

impl Packet for XdpContext {
    #[inline(always)]
    fn read<T: Copy>(&self, off: usize) -> Option<T> {
        // A one-byte check `at + 1 > end` is compiled to `at >= end`, from
        // which the verifier learns no readable range: read two bytes or more.
        const { assert!(size_of::<T>() >= 2) };
        let p = xdp_ptr::<T>(self, off)?;
        // SAFETY: xdp_ptr checked that the `size_of::<T>()` bytes at `p` lie
        // before data_end (the verifier rejects the program otherwise); the
        // headers read are byte arrays, valid for any bit pattern and any
        // alignment, and read unaligned.
        Some(unsafe { ptr::read_unaligned(p) })
    }

    #[inline(always)]
    fn size(&self) -> usize {
        self.data_end() - self.data()
    }
}
