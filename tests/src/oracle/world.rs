//! The world the model and the programs share: frontends with the
//! Kubernetes semantics they stand for (endpoints on this node or others,
//! affinity, source ranges, traffic policy), this node's addresses, where
//! the sources sit, and the next hops XDP finds.

/// An endpoint of a Service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend {
    pub addr: [u8; 4],
    pub port: u16,
    /// On this node.
    pub local: bool,
}

/// A frontend of the world.
#[derive(Clone, Debug)]
pub struct Frontend {
    /// `[0; 4]`: a NodePort, on every address of the node.
    pub addr: [u8; 4],
    pub port: u16,
    pub proto: u8,
    /// Every ready endpoint of the Service port, on any node.
    pub endpoints: Vec<Backend>,
    /// externalTrafficPolicy Local: sources it applies to reach only the
    /// endpoints on this node, unmasqueraded, and are dropped without one.
    pub policy_local: bool,
    /// sessionAffinity ClientIP (with a timeout no run reaches).
    pub affinity: bool,
    /// loadBalancerSourceRanges: (network, prefix length); empty: anyone.
    pub source_ranges: Vec<([u8; 4], u8)>,
}

/// Where the packets a program sees come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceClass {
    /// Clients outside the cluster (external interfaces).
    External,
    /// Pods and nodes of the cluster.
    InCluster,
}

/// What XDP's FIB lookup gives for a destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hop {
    /// A resolved neighbour behind an interface XDP may transmit on.
    Xdp {
        dmac: [u8; 6],
        smac: [u8; 6],
        /// The interface the frames arrive on (XDP_TX-like) or another.
        same_iface: bool,
    },
    /// Anything else (unresolved neighbour, no XDP on the egress): tc's.
    Tc,
}

pub struct World {
    pub frontends: Vec<Frontend>,
    pub node_addrs: Vec<[u8; 4]>,
    pub snat_addr: Option<[u8; 4]>,
    /// The interfaces the program sits on: External (traffic from outside
    /// the node, source-NATed to backends on other nodes) or InCluster
    /// (pod interfaces).
    pub source: SourceClass,
    /// Sources on external interfaces that are inside the cluster anyway
    /// (`--cluster-cidr`): (network, prefix length).
    pub cluster_cidrs: Vec<([u8; 4], u8)>,
    /// Whether policy Local narrows in-cluster sources to local endpoints
    /// too (it applies to traffic from outside only, as kube-proxy's
    /// short-circuit has it: false).
    pub local_policy_in_cluster: bool,
    /// XDP's next hops: (network, prefix length, hop), longest match wins;
    /// no match is `Hop::Tc`.
    pub routes: Vec<([u8; 4], u8, Hop)>,
}

pub(super) fn in_net(a: [u8; 4], (net, len): ([u8; 4], u8)) -> bool {
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    u32::from_be_bytes(a) & mask == u32::from_be_bytes(net) & mask
}

impl Frontend {
    pub fn is_node_port(&self) -> bool {
        self.addr == [0; 4]
    }

    /// The endpoints a new flow from `source` may be sent to, and whether
    /// having none is answered with a reject (no endpoint at all) rather
    /// than dropped (policy Local without a local endpoint).
    pub fn serving(&self, source: SourceClass, w: &World) -> (Vec<usize>, bool) {
        let narrowed =
            self.policy_local && (source == SourceClass::External || w.local_policy_in_cluster);
        let eligible = (0..self.endpoints.len())
            .filter(|&i| !narrowed || self.endpoints[i].local)
            .collect();
        (eligible, self.endpoints.is_empty())
    }

    /// Whether sources of `class` use the frontend's entry set for sources
    /// inside the cluster (its own backends, and its own affinity).
    pub fn in_cluster_set(&self, class: SourceClass, w: &World) -> bool {
        self.policy_local
            && class == SourceClass::InCluster
            && !w.local_policy_in_cluster
            && !self.endpoints.is_empty()
    }

    pub fn source_allowed(&self, client: [u8; 4]) -> bool {
        self.source_ranges.is_empty() || self.source_ranges.iter().any(|r| in_net(client, *r))
    }
}

impl World {
    /// Whether a packet from `saddr` seen by the world's program comes from
    /// outside the cluster or inside, for traffic policies.
    pub fn class_of(&self, saddr: [u8; 4]) -> SourceClass {
        match self.source {
            SourceClass::External if !self.cluster_cidrs.iter().any(|c| in_net(saddr, *c)) => {
                SourceClass::External
            }
            _ => SourceClass::InCluster,
        }
    }

    pub fn is_node_addr(&self, a: [u8; 4]) -> bool {
        self.node_addrs.contains(&a)
    }

    /// The frontend a packet to `daddr:dport/proto` reaches: one on the
    /// address itself first, then a NodePort when the address is the node's.
    pub fn frontend(&self, daddr: [u8; 4], dport: u16, proto: u8) -> Option<usize> {
        let at = |a: [u8; 4]| {
            self.frontends
                .iter()
                .position(|f| f.addr == a && f.port == dport && f.proto == proto)
        };
        at(daddr).or_else(|| {
            if self.is_node_addr(daddr) {
                at([0; 4])
            } else {
                None
            }
        })
    }

    pub fn hop(&self, daddr: [u8; 4]) -> Hop {
        self.routes
            .iter()
            .filter(|(net, len, _)| in_net(daddr, (*net, *len)))
            .max_by_key(|(_, len, _)| *len)
            .map_or(Hop::Tc, |r| r.2)
    }
}
