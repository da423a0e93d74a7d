//! The cluster as the agent sees it, whatever the source: Kubernetes objects
//! (the k8s-openapi types the API server returns) plus where each came from.
//!
//! The file source has no controllers behind it, so this module also does the
//! two jobs the control plane would: the EndpointSlice controller (Pods
//! selected by a Service become endpoints) and the mirroring controller
//! (Endpoints of a selector-less Service become an EndpointSlice).
use std::{collections::BTreeMap, sync::Arc};

use k8s_openapi::{
    api::{
        core::v1::{Endpoints, Pod, Service, ServicePort},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};

pub mod packed;
pub mod trim;

/// The label that joins an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Services carrying this label belong to another proxy.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Services carrying this label are headless whatever their spec says.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

/// When the endpoints controller saw the change an EndpointSlice carries
/// (RFC 3339): where `network_programming_duration_seconds` starts.
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// Annotations that ask for topology-aware routing (older spellings of
/// `spec.trafficDistribution`). The only annotations the planner reads, so
/// the only ones a source needs to keep.
pub const TOPOLOGY_MODE_ANNOTATIONS: [&str; 2] = [
    "service.kubernetes.io/topology-mode",
    "service.kubernetes.io/topology-aware-hints",
];

/// What joins a Service and its EndpointSlices: the namespace (`default`
/// when missing) and the name. Shared strings: the planner and the sources
/// index by it several times over, and a copy costs no allocation.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceId {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ServiceId {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The id of a Service (or of the Endpoints object mirroring one).
    pub fn of(meta: &ObjectMeta) -> Self {
        Self::new(namespace(meta), meta.name.as_deref().unwrap_or_default())
    }

    /// The Service a slice belongs to, by its `kubernetes.io/service-name` label.
    pub fn of_slice(slice: &EndpointSlice) -> Option<Self> {
        let meta = &slice.metadata;
        let svc = meta.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
        Some(Self::new(namespace(meta), svc))
    }

    /// `namespace/name`, as the plan names a Service.
    pub fn object_ref(&self) -> String {
        let name = if self.name.is_empty() {
            "<unnamed>"
        } else {
            &self.name
        };
        format!("{}/{name}", self.namespace)
    }

    /// The id behind a plan's `namespace/name` (the inverse of
    /// [`ServiceId::object_ref`]).
    pub fn from_object_ref(name: &str) -> Self {
        let (ns, n) = name.split_once('/').unwrap_or(("default", name));
        Self::new(ns, if n == "<unnamed>" { "" } else { n })
    }
}

/// An object and where it was read from (`file.yaml#2`, `api`), for messages.
#[derive(Clone, Debug, PartialEq)]
pub struct Sourced<T> {
    pub origin: String,
    pub object: T,
}

impl<T> Sourced<T> {
    pub fn new(origin: impl Into<String>, object: T) -> Self {
        Self {
            origin: origin.into(),
            object,
        }
    }
}

/// Objects of the cluster (or of one manifest file).
#[derive(Clone, Debug, Default)]
pub struct Cluster {
    pub services: Vec<Sourced<Service>>,
    pub endpoint_slices: Vec<Sourced<EndpointSlice>>,
    pub endpoints: Vec<Sourced<Endpoints>>,
    pub pods: Vec<Sourced<Pod>>,
}

/// `namespace/name` of an object, with `default` for a missing namespace.
pub fn object_ref(meta: &ObjectMeta) -> String {
    format!(
        "{}/{}",
        meta.namespace.as_deref().unwrap_or("default"),
        meta.name.as_deref().unwrap_or("<unnamed>")
    )
}

fn namespace(meta: &ObjectMeta) -> &str {
    meta.namespace.as_deref().unwrap_or("default")
}

fn pod_is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// A Pod's addresses: `status.podIPs` (one per family on a dual-stack
/// cluster), or `status.podIP` alone when the list is missing.
fn pod_ips(pod: &Pod) -> Vec<&str> {
    let Some(status) = pod.status.as_ref() else {
        return vec![];
    };
    let mut out: Vec<&str> = (status.pod_ips.iter().flatten())
        .map(|p| p.ip.as_str())
        .collect();
    if out.is_empty() {
        out.extend(status.pod_ip.as_deref());
    }
    out
}

/// An EndpointSlice's `addressType` for `ip`. What is no address goes with
/// IPv4, where the planner reports it by name.
fn address_type(ip: &str) -> &'static str {
    match ip.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(_)) => "IPv6",
        _ => "IPv4",
    }
}

