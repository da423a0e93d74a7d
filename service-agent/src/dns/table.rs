//! The names DNS answers from, built from the same Service and EndpointSlice
//! objects the planner compiles, one Service at a time, so a change costs
//! what it touches and reaches the answers in the sync that programs it.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use crate::{model::ServiceId, source::ServiceObjects};

/// A port as SRV records name it: `_<name>._<proto>`, both lowercase.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamedPort {
    pub name: String,
    pub proto: String,
    pub port: u16,
}

/// A ready address of a headless Service and the name it answers under.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: IpAddr,
    /// The endpoint's `hostname`, else the address with dashes (the
    /// system-assigned identifier the specification asks for).
    pub host: String,
    /// The slice's named ports: clients of a headless Service connect to
    /// the endpoint itself, so its SRV records carry the endpoint's port.
    pub ports: Vec<NamedPort>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    ClusterIp(Vec<IpAddr>),
    /// Ready endpoints (all of them with `publishNotReadyAddresses`),
    /// each address once.
    Headless(Vec<Endpoint>),
    /// The `spec.externalName`, lowercase, without the final dot.
    ExternalName(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    pub ports: Vec<NamedPort>,
}

/// Every Service with a name, and each address back to its names.
#[derive(Debug, Default)]
pub struct Table {
    services: HashMap<ServiceId, Entry>,
    /// Services per namespace: `<ns>.svc.<zone>` exists while one does.
    namespaces: BTreeMap<String, usize>,
    /// ClusterIPs and ready headless endpoints → (Service, host for an endpoint).
    reverse: HashMap<IpAddr, BTreeSet<(ServiceId, Option<String>)>>,
    /// A full read of the source has filled the table: before that a
    /// missing name may only be missing from the table.
    pub complete: bool,
}

impl Table {
    /// Replaces what `id` answers with what its objects say (nothing when
    /// it has no Service object).
    pub fn set(&mut self, id: &ServiceId, objects: &ServiceObjects) {
        let (services, slices) = objects;
        let entry = services
            .first()
            .and_then(|s| entry_of(&s.object, slices.iter().map(|s| &s.object)));
        if self.services.get(id) == entry.as_ref() {
            return;
        }
        self.remove(id);
        if let Some(e) = entry {
            for (ip, host) in reverse_names(&e) {
                self.reverse
                    .entry(ip)
                    .or_default()
                    .insert((id.clone(), host));
            }
            *self.namespaces.entry(id.namespace.to_string()).or_default() += 1;
            self.services.insert(id.clone(), e);
        }
    }

    pub fn remove(&mut self, id: &ServiceId) {
        let Some(old) = self.services.remove(id) else {
            return;
        };
        for (ip, host) in reverse_names(&old) {
            if let Some(names) = self.reverse.get_mut(&ip) {
                names.remove(&(id.clone(), host));
                if names.is_empty() {
                    self.reverse.remove(&ip);
                }
            }
        }
        if let Some(n) = self.namespaces.get_mut(&*id.namespace) {
            *n -= 1;
            if *n == 0 {
                self.namespaces.remove(&*id.namespace);
            }
        }
    }

    /// Drops the Services not in `keep` (those a full read no longer found).
    pub fn retain(&mut self, keep: &BTreeSet<ServiceId>) {
        let gone: Vec<ServiceId> = self
            .services
            .keys()
            .filter(|id| !keep.contains(id))
            .cloned()
            .collect();
        for id in gone {
            self.remove(&id);
        }
    }

    pub fn get(&self, namespace: &str, name: &str) -> Option<&Entry> {
        self.services.get(&ServiceId::new(namespace, name))
    }

    pub fn has_namespace(&self, namespace: &str) -> bool {
        self.namespaces.contains_key(namespace)
    }

    /// The names of an address: (Service, endpoint host when it is one).
    pub fn names_of(&self, ip: IpAddr) -> impl Iterator<Item = &(ServiceId, Option<String>)> {
        self.reverse.get(&ip).into_iter().flatten()
    }

