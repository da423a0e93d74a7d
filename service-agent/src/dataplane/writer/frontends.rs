//! Writing and removing one frontend. Every change, also a rollback, goes
//! through `transition`, whose order never lets a packet see a master that
//! counts more slots than are present, a Maglev flag without its table, or
//! fewer backends than before or after the change.
use std::collections::{BTreeMap, BTreeSet};

use aya::maps::MapError;
use service_common::*;

use super::{
    ApplyReport, Writer, describe,
    maglev::{MaglevState, TableCache},
};
use crate::{
    dataplane::{
        maps::{AnyBackend, Entry, EntryKey, Maps, RangeKey, written},
        readback::{FeKey, slot_key},
    },
    faults::FaultKind,
    plan::{FrontendPlan, maglev::Member},
};

/// The entries of one frontend in the maps, exactly: updated after each
/// write that succeeds, so even a write whose rollback failed leaves the
/// writer knowing what is there.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Programmed {
    pub svc_id: u32,
    /// `None`: SERVICES has no master entry for the frontend.
    pub master: Option<ServiceValue>,
    pub slots: BTreeMap<u16, ServiceValue>,
    /// AFFINITY_MATCH entries (svc_id, backend id), by backend id.
    pub members: BTreeSet<u32>,
    pub ranges: BTreeSet<RangeKey>,
    /// The MAGLEV table under svc_id, when there is one.
    pub maglev: Option<MaglevState>,
}

impl Programmed {
    pub fn is_empty(&self) -> bool {
        self.master.is_none()
            && self.slots.is_empty()
            && self.members.is_empty()
            && self.ranges.is_empty()
            && self.maglev.is_none()
    }

    /// The backend ids the frontend's entries name: its slots, then its
    /// table's (the same set when both are current; they differ while one
    /// is behind, and each keeps its backends alive meanwhile).
    pub fn backend_ids(&self) -> impl Iterator<Item = u32> + '_ {
        let table = self.maglev.iter().flat_map(|m| m.ids.iter().copied());
        self.slots.values().map(|v| v.backend_id).chain(table)
    }

    fn empty(svc_id: u32) -> Self {
        Programmed {
            svc_id,
            ..Default::default()
        }
    }
}

/// A write that failed: the map and the kernel's error.
struct Failed(&'static str, MapError);

fn step(cur_map: &'static str, r: Result<(), MapError>) -> Result<(), Failed> {
    r.map_err(|e| Failed(cur_map, e))
}

/// Brings the frontend at `mk` from `cur` to `to`: allowed sources,
/// affinity memberships, slots and the Maglev table first, then the master
/// (the moment packets switch), then what only the old state had. `cur`
/// follows every write that succeeds. Memberships removed land in `gone`.
fn transition(
    t: &mut impl Maps,
    mk: FeKey,
    cur: &mut Programmed,
    to: &Programmed,
    gone: &mut BTreeSet<(u32, u32)>,
    tables: &mut TableCache,
) -> Result<(), Failed> {
    let svc_id = to.svc_id;
    for r in to.ranges.difference(&cur.ranges.clone()) {
        step(r.map(), t.insert(Entry::SourceRange(*r)))?;
        cur.ranges.insert(*r);
    }
    let members: Vec<u32> = to.members.difference(&cur.members).copied().collect();
    let entries: Vec<Entry> = (members.iter())
        .map(|id| {
            Entry::AffinityMatch(AffinityMatchKey {
                svc_id,
                backend_id: *id,
            })
        })
        .collect();
    let (done, failed) = written(t.insert_all(&entries), members.len());
    cur.members.extend(members[..done].iter().copied());
    if let Some(e) = failed {
        return Err(Failed(MAP_AFFINITY_MATCH, e));
    }
    let slots: Vec<(u16, ServiceValue)> = (to.slots.iter())
        .filter(|(slot, v)| cur.slots.get(slot) != Some(v))
        .map(|(slot, v)| (*slot, *v))
        .collect();
    let entries: Vec<Entry> = (slots.iter())
        .map(|(slot, v)| slot_key(&mk, *slot).entry(*v))
        .collect();
    let (done, failed) = written(t.insert_all(&entries), slots.len());
    cur.slots.extend(slots[..done].iter().copied());
    if let Some(e) = failed {
        return Err(Failed(services_map(&mk), e));
    }
    if let Some(m) = &to.maglev
        && cur.maglev.as_ref() != Some(m)
    {
        // One update replaces the whole table; the backends both tables
        // name stay in BACKENDS until the apply ends.
        step(MAP_MAGLEV, t.insert_maglev(svc_id, &tables.value(m)))?;
        cur.maglev = Some(m.clone());
    }
    if cur.master != to.master {
        step(
            services_map(&mk),
            match to.master {
                Some(m) => t.insert(mk.entry(m)),
                None => t.remove(mk.entry_key()),
            },
        )?;
        cur.master = to.master;
    }
    if to.maglev.is_none() && cur.maglev.is_some() {
        step(MAP_MAGLEV, t.remove(EntryKey::Maglev(cur.svc_id)))?;
        cur.maglev = None;
    }
    for r in cur.ranges.clone().difference(&to.ranges) {
        step(r.map(), t.remove(EntryKey::SourceRange(*r)))?;
        cur.ranges.remove(r);
    }
    let surplus: Vec<u16> = cur
        .slots
        .keys()
        .filter(|s| !to.slots.contains_key(s))
        .copied()
        .collect();
    for slot in surplus {
        step(services_map(&mk), t.remove(slot_key(&mk, slot).entry_key()))?;
        cur.slots.remove(&slot);
    }
    for id in cur.members.clone().difference(&to.members) {
        let k = AffinityMatchKey {
            svc_id: cur.svc_id,
            backend_id: *id,
        };
        step(MAP_AFFINITY_MATCH, t.remove(EntryKey::AffinityMatch(k)))?;
        cur.members.remove(id);
        gone.insert((cur.svc_id, *id));
    }
    Ok(())
}

/// The SERVICES map of the frontend's family, for errors.
fn services_map(mk: &FeKey) -> &'static str {
    match mk {
        FeKey::V4(_) => MAP_SERVICES,
        FeKey::V6(_) => MAP_SERVICES6,
    }
}

