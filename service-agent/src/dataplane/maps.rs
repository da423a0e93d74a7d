//! The map operations the writer needs, as one small interface: the pinned
//! BPF maps implement it (`Tables`), and so does an in-memory fake that the
//! writer's unit tests run against without a kernel.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use aya::maps::{MapError, PerCpuValues, lpm_trie::Key};
use service_common::*;

use super::{batch, tables::Tables};

/// One loadBalancerSourceRange of a frontend (or one of the cluster's pod
/// ranges): a SOURCE_RANGES or SOURCE_RANGES6 key, by the address's family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RangeKey {
    pub svc_id: u32,
    /// The CIDR's prefix length (0..=32 or 0..=128), not the trie's.
    pub prefix: u8,
    /// The network address.
    pub addr: IpAddr,
}

impl RangeKey {
    // The tries match the svc_id (32 bits) before the source address.
    fn to_trie(self) -> Key<SourceRange> {
        let IpAddr::V4(a) = self.addr else {
            unreachable!("an IPv6 range goes to SOURCE_RANGES6")
        };
        Key::new(
            32 + self.prefix as u32,
            SourceRange {
                svc_id: self.svc_id.to_be_bytes(),
                addr: a.octets(),
            },
        )
    }

    fn to_trie6(self) -> Key<SourceRange6> {
        let IpAddr::V6(a) = self.addr else {
            unreachable!("an IPv4 range goes to SOURCE_RANGES")
        };
        Key::new(
            32 + self.prefix as u32,
            SourceRange6 {
                svc_id: self.svc_id.to_be_bytes(),
                addr: a.octets(),
            },
        )
    }

    /// The trie the range goes to, by its pinned name.
    pub fn map(&self) -> &'static str {
        if self.addr.is_ipv6() {
            MAP_SOURCE_RANGES6
        } else {
            MAP_SOURCE_RANGES
        }
    }

    fn from_trie(k: &Key<SourceRange>) -> Self {
        let d = k.data();
        RangeKey {
            svc_id: u32::from_be_bytes(d.svc_id),
            prefix: k.prefix_len().saturating_sub(32) as u8,
            addr: Ipv4Addr::from(d.addr).into(),
        }
    }

    fn from_trie6(k: &Key<SourceRange6>) -> Self {
        let d = k.data();
        RangeKey {
            svc_id: u32::from_be_bytes(d.svc_id),
            prefix: k.prefix_len().saturating_sub(32) as u8,
            addr: Ipv6Addr::from(d.addr).into(),
        }
    }
}

/// A backend of either family: its id names an entry of BACKENDS or of
/// BACKENDS6 (one id space for both).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AnyBackend {
    V4(Backend),
    V6(Backend6),
}

impl AnyBackend {
    pub fn addr(&self) -> IpAddr {
        match self {
            AnyBackend::V4(b) => Ipv4Addr::from(b.addr).into(),
            AnyBackend::V6(b) => Ipv6Addr::from(b.addr).into(),
        }
    }

    pub fn port(&self) -> u16 {
        match self {
            AnyBackend::V4(b) => b.port,
            AnyBackend::V6(b) => b.port,
        }
    }

    pub fn proto(&self) -> u8 {
        match self {
            AnyBackend::V4(b) => b.proto,
            AnyBackend::V6(b) => b.proto,
        }
    }

    pub fn flags(&self) -> u8 {
        match self {
            AnyBackend::V4(b) => b.flags,
            AnyBackend::V6(b) => b.flags,
        }
    }

    /// The backend at `addr:port` for `proto` with `flags`, in its family's layout.
    pub fn new(addr: IpAddr, port: u16, proto: u8, flags: u8) -> Self {
        match addr {
            IpAddr::V4(a) => AnyBackend::V4(Backend {
                addr: a.octets(),
                port,
                proto,
                flags,
            }),
            IpAddr::V6(a) => AnyBackend::V6(Backend6 {
                addr: a.octets(),
                port,
                proto,
                flags,
            }),
        }
    }

    pub fn entry(self, id: u32) -> Entry {
        match self {
            AnyBackend::V4(b) => Entry::Backend(id, b),
            AnyBackend::V6(b) => Entry::Backend6(id, b),
        }
    }

