//! Turning a plan into map writes, in an order that never lets a packet see a
//! frontend with fewer usable backends than before or after the change.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
};

use aya::maps::{MapError, PerCpuValues, lpm_trie::Key};
use service_common::*;

use super::tables::Tables;
use crate::plan::{FrontendKey, FrontendPlan, Plan};

/// How long a conntrack entry lives without traffic.
pub const CT_TCP_TIMEOUT_NS: u64 = 6 * 3600 * 1_000_000_000;
pub const CT_TCP_CLOSING_TIMEOUT_NS: u64 = 10 * 1_000_000_000;
pub const CT_UDP_TIMEOUT_NS: u64 = 120 * 1_000_000_000;

#[derive(Clone, Debug, PartialEq, Eq)]
struct Programmed {
    svc_id: u32,
    master: ServiceValue,
    backend_ids: Vec<u32>,
    /// loadBalancerSourceRanges as (prefix length, network address).
    source_ranges: BTreeSet<(u8, [u8; 4])>,
}

fn range_key(svc_id: u32, (prefix, addr): (u8, [u8; 4])) -> Key<SourceRange> {
    Key::new(
        32 + prefix as u32,
        SourceRange {
            svc_id: svc_id.to_be_bytes(),
            addr,
        },
    )
}

/// What one apply did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    pub frontends_written: usize,
    pub frontends_removed: usize,
    pub backends_added: usize,
    pub backends_removed: usize,
    pub udp_flows_flushed: usize,
    /// (svc_id, backend_id) pairs that left their frontend, for ending the
    /// host sockets connected to them.
    pub removed_pairs: BTreeSet<(u32, u32)>,
    /// Frontends that could not be written, with the Service and the reason;
    /// their previous state stays in the maps.
    pub errors: Vec<String>,
}

/// The agent's view of what is in the maps, rebuilt from them at start.
#[derive(Default)]
pub struct Writer {
    frontends: BTreeMap<ServiceKey, Programmed>,
    /// Backend → its id in BACKENDS.
    backends: HashMap<Backend, u32>,
    /// Backend id → the backend and how many frontend slots use it.
    refs: HashMap<u32, (Backend, usize)>,
    /// Frontends whose last write failed: retried at every apply, so a
    /// frontend refused by a full map gets in once there is room, and its
    /// error keeps being reported until then.
    failed: BTreeSet<FrontendKey>,
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

pub fn master_key(k: &FrontendKey) -> ServiceKey {
    ServiceKey {
        addr: k.addr.octets(),
        port: k.port,
        proto: k.proto.number(),
        scope: SCOPE_ALL,
        slot: 0,
        _pad: 0,
    }
}

fn slot_key(master: &ServiceKey, slot: u16) -> ServiceKey {
    ServiceKey { slot, ..*master }
}

fn is_not_found(e: &MapError) -> bool {
    matches!(e, MapError::KeyNotFound | MapError::ElementNotFound)
        || matches!(e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::ENOENT))
}

/// A map error as the operator needs to read it: a full map says which flag raises it.
fn describe(map: &str, e: MapError) -> String {
    let full =
        matches!(&e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::E2BIG));
    match (full, map) {
        (true, MAP_SERVICES) => format!("map {map} is full; raise --services-max"),
        (true, MAP_BACKENDS | MAP_AFFINITY_MATCH) => {
            format!("map {map} is full; raise --backends-max")
        }
        (true, _) => format!("map {map} is full"),
        _ => format!("map {map}: {e}"),
    }
}

fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(e) if is_not_found(&e) => Ok(()),
        other => other,
    }
}

