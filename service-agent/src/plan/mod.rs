//! The planner: every Kubernetes Service semantic the dataplane honours is
//! decided here, as a pure function of the objects, so it is tested without
//! a kernel. The BPF programs only execute the resulting frontend → backends
//! table.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
};

use k8s_openapi::{
    api::{
        core::v1::{Service, ServicePort},
        discovery::v1::{Endpoint, EndpointSlice},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};

use crate::model::{SERVICE_NAME_LABEL, Sourced, object_ref};

/// Default of `sessionAffinityConfig.clientIP.timeoutSeconds`.
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// Upper bound Kubernetes validation puts on the affinity timeout (one day).
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400;

/// Services carrying this label belong to another proxy.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Services carrying this label are headless whatever their spec says.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

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
}

impl Protocol {
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
/// matches every node address), a port and a protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey {
    pub addr: Ipv4Addr,
    pub port: u16,
    pub proto: Protocol,
}

impl fmt::Display for FrontendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.addr.is_unspecified() {
            write!(f, "*:{}/{}", self.port, self.proto)
        } else {
            write!(f, "{}:{}/{}", self.addr, self.port, self.proto)
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendAddr {
    pub addr: Ipv4Addr,
    pub port: u16,
    /// The endpoint runs on this node (its `nodeName` is this node's name).
    /// Traffic from outside to a backend that is not local is source-NATed.
    pub local: bool,
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.addr, self.port)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrontendKind {
    ClusterIp,
    NodePort,
    ExternalIp,
    LoadBalancer,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendPlan {
    /// `namespace/name` of the Service.
    pub service: String,
    pub port_name: String,
    pub kind: FrontendKind,
    /// Sorted, without duplicates. Empty: the frontend rejects.
    pub backends: Vec<BackendAddr>,
    /// ClientIP affinity timeout, when the Service asks for affinity.
    pub affinity_timeout_s: Option<u32>,
    /// With no backend: answer with a reject (the Service has no endpoint
    /// at all), or drop (policy Local and no endpoint on this node).
    pub reject_when_empty: bool,
    /// New flows only from these sources (loadBalancerSourceRanges, on
    /// LoadBalancer ingress IPs); empty: from anywhere.
    pub source_ranges: Vec<ipnet_lite::Ipv4Net>,
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
    pub external_ip_allow: Vec<ipnet_lite::Ipv4Net>,
    /// The ranges ClusterIPs are allocated from (`--service-cluster-ip-range`);
    /// empty: any address is accepted.
    pub service_cidrs: Vec<ipnet_lite::Ipv4Net>,
    /// The node's `topology.kubernetes.io/zone`, for topology hints.
    pub zone: Option<String>,
}

/// Annotations that ask for topology-aware routing (older spellings of
/// `spec.trafficDistribution`).
pub const TOPOLOGY_MODE_ANNOTATIONS: [&str; 2] = [
    "service.kubernetes.io/topology-mode",
    "service.kubernetes.io/topology-aware-hints",
];

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
            if self.refused.contains(&f.service) && !self.frontends.contains_key(k) {
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

pub mod ipnet_lite {
    //! A CIDR for allow-lists; two fields do not warrant a crate.
    use std::{net::Ipv4Addr, str::FromStr};

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Ipv4Net {
        pub addr: Ipv4Addr,
        pub prefix: u8,
    }

    impl Ipv4Net {
        /// The network address (host bits cleared).
        pub fn network(&self) -> Ipv4Addr {
            Ipv4Addr::from(u32::from(self.addr) & self.mask())
        }

        fn mask(&self) -> u32 {
            if self.prefix == 0 {
                0
            } else {
                u32::MAX << (32 - self.prefix)
            }
        }

        pub fn contains(&self, ip: Ipv4Addr) -> bool {
            u32::from(ip) & self.mask() == u32::from(self.addr) & self.mask()
        }
    }

    impl FromStr for Ipv4Net {
        type Err = String;
        fn from_str(s: &str) -> Result<Self, String> {
            let (a, p) = s.split_once('/').unwrap_or((s, "32"));
            let addr: Ipv4Addr = a.parse().map_err(|e| format!("{s}: {e}"))?;
            let prefix: u8 = p.parse().map_err(|e| format!("{s}: {e}"))?;
            if prefix > 32 {
                return Err(format!("{s}: prefix longer than 32"));
            }
            Ok(Self { addr, prefix })
        }
    }
}

struct Ctx<'a> {
    svc: &'a Sourced<Service>,
    name: String,
    problems: Vec<Problem>,
}

impl Ctx<'_> {
    fn problem(&mut self, field: impl Into<String>, message: impl Into<String>, refuses: bool) {
        self.problems.push(Problem {
            origin: self.svc.origin.clone(),
            object: format!("Service {}", self.name),
            field: field.into(),
            message: message.into(),
            refuses_service: refuses,
        });
    }
}

/// Kubernetes' IANA_SVC_NAME rule for named ports.
pub fn is_port_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 15
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && s.bytes().any(|b| b.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--")
}

fn port_u16(v: i32) -> Option<u16> {
    u16::try_from(v).ok().filter(|p| *p != 0)
}

fn protocol_of(sp: &ServicePort) -> Result<Protocol, String> {
    match sp.protocol.as_deref().unwrap_or("TCP") {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        "SCTP" => Err("SCTP is not supported by this dataplane; the port is not programmed".into()),
        other => Err(format!("unknown protocol {other:?}")),
    }
}

/// An endpoint of one Service port: the endpoint, its port number for that
/// Service port, and its address parsed once.
type PortEndpoint<'a> = (&'a Endpoint, u16, Option<Ipv4Addr>);

