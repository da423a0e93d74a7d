//! Turning a plan into map writes, in an order that never lets a packet see a
//! frontend with fewer usable backends than before or after the change.
//! The writer works through the `Maps` interface: the pinned maps in the
//! agent, an in-memory fake in the unit tests.
mod flow_limits;
mod flows;
mod frontends;
mod ids;
mod maglev;
mod node_addrs;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use aya::maps::MapError;
use service_common::*;

pub use self::flow_limits::FlowLimits;
pub use self::flows::{
    CT_TCP_CLOSING_TIMEOUT_NS, CT_TCP_SYN_TIMEOUT_NS, CT_TCP_TIMEOUT_NS, CT_UDP_TIMEOUT_NS,
    FlowPass, Lifetimes, expire_conntrack,
};
pub use self::node_addrs::snat_source;
use self::{frontends::Programmed, ids::Ids, maglev::MaglevState};
use super::{
    maps::{EntryKey, Maps},
    readback::{FeKey, read_frontends},
};
use crate::{
    faults::FaultKind,
    plan::{
        FrontendKey, FrontendPlan, Plan,
        maglev::{Balancing, Member},
    },
};

/// What one apply did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    pub frontends_written: usize,
    pub frontends_removed: usize,
    pub backends_added: usize,
    pub backends_removed: usize,
    pub udp_flows_flushed: usize,
    /// (svc_id, backend_id) pairs that left their UDP frontend: their
    /// flows were flushed, and the host sockets connected to them are ended.
    pub removed_pairs: BTreeSet<(u32, u32)>,
    /// Frontends that could not be written, with the Service and the reason;
    /// their previous state stays in the maps.
    pub errors: Vec<String>,
    /// What else failed (a rollback, a counter reset, the UDP flow flush),
    /// by kind: none of it leaves a frontend unwritten, all of it is reported.
    pub faults: Vec<(FaultKind, String)>,
}

/// The agent's view of what is in the maps, rebuilt from them at start.
#[derive(Clone, Debug)]
pub struct Writer {
    frontends: BTreeMap<FeKey, Programmed>,
    ids: Ids,
    /// Frontends whose last write failed: retried at every apply, so a
    /// frontend refused by a full map gets in once there is room, and its
    /// error keeps being reported until then.
    failed: BTreeSet<FrontendKey>,
    /// How the frontends reached from outside pick backends for new flows.
    balancing: Balancing,
    tables: maglev::TableCache,
}

/// The master key of a frontend, in its family's map.
pub fn master_key(k: &FrontendKey) -> FeKey {
    let (port, proto) = (k.port, k.proto.number());
    match k.addr {
        IpAddr::V4(a) => FeKey::V4(ServiceKey {
            addr: a.octets(),
            port,
            proto,
            scope: SCOPE_ALL,
            slot: 0,
            _pad: 0,
        }),
        IpAddr::V6(a) => FeKey::V6(ServiceKey6 {
            addr: a.octets(),
            port,
            proto,
            scope: SCOPE_ALL,
            slot: 0,
            _pad: 0,
        }),
    }
}

/// The master key of a frontend's entry set for sources inside the cluster.
pub fn in_cluster_key(k: &FrontendKey) -> FeKey {
    master_key(k).with_scope(SCOPE_IN_CLUSTER)
}

/// The entry set of a frontend's plan for sources inside the cluster, when
/// it has one: the same frontend with the in-cluster backends.
fn in_cluster_plan(fe: &FrontendPlan) -> Option<FrontendPlan> {
    Some(FrontendPlan {
        backends: fe.in_cluster.clone()?,
        in_cluster: None,
        ..fe.clone()
    })
}

