//! Finding the frontend a packet is addressed to and picking its backend:
//! a fixed number of hash lookups, whatever the number of Services or
//! backends. Takes addresses and ports, not a packet, so a program that sees
//! a socket call rather than a packet can use it too.
use aya_ebpf::{
    btf_maps::lpm_trie::Key,
    helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns},
};
use service_common::*;

use crate::maps::{AFFINITY, AFFINITY_MATCH, BACKENDS, NODE_ADDRS, SERVICES, SOURCE_RANGES};

pub struct Frontend {
    pub key: ServiceKey,
    pub master: ServiceValue,
    /// The packet is addressed to one of this node's own addresses.
    pub to_node_addr: bool,
}

/// Where a packet or socket call that may open a flow comes from, as far
/// as `externalTrafficPolicy: Local` cares: that policy applies to traffic
/// from outside the cluster only.
#[derive(Clone, Copy)]
pub enum Origin {
    /// A pod's interface or one of the node's own sockets: inside the cluster.
    Inside,
    /// An external interface: inside the cluster when the source is in
    /// the cluster's pod ranges (`--cluster-cidr`).
    Wire([u8; 4]),
}

impl Origin {
    #[inline(always)]
    fn is_inside(self) -> bool {
        match self {
            Origin::Inside => true,
            Origin::Wire(saddr) => in_ranges(CLUSTER_CIDRS_ID, saddr),
        }
    }
}

#[inline(always)]
fn master_of(addr: [u8; 4], port: u16, proto: u8, scope: u8) -> Option<Frontend> {
    let key = ServiceKey {
        addr,
        port,
        proto,
        scope,
        slot: 0,
        _pad: 0,
    };
    // SAFETY: copied out at once; the kernel keeps a looked-up value alive
    // until the program returns, and the agent replaces a master entry with
    // one map update, so the copy is one whole version of it.
    let master = unsafe { SERVICES.get(key) }?;
    Some(Frontend {
        key,
        master: *master,
        to_node_addr: false,
    })
}

/// Whether `addr` is one of this node's addresses (NODE_ADDRS).
#[inline(always)]
pub fn is_node_address(addr: [u8; 4]) -> bool {
    // SAFETY: only the presence of the entry is used, never its value.
    unsafe { NODE_ADDRS.get(addr) }.is_some()
}

/// The frontend at `daddr:dport/proto`: a ClusterIP / external address
/// entry first, then a NodePort entry when the destination is a node
/// address; its in-cluster entry set when it has one and `from` is inside
/// the cluster. (Only such frontends pay for the source check.)
#[inline(always)]
pub fn lookup_frontend(daddr: [u8; 4], dport: u16, proto: u8, from: Origin) -> Option<Frontend> {
    let to_node_addr = is_node_address(daddr);
    let mut found = match master_of(daddr, dport, proto, SCOPE_ALL) {
        Some(f) => f,
        None if to_node_addr => master_of([0; 4], dport, proto, SCOPE_ALL)?,
        None => return None,
    };
    if found.master.flags & SVC_F_IN_CLUSTER != 0 && from.is_inside() {
        // Missing only for a moment while the agent writes or removes the
        // set: the frontend's own set serves meanwhile.
        let k = found.key;
        if let Some(inner) = master_of(k.addr, k.port, k.proto, SCOPE_IN_CLUSTER) {
            found = inner;
        }
    }
    Some(Frontend {
        to_node_addr,
        ..found
    })
}

/// Whether a new flow from `client` may use the frontend: always, unless the
/// frontend lists source ranges and none holds the client.
#[inline(always)]
pub fn source_allowed(fe: &Frontend, client: [u8; 4]) -> bool {
    fe.master.flags & SVC_F_SOURCE_RANGES == 0 || in_ranges(fe.master.svc_id, client)
}

/// Whether a SOURCE_RANGES entry under `id` holds `addr`.
#[inline(always)]
fn in_ranges(id: u32, addr: [u8; 4]) -> bool {
    let key = Key::new(
        64,
        SourceRange {
            svc_id: id.to_be_bytes(),
            addr,
        },
    );
    SOURCE_RANGES.get(&key).is_some()
}

