//! The planner: every Kubernetes Service semantic the dataplane honours is
//! decided here, as a pure function of the objects, so it is tested without
//! a kernel. The BPF programs only execute the resulting frontend → backends
//! table.
//!
//! - [`types`]: the plan (frontends, health checks, problems);
//! - `service`: one Service object to frontends (spec, ports, affinity,
//!   external addresses), refusing it with a [`Refusal`] naming the field;
//! - `endpoints`: which endpoints a port sends to (readiness, topology,
//!   traffic policies); `slices`: reading EndpointSlices;
//! - `contention`: two Services claiming one frontend;
//! - [`maglev`]: which frontends use Maglev and their lookup tables (the
//!   writer builds one per backend set);
//! - [`compile_after`] over everything, [`Incremental`] one Service at a time.
use std::collections::BTreeSet;

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

mod contention;
mod endpoints;
pub mod error;
mod incremental;
pub mod ipnet_lite;
pub mod maglev;
mod service;
mod slices;
mod small;
pub mod types;

use self::{
    contention::{Claims, CompiledService, claim_order},
    service::compile_service,
};
pub use self::{
    error::{FieldError, Refusal},
    incremental::Incremental,
    service::{
        DEFAULT_AFFINITY_TIMEOUT_S, HEADLESS_LABEL, MAX_AFFINITY_TIMEOUT_S,
        SERVICE_PROXY_NAME_LABEL, Skip, is_port_name,
    },
    types::{
        BackendAddr, Backends, FrontendKey, FrontendKind, FrontendPlan, HealthCheck, NodeContext,
        Plan, Problem, Protocol, Skipped,
    },
};
use crate::model::Sourced;
pub use crate::model::{ServiceId, TOPOLOGY_MODE_ANNOTATIONS};

/// Compiles the cluster's Services and EndpointSlices into the frontend table.
pub fn compile(
    services: &[Sourced<Service>],
    slices: &[Sourced<EndpointSlice>],
    node: &NodeContext,
) -> Plan {
    compile_after(services, slices, node, &Plan::default())
}

/// Like [`compile`], where `previous` is the plan in force: when two Services
/// claim one frontend, the one already serving it keeps it (then the older
/// by creationTimestamp, then by name), so a new mistake never takes traffic
/// from a working Service.
pub fn compile_after(
    services: &[Sourced<Service>],
    slices: &[Sourced<EndpointSlice>],
    node: &NodeContext,
    previous: &Plan,
) -> Plan {
    let incumbents: BTreeSet<&str> = previous.frontends.values().map(|f| &*f.service).collect();
    let mut plan = Plan::default();
    let by_service = slices::by_service(slices);
    for slice in slices {
        plan.problems.extend(slices::address_problems(slice));
    }
    let known: BTreeSet<ServiceId> = services
        .iter()
        .map(|s| ServiceId::of(&s.object.metadata))
        .collect();
    for (id, group) in &by_service {
        if !known.contains(id) {
            plan.problems
                .extend(group.iter().map(|s| slices::orphan_problem(id, s)));
        }
    }
    let mut sorted: Vec<&Sourced<Service>> = services.iter().collect();
    sorted.sort_by_cached_key(|s| {
        let (created_none, created, name) = claim_order(&s.object);
        (
            !incumbents.contains(name.as_str()),
            created_none,
            created,
            name,
        )
    });
    let compiled: Vec<CompiledService> = sorted
        .into_iter()
        .map(|svc| {
            let id = ServiceId::of(&svc.object.metadata);
            let slices = by_service.get(&id).map(Vec::as_slice).unwrap_or_default();
            compile_service(svc, slices, node)
        })
        .collect();
    let mut claims = Claims::default();
    for c in &compiled {
        let settled = claims.settle(c);
        plan.skipped.extend(settled.skipped);
        for (key, fe) in settled.won {
            plan.frontends.insert(*key, fe.clone());
        }
        plan.health_checks.extend(settled.health);
        if settled.refused {
            plan.refused.insert(c.name.clone());
            plan.frontends.retain(|_, f| *f.service != *c.name);
        }
        plan.problems.extend(settled.problems);
    }
    plan
}

#[cfg(test)]
mod manifest_tests;
#[cfg(test)]
mod tests;
