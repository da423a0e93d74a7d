//! The ids the writer hands out: svc_ids (an index of the per-CPU SVC_STATS
//! array) and backend ids (BACKENDS keys), with the slot references that
//! decide when a backend entry can go.
use std::{
    collections::BTreeSet,
    hash::{BuildHasher, RandomState},
};

use hashbrown::HashTable;

use service_common::*;

use super::{ApplyReport, describe};
use crate::dataplane::maps::{AnyBackend, Entry, Maps, written};

#[derive(Clone, Debug, Default)]
pub(super) struct Ids {
    /// Backend → its id in BACKENDS or BACKENDS6 (one id space).
    backends: ByBackend,
    /// Backend id → the backend and how many frontend slots use it, indexed
    /// by id: ids are handed out densely from 1 and reused, and at 100,000
    /// backends a hash map of them, growing, held twice their size.
    refs: Refs,
    /// Backend ids whose count fell to zero since the last release: the
    /// only candidates for removal, so a change does not scan every backend.
    unused: BTreeSet<u32>,
    next_backend_id: u32,
    free_backend_ids: Vec<u32>,
    next_svc_id: u32,
    /// svc_ids index the per-CPU SVC_STATS array: they stay below its size.
    svc_id_limit: u32,
    free_svc_ids: Vec<u32>,
}

impl Ids {
    pub fn new(svc_id_limit: u32) -> Self {
        Ids {
            next_backend_id: 1,
            next_svc_id: 1,
            svc_id_limit,
            ..Default::default()
        }
    }

    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }

    pub fn svc_id_limit(&self) -> u32 {
        self.svc_id_limit
    }

    /// A backend found in BACKENDS at start: released at the next apply
    /// unless a frontend slot refers to it.
    pub fn adopt_backend(&mut self, id: u32, b: AnyBackend) {
        // Listed twice (an agent stopped between writes): the other id keeps
        // its entry in `refs`, unused, so that its BACKENDS entry goes at
        // the next release; lookups find this one.
        if let Some(old) = self.backends.get(&self.refs, b) {
            self.backends.remove(b, old);
        }
        self.refs.set(id, Some((b, 0)));
        self.backends.insert(&self.refs, b, id);
        self.unused.insert(id);
        self.next_backend_id = self.next_backend_id.max(id + 1);
    }

    /// The backend behind `id`, when it is known.
    pub fn backend(&self, id: u32) -> Option<AnyBackend> {
        self.refs.get(id).map(|(b, _)| *b)
    }

    pub fn adopt_svc_id(&mut self, id: u32) {
        self.next_svc_id = self.next_svc_id.max(id + 1);
    }

    pub fn add_ref(&mut self, id: u32, delta: isize) {
        if let Some(e) = self.refs.get_mut(id) {
            e.1 = e.1.saturating_add_signed(delta as i32);
            if e.1 == 0 {
                self.unused.insert(id);
            }
        }
    }

    pub fn alloc_svc_id(&mut self) -> Option<u32> {
        if let Some(id) = self.free_svc_ids.pop() {
            return Some(id);
        }
        if self.next_svc_id >= self.svc_id_limit {
            return None;
        }
        self.next_svc_id += 1;
        Some(self.next_svc_id - 1)
    }

    pub fn free_svc_id(&mut self, id: u32) {
        self.free_svc_ids.push(id);
    }

    /// The ids of `backends`, in their order; those that are new are
    /// written into BACKENDS (BACKENDS6) first, together.
    pub fn backend_ids(
        &mut self,
        t: &mut impl Maps,
        backends: &[AnyBackend],
        report: &mut ApplyReport,
    ) -> Result<Vec<u32>, String> {
        let mut ids = Vec::with_capacity(backends.len());
        // Registered as they are handed out, so that a backend listed twice
        // gets one id; taken back below if their write fails.
        let mut fresh: Vec<(AnyBackend, u32)> = vec![];
        for b in backends {
            if let Some(id) = self.backends.get(&self.refs, *b) {
                ids.push(id);
                continue;
            }
            let id = match self.free_backend_ids.pop() {
                Some(id) => id,
                None => {
                    self.next_backend_id += 1;
                    self.next_backend_id - 1
                }
            };
            self.refs.set(id, Some((*b, 0)));
            self.backends.insert(&self.refs, *b, id);
            fresh.push((*b, id));
            ids.push(id);
        }
        let entries: Vec<Entry> = fresh.iter().map(|(b, id)| b.entry(*id)).collect();
        let (done, failed) = written(t.insert_all(&entries), fresh.len());
        for (_, id) in &fresh[..done] {
            report.backends_added += 1;
            // Released again if the frontend that asked for it fails to write.
            self.unused.insert(*id);
        }
        for (b, id) in &fresh[done..] {
            self.backends.remove(*b, *id);
            self.refs.set(*id, None);
            self.free_backend_ids.push(*id);
        }
        match (failed, fresh.get(done)) {
            (Some(e), Some((b, _))) => {
                let map = match b {
                    AnyBackend::V4(_) => MAP_BACKENDS,
                    AnyBackend::V6(_) => MAP_BACKENDS6,
                };
                Err(describe(map, e))
            }
            _ => Ok(ids),
        }
    }

    /// Removes the backends no slot refers to any more; one that cannot be
    /// removed is tried again at the next release.
    pub fn release_unused(&mut self, t: &mut impl Maps, report: &mut ApplyReport) {
        let unused: Vec<(AnyBackend, u32)> = std::mem::take(&mut self.unused)
            .into_iter()
            .filter_map(|id| match self.refs.get(id) {
                Some((b, 0)) => Some((*b, id)),
                _ => None,
            })
            .collect();
        for (b, id) in unused {
            match t.remove(b.entry_key(id)) {
                Ok(()) => {
                    self.backends.remove(b, id);
                    self.refs.set(id, None);
                    self.free_backend_ids.push(id);
                    report.backends_removed += 1;
                }
                Err(e) => {
                    self.unused.insert(id);
                    report.errors.push(format!("removing backend {id}: {e}"));
                }
            }
        }
    }
}

