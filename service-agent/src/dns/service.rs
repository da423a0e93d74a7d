//! The agent's own DNS Service: a ClusterIP (`--dns-service-ip`, UDP and
//! TCP 53) whose one endpoint is the agent's listener on this node, handed
//! to the planner with the source's Services, so pods reach DNS through the
//! dataplane like any Service. The source is wrapped: every Service the
//! planner is given also updates the name table, in the same sync.
use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, Ordering},
    },
};

use futures::future::BoxFuture;
use k8s_openapi::{
    api::{
        core::v1::{Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};

use super::table::Table;
use crate::{
    model::{SERVICE_NAME_LABEL, ServiceId, Sourced},
    source::{Pending, ServiceObjects, Source},
};

/// The name the agent's DNS Service has, CoreDNS's (pods' resolv.conf and
/// tools expect it).
pub const NAMESPACE: &str = "kube-system";
pub const NAME: &str = "kube-dns";
const ORIGIN: &str = "the agent's DNS (--dns-service-ip)";

pub fn id() -> ServiceId {
    ServiceId::new(NAMESPACE, NAME)
}

/// The Service and its slice: `service_ip` port 53 to `listen`.
pub fn objects(service_ip: IpAddr, listen: SocketAddr, node: Option<&str>) -> ServiceObjects {
    let meta = |name: &str| ObjectMeta {
        name: Some(name.into()),
        namespace: Some(NAMESPACE.into()),
        labels: Some([(SERVICE_NAME_LABEL.to_string(), NAME.to_string())].into()),
        ..Default::default()
    };
    let ports = [("dns", "UDP"), ("dns-tcp", "TCP")];
    let svc = Service {
        metadata: meta(NAME),
        spec: Some(ServiceSpec {
            cluster_ip: Some(service_ip.to_string()),
            cluster_ips: Some(vec![service_ip.to_string()]),
            ports: Some(
                ports
                    .iter()
                    .map(|(name, proto)| ServicePort {
                        name: Some(name.to_string()),
                        protocol: Some(proto.to_string()),
                        port: 53,
                        target_port: Some(IntOrString::Int(i32::from(listen.port()))),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        ..Default::default()
    };
    let slice = EndpointSlice {
        metadata: meta(&format!("{NAME}-agent")),
        address_type: if listen.is_ipv4() { "IPv4" } else { "IPv6" }.into(),
        endpoints: Some(vec![Endpoint {
            addresses: vec![listen.ip().to_string()],
            conditions: Some(EndpointConditions {
                ready: Some(true),
                serving: Some(true),
                terminating: Some(false),
            }),
            node_name: node.map(str::to_string),
            ..Default::default()
        }]),
        ports: Some(
            ports
                .iter()
                .map(|(name, proto)| EndpointPort {
                    name: Some(name.to_string()),
                    protocol: Some(proto.to_string()),
                    port: Some(i32::from(listen.port())),
                    app_protocol: None,
                })
                .collect(),
        ),
    };
    (
        vec![Sourced::new(ORIGIN, svc)],
        vec![Sourced::new(ORIGIN, slice)],
    )
}

/// A source with the DNS Service added, feeding the name table.
pub struct DnsSource {
    pub inner: Box<dyn Source>,
    pub table: Arc<RwLock<Table>>,
    pub service_ip: IpAddr,
    pub own: ServiceObjects,
    /// The source's own Service of the DNS Service's name, which wins.
    shadowed_by: Mutex<Option<String>>,
    /// A full read is handing every Service over: the table is complete
    /// once it has.
    filling: AtomicBool,
}

impl DnsSource {
    pub fn new(
        inner: Box<dyn Source>,
        table: Arc<RwLock<Table>>,
        service_ip: IpAddr,
        own: ServiceObjects,
    ) -> Self {
        Self {
            inner,
            table,
            service_ip,
            own,
            shadowed_by: Mutex::new(None),
            filling: AtomicBool::new(false),
        }
    }
}

impl Source for DnsSource {
    fn refresh(&mut self, pending: &Pending, all: bool) -> Option<BTreeSet<ServiceId>> {
        self.inner.refresh(pending, all)
    }

    fn resync(&mut self, pending: &Pending) -> BTreeSet<ServiceId> {
        self.inner.resync(pending)
    }

    fn ids(&self) -> BTreeSet<ServiceId> {
        let mut ids = self.inner.ids();
        ids.insert(id());
        self.table
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(&ids);
        self.filling.store(true, Ordering::Relaxed);
        ids
    }

    fn objects(&self, which: &ServiceId) -> ServiceObjects {
        let mut objects = self.inner.objects(which);
        if *which == id() {
            let shadow = objects.0.first().map(|s| s.origin.clone());
            if shadow.is_none() {
                objects = self.own.clone();
            }
            *self.shadowed_by.lock().unwrap_or_else(|e| e.into_inner()) = shadow;
        }
        self.table
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .set(which, &objects);
        objects
    }

    /// Asked for after every Service of a sync was: a full read's last step.
    fn unlabeled_slices(&self) -> Vec<Sourced<EndpointSlice>> {
        if self.filling.swap(false, Ordering::Relaxed) {
            self.table
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .complete = true;
        }
        self.inner.unlabeled_slices()
    }

    fn errors(&self) -> Vec<String> {
        let mut errors = self.inner.errors();
        let own = id().object_ref();
        if let Some(origin) = &*self.shadowed_by.lock().unwrap_or_else(|e| e.into_inner()) {
            errors.push(format!(
                "DNS: Service {own} ({origin}) takes the place of the agent's own DNS Service {own} ({ORIGIN}): pods reach whatever it selects, not this agent's DNS"
            ));
        }
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        for other in table.services_with_cluster_ip(self.service_ip) {
            if *other != id() {
                errors.push(format!(
                    "DNS: --dns-service-ip {} is also the ClusterIP of Service {}: the agent's DNS Service {own} and that Service claim the same frontends (choose another --dns-service-ip or change the Service)",
                    self.service_ip,
                    other.object_ref()
                ));
            }
        }
        errors
    }

    fn node_zone(&self) -> Option<String> {
        self.inner.node_zone()
    }

    fn wait_until_synced(&self) -> BoxFuture<'_, anyhow::Result<()>> {
        self.inner.wait_until_synced()
    }
}