    /// The Services whose ClusterIP is `ip`.
    pub fn services_with_cluster_ip(&self, ip: IpAddr) -> impl Iterator<Item = &ServiceId> {
        self.names_of(ip)
            .filter(|(_, host)| host.is_none())
            .map(|(id, _)| id)
    }

    pub fn len(&self) -> usize {
        self.services.len()
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }
}

fn reverse_names(e: &Entry) -> Vec<(IpAddr, Option<String>)> {
    match &e.kind {
        Kind::ClusterIp(ips) => ips.iter().map(|ip| (*ip, None)).collect(),
        Kind::Headless(eps) => eps
            .iter()
            .map(|ep| (ep.ip, Some(ep.host.clone())))
            .collect(),
        Kind::ExternalName(_) => vec![],
    }
}

fn is_headless_ip(ip: &str) -> bool {
    ip.is_empty() || ip.eq_ignore_ascii_case("none")
}

/// What DNS makes of one Service and its slices; `None` for a Service that
/// has no name to answer (no spec).
pub fn entry_of<'a>(
    svc: &Service,
    slices: impl Iterator<Item = &'a EndpointSlice>,
) -> Option<Entry> {
    let spec = svc.spec.as_ref()?;
    let ports = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|p| named_port(p.name.as_deref(), p.protocol.as_deref(), Some(p.port)))
        .collect();
    if spec.type_.as_deref() == Some("ExternalName") {
        let target = spec.external_name.as_deref()?.trim_end_matches('.');
        return Some(Entry {
            kind: Kind::ExternalName(target.to_ascii_lowercase()),
            ports,
        });
    }
    let mut ips: Vec<&str> = spec
        .cluster_ips
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    if ips.is_empty() {
        ips.extend(spec.cluster_ip.as_deref());
    }
    let kind = if ips.first().is_none_or(|ip| is_headless_ip(ip)) {
        let publish_not_ready = spec.publish_not_ready_addresses == Some(true);
        Kind::Headless(ready_endpoints(slices, publish_not_ready))
    } else {
        Kind::ClusterIp(ips.iter().filter_map(|ip| ip.parse().ok()).collect())
    };
    Some(Entry { kind, ports })
}

/// A port with a name (unnamed ones have no SRV record) and a number.
fn named_port(name: Option<&str>, proto: Option<&str>, port: Option<i32>) -> Option<NamedPort> {
    let name = name.filter(|n| !n.is_empty())?;
    Some(NamedPort {
        name: name.to_ascii_lowercase(),
        proto: proto.unwrap_or("TCP").to_ascii_lowercase(),
        port: u16::try_from(port?).ok()?,
    })
}

fn ready_endpoints<'a>(
    slices: impl Iterator<Item = &'a EndpointSlice>,
    publish_not_ready: bool,
) -> Vec<Endpoint> {
    let mut seen = BTreeSet::new();
    let mut out = vec![];
    for slice in slices {
        let ports: Vec<NamedPort> = slice
            .ports
            .iter()
            .flatten()
            .filter_map(|p| named_port(p.name.as_deref(), p.protocol.as_deref(), p.port))
            .collect();
        for ep in slice.endpoints.iter().flatten() {
            // A missing condition means ready, as the API defines it.
            let ready = ep.conditions.as_ref().and_then(|c| c.ready) != Some(false);
            if !ready && !publish_not_ready {
                continue;
            }
            for addr in &ep.addresses {
                let Ok(ip) = addr.parse::<IpAddr>() else {
                    continue;
                };
                if !seen.insert(ip) {
                    continue;
                }
                let host = ep
                    .hostname
                    .as_deref()
                    .filter(|h| !h.is_empty())
                    .map(str::to_ascii_lowercase)
                    .unwrap_or_else(|| dashed(ip));
                out.push(Endpoint {
                    ip,
                    host,
                    ports: ports.clone(),
                });
            }
        }
    }
    out
}

/// `10-1-2-3`, or the IPv6 address with `-` for `:`.
fn dashed(ip: IpAddr) -> String {
    ip.to_string().replace(['.', ':'], "-")
}
