//! Writing and removing one frontend. Every change, also a rollback, goes
//! through `transition`, whose order never lets a packet see a master that
//! counts more slots than are present, or fewer backends than before or
//! after the change.
use std::collections::{BTreeMap, BTreeSet};

use aya::maps::MapError;
use service_common::*;

use super::{ApplyReport, Writer, describe};
use crate::{
    dataplane::{
        maps::{Entry, EntryKey, Maps, RangeKey},
        readback::slot_key,
    },
    faults::FaultKind,
    plan::FrontendPlan,
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
}

impl Programmed {
    pub fn is_empty(&self) -> bool {
        self.master.is_none()
            && self.slots.is_empty()
            && self.members.is_empty()
            && self.ranges.is_empty()
    }

    pub fn backend_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.slots.values().map(|v| v.backend_id)
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
/// affinity memberships and slots first, then the master (the moment
/// packets switch), then what only the old state had. `cur` follows every
/// write that succeeds. Memberships removed land in `gone`.
fn transition(
    t: &mut impl Maps,
    mk: ServiceKey,
    cur: &mut Programmed,
    to: &Programmed,
    gone: &mut BTreeSet<(u32, u32)>,
) -> Result<(), Failed> {
    let svc_id = to.svc_id;
    for r in to.ranges.difference(&cur.ranges.clone()) {
        step(MAP_SOURCE_RANGES, t.insert(Entry::SourceRange(*r)))?;
        cur.ranges.insert(*r);
    }
    for id in to.members.difference(&cur.members.clone()) {
        let k = AffinityMatchKey {
            svc_id,
            backend_id: *id,
        };
        step(MAP_AFFINITY_MATCH, t.insert(Entry::AffinityMatch(k)))?;
        cur.members.insert(*id);
    }
    for (slot, v) in &to.slots {
        if cur.slots.get(slot) != Some(v) {
            step(
                MAP_SERVICES,
                t.insert(Entry::Service(slot_key(&mk, *slot), *v)),
            )?;
            cur.slots.insert(*slot, *v);
        }
    }
    if cur.master != to.master {
        step(
            MAP_SERVICES,
            match to.master {
                Some(m) => t.insert(Entry::Service(mk, m)),
                None => t.remove(EntryKey::Service(mk)),
            },
        )?;
        cur.master = to.master;
    }
    for r in cur.ranges.clone().difference(&to.ranges) {
        step(MAP_SOURCE_RANGES, t.remove(EntryKey::SourceRange(*r)))?;
        cur.ranges.remove(r);
    }
    let surplus: Vec<u16> = cur
        .slots
        .keys()
        .filter(|s| !to.slots.contains_key(s))
        .copied()
        .collect();
    for slot in surplus {
        step(
            MAP_SERVICES,
            t.remove(EntryKey::Service(slot_key(&mk, slot))),
        )?;
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

/// The master's flags for a frontend plan.
fn flags(mk: &ServiceKey, fe: &FrontendPlan) -> u16 {
    let mut flags = 0;
    if fe.reject_when_empty {
        flags |= SVC_F_REJECT_EMPTY;
    }
    if mk.addr == [0; 4] {
        flags |= SVC_F_NODEPORT;
    }
    if fe.affinity_timeout_s.is_some() {
        flags |= SVC_F_AFFINITY;
    }
    if !fe.source_ranges.is_empty() {
        flags |= SVC_F_SOURCE_RANGES;
    }
    if mk.scope == SCOPE_ALL && fe.in_cluster.is_some() {
        flags |= SVC_F_IN_CLUSTER;
    }
    flags
}

fn desired(mk: &ServiceKey, fe: &FrontendPlan, svc_id: u32, ids: &[u32]) -> Programmed {
    let master = ServiceValue {
        backend_id: 0,
        count: ids.len() as u16,
        flags: flags(mk, fe),
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
                addr: n.network().octets(),
            })
            .collect(),
    }
}

/// Keeps the pairs that left a UDP frontend: only UDP flows are flushed and
/// only host UDP sockets ended, so a TCP change never walks CONNTRACK
/// (seconds at 500k flows, on the agent's loop).
fn udp_only(mk: ServiceKey, gone: BTreeSet<(u32, u32)>, removed_pairs: &mut BTreeSet<(u32, u32)>) {
    if mk.proto == IPPROTO_UDP {
        removed_pairs.extend(gone);
    }
}

impl Writer {
    pub(super) fn write_frontend(
        &mut self,
        t: &mut impl Maps,
        mk: ServiceKey,
        fe: &FrontendPlan,
        removed_pairs: &mut BTreeSet<(u32, u32)>,
        report: &mut ApplyReport,
    ) -> Result<(), String> {
        let mut ids = Vec::with_capacity(fe.backends.len());
        for b in &fe.backends {
            let backend = Backend {
                addr: b.addr.octets(),
                port: b.port,
                proto: mk.proto,
                flags: if b.local { BE_F_LOCAL } else { 0 },
            };
            ids.push(self.ids.backend_id(t, backend, report)?);
        }
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
        let new = desired(&mk, fe, old.svc_id, &ids);
        if old == new {
            return Ok(());
        }
        let mut cur = old.clone();
        let mut gone = BTreeSet::new();
        let result = match transition(t, mk, &mut cur, &new, &mut gone) {
            Ok(()) => Ok(()),
            Err(Failed(map, e)) => {
                let mut why = describe(map, e);
                // Back to the state before, in the same safe order.
                if let Err(Failed(map, e)) = transition(t, mk, &mut cur, &old, &mut gone) {
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

    /// Records `cur` as what the maps hold for `mk`, moving the slot
    /// references from `old`; a frontend with nothing left gives its svc_id back.
    fn settle(&mut self, mk: ServiceKey, old: &Programmed, cur: Programmed) {
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
        mk: ServiceKey,
        removed_pairs: &mut BTreeSet<(u32, u32)>,
        report: &mut ApplyReport,
    ) -> Result<(), String> {
        let Some(old) = self.frontends.get(&mk).cloned() else {
            return Ok(());
        };
        let mut cur = old.clone();
        let mut gone = BTreeSet::new();
        let result = transition(t, mk, &mut cur, &Programmed::empty(old.svc_id), &mut gone)
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
