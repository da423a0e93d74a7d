//! The maps, as the agent pins them. Sizes here are defaults; the agent may
//! override max_entries at load time.
use aya_ebpf::{
    btf_maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use service_common::*;

#[btf_map]
pub static SERVICES: HashMap<ServiceKey, ServiceValue, { DEFAULT_SERVICES_MAX as usize }> =
    HashMap::new();

#[btf_map]
pub static BACKENDS: HashMap<u32, Backend, { DEFAULT_BACKENDS_MAX as usize }> = HashMap::new();

#[btf_map]
pub static CONNTRACK: LruHashMap<CtKey, CtValue, { DEFAULT_CONNTRACK_MAX as usize }> =
    LruHashMap::new();

#[btf_map]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue, { DEFAULT_AFFINITY_MAX as usize }> =
    LruHashMap::new();

#[btf_map]
pub static AFFINITY_MATCH: HashMap<AffinityMatchKey, u32, { DEFAULT_BACKENDS_MAX as usize }> =
    HashMap::new();

#[btf_map]
pub static NODE_ADDRS: HashMap<[u8; 4], u32, { NODE_ADDRS_MAX as usize }> = HashMap::new();

#[btf_map]
pub static SVC_STATS: PerCpuArray<SvcStats, { SVC_STATS_MAX as usize }> = PerCpuArray::new();

#[btf_map]
pub static REASONS: PerCpuArray<u64, { REASONS_MAX as usize }> = PerCpuArray::new();

#[btf_map]
pub static META: Array<u64, { META_MAX as usize }> = Array::new();

#[btf_map]
pub static SOURCE_RANGES: LpmTrie<SourceRange, u32, { DEFAULT_SOURCE_RANGES_MAX as usize }> =
    LpmTrie::new();

#[btf_map]
pub static FRAGMENTS: LruHashMap<FragKey, FragValue, { DEFAULT_FRAGMENTS_MAX as usize }> =
    LruHashMap::new();

/// ifindex -> itself, for the external interfaces XDP may transmit on.
#[btf_map]
pub static XDP_EGRESS: DevMapHash<{ XDP_EGRESS_MAX as usize }> = DevMapHash::new();

/// (socket cookie, backend) -> the Service address the socket asked for.
#[btf_map]
pub static SOCK_REVNAT: LruHashMap<SockRevKey, SockRevValue, { DEFAULT_SOCK_REVNAT_MAX as usize }> =
    LruHashMap::new();
