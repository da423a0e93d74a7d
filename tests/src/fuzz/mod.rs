//! The packet fuzzer's world: ClusterIPs, NodePorts and a LoadBalancer IP
//! with several backends on this node and on others, session affinity,
//! source ranges and policy Local; the node network XDP's FIB lookups see;
//! the plan the agent would write for it; and packets generated around it.
pub mod generate;

use std::net::Ipv4Addr;

use service_agent::plan::{FrontendKey, FrontendKind, Plan, Protocol, ipnet_lite::IpNet};

use crate::{
    bpf::{self, FibNamespace},
    oracle::{Backend, Frontend, Hop, SourceClass, World},
};

pub const NODE: &str = "192.168.50.1";
/// A second address of the node, on an interface of its own.
pub const NODE2: &str = "192.168.52.1";
pub const VIP: &str = "10.96.0.10";
pub const EMPTY: &str = "10.96.0.20";
pub const LB: &str = "172.18.0.50";
/// Backends on this node.
pub const LOCAL_A: &str = "10.244.0.11";
pub const LOCAL_B: &str = "10.244.0.12";
/// Backends on other nodes: behind a peer on the interface frames come in
/// on, and behind one on the node's other XDP interface.
pub const REMOTE_1: &str = "10.244.2.11";
pub const REMOTE_2: &str = "10.244.3.12";
/// Clients on the node's external interfaces: two on its network (inside
/// the LoadBalancer's source range), one far away behind a router not
/// resolved yet, and one inside the cluster.
pub const EXTERNAL_CLIENTS: [&str; 4] = [
    "192.168.50.100",
    "192.168.50.101",
    "203.0.113.7",
    // A pod of another node (inside `--cluster-cidr`): policy Local does
    // not narrow what it reaches.
    "10.244.5.9",
];
/// Pods; the last is a backend too (a pod reaching itself through a Service).
pub const POD_CLIENTS: [&str; 3] = ["10.244.0.20", "10.244.0.21", LOCAL_A];

pub const CLIENT_MACS: [[u8; 6]; 2] = [[2, 0, 0, 0, 1, 0], [2, 0, 0, 0, 1, 1]];
pub const PEER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x20];
pub const PEER2_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0x22];

/// NodePorts and their meaning.
pub const NP_TCP: u16 = 30080;
pub const NP_UDP: u16 = 30053;
pub const NP_AFFINITY: u16 = 30090;
pub const NP_LOCAL: u16 = 30100;
/// Policy Local, endpoints only on other nodes.
pub const NP_LOCAL_NONE: u16 = 30101;
/// A NodePort whose endpoint is the node itself (host network): its replies
/// leave through tc egress.
pub const NP_HOST: u16 = 30443;

pub fn a(s: &str) -> [u8; 4] {
    s.parse::<Ipv4Addr>().unwrap().octets()
}

fn be(addr: &str, port: u16, local: bool) -> Backend {
    Backend {
        addr: a(addr),
        port,
        local,
    }
}

fn fe(addr: [u8; 4], port: u16, proto: u8, endpoints: Vec<Backend>) -> Frontend {
    Frontend {
        addr,
        port,
        proto,
        endpoints,
        policy_local: false,
        affinity: false,
        source_ranges: vec![],
    }
}

/// The frontends: each port of the world with its Service's semantics.
pub fn frontends() -> Vec<Frontend> {
    let web = |p| {
        vec![
            be(LOCAL_A, p, true),
            be(LOCAL_B, p, true),
            be(REMOTE_1, p, false),
            be(REMOTE_2, p, false),
        ]
    };
    let dns = vec![be(LOCAL_A, 5353, true), be(REMOTE_1, 5353, false)];
    let np = [0; 4];
    // Two of the pod clients are inside, the third (a backend) is not.
    let ranges = vec![(a("192.168.50.0"), 24), (a("10.244.0.16"), 28)];
    vec![
        fe(a(VIP), 80, 6, web(8080)),
        fe(a(VIP), 53, 17, dns.clone()),
        fe(a(EMPTY), 80, 6, vec![]),
        fe(a(EMPTY), 53, 17, vec![]),
        // Shares its backends with the ClusterIP: one client port reaching
        // both makes clashing reply tuples.
        fe(np, NP_TCP, 6, web(8080)),
        fe(np, NP_UDP, 17, dns.clone()),
        Frontend {
            affinity: true,
            ..fe(np, NP_AFFINITY, 6, web(9090))
        },
        Frontend {
            source_ranges: ranges.clone(),
            ..fe(a(LB), 80, 6, web(8080))
        },
        Frontend {
            source_ranges: ranges,
            affinity: true,
            ..fe(a(LB), 53, 17, dns.clone())
        },
        Frontend {
            policy_local: true,
            ..fe(
                np,
                NP_LOCAL,
                6,
                vec![be(LOCAL_B, 8080, true), be(REMOTE_1, 8080, false)],
            )
        },
        Frontend {
            policy_local: true,
            ..fe(np, NP_LOCAL_NONE, 6, vec![be(REMOTE_1, 8080, false)])
        },
        Frontend {
            policy_local: true,
            ..fe(np, NP_LOCAL_NONE, 17, vec![be(REMOTE_1, 5353, false)])
        },
        fe(np, NP_HOST, 6, vec![be(NODE, 8443, true)]),
    ]
}