/// Backend id → (backend, slot references), as a vector indexed by id.
#[derive(Clone, Debug, Default)]
struct Refs(Vec<Option<(AnyBackend, u32)>>);

impl Refs {
    fn get(&self, id: u32) -> Option<&(AnyBackend, u32)> {
        self.0.get(id as usize)?.as_ref()
    }

    fn get_mut(&mut self, id: u32) -> Option<&mut (AnyBackend, u32)> {
        self.0.get_mut(id as usize)?.as_mut()
    }

    fn set(&mut self, id: u32, v: Option<(AnyBackend, u32)>) {
        let i = id as usize;
        if i >= self.0.len() {
            if v.is_none() {
                return;
            }
            self.0.resize(i + 1, None);
        }
        self.0[i] = v;
    }
}

/// Backend → id, as a table of bare ids hashed by the backend each names in
/// [`Refs`]: the backend is kept once, not again as a key.
#[derive(Clone, Debug, Default)]
struct ByBackend {
    table: HashTable<u32>,
    hasher: RandomState,
}

impl ByBackend {
    fn len(&self) -> usize {
        self.table.len()
    }

    fn get(&self, refs: &Refs, b: AnyBackend) -> Option<u32> {
        let named = |id: &u32| refs.get(*id).map(|(x, _)| *x) == Some(b);
        self.table.find(self.hasher.hash_one(b), named).copied()
    }

    /// `b` must have `id` in `refs` already, and no other id here.
    fn insert(&mut self, refs: &Refs, b: AnyBackend, id: u32) {
        let hasher = &self.hasher;
        let rehash = |id: &u32| refs.get(*id).map_or(0, |(x, _)| hasher.hash_one(x));
        self.table.insert_unique(hasher.hash_one(b), id, rehash);
    }

    /// `id`, which names `b`, if it is here.
    fn remove(&mut self, b: AnyBackend, id: u32) {
        if let Ok(e) = self.table.find_entry(self.hasher.hash_one(b), |x| *x == id) {
            e.remove();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::dataplane::fake::FakeMaps;

    fn backend(last: u8) -> AnyBackend {
        AnyBackend::new(Ipv4Addr::new(10, 1, 0, last).into(), 8080, IPPROTO_TCP, 0)
    }

    #[test]
    fn a_backend_adopted_under_two_ids_keeps_the_later_and_releases_the_other() {
        let mut t = FakeMaps::default();
        let mut report = ApplyReport::default();
        let b = backend(5);
        for id in [3, 7] {
            t.insert(b.entry(id)).unwrap();
        }
        let mut ids = Ids::new(100);
        ids.adopt_backend(3, b);
        ids.adopt_backend(7, b);
        assert_eq!(ids.backend_ids(&mut t, &[b], &mut report), Ok(vec![7]));
        ids.add_ref(7, 1);
        ids.release_unused(&mut t, &mut report);
        assert_eq!(t.contents.backends.keys().collect::<Vec<_>>(), [&7]);
        assert_eq!(ids.backend_count(), 1);
        assert_eq!(ids.backend(3), None);
    }

    #[test]
    fn new_backends_a_full_map_refuses_get_no_id_and_those_written_keep_theirs() {
        let mut t = FakeMaps::default();
        t.set_capacity(MAP_BACKENDS, 2);
        let mut report = ApplyReport::default();
        let mut ids = Ids::new(100);
        let all = [backend(1), backend(2), backend(3), backend(2)];
        let e = ids.backend_ids(&mut t, &all, &mut report).unwrap_err();
        assert!(e.contains("BACKENDS is full"), "{e}");
        assert_eq!(report.backends_added, 2);
        assert_eq!(ids.backend_count(), 2);
        assert_eq!(t.contents.backends.len(), 2);
        // The refused one's id is handed out again, to the next new backend.
        t.set_capacity(MAP_BACKENDS, 3);
        let got = ids.backend_ids(&mut t, &all, &mut report).unwrap();
        assert_eq!(got, [1, 2, 3, 2]);
    }
}
