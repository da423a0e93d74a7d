//! The planner, kept current one Service at a time.
//!
//! [`compile_after`](super::compile_after) looks at every Service on every
//! change; with 10,000 Services that is most of the time a change takes to
//! reach the maps. [`Incremental`] holds the objects grouped by Service (the
//! Service objects of one `namespace/name` and the EndpointSlices labelled
//! with it), recompiles only the groups a change touched, and says which
//! frontends came out different, so the writer touches only those.
//!
//! Its plan is, after every [`Incremental::commit`], equal to what
//! `compile_after(services, slices, node, previous)` followed by
//! `keep_refused_from(previous)` gives for the same objects (services in any
//! order, slices grouped by Service in [`ServiceId`] order and the unlabelled
//! ones last), including the order of problems, skipped Services and health
//! checks. The unit tests check that over random sequences of changes.
//!
//! Two decisions involve more than one Service:
//! - A contested frontend goes to the first claimant in the full compile's
//!   order (Services already serving something first, then older, then by
//!   name). Only Services claiming a common frontend can influence each
//!   other, so the claim is replayed over the connected group of Services
//!   that share a contested frontend with a changed one, in that order. A
//!   Service's place in the order depends on whether it served anything in
//!   the previous plan, so a group is replayed again when that flips.
//! - A refused Service keeps its previous frontends unless another Service
//!   now wins them: the frontends re-examined are those any replayed Service
//!   held, wins, or kept.
use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use super::{
    contention::{ClaimOrder, Claims, CompiledService},
    service::{Compiled, compile_service},
    slices,
    small::{SmallMap, SmallSet},
    types::{FrontendKey, FrontendPlan, HealthCheck, NodeContext, Plan, Problem, Skipped},
};
use crate::model::{ServiceId, Sourced};

/// What one Service object contributed in the last replay of its group.
#[derive(Clone, Debug, Default)]
struct ObjectOutput {
    order: ClaimOrder,
    skipped: Option<Skipped>,
    health: Option<HealthCheck>,
    problems: Vec<Problem>,
}

impl ObjectOutput {
    fn is_empty(&self) -> bool {
        self.skipped.is_none() && self.health.is_none() && self.problems.is_empty()
    }
}

/// One Service id: what its objects compiled to, and what they came to.
/// The objects themselves are not kept: the source has them, and the
/// compiled frontends are a fraction of their size.
#[derive(Default)]
struct Unit {
    /// It has Service objects or slices.
    exists: bool,
    compiled: Vec<CompiledService>,
    /// Problems of its slices' endpoints, and of slices without a Service.
    slice_problems: Vec<Problem>,
    orphan_problems: Vec<Problem>,
    /// Every frontend its objects asked for in the last compile.
    keys: SmallSet<FrontendKey>,
    /// The frontends it won in the last replay.
    won: SmallMap<FrontendKey, FrontendPlan>,
    refused: bool,
    /// One per Service object, or none when every one is empty.
    outputs: Vec<ObjectOutput>,
}

impl Unit {
    fn is_noisy(&self) -> bool {
        !self.slice_problems.is_empty()
            || !self.orphan_problems.is_empty()
            || self.outputs.iter().any(|o| !o.is_empty())
    }
}

impl Default for Incremental {
    fn default() -> Self {
        Self::new(NodeContext::default(), Plan::default())
    }
}

/// The planner's state between changes. See the module documentation.
pub struct Incremental {
    node: NodeContext,
    units: BTreeMap<ServiceId, Unit>,
    /// Problems of the slices without a Service label (only their
    /// addresses are checked).
    unlabeled_problems: Vec<Problem>,
    /// Frontend → the Services whose objects ask for it.
    claims: BTreeMap<FrontendKey, SmallSet<ServiceId>>,
    /// Frontend → the Service that won it.
    winners: BTreeMap<FrontendKey, ServiceId>,
    /// The plan in force, and whose each of its frontends is (won or kept).
    plan: Plan,
    holder: BTreeMap<FrontendKey, ServiceId>,
    held: BTreeMap<ServiceId, SmallSet<FrontendKey>>,
    /// Services with problems, skips or health checks, for assembling the
    /// plan's lists without visiting every Service.
    noisy: BTreeSet<ServiceId>,
    /// Changed since the last commit, or sharing a frontend with one that
    /// did: their groups are replayed.
    dirty: BTreeSet<ServiceId>,
    /// Started or stopped holding frontends at the last commit: their place
    /// in the claim order changed, so their groups are replayed.
    flipped: BTreeSet<ServiceId>,
}