impl Writer {
    /// Rebuilds the bookkeeping from maps that a previous agent left pinned,
    /// so that a restart rewrites only what changed and keeps conntrack.
    pub fn adopt(t: &mut Tables, svc_id_limit: u32) -> Result<Self, MapError> {
        let mut w = Writer {
            next_backend_id: 1,
            next_svc_id: 1,
            svc_id_limit,
            ..Default::default()
        };
        let mut masters = BTreeMap::new();
        let mut slots: BTreeMap<ServiceKey, BTreeMap<u16, u32>> = BTreeMap::new();
        for entry in t.services.iter() {
            let (k, v) = entry?;
            if k.slot == 0 {
                masters.insert(k, v);
            } else {
                slots
                    .entry(slot_key(&k, 0))
                    .or_default()
                    .insert(k.slot, v.backend_id);
            }
        }
        let mut ranges: HashMap<u32, BTreeSet<(u8, [u8; 4])>> = HashMap::new();
        for key in t.source_ranges.keys() {
            let key = key?;
            let data = key.data();
            ranges
                .entry(u32::from_be_bytes(data.svc_id))
                .or_default()
                .insert(((key.prefix_len().saturating_sub(32)) as u8, data.addr));
        }
        let mut by_id: HashMap<u32, Backend> = HashMap::new();
        for entry in t.backends.iter() {
            let (id, b) = entry?;
            by_id.insert(id, b);
            w.next_backend_id = w.next_backend_id.max(id + 1);
        }
        let mut stray_slots = vec![];
        for (k, master) in masters {
            let mut ids = vec![];
            let have = slots.remove(&k).unwrap_or_default();
            for (slot, id) in &have {
                if *slot <= master.count {
                    ids.push(*id);
                } else {
                    stray_slots.push(slot_key(&k, *slot));
                }
            }
            if ids.len() != master.count as usize || ids.iter().any(|i| !by_id.contains_key(i)) {
                // Half-written by an agent that died mid-update: rewrite it
                // in full at the next apply.
                ids.clear();
            }
            w.next_svc_id = w.next_svc_id.max(master.svc_id + 1);
            w.frontends.insert(
                k,
                Programmed {
                    svc_id: master.svc_id,
                    master,
                    backend_ids: ids,
                    source_ranges: ranges.remove(&master.svc_id).unwrap_or_default(),
                },
            );
        }
        for (k, rest) in slots {
            stray_slots.extend(rest.keys().map(|s| slot_key(&k, *s)));
        }
        for k in stray_slots {
            ignore_missing(t.services.remove(&k))?;
        }
        for (id, b) in by_id {
            // Backends no frontend uses are released at the next apply.
            w.backends.insert(b, id);
            w.refs.insert(id, (b, 0));
            w.unused.insert(id);
        }
        let used: Vec<u32> = w
            .frontends
            .values()
            .flat_map(|p| p.backend_ids.clone())
            .collect();
        for id in used {
            w.add_ref(id, 1);
        }
        Ok(w)
    }

