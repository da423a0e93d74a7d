//! An in-memory stand-in for the BPF maps, for unit tests of the writer:
//! hash maps with a capacity that refuse a new key when full with the
//! kernel's error, every write recorded, and failures injected on demand
//! (the Nth write, every write to one map).
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io,
};

use aya::{maps::MapError, sys::SyscallError};
use service_common::*;

use super::maps::{AnyBackend, Entry, EntryKey, Maps, RangeKey, StoredTable, Walk};

/// What the maps hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Contents {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<u32, Backend>,
    /// AFFINITY_MATCH as (svc_id, backend id).
    pub affinity_match: BTreeSet<(u32, u32)>,
    pub source_ranges: BTreeSet<RangeKey>,
    pub node_addrs: BTreeSet<[u8; 4]>,
    pub meta: BTreeMap<u32, u64>,
    pub conntrack: HashMap<CtKey, CtValue>,
    /// MAGLEV: svc_id → the table's entries in use.
    pub maglev: BTreeMap<u32, Vec<u32>>,
    pub services6: BTreeMap<ServiceKey6, ServiceValue>,
    pub backends6: BTreeMap<u32, Backend6>,
    pub node_addrs6: BTreeSet<Addr6>,
    pub conntrack6: HashMap<CtKey6, CtValue6>,
}

impl Contents {
    /// How many entries `map` holds.
    pub fn entries(&self, map: &str) -> usize {
        match map {
            MAP_SERVICES => self.services.len(),
            MAP_BACKENDS => self.backends.len(),
            MAP_AFFINITY_MATCH => self.affinity_match.len(),
            MAP_SOURCE_RANGES | MAP_SOURCE_RANGES6 => (self.source_ranges.iter())
                .filter(|r| r.map() == map)
                .count(),
            MAP_NODE_ADDRS => self.node_addrs.len(),
            MAP_META => self.meta.len(),
            MAP_CONNTRACK => self.conntrack.len(),
            MAP_MAGLEV => self.maglev.len(),
            MAP_SERVICES6 => self.services6.len(),
            MAP_BACKENDS6 => self.backends6.len(),
            MAP_NODE_ADDRS6 => self.node_addrs6.len(),
            MAP_CONNTRACK6 => self.conntrack6.len(),
            _ => 0,
        }
    }

    fn has(&self, e: &Entry) -> bool {
        match e {
            Entry::Service(k, _) => self.services.contains_key(k),
            Entry::Service6(k, _) => self.services6.contains_key(k),
            Entry::Backend(id, _) => self.backends.contains_key(id),
            Entry::Backend6(id, _) => self.backends6.contains_key(id),
            Entry::AffinityMatch(k) => self.affinity_match.contains(&(k.svc_id, k.backend_id)),
            Entry::SourceRange(r) => self.source_ranges.contains(r),
            Entry::NodeAddr(a) => self.node_addrs.contains(a),
            Entry::NodeAddr6(a) => self.node_addrs6.contains(a),
            Entry::Meta(i, _) => self.meta.contains_key(i),
        }
    }

    fn put(&mut self, e: Entry) {
        match e {
            Entry::Service(k, v) => drop(self.services.insert(k, v)),
            Entry::Service6(k, v) => drop(self.services6.insert(k, v)),
            Entry::Backend(id, b) => drop(self.backends.insert(id, b)),
            Entry::Backend6(id, b) => drop(self.backends6.insert(id, b)),
            Entry::AffinityMatch(k) => drop(self.affinity_match.insert((k.svc_id, k.backend_id))),
            Entry::SourceRange(r) => drop(self.source_ranges.insert(r)),
            Entry::NodeAddr(a) => drop(self.node_addrs.insert(a)),
            Entry::NodeAddr6(a) => drop(self.node_addrs6.insert(a)),
            Entry::Meta(i, v) => drop(self.meta.insert(i, v)),
        }
    }

    fn delete(&mut self, k: EntryKey) {
        match k {
            EntryKey::Service(k) => drop(self.services.remove(&k)),
            EntryKey::Service6(k) => drop(self.services6.remove(&k)),
            EntryKey::Backend(id) => drop(self.backends.remove(&id)),
            EntryKey::Backend6(id) => drop(self.backends6.remove(&id)),
            EntryKey::AffinityMatch(k) => {
                self.affinity_match.remove(&(k.svc_id, k.backend_id));
            }
            EntryKey::SourceRange(r) => drop(self.source_ranges.remove(&r)),
            EntryKey::NodeAddr(a) => drop(self.node_addrs.remove(&a)),
            EntryKey::NodeAddr6(a) => drop(self.node_addrs6.remove(&a)),
            EntryKey::Conntrack(k) => drop(self.conntrack.remove(&k)),
            EntryKey::Conntrack6(k) => drop(self.conntrack6.remove(&k)),
            EntryKey::Maglev(id) => drop(self.maglev.remove(&id)),
        }
    }
}

