//! NodePort, LoadBalancer and externalIP traffic from outside the cluster on
//! a two-node topology, with both traffic policies.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use integration_tests::{
    agent::{Agent, ManifestDir},
    manifests,
    topology::Topology,
    traffic::{self, Server},
};

const T: Duration = Duration::from_secs(3);

struct TwoNodes {
    agents: Vec<Agent>,
    _servers: Vec<Server>,
    topo: Topology,
    dir: ManifestDir,
}

/// Two nodes and an outside client; `web-1` on node-1 and `web-2` on node-2,
/// serving on 8080; a NodePort Service `web` (80 -> http, nodePort 30080)
/// with `extra_spec` added.
fn two_nodes(extra_spec: &str) -> TwoNodes {
    let mut topo = Topology::new().unwrap();
    topo.add_node().unwrap();
    topo.add_node().unwrap();
    topo.add_client().unwrap();
    let mut servers = vec![];
    let mut pods = String::new();
    for (name, node) in [("web-1", 0), ("web-2", 1)] {
        let k = topo.add_pod(node, name).unwrap();
        let p = &topo.pods[k];
        servers.push(Server::start(&p.ns, p.ip, 8080, name).unwrap());
        pods.push_str(&manifests::pod(
            name,
            "web",
            p.ip,
            true,
            &format!("node-{}", node + 1),
        ));
        pods.push_str("---\n");
    }
    let dir = ManifestDir::new().unwrap();
    dir.write("pods.yaml", &pods).unwrap();
    let svc = manifests::service(
        "web",
        "web",
        "10.96.0.10",
        &[("http", "TCP", 80, "http"), ("dns", "UDP", 53, "8080")],
        &format!("  type: NodePort\n{extra_spec}"),
    )
    .replace(
        "targetPort: \"http\"}",
        "targetPort: \"http\", nodePort: 30080}",
    )
    .replace("targetPort: 8080}", "targetPort: 8080, nodePort: 30053}");
    dir.write("svc.yaml", &svc).unwrap();
    let agents = (0..2)
        .map(|i| {
            Agent::start(
                &topo.nodes[i].ns,
                &dir.path,
                &["--node-name", &format!("node-{}", i + 1)],
            )
            .unwrap()
        })
        .collect();
    TwoNodes {
        agents,
        _servers: servers,
        topo,
        dir,
    }
}

fn ask_many(t: &TwoNodes, to: SocketAddrV4, n: usize) -> BTreeMap<String, Vec<IpAddr>> {
    t.topo.clients[0]
        .ns
        .within(move || {
            let mut m: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
            for _ in 0..n {
                let r = traffic::tcp_ask(to, T).unwrap_or_else(|e| panic!("{to}: {e}"));
                m.entry(r.server).or_default().push(r.seen_from.ip());
            }
            m
        })
        .unwrap()
}

#[test]
fn node_port_with_cluster_policy_reaches_pods_on_both_nodes_from_either_node() {
    let t = two_nodes("");
    let client_ip = IpAddr::V4(t.topo.clients[0].ip);
    for node in 0..2 {
        let node_ip = t.topo.nodes[node].ip;
        let seen = ask_many(&t, SocketAddrV4::new(node_ip, 30080), 40);
        assert_eq!(seen.len(), 2, "via node-{}: {seen:?}", node + 1);
        for (server, sources) in &seen {
            let local = (server == "web-1") == (node == 0);
            for s in sources {
                if local {
                    assert_eq!(*s, client_ip, "a local backend sees the client's address");
                } else {
                    assert_eq!(
                        *s,
                        IpAddr::V4(node_ip),
                        "a remote backend sees the node's address (SNAT)"
                    );
                }
            }
        }
    }
}