/// Endpoints of one Service port, as kube-proxy picks them: ready ones; when
/// none is ready, serving-and-terminating ones (KEP-1669); only this node's
/// when `local_only`.
fn pick_endpoints(
    eps: &[PortEndpoint<'_>],
    this_node: Option<&str>,
    local_only: bool,
    zone: Option<&str>,
) -> Vec<BackendAddr> {
    let is_local = |e: &Endpoint| this_node.is_some() && e.node_name.as_deref() == this_node;
    let backend = |e: &Endpoint, port: u16, addr: Option<Ipv4Addr>| {
        Some(BackendAddr {
            addr: addr?,
            port,
            local: is_local(e),
        })
    };
    let in_zone = |e: &Endpoint| match zone {
        None => true,
        Some(z) => hinted_zones(e).any(|h| h == z),
    };
    let usable: Vec<_> = eps
        .iter()
        .filter(|(e, _, _)| (!local_only || is_local(e)) && in_zone(e))
        .collect();
    let cond = |e: &Endpoint| e.conditions.clone().unwrap_or_default();
    let ready: BTreeSet<BackendAddr> = usable
        .iter()
        .filter(|(e, _, _)| cond(e).ready != Some(false))
        .filter_map(|(e, port, addr)| backend(e, *port, *addr))
        .collect();
    if !ready.is_empty() {
        return ready.into_iter().collect();
    }
    usable
        .iter()
        .filter(|(e, _, _)| {
            let c = cond(e);
            c.serving != Some(false) && c.terminating == Some(true)
        })
        .filter_map(|(e, port, addr)| backend(e, *port, *addr))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

fn hinted_zones(e: &Endpoint) -> impl Iterator<Item = &str> {
    e.hints
        .iter()
        .flat_map(|h| h.for_zones.iter().flatten())
        .map(|z| z.name.as_str())
}

/// The zone to filter cluster-wide endpoints by, when topology-aware routing
/// applies as kube-proxy decides it: the Service asks for it
/// (`trafficDistribution`, or the topology-mode annotation set to Auto), the
/// node has a zone, every ready endpoint carries zone hints, and at least one
/// is hinted for this zone. Otherwise every endpoint is used.
fn topology_zone<'a>(
    svc: &Service,
    eps: &[PortEndpoint<'_>],
    node: &'a NodeContext,
) -> Option<&'a str> {
    let spec = svc.spec.as_ref()?;
    let asked = spec.traffic_distribution.is_some()
        || svc.metadata.annotations.as_ref().is_some_and(|a| {
            TOPOLOGY_MODE_ANNOTATIONS
                .iter()
                .any(|k| a.get(*k).is_some_and(|v| v.eq_ignore_ascii_case("auto")))
        });
    let zone = node.zone.as_deref().filter(|z| !z.is_empty())?;
    if !asked {
        return None;
    }
    let mut any_for_zone = false;
    for (e, _, _) in eps {
        if e.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
            continue;
        }
        let mut zones = hinted_zones(e).peekable();
        zones.peek()?;
        any_for_zone |= zones.any(|z| z == zone);
    }
    any_for_zone.then_some(zone)
}

