//! Connection tracking: both directions of a translated flow get an entry
//! that says the whole rewrite, so every later packet costs one lookup.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use service_common::*;

use crate::{
    family::Family,
    headers::{TCP_FIN, TCP_RST, TCP_SYN},
    maps::META,
    nat::Target,
    packet::Flow,
    ports::{self, PortRange},
    stats::count_reason,
};

#[inline(always)]
pub fn key_of<F: Family>(flow: &Flow<F>) -> CtKeyOf<F::Addr> {
    CtKeyOf {
        saddr: flow.saddr,
        daddr: flow.daddr,
        sport: flow.sport,
        dport: flow.dport,
        proto: flow.proto,
        _pad: [0; 3],
    }
}

pub enum CtLookup<F: Family> {
    Hit {
        target: Target<F>,
        svc_id: u32,
        reply: bool,
        local_source: bool,
        /// The flow is source-NATed to this node (either direction).
        snat: bool,
    },
    /// A flow the kernel's conntrack translates: pass it untouched.
    Kernel,
    /// A UDP request entry whose backend was gone: it is removed (counted
    /// as the flow event `StaleFlowMoved`) and the flow picks again.
    Stale,
    Miss,
}

#[inline(always)]
pub fn lookup<F: Family>(flow: &Flow<F>) -> CtLookup<F> {
    let Some(entry) = F::ct_ptr(&key_of(flow)) else {
        return CtLookup::Miss;
    };
    // SAFETY: the map's own value, alive until the program returns (an LRU
    // eviction frees it only after an RCU grace period); other CPUs writing
    // the same flow only race on last_seen_ns and the closing flag, which
    // any interleaving leaves valid.
    let entry = unsafe { &mut *entry };
    let reply = entry.flags & CT_F_REPLY != 0;
    // The agent removes UDP entries of deleted endpoints; checking here too
    // closes the window until it does (stale UDP conntrack blackholes clients).
    if !reply && flow.proto == IPPROTO_UDP && !F::has_backend(entry.backend_id) {
        F::ct_remove(&key_of(flow));
        count_reason(Reason::StaleFlowMoved);
        return CtLookup::Stale;
    }
    if entry.flags & CT_F_KERNEL != 0 {
        // A new SYN on the tuple of a kernel flow is a new connection
        // reusing the port (the old one is closing or gone in the kernel):
        // the rules that opened the old one may be gone, so this dataplane
        // opens it.
        if !reply && flow.proto == IPPROTO_TCP && flow.may_open() {
            F::ct_remove(&key_of(flow));
            return CtLookup::Miss;
        }
        touch(entry, flow);
        return CtLookup::Kernel;
    }
    // A SYN on a request entry whose reply entry is gone (the agent expired
    // the idle flow while this client reused its port, or the LRU evicted
    // one half): the backend would get the SYN, and its SYN-ACK, found by
    // no entry, would reach the client untranslated and be refused, on
    // every retransmission until the entry expired. The half flow goes and
    // the SYN opens the flow afresh.
    if !reply
        && flow.proto == IPPROTO_TCP
        && flow.may_open()
        && F::ct_ptr(&entry.partner_key(flow.proto)).is_none()
    {
        F::ct_remove(&key_of(flow));
        count_reason(Reason::HalfFlowReopened);
        return CtLookup::Miss;
    }
    touch(entry, flow);
    // The first reply makes the flow established: the agent then gives it
    // the long lifetime instead of the SYN one.
    if reply && entry.flags & CT_F_SYN_ONLY != 0 {
        entry.flags &= !CT_F_SYN_ONLY;
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

/// A packet of the flow was seen: it stays recent. FIN marks its own
/// direction closing (the other may still send after a half-close), RST
/// both: the connection is over, and a reply entry left established would
/// hold its tuple (and SNAT port) for the established lifetime. A SYN on a
/// closing entry is a new connection reusing the tuple (a client port
/// reused quickly), which must not inherit the old one's short lifetime.
#[inline(always)]
fn touch<F: Family>(entry: &mut CtValueOf<F::Addr>, flow: &Flow<F>) {
    // SAFETY: a helper call without arguments.
    entry.last_seen_ns = unsafe { bpf_ktime_get_ns() };
    if flow.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
        entry.flags |= CT_F_CLOSING;
    } else if flow.tcp_flags & TCP_SYN != 0 {
        entry.flags &= !CT_F_CLOSING;
    }
    if flow.tcp_flags & TCP_RST != 0 {
        if let Some(p) = F::ct_ptr(&entry.partner_key(flow.proto)) {
            // SAFETY: the map's own value (see lookup); only a flag is set.
            unsafe { (*p).flags |= CT_F_CLOSING };
        }
    }
}

/// For a packet that may open a flow, is to no frontend and has no entry:
/// a flow of its own between its two ends. If a translated flow's backend
/// sees the same tuple (its reply entry is keyed by this packet's tuple
/// reversed), the backend cannot hold both, so the translated flow is over
/// (its client reused the port to reach the backend directly), and its
/// reply entry would rewrite this flow's replies into its own: both of its
/// entries are removed. Its request entry only while it still translates
/// to this tuple: the client may since have reused it for a newer flow
/// through the frontend, to another backend. True: a flow was retired.
#[inline(always)]
pub fn retire_reused<F: Family>(flow: &Flow<F>) -> bool {
    let reply = CtKeyOf {
        saddr: flow.daddr,
        daddr: flow.saddr,
        sport: flow.dport,
        dport: flow.sport,
        proto: flow.proto,
        _pad: [0; 3],
    };
    let Some(e) = F::ct_ptr(&reply) else {
        return false;
    };
    // SAFETY: the map's own value, alive until the program returns; only
    // read, before either entry is removed.
    let e = unsafe { &*e };
    if e.flags & CT_F_REPLY == 0 {
        return false;
    }
    let request = e.partner_key(flow.proto);
    if let Some(r) = F::ct_ptr(&request) {
        // SAFETY: as above.
        let r = unsafe { &*r };
        if r.flags & CT_F_REPLY == 0
            && r.nat_saddr == flow.saddr
            && r.nat_daddr == flow.daddr
            && r.nat_sport == flow.sport
            && r.nat_dport == flow.dport
        {
            F::ct_remove(&request);
        }
    }
    F::ct_remove(&reply);
    true
}

/// The node address the agent configured as SNAT source.
#[inline(always)]
pub fn snat_address() -> Option<[u8; 4]> {
    let v = *META.get(META_SNAT_ADDR)?;
    (v != 0).then(|| (v as u32).to_ne_bytes())
}

/// The node's IPv6 SNAT source. Its two META slots are not written at
/// once: HI is read again after LO, and an address whose HI changed in
/// between (the agent clears HI before it writes LO) is none this time,
/// never half of the old address and half of the new one.
#[inline(always)]
pub fn snat_address6() -> Option<[u8; 16]> {
    let hi = meta_word(META_SNAT_ADDR6_HI)?;
    let lo = meta_word(META_SNAT_ADDR6_LO)?;
    if hi == 0 || meta_word(META_SNAT_ADDR6_HI)? != hi {
        return None;
    }
    let mut a = [0u8; 16];
    a[..8].copy_from_slice(&hi.to_ne_bytes());
    a[8..].copy_from_slice(&lo.to_ne_bytes());
    Some(a)
}

/// A META slot read from memory each time: the re-read of HI above must
/// not be folded into the first.
#[inline(always)]
fn meta_word(slot: u32) -> Option<u64> {
    let p = META.get_ptr(slot)?;
    // SAFETY: an in-bounds slot of an array map, alive while the program runs.
    Some(unsafe { core::ptr::read_volatile(p) })
}

#[inline(always)]
fn reply_key<F: Family>(flow: &Flow<F>, to: &Target<F>) -> CtKeyOf<F::Addr> {
    CtKeyOf {
        saddr: to.daddr,
        daddr: to.saddr,
        sport: to.dport,
        dport: to.sport,
        proto: flow.proto,
        _pad: [0; 3],
    }
}

/// A new TCP flow is an opening until its first reply.
#[inline(always)]
fn opening_flag<F: Family>(flow: &Flow<F>) -> u16 {
    if flow.proto == IPPROTO_TCP {
        CT_F_SYN_ONLY
    } else {
        0
    }
}

#[inline(always)]
fn reply_value<F: Family>(
    flow: &Flow<F>,
    backend_id: u32,
    svc_id: u32,
    flags: u16,
    now: u64,
) -> CtValueOf<F::Addr> {
    CtValueOf {
        last_seen_ns: now,
        nat_saddr: flow.daddr,
        nat_daddr: flow.saddr,
        nat_sport: flow.dport,
        nat_dport: flow.sport,
        backend_id,
        svc_id,
        flags: flags | CT_F_REPLY | opening_flag(flow),
        proto: flow.proto,
        _pad: 0,
    }
}

#[inline(always)]
fn request_value<F: Family>(
    flow: &Flow<F>,
    to: &Target<F>,
    backend_id: u32,
    svc_id: u32,
    flags: u16,
    now: u64,
) -> CtValueOf<F::Addr> {
    CtValueOf {
        last_seen_ns: now,
        nat_saddr: to.saddr,
        nat_daddr: to.daddr,
        nat_sport: to.sport,
        nat_dport: to.dport,
        backend_id,
        svc_id,
        flags: flags | opening_flag(flow),
        proto: flow.proto,
        _pad: 0,
    }
}

/// Records a new source-NATed flow: gives it a source port on the SNAT
/// address whose reply tuple is free (the client's own when the range holds
/// it, as netfilter's masquerade keeps it) and sets it in `to`.
#[inline(always)]
pub fn create_snat<F: Family>(
    flow: &Flow<F>,
    to: &mut Target<F>,
    backend_id: u32,
    svc_id: u32,
    reply_flags: u16,
) -> Result<(), Reason> {
    // SAFETY: a helper call without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let reply = reply_value(flow, backend_id, svc_id, CT_F_SNAT | reply_flags, now);
    to.sport = ports::claim_port::<F>(
        reply_key(flow, to),
        &reply,
        PortRange::configured(),
        Some(flow.sport),
    )
    .ok_or(Reason::SnatPortsExhausted)?;
    let request = request_value(
        flow,
        to,
        backend_id,
        svc_id,
        CT_F_SNAT | CT_F_LOCAL_SOURCE,
        now,
    );
    if !F::ct_insert(&key_of(flow), &request, 0) {
        F::ct_remove(&reply_key(flow, to));
        return Err(Reason::CtInsertFailed);
    }
    Ok(())
}

/// Records a new flow in both directions. The reply entry goes in first so
/// that a reply can never arrive to find only half of the flow. Its key must
/// be free: another flow holding the same reply tuple (one client port used
/// to reach two frontends that share a backend) would otherwise receive this
/// flow's replies. Then the client's port is rewritten to a free one, as
/// netfilter's NAT does for a clashing tuple; `Ok(true)` says so.
#[inline(always)]
pub fn create<F: Family>(
    flow: &Flow<F>,
    to: &mut Target<F>,
    backend_id: u32,
    svc_id: u32,
    hairpin: bool,
    reply_flags: u16,
) -> Result<bool, Reason> {
    // SAFETY: a helper call without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let reply = reply_value(flow, backend_id, svc_id, reply_flags, now);
    let mut moved = false;
    if !ports::claim::<F>(&reply_key(flow, to), &reply) {
        if holds_this_flow::<F>(&reply_key(flow, to), &reply) {
            // The same flow opening again (a SYN retransmitted after its
            // request entry was lost): it takes its own entry back.
            if !F::ct_insert(&reply_key(flow, to), &reply, 0) {
                return Err(Reason::CtInsertFailed);
            }
        } else {
            free_client_port(flow, to, &reply)?;
            moved = true;
        }
    }
    let rkey = reply_key(flow, to);
    // A hairpinned request leaves with the frontend address as its source.
    let flags = if hairpin && reply_flags & CT_F_LOCAL_SOURCE != 0 {
        CT_F_LOCAL_SOURCE
    } else {
        0
    };
    let request = request_value(flow, to, backend_id, svc_id, flags, now);
    if !F::ct_insert(&key_of(flow), &request, 0) {
        F::ct_remove(&rkey);
        return Err(Reason::CtInsertFailed);
    }
    Ok(moved)
}

/// Whether the entry at `key` is the reply entry `reply` would be: the same
/// client and frontend, so the same flow.
#[inline(always)]
fn holds_this_flow<F: Family>(key: &CtKeyOf<F::Addr>, reply: &CtValueOf<F::Addr>) -> bool {
    let Some(e) = F::ct_ptr(key) else {
        return false;
    };
    // SAFETY: fields read at once, while the kernel keeps the value alive.
    let e = unsafe { &*e };
    e.nat_saddr == reply.nat_saddr
        && e.nat_sport == reply.nat_sport
        && e.nat_daddr == reply.nat_daddr
        && e.nat_dport == reply.nat_dport
}

/// Moves a clashing flow's client port (as the backend sees it) to one whose
/// reply tuple is free, from the SNAT port range; the reply entry still
/// rewrites to the client's own port.
#[inline(always)]
fn free_client_port<F: Family>(
    flow: &Flow<F>,
    to: &mut Target<F>,
    reply: &CtValueOf<F::Addr>,
) -> Result<(), Reason> {
    to.sport = ports::claim_port::<F>(reply_key(flow, to), reply, PortRange::configured(), None)
        .ok_or(Reason::TupleClash)?;
    Ok(())
}
