//! Which endpoints of a Service port receive traffic, decided in one place
//! in the shape of kube-proxy's `CategorizeEndpoints`: the cluster-wide set
//! (narrowed by topology hints when they apply), the node-local set, and
//! the traffic policies choosing between them for traffic from inside the
//! cluster and from outside.
use std::{collections::BTreeSet, net::IpAddr};

use k8s_openapi::api::{core::v1::Service, discovery::v1::Endpoint};

use super::{
    slices::PortEndpoint,
    types::{BackendAddr, Backends, NodeContext},
};
use crate::model::TOPOLOGY_MODE_ANNOTATIONS;

/// How a Service asks its endpoints to be chosen.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct TrafficPolicy {
    /// `internalTrafficPolicy: Local`: traffic to the ClusterIP stays on
    /// this node.
    pub internal_local: bool,
    /// `externalTrafficPolicy: Local`: NodePort, externalIP and
    /// LoadBalancer traffic stays on this node (and keeps its source).
    pub external_local: bool,
    /// How `trafficDistribution` (or the topology-mode annotation set to
    /// Auto) asks cluster-wide endpoints to be narrowed.
    pub distribution: Distribution,
}

/// The topology preferences of `spec.trafficDistribution`, with their
/// upstream meaning (KEP-4444, KEP-3015): the EndpointSlice controller
/// writes hints, kube-proxy follows them when every ready endpoint has some.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum Distribution {
    /// Every endpoint, wherever it is.
    #[default]
    Anywhere,
    /// `PreferClose` (its older name), `PreferSameZone`, or the annotation
    /// `Auto`: the endpoints hinted for this node's zone.
    SameZone,
    /// `PreferSameNode`: the endpoints hinted for this node, else (no ready
    /// one hinted for it) as SameZone.
    SameNode,
}

impl Distribution {
    /// The preference `spec.trafficDistribution` names; Err: a value this
    /// dataplane does not know (newer than it), which narrows nothing.
    pub fn of(value: &str) -> Result<Self, String> {
        match value {
            "PreferClose" | "PreferSameZone" => Ok(Self::SameZone),
            "PreferSameNode" => Ok(Self::SameNode),
            other => Err(other.to_string()),
        }
    }
}

impl TrafficPolicy {
    /// The Service's policies; Err carries an unknown `trafficDistribution`
    /// value, with the rest of the policy as if it were unset.
    pub fn of(svc: &Service) -> (Self, Option<String>) {
        let spec = svc.spec.as_ref();
        let asks_topology = svc.metadata.annotations.as_ref().is_some_and(|a| {
            TOPOLOGY_MODE_ANNOTATIONS
                .iter()
                .any(|k| a.get(*k).is_some_and(|v| v.eq_ignore_ascii_case("auto")))
        });
        let (mut distribution, mut unknown) = (Distribution::Anywhere, None);
        match spec
            .and_then(|s| s.traffic_distribution.as_deref())
            .map(Distribution::of)
        {
            Some(Ok(d)) => distribution = d,
            Some(Err(v)) => unknown = Some(v),
            None => {}
        }
        if distribution == Distribution::Anywhere && asks_topology {
            distribution = Distribution::SameZone;
        }
        let policy = Self {
            internal_local: spec.and_then(|s| s.internal_traffic_policy.as_deref())
                == Some("Local"),
            external_local: spec.and_then(|s| s.external_traffic_policy.as_deref())
                == Some("Local"),
            distribution,
        };
        (policy, unknown)
    }
}

/// The backends of one Service port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Chosen {
    /// For traffic from inside the cluster (the ClusterIP).
    pub internal: Backends,
    /// For traffic from outside (NodePorts, externalIPs, LoadBalancer IPs).
    pub external: Backends,
    /// Cluster-wide (topology-narrowed), whatever the policies say: what
    /// sources inside the cluster get on external addresses of a Service
    /// with `externalTrafficPolicy: Local` (kube-proxy's short-circuit to
    /// its cluster policy chain).
    pub cluster: Backends,
    /// Some endpoint anywhere can serve: without one the frontends reject;
    /// with one but none chosen (policy Local), they drop.
    pub has_any: bool,
}