    pub fn entry_key(&self, id: u32) -> EntryKey {
        match self {
            AnyBackend::V4(_) => EntryKey::Backend(id),
            AnyBackend::V6(_) => EntryKey::Backend6(id),
        }
    }
}

/// An entry the writer creates or replaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    Service(ServiceKey, ServiceValue),
    Service6(ServiceKey6, ServiceValue),
    Backend(u32, Backend),
    Backend6(u32, Backend6),
    AffinityMatch(AffinityMatchKey),
    SourceRange(RangeKey),
    NodeAddr([u8; 4]),
    NodeAddr6(Addr6),
    /// A slot of the META array.
    Meta(u32, u64),
}

/// An entry the writer deletes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKey {
    Service(ServiceKey),
    Service6(ServiceKey6),
    Backend(u32),
    Backend6(u32),
    AffinityMatch(AffinityMatchKey),
    SourceRange(RangeKey),
    NodeAddr([u8; 4]),
    NodeAddr6(Addr6),
    Conntrack(CtKey),
    Conntrack6(CtKey6),
    /// A frontend's Maglev table, by svc_id.
    Maglev(u32),
}

impl Entry {
    /// The map the entry goes to, by its pinned name.
    pub fn map(&self) -> &'static str {
        match self {
            Entry::Service(..) => MAP_SERVICES,
            Entry::Service6(..) => MAP_SERVICES6,
            Entry::Backend(..) => MAP_BACKENDS,
            Entry::Backend6(..) => MAP_BACKENDS6,
            Entry::AffinityMatch(_) => MAP_AFFINITY_MATCH,
            Entry::SourceRange(r) => r.map(),
            Entry::NodeAddr(_) => MAP_NODE_ADDRS,
            Entry::NodeAddr6(_) => MAP_NODE_ADDRS6,
            Entry::Meta(..) => MAP_META,
        }
    }
}

