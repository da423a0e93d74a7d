//! The flood guard, after Katran's `is_under_flood`: each CPU counts the new
//! flows it opens per second, and past the agent's threshold refuses more
//! until the next second. Every new flow costs two CONNTRACK entries, and
//! when the LRU map is full each insert evicts the least recently used
//! entry, which is an idle established flow as readily as a spoofed SYN's.
//! Bounding the rate at which openings can arrive bounds how many entries
//! unanswered openings can hold at once (the agent forgets them within the
//! SYN lifetime), so established flows keep theirs. A refused client
//! retransmits its SYN and gets in once a second has room.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use service_common::META_FLOOD_THRESHOLD;

use crate::maps::{FLOOD, META};

const WINDOW_NS: u64 = 1_000_000_000;

/// Whether this CPU may open one more flow now; counts the attempt.
#[inline(always)]
pub fn admit() -> bool {
    let threshold = META.get(META_FLOOD_THRESHOLD).copied().unwrap_or(0);
    if threshold == 0 {
        return true;
    }
    let Some(w) = FLOOD.get_ptr_mut(0) else {
        return true;
    };
    // SAFETY: this CPU's own slot, alive until the program returns; a
    // program nested on the same CPU could only make the count miss one.
    let w = unsafe { &mut *w };
    // SAFETY: a helper call without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    if now.wrapping_sub(w.start_ns) >= WINDOW_NS {
        w.start_ns = now;
        w.new_flows = 0;
    }
    w.new_flows += 1;
    w.new_flows <= threshold
}