/// Chooses the endpoints of one Service port, as kube-proxy does:
/// - ready endpoints; when none is ready, those serving while terminating
///   (KEP-1669), so that a rollout's last pods keep answering;
/// - cluster-wide, narrowed to this node's zone when topology-aware routing
///   applies (see [`topology_zone`]); node-local ones are never narrowed;
/// - each traffic policy picks the node-local or the cluster-wide set.
pub(super) fn categorize_endpoints(
    eps: &[PortEndpoint<'_>],
    policy: TrafficPolicy,
    node: &NodeContext,
) -> Chosen {
    let this_node = node.name.as_deref();
    let is_local = |e: &Endpoint| this_node.is_some() && e.node_name.as_deref() == this_node;
    let all = ready_else_terminating(eps, |_| true, &is_local);
    let local = ready_else_terminating(eps, is_local, &is_local);
    let same_node = policy.distribution == Distribution::SameNode
        && this_node.is_some_and(|n| all_hinted_and_one_for(eps, |e| Box::new(hinted_nodes(e)), n));
    let zone = if policy.distribution == Distribution::Anywhere {
        None
    } else {
        topology_zone(eps, node)
    };
    let cluster = match (same_node, zone, this_node) {
        (true, _, Some(n)) => {
            ready_else_terminating(eps, |e| hinted_nodes(e).any(|h| h == n), &is_local)
        }
        (_, Some(zone), _) => {
            ready_else_terminating(eps, |e| hinted_zones(e).any(|h| h == zone), &is_local)
        }
        _ => all.clone(),
    };
    // One shared list for every frontend of the port that gets it.
    let (local, cluster): (Backends, Backends) = (local.into(), cluster.into());
    let pick = |local_only: bool| {
        if local_only {
            local.clone()
        } else {
            cluster.clone()
        }
    };
    Chosen {
        internal: pick(policy.internal_local),
        external: pick(policy.external_local),
        has_any: !all.is_empty(),
        cluster,
    }
}

fn is_ready(e: &Endpoint) -> bool {
    // Unset counts as ready, as the API documents.
    e.conditions.as_ref().and_then(|c| c.ready) != Some(false)
}

fn is_serving_terminating(e: &Endpoint) -> bool {
    let c = e.conditions.clone().unwrap_or_default();
    c.serving != Some(false) && c.terminating == Some(true)
}

/// The ready endpoints `keep` accepts, else its serving-and-terminating
/// ones; sorted, without duplicates, IPv4 only.
fn ready_else_terminating(
    eps: &[PortEndpoint<'_>],
    keep: impl Fn(&Endpoint) -> bool,
    is_local: &impl Fn(&Endpoint) -> bool,
) -> Vec<BackendAddr> {
    let backends = |state: fn(&Endpoint) -> bool| -> BTreeSet<BackendAddr> {
        eps.iter()
            .filter(|(e, _, _)| keep(e) && state(e))
            .filter_map(|(e, port, addr)| {
                Some(BackendAddr {
                    addr: (*addr)?,
                    port: *port,
                    local: is_local(e),
                })
            })
            .collect()
    };
    let ready = backends(is_ready);
    if ready.is_empty() {
        backends(is_serving_terminating).into_iter().collect()
    } else {
        ready.into_iter().collect()
    }
}

fn hinted_zones(e: &Endpoint) -> impl Iterator<Item = &str> {
    e.hints
        .iter()
        .flat_map(|h| h.for_zones.iter().flatten())
        .map(|z| z.name.as_str())
}

fn hinted_nodes(e: &Endpoint) -> impl Iterator<Item = &str> {
    e.hints
        .iter()
        .flat_map(|h| h.for_nodes.iter().flatten())
        .map(|n| n.name.as_str())
}

/// Whether every ready endpoint carries hints of the kind `hints` reads and
/// at least one names `place`: kube-proxy's rule for following hints at all.
fn all_hinted_and_one_for<'e>(
    eps: &'e [PortEndpoint<'_>],
    hints: impl Fn(&'e Endpoint) -> Box<dyn Iterator<Item = &'e str> + 'e>,
    place: &str,
) -> bool {
    let mut any_for_place = false;
    for (e, _, _) in eps.iter().filter(|(e, _, _)| is_ready(e)) {
        let mut named = hints(e).peekable();
        if named.peek().is_none() {
            return false;
        }
        any_for_place |= named.any(|h| h == place);
    }
    any_for_place
}

/// The zone to narrow cluster-wide endpoints to, when topology-aware routing
/// applies as kube-proxy decides it: the node has a zone, every ready
/// endpoint carries zone hints, and at least one is hinted for this zone.
/// Otherwise every endpoint is used.
fn topology_zone<'a>(eps: &[PortEndpoint<'_>], node: &'a NodeContext) -> Option<&'a str> {
    let zone = node.zone.as_deref().filter(|z| !z.is_empty())?;
    all_hinted_and_one_for(eps, |e| Box::new(hinted_zones(e)), zone).then_some(zone)
}

/// The addresses of this node's ready endpoints, for a health check node
/// port. Terminating ones do not count: a load balancer should stop sending
/// new traffic here (KEP-1669).
pub(super) fn local_ready(
    eps: &[PortEndpoint<'_>],
    node: &NodeContext,
) -> impl Iterator<Item = IpAddr> {
    let this_node = node.name.clone();
    eps.iter().filter_map(move |(e, _, addr)| {
        let local = this_node.is_some() && e.node_name == this_node;
        if is_ready(e) && local { *addr } else { None }
    })
}