#[inline(always)]
fn backend_in_slot(fe: &Frontend, scope: u8, slot: u16) -> Option<u32> {
    let key = ServiceKey {
        scope,
        slot,
        ..fe.key
    };
    // SAFETY: one u32 copied out of a live value (see master_of).
    unsafe { SERVICES.get(key) }.map(|v| v.backend_id)
}

/// How session affinity took part in a backend choice; acted on (counted,
/// remembered) only once the flow is really opened, so a choice that XDP
/// hands on to tc leaves no trace.
#[derive(Clone, Copy)]
pub enum AffinityUse {
    NotApplicable,
    /// A live affinity entry decided the backend.
    Hit,
    /// The backend was picked at random and becomes the client's affinity;
    /// `stale` when an expired or stale entry was ignored on the way.
    Fresh {
        stale: bool,
    },
}

pub struct Pick {
    pub id: u32,
    pub backend: Backend,
    pub affinity: AffinityUse,
}

/// The live affinity entry of `client`, refreshed; `Err(true)` when an
/// entry exists but has expired or points at a backend no longer in the set.
#[inline(always)]
fn affine_backend(fe: &Frontend, client: [u8; 4], now: u64) -> Result<u32, bool> {
    let key = AffinityKey {
        client,
        svc_id: fe.master.svc_id,
    };
    let Some(entry) = AFFINITY.get_ptr_mut(key) else {
        return Err(false);
    };
    // SAFETY: the pointer is the map's own value, alive until the program
    // returns; a concurrent writer of the same client can only race on the
    // timestamp, which either write leaves valid.
    let entry = unsafe { &mut *entry };
    let timeout_ns = fe.master.affinity_timeout_s as u64 * 1_000_000_000;
    let member = AffinityMatchKey {
        svc_id: fe.master.svc_id,
        backend_id: entry.backend_id,
    };
    // SAFETY (AFFINITY_MATCH): only the presence of the entry is used.
    if now.wrapping_sub(entry.last_used_ns) > timeout_ns
        || unsafe { AFFINITY_MATCH.get(member) }.is_none()
    {
        return Err(true);
    }
    entry.last_used_ns = now;
    Ok(entry.backend_id)
}

/// Makes `pick` the affinity of `client` when it was a fresh choice.
#[inline(always)]
pub fn note_affinity(fe: &Frontend, client: [u8; 4], pick: &Pick) {
    if let AffinityUse::Fresh { .. } = pick.affinity {
        let key = AffinityKey {
            client,
            svc_id: fe.master.svc_id,
        };
        let value = AffinityValue {
            // SAFETY: a helper call without arguments.
            last_used_ns: unsafe { bpf_ktime_get_ns() },
            backend_id: pick.id,
            _pad: 0,
        };
        // LRU: a failed insert only costs the client its stickiness.
        let _ = AFFINITY.insert(key, value, 0);
    }
}

/// The backend for a new flow: the client's affinity when it has a live
/// one, else a random slot of the frontend's scope.
#[inline(always)]
pub fn select_backend(fe: &Frontend, client: [u8; 4]) -> Option<Pick> {
    let mut affinity = AffinityUse::NotApplicable;
    if fe.master.flags & SVC_F_AFFINITY != 0 {
        // SAFETY: a helper call without arguments.
        let now = unsafe { bpf_ktime_get_ns() };
        match affine_backend(fe, client, now) {
            Ok(id) => {
                // SAFETY: copied out of a live value (see master_of).
                if let Some(b) = unsafe { BACKENDS.get(id) } {
                    return Some(Pick {
                        id,
                        backend: *b,
                        affinity: AffinityUse::Hit,
                    });
                }
                affinity = AffinityUse::Fresh { stale: true };
            }
            Err(stale) => affinity = AffinityUse::Fresh { stale },
        }
    }
    let count = fe.master.count as u32;
    if count == 0 {
        return None;
    }
    // SAFETY: a helper call without arguments.
    let slot = (unsafe { bpf_get_prandom_u32() } % count) as u16 + 1;
    let id = backend_in_slot(fe, fe.key.scope, slot)?;
    // SAFETY: copied out of a live value (see master_of).
    let backend = *unsafe { BACKENDS.get(id) }?;
    Some(Pick {
        id,
        backend,
        affinity,
    })
}
