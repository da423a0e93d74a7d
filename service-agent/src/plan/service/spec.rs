//! What a Service is before its ports: whether this dataplane programs it
//! at all, its type and its ClusterIPs (one per address family, each
//! programmed on its own).
use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use k8s_openapi::api::core::v1::ServiceSpec;

use super::{Ctx, FieldError, Refusal};
use crate::plan::types::{Family, NodeContext};

pub use crate::model::{HEADLESS_LABEL, SERVICE_PROXY_NAME_LABEL};

/// Why a Service is deliberately left alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Skip {
    OtherProxy(String),
    HeadlessLabel,
    ExternalName,
    Headless,
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
        }
    }
}

pub(super) enum Read<'a> {
    Skip(Skip),
    Program {
        spec: &'a ServiceSpec,
        /// `ClusterIP` when unset.
        svc_type: &'a str,
        /// The usable ClusterIPs in `clusterIPs` order (the primary family
        /// first), at most one per family.
        cluster_ips: Vec<IpAddr>,
    },
}

/// The field a ClusterIP was read from: the primary one is `clusterIP`
/// (which `clusterIPs[0]` repeats), the others only in `clusterIPs`.
fn field_of(i: usize) -> String {
    if i == 0 {
        "spec.clusterIP".to_string()
    } else {
        format!("spec.clusterIPs[{i}]")
    }
}

/// `ip` as a ClusterIP of its family, or why it cannot be one.
fn check_cluster_ip(ip: &str, node: &NodeContext) -> Result<IpAddr, FieldError> {
    match ip.parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) => check_v4(ip, a, node),
        Ok(IpAddr::V6(a)) => check_v6(ip, a, node),
        Err(_) => Err(FieldError::NotAnAddress(ip.into())),
    }
}

/// `ip` must be in a `--service-cluster-ip-range` of its family, when
/// that flag names any.
fn check_range(ip: &str, a: IpAddr, node: &NodeContext) -> Result<(), FieldError> {
    let mut ranges = node
        .service_cidrs
        .iter()
        .filter(|n| n.is_ipv6() == a.is_ipv6());
    if ranges.clone().next().is_none() || ranges.any(|n| n.contains(a)) {
        return Ok(());
    }
    let of_family: Vec<String> = (node.service_cidrs.iter())
        .filter(|n| n.is_ipv6() == a.is_ipv6())
        .map(|n| n.to_string())
        .collect();
    Err(FieldError::OutsideServiceRange {
        ip: ip.into(),
        ranges: of_family.join(", "),
    })
}

fn check_v4(ip: &str, a: Ipv4Addr, node: &NodeContext) -> Result<IpAddr, FieldError> {
    check_range(ip, a.into(), node)?;
    if a.is_unspecified() || a.is_broadcast() || a.is_multicast() {
        return Err(FieldError::NotAServiceAddress(ip.into()));
    }
    Ok(IpAddr::V4(a))
}

fn check_v6(ip: &str, a: Ipv6Addr, node: &NodeContext) -> Result<IpAddr, FieldError> {
    check_range(ip, a.into(), node)?;
    if a.is_unspecified() || a.is_multicast() || a.is_loopback() {
        return Err(FieldError::NotAServiceAddress(ip.into()));
    }
    Ok(IpAddr::V6(a))
}

pub(super) fn read<'a>(ctx: &mut Ctx<'a>, node: &NodeContext) -> Result<Read<'a>, Refusal> {
    let svc: &'a k8s_openapi::api::core::v1::Service = &{ ctx.svc }.object;
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
    let primary = match spec.cluster_ip.as_deref() {
        Some("None") => return Ok(Read::Skip(Skip::Headless)),
        None | Some("") => {
            return Err(ctx.refuse("spec.clusterIP", FieldError::NotAllocated("ClusterIPs")));
        }
        Some(ip) => ip,
    };
    // `clusterIPs[0]` is `clusterIP` (the API server keeps them equal);
    // the rest are the other family's. Each family stands on its own, as
    // kube-proxy programs them: one that cannot be programmed is reported
    // and the other is still served.
    let given = spec.cluster_ips.as_deref().unwrap_or_default();
    let rest = given.iter().skip(1).map(String::as_str);
    let families = spec.ip_families.as_deref().unwrap_or_default();
    let mut cluster_ips: Vec<IpAddr> = vec![];
    let mut first_error = None;
    for (i, ip) in std::iter::once(primary).chain(rest).enumerate() {
        let a = match check_cluster_ip(ip, node) {
            Ok(a) => a,
            Err(e) => {
                if i == 0 {
                    first_error = Some(e);
                } else {
                    ctx.warn(field_of(i), e);
                }
                continue;
            }
        };
        let family = Family::of(a);
        if let Some(named) = families.get(i)
            && named != family.as_str()
        {
            let e = FieldError::FamilyMismatch {
                ip: ip.into(),
                actual: family.as_str(),
                named: named.clone(),
            };
            ctx.warn(format!("spec.ipFamilies[{i}]"), e);
        }
        if cluster_ips.iter().any(|c| Family::of(*c) == family) {
            ctx.warn(field_of(i), FieldError::SecondOfFamily(family.as_str()));
            continue;
        }
        cluster_ips.push(a);
    }
    if let Some(e) = first_error {
        // Only the primary address: the Service is refused, as before
        // dual-stack; with another family usable, that family is served.
        if cluster_ips.is_empty() {
            return Err(ctx.refuse("spec.clusterIP", e));
        }
        ctx.warn("spec.clusterIP", e);
    }
    Ok(Read::Program {
        spec,
        svc_type,
        cluster_ips,
    })
}