/// The world a program sees: sources of `source`'s class, this node's
/// addresses, and XDP's next hops (`ext0`/`ext2` MACs: the interfaces').
pub fn world(source: SourceClass, ext0: [u8; 6], ext2: [u8; 6]) -> World {
    let hop = |dmac, smac, same_iface| Hop::Xdp {
        dmac,
        smac,
        same_iface,
    };
    World {
        frontends: frontends(),
        node_addrs: vec![a(NODE), a(NODE2)],
        snat_addr: Some(a(NODE)),
        source,
        cluster_cidrs: vec![(a("10.244.0.0"), 16)],
        local_policy_in_cluster: false,
        routes: vec![
            (a("10.244.2.0"), 24, hop(PEER_MAC, ext0, true)),
            (a("10.244.3.0"), 24, hop(PEER2_MAC, ext2, false)),
            (a(EXTERNAL_CLIENTS[0]), 32, hop(CLIENT_MACS[0], ext0, true)),
            (a(EXTERNAL_CLIENTS[1]), 32, hop(CLIENT_MACS[1], ext0, true)),
        ],
    }
}

/// The plan the agent writes for the world: the planner compiles policy
/// Local into the slots (only local endpoints, dropped without one).
pub fn plan(w: &World) -> Plan {
    let mut plan = Plan::default();
    for (i, f) in w.frontends.iter().enumerate() {
        let (eligible, reject) = f.serving(SourceClass::External, w);
        let backends = eligible
            .iter()
            .map(|&b| {
                let b = f.endpoints[b];
                bpf::backend(b.addr, b.port, b.local)
            })
            .collect();
        let kind = if f.is_node_port() {
            FrontendKind::NodePort
        } else if f.source_ranges.is_empty() {
            FrontendKind::ClusterIp
        } else {
            FrontendKind::LoadBalancer
        };
        let mut p = bpf::frontend(&format!("fuzz/world-{i}"), kind, backends);
        p.reject_when_empty = reject;
        // Sources inside the cluster get every endpoint: the planner's
        // short-circuit for policy Local on external frontends with any.
        if f.policy_local && !f.endpoints.is_empty() {
            p.in_cluster = Some(
                f.endpoints
                    .iter()
                    .map(|b| bpf::backend(b.addr, b.port, b.local))
                    .collect(),
            );
        }
        p.affinity_timeout_s = f.affinity.then_some(3600);
        p.source_ranges = f
            .source_ranges
            .iter()
            .map(|(n, l)| {
                format!("{}/{l}", Ipv4Addr::from(*n))
                    .parse::<IpNet>()
                    .unwrap()
            })
            .collect();
        let key = FrontendKey {
            addr: f.addr.into(),
            port: f.port,
            proto: if f.proto == 6 {
                Protocol::Tcp
            } else {
                Protocol::Udp
            },
        };
        plan.frontends.insert(key, p);
    }
    plan
}

/// The node's network: ext0 (XDP; the clients and the peer node of
/// 10.244.2.0/24), ext2 (XDP; the peer of 10.244.3.0/24), ext1 without XDP
/// towards the pods, and a default route via a router never resolved.
pub fn network() -> anyhow::Result<FibNamespace> {
    let fib = FibNamespace::new("fuzzw")?;
    fib.link("ext0", "wire0", &format!("{NODE}/24"))?
        .link("ext1", "wire1", "192.168.51.1/24")?
        .link("ext2", "wire2", &format!("{NODE2}/24"))?
        .neighbour("192.168.50.20", PEER_MAC, "ext0")?
        .neighbour(EXTERNAL_CLIENTS[0], CLIENT_MACS[0], "ext0")?
        .neighbour(EXTERNAL_CLIENTS[1], CLIENT_MACS[1], "ext0")?
        .neighbour("192.168.52.20", PEER2_MAC, "ext2")?
        .route("10.244.2.0/24", &["via", "192.168.50.20"])?
        .route("10.244.3.0/24", &["via", "192.168.52.20"])?
        .route("10.244.0.0/24", &["dev", "wire1"])?
        .route("default", &["via", "192.168.50.254"])?;
    Ok(fib)
}
