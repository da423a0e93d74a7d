//! What the planner produces: the frontend table and what it says about
//! the objects it could not program.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    sync::Arc,
};

use super::{error::FieldError, ipnet_lite};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => service_common::IPPROTO_TCP,
            Protocol::Udp => service_common::IPPROTO_UDP,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            service_common::IPPROTO_TCP => Some(Protocol::Tcp),
            service_common::IPPROTO_UDP => Some(Protocol::Udp),
            _ => None,
        }
    }

    /// The name Kubernetes uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where packets arrive: an address (unspecified for a NodePort, which
/// matches every node address of the address's family), a port and a
/// protocol. Each family's frontends go to that family's maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: Protocol,
}

impl fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V4(a) if a.is_unspecified() => write!(f, "*:{}/{}", self.port, self.proto),
            IpAddr::V6(a) if a.is_unspecified() => write!(f, "[*]:{}/{}", self.port, self.proto),
            IpAddr::V4(a) => write!(f, "{a}:{}/{}", self.port, self.proto),
            IpAddr::V6(a) => write!(f, "[{a}]:{}/{}", self.port, self.proto),
        }
    }
}

/// The address family of an address, as the planner programs each.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(a: IpAddr) -> Self {
        if a.is_ipv4() { Family::V4 } else { Family::V6 }
    }

    /// The name Kubernetes uses (`ipFamilies`, an EndpointSlice's `addressType`).
    pub fn as_str(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    /// The address NodePort frontends of the family have.
    pub fn unspecified(self) -> IpAddr {
        match self {
            Family::V4 => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            Family::V6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendAddr {
    pub addr: IpAddr,
    pub port: u16,
    /// The endpoint runs on this node (its `nodeName` is this node's name).
    /// Traffic from outside to a backend that is not local is source-NATed.
    pub local: bool,
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{}", self.port),
            IpAddr::V6(a) => write!(f, "[{a}]:{}", self.port),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    ExternalIp,
    LoadBalancer,
}

/// A frontend's backends. Shared: the planner keeps a frontend's plan as
/// compiled, as won and as in force, and a Service's ports and frontends
/// mostly have the same list.
pub type Backends = Arc<[BackendAddr]>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendPlan {
    /// `namespace/name` of the Service (shared by its frontends).
    pub service: Arc<str>,
    pub port_name: Arc<str>,
    pub kind: FrontendKind,
    /// Sorted, without duplicates. Empty: the frontend rejects.
    pub backends: Backends,
    /// The backends for sources inside the cluster (pods, the node itself),
    /// when they differ in kind from `backends`: on the external addresses
    /// of a Service with `externalTrafficPolicy: Local`, which applies to
    /// traffic from outside only, these get every cluster-wide endpoint as
    /// kube-proxy's short-circuit gives them. `None`: every source uses
    /// `backends`.
    pub in_cluster: Option<Backends>,
    /// ClientIP affinity timeout, when the Service asks for affinity.
    pub affinity_timeout_s: Option<u32>,
    /// With no backend: answer with a reject (the Service has no endpoint
    /// at all), or drop (policy Local and no endpoint on this node).
    pub reject_when_empty: bool,
    /// New flows only from these sources (loadBalancerSourceRanges, on
    /// LoadBalancer ingress IPs); empty: from anywhere.
    pub source_ranges: Vec<ipnet_lite::IpNet>,
}

/// A Service the dataplane deliberately leaves alone, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub service: String,
    pub reason: String,
}

/// Something in the objects that cannot be programmed as written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Where the object was read from.
    pub origin: String,
    /// `Kind namespace/name`.
    pub object: String,
    pub field: String,
    pub message: String,
    /// The whole Service is refused (its previous state stays programmed),
    /// rather than only the part named.
    pub refuses_service: bool,
}

impl Problem {
    /// A problem with one field of `object` (`Kind namespace/name`), read
    /// from `origin`.
    pub fn new(
        origin: &str,
        object: String,
        field: impl Into<String>,
        error: &FieldError,
        refuses_service: bool,
    ) -> Self {
        Self {
            origin: origin.to_string(),
            object,
            field: field.into(),
            message: error.to_string(),
            refuses_service,
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({}): field {}: {}",
            self.origin, self.object, self.field, self.message
        )
    }
}

/// What this node is, as far as the planner cares.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    /// The node's name, for traffic policy Local (endpoints' `nodeName`).
    pub name: Option<String>,
    /// Only externalIPs inside these ranges are programmed; none without
    /// any: whoever may set `spec.externalIPs` could otherwise intercept
    /// traffic to any address (CVE-2020-8554).
    pub external_ip_allow: Vec<ipnet_lite::IpNet>,
    /// The ranges ClusterIPs are allocated from (`--service-cluster-ip-range`);
    /// empty: any address is accepted.
    pub service_cidrs: Vec<ipnet_lite::IpNet>,
    /// The node's `topology.kubernetes.io/zone`, for topology hints.
    pub zone: Option<String>,
}

/// A `healthCheckNodePort` this node answers, as kube-proxy does for
/// LoadBalancer Services with `externalTrafficPolicy: Local`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthCheck {
    pub port: u16,
    /// `namespace/name`.
    pub service: String,
    /// Ready endpoints of the Service on this node. Terminating ones do not
    /// count: a load balancer should stop sending new traffic here (KEP-1669).
    pub local_endpoints: usize,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub frontends: BTreeMap<FrontendKey, FrontendPlan>,
    pub health_checks: Vec<HealthCheck>,
    pub skipped: Vec<Skipped>,
    pub problems: Vec<Problem>,
    /// Services refused as a whole: the agent keeps their previous frontends.
    pub refused: BTreeSet<String>,
}

impl Plan {
    /// Puts back the frontends that refused Services had in `previous`, so
    /// that a bad edit leaves the last good state serving.
    pub fn keep_refused_from(&mut self, previous: &Plan) {
        for (k, f) in &previous.frontends {
            if self.refused.contains(&*f.service) && !self.frontends.contains_key(k) {
                self.frontends.insert(*k, f.clone());
            }
        }
        for h in &previous.health_checks {
            if self.refused.contains(&h.service)
                && !self.health_checks.iter().any(|x| x.port == h.port)
            {
                self.health_checks.push(h.clone());
            }
        }
    }
}
