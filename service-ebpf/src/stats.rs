//! Per-CPU counters: no atomics on the packet path, summed by the agent.
//!
//! A packet's verdict reason is counted once, by the program's entry point,
//! from the `Outcome` its path returns; helpers return reasons rather than
//! count them. Flow events (a new flow, its SNAT, how affinity took part, a
//! stale UDP flow moved) are counted where the flow's state changes.
use service_common::{Reason, SvcStats};

use crate::{
    lb::AffinityUse,
    maps::{REASONS, SVC_STATS},
};

/// What a program does with a packet (`action`: its return code) and the
/// reason it is counted under; None for packets that are not the
/// dataplane's business, or that the next program counts.
pub struct Outcome<A> {
    pub action: A,
    pub reason: Option<Reason>,
}

impl<A> Outcome<A> {
    #[inline(always)]
    pub fn counted(action: A, reason: Reason) -> Self {
        Outcome {
            action,
            reason: Some(reason),
        }
    }

    #[inline(always)]
    pub fn uncounted(action: A) -> Self {
        Outcome {
            action,
            reason: None,
        }
    }

    /// Counts the verdict's reason and gives the program's return code.
    #[inline(always)]
    pub fn finish(self) -> A {
        if let Some(r) = self.reason {
            count_reason(r);
        }
        self.action
    }
}

#[inline(always)]
pub fn count_reason(reason: Reason) {
    if let Some(c) = REASONS.get_ptr_mut(reason as u32) {
        // SAFETY: an in-bounds slot of this CPU's copy of the array; programs
        // run with migration disabled, so no other CPU writes it (a nested
        // run on this CPU could at worst lose an increment).
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn with_svc(svc_id: u32, f: impl FnOnce(&mut SvcStats)) {
    if let Some(s) = SVC_STATS.get_ptr_mut(svc_id) {
        // SAFETY: as in count_reason: this CPU's slot, in bounds.
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

/// The events of a flow just recorded in conntrack.
#[inline(always)]
pub fn count_flow_opened(svc_id: u32, snat: bool, affinity: AffinityUse) {
    if snat {
        count_reason(Reason::SnatFlow);
    }
    match affinity {
        AffinityUse::NotApplicable => {}
        AffinityUse::Hit => count_reason(Reason::AffinityHit),
        AffinityUse::Fresh { stale } => {
            if stale {
                count_reason(Reason::AffinityStale);
            }
        }
    }
    count_reason(Reason::NewFlow);
    with_svc(svc_id, |s| s.new_flows += 1);
}

#[inline(always)]
pub fn count_rejected(svc_id: u32) {
    with_svc(svc_id, |s| s.rejected += 1);
}
