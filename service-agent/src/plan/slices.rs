//! Reading EndpointSlices: which Service each belongs to, the endpoints they
//! give one Service port, and what in them cannot be used.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
};

use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};

use super::{
    error::FieldError,
    types::{Family, Problem, Protocol},
};
use crate::model::{SERVICE_NAME_LABEL, ServiceId, Sourced, object_ref};

/// An endpoint of one Service port: the endpoint, its port number for that
/// Service port, and its address parsed once (`None`: not of the slice's
/// family).
pub(super) type PortEndpoint<'a> = (&'a Endpoint, u16, Option<IpAddr>);

/// A port number Kubernetes accepts (0 is not one).
pub(super) fn port_u16(v: i32) -> Option<u16> {
    u16::try_from(v).ok().filter(|p| *p != 0)
}

/// The slices of each Service, in the order given; unlabelled ones are left
/// out.
pub(super) fn by_service(
    slices: &[Sourced<EndpointSlice>],
) -> BTreeMap<ServiceId, Vec<&Sourced<EndpointSlice>>> {
    let mut out: BTreeMap<ServiceId, Vec<&Sourced<EndpointSlice>>> = BTreeMap::new();
    for s in slices {
        if let Some(id) = ServiceId::of_slice(&s.object) {
            out.entry(id).or_default().push(s);
        }
    }
    out
}

/// The address of an endpoint of a slice of `family`, when it is one.
fn endpoint_addr(a: &str, family: Family) -> Option<IpAddr> {
    let a: IpAddr = a.parse().ok()?;
    (Family::of(a) == family).then_some(a)
}

/// The endpoints the slices of `family` (their `addressType`; the
/// EndpointSlice controller makes one slice per family) give the Service
/// port named `port_name` with `proto`: the slice port carrying it has its
/// name and protocol.
pub(super) fn port_endpoints<'a>(
    slices: &[&'a Sourced<EndpointSlice>],
    port_name: &str,
    proto: Protocol,
    family: Family,
) -> Vec<PortEndpoint<'a>> {
    let mut eps = vec![];
    for slice in slices {
        let s = &slice.object;
        if s.address_type != family.as_str() {
            continue;
        }
        let Some(ep_port) = s.ports.iter().flatten().find(|p| {
            p.name.as_deref().unwrap_or("") == port_name
                && p.protocol.as_deref().unwrap_or("TCP") == proto.as_str()
        }) else {
            continue;
        };
        let Some(target) = ep_port.port.and_then(port_u16) else {
            continue;
        };
        eps.extend(s.endpoints.iter().flatten().map(|e| {
            (
                e,
                target,
                e.addresses.first().and_then(|a| endpoint_addr(a, family)),
            )
        }));
    }
    eps
}

fn slice_object(slice: &Sourced<EndpointSlice>) -> String {
    format!("EndpointSlice {}", object_ref(&slice.object.metadata))
}

/// Endpoints of an IPv4 or IPv6 slice whose address is not of its family:
/// ignored, and said so. (FQDN slices are not the dataplane's.)
pub(super) fn address_problems(slice: &Sourced<EndpointSlice>) -> Vec<Problem> {
    let s = &slice.object;
    let family = match s.address_type.as_str() {
        "IPv4" => Family::V4,
        "IPv6" => Family::V6,
        _ => return vec![],
    };
    let mut out = vec![];
    for (i, e) in s.endpoints.iter().flatten().enumerate() {
        if let Some(a) = e.addresses.first()
            && endpoint_addr(a, family).is_none()
        {
            let error = match family {
                Family::V4 if a.parse::<Ipv4Addr>().is_err() => {
                    FieldError::EndpointNotIpv4(a.clone())
                }
                _ => FieldError::EndpointWrongFamily {
                    addr: a.clone(),
                    family: family.as_str(),
                },
            };
            out.push(Problem::new(
                &slice.origin,
                slice_object(slice),
                format!("endpoints[{i}].addresses[0]"),
                &error,
                false,
            ));
        }
    }
    out
}

/// A slice whose Service does not exist.
pub(super) fn orphan_problem(id: &ServiceId, slice: &Sourced<EndpointSlice>) -> Problem {
    Problem::new(
        &slice.origin,
        slice_object(slice),
        format!("metadata.labels[{SERVICE_NAME_LABEL}]"),
        &FieldError::NoSuchService(format!("{}/{}", id.namespace, id.name)),
        false,
    )
}