/// A map error as the operator needs to read it: a full map says which flag raises it.
fn describe(map: &str, e: MapError) -> String {
    // A full hash map answers E2BIG, a full LPM trie ENOSPC.
    let full = matches!(&e, MapError::SyscallError(s)
        if matches!(s.io_error.raw_os_error(), Some(libc::E2BIG | libc::ENOSPC)));
    match (full, map) {
        (true, MAP_SERVICES | MAP_SERVICES6) => format!("map {map} is full; raise --services-max"),
        (true, MAP_BACKENDS | MAP_BACKENDS6 | MAP_AFFINITY_MATCH) => {
            format!("map {map} is full; raise --backends-max")
        }
        (true, MAP_MAGLEV) => format!("map {map} is full; raise --maglev-max"),
        (true, _) => format!("map {map} is full"),
        _ => format!("map {map}: {e}"),
    }
}

pub fn nr_cpus() -> usize {
    aya::util::nr_cpus().unwrap_or(1)
}

impl Writer {
    /// Rebuilds the bookkeeping from maps that a previous agent left pinned,
    /// so that a restart rewrites only what changed and keeps conntrack.
    pub fn adopt(t: &mut impl Maps, svc_id_limit: u32) -> Result<Self, MapError> {
        let mut w = Writer {
            frontends: BTreeMap::new(),
            ids: Ids::new(svc_id_limit),
            failed: BTreeSet::new(),
            balancing: Balancing::default(),
            tables: maglev::TableCache::default(),
        };
        let mut stored = read_frontends(t)?;
        let mut tables = t.maglev_tables()?;
        let mut members: HashMap<u32, BTreeSet<u32>> = HashMap::new();
        for k in t.affinity_matches()? {
            members.entry(k.svc_id).or_default().insert(k.backend_id);
        }
        for (id, b) in t.backends()? {
            w.ids.adopt_backend(id, b);
        }
        for (mk, f) in stored.frontends {
            let svc_id = f.master.svc_id;
            w.ids.adopt_svc_id(svc_id);
            // Slots beyond the count or a count beyond the slots (an agent
            // that died mid-update) stay recorded as they are: the next
            // write of the frontend brings them to the plan.
            let p = Programmed {
                svc_id,
                master: Some(f.master),
                slots: f.slots,
                members: members.remove(&svc_id).unwrap_or_default(),
                ranges: stored.ranges.remove(&svc_id).unwrap_or_default(),
                // Its members in the order a new table numbers them: equal
                // to the plan's state when the backend set is unchanged.
                maglev: tables.remove(&svc_id).map(|st| {
                    let members = st.ids.iter().filter_map(|id| {
                        let b = w.ids.backend(*id)?;
                        let m = Member {
                            addr: b.addr(),
                            port: b.port(),
                        };
                        Some((m, *id))
                    });
                    MaglevState::new(st.size, members)
                }),
            };
            for id in p.backend_ids() {
                w.ids.add_ref(id, 1);
            }
            w.frontends.insert(mk, p);
        }
        // The cluster's pod ranges belong to no frontend.
        stored.ranges.remove(&CLUSTER_CIDRS_ID);
        // What no master owns is left by an agent that died removing a frontend.
        let orphans = (stored.orphan_slots.into_iter().map(FeKey::entry_key))
            .chain(members.into_iter().flat_map(|(svc_id, ids)| {
                ids.into_iter().map(move |backend_id| {
                    EntryKey::AffinityMatch(AffinityMatchKey { svc_id, backend_id })
                })
            }))
            .chain(
                stored
                    .ranges
                    .into_values()
                    .flatten()
                    .map(EntryKey::SourceRange),
            )
            .chain(tables.into_keys().map(EntryKey::Maglev));
        for k in orphans.collect::<Vec<_>>() {
            t.remove(k)?;
        }
        Ok(w)
    }

    /// Sets how new flows pick backends; the next apply brings every
    /// frontend's tables to it.
    pub fn set_balancing(&mut self, b: Balancing) {
        self.balancing = b;
    }

    pub fn frontend_count(&self) -> usize {
        self.frontends.len()
    }

    pub fn backend_count(&self) -> usize {
        self.ids.backend_count()
    }

