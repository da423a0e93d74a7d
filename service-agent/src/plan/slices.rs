//! Reading EndpointSlices: which Service each belongs to, the endpoints they
//! give one Service port, and what in them cannot be used.
use std::{collections::BTreeMap, net::Ipv4Addr};

use k8s_openapi::api::discovery::v1::{Endpoint, EndpointSlice};

use super::{error::FieldError, types::Problem, types::Protocol};
use crate::model::{SERVICE_NAME_LABEL, ServiceId, Sourced, object_ref};

/// An endpoint of one Service port: the endpoint, its port number for that
/// Service port, and its address parsed once (`None`: not IPv4).
pub(super) type PortEndpoint<'a> = (&'a Endpoint, u16, Option<Ipv4Addr>);

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

/// The endpoints the slices give the Service port named `port_name` with
/// `proto`: the slice port carrying it has its name and protocol.
pub(super) fn port_endpoints<'a>(
    slices: &[&'a Sourced<EndpointSlice>],
    port_name: &str,
    proto: Protocol,
) -> Vec<PortEndpoint<'a>> {
    let mut eps = vec![];
    for slice in slices {
        let s = &slice.object;
        if s.address_type != "IPv4" {
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
        eps.extend(
            s.endpoints
                .iter()
                .flatten()
                .map(|e| (e, target, e.addresses.first().and_then(|a| a.parse().ok()))),
        );
    }
    eps
}

fn slice_object(slice: &Sourced<EndpointSlice>) -> String {
    format!("EndpointSlice {}", object_ref(&slice.object.metadata))
}

/// Endpoints of an IPv4 slice whose address is not IPv4: ignored, and said so.
pub(super) fn address_problems(slice: &Sourced<EndpointSlice>) -> Vec<Problem> {
    let s = &slice.object;
    if s.address_type != "IPv4" {
        return vec![];
    }
    let mut out = vec![];
    for (i, e) in s.endpoints.iter().flatten().enumerate() {
        if let Some(a) = e.addresses.first()
            && a.parse::<Ipv4Addr>().is_err()
        {
            out.push(Problem::new(
                &slice.origin,
                slice_object(slice),
                format!("endpoints[{i}].addresses[0]"),
                &FieldError::EndpointNotIpv4(a.clone()),
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