impl Incremental {
    /// An empty planner whose first commit starts from `previous`, the plan
    /// in force (as `compile_after` would be given it). It must be given
    /// every Service before that commit: what it is not given is gone.
    pub fn new(node: NodeContext, mut previous: Plan) -> Self {
        // Refusals are decided again for every Service given.
        previous.refused.clear();
        let mut holder = BTreeMap::new();
        let mut held: BTreeMap<ServiceId, SmallSet<FrontendKey>> = BTreeMap::new();
        for (k, f) in &previous.frontends {
            let id = ServiceId::from_object_ref(&f.service);
            holder.insert(*k, id.clone());
            held.entry(id).or_default().insert(*k);
        }
        // Services in `previous` that no longer exist must lose their
        // frontends at the first commit: give them (empty) units to replay.
        let units = held
            .keys()
            .map(|id| (id.clone(), Unit::default()))
            .collect();
        let dirty = held.keys().cloned().collect();
        Self {
            node,
            units,
            unlabeled_problems: vec![],
            claims: BTreeMap::new(),
            winners: BTreeMap::new(),
            plan: previous,
            holder,
            held,
            noisy: BTreeSet::new(),
            dirty,
            flipped: BTreeSet::new(),
        }
    }

    /// The plan as of the last commit.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn into_plan(self) -> Plan {
        self.plan
    }

    pub fn node(&self) -> &NodeContext {
        &self.node
    }

    /// Every Service id known, with or without objects.
    pub fn ids(&self) -> impl Iterator<Item = &ServiceId> {
        self.units.keys()
    }

    /// Replaces the objects of one Service id: its Service objects (more
    /// than one only when a manifest repeats it; in source order) and the
    /// EndpointSlices labelled with it. Both empty: it is gone. The node
    /// context is fixed: when it changes, every Service changes, and the
    /// caller starts a new planner from the plan in force.
    pub fn set(
        &mut self,
        id: ServiceId,
        services: Vec<Sourced<Service>>,
        slices: Vec<Sourced<EndpointSlice>>,
    ) {
        let refs: Vec<&Sourced<EndpointSlice>> = slices.iter().collect();
        let compiled: Vec<CompiledService> = services
            .iter()
            .map(|svc| compile_service(svc, &refs, &self.node))
            .collect();
        let keys: SmallSet<FrontendKey> = compiled
            .iter()
            .filter_map(|c| match &c.result {
                Ok(Compiled::Frontends(fes, _)) => Some(fes.iter().map(|(k, _)| *k)),
                _ => None,
            })
            .flatten()
            .collect();
        let unit = self.units.entry(id.clone()).or_default();
        // Who shared a frontend with it before may win what it gave up.
        for k in &unit.keys {
            if let Some(c) = self.claims.get_mut(k) {
                self.dirty.extend(c.iter().cloned());
                c.remove(&id);
                if c.is_empty() {
                    self.claims.remove(k);
                }
            }
        }
        for k in &keys {
            self.claims.entry(*k).or_default().insert(id.clone());
        }
        unit.keys = keys;
        unit.exists = !services.is_empty() || !slices.is_empty();
        unit.compiled = compiled;
        unit.slice_problems = slices.iter().flat_map(slices::address_problems).collect();
        unit.orphan_problems = if services.is_empty() {
            slices
                .iter()
                .map(|s| slices::orphan_problem(&id, s))
                .collect()
        } else {
            vec![]
        };
        self.dirty.insert(id);
    }

    /// Replaces the slices that name no Service.
    pub fn set_unlabeled(&mut self, slices: &[Sourced<EndpointSlice>]) {
        self.unlabeled_problems = slices.iter().flat_map(slices::address_problems).collect();
    }

    /// Brings the plan up to the objects set since the last commit; returns
    /// the frontends whose plan changed (added, removed or different).
    pub fn commit(&mut self) -> BTreeSet<FrontendKey> {
        let mut seeds: BTreeSet<ServiceId> = std::mem::take(&mut self.dirty);
        // A flip only reorders a group with others in it; alone, a Service
        // claims its frontends first whatever its place. (Were another to
        // join it later, the joiner's change replays the group.) Replaying
        // every flipped one would recompile the whole cluster once after
        // the start.
        let flipped = std::mem::take(&mut self.flipped);
        seeds.extend(flipped.into_iter().filter(|id| self.contested(id)));
        seeds.retain(|id| self.units.contains_key(id));
        // 1. Replay the claims of every group a changed Service belongs to.
        let mut replayed: BTreeSet<ServiceId> = BTreeSet::new();
        let mut touched: BTreeSet<FrontendKey> = BTreeSet::new();
        for seed in &seeds {
            if replayed.contains(seed) {
                continue;
            }
            let group = self.group_of(seed);
            replayed.extend(group.iter().cloned());
            for id in &group {
                let unit = &self.units[id];
                touched.extend(unit.won.keys().copied());
                touched.extend(self.held.get(id).into_iter().flatten().copied());
            }
            self.replay(&group);
            for id in &group {
                let unit = &self.units[id];
                touched.extend(unit.won.keys().copied());
                if unit.is_noisy() {
                    self.noisy.insert(id.clone());
                } else {
                    self.noisy.remove(id);
                }
                let name = id.object_ref();
                if unit.refused {
                    self.plan.refused.insert(name);
                } else {
                    self.plan.refused.remove(&name);
                }
            }
        }
        // 2. The lists, in the order the full compile makes them (by the
        //    previous plan's incumbents, so before the frontends change).
        self.assemble_lists();
        // 3. The frontends: won ones, then refused Services' kept ones.
        let mut changed = BTreeSet::new();
        for k in touched {
            let want: Option<(ServiceId, FrontendPlan)> = match self.winners.get(&k) {
                Some(id) => Some((id.clone(), self.units[id].won[&k].clone())),
                None => match self.holder.get(&k) {
                    Some(id) if self.units.get(id).is_some_and(|u| u.refused) => {
                        Some((id.clone(), self.plan.frontends[&k].clone()))
                    }
                    _ => None,
                },
            };
            let had = self.plan.frontends.get(&k);
            if want.as_ref().map(|(_, f)| f) == had
                && want.as_ref().map(|(id, _)| id) == self.holder.get(&k)
            {
                continue;
            }
            if had.is_some() || want.is_some() {
                changed.insert(k);
            }
            if let Some(old) = self.holder.remove(&k) {
                let before = incumbent(&self.held, &old);
                if let Some(set) = self.held.get_mut(&old) {
                    set.remove(&k);
                    if set.is_empty() {
                        self.held.remove(&old);
                    }
                }
                if before != incumbent(&self.held, &old) {
                    self.flipped.insert(old);
                }
                self.plan.frontends.remove(&k);
            }
            if let Some((id, fe)) = want {
                let before = incumbent(&self.held, &id);
                self.held.entry(id.clone()).or_default().insert(k);
                if !before {
                    self.flipped.insert(id.clone());
                }
                self.holder.insert(k, id);
                self.plan.frontends.insert(k, fe);
            }
        }
        // Forget Services that are gone and hold nothing.
        for id in &replayed {
            if self.units.get(id).is_some_and(|u| !u.exists) && !self.held.contains_key(id) {
                self.units.remove(id);
                self.noisy.remove(id);
                self.flipped.remove(id);
            }
        }
        changed
    }

    /// Whether another Service claims one of `id`'s frontends too.
    fn contested(&self, id: &ServiceId) -> bool {
        self.units.get(id).is_some_and(|u| {
            u.keys
                .iter()
                .any(|k| self.claims.get(k).is_some_and(|c| c.len() > 1))
        })
    }

    /// The Services linked to `seed` through frontends more than one claims.
    fn group_of(&self, seed: &ServiceId) -> Vec<ServiceId> {
        let mut seen = BTreeSet::from([seed.clone()]);
        let mut stack = vec![seed.clone()];
        while let Some(id) = stack.pop() {
            let Some(unit) = self.units.get(&id) else {
                continue;
            };
            for k in &unit.keys {
                let Some(c) = self.claims.get(k).filter(|c| c.len() > 1) else {
                    continue;
                };
                for other in c {
                    if seen.insert(other.clone()) {
                        stack.push(other.clone());
                    }
                }
            }
        }
        seen.into_iter().collect()
    }

    /// `compile_after`'s claim loop over one group, in its order.
    fn replay(&mut self, group: &[ServiceId]) {
        let mut order: Vec<(bool, &ClaimOrder, &ServiceId, usize)> = vec![];
        for id in group {
            let incumbent = incumbent(&self.held, id);
            for (i, c) in self.units[id].compiled.iter().enumerate() {
                order.push((!incumbent, &c.order, id, i));
            }
        }
        order.sort();
        let mut claims = Claims::default();
        let mut results: BTreeMap<ServiceId, (SmallMap<FrontendKey, FrontendPlan>, bool)> = group
            .iter()
            .map(|id| (id.clone(), (SmallMap::default(), false)))
            .collect();
        let mut outputs: BTreeMap<ServiceId, Vec<ObjectOutput>> = group
            .iter()
            .map(|id| {
                let n = self.units[id].compiled.len();
                (id.clone(), vec![ObjectOutput::default(); n])
            })
            .collect();
        for (_, claim, id, i) in order {
            let settled = claims.settle(&self.units[id].compiled[i]);
            let (won, refused) = results.get_mut(id).expect("one per member");
            won.extend(settled.won.iter().cloned());
            if settled.refused {
                *refused = true;
                won.clear();
            }
            outputs.get_mut(id).expect("one per member")[i] = ObjectOutput {
                order: claim.clone(),
                skipped: settled.skipped,
                health: settled.health,
                problems: settled.problems,
            };
        }
        for (id, (won, refused)) in results {
            for k in self.units[&id].won.keys() {
                if self.winners.get(k) == Some(&id) {
                    self.winners.remove(k);
                }
            }
            for k in won.keys() {
                self.winners.insert(*k, id.clone());
            }
            let unit = self.units.get_mut(&id).expect("a member");
            unit.won = won;
            unit.refused = refused;
            // Only lists with something in them are read (by
            // `assemble_lists`, for noisy Services): most Services keep none.
            let mut out = outputs.remove(&id).unwrap_or_default();
            if out.iter().all(ObjectOutput::is_empty) {
                out = vec![];
            }
            unit.outputs = out;
        }
    }

    /// Rebuilds problems, skipped Services and health checks from the
    /// Services that have any.
    fn assemble_lists(&mut self) {
        let mut problems: Vec<Problem> = vec![];
        for id in &self.noisy {
            problems.extend(self.units[id].slice_problems.iter().cloned());
        }
        problems.extend(self.unlabeled_problems.iter().cloned());
        for id in &self.noisy {
            problems.extend(self.units[id].orphan_problems.iter().cloned());
        }
        let mut objects: Vec<(bool, &ClaimOrder, &ServiceId, usize)> = vec![];
        for id in &self.noisy {
            let inc = incumbent(&self.held, id);
            for (i, o) in self.units[id].outputs.iter().enumerate() {
                if !o.is_empty() {
                    objects.push((!inc, &o.order, id, i));
                }
            }
        }
        objects.sort();
        let mut skipped = vec![];
        let mut health = vec![];
        for (_, _, id, i) in objects {
            let o = &self.units[id].outputs[i];
            skipped.extend(o.skipped.clone());
            health.extend(o.health.clone());
            problems.extend(o.problems.iter().cloned());
        }
        for h in &self.plan.health_checks {
            if self.plan.refused.contains(&h.service)
                && !health.iter().any(|x: &HealthCheck| x.port == h.port)
            {
                health.push(h.clone());
            }
        }
        self.plan.problems = problems;
        self.plan.skipped = skipped;
        self.plan.health_checks = health;
    }
}

/// Whether `id` holds a frontend in the plan in force: such Services claim
/// contested frontends first.
fn incumbent(held: &BTreeMap<ServiceId, SmallSet<FrontendKey>>, id: &ServiceId) -> bool {
    held.get(id).is_some_and(|k| !k.is_empty())
}

#[cfg(test)]
#[path = "incremental_tests.rs"]
mod tests;
