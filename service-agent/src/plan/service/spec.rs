//! What a Service is before its ports: whether this dataplane programs it
//! at all, its type and its ClusterIP.
use std::{fmt, net::Ipv4Addr};

use k8s_openapi::api::core::v1::ServiceSpec;

use super::{Ctx, FieldError, Refusal};
use crate::plan::types::NodeContext;

pub use crate::model::{HEADLESS_LABEL, SERVICE_PROXY_NAME_LABEL};

/// Why a Service is deliberately left alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Skip {
    OtherProxy(String),
    HeadlessLabel,
    ExternalName,
    Headless,
    Ipv6(String),
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Skip::OtherProxy(proxy) => write!(
                f,
                "label {SERVICE_PROXY_NAME_LABEL}={proxy}: handled by another proxy"
            ),
            Skip::HeadlessLabel => write!(f, "label {HEADLESS_LABEL}: headless"),
            Skip::ExternalName => f.write_str("type ExternalName: DNS only"),
            Skip::Headless => f.write_str("clusterIP None: headless"),
            Skip::Ipv6(ip) => write!(f, "clusterIP {ip}: IPv6 is not supported by this dataplane"),
        }
    }
}

pub(super) enum Read<'a> {
    Skip(Skip),
    Program {
        spec: &'a ServiceSpec,
        /// `ClusterIP` when unset.
        svc_type: &'a str,
        cluster_ip: Ipv4Addr,
    },
}

pub(super) fn read<'a>(ctx: &Ctx<'a>, node: &NodeContext) -> Result<Read<'a>, Refusal> {
    let svc = &ctx.svc.object;
    let labels = svc.metadata.labels.as_ref();
    if let Some(proxy) = labels.and_then(|l| l.get(SERVICE_PROXY_NAME_LABEL)) {
        return Ok(Read::Skip(Skip::OtherProxy(proxy.clone())));
    }
    if labels.is_some_and(|l| l.contains_key(HEADLESS_LABEL)) {
        return Ok(Read::Skip(Skip::HeadlessLabel));
    }
    let Some(spec) = svc.spec.as_ref() else {
        return Err(ctx.refuse("spec", FieldError::Missing));
    };
    let svc_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    if svc_type == "ExternalName" {
        return Ok(Read::Skip(Skip::ExternalName));
    }
    let ip = match spec.cluster_ip.as_deref() {
        Some("None") => return Ok(Read::Skip(Skip::Headless)),
        None | Some("") => {
            return Err(ctx.refuse("spec.clusterIP", FieldError::NotAllocated("ClusterIPs")));
        }
        Some(ip) => ip,
    };
    // A dual-stack Service whose first family is IPv6 has its IPv4
    // address second in `clusterIPs`: that family is served (each family
    // stands on its own, as kube-proxy programs them).
    let (field, ip) = if ip.contains(':') {
        let ipv4 = spec
            .cluster_ips
            .iter()
            .flatten()
            .enumerate()
            .skip(1)
            .find(|(_, a)| !a.contains(':'));
        match ipv4 {
            Some((i, a)) => (format!("spec.clusterIPs[{i}]"), a.as_str()),
            None => return Ok(Read::Skip(Skip::Ipv6(ip.into()))),
        }
    } else {
        ("spec.clusterIP".to_string(), ip)
    };
    let refuse = |e| ctx.refuse(field.clone(), e);
    let cluster_ip = match ip.parse::<Ipv4Addr>() {
        Ok(a)
            if !node.service_cidrs.is_empty()
                && !node.service_cidrs.iter().any(|n| n.contains(a)) =>
        {
            let ranges: Vec<String> = node.service_cidrs.iter().map(|n| n.to_string()).collect();
            return Err(refuse(FieldError::OutsideServiceRange {
                ip: ip.into(),
                ranges: ranges.join(", "),
            }));
        }
        Ok(a) if !a.is_unspecified() && !a.is_broadcast() && !a.is_multicast() => a,
        Ok(_) => return Err(refuse(FieldError::NotAServiceAddress(ip.into()))),
        Err(_) => return Err(refuse(FieldError::NotIpv4(ip.into()))),
    };
    Ok(Read::Program {
        spec,
        svc_type,
        cluster_ip,
    })
}
