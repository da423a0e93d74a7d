//! Objects cut down to what the agent reads, as they arrive from either
//! source. At 10,000 Services the objects are most of the agent's memory,
//! and most of an object is what no reader looks at: server-side apply
//! bookkeeping, `kubectl apply`'s copy of the whole object in an
//! annotation, owner references, the endpoints' `targetRef`s, a Pod's
//! containers beyond their ports.
//!
//! What is kept, and who reads it: names, namespace, `resourceVersion`
//! (change detection), `creationTimestamp` (the older Service wins a
//! contested frontend), the labels and annotations named below, every
//! Service spec field, `status.loadBalancer`, and of endpoints their
//! addresses, conditions, hostname, node, zone and hints.
use k8s_openapi::{
    api::{
        core::v1::{Container, Endpoints, Pod, PodSpec, PodStatus, Service, ServiceStatus},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use super::{
    HEADLESS_LABEL, SERVICE_NAME_LABEL, SERVICE_PROXY_NAME_LABEL, TOPOLOGY_MODE_ANNOTATIONS,
    TRIGGER_TIME_ANNOTATION,
};

/// Keeps the metadata fields every reader may use, and of labels and
/// annotations only those `keep_label` / `keep_annotation` accept.
fn meta(m: &mut ObjectMeta, keep_label: fn(&str) -> bool, keep_annotation: fn(&str) -> bool) {
    let kept = ObjectMeta {
        name: m.name.take(),
        namespace: m.namespace.take(),
        resource_version: m.resource_version.take(),
        creation_timestamp: m.creation_timestamp.take(),
        labels: m.labels.take().map(|mut l| {
            l.retain(|k, _| keep_label(k));
            l
        }),
        annotations: m.annotations.take().map(|mut a| {
            a.retain(|k, _| keep_annotation(k));
            a
        }),
        ..Default::default()
    };
    *m = kept;
}

fn no(_: &str) -> bool {
    false
}

fn any(_: &str) -> bool {
    true
}

/// The labels of a Service that the planner reads.
pub fn service_label(key: &str) -> bool {
    key == SERVICE_PROXY_NAME_LABEL || key == HEADLESS_LABEL
}

/// The annotations of a Service that the planner reads.
pub fn service_annotation(key: &str) -> bool {
    TOPOLOGY_MODE_ANNOTATIONS.contains(&key)
}

/// The labels of an EndpointSlice that a source reads (its Service).
pub fn slice_label(key: &str) -> bool {
    key == SERVICE_NAME_LABEL
}

/// The annotations of an EndpointSlice that the metrics read.
pub fn slice_annotation(key: &str) -> bool {
    key == TRIGGER_TIME_ANNOTATION
}

pub fn service(svc: &mut Service) {
    meta(&mut svc.metadata, service_label, service_annotation);
    svc.status = svc.status.take().and_then(|s| {
        s.load_balancer.map(|lb| ServiceStatus {
            load_balancer: Some(lb),
            conditions: None,
        })
    });
}

pub fn endpoint_slice(slice: &mut EndpointSlice) {
    meta(&mut slice.metadata, slice_label, slice_annotation);
    for e in slice.endpoints.iter_mut().flatten() {
        e.target_ref = None;
        e.deprecated_topology = None;
    }
}

/// Endpoints objects are read only to mirror selector-less Services.
pub fn endpoints(ep: &mut Endpoints) {
    meta(&mut ep.metadata, no, no);
    for subset in ep.subsets.iter_mut().flatten() {
        for a in subset
            .addresses
            .iter_mut()
            .chain(subset.not_ready_addresses.iter_mut())
            .flatten()
        {
            a.target_ref = None;
        }
    }
}

/// Pods (manifests only) are read for their labels, readiness, addresses,
/// node, hostname and the container ports a named `targetPort` refers to.
pub fn pod(pod: &mut Pod) {
    meta(&mut pod.metadata, any, no);
    pod.spec = pod.spec.take().map(|s| PodSpec {
        containers: s
            .containers
            .into_iter()
            .map(|c| Container {
                name: c.name,
                ports: c.ports,
                ..Default::default()
            })
            .collect(),
        node_name: s.node_name,
        hostname: s.hostname,
        subdomain: s.subdomain,
        ..Default::default()
    });
    pod.status = pod.status.take().map(|s| PodStatus {
        conditions: s.conditions,
        phase: s.phase,
        pod_ip: s.pod_ip,
        pod_ips: s.pod_ips,
        ..Default::default()
    });
}
