//! The ports of a Service: each valid one becomes a frontend on the
//! ClusterIP, on every node address (NodePort) and on each external
//! address, with the endpoints chosen for it.
use std::{collections::BTreeSet, net::IpAddr, sync::Arc};

use k8s_openapi::{
    api::{
        core::v1::{ServicePort, ServiceSpec},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::util::intstr::IntOrString,
};

use super::{Ctx, FieldError, FrontendList, Refusal, external};
use crate::{
    model::Sourced,
    plan::{
        endpoints::{self, Chosen, TrafficPolicy},
        error::MAX_PORT,
        ipnet_lite::IpNet,
        slices::{port_endpoints, port_u16},
        types::Protocol,
        types::{Family, FrontendKey, FrontendKind, FrontendPlan, HealthCheck, NodeContext},
    },
};

/// Kubernetes' IANA_SVC_NAME rule for named ports.
pub fn is_port_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

fn protocol_of(sp: &ServicePort) -> Result<Protocol, FieldError> {
    match sp.protocol.as_deref().unwrap_or("TCP") {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        "SCTP" => Err(FieldError::Sctp),
        other => Err(FieldError::UnknownProtocol(other.into())),
    }
}

/// What every frontend of the Service shares.
pub(super) struct Frontends {
    /// `namespace/name`.
    pub service: Arc<str>,
    /// One per family, the primary first: each family's frontends get
    /// the endpoints of that family's slices.
    pub cluster_ips: Vec<IpAddr>,
    /// Type NodePort or LoadBalancer.
    pub node_ports: bool,
    pub external_addrs: Vec<(IpAddr, FrontendKind)>,
    pub affinity: Option<u32>,
    /// For LoadBalancer ingress IPs only.
    pub source_ranges: Vec<IpNet>,
    pub policy: TrafficPolicy,
}

impl Frontends {
    fn plan(
        &self,
        addr: IpAddr,
        port_name: &str,
        kind: FrontendKind,
        chosen: &Chosen,
    ) -> FrontendPlan {
        let internal = kind == FrontendKind::ClusterIp;
        // Without any endpoint every source is refused alike: no short-circuit.
        let short_circuit = !internal && self.policy.external_local && chosen.has_any;
        FrontendPlan {
            service: self.service.clone(),
            port_name: port_name.into(),
            kind,
            backends: if internal {
                chosen.internal.clone()
            } else {
                chosen.external.clone()
            },
            in_cluster: short_circuit.then(|| chosen.cluster.clone()),
            affinity_timeout_s: self.affinity,
            reject_when_empty: !chosen.has_any,
            source_ranges: if kind == FrontendKind::LoadBalancer {
                external::ranges_for(&self.source_ranges, addr.is_ipv6())
            } else {
                vec![]
            },
        }
    }
}

/// The frontends of every port in each of the Service's families, and the
/// addresses of this node's ready endpoints of its primary family (for the
/// health check: a dual-stack pod is one endpoint).
pub(super) fn frontends(
    ctx: &mut Ctx<'_>,
    spec: &ServiceSpec,
    service: &Frontends,
    slices: &[&Sourced<EndpointSlice>],
    node: &NodeContext,
) -> Result<(FrontendList, BTreeSet<IpAddr>), Refusal> {
    let mut out = vec![];
    let mut local_ready = BTreeSet::new();
    let mut seen_ports: BTreeSet<(u16, Protocol)> = BTreeSet::new();
    for (i, sp) in spec.ports.iter().flatten().enumerate() {
        let field = |f: &str| format!("spec.ports[{i}].{f}");
        let proto = match protocol_of(sp) {
            Ok(p) => p,
            Err(e) => {
                ctx.warn(field("protocol"), e);
                continue;
            }
        };
        let port = check_port(ctx, sp, proto, &mut seen_ports, &field)?;
        let port_name = sp.name.clone().unwrap_or_default();
        let node_port = match (service.node_ports, sp.node_port) {
            (false, _) => None,
            (true, Some(np)) => match port_u16(np) {
                Some(np) => Some(np),
                None => {
                    let e = FieldError::out_of_range(np, MAX_PORT);
                    return Err(ctx.refuse(field("nodePort"), e));
                }
            },
            (true, None) => {
                ctx.warn(field("nodePort"), FieldError::NotAllocated("NodePorts"));
                None
            }
        };
        for (f, cluster_ip) in service.cluster_ips.iter().enumerate() {
            let family = Family::of(*cluster_ip);
            let eps = port_endpoints(slices, &port_name, proto, family);
            if f == 0 {
                local_ready.extend(endpoints::local_ready(&eps, node));
            }
            let chosen = endpoints::categorize_endpoints(&eps, service.policy, node);
            let key = |addr, port| FrontendKey { addr, port, proto };
            out.push((
                key(*cluster_ip, port),
                service.plan(*cluster_ip, &port_name, FrontendKind::ClusterIp, &chosen),
            ));
            if let Some(np) = node_port {
                out.push((
                    key(family.unspecified(), np),
                    service.plan(*cluster_ip, &port_name, FrontendKind::NodePort, &chosen),
                ));
            }
            let external = service.external_addrs.iter();
            for (addr, kind) in external.filter(|(a, _)| Family::of(*a) == family) {
                let plan = service.plan(*addr, &port_name, *kind, &chosen);
                out.push((key(*addr, port), plan));
            }
        }
    }
    // Kept per Service until it changes: without its growth room.
    out.shrink_to_fit();
    Ok((out, local_ready))
}

/// The port number, once `port`, `targetPort` and uniqueness are checked;
/// any of them wrong refuses the Service.
fn check_port(
    ctx: &Ctx<'_>,
    sp: &ServicePort,
    proto: Protocol,
    seen: &mut BTreeSet<(u16, Protocol)>,
    field: &impl Fn(&str) -> String,
) -> Result<u16, Refusal> {
    let Some(port) = port_u16(sp.port) else {
        return Err(ctx.refuse(field("port"), FieldError::out_of_range(sp.port, MAX_PORT)));
    };
    match &sp.target_port {
        Some(IntOrString::Int(t)) if port_u16(*t).is_none() => {
            let e = FieldError::out_of_range(*t, MAX_PORT);
            return Err(ctx.refuse(field("targetPort"), e));
        }
        Some(IntOrString::String(name)) if !is_port_name(name) => {
            let e = FieldError::NotAPortName(name.clone());
            return Err(ctx.refuse(field("targetPort"), e));
        }
        _ => {}
    }
    if !seen.insert((port, proto)) {
        let e = FieldError::DuplicatePort { port, proto };
        return Err(ctx.refuse(field("port"), e));
    }
    Ok(port)
}

/// The `healthCheckNodePort` this node answers: LoadBalancer Services with
/// `externalTrafficPolicy: Local` only, as kube-proxy.
pub(super) fn health_check(
    ctx: &mut Ctx<'_>,
    spec: &ServiceSpec,
    svc_type: &str,
    service: &Frontends,
    local_ready: BTreeSet<IpAddr>,
) -> Option<HealthCheck> {
    let p = spec.health_check_node_port?;
    if svc_type != "LoadBalancer" || !service.policy.external_local {
        return None;
    }
    let Some(port) = port_u16(p) else {
        let e = FieldError::out_of_range(p, MAX_PORT);
        ctx.warn("spec.healthCheckNodePort", e);
        return None;
    };
    Some(HealthCheck {
        port,
        service: service.service.to_string(),
        local_endpoints: local_ready.len(),
    })
}
