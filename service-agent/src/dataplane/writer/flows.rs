//! Conntrack entries the agent removes: UDP flows whose backend left their
//! frontend, and flows idle past their timeout.
use std::collections::{BTreeSet, HashMap};

use service_common::*;

use crate::dataplane::maps::{EntryKey, Maps};

/// How long a conntrack entry lives without traffic.
pub const CT_TCP_TIMEOUT_NS: u64 = 6 * 3600 * 1_000_000_000;
pub const CT_TCP_CLOSING_TIMEOUT_NS: u64 = 10 * 1_000_000_000;
pub const CT_UDP_TIMEOUT_NS: u64 = 120 * 1_000_000_000;

/// Drops the conntrack entries of UDP flows whose backend left their
/// frontend (`removed` holds (svc_id, backend id) pairs), so clients that
/// keep sending move to a live backend instead of a blackhole. TCP flows
/// are left to finish (or fail) on their own.
pub(super) fn flush_udp_flows(t: &mut impl Maps, removed: &BTreeSet<(u32, u32)>) -> usize {
    if removed.is_empty() {
        return 0;
    }
    let doomed: Vec<CtKey> = t
        .conntrack()
        .into_iter()
        .filter(|(k, v)| k.proto == IPPROTO_UDP && removed.contains(&(v.svc_id, v.backend_id)))
        .map(|(k, _)| k)
        .collect();
    remove_flows(t, doomed)
}

fn remove_flows(t: &mut impl Maps, keys: Vec<CtKey>) -> usize {
    keys.into_iter()
        .filter(|k| t.remove(EntryKey::Conntrack(*k)).is_ok())
        .count()
}

fn idle(v: &CtValue, now_ns: u64) -> bool {
    let timeout = if v.proto == IPPROTO_TCP {
        if v.flags & CT_F_CLOSING != 0 {
            CT_TCP_CLOSING_TIMEOUT_NS
        } else {
            CT_TCP_TIMEOUT_NS
        }
    } else {
        CT_UDP_TIMEOUT_NS
    };
    now_ns.saturating_sub(v.last_seen_ns) > timeout
}

/// Removes conntrack entries idle past their timeout. Both directions of a
/// flow go together, and only when both are idle, so a flow whose replies
/// still run is never half-forgotten.
pub fn expire_conntrack(t: &mut impl Maps, now_ns: u64) -> usize {
    let entries: HashMap<CtKey, CtValue> = t.conntrack().into_iter().collect();
    let expired = entries
        .iter()
        .filter(|(k, v)| {
            // The partner's key is what the partner rewrites packets into, reversed.
            let partner = CtKey {
                saddr: v.nat_daddr,
                daddr: v.nat_saddr,
                sport: v.nat_dport,
                dport: v.nat_sport,
                proto: k.proto,
                _pad: [0; 3],
            };
            idle(v, now_ns) && entries.get(&partner).is_none_or(|p| idle(p, now_ns))
        })
        .map(|(k, _)| *k)
        .collect();
    remove_flows(t, expired)
}
