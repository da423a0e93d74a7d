//! Per-CPU counters: no atomics on the packet path, summed by the agent.
use service_common::{Reason, SvcStats};

use crate::maps::{REASONS, SVC_STATS};

#[inline(always)]
pub fn count_reason(reason: Reason) {
    if let Some(c) = REASONS.get_ptr_mut(reason as u32) {
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn with_svc(svc_id: u32, f: impl FnOnce(&mut SvcStats)) {
    if let Some(s) = SVC_STATS.get_ptr_mut(svc_id) {
        f(unsafe { &mut *s });
    }
}

#[inline(always)]
pub fn count_packet(svc_id: u32, bytes: u32) {
    with_svc(svc_id, |s| {
        s.packets += 1;
        s.bytes += bytes as u64;
    });
}

#[inline(always)]
pub fn count_new_flow(svc_id: u32) {
    with_svc(svc_id, |s| s.new_flows += 1);
}

#[inline(always)]
pub fn count_rejected(svc_id: u32) {
    with_svc(svc_id, |s| s.rejected += 1);
}
