//! One Service object and its EndpointSlices to frontends, on its own
//! (contention with other Services is settled afterwards): the spec
//! (type, ClusterIP), session affinity, external addresses, and the ports.
mod affinity;
mod external;
mod ports;
mod spec;

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

pub use self::{
    affinity::{DEFAULT_AFFINITY_TIMEOUT_S, MAX_AFFINITY_TIMEOUT_S},
    ports::is_port_name,
    spec::{HEADLESS_LABEL, SERVICE_PROXY_NAME_LABEL, Skip},
};
use super::{
    contention::CompiledService,
    endpoints::TrafficPolicy,
    error::{FieldError, Refusal},
    types::{FrontendKey, FrontendPlan, HealthCheck, NodeContext, Problem},
};
use crate::model::{Sourced, object_ref};

/// Frontends a Service asks for, in the order of its ports.
pub(super) type FrontendList = Vec<(FrontendKey, FrontendPlan)>;

#[derive(Clone)]
pub(super) enum Compiled {
    Skipped(Skip),
    Frontends(FrontendList, Option<HealthCheck>),
}

/// The Service being compiled, and the problems found so far with parts of
/// it that do not refuse it.
pub(super) struct Ctx<'a> {
    pub svc: &'a Sourced<Service>,
    /// `namespace/name`.
    pub name: String,
    pub problems: Vec<Problem>,
}

impl<'a> Ctx<'a> {
    fn new(svc: &'a Sourced<Service>) -> Self {
        Self {
            svc,
            name: object_ref(&svc.object.metadata),
            problems: vec![],
        }
    }

    fn object(&self) -> String {
        format!("Service {}", self.name)
    }

    /// A part of the Service is not programmed; the rest is.
    fn warn(&mut self, field: impl Into<String>, error: FieldError) {
        let p = Problem::new(&self.svc.origin, self.object(), field, &error, false);
        self.problems.push(p);
    }

    /// The whole Service is refused.
    fn refuse(&self, field: impl Into<String>, error: FieldError) -> Refusal {
        Refusal {
            object: self.object(),
            field: field.into(),
            error,
        }
    }
}

/// Compiles one Service object with the slices labelled with its name.
pub(super) fn compile_service(
    svc: &Sourced<Service>,
    slices: &[&Sourced<EndpointSlice>],
    node: &NodeContext,
) -> CompiledService {
    let mut ctx = Ctx::new(svc);
    let result = compile(&mut ctx, slices, node);
    CompiledService::new(ctx, result)
}

fn compile(
    ctx: &mut Ctx<'_>,
    slices: &[&Sourced<EndpointSlice>],
    node: &NodeContext,
) -> Result<Compiled, Refusal> {
    // The object outlives the context's borrows.
    let svc: &Service = &{ ctx.svc }.object;
    let (spec, svc_type, cluster_ips) = match spec::read(ctx, node)? {
        spec::Read::Skip(why) => return Ok(Compiled::Skipped(why)),
        spec::Read::Program {
            spec,
            svc_type,
            cluster_ips,
        } => (spec, svc_type, cluster_ips),
    };
    let affinity = affinity::timeout(spec).map_err(|(field, e)| ctx.refuse(field, e))?;
    let external_addrs = external::addresses(ctx, svc, spec, svc_type, node);
    let source_ranges = external::source_ranges(ctx, spec)?;
    let (policy, unknown_distribution) = TrafficPolicy::of(svc);
    if let Some(value) = unknown_distribution {
        ctx.warn(
            "spec.trafficDistribution",
            FieldError::UnknownDistribution(value),
        );
    }
    let service = ports::Frontends {
        service: ctx.name.as_str().into(),
        cluster_ips,
        node_ports: matches!(svc_type, "NodePort" | "LoadBalancer"),
        external_addrs,
        affinity,
        source_ranges,
        policy,
    };
    let (frontends, local_ready) = ports::frontends(ctx, spec, &service, slices, node)?;
    let health = ports::health_check(ctx, spec, svc_type, &service, local_ready);
    Ok(Compiled::Frontends(frontends, health))
}

#[cfg(test)]
mod tests;