/// Endpoints of an IPv4 slice whose address is not IPv4: ignored, and said so.
fn slice_address_problems(slice: &Sourced<EndpointSlice>) -> Vec<Problem> {
    let s = &slice.object;
    if s.address_type != "IPv4" {
        return vec![];
    }
    let mut out = vec![];
    for (i, e) in s.endpoints.iter().flatten().enumerate() {
        if e.addresses
            .first()
            .is_some_and(|a| a.parse::<Ipv4Addr>().is_err())
        {
            out.push(Problem {
                origin: slice.origin.clone(),
                object: format!("EndpointSlice {}", object_ref(&s.metadata)),
                field: format!("endpoints[{i}].addresses[0]"),
                message: format!(
                    "{:?} is not an IPv4 address; endpoint ignored",
                    e.addresses[0]
                ),
                refuses_service: false,
            });
        }
    }
    out
}

/// A slice whose Service does not exist.
fn orphan_problem(ns: &str, svc: &str, slice: &Sourced<EndpointSlice>) -> Problem {
    Problem {
        origin: slice.origin.clone(),
        object: format!("EndpointSlice {}", object_ref(&slice.object.metadata)),
        field: format!("metadata.labels[{SERVICE_NAME_LABEL}]"),
        message: format!("no Service {ns}/{svc}; the slice is ignored"),
        refuses_service: false,
    }
}

/// Without a creationTimestamp, the timestamp, `namespace/name`.
type ClaimOrder = (bool, Option<k8s_openapi::jiff::Timestamp>, String);

/// Who claims a contested frontend first, after the Services already
/// serving one: the older by creationTimestamp (those without one last),
/// then by `namespace/name`.
fn claim_order(svc: &Service) -> ClaimOrder {
    let created = svc.metadata.creation_timestamp.as_ref().map(|t| t.0);
    (created.is_none(), created, object_ref(&svc.metadata))
}

/// Compiles the cluster's Services and EndpointSlices into the frontend table.
pub fn compile(
    services: &[Sourced<Service>],
    slices: &[Sourced<EndpointSlice>],
    node: &NodeContext,
) -> Plan {
    compile_after(services, slices, node, &Plan::default())
}