/// A write that succeeded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Insert(Entry),
    Remove(EntryKey),
    /// The Maglev table of a svc_id written.
    InsertMaglev(u32),
}

impl Op {
    pub fn map(&self) -> &'static str {
        match self {
            Op::Insert(e) => e.map(),
            Op::Remove(k) => k.map(),
            Op::InsertMaglev(_) => MAP_MAGLEV,
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct FakeMaps {
    pub contents: Contents,
    /// Successful writes, in order.
    pub log: Vec<Op>,
    /// When set, the contents after each successful write.
    pub history: Option<Vec<Contents>>,
    /// svc_ids whose counters were reset.
    pub stats_reset: Vec<u32>,
    capacity: BTreeMap<&'static str, usize>,
    /// Writes attempted so far, failed ones included.
    writes: usize,
    fail_at: BTreeSet<usize>,
    failing_maps: BTreeSet<&'static str>,
    /// Walks of CONNTRACK end with an error after this many entries.
    conntrack_walk_fails_after: Option<usize>,
    /// Walks of CONNTRACK so far.
    pub conntrack_walks: std::cell::Cell<usize>,
    /// What the programs wrote to CONNTRACK after the agent's walk of it: a
    /// walk does not see these, a read of one entry does.
    pub conntrack_since_walk: HashMap<CtKey, CtValue>,
}

fn pairs<K: Copy, V: Copy>(m: &BTreeMap<K, V>) -> Vec<(K, V)> {
    m.iter().map(|(k, v)| (*k, *v)).collect()
}

fn syscall_error(call: &'static str, errno: i32) -> MapError {
    MapError::SyscallError(SyscallError {
        call,
        io_error: io::Error::from_raw_os_error(errno),
    })
}

impl FakeMaps {
    /// Lets `map` hold at most `entries`, like its max_entries.
    pub fn set_capacity(&mut self, map: &'static str, entries: usize) {
        self.capacity.insert(map, entries);
    }

    /// Makes the write `n` writes from now (0: the next one) fail.
    pub fn fail_write(&mut self, n: usize) {
        self.fail_at.insert(self.writes + n);
    }

    /// Makes every write to `map` fail.
    pub fn fail_map(&mut self, map: &'static str) {
        self.failing_maps.insert(map);
    }

    /// Makes walks of CONNTRACK fail after `n` entries, as a failing
    /// `bpf_map_get_next_key` ends aya's iteration.
    pub fn fail_conntrack_walk(&mut self, n: usize) {
        self.conntrack_walk_fails_after = Some(n);
    }

    pub fn heal(&mut self) {
        self.fail_at.clear();
        self.failing_maps.clear();
        self.conntrack_walk_fails_after = None;
    }

    /// Writes attempted so far.
    pub fn writes(&self) -> usize {
        self.writes
    }

    /// Starts keeping the contents after every write.
    pub fn record_history(&mut self) {
        self.history = Some(vec![]);
    }

    /// Counts a write to `map` and says whether it fails by injection.
    fn injected(&mut self, map: &'static str) -> bool {
        let n = self.writes;
        self.writes += 1;
        self.fail_at.contains(&n) || self.failing_maps.contains(map)
    }

    fn done(&mut self, op: Op) {
        self.log.push(op);
        if let Some(h) = &mut self.history {
            h.push(self.contents.clone());
        }
    }
}

impl Maps for FakeMaps {
    fn insert(&mut self, e: Entry) -> Result<(), MapError> {
        let map = e.map();
        if self.injected(map) {
            return Err(syscall_error("bpf_map_update_elem", libc::EIO));
        }
        let full = self
            .capacity
            .get(map)
            .is_some_and(|c| self.contents.entries(map) >= *c);
        if full && !self.contents.has(&e) {
            // A trie has no preallocated room: the kernel says ENOSPC there.
            let errno = if map == MAP_SOURCE_RANGES || map == MAP_SOURCE_RANGES6 {
                libc::ENOSPC
            } else {
                libc::E2BIG
            };
            return Err(syscall_error("bpf_map_update_elem", errno));
        }
        self.contents.put(e);
        self.done(Op::Insert(e));
        Ok(())
    }

    fn insert_maglev(&mut self, svc_id: u32, table: &MaglevTable) -> Result<(), MapError> {
        if self.injected(MAP_MAGLEV) {
            return Err(syscall_error("bpf_map_update_elem", libc::EIO));
        }
        let full = self
            .capacity
            .get(MAP_MAGLEV)
            .is_some_and(|c| self.contents.maglev.len() >= *c);
        if full && !self.contents.maglev.contains_key(&svc_id) {
            return Err(syscall_error("bpf_map_update_elem", libc::E2BIG));
        }
        let n = (table.size as usize).min(table.backends.len());
        self.contents
            .maglev
            .insert(svc_id, table.backends[..n].to_vec());
        self.done(Op::InsertMaglev(svc_id));
        Ok(())
    }

    fn remove(&mut self, k: EntryKey) -> Result<(), MapError> {
        if self.injected(k.map()) {
            return Err(syscall_error("bpf_map_delete_elem", libc::EIO));
        }
        self.contents.delete(k);
        self.done(Op::Remove(k));
        Ok(())
    }

    fn reset_svc_stats(&mut self, svc_id: u32) -> Result<(), MapError> {
        // Not counted as a write: the tests that fail the Nth write count
        // the writes of the Service maps only.
        if self.failing_maps.contains(MAP_SVC_STATS) {
            return Err(syscall_error("bpf_map_update_elem", libc::EIO));
        }
        self.stats_reset.push(svc_id);
        Ok(())
    }

    fn services(&self) -> Result<Vec<(ServiceKey, ServiceValue)>, MapError> {
        Ok(pairs(&self.contents.services))
    }

    fn services6(&self) -> Result<Vec<(ServiceKey6, ServiceValue)>, MapError> {
        Ok(pairs(&self.contents.services6))
    }

    fn backends(&self) -> Result<Vec<(u32, AnyBackend)>, MapError> {
        let v4 = (self.contents.backends.iter()).map(|(id, b)| (*id, AnyBackend::V4(*b)));
        let v6 = (self.contents.backends6.iter()).map(|(id, b)| (*id, AnyBackend::V6(*b)));
        Ok(v4.chain(v6).collect())
    }

    fn backend(&self, id: u32) -> Result<Option<AnyBackend>, MapError> {
        let v4 = self.contents.backends.get(&id).map(|b| AnyBackend::V4(*b));
        Ok(v4.or_else(|| self.contents.backends6.get(&id).map(|b| AnyBackend::V6(*b))))
    }

    fn affinity_matches(&self) -> Result<Vec<AffinityMatchKey>, MapError> {
        Ok(self
            .contents
            .affinity_match
            .iter()
            .map(|(svc_id, backend_id)| AffinityMatchKey {
                svc_id: *svc_id,
                backend_id: *backend_id,
            })
            .collect())
    }

    fn source_ranges(&self) -> Result<Vec<RangeKey>, MapError> {
        Ok(self.contents.source_ranges.iter().copied().collect())
    }

    fn maglev_tables(&self) -> Result<BTreeMap<u32, StoredTable>, MapError> {
        Ok(self
            .contents
            .maglev
            .iter()
            .map(|(id, t)| {
                let stored = StoredTable {
                    size: t.len() as u32,
                    ids: t.iter().copied().collect(),
                };
                (*id, stored)
            })
            .collect())
    }

    fn conntrack(&self) -> Walk<(CtKey, CtValue)> {
        self.conntrack_walks.set(self.conntrack_walks.get() + 1);
        let all = self.contents.conntrack.iter().map(|(k, v)| Ok((*k, *v)));
        match self.conntrack_walk_fails_after {
            None => all.collect(),
            Some(n) => all
                .take(n)
                .chain([Err(syscall_error("bpf_map_get_next_key", libc::EIO))])
                .collect(),
        }
    }

    fn conntrack6(&self) -> Walk<(CtKey6, CtValue6)> {
        let all = self.contents.conntrack6.iter().map(|(k, v)| Ok((*k, *v)));
        all.collect()
    }

    fn conntrack_entry(&self, k: &CtKey) -> Option<CtValue> {
        (self.conntrack_since_walk.get(k))
            .or_else(|| self.contents.conntrack.get(k))
            .copied()
    }

    fn conntrack6_entry(&self, k: &CtKey6) -> Option<CtValue6> {
        self.contents.conntrack6.get(k).copied()
    }

    fn node_addrs(&self) -> Vec<[u8; 4]> {
        self.contents.node_addrs.iter().copied().collect()
    }

    fn node_addrs6(&self) -> Vec<Addr6> {
        self.contents.node_addrs6.iter().copied().collect()
    }

    fn meta(&self, slot: u32) -> u64 {
        self.contents.meta.get(&slot).copied().unwrap_or(0)
    }
}
