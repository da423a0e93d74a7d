//! Conntrack entries the agent removes: UDP flows whose backend left their
//! frontend, and flows idle past their timeout.
use std::{
    collections::{BTreeSet, HashMap, HashSet},
    hash::Hash,
};

use service_common::*;

use crate::{
    dataplane::maps::{EntryKey, Maps, Walk},
    error_chain::error_chain,
};

/// How long a conntrack entry lives without traffic.
pub const CT_TCP_TIMEOUT_NS: u64 = 6 * 3600 * 1_000_000_000;
pub const CT_TCP_SYN_TIMEOUT_NS: u64 = 60 * 1_000_000_000;
pub const CT_TCP_CLOSING_TIMEOUT_NS: u64 = 10 * 1_000_000_000;
pub const CT_UDP_TIMEOUT_NS: u64 = 120 * 1_000_000_000;

/// How long a flow may sit idle, by its state (the kernel's conntrack and
/// Cilium keep the same shape): an opening no reply has answered is
/// forgotten within a minute, so unanswered or spoofed SYNs do not hold
/// conntrack entries and SNAT ports for hours; an established TCP flow lives
/// long; after FIN or RST briefly; UDP moderately, refreshed by either
/// direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetimes {
    pub tcp_syn_ns: u64,
    pub tcp_established_ns: u64,
    pub tcp_closing_ns: u64,
    pub udp_ns: u64,
}

impl Default for Lifetimes {
    fn default() -> Self {
        Self {
            tcp_syn_ns: CT_TCP_SYN_TIMEOUT_NS,
            tcp_established_ns: CT_TCP_TIMEOUT_NS,
            tcp_closing_ns: CT_TCP_CLOSING_TIMEOUT_NS,
            udp_ns: CT_UDP_TIMEOUT_NS,
        }
    }
}

/// What a pass over CONNTRACK did: entries removed, and what failed (the
/// walk, each removal), for the log, `/metrics` and `/healthz`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FlowPass {
    /// Entries the walk read.
    pub entries: usize,
    pub removed: usize,
    pub errors: Vec<String>,
}

/// Drops the conntrack entries of UDP flows whose backend left their
/// frontend (`removed` holds (svc_id, backend id) pairs), so clients that
/// keep sending move to a live backend instead of a blackhole. TCP flows
/// are left to finish (or fail) on their own.
pub(super) fn flush_udp_flows(t: &mut impl Maps, removed: &BTreeSet<(u32, u32)>) -> FlowPass {
    if removed.is_empty() {
        return FlowPass::default();
    }
    let walk = t.conntrack();
    let v4 = flush_of(t, &walk, removed, Ct4);
    let walk = t.conntrack6();
    v4.and(flush_of(t, &walk, removed, Ct6))
}

/// One family's CONNTRACK map, as the agent's passes over it see it.
trait CtMap: Copy {
    type Addr: Copy + Eq + Hash;
    const NAME: &'static str;
    fn key(k: CtKeyOf<Self::Addr>) -> EntryKey;
    /// The entry at `k` as it is now.
    fn current(t: &impl Maps, k: &CtKeyOf<Self::Addr>) -> Option<CtValueOf<Self::Addr>>;
}

#[derive(Clone, Copy)]
struct Ct4;
#[derive(Clone, Copy)]
struct Ct6;

impl CtMap for Ct4 {
    type Addr = Addr4;
    const NAME: &'static str = MAP_CONNTRACK;
    fn key(k: CtKey) -> EntryKey {
        EntryKey::Conntrack(k)
    }
    fn current(t: &impl Maps, k: &CtKey) -> Option<CtValue> {
        t.conntrack_entry(k)
    }
}

impl CtMap for Ct6 {
    type Addr = Addr6;
    const NAME: &'static str = MAP_CONNTRACK6;
    fn key(k: CtKey6) -> EntryKey {
        EntryKey::Conntrack6(k)
    }
    fn current(t: &impl Maps, k: &CtKey6) -> Option<CtValue6> {
        t.conntrack6_entry(k)
    }
}

impl FlowPass {
    /// This pass and `other` (of the other family's map) as one.
    fn and(mut self, other: FlowPass) -> FlowPass {
        self.entries += other.entries;
        self.removed += other.removed;
        self.errors.extend(other.errors);
        self
    }
}

type CtWalk<M> = Walk<(CtKeyOf<<M as CtMap>::Addr>, CtValueOf<<M as CtMap>::Addr>)>;

fn flush_of<M: CtMap>(
    t: &mut impl Maps,
    walk: &CtWalk<M>,
    removed: &BTreeSet<(u32, u32)>,
    _: M,
) -> FlowPass {
    let doomed: Vec<_> = walk
        .entries
        .iter()
        .filter(|(k, v)| k.proto == IPPROTO_UDP && removed.contains(&(v.svc_id, v.backend_id)))
        .map(|(k, _)| *k)
        .collect();
    remove_flows::<M, _>(t, walk, doomed, |_, _| true)
}

