//! The map operations the writer needs, as one small interface: the pinned
//! BPF maps implement it (`Tables`), and so does an in-memory fake that the
//! writer's unit tests run against without a kernel.
use std::collections::{BTreeMap, BTreeSet};

use aya::maps::{MapError, PerCpuValues, lpm_trie::Key};
use service_common::*;

use super::tables::Tables;

/// One loadBalancerSourceRange of a frontend: a SOURCE_RANGES key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RangeKey {
    pub svc_id: u32,
    /// The CIDR's prefix length (0..=32), not the trie's.
    pub prefix: u8,
    /// The network address.
    pub addr: [u8; 4],
}

impl RangeKey {
    fn to_trie(self) -> Key<SourceRange> {
        // The trie matches the svc_id (32 bits) before the source address.
        Key::new(
            32 + self.prefix as u32,
            SourceRange {
                svc_id: self.svc_id.to_be_bytes(),
                addr: self.addr,
            },
        )
    }

    fn from_trie(k: &Key<SourceRange>) -> Self {
        let d = k.data();
        RangeKey {
            svc_id: u32::from_be_bytes(d.svc_id),
            prefix: k.prefix_len().saturating_sub(32) as u8,
            addr: d.addr,
        }
    }
}

/// An entry the writer creates or replaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    Service(ServiceKey, ServiceValue),
    Backend(u32, Backend),
    AffinityMatch(AffinityMatchKey),
    SourceRange(RangeKey),
    NodeAddr([u8; 4]),
    /// A slot of the META array.
    Meta(u32, u64),
}

/// An entry the writer deletes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKey {
    Service(ServiceKey),
    Backend(u32),
    AffinityMatch(AffinityMatchKey),
    SourceRange(RangeKey),
    NodeAddr([u8; 4]),
    Conntrack(CtKey),
    /// A frontend's Maglev table, by svc_id.
    Maglev(u32),
}

impl Entry {
    /// The map the entry goes to, by its pinned name.
    pub fn map(&self) -> &'static str {
        match self {
            Entry::Service(..) => MAP_SERVICES,
            Entry::Backend(..) => MAP_BACKENDS,
            Entry::AffinityMatch(_) => MAP_AFFINITY_MATCH,
            Entry::SourceRange(_) => MAP_SOURCE_RANGES,
            Entry::NodeAddr(_) => MAP_NODE_ADDRS,
            Entry::Meta(..) => MAP_META,
        }
    }
}

impl EntryKey {
    pub fn map(&self) -> &'static str {
        match self {
            EntryKey::Service(_) => MAP_SERVICES,
            EntryKey::Backend(_) => MAP_BACKENDS,
            EntryKey::AffinityMatch(_) => MAP_AFFINITY_MATCH,
            EntryKey::SourceRange(_) => MAP_SOURCE_RANGES,
            EntryKey::NodeAddr(_) => MAP_NODE_ADDRS,
            EntryKey::Conntrack(_) => MAP_CONNTRACK,
            EntryKey::Maglev(_) => MAP_MAGLEV,
        }
    }
}

/// A Maglev table as read back: its size and the backend ids it names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoredTable {
    pub size: u32,
    pub ids: BTreeSet<u32>,
}

impl StoredTable {
    pub fn of(t: &MaglevTable) -> Self {
        let n = (t.size as usize).min(t.backends.len());
        StoredTable {
            size: t.size,
            ids: t.backends[..n].iter().copied().collect(),
        }
    }
}

/// What the writer does to the maps. Errors are the kernel's: a new key in
/// a full hash map fails with E2BIG (a full LPM trie with ENOSPC).
pub trait Maps {
    /// Creates or replaces an entry.
    fn insert(&mut self, e: Entry) -> Result<(), MapError>;
    /// Deletes an entry; one that is not there is not an error.
    fn remove(&mut self, k: EntryKey) -> Result<(), MapError>;
    /// Creates or replaces the Maglev table of `svc_id` (a value too large
    /// to travel in an [`Entry`]).
    fn insert_maglev(&mut self, svc_id: u32, table: &MaglevTable) -> Result<(), MapError>;
    /// Zeroes a frontend's per-CPU counters, so a reused svc_id starts from zero.
    fn reset_svc_stats(&mut self, svc_id: u32) -> Result<(), MapError>;

    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, MapError>;
    fn backends(&self) -> Result<Vec<(u32, Backend)>, MapError>;
    fn backend(&self, id: u32) -> Result<Option<Backend>, MapError>;
    fn affinity_matches(&self) -> Result<Vec<AffinityMatchKey>, MapError>;
    fn source_ranges(&self) -> Result<Vec<RangeKey>, MapError>;
    fn maglev_tables(&self) -> Result<BTreeMap<u32, StoredTable>, MapError>;
    /// The entries that could be read, and what could not: the programs
    /// add and drop flows while the agent walks the map (an entry gone
    /// meanwhile is skipped, not an error).
    fn conntrack(&self) -> Walk<(CtKey, CtValue)>;
    fn node_addrs(&self) -> Vec<[u8; 4]>;
}

