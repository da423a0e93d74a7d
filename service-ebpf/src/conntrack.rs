//! Connection tracking: both directions of a translated flow get an entry
//! that says the whole rewrite, so every later packet costs one lookup.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use service_common::*;

use crate::{
    maps::{BACKENDS, CONNTRACK},
    nat::Target,
    packet::{Flow, TCP_FIN, TCP_RST},
};

#[inline(always)]
pub fn key_of(flow: &Flow) -> CtKey {
    CtKey {
        saddr: flow.saddr,
        daddr: flow.daddr,
        sport: flow.sport,
        dport: flow.dport,
        proto: flow.proto,
        _pad: [0; 3],
    }
}

pub enum CtLookup {
    Hit {
        target: Target,
        svc_id: u32,
        reply: bool,
    },
    /// A UDP request entry whose backend is gone: the flow must pick again.
    Stale,
    Miss,
}

#[inline(always)]
pub fn lookup(flow: &Flow) -> CtLookup {
    let Some(entry) = CONNTRACK.get_ptr_mut(key_of(flow)) else {
        return CtLookup::Miss;
    };
    let entry = unsafe { &mut *entry };
    let reply = entry.flags & CT_F_REPLY != 0;
    // The agent removes UDP entries of deleted endpoints; checking here too
    // closes the window until it does (stale UDP conntrack blackholes clients).
    if !reply && flow.proto == IPPROTO_UDP && unsafe { BACKENDS.get(entry.backend_id) }.is_none() {
        let _ = CONNTRACK.remove(key_of(flow));
        return CtLookup::Stale;
    }
    entry.last_seen_ns = unsafe { bpf_ktime_get_ns() };
    if flow.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        entry.flags |= CT_F_CLOSING;
    }
    CtLookup::Hit {
        target: Target {
            saddr: entry.nat_saddr,
            sport: entry.nat_sport,
            daddr: entry.nat_daddr,
            dport: entry.nat_dport,
        },
        svc_id: entry.svc_id,
        reply,
    }
}

/// Records a new flow in both directions. The reply entry goes in first so
/// that a reply can never arrive to find only half of the flow.
#[inline(always)]
pub fn create(
    flow: &Flow,
    to: &Target,
    backend_id: u32,
    svc_id: u32,
    hairpin: bool,
) -> Result<(), ()> {
    let now = unsafe { bpf_ktime_get_ns() };
    let base = if hairpin { CT_F_HAIRPIN } else { 0 };
    let reply_key = CtKey {
        saddr: to.daddr,
        daddr: to.saddr,
        sport: to.dport,
        dport: to.sport,
        proto: flow.proto,
        _pad: [0; 3],
    };
    let reply = CtValue {
        last_seen_ns: now,
        nat_saddr: flow.daddr,
        nat_daddr: flow.saddr,
        nat_sport: flow.dport,
        nat_dport: flow.sport,
        backend_id,
        svc_id,
        flags: base | CT_F_REPLY,
        proto: flow.proto,
        _pad: 0,
    };
    CONNTRACK.insert(reply_key, reply, 0).map_err(|_| ())?;
    let request = CtValue {
        last_seen_ns: now,
        nat_saddr: to.saddr,
        nat_daddr: to.daddr,
        nat_sport: to.sport,
        nat_dport: to.dport,
        backend_id,
        svc_id,
        flags: base,
        proto: flow.proto,
        _pad: 0,
    };
    CONNTRACK.insert(key_of(flow), request, 0).map_err(|_| {
        let _ = CONNTRACK.remove(reply_key);
    })
}
