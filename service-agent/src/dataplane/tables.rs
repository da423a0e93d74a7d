//! Typed handles on the pinned maps, opened either from a loaded program set
//! or straight from the pins (for `list`, `stats`, `dump`).
use std::path::Path;

use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuArray};
use service_common::*;

use super::pins::map_pin_path;

pub struct Tables {
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub backends: HashMap<MapData, u32, Backend>,
    pub conntrack: HashMap<MapData, CtKey, CtValue>,
    pub affinity: HashMap<MapData, AffinityKey, AffinityValue>,
    pub affinity_match: HashMap<MapData, AffinityMatchKey, u32>,
    pub node_addrs: HashMap<MapData, [u8; 4], u32>,
    pub svc_stats: PerCpuArray<MapData, SvcStats>,
    pub reasons: PerCpuArray<MapData, u64>,
    pub meta: Array<MapData, u64>,
    pub source_ranges: LpmTrie<MapData, SourceRange, u32>,
    pub sock_revnat: HashMap<MapData, SockRevKey, SockRevValue>,
    pub maglev: HashMap<MapData, u32, MaglevTable>,
    pub services6: HashMap<MapData, ServiceKey6, ServiceValue>,
    pub backends6: HashMap<MapData, u32, Backend6>,
    pub conntrack6: HashMap<MapData, CtKey6, CtValue6>,
    pub affinity6: HashMap<MapData, AffinityKey6, AffinityValue>,
    pub node_addrs6: HashMap<MapData, Addr6, u32>,
    pub source_ranges6: LpmTrie<MapData, SourceRange6, u32>,
    pub sock_revnat6: HashMap<MapData, SockRevKey6, SockRevValue6>,
}

#[derive(Debug, thiserror::Error)]
pub enum TablesError {
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("map {0} is missing from the BPF object")]
    Missing(&'static str),
}

fn wrap(name: &'static str) -> impl Fn(aya::maps::MapError) -> TablesError {
    move |source| TablesError::Map { name, source }
}

impl Tables {
    /// Takes the maps out of a loaded object.
    pub fn take(ebpf: &mut aya::Ebpf) -> Result<Self, TablesError> {
        let mut get = |name: &'static str| ebpf.take_map(name).ok_or(TablesError::Missing(name));
        Self::from_maps(&mut get)
    }

    /// Opens the maps pinned in `dir`.
    pub fn open_pinned(dir: &Path) -> Result<Self, TablesError> {
        Self::from_maps(|name| {
            let data = MapData::from_pin(map_pin_path(dir, name)).map_err(wrap(name))?;
            Map::from_map_data(data).map_err(wrap(name))
        })
    }

    fn from_maps(
        mut get: impl FnMut(&'static str) -> Result<Map, TablesError>,
    ) -> Result<Self, TablesError> {
        macro_rules! open {
            ($ty:ident, $name:expr) => {
                $ty::try_from(get($name)?).map_err(wrap($name))?
            };
        }
        Ok(Self {
            services: open!(HashMap, MAP_SERVICES),
            backends: open!(HashMap, MAP_BACKENDS),
            conntrack: open!(HashMap, MAP_CONNTRACK),
            affinity: open!(HashMap, MAP_AFFINITY),
            affinity_match: open!(HashMap, MAP_AFFINITY_MATCH),
            node_addrs: open!(HashMap, MAP_NODE_ADDRS),
            svc_stats: open!(PerCpuArray, MAP_SVC_STATS),
            reasons: open!(PerCpuArray, MAP_REASONS),
            meta: open!(Array, MAP_META),
            source_ranges: open!(LpmTrie, MAP_SOURCE_RANGES),
            sock_revnat: open!(HashMap, MAP_SOCK_REVNAT),
            maglev: open!(HashMap, MAP_MAGLEV),
            services6: open!(HashMap, MAP_SERVICES6),
            backends6: open!(HashMap, MAP_BACKENDS6),
            conntrack6: open!(HashMap, MAP_CONNTRACK6),
            affinity6: open!(HashMap, MAP_AFFINITY6),
            node_addrs6: open!(HashMap, MAP_NODE_ADDRS6),
            source_ranges6: open!(LpmTrie, MAP_SOURCE_RANGES6),
            sock_revnat6: open!(HashMap, MAP_SOCK_REVNAT6),
        })
    }
}
