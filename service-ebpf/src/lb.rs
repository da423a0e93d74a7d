//! Finding the frontend a packet is addressed to and picking its backend:
//! a fixed number of hash lookups, whatever the number of Services or
//! backends. Takes addresses and ports, not a packet, so a program that sees
//! a socket call rather than a packet can use it too.
use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns};
use service_common::*;

use crate::{
    family::Family,
    maps::{AFFINITY_MATCH, MAGLEV},
};

pub struct Frontend<F: Family> {
    pub key: ServiceKeyOf<F::Addr>,
    pub master: ServiceValue,
    /// The packet is addressed to one of this node's own addresses.
    pub to_node_addr: bool,
}

/// Where a packet or socket call that may open a flow comes from, as far
/// as `externalTrafficPolicy: Local` cares: that policy applies to traffic
/// from outside the cluster only.
#[derive(Clone, Copy)]
pub enum Origin<F: Family> {
    /// A pod's interface or one of the node's own sockets: inside the cluster.
    Inside,
    /// An external interface: inside the cluster when the source is in
    /// the cluster's pod ranges (`--cluster-cidr`).
    Wire(F::Addr),
}

impl<F: Family> Origin<F> {
    #[inline(always)]
    fn is_inside(self) -> bool {
        match self {
            Origin::Inside => true,
            Origin::Wire(saddr) => F::in_ranges(CLUSTER_CIDRS_ID, saddr),
        }
    }
}

#[inline(always)]
fn master_of<F: Family>(addr: F::Addr, port: u16, proto: u8, scope: u8) -> Option<Frontend<F>> {
    let key = ServiceKeyOf {
        addr,
        port,
        proto,
        scope,
        slot: 0,
        _pad: 0,
    };
    // The agent replaces a master entry with one map update, so the copy
    // is one whole version of it.
    let master = F::service(&key)?;
    Some(Frontend {
        key,
        master,
        to_node_addr: false,
    })
}

/// Whether `addr` is one of this node's addresses (NODE_ADDRS, NODE_ADDRS6).
#[inline(always)]
pub fn is_node_address<F: Family>(addr: F::Addr) -> bool {
    F::is_node_address(addr)
}

/// The frontend at `daddr:dport/proto`: a ClusterIP / external address
/// entry first, then a NodePort entry when the destination is a node
/// address; its in-cluster entry set when it has one and `from` is inside
/// the cluster. (Only such frontends pay for the source check.)
#[inline(always)]
pub fn lookup_frontend<F: Family>(
    daddr: F::Addr,
    dport: u16,
    proto: u8,
    from: Origin<F>,
) -> Option<Frontend<F>> {
    let to_node_addr = F::is_node_address(daddr);
    let mut found = match master_of::<F>(daddr, dport, proto, SCOPE_ALL) {
        Some(f) => f,
        None if to_node_addr => master_of::<F>(F::ANY, dport, proto, SCOPE_ALL)?,
        None => return None,
    };
    if found.master.flags & SVC_F_IN_CLUSTER != 0 && from.is_inside() {
        // Missing only for a moment while the agent writes or removes the
        // set: the frontend's own set serves meanwhile.
        let k = found.key;
        if let Some(inner) = master_of::<F>(k.addr, k.port, k.proto, SCOPE_IN_CLUSTER) {
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
pub fn source_allowed<F: Family>(fe: &Frontend<F>, client: F::Addr) -> bool {
    fe.master.flags & SVC_F_SOURCE_RANGES == 0 || F::in_ranges(fe.master.svc_id, client)
}

#[inline(always)]
fn backend_in_slot<F: Family>(fe: &Frontend<F>, scope: u8, slot: u16) -> Option<u32> {
    let key = ServiceKeyOf {
        scope,
        slot,
        ..fe.key
    };
    F::service(&key).map(|v| v.backend_id)
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

pub struct Pick<F: Family> {
    pub id: u32,
    pub backend: BackendOf<F::Addr>,
    pub affinity: AffinityUse,
}

/// The live affinity entry of `client`, refreshed; `Err(true)` when an
/// entry exists but has expired or points at a backend no longer in the set.
#[inline(always)]
fn affine_backend<F: Family>(fe: &Frontend<F>, client: F::Addr, now: u64) -> Result<u32, bool> {
    let key = AffinityKeyOf {
        client,
        svc_id: fe.master.svc_id,
    };
    let Some(entry) = F::affinity_ptr(&key) else {
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
pub fn note_affinity<F: Family>(fe: &Frontend<F>, client: F::Addr, pick: &Pick<F>) {
    if let AffinityUse::Fresh { .. } = pick.affinity {
        let key = AffinityKeyOf {
            client,
            svc_id: fe.master.svc_id,
        };
        let value = AffinityValue {
            // SAFETY: a helper call without arguments.
            last_used_ns: unsafe { bpf_ktime_get_ns() },
            backend_id: pick.id,
            _pad: 0,
        };
        F::affinity_insert(&key, &value);
    }
}

/// The backend the frontend's Maglev table gives a flow from
/// `client:sport`; `None` without a table (the agent has not written it, or
/// could not), and then the caller picks at random.
#[inline(always)]
fn maglev_backend<F: Family>(fe: &Frontend<F>, client: F::Addr, sport: u16) -> Option<u32> {
    // SAFETY: read through a pointer to the map's own value, alive until
    // the program returns; the agent replaces a table with one map update,
    // so this is one whole version of it.
    let table = unsafe { MAGLEV.get(fe.master.svc_id) }?;
    let size = table.size as u64;
    if size == 0 {
        return None;
    }
    let hash = F::maglev_hash(client, sport, fe.key.port, fe.key.proto);
    // The bound the verifier needs: the size is the agent's, the array's
    // length is compiled in.
    let id = *table.backends.get((hash % size) as usize)?;
    (id != 0).then_some(id)
}

/// The backend for a new flow: the client's affinity when it has a live
/// one, else for a Maglev frontend its table's entry for the flow (when
/// `sport` is known: a socket call before bind has none), else a random
/// slot of the frontend's scope.
#[inline(always)]
pub fn select_backend<F: Family>(
    fe: &Frontend<F>,
    client: F::Addr,
    sport: Option<u16>,
) -> Option<Pick<F>> {
    let mut affinity = AffinityUse::NotApplicable;
    if fe.master.flags & SVC_F_AFFINITY != 0 {
        // SAFETY: a helper call without arguments.
        let now = unsafe { bpf_ktime_get_ns() };
        match affine_backend(fe, client, now) {
            Ok(id) => {
                if let Some(b) = F::backend(id) {
                    return Some(Pick {
                        id,
                        backend: b,
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
    let hashed = match sport {
        Some(sport) if fe.master.flags & SVC_F_MAGLEV != 0 => maglev_backend(fe, client, sport),
        _ => None,
    };
    let id = match hashed {
        Some(id) => id,
        None => {
            // SAFETY: a helper call without arguments.
            let slot = (unsafe { bpf_get_prandom_u32() } % count) as u16 + 1;
            backend_in_slot(fe, fe.key.scope, slot)?
        }
    };
    let backend = F::backend(id)?;
    Some(Pick {
        id,
        backend,
        affinity,
    })
}
