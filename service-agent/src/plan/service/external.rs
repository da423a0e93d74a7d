//! Addresses outside the cluster network a Service answers on: its
//! externalIPs (only inside the allow-list) and LoadBalancer ingress IPs,
//! and the source ranges LoadBalancer traffic is limited to.
use std::net::{IpAddr, Ipv4Addr};

use k8s_openapi::api::core::v1::{Service, ServiceSpec};

use super::{Ctx, FieldError, Refusal};
use crate::plan::{
    ipnet_lite::Ipv4Net,
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
        match ip.parse::<Ipv4Addr>() {
            Ok(a) if node.external_ip_allow.iter().any(|n| n.contains(a)) => {
                out.push((a.into(), FrontendKind::ExternalIp))
            }
            Ok(a) => ctx.warn(field, FieldError::ExternalIpNotAllowed(a)),
            Err(_) => ctx.warn(field, FieldError::NotIpv4(ip.clone())),
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
        match ip.parse::<Ipv4Addr>() {
            Ok(a) => out.push((a.into(), FrontendKind::LoadBalancer)),
            Err(_) => ctx.warn(
                format!("status.loadBalancer.ingress[{i}].ip"),
                FieldError::NotIpv4(ip.clone()),
            ),
        }
    }
    out
}

/// `loadBalancerSourceRanges`, IPv4 ones. A range that cannot be read
/// refuses the Service: leaving it out would open the Service wider than
/// asked.
pub(super) fn source_ranges(ctx: &Ctx<'_>, spec: &ServiceSpec) -> Result<Vec<Ipv4Net>, Refusal> {
    let given = spec
        .load_balancer_source_ranges
        .as_deref()
        .unwrap_or_default();
    let mut out = vec![];
    for (i, r) in given.iter().enumerate() {
        match r.trim().parse::<Ipv4Net>() {
            Ok(n) => out.push(n),
            // IPv6 ranges cannot match IPv4 clients.
            Err(_) if r.contains(':') => {}
            Err(e) => {
                return Err(ctx.refuse(
                    format!("spec.loadBalancerSourceRanges[{i}]"),
                    FieldError::NotCidr(e),
                ));
            }
        }
    }
    if out.is_empty() && !given.is_empty() {
        // Only IPv6 ranges: no IPv4 client may pass.
        out.push(Ipv4Net {
            addr: Ipv4Addr::BROADCAST,
            prefix: 32,
        });
    }
    Ok(out)
}