    pub fn frontend_count(&self) -> usize {
        self.frontends.len()
    }

    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }

    fn add_ref(&mut self, id: u32, delta: isize) {
        if let Some(e) = self.refs.get_mut(&id) {
            e.1 = e.1.saturating_add_signed(delta);
            if e.1 == 0 {
                self.unused.insert(id);
            }
        }
    }

    fn alloc_svc_id(&mut self) -> Option<u32> {
        if let Some(id) = self.free_svc_ids.pop() {
            return Some(id);
        }
        if self.next_svc_id >= self.svc_id_limit {
            return None;
        }
        self.next_svc_id += 1;
        Some(self.next_svc_id - 1)
    }

    fn backend_id(
        &mut self,
        t: &mut Tables,
        b: Backend,
        report: &mut ApplyReport,
    ) -> Result<u32, String> {
        if let Some(id) = self.backends.get(&b) {
            return Ok(*id);
        }
        let id = match self.free_backend_ids.pop() {
            Some(id) => id,
            None => {
                self.next_backend_id += 1;
                self.next_backend_id - 1
            }
        };
        if let Err(e) = t.backends.insert(id, b, 0) {
            self.free_backend_ids.push(id);
            return Err(describe(MAP_BACKENDS, e));
        }
        report.backends_added += 1;
        self.backends.insert(b, id);
        self.refs.insert(id, (b, 0));
        // Released again if the frontend that asked for it fails to write.
        self.unused.insert(id);
        Ok(id)
    }

    /// Brings the maps to `plan`. Frontends that cannot be written keep their
    /// previous state and are named in the report.
    pub fn apply(&mut self, t: &mut Tables, plan: &Plan) -> ApplyReport {
        let mut report = ApplyReport::default();
        let mut removed_pairs: BTreeSet<(u32, u32)> = BTreeSet::new();
        let desired: BTreeMap<ServiceKey, (&FrontendKey, &FrontendPlan)> = plan
            .frontends
            .iter()
            .map(|(k, f)| (master_key(k), (k, f)))
            .collect();
        self.failed.clear();
        for (mk, (fk, fe)) in &desired {
            if let Err(e) = self.write_frontend(t, *mk, fe, &mut removed_pairs, &mut report) {
                self.failed.insert(**fk);
                report
                    .errors
                    .push(format!("Service {} frontend {fk}: {e}", fe.service));
            }
        }
        // Frontends the plan no longer has, except those of Services the
        // planner refused: those keep their last good state.
        let gone: Vec<ServiceKey> = self
            .frontends
            .keys()
            .filter(|k| !desired.contains_key(k))
            .copied()
            .collect();
        for mk in gone {
            if let Err(e) = self.remove_frontend(t, mk, &mut removed_pairs, &mut report) {
                report.errors.push(format!("removing frontend {mk:?}: {e}"));
            }
        }
        report.udp_flows_flushed = self.flush_udp_flows(t, &removed_pairs);
        report.removed_pairs = removed_pairs;
        self.release_unused_backends(t, &mut report);
        report
    }

    /// Brings only the frontends named in `changed` to `plan` (written when
    /// the plan has them, removed when not): what an incremental plan
    /// reports after a change. The other frontends are not looked at.
    pub fn apply_changes(
        &mut self,
        t: &mut Tables,
        plan: &Plan,
        changed: &BTreeSet<FrontendKey>,
    ) -> ApplyReport {
        let mut report = ApplyReport::default();
        let mut removed_pairs: BTreeSet<(u32, u32)> = BTreeSet::new();
        let keys: BTreeSet<FrontendKey> = changed.union(&self.failed).copied().collect();
        // Removals first: the room they free may be what a write needs.
        for fk in keys.iter().filter(|k| !plan.frontends.contains_key(k)) {
            self.failed.remove(fk);
            let mk = master_key(fk);
            if let Err(e) = self.remove_frontend(t, mk, &mut removed_pairs, &mut report) {
                report.errors.push(format!("removing frontend {fk}: {e}"));
            }
        }
        for (fk, fe) in keys
            .iter()
            .filter_map(|k| Some((k, plan.frontends.get(k)?)))
        {
            let mk = master_key(fk);
            match self.write_frontend(t, mk, fe, &mut removed_pairs, &mut report) {
                Ok(()) => {
                    self.failed.remove(fk);
                }
                Err(e) => {
                    self.failed.insert(*fk);
                    report
                        .errors
                        .push(format!("Service {} frontend {fk}: {e}", fe.service));
                }
            }
        }
        report.udp_flows_flushed = self.flush_udp_flows(t, &removed_pairs);
        report.removed_pairs = removed_pairs;
        self.release_unused_backends(t, &mut report);
        report
    }

    fn write_frontend(
        &mut self,
        t: &mut Tables,
        mk: ServiceKey,
        fe: &FrontendPlan,
        removed_pairs: &mut BTreeSet<(u32, u32)>,
        report: &mut ApplyReport,
    ) -> Result<(), String> {
        let proto = mk.proto;
        let mut ids = Vec::with_capacity(fe.backends.len());
        for b in &fe.backends {
            let backend = Backend {
                addr: b.addr.octets(),
                port: b.port,
                proto,
                flags: if b.local { BE_F_LOCAL } else { 0 },
            };
            ids.push(self.backend_id(t, backend, report)?);
        }
        if ids.len() > u16::MAX as usize - 1 {
            return Err(format!(
                "{} backends, more than a frontend can hold",
                ids.len()
            ));
        }
        let existing = self.frontends.get(&mk).cloned();
        let existing_svc_id = existing.as_ref().map(|p| p.svc_id);
        let svc_id = match &existing {
            Some(p) => p.svc_id,
            None => self.alloc_svc_id().ok_or_else(|| {
                format!(
                    "more than {} frontends; raise --frontends-max",
                    self.svc_id_limit - 1
                )
            })?,
        };
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
        let source_ranges: BTreeSet<(u8, [u8; 4])> = fe
            .source_ranges
            .iter()
            .map(|n| (n.prefix, n.network().octets()))
            .collect();
        if !source_ranges.is_empty() {
            flags |= SVC_F_SOURCE_RANGES;
        }
        let master = ServiceValue {
            backend_id: 0,
            count: ids.len() as u16,
            flags,
            svc_id,
            affinity_timeout_s: fe.affinity_timeout_s.unwrap_or(0),
        };
        let new = Programmed {
            svc_id,
            master,
            backend_ids: ids.clone(),
            source_ranges: source_ranges.clone(),
        };
        if existing.as_ref() == Some(&new) {
            return Ok(());
        }
        let (old_ids, old_ranges) = existing
            .map(|p| (p.backend_ids, p.source_ranges))
            .unwrap_or_default();
        let map_err = |what: &str, e: MapError| describe(what, e);
        // 1. Allowed sources, membership for affinity checks, and the new slots.
        for r in source_ranges.difference(&old_ranges) {
            t.source_ranges
                .insert(&range_key(svc_id, *r), 1, 0)
                .map_err(|e| map_err(MAP_SOURCE_RANGES, e))?;
        }
        for id in &ids {
            t.affinity_match
                .insert(
                    AffinityMatchKey {
                        svc_id,
                        backend_id: *id,
                    },
                    1,
                    0,
                )
                .map_err(|e| map_err(MAP_AFFINITY_MATCH, e))?;
        }
        let written = (|| {
            for (i, id) in ids.iter().enumerate() {
                let v = ServiceValue {
                    backend_id: *id,
                    svc_id,
                    ..Default::default()
                };
                t.services
                    .insert(slot_key(&mk, i as u16 + 1), v, 0)
                    .map_err(|e| (i, e))?;
            }
            // 2. The master entry: from here on packets pick among the new slots.
            t.services.insert(mk, master, 0).map_err(|e| (ids.len(), e))
        })();
        if let Err((reached, e)) = written {
            // Take back the slots beyond what the old master counts: they
            // would only take room. The old master still names valid slots.
            for slot in old_ids.len()..reached {
                let _ = t.services.remove(&slot_key(&mk, slot as u16 + 1));
            }
            // Memberships and ranges the old state does not have would
            // vouch for backends or sources the frontend does not serve.
            for id in ids.iter().filter(|i| !old_ids.contains(i)) {
                let _ = t.affinity_match.remove(&AffinityMatchKey {
                    svc_id,
                    backend_id: *id,
                });
            }
            for r in source_ranges.difference(&old_ranges) {
                let _ = t.source_ranges.remove(&range_key(svc_id, *r));
            }
            if existing_svc_id.is_none() {
                self.free_svc_ids.push(svc_id);
            }
            return Err(map_err(MAP_SERVICES, e));
        }
        // 3. Surplus slots, memberships and source ranges.
        for r in old_ranges.difference(&source_ranges) {
            ignore_missing(t.source_ranges.remove(&range_key(svc_id, *r)))
                .map_err(|e| e.to_string())?;
        }
        for slot in ids.len()..old_ids.len() {
            ignore_missing(t.services.remove(&slot_key(&mk, slot as u16 + 1)))
                .map_err(|e| e.to_string())?;
        }
        let keep: BTreeSet<u32> = ids.iter().copied().collect();
        for id in old_ids.iter().filter(|i| !keep.contains(i)) {
            ignore_missing(t.affinity_match.remove(&AffinityMatchKey {
                svc_id,
                backend_id: *id,
            }))
            .map_err(|e| e.to_string())?;
            removed_pairs.insert((svc_id, *id));
        }
        for id in &ids {
            self.add_ref(*id, 1);
        }
        for id in &old_ids {
            self.add_ref(*id, -1);
        }
        self.frontends.insert(mk, new);
        report.frontends_written += 1;
        Ok(())
    }

    fn remove_frontend(
        &mut self,
        t: &mut Tables,
        mk: ServiceKey,
        removed_pairs: &mut BTreeSet<(u32, u32)>,
        report: &mut ApplyReport,
    ) -> Result<(), MapError> {
        let Some(p) = self.frontends.get(&mk).cloned() else {
            return Ok(());
        };
        // The master first: new packets stop matching before the slots go.
        ignore_missing(t.services.remove(&mk))?;
        for slot in 1..=p.backend_ids.len().max(p.master.count as usize) {
            ignore_missing(t.services.remove(&slot_key(&mk, slot as u16)))?;
        }
        for id in &p.backend_ids {
            ignore_missing(t.affinity_match.remove(&AffinityMatchKey {
                svc_id: p.svc_id,
                backend_id: *id,
            }))?;
            removed_pairs.insert((p.svc_id, *id));
            self.add_ref(*id, -1);
        }
        for r in &p.source_ranges {
            ignore_missing(t.source_ranges.remove(&range_key(p.svc_id, *r)))?;
        }
        // A reused svc_id must start its counters from zero.
        let zero = PerCpuValues::try_from(vec![SvcStats::default(); nr_cpus()]).ok();
        if let Some(zero) = zero {
            let _ = t.svc_stats.set(p.svc_id, zero, 0);
        }
        self.frontends.remove(&mk);
        self.free_svc_ids.push(p.svc_id);
        report.frontends_removed += 1;
        Ok(())
    }

    fn release_unused_backends(&mut self, t: &mut Tables, report: &mut ApplyReport) {
        let unused: Vec<(Backend, u32)> = std::mem::take(&mut self.unused)
            .into_iter()
            .filter_map(|id| match self.refs.get(&id) {
                Some((b, 0)) => Some((*b, id)),
                _ => None,
            })
            .collect();
        for (b, id) in unused {
            match ignore_missing(t.backends.remove(&id)) {
                Ok(()) => {
                    self.backends.remove(&b);
                    self.refs.remove(&id);
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

    /// Drops the conntrack entries of UDP flows whose backend left their
    /// frontend, so clients that keep sending move to a live backend instead
    /// of a blackhole. TCP flows are left to finish (or fail) on their own.
    fn flush_udp_flows(&self, t: &mut Tables, removed: &BTreeSet<(u32, u32)>) -> usize {
        if removed.is_empty() {
            return 0;
        }
        let doomed: Vec<CtKey> = t
            .conntrack
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, v)| k.proto == IPPROTO_UDP && removed.contains(&(v.svc_id, v.backend_id)))
            .map(|(k, _)| k)
            .collect();
        let mut n = 0;
        for k in doomed {
            if t.conntrack.remove(&k).is_ok() {
                n += 1;
            }
        }
        n
    }

    /// Sets the address traffic from outside is source-NATed to when its
    /// backend runs on another node.
    pub fn set_snat_addr(&self, t: &mut Tables, addr: Option<Ipv4Addr>) -> Result<(), MapError> {
        let v = addr.map_or(0, |a| u32::from_ne_bytes(a.octets()) as u64);
        t.meta.set(META_SNAT_ADDR, v, 0)
    }

    /// Keeps NODE_ADDRS equal to `addrs`.
    pub fn set_node_addrs(&self, t: &mut Tables, addrs: &[Ipv4Addr]) -> Result<(), MapError> {
        let want: BTreeSet<[u8; 4]> = addrs.iter().map(|a| a.octets()).collect();
        let have: BTreeSet<[u8; 4]> = t.node_addrs.keys().filter_map(Result::ok).collect();
        for a in want.difference(&have) {
            t.node_addrs.insert(a, 1, 0)?;
        }
        for a in have.difference(&want) {
            ignore_missing(t.node_addrs.remove(a))?;
        }
        Ok(())
    }
}

pub fn nr_cpus() -> usize {
    aya::util::nr_cpus().unwrap_or(1)
}

/// Removes conntrack entries idle past their timeout. Both directions of a
/// flow go together, and only when both are idle, so a flow whose replies
/// still run is never half-forgotten.
pub fn expire_conntrack(t: &mut Tables, now_ns: u64) -> usize {
    let entries: HashMap<CtKey, CtValue> = t.conntrack.iter().filter_map(Result::ok).collect();
    let idle = |v: &CtValue| {
        let timeout = if v.proto == IPPROTO_TCP {
            if v.flags & CT_F_CLOSING != 0 {
                CT_TCP_CLOSING_TIMEOUT_NS
            } else {
                CT_TCP_TIMEOUT_NS
            }
        } else {
            CT_UDP_TIMEOUT_NS
        };
        now_ns.saturating_sub(v.last_seen_ns) > timeout
    };
    let mut n = 0;
    for (k, v) in &entries {
        // The partner's key is what the partner rewrites packets into, reversed.
        let partner = CtKey {
            saddr: v.nat_daddr,
            daddr: v.nat_saddr,
            sport: v.nat_dport,
            dport: v.nat_sport,
            proto: k.proto,
            _pad: [0; 3],
        };
        let partner_idle = entries.get(&partner).is_none_or(idle);
        if idle(v) && partner_idle && t.conntrack.remove(k).is_ok() {
            n += 1;
        }
    }
    n
}
