//! Addresses outside the cluster network a Service answers on: its
//! externalIPs (only inside the allow-list) and LoadBalancer ingress IPs,
//! and the source ranges LoadBalancer traffic is limited to.
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Service, ServiceSpec};

use super::{Ctx, FieldError, Refusal};
use crate::plan::{
    ipnet_lite::IpNet,
    types::{FrontendKind, NodeContext},
};

/// The externalIPs and LoadBalancer ingress IPs to program; those that
/// cannot be are named and left out, the rest of the Service is served.
pub(super) fn addresses(
    ctx: &mut Ctx<'_>,
    svc: &Service,
    spec: &ServiceSpec,
    svc_type: &str,
    node: &NodeContext,
) -> Vec<(IpAddr, FrontendKind)> {
    let mut out = vec![];
    for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
        let field = format!("spec.externalIPs[{i}]");
        match ip.parse::<IpAddr>() {
            Ok(a) if node.external_ip_allow.iter().any(|n| n.contains(a)) => {
                out.push((a, FrontendKind::ExternalIp))
            }
            Ok(a) => ctx.warn(field, FieldError::ExternalIpNotAllowed(a)),
            Err(_) => ctx.warn(field, FieldError::NotAnAddress(ip.clone())),
        }
    }
    if svc_type != "LoadBalancer" {
        return out;
    }
    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    for (i, ing) in ingress.into_iter().flatten().enumerate() {
        let Some(ip) = &ing.ip else { continue };
        match ip.parse::<IpAddr>() {
            Ok(a) => out.push((a, FrontendKind::LoadBalancer)),
            Err(_) => ctx.warn(
                format!("status.loadBalancer.ingress[{i}].ip"),
                FieldError::NotAnAddress(ip.clone()),
            ),
        }
    }
    out
}

/// `loadBalancerSourceRanges`, of both families (each frontend takes those
/// of its own, `ranges_for`). A range that cannot be read refuses the
/// Service: leaving it out would open the Service wider than asked.
pub(super) fn source_ranges(ctx: &Ctx<'_>, spec: &ServiceSpec) -> Result<Vec<IpNet>, Refusal> {
    let given = spec
        .load_balancer_source_ranges
        .as_deref()
        .unwrap_or_default();
    let mut out = vec![];
    for (i, r) in given.iter().enumerate() {
        match r.trim().parse::<IpNet>() {
            Ok(n) => out.push(n),
            Err(e) => {
                return Err(ctx.refuse(
                    format!("spec.loadBalancerSourceRanges[{i}]"),
                    FieldError::NotCidr(e),
                ));
            }
        }
    }
    Ok(out)
}

/// The ranges a frontend on an address of family `v6` checks: those of its
/// family; when the Service lists ranges but none of this family, one that
/// no client's address is in (the unspecified address), so that no client
/// of this family passes rather than every one.
pub(super) fn ranges_for(ranges: &[IpNet], v6: bool) -> Vec<IpNet> {
    let mine: Vec<IpNet> = ranges
        .iter()
        .copied()
        .filter(|n| n.is_ipv6() == v6)
        .collect();
    if mine.is_empty() && !ranges.is_empty() {
        let none = if v6 {
            IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
        } else {
            IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
        };
        let prefix = if v6 { 128 } else { 32 };
        return vec![IpNet { addr: none, prefix }];
    }
    mine
}