/// The master's flags for a frontend plan.
fn flags(mk: &FeKey, fe: &FrontendPlan) -> u16 {
    let mut flags = 0;
    if fe.reject_when_empty {
        flags |= SVC_F_REJECT_EMPTY;
    }
    if mk.is_node_port() {
        flags |= SVC_F_NODEPORT;
    }
    if fe.affinity_timeout_s.is_some() {
        flags |= SVC_F_AFFINITY;
    }
    if !fe.source_ranges.is_empty() {
        flags |= SVC_F_SOURCE_RANGES;
    }
    if mk.scope() == SCOPE_ALL && fe.in_cluster.is_some() {
        flags |= SVC_F_IN_CLUSTER;
    }
    flags
}

fn desired(
    mk: &FeKey,
    fe: &FrontendPlan,
    svc_id: u32,
    ids: &[u32],
    maglev: Option<MaglevState>,
) -> Programmed {
    let maglev_flag = if maglev.is_some() { SVC_F_MAGLEV } else { 0 };
    let master = ServiceValue {
        backend_id: 0,
        count: ids.len() as u16,
        flags: flags(mk, fe) | maglev_flag,
        svc_id,
        affinity_timeout_s: fe.affinity_timeout_s.unwrap_or(0),
    };
    let slots = ids.iter().enumerate().map(|(i, id)| {
        let v = ServiceValue {
            backend_id: *id,
            svc_id,
            ..Default::default()
        };
        (i as u16 + 1, v)
    });
    Programmed {
        svc_id,
        master: Some(master),
        slots: slots.collect(),
        members: ids.iter().copied().collect(),
        ranges: fe
            .source_ranges
            .iter()
            .map(|n| RangeKey {
                svc_id,
                prefix: n.prefix,
                addr: n.network(),
            })
            .collect(),
        maglev,
    }
}

/// `p` without its Maglev table: what a frontend falls back to when the
/// table cannot be written (its new flows are spread at random).
fn without_table(p: &Programmed) -> Programmed {
    let master = p.master.map(|m| ServiceValue {
        flags: m.flags & !SVC_F_MAGLEV,
        ..m
    });
    Programmed {
        master,
        maglev: None,
        ..p.clone()
    }
}

/// Keeps the pairs that left a UDP frontend: only UDP flows are flushed and
/// only host UDP sockets ended, so a TCP change never walks CONNTRACK
/// (seconds at 500k flows, on the agent's loop).
fn udp_only(mk: FeKey, gone: BTreeSet<(u32, u32)>, removed_pairs: &mut BTreeSet<(u32, u32)>) {
    if mk.proto() == IPPROTO_UDP {
        removed_pairs.extend(gone);
    }
}