    /// Brings the maps to `plan`. Frontends that cannot be written keep their
    /// previous state and are named in the report.
    pub fn apply(&mut self, t: &mut impl Maps, plan: &Plan) -> ApplyReport {
        let mut report = ApplyReport::default();
        let mut removed_pairs = BTreeSet::new();
        let mut desired = BTreeSet::new();
        self.failed.clear();
        for (fk, fe) in &plan.frontends {
            desired.insert(master_key(fk));
            if fe.in_cluster.is_some() {
                desired.insert(in_cluster_key(fk));
            }
            self.write_or_report(t, fk, fe, &mut removed_pairs, &mut report);
        }
        // Frontends the plan no longer has, except those of Services the
        // planner refused: those keep their last good state. (In key
        // order: a frontend's own set goes before its in-cluster one.)
        let mut gone: Vec<FeKey> = self.frontends.keys().copied().collect();
        gone.retain(|k| !desired.contains(k));
        for mk in gone {
            if let Err(e) = self.remove_frontend(t, mk, &mut removed_pairs, &mut report) {
                report.errors.push(format!("removing frontend {mk:?}: {e}"));
            }
        }
        self.finish(t, &removed_pairs, report)
    }

    /// Brings only the frontends named in `changed` to `plan` (written when
    /// the plan has them, removed when not): what an incremental plan
    /// reports after a change. The other frontends are not looked at.
    pub fn apply_changes(
        &mut self,
        t: &mut impl Maps,
        plan: &Plan,
        changed: &BTreeSet<FrontendKey>,
    ) -> ApplyReport {
        let mut report = ApplyReport::default();
        let mut removed_pairs = BTreeSet::new();
        let keys: BTreeSet<FrontendKey> = changed.union(&self.failed).copied().collect();
        // Removals first: the room they free may be what a write needs.
        for fk in keys.iter().filter(|k| !plan.frontends.contains_key(k)) {
            self.failed.remove(fk);
            for mk in [master_key(fk), in_cluster_key(fk)] {
                if let Err(e) = self.remove_frontend(t, mk, &mut removed_pairs, &mut report) {
                    self.failed.insert(*fk);
                    report.errors.push(format!("removing frontend {fk}: {e}"));
                }
            }
        }
        for (fk, fe) in keys
            .iter()
            .filter_map(|k| Some((k, plan.frontends.get(k)?)))
        {
            self.write_or_report(t, fk, fe, &mut removed_pairs, &mut report);
        }
        self.finish(t, &removed_pairs, report)
    }

    /// Writes the entry sets of one frontend: the in-cluster one exists
    /// before the master that sends sources there, and goes after it.
    fn write_or_report(
        &mut self,
        t: &mut impl Maps,
        fk: &FrontendKey,
        fe: &FrontendPlan,
        removed_pairs: &mut BTreeSet<(u32, u32)>,
        report: &mut ApplyReport,
    ) {
        let (own, inner) = (master_key(fk), in_cluster_key(fk));
        let results = match in_cluster_plan(fe) {
            Some(fi) => [
                self.write_frontend(t, inner, &fi, removed_pairs, report),
                self.write_frontend(t, own, fe, removed_pairs, report),
            ],
            None => [
                self.write_frontend(t, own, fe, removed_pairs, report),
                self.remove_frontend(t, inner, removed_pairs, report),
            ],
        };
        self.failed.remove(fk);
        for e in results.into_iter().filter_map(Result::err) {
            self.failed.insert(*fk);
            report
                .errors
                .push(format!("Service {} frontend {fk}: {e}", fe.service));
        }
    }

    fn finish(
        &mut self,
        t: &mut impl Maps,
        removed_pairs: &BTreeSet<(u32, u32)>,
        mut report: ApplyReport,
    ) -> ApplyReport {
        let flushed = flows::flush_udp_flows(t, removed_pairs);
        report.udp_flows_flushed = flushed.removed;
        (report.faults)
            .extend((flushed.errors.into_iter()).map(|e| (FaultKind::ConntrackFlush, e)));
        report.removed_pairs = removed_pairs.clone();
        // Only now: until every table naming them has been replaced.
        self.ids.release_unused(t, &mut report);
        self.tables.clear();
        report
    }
}