/// Like [`compile`], where `previous` is the plan in force: when two Services
/// claim one frontend, the one already serving it keeps it (then the older
/// by creationTimestamp, then by name), so a new mistake never takes traffic
/// from a working Service.
pub fn compile_after(
    services: &[Sourced<Service>],
    slices: &[Sourced<EndpointSlice>],
    node: &NodeContext,
    previous: &Plan,
) -> Plan {
    let incumbents: BTreeSet<&str> = previous
        .frontends
        .values()
        .map(|f| f.service.as_str())
        .collect();
    let mut plan = Plan::default();
    let mut by_service: BTreeMap<(String, String), Vec<&Sourced<EndpointSlice>>> = BTreeMap::new();
    for s in slices {
        let meta = &s.object.metadata;
        let Some(svc) = meta.labels.as_ref().and_then(|l| l.get(SERVICE_NAME_LABEL)) else {
            continue;
        };
        let ns = meta.namespace.clone().unwrap_or_else(|| "default".into());
        by_service.entry((ns, svc.clone())).or_default().push(s);
    }
    for slice in slices {
        plan.problems.extend(slice_address_problems(slice));
    }

    let known: BTreeSet<(String, String)> = services
        .iter()
        .map(|s| {
            let m = &s.object.metadata;
            (
                m.namespace.clone().unwrap_or_else(|| "default".into()),
                m.name.clone().unwrap_or_default(),
            )
        })
        .collect();
    for ((ns, svc), group) in &by_service {
        if known.contains(&(ns.clone(), svc.clone())) {
            continue;
        }
        for slice in group {
            plan.problems.push(orphan_problem(ns, svc, slice));
        }
    }
    let mut sorted: Vec<&Sourced<Service>> = services.iter().collect();
    sorted.sort_by_cached_key(|s| {
        let (created_none, created, name) = claim_order(&s.object);
        (
            !incumbents.contains(name.as_str()),
            created_none,
            created,
            name,
        )
    });
    let mut owner: BTreeMap<FrontendKey, String> = BTreeMap::new();
    for svc in sorted {
        let name = object_ref(&svc.object.metadata);
        let mut ctx = Ctx {
            svc,
            name: name.clone(),
            problems: vec![],
        };
        let ns = svc
            .object
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let svc_name = svc.object.metadata.name.clone().unwrap_or_default();
        let slices = by_service
            .get(&(ns, svc_name))
            .map(Vec::as_slice)
            .unwrap_or_default();
        match compile_service(&mut ctx, slices, node) {
            Ok(Compiled::Skipped(reason)) => plan.skipped.push(Skipped {
                service: name.clone(),
                reason,
            }),
            Ok(Compiled::Frontends(fes, health)) => {
                let mut clash = None;
                for (key, _) in &fes {
                    if let Some(other) = owner.get(key)
                        && *other != name
                    {
                        clash = Some((*key, other.clone()));
                        break;
                    }
                }
                if let Some((key, other)) = clash {
                    ctx.problem(
                        "spec",
                        format!("frontend {key} is already used by Service {other}; Service not programmed"),
                        true,
                    );
                } else {
                    for (key, fe) in fes {
                        owner.insert(key, name.clone());
                        plan.frontends.insert(key, fe);
                    }
                    plan.health_checks.extend(health);
                }
            }
            Err(()) => {}
        }
        if ctx.problems.iter().any(|p| p.refuses_service) {
            plan.refused.insert(name.clone());
            plan.frontends.retain(|_, f| f.service != name);
        }
        plan.problems.extend(ctx.problems);
    }
    plan
}

#[derive(Clone)]
enum Compiled {
    Skipped(String),
    Frontends(Vec<(FrontendKey, FrontendPlan)>, Option<HealthCheck>),
}

