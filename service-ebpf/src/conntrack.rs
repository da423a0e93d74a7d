//! Connection tracking: both directions of a translated flow get an entry
//! that says the whole rewrite, so every later packet costs one lookup.
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
};
use service_common::*;

use crate::{
    maps::{BACKENDS, CONNTRACK, META},
    nat::Target,
    packet::{Flow, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
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
        local_source: bool,
        /// The flow is source-NATed to this node (either direction).
        snat: bool,
    },
    /// A flow the kernel's conntrack translates: pass it untouched.
    Kernel,
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
    if entry.flags & CT_F_KERNEL != 0 {
        // A new SYN on the tuple of a kernel flow is a new connection
        // reusing the port (the old one is closing or gone in the kernel):
        // the rules that opened the old one may be gone, so this dataplane
        // opens it.
        if !reply && flow.proto == IPPROTO_TCP && flow.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
            let _ = CONNTRACK.remove(key_of(flow));
            return CtLookup::Miss;
        }
        entry.last_seen_ns = unsafe { bpf_ktime_get_ns() };
        if flow.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            entry.flags |= CT_F_CLOSING;
        }
        return CtLookup::Kernel;
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
        local_source: entry.flags & CT_F_LOCAL_SOURCE != 0,
        snat: entry.flags & CT_F_SNAT != 0,
    }
}

/// Ports tried for one SNAT flow before giving up.
const SNAT_TRIES: u32 = 8;

/// The node address the agent configured as SNAT source.
#[inline(always)]
pub fn snat_address() -> Option<[u8; 4]> {
    let v = *META.get(META_SNAT_ADDR)?;
    (v != 0).then(|| (v as u32).to_ne_bytes())
}

#[inline(always)]
fn reply_key(flow: &Flow, to: &Target) -> CtKey {
    CtKey {
        saddr: to.daddr,
        daddr: to.saddr,
        sport: to.dport,
        dport: to.sport,
        proto: flow.proto,
        _pad: [0; 3],
    }
}

#[inline(always)]
fn reply_value(flow: &Flow, backend_id: u32, svc_id: u32, flags: u16, now: u64) -> CtValue {
    CtValue {
        last_seen_ns: now,
        nat_saddr: flow.daddr,
        nat_daddr: flow.saddr,
        nat_sport: flow.dport,
        nat_dport: flow.sport,
        backend_id,
        svc_id,
        flags: flags | CT_F_REPLY,
        proto: flow.proto,
        _pad: 0,
    }
}

#[inline(always)]
fn request_value(
    flow: &Flow,
    to: &Target,
    backend_id: u32,
    svc_id: u32,
    flags: u16,
    now: u64,
) -> CtValue {
    CtValue {
        last_seen_ns: now,
        nat_saddr: to.saddr,
        nat_daddr: to.daddr,
        nat_sport: to.sport,
        nat_dport: to.dport,
        backend_id,
        svc_id,
        flags,
        proto: flow.proto,
        _pad: 0,
    }
}

/// Records a new source-NATed flow: picks a free source port on the SNAT
/// address by random probing (the reply key must be unique, so the insert
/// refuses a port in use) and sets it in `to`.
#[inline(always)]
pub fn create_snat(
    flow: &Flow,
    to: &mut Target,
    backend_id: u32,
    svc_id: u32,
    reply_flags: u16,
) -> Result<(), ()> {
    let now = unsafe { bpf_ktime_get_ns() };
    let reply = reply_value(flow, backend_id, svc_id, CT_F_SNAT | reply_flags, now);
    for _ in 0..SNAT_TRIES {
        to.sport =
            SNAT_PORT_MIN + (unsafe { bpf_get_prandom_u32() } % SNAT_PORT_COUNT as u32) as u16;
        if CONNTRACK
            .insert(reply_key(flow, to), reply, BPF_NOEXIST as u64)
            .is_ok()
        {
            let request = request_value(
                flow,
                to,
                backend_id,
                svc_id,
                CT_F_SNAT | CT_F_LOCAL_SOURCE,
                now,
            );
            return CONNTRACK.insert(key_of(flow), request, 0).map_err(|_| {
                let _ = CONNTRACK.remove(reply_key(flow, to));
            });
        }
    }
    Err(())
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
    reply_flags: u16,
) -> Result<(), ()> {
    let now = unsafe { bpf_ktime_get_ns() };
    let mut flags = if hairpin { CT_F_HAIRPIN } else { 0 };
    let rkey = reply_key(flow, to);
    CONNTRACK
        .insert(
            rkey,
            reply_value(flow, backend_id, svc_id, flags | reply_flags, now),
            0,
        )
        .map_err(|_| ())?;
    // A hairpinned request leaves with the frontend address as its source.
    if hairpin && reply_flags & CT_F_LOCAL_SOURCE != 0 {
        flags |= CT_F_LOCAL_SOURCE;
    }
    let request = request_value(flow, to, backend_id, svc_id, flags, now);
    CONNTRACK.insert(key_of(flow), request, 0).map_err(|_| {
        let _ = CONNTRACK.remove(rkey);
    })
}