impl Writer {
    pub(super) fn write_frontend(
        &mut self,
        t: &mut impl Maps,
        mk: FeKey,
        fe: &FrontendPlan,
        removed_pairs: &mut BTreeSet<(u32, u32)>,
        report: &mut ApplyReport,
    ) -> Result<(), String> {
        let backends: Vec<AnyBackend> = (fe.backends.iter())
            .map(|b| {
                let flags = if b.local { BE_F_LOCAL } else { 0 };
                AnyBackend::new(b.addr, b.port, mk.proto(), flags)
            })
            .collect();
        let ids = self.ids.backend_ids(t, &backends, report)?;
        if ids.len() > u16::MAX as usize - 1 {
            return Err(format!(
                "{} backends, more than a frontend can hold",
                ids.len()
            ));
        }
        let old = match self.frontends.get(&mk) {
            Some(p) => p.clone(),
            None => Programmed::empty(self.ids.alloc_svc_id().ok_or_else(|| {
                format!(
                    "more than {} frontends; raise --frontends-max",
                    self.ids.svc_id_limit() - 1
                )
            })?),
        };
        let (maglev, unhashed) = self.maglev_state(fe, &ids);
        let new = desired(&mk, fe, old.svc_id, &ids, maglev);
        if old == new {
            return unhashed.map_or(Ok(()), Err);
        }
        let mut cur = old.clone();
        let mut gone = BTreeSet::new();
        let tables = &mut self.tables;
        let result = match transition(t, mk, &mut cur, &new, &mut gone, tables) {
            Ok(()) => unhashed.map_or(Ok(()), Err),
            Err(Failed(map, e)) => {
                let mut why = describe(map, e);
                // A table that cannot be written (a full MAGLEV map) costs
                // the frontend consistent hashing, not its new state.
                let fell_back = map == MAP_MAGLEV
                    && new.maglev.is_some()
                    && transition(t, mk, &mut cur, &without_table(&new), &mut gone, tables).is_ok();
                if fell_back {
                    why.push_str("; its new flows are spread at random until the table fits");
                // Else back to the state before, in the same safe order.
                } else if let Err(Failed(map, e)) =
                    transition(t, mk, &mut cur, &old, &mut gone, tables)
                {
                    let e = describe(map, e);
                    why.push_str(&format!("; and rolling back: {e}"));
                    report.faults.push((
                        FaultKind::Rollback,
                        format!("Service {} frontend {mk:?}: {e}", fe.service),
                    ));
                }
                Err(why)
            }
        };
        // A membership that went and came back lost no flow.
        gone.retain(|(_, id)| !cur.members.contains(id));
        udp_only(mk, gone, removed_pairs);
        if result.is_ok() {
            report.frontends_written += 1;
        }
        self.settle(mk, &old, cur);
        result
    }

    /// The Maglev table a frontend with backends `ids` (in the order of
    /// its plan's) should have, and why it has none when it should.
    fn maglev_state(
        &self,
        fe: &FrontendPlan,
        ids: &[u32],
    ) -> (Option<MaglevState>, Option<String>) {
        let Some(size) = self.balancing.table_size(fe.kind) else {
            return (None, None);
        };
        if ids.is_empty() {
            return (None, None);
        }
        let members = fe.backends.iter().zip(ids).map(|(b, id)| {
            let m = Member {
                addr: b.addr,
                port: b.port,
            };
            (m, *id)
        });
        let state = MaglevState::new(size, members);
        if state.members.len() > size as usize {
            let why = format!(
                "{} backends do not fit a Maglev table of {size}; raise \
                 --maglev-table-size (its new flows are spread at random)",
                state.members.len()
            );
            return (None, Some(why));
        }
        (Some(state), None)
    }

    /// Records `cur` as what the maps hold for `mk`, moving the slot
    /// references from `old`; a frontend with nothing left gives its svc_id back.
    fn settle(&mut self, mk: FeKey, old: &Programmed, cur: Programmed) {
        for id in cur.backend_ids() {
            self.ids.add_ref(id, 1);
        }
        for id in old.backend_ids() {
            self.ids.add_ref(id, -1);
        }
        if cur.is_empty() {
            self.frontends.remove(&mk);
            self.ids.free_svc_id(cur.svc_id);
        } else {
            self.frontends.insert(mk, cur);
        }
    }

    pub(super) fn remove_frontend(
        &mut self,
        t: &mut impl Maps,
        mk: FeKey,
        removed_pairs: &mut BTreeSet<(u32, u32)>,
        report: &mut ApplyReport,
    ) -> Result<(), String> {
        let Some(old) = self.frontends.get(&mk).cloned() else {
            return Ok(());
        };
        let mut cur = old.clone();
        let mut gone = BTreeSet::new();
        let result = transition(
            t,
            mk,
            &mut cur,
            &Programmed::empty(old.svc_id),
            &mut gone,
            &mut self.tables,
        )
        .map_err(|Failed(map, e)| describe(map, e));
        udp_only(mk, gone, removed_pairs);
        if cur.is_empty() {
            // A reused svc_id must start its counters from zero.
            if let Err(e) = t.reset_svc_stats(old.svc_id) {
                report.faults.push((
                    FaultKind::StatsReset,
                    format!("zeroing the counters of svc_id {}: {e}", old.svc_id),
                ));
            }
            report.frontends_removed += 1;
        }
        self.settle(mk, &old, cur);
        result
    }
}