fn compile_service(
    ctx: &mut Ctx<'_>,
    slices: &[&Sourced<EndpointSlice>],
    node: &NodeContext,
) -> Result<Compiled, ()> {
    let svc = &ctx.svc.object;
    let labels = svc.metadata.labels.clone().unwrap_or_default();
    if let Some(proxy) = labels.get(SERVICE_PROXY_NAME_LABEL) {
        return Ok(Compiled::Skipped(format!(
            "label {SERVICE_PROXY_NAME_LABEL}={proxy}: handled by another proxy"
        )));
    }
    if labels.contains_key(HEADLESS_LABEL) {
        return Ok(Compiled::Skipped(format!(
            "label {HEADLESS_LABEL}: headless"
        )));
    }
    let Some(spec) = svc.spec.as_ref() else {
        ctx.problem("spec", "missing", true);
        return Err(());
    };
    let svc_type = spec.type_.as_deref().unwrap_or("ClusterIP");
    if svc_type == "ExternalName" {
        return Ok(Compiled::Skipped("type ExternalName: DNS only".into()));
    }
    let cluster_ip = match spec.cluster_ip.as_deref() {
        Some("None") => return Ok(Compiled::Skipped("clusterIP None: headless".into())),
        None | Some("") => {
            ctx.problem(
                "spec.clusterIP",
                "missing: the manifest source does not allocate ClusterIPs, set one",
                true,
            );
            return Err(());
        }
        Some(ip) => match ip.parse::<Ipv4Addr>() {
            Ok(a)
                if !node.service_cidrs.is_empty()
                    && !node.service_cidrs.iter().any(|n| n.contains(a)) =>
            {
                let ranges: Vec<String> = node
                    .service_cidrs
                    .iter()
                    .map(|n| format!("{}/{}", n.addr, n.prefix))
                    .collect();
                ctx.problem(
                    "spec.clusterIP",
                    format!("{ip} is outside the service range {}", ranges.join(", ")),
                    true,
                );
                return Err(());
            }
            Ok(a) if !a.is_unspecified() && !a.is_broadcast() && !a.is_multicast() => a,
            Ok(_) => {
                ctx.problem(
                    "spec.clusterIP",
                    format!("{ip} cannot be a Service address"),
                    true,
                );
                return Err(());
            }
            Err(_) if ip.contains(':') => {
                return Ok(Compiled::Skipped(format!(
                    "clusterIP {ip}: IPv6 is not supported by this dataplane"
                )));
            }
            Err(_) => {
                ctx.problem(
                    "spec.clusterIP",
                    format!("{ip:?} is not an IPv4 address"),
                    true,
                );
                return Err(());
            }
        },
    };
    let affinity = match spec.session_affinity.as_deref() {
        None | Some("None") => None,
        Some("ClientIP") => {
            let t = spec
                .session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds);
            match t {
                None => Some(DEFAULT_AFFINITY_TIMEOUT_S),
                Some(t) if t >= 1 && t as u32 <= MAX_AFFINITY_TIMEOUT_S => Some(t as u32),
                Some(t) => {
                    ctx.problem(
                        "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                        format!("{t} is outside 1..={MAX_AFFINITY_TIMEOUT_S}"),
                        true,
                    );
                    return Err(());
                }
            }
        }
        Some(other) => {
            ctx.problem(
                "spec.sessionAffinity",
                format!("unknown value {other:?}"),
                true,
            );
            return Err(());
        }
    };
    let node_ports = matches!(svc_type, "NodePort" | "LoadBalancer");
    let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
    let internal_local = spec.internal_traffic_policy.as_deref() == Some("Local");

    let mut external_addrs: Vec<(Ipv4Addr, FrontendKind)> = vec![];
    for (i, ip) in spec.external_ips.iter().flatten().enumerate() {
        let field = format!("spec.externalIPs[{i}]");
        match ip.parse::<Ipv4Addr>() {
            Ok(a) if node.external_ip_allow.iter().any(|n| n.contains(a)) => {
                external_addrs.push((a, FrontendKind::ExternalIp))
            }
            Ok(a) => ctx.problem(
                field,
                format!(
                    "{a} is not in an --external-ip-allow range; not programmed \
                     (externalIPs are refused by default, CVE-2020-8554)"
                ),
                false,
            ),
            Err(_) => ctx.problem(field, format!("{ip:?} is not an IPv4 address"), false),
        }
    }
    if svc_type == "LoadBalancer" {
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref());
        for (i, ing) in ingress.into_iter().flatten().enumerate() {
            if let Some(ip) = &ing.ip {
                match ip.parse::<Ipv4Addr>() {
                    Ok(a) => external_addrs.push((a, FrontendKind::LoadBalancer)),
                    Err(_) => ctx.problem(
                        format!("status.loadBalancer.ingress[{i}].ip"),
                        format!("{ip:?} is not an IPv4 address"),
                        false,
                    ),
                }
            }
        }
    }

    let mut source_ranges = vec![];
    for (i, r) in spec
        .load_balancer_source_ranges
        .iter()
        .flatten()
        .enumerate()
    {
        match r.trim().parse::<ipnet_lite::Ipv4Net>() {
            Ok(n) => source_ranges.push(n),
            Err(_) if r.contains(':') => {} // IPv6 ranges cannot match IPv4 clients.
            Err(e) => {
                // Dropping one range would open the Service wider than asked.
                ctx.problem(
                    format!("spec.loadBalancerSourceRanges[{i}]"),
                    format!("not a CIDR: {e}"),
                    true,
                );
                return Err(());
            }
        }
    }
    if source_ranges.is_empty()
        && spec
            .load_balancer_source_ranges
            .as_ref()
            .is_some_and(|r| !r.is_empty())
    {
        // Only IPv6 ranges: no IPv4 client may pass.
        source_ranges.push(ipnet_lite::Ipv4Net {
            addr: Ipv4Addr::BROADCAST,
            prefix: 32,
        });
    }
    let mut out = vec![];
    let mut local_ready: BTreeSet<Ipv4Addr> = BTreeSet::new();
    let mut seen_ports: BTreeSet<(u16, Protocol)> = BTreeSet::new();
    for (i, sp) in spec.ports.iter().flatten().enumerate() {
        let field = |f: &str| format!("spec.ports[{i}].{f}");
        let proto = match protocol_of(sp) {
            Ok(p) => p,
            Err(m) => {
                ctx.problem(field("protocol"), m, false);
                continue;
            }
        };
        let Some(port) = port_u16(sp.port) else {
            ctx.problem(
                field("port"),
                format!("{} is outside 1..=65535", sp.port),
                true,
            );
            return Err(());
        };
        match &sp.target_port {
            Some(IntOrString::Int(t)) if port_u16(*t).is_none() => {
                ctx.problem(
                    field("targetPort"),
                    format!("{t} is outside 1..=65535"),
                    true,
                );
                return Err(());
            }
            Some(IntOrString::String(name)) if !is_port_name(name) => {
                ctx.problem(
                    field("targetPort"),
                    format!(
                        "{name:?} is neither a number nor a port name \
                         (1-15 lowercase letters, digits and '-', with a letter)"
                    ),
                    true,
                );
                return Err(());
            }
            _ => {}
        }
        if !seen_ports.insert((port, proto)) {
            ctx.problem(field("port"), format!("{port}/{proto} appears twice"), true);
            return Err(());
        }
        let port_name = sp.name.clone().unwrap_or_default();
        // The EndpointSlice port carrying this Service port has its name and protocol.
        let mut eps: Vec<PortEndpoint<'_>> = vec![];
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
        let this_node = node.name.as_deref();
        local_ready.extend(eps.iter().filter_map(|(e, _, addr)| {
            let ready = e.conditions.as_ref().and_then(|c| c.ready) != Some(false);
            let local = this_node.is_some() && e.node_name.as_deref() == this_node;
            if ready && local { *addr } else { None }
        }));
        let all_backends = pick_endpoints(&eps, this_node, false, None);
        let local_backends = pick_endpoints(&eps, this_node, true, None);
        // Topology hints narrow the cluster-wide sets, not the node-local ones.
        let zoned_backends = match topology_zone(svc, &eps, node) {
            Some(zone) => pick_endpoints(&eps, this_node, false, Some(zone)),
            None => all_backends.clone(),
        };
        let cluster_backends = if internal_local {
            &local_backends
        } else {
            &zoned_backends
        };
        let external_backends = if external_local {
            &local_backends
        } else {
            &zoned_backends
        };
        let service = ctx.name.clone();
        let fe = |kind: FrontendKind, backends: &Vec<BackendAddr>| FrontendPlan {
            service: service.clone(),
            port_name: port_name.clone(),
            kind,
            backends: backends.clone(),
            affinity_timeout_s: affinity,
            reject_when_empty: all_backends.is_empty(),
            source_ranges: if kind == FrontendKind::LoadBalancer {
                source_ranges.clone()
            } else {
                vec![]
            },
        };
        out.push((
            FrontendKey {
                addr: cluster_ip,
                port,
                proto,
            },
            fe(FrontendKind::ClusterIp, cluster_backends),
        ));
        if node_ports {
            match sp.node_port {
                Some(np) => match port_u16(np) {
                    Some(np) => out.push((
                        FrontendKey {
                            addr: Ipv4Addr::UNSPECIFIED,
                            port: np,
                            proto,
                        },
                        fe(FrontendKind::NodePort, external_backends),
                    )),
                    None => {
                        ctx.problem(
                            field("nodePort"),
                            format!("{np} is outside 1..=65535"),
                            true,
                        );
                        return Err(());
                    }
                },
                None => ctx.problem(
                    field("nodePort"),
                    "missing: the manifest source does not allocate NodePorts, set one",
                    false,
                ),
            }
        }
        for (addr, kind) in &external_addrs {
            out.push((
                FrontendKey {
                    addr: *addr,
                    port,
                    proto,
                },
                fe(*kind, external_backends),
            ));
        }
    }
    let health = match spec.health_check_node_port {
        Some(p) if svc_type == "LoadBalancer" && external_local => match port_u16(p) {
            Some(port) => Some(HealthCheck {
                port,
                service: ctx.name.clone(),
                local_endpoints: local_ready.len(),
            }),
            None => {
                ctx.problem(
                    "spec.healthCheckNodePort",
                    format!("{p} is outside 1..=65535"),
                    false,
                );
                None
            }
        },
        _ => None,
    };
    Ok(Compiled::Frontends(out, health))
}

mod incremental;
pub use incremental::{Incremental, ServiceId};

#[cfg(test)]
mod tests;
