//! The maps, as the agent pins them. Sizes here are defaults; the agent may
//! override max_entries at load time.
use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use service_common::*;

/// Declares each map as `NAME: Type<key and value types>, capacity;`.
macro_rules! maps {
    ($($(#[$doc:meta])* $name:ident: $kind:ident $(<$($arg:ty),*>)?, $max:expr;)*) => {$(
        $(#[$doc])*
        #[btf_map]
        pub static $name: $kind<$($($arg,)*)? { $max as usize }> = $kind::new();
    )*};
}

maps! {
    SERVICES: HashMap<ServiceKey, ServiceValue>, DEFAULT_SERVICES_MAX;
    BACKENDS: HashMap<u32, Backend>, DEFAULT_BACKENDS_MAX;
    CONNTRACK: LruHashMap<CtKey, CtValue>, DEFAULT_CONNTRACK_MAX;
    AFFINITY: LruHashMap<AffinityKey, AffinityValue>, DEFAULT_AFFINITY_MAX;
    AFFINITY_MATCH: HashMap<AffinityMatchKey, u32>, DEFAULT_BACKENDS_MAX;
    NODE_ADDRS: HashMap<[u8; 4], u32>, NODE_ADDRS_MAX;
    SVC_STATS: PerCpuArray<SvcStats>, SVC_STATS_MAX;
    REASONS: PerCpuArray<u64>, REASONS_MAX;
    META: Array<u64>, META_MAX;
    SOURCE_RANGES: LpmTrie<SourceRange, u32>, DEFAULT_SOURCE_RANGES_MAX;
    FRAGMENTS: LruHashMap<FragKey, FragValue>, DEFAULT_FRAGMENTS_MAX;
    /// ifindex -> itself, for the external interfaces XDP may transmit on.
    XDP_EGRESS: DevMapHash, XDP_EGRESS_MAX;
    /// (socket cookie, backend) -> the Service address the socket asked for.
    SOCK_REVNAT: LruHashMap<SockRevKey, SockRevValue>, DEFAULT_SOCK_REVNAT_MAX;
    /// Each CPU's count of new flows in the current second (the flood guard).
    FLOOD: PerCpuArray<FloodWindow>, 1;
    // IPv6's maps: the same roles, keyed by IPv6 addresses. svc_ids and
    // backend ids are shared with IPv4 (SVC_STATS, AFFINITY_MATCH, MAGLEV).
    SERVICES6: HashMap<ServiceKey6, ServiceValue>, DEFAULT_SERVICES_MAX;
    BACKENDS6: HashMap<u32, Backend6>, DEFAULT_BACKENDS_MAX;
    CONNTRACK6: LruHashMap<CtKey6, CtValue6>, DEFAULT_CONNTRACK_MAX;
    AFFINITY6: LruHashMap<AffinityKey6, AffinityValue>, DEFAULT_AFFINITY_MAX;
    NODE_ADDRS6: HashMap<Addr6, u32>, NODE_ADDRS_MAX;
    SOURCE_RANGES6: LpmTrie<SourceRange6, u32>, DEFAULT_SOURCE_RANGES_MAX;
    FRAGMENTS6: LruHashMap<FragKey6, FragValue6>, DEFAULT_FRAGMENTS_MAX;
    /// SOCK_REVNAT for IPv6 sockets, IPv4-mapped Services included.
    SOCK_REVNAT6: LruHashMap<SockRevKey6, SockRevValue6>, DEFAULT_SOCK_REVNAT_MAX;
}

/// svc_id -> the frontend's Maglev table. Not preallocated: only frontends
/// that use Maglev take the room of a table.
#[btf_map]
pub static MAGLEV: HashMap<
    u32,
    MaglevTable,
    { DEFAULT_MAGLEV_MAX as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();