/// The endpoint hostname the controller gives a Pod: its `spec.hostname`
/// when its `spec.subdomain` names this Service (a StatefulSet's pods).
fn pod_hostname(pod: &Pod, svc: &Service) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    (spec.subdomain.is_some() && spec.subdomain == svc.metadata.name)
        .then(|| spec.hostname.clone())
        .flatten()
}

fn pod_is_finished(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// Whether a selector picks this Pod by its labels (the namespace is the
/// caller's to check).
pub fn selector_matches(selector: &BTreeMap<String, String>, pod: &Pod) -> bool {
    let labels = pod.metadata.labels.as_ref();
    selector
        .iter()
        .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
}

/// The container port a Service port sends to on this pod, as the endpoints
/// controller resolves it: a number as is, a name through the pod's container
/// ports (same protocol), nothing when the pod has no such port.
pub fn resolve_target_port(sp: &ServicePort, pod: &Pod) -> Option<i32> {
    let protocol = sp.protocol.as_deref().unwrap_or("TCP");
    match &sp.target_port {
        None => Some(sp.port),
        Some(IntOrString::Int(p)) => Some(*p),
        Some(IntOrString::String(name)) => pod.spec.as_ref()?.containers.iter().find_map(|c| {
            c.ports.as_ref()?.iter().find_map(|cp| {
                let cp_proto = cp.protocol.as_deref().unwrap_or("TCP");
                (cp.name.as_deref() == Some(name.as_str()) && cp_proto == protocol)
                    .then_some(cp.container_port)
            })
        }),
    }
}

fn slice_meta(svc: &Service, suffix: usize) -> ObjectMeta {
    let svc_name = svc.metadata.name.clone().unwrap_or_default();
    ObjectMeta {
        name: Some(format!("{svc_name}-derived-{suffix}")),
        namespace: svc.metadata.namespace.clone(),
        labels: Some(BTreeMap::from([(SERVICE_NAME_LABEL.to_string(), svc_name)])),
        ..Default::default()
    }
}

impl Cluster {
    /// Every EndpointSlice the planner should see: the given ones, those the
    /// EndpointSlice controller would make from Pods, and those the mirroring
    /// controller would make from Endpoints.
    pub fn all_endpoint_slices(&self) -> Vec<Sourced<EndpointSlice>> {
        let mut out = self.endpoint_slices.clone();
        for svc in &self.services {
            out.extend(slices_from_pods(svc, &self.pods));
        }
        for ep in &self.endpoints {
            let e = &ep.object;
            let key = object_ref(&e.metadata);
            let selectorless = self
                .services
                .iter()
                .any(|s| object_ref(&s.object.metadata) == key && is_selectorless(&s.object));
            let has_slice = self.endpoint_slices.iter().any(|sl| {
                namespace(&sl.object.metadata) == namespace(&e.metadata)
                    && sl
                        .object
                        .metadata
                        .labels
                        .as_ref()
                        .and_then(|l| l.get(SERVICE_NAME_LABEL))
                        == e.metadata.name.as_ref()
            });
            if selectorless && !has_slice {
                out.extend(mirror_endpoints(ep));
            }
        }
        out
    }
}

/// A Service without a selector: its endpoints come from Endpoints objects.
pub fn is_selectorless(svc: &Service) -> bool {
    svc.spec
        .as_ref()
        .and_then(|sp| sp.selector.as_ref())
        .is_none_or(|sel| sel.is_empty())
}

/// The namespace a Service's selector looks in, and the selector, when it
/// has a non-empty one (only those make endpoints from Pods).
pub fn pod_selector(svc: &Service) -> Option<(&str, &BTreeMap<String, String>)> {
    let selector = svc.spec.as_ref()?.selector.as_ref()?;
    (!selector.is_empty()).then(|| (namespace(&svc.metadata), selector))
}

/// The namespace of a Pod (`default` when missing).
pub fn pod_namespace(pod: &Pod) -> &str {
    namespace(&pod.metadata)
}

/// What the EndpointSlice controller makes of the Pods a Service selects.
/// `pods` in source order; those outside the Service's namespace or not
/// matching its selector are passed over, so a pre-filtered list gives the
/// same slices as all of them.
pub fn slices_from_pods<'a>(
    svc: &Sourced<Service>,
    pods: impl IntoIterator<Item = &'a Sourced<Pod>>,
) -> Vec<Sourced<EndpointSlice>> {
    let s = &svc.object;
    let Some(spec) = s.spec.as_ref() else {
        return vec![];
    };
    let Some(selector) = spec.selector.as_ref().filter(|sel| !sel.is_empty()) else {
        return vec![];
    };
    let ports = spec.ports.clone().unwrap_or_default();
    let publish_not_ready = spec.publish_not_ready_addresses == Some(true);
    let ns = namespace(&s.metadata);
    // Pods whose ports resolve alike share a slice, as in the controller,
    // which also makes one slice per address family: a dual-stack Pod is an
    // endpoint of both.
    type Group = (&'static str, Vec<Option<i32>>);
    let mut groups: BTreeMap<Group, Vec<Endpoint>> = BTreeMap::new();
    for pod in pods {
        let p = &pod.object;
        if namespace(&p.metadata) != ns || !selector_matches(selector, p) || pod_is_finished(p) {
            continue;
        }
        let resolved: Vec<Option<i32>> =
            ports.iter().map(|sp| resolve_target_port(sp, p)).collect();
        let ready = pod_is_ready(p);
        let terminating = p.metadata.deletion_timestamp.is_some();
        for ip in pod_ips(p) {
            let group = (address_type(ip), resolved.clone());
            groups.entry(group).or_default().push(Endpoint {
                addresses: vec![ip.to_string()],
                conditions: Some(EndpointConditions {
                    ready: Some((ready && !terminating) || publish_not_ready),
                    serving: Some(ready || publish_not_ready),
                    terminating: Some(terminating),
                }),
                node_name: p.spec.as_ref().and_then(|sp| sp.node_name.clone()),
                hostname: pod_hostname(p, s),
                target_ref: None,
                ..Default::default()
            });
        }
    }
    groups
        .into_iter()
        .enumerate()
        .map(|(i, ((family, resolved), endpoints))| {
            let ports = ports
                .iter()
                .zip(resolved)
                .filter_map(|(sp, port)| {
                    Some(EndpointPort {
                        name: Some(sp.name.clone().unwrap_or_default()),
                        port: Some(port?),
                        protocol: Some(sp.protocol.clone().unwrap_or_else(|| "TCP".into())),
                        app_protocol: sp.app_protocol.clone(),
                    })
                })
                .collect();
            Sourced::new(
                format!("pods selected by Service {}", object_ref(&s.metadata)),
                EndpointSlice {
                    metadata: slice_meta(s, i),
                    address_type: family.into(),
                    endpoints: Some(endpoints),
                    ports: Some(ports),
                },
            )
        })
        .collect()
}

/// What the mirroring controller makes of the Endpoints of a selector-less
/// Service (the caller checks that it is one and has no slice of its own).
pub fn mirror_endpoints(ep: &Sourced<Endpoints>) -> Vec<Sourced<EndpointSlice>> {
    let e = &ep.object;
    let svc_like = Service {
        metadata: e.metadata.clone(),
        ..Default::default()
    };
    let mut out = vec![];
    for subset in e.subsets.iter().flatten() {
        // One slice per address family, as the mirroring controller makes.
        // A subset without addresses still gives its (empty) slice.
        let mut by_family: BTreeMap<&'static str, Vec<Endpoint>> =
            BTreeMap::from([("IPv4", vec![])]);
        for (addrs, ready) in [
            (&subset.addresses, true),
            (&subset.not_ready_addresses, false),
        ] {
            for a in addrs.iter().flatten() {
                by_family
                    .entry(address_type(&a.ip))
                    .or_default()
                    .push(Endpoint {
                        addresses: vec![a.ip.clone()],
                        conditions: Some(EndpointConditions {
                            ready: Some(ready),
                            serving: Some(ready),
                            terminating: Some(false),
                        }),
                        node_name: a.node_name.clone(),
                        ..Default::default()
                    });
            }
        }
        let ports: Vec<EndpointPort> = subset
            .ports
            .iter()
            .flatten()
            .map(|p| EndpointPort {
                name: Some(p.name.clone().unwrap_or_default()),
                port: Some(p.port),
                protocol: Some(p.protocol.clone().unwrap_or_else(|| "TCP".into())),
                app_protocol: p.app_protocol.clone(),
            })
            .collect();
        let dual = by_family.len() > 1;
        for (family, endpoints) in by_family {
            if dual && endpoints.is_empty() {
                continue;
            }
            out.push(Sourced::new(
                ep.origin.clone(),
                EndpointSlice {
                    metadata: slice_meta(&svc_like, out.len()),
                    address_type: family.into(),
                    endpoints: Some(endpoints),
                    ports: Some(ports.clone()),
                },
            ));
        }
    }
    out
}