/// A walk of a map: the entries read, and the errors met on the way (an
/// error of the key iteration ends the walk early).
#[derive(Debug)]
pub struct Walk<T> {
    pub entries: Vec<T>,
    pub errors: Vec<MapError>,
}

impl<T> FromIterator<Result<T, MapError>> for Walk<T> {
    fn from_iter<I: IntoIterator<Item = Result<T, MapError>>>(iter: I) -> Self {
        let mut w = Walk {
            entries: vec![],
            errors: vec![],
        };
        for r in iter {
            match r {
                Ok(e) => w.entries.push(e),
                Err(e) => w.errors.push(e),
            }
        }
        w
    }
}

pub fn is_not_found(e: &MapError) -> bool {
    matches!(e, MapError::KeyNotFound | MapError::ElementNotFound)
        || matches!(e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::ENOENT))
}

fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(e) if is_not_found(&e) => Ok(()),
        other => other,
    }
}

impl Maps for Tables {
    fn insert(&mut self, e: Entry) -> Result<(), MapError> {
        match e {
            Entry::Service(k, v) => self.services.insert(k, v, 0),
            Entry::Backend(id, b) => self.backends.insert(id, b, 0),
            Entry::AffinityMatch(k) => self.affinity_match.insert(k, 1, 0),
            Entry::SourceRange(r) => self.source_ranges.insert(&r.to_trie(), 1, 0),
            Entry::NodeAddr(a) => self.node_addrs.insert(a, 1, 0),
            Entry::Meta(i, v) => self.meta.set(i, v, 0),
        }
    }

    fn remove(&mut self, k: EntryKey) -> Result<(), MapError> {
        ignore_missing(match k {
            EntryKey::Service(k) => self.services.remove(&k),
            EntryKey::Backend(id) => self.backends.remove(&id),
            EntryKey::AffinityMatch(k) => self.affinity_match.remove(&k),
            EntryKey::SourceRange(r) => self.source_ranges.remove(&r.to_trie()),
            EntryKey::NodeAddr(a) => self.node_addrs.remove(&a),
            EntryKey::Conntrack(k) => self.conntrack.remove(&k),
            EntryKey::Maglev(id) => self.maglev.remove(&id),
        })
    }

    fn insert_maglev(&mut self, svc_id: u32, table: &MaglevTable) -> Result<(), MapError> {
        self.maglev.insert(svc_id, table, 0)
    }

    fn reset_svc_stats(&mut self, svc_id: u32) -> Result<(), MapError> {
        let zero = PerCpuValues::try_from(vec![SvcStats::default(); super::writer::nr_cpus()])?;
        self.svc_stats.set(svc_id, zero, 0)
    }

    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, MapError> {
        self.services.iter().collect()
    }

    fn backends(&self) -> Result<Vec<(u32, Backend)>, MapError> {
        self.backends.iter().collect()
    }

    fn backend(&self, id: u32) -> Result<Option<Backend>, MapError> {
        match self.backends.get(&id, 0) {
            Ok(b) => Ok(Some(b)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn affinity_matches(&self) -> Result<Vec<AffinityMatchKey>, MapError> {
        self.affinity_match.keys().collect()
    }

    fn source_ranges(&self) -> Result<Vec<RangeKey>, MapError> {
        self.source_ranges
            .keys()
            .map(|k| k.map(|k| RangeKey::from_trie(&k)))
            .collect()
    }

    fn maglev_tables(&self) -> Result<BTreeMap<u32, StoredTable>, MapError> {
        // One table at a time: the iterator's values are 64 KiB each.
        let mut out = BTreeMap::new();
        for id in self.maglev.keys() {
            let id = id?;
            match self.maglev.get(&id, 0) {
                Ok(t) => drop(out.insert(id, StoredTable::of(&t))),
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    fn conntrack(&self) -> Walk<(CtKey, CtValue)> {
        self.conntrack.iter().collect()
    }

    fn node_addrs(&self) -> Vec<[u8; 4]> {
        self.node_addrs.keys().filter_map(Result::ok).collect()
    }
}