/// Removes the entries at `keys` for which `still` (asked just before each
/// removal) holds.
fn remove_flows<M: CtMap, T: Maps>(
    t: &mut T,
    walk: &CtWalk<M>,
    keys: Vec<CtKeyOf<M::Addr>>,
    mut still: impl FnMut(&T, &CtKeyOf<M::Addr>) -> bool,
) -> FlowPass {
    let mut pass = FlowPass {
        entries: walk.entries.len(),
        removed: 0,
        errors: walk
            .errors
            .iter()
            .map(|e| format!("walking {}: {}", M::NAME, error_chain(e)))
            .collect(),
    };
    let mut failed = 0;
    let mut first = None;
    for k in keys {
        if !still(t, &k) {
            continue;
        }
        match t.remove(M::key(k)) {
            Ok(()) => pass.removed += 1,
            Err(e) => {
                failed += 1;
                first.get_or_insert(e);
            }
        }
    }
    // One line for many failed removals: they share their cause.
    if let Some(e) = first {
        pass.errors.push(format!(
            "removing {failed} {} entries failed, the first with: {}",
            M::NAME,
            error_chain(&e)
        ));
    }
    pass
}

impl Lifetimes {
    /// The idle time allowed to the entry `v`; `opening`: the flow has not
    /// been answered yet. Each direction's FIN or RST shortens its own
    /// entry only: after a half-close the other direction may still send.
    fn of<A>(&self, v: &CtValueOf<A>, opening: bool) -> u64 {
        if v.proto != IPPROTO_TCP {
            self.udp_ns
        } else if v.flags & CT_F_CLOSING != 0 {
            self.tcp_closing_ns
        } else if opening {
            self.tcp_syn_ns
        } else {
            self.tcp_established_ns
        }
    }
}

/// An opening stays one until the program sees a reply, which clears the
/// mark on the reply entry; entries without the mark (also those written by
/// agents before it existed) are established.
fn opening<A>(v: &CtValueOf<A>, partner: Option<&CtValueOf<A>>) -> bool {
    v.flags & CT_F_SYN_ONLY != 0 && partner.is_none_or(|p| p.flags & CT_F_SYN_ONLY != 0)
}

/// Removes conntrack entries idle past their lifetime. Both directions of a
/// flow go together, and only when both are idle, so a flow whose replies
/// still run is never half-forgotten.
pub fn expire_conntrack(t: &mut impl Maps, now_ns: u64, lifetimes: &Lifetimes) -> FlowPass {
    let walk = t.conntrack();
    let v4 = expire_of(t, &walk, now_ns, lifetimes, Ct4);
    let walk = t.conntrack6();
    v4.and(expire_of(t, &walk, now_ns, lifetimes, Ct6))
}

fn expire_of<M: CtMap, T: Maps>(
    t: &mut T,
    walk: &CtWalk<M>,
    now_ns: u64,
    lifetimes: &Lifetimes,
    _: M,
) -> FlowPass {
    let entries: HashMap<CtKeyOf<M::Addr>, CtValueOf<M::Addr>> =
        walk.entries.iter().copied().collect();
    let idle = |v: &CtValueOf<M::Addr>, limit: u64| now_ns.saturating_sub(v.last_seen_ns) > limit;
    let (requests, replies): (Vec<_>, Vec<_>) = entries
        .iter()
        .filter(|(k, v)| {
            let partner = entries.get(&v.partner_key(k.proto));
            let opening = opening(v, partner);
            idle(v, lifetimes.of(v, opening))
                && partner.is_none_or(|p| idle(p, lifetimes.of(p, opening)))
        })
        .map(|(k, _)| *k)
        .partition(|k| entries[k].flags & CT_F_REPLY == 0);
    // The programs go on while the agent walks and removes: a client may
    // reuse an expired flow's port meanwhile, its SYN touching the request
    // entry or, the request entry gone, rewriting the reply entry for the
    // new flow. Removing by the walk's verdict would take half of that live
    // flow, and its SYN-ACKs would reach the client untranslated. So an
    // entry goes only if it is still as walked, a request entry used since
    // keeps its reply entry, and request entries go first: a SYN arriving
    // between the two halves finds no request entry and writes a reply
    // entry that the check then keeps.
    let as_walked = |t: &T, k: &CtKeyOf<M::Addr>| M::current(t, k) == entries.get(k).copied();
    let mut alive = HashSet::new();
    let keys = requests.into_iter().chain(replies).collect();
    remove_flows::<M, T>(t, walk, keys, |t, k| {
        let v = &entries[k];
        if v.flags & CT_F_REPLY != 0 {
            return !alive.contains(k) && as_walked(t, k);
        }
        let still = as_walked(t, k);
        if !still {
            alive.insert(v.partner_key(k.proto));
        }
        still
    })
}