impl EntryKey {
    pub fn map(&self) -> &'static str {
        match self {
            EntryKey::Service(_) => MAP_SERVICES,
            EntryKey::Service6(_) => MAP_SERVICES6,
            EntryKey::Backend(_) => MAP_BACKENDS,
            EntryKey::Backend6(_) => MAP_BACKENDS6,
            EntryKey::AffinityMatch(_) => MAP_AFFINITY_MATCH,
            EntryKey::SourceRange(r) => r.map(),
            EntryKey::NodeAddr(_) => MAP_NODE_ADDRS,
            EntryKey::NodeAddr6(_) => MAP_NODE_ADDRS6,
            EntryKey::Conntrack(_) => MAP_CONNTRACK,
            EntryKey::Conntrack6(_) => MAP_CONNTRACK6,
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

/// How many of `all` entries an [`Maps::insert_all`] wrote, and its error.
pub fn written(r: Result<(), (usize, MapError)>, all: usize) -> (usize, Option<MapError>) {
    match r {
        Ok(()) => (all, None),
        Err((n, e)) => (n, Some(e)),
    }
}

/// What the writer does to the maps. Errors are the kernel's: a new key in
/// a full hash map fails with E2BIG (a full LPM trie with ENOSPC).
pub trait Maps {
    /// Creates or replaces an entry.
    fn insert(&mut self, e: Entry) -> Result<(), MapError>;
    /// Creates or replaces entries, in order: in one call where the kernel
    /// takes a batch. On an error, how many were written before it.
    fn insert_all(&mut self, entries: &[Entry]) -> Result<(), (usize, MapError)> {
        for (i, e) in entries.iter().enumerate() {
            self.insert(*e).map_err(|err| (i, err))?;
        }
        Ok(())
    }
    /// Deletes an entry; one that is not there is not an error.
    fn remove(&mut self, k: EntryKey) -> Result<(), MapError>;
    /// Creates or replaces the Maglev table of `svc_id` (a value too large
    /// to travel in an [`Entry`]).
    fn insert_maglev(&mut self, svc_id: u32, table: &MaglevTable) -> Result<(), MapError>;
    /// Zeroes a frontend's per-CPU counters, so a reused svc_id starts from zero.
    fn reset_svc_stats(&mut self, svc_id: u32) -> Result<(), MapError>;

    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, MapError>;
    fn services6(&self) -> Result<Vec<(ServiceKey6, ServiceValue)>, MapError>;
    /// BACKENDS and BACKENDS6.
    fn backends(&self) -> Result<Vec<(u32, AnyBackend)>, MapError>;
    /// The backend `id`, in whichever family's map holds it.
    fn backend(&self, id: u32) -> Result<Option<AnyBackend>, MapError>;
    fn affinity_matches(&self) -> Result<Vec<AffinityMatchKey>, MapError>;
    fn source_ranges(&self) -> Result<Vec<RangeKey>, MapError>;
    fn maglev_tables(&self) -> Result<BTreeMap<u32, StoredTable>, MapError>;
    /// The entries that could be read, and what could not: the programs
    /// add and drop flows while the agent walks the map (an entry gone
    /// meanwhile is skipped, not an error).
    fn conntrack(&self) -> Walk<(CtKey, CtValue)>;
    fn conntrack6(&self) -> Walk<(CtKey6, CtValue6)>;
    /// One CONNTRACK entry as it is now (None: gone, or unreadable).
    fn conntrack_entry(&self, k: &CtKey) -> Option<CtValue>;
    fn conntrack6_entry(&self, k: &CtKey6) -> Option<CtValue6>;
    fn node_addrs(&self) -> Vec<[u8; 4]>;
    fn node_addrs6(&self) -> Vec<Addr6>;
    /// A META slot (0 when it cannot be read, what an unwritten slot holds).
    fn meta(&self, slot: u32) -> u64;
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

/// `entries` written to `map` in one batch, when every one is of the kind
/// `f` takes (none: they are not all of that map).
fn in_one_batch<K: aya::Pod, V: aya::Pod>(
    map: &mut aya::maps::HashMap<aya::maps::MapData, K, V>,
    entries: &[Entry],
    f: impl Fn(&Entry) -> Option<(K, V)>,
) -> Option<Result<(), (usize, MapError)>> {
    let mut keys = Vec::with_capacity(entries.len());
    let mut values = Vec::with_capacity(entries.len());
    for e in entries {
        let (k, v) = f(e)?;
        keys.push(k);
        values.push(v);
    }
    Some(batch::update(map, &keys, &values))
}

impl Maps for Tables {
    fn insert(&mut self, e: Entry) -> Result<(), MapError> {
        match e {
            Entry::Service(k, v) => self.services.insert(k, v, 0),
            Entry::Service6(k, v) => self.services6.insert(k, v, 0),
            Entry::Backend(id, b) => self.backends.insert(id, b, 0),
            Entry::Backend6(id, b) => self.backends6.insert(id, b, 0),
            Entry::AffinityMatch(k) => self.affinity_match.insert(k, 1, 0),
            Entry::SourceRange(r) if r.addr.is_ipv6() => {
                self.source_ranges6.insert(&r.to_trie6(), 1, 0)
            }
            Entry::SourceRange(r) => self.source_ranges.insert(&r.to_trie(), 1, 0),
            Entry::NodeAddr(a) => self.node_addrs.insert(a, 1, 0),
            Entry::NodeAddr6(a) => self.node_addrs6.insert(a, 1, 0),
            Entry::Meta(i, v) => self.meta.set(i, v, 0),
        }
    }

    /// Entries of SERVICES, SERVICES6, BACKENDS, BACKENDS6 or
    /// AFFINITY_MATCH, all of one map, go in one batch; anything else one
    /// at a time.
    fn insert_all(&mut self, entries: &[Entry]) -> Result<(), (usize, MapError)> {
        let batched = match entries.first() {
            None => return Ok(()),
            Some(Entry::Service(..)) => in_one_batch(&mut self.services, entries, |e| match e {
                Entry::Service(k, v) => Some((*k, *v)),
                _ => None,
            }),
            Some(Entry::Service6(..)) => in_one_batch(&mut self.services6, entries, |e| match e {
                Entry::Service6(k, v) => Some((*k, *v)),
                _ => None,
            }),
            Some(Entry::Backend(..)) => in_one_batch(&mut self.backends, entries, |e| match e {
                Entry::Backend(k, v) => Some((*k, *v)),
                _ => None,
            }),
            Some(Entry::Backend6(..)) => in_one_batch(&mut self.backends6, entries, |e| match e {
                Entry::Backend6(k, v) => Some((*k, *v)),
                _ => None,
            }),
            Some(Entry::AffinityMatch(_)) => {
                in_one_batch(&mut self.affinity_match, entries, |e| match e {
                    Entry::AffinityMatch(k) => Some((*k, 1u32)),
                    _ => None,
                })
            }
            Some(_) => None,
        };
        if let Some(r) = batched {
            return r;
        }
        for (i, e) in entries.iter().enumerate() {
            self.insert(*e).map_err(|err| (i, err))?;
        }
        Ok(())
    }

    fn remove(&mut self, k: EntryKey) -> Result<(), MapError> {
        ignore_missing(match k {
            EntryKey::Service(k) => self.services.remove(&k),
            EntryKey::Service6(k) => self.services6.remove(&k),
            EntryKey::Backend(id) => self.backends.remove(&id),
            EntryKey::Backend6(id) => self.backends6.remove(&id),
            EntryKey::AffinityMatch(k) => self.affinity_match.remove(&k),
            EntryKey::SourceRange(r) if r.addr.is_ipv6() => {
                self.source_ranges6.remove(&r.to_trie6())
            }
            EntryKey::SourceRange(r) => self.source_ranges.remove(&r.to_trie()),
            EntryKey::NodeAddr(a) => self.node_addrs.remove(&a),
            EntryKey::NodeAddr6(a) => self.node_addrs6.remove(&a),
            EntryKey::Conntrack(k) => self.conntrack.remove(&k),
            EntryKey::Conntrack6(k) => self.conntrack6.remove(&k),
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

    fn services6(&self) -> Result<Vec<(ServiceKey6, ServiceValue)>, MapError> {
        self.services6.iter().collect()
    }

    fn backends(&self) -> Result<Vec<(u32, AnyBackend)>, MapError> {
        let v4 = self
            .backends
            .iter()
            .map(|r| r.map(|(id, b)| (id, AnyBackend::V4(b))));
        let v6 = self
            .backends6
            .iter()
            .map(|r| r.map(|(id, b)| (id, AnyBackend::V6(b))));
        v4.chain(v6).collect()
    }

    fn backend(&self, id: u32) -> Result<Option<AnyBackend>, MapError> {
        match self.backends.get(&id, 0) {
            Ok(b) => return Ok(Some(AnyBackend::V4(b))),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e),
        }
        match self.backends6.get(&id, 0) {
            Ok(b) => Ok(Some(AnyBackend::V6(b))),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn affinity_matches(&self) -> Result<Vec<AffinityMatchKey>, MapError> {
        self.affinity_match.keys().collect()
    }

    fn source_ranges(&self) -> Result<Vec<RangeKey>, MapError> {
        let v4 = self
            .source_ranges
            .keys()
            .map(|k| k.map(|k| RangeKey::from_trie(&k)));
        let v6 = (self.source_ranges6.keys()).map(|k| k.map(|k| RangeKey::from_trie6(&k)));
        v4.chain(v6).collect()
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

    fn conntrack6(&self) -> Walk<(CtKey6, CtValue6)> {
        self.conntrack6.iter().collect()
    }

    fn conntrack_entry(&self, k: &CtKey) -> Option<CtValue> {
        self.conntrack.get(k, 0).ok()
    }

    fn conntrack6_entry(&self, k: &CtKey6) -> Option<CtValue6> {
        self.conntrack6.get(k, 0).ok()
    }

    fn node_addrs(&self) -> Vec<[u8; 4]> {
        self.node_addrs.keys().filter_map(Result::ok).collect()
    }

    fn node_addrs6(&self) -> Vec<Addr6> {
        self.node_addrs6.keys().filter_map(Result::ok).collect()
    }

    fn meta(&self, slot: u32) -> u64 {
        self.meta.get(&slot, 0).unwrap_or(0)
    }
}
