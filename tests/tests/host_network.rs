//! A Service whose only endpoint is an address of a node (a hostNetwork
//! pod, or the API server behind the `kubernetes` Service on a control-plane
//! node), reached from every place a cluster reaches it from: a pod on the
//! same node, the node itself, a pod on another node, and a NodePort from
//! outside through either node. The node's own stack answers these
//! requests, so the replies leave through egress without crossing an
//! ingress program: the egress program must turn them back.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    path::Path,
    time::Duration,
};

use integration_tests::{
    agent::{Agent, ManifestDir},
    cgroup::TestCgroup,
    host_client::HostClient,
    topology::Topology,
    traffic::{self, Reply, Server},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
const NODE_PORT: u16 = 30443;
/// Where the host-network server listens on node-1 (an API server's port).
const HOST_PORT: u16 = 6443;
const T: Duration = Duration::from_secs(3);
const CLIENT: &str = env!("CARGO_BIN_EXE_host_client");

struct Fixture {
    // Drop order: agents (their cleanup detaches everything), the server,
    // the namespaces, the files, the cgroup last.
    agents: Vec<Agent>,
    _server: Server,
    topo: Topology,
    _dir: ManifestDir,
    cgroup: TestCgroup,
}

/// The `kubernetes` Service as a cluster has it: no selector, its
/// EndpointSlice names node-1's own address (what the API server writes).
fn manifests(node_ip: Ipv4Addr) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata:
  name: kubernetes
spec:
  type: NodePort
  clusterIP: {VIP}
  ports:
  - {{name: https, protocol: TCP, port: 443, targetPort: {HOST_PORT}, nodePort: {NODE_PORT}}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kubernetes
  labels: {{kubernetes.io/service-name: kubernetes}}
addressType: IPv4
ports:
- {{name: https, protocol: TCP, port: {HOST_PORT}}}
endpoints:
- addresses: ["{node_ip}"]
  conditions: {{ready: true}}
  nodeName: node-1
"#
    )
}

fn fixture() -> Fixture {
    let cgroup = TestCgroup::new().unwrap();
    let mut topo = Topology::new().unwrap();
    topo.add_node().unwrap();
    topo.add_node().unwrap();
    topo.add_client().unwrap();
    topo.add_pod(0, "client-1").unwrap();
    topo.add_pod(1, "client-2").unwrap();
    let node_ip = topo.nodes[0].ip;
    let server = Server::start(&topo.nodes[0].ns, node_ip, HOST_PORT, "apiserver").unwrap();
    let dir = ManifestDir::new().unwrap();
    dir.write("kubernetes.yaml", &manifests(node_ip)).unwrap();
    let agents = vec![
        Agent::start(
            &topo.nodes[0].ns,
            &dir.path,
            &["--node-name", "node-1", "--cgroup", &cgroup.flag()],
        )
        .unwrap(),
        Agent::start(&topo.nodes[1].ns, &dir.path, &["--node-name", "node-2"]).unwrap(),
    ];
    Fixture {
        agents,
        _server: server,
        topo,
        _dir: dir,
        cgroup,
    }
}

fn ask(ns: &integration_tests::netns::Netns, to: SocketAddrV4) -> Reply {
    ns.within(move || traffic::tcp_ask(to, T))
        .unwrap()
        .unwrap_or_else(|e| panic!("{to}: {e}"))
}

fn reason(agent: &Agent, name: &str) -> u64 {
    let stats = agent.cli("stats", &["--output", "json"]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
    v["reasons"][name].as_u64().unwrap_or(0)
}

#[test]
fn a_host_network_endpoint_serves_pods_the_node_and_outside_clients() {
    let f = fixture();
    let vip = SocketAddrV4::new(VIP, 443);
    let node1 = f.topo.nodes[0].ip;
    let node2 = f.topo.nodes[1].ip;

    // A pod on the endpoint's node: its request is delivered to the node's
    // own socket, the reply comes back from the ClusterIP (else the pod's
    // TCP would reset it), and the server sees the pod's own address.
    let pod = f.topo.pod("client-1");
    for _ in 0..5 {
        let r = ask(&pod.ns, vip);
        assert_eq!(r.server, "apiserver");
        assert_eq!(r.seen_from.ip(), IpAddr::V4(pod.ip), "pod address kept");
    }
    assert!(
        reason(&f.agents[0], "local_reply_translated") >= 5,
        "the egress program turned the replies back"
    );

    // A pod on another node: its node translates, the request crosses the
    // segment, the reply returns to that node's ingress.
    let pod2 = f.topo.pod("client-2");
    let r = ask(&pod2.ns, vip);
    assert_eq!(r.server, "apiserver");
    assert_eq!(
        r.seen_from.ip(),
        IpAddr::V4(pod2.ip),
        "remote pod address kept"
    );

    // From outside, through the endpoint's node (client address kept, the
    // endpoint is local) and through the other node (source-NATed to it,
    // policy Cluster).
    let outside = &f.topo.clients[0];
    let r = ask(&outside.ns, SocketAddrV4::new(node1, NODE_PORT));
    assert_eq!(r.server, "apiserver");
    assert_eq!(r.seen_from.ip(), IpAddr::V4(outside.ip));
    let r = ask(&outside.ns, SocketAddrV4::new(node2, NODE_PORT));
    assert_eq!(r.server, "apiserver");
    assert_eq!(r.seen_from.ip(), IpAddr::V4(node2), "SNAT to node-2");

    // The node itself, through the socket hooks: connect() goes straight to
    // its own address, and getpeername() still says the ClusterIP.
    let mut host = HostClient::start(Path::new(CLIENT), &f.topo.nodes[0].ns, &f.cgroup).unwrap();
    let a = host.ask(&format!("tcp {vip}")).unwrap();
    let w: Vec<&str> = a.split_whitespace().collect();
    assert_eq!(w.first(), Some(&"ok"), "{a}");
    assert_eq!(w[1], "apiserver", "{a}");
    assert_eq!(w[3], vip.to_string(), "getpeername is the Service: {a}");
}
