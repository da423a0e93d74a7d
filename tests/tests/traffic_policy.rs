//! `externalTrafficPolicy: Local` applies to traffic from outside the
//! cluster only: pods reaching a NodePort, LoadBalancer IP or externalIP of
//! such a Service get the cluster-wide endpoints (kube-proxy's
//! short-circuit), while outside clients keep the node-local ones.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use integration_tests::{
    fixture::{Cluster, T, TwoNodes},
    manifests,
    traffic::{self, Reply},
};

const LB_IP: &str = "198.51.100.20";
const EXTERNAL_IP: &str = "203.0.113.10";

/// Two nodes whose only ready endpoint of the Local LoadBalancer Service
/// `web` (nodePort 30080, an externalIP and an ingress IP) is web-2 on
/// node-2; agents told the cluster's pod range.
fn cluster(xdp: &'static str) -> Cluster {
    let nodes = TwoNodes::new(xdp).unwrap();
    nodes.write_pods(|name| name == "web-2").unwrap();
    let svc = manifests::service(
        "web",
        "web",
        "10.96.0.10",
        &[("http", "TCP", 80, "http")],
        &format!(
            "  type: LoadBalancer\n  externalTrafficPolicy: Local\n  externalIPs: [{EXTERNAL_IP}]\n"
        ),
    )
    .replace(
        "targetPort: \"http\"}",
        "targetPort: \"http\", nodePort: 30080}",
    );
    let status = format!("status:\n  loadBalancer:\n    ingress: [{{ip: {LB_IP}}}]\n");
    nodes
        .dir
        .write("svc.yaml", &format!("{svc}{status}"))
        .unwrap();
    let t = nodes
        .start(&[
            "--external-ip-allow",
            "203.0.113.0/24",
            "--cluster-cidr",
            "10.244.0.0/16",
        ])
        .unwrap();
    // The outside world routes the Service's own addresses to node-1 (what
    // an L2 or BGP announcer would arrange).
    for ip in [LB_IP, EXTERNAL_IP] {
        let via = t.topo.nodes[0].ip.to_string();
        t.topo.clients[0]
            .ns
            .ip(&["route", "add", ip, "via", &via])
            .unwrap();
    }
    t
}

fn at(ip: impl Into<Ipv4Addr>, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(ip.into(), port)
}

fn from_pod(t: &Cluster, pod: &str, to: SocketAddrV4) -> std::io::Result<Reply> {
    t.topo
        .pod(pod)
        .ns
        .within(move || traffic::tcp_ask(to, T))
        .unwrap()
}

fn from_outside(t: &Cluster, to: SocketAddrV4) -> std::io::Result<Reply> {
    let quick = Duration::from_millis(700);
    t.topo.clients[0]
        .ns
        .within(move || traffic::tcp_ask(to, quick))
        .unwrap()
}

fn counter(t: &Cluster, node: usize, reason: &str) -> u64 {
    let stats = t.agents[node].cli("stats", &["-o", "json"]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
    v["reasons"][reason].as_u64().unwrap()
}

fn pods_inside_the_cluster_reach_a_local_service_without_a_local_endpoint(xdp: &'static str) {
    let t = cluster(xdp);
    let node1 = t.topo.nodes[0].ip;
    let list = t.agents[0].list().unwrap();
    assert!(list.contains("*:30080/TCP -> (no endpoints"), "{list}");
    assert!(
        list.contains(&format!(
            "*:30080/TCP (in-cluster) -> {}:8080",
            t.topo.pod("web-2").ip
        )),
        "{list}"
    );
    // From outside: dropped on node-1, as policy Local asks, on every address.
    let dropped = counter(&t, 0, "no_local_endpoint");
    for to in [
        at(node1, 30080),
        at(LB_IP.parse::<Ipv4Addr>().unwrap(), 80),
        at(EXTERNAL_IP.parse::<Ipv4Addr>().unwrap(), 80),
    ] {
        let e = from_outside(&t, to).unwrap_err();
        assert_eq!(
            e.kind(),
            std::io::ErrorKind::TimedOut,
            "{to}: dropped, not rejected"
        );
    }
    assert!(counter(&t, 0, "no_local_endpoint") >= dropped + 3);
    // From pod c1 on node-1 to node-1's NodePort, the LB IP and the
    // externalIP: answered by web-2 on node-2, the pod's address kept (no
    // masquerade, as kube-proxy's short-circuit).
    let c1 = IpAddr::V4(t.topo.pod("c1").ip);
    for to in [
        at(node1, 30080),
        at(LB_IP.parse::<Ipv4Addr>().unwrap(), 80),
        at(EXTERNAL_IP.parse::<Ipv4Addr>().unwrap(), 80),
    ] {
        for _ in 0..5 {
            let r = from_pod(&t, "c1", to).unwrap_or_else(|e| panic!("c1 -> {to}: {e}"));
            assert_eq!(
                (r.server.as_str(), r.seen_from.ip()),
                ("web-2", c1),
                "c1 -> {to}"
            );
        }
    }
    // From c1 to node-2's NodePort: on node-2 the endpoint is local anyway.
    let r = from_pod(&t, "c1", at(t.topo.nodes[1].ip, 30080)).unwrap();
    assert_eq!(r.server, "web-2");
    // From pod c2 on node-2 to node-1's NodePort: it arrives on node-1's
    // external interface from the cluster's pod range, so it is inside too;
    // the backend is on another node, so node-1 source-NATs it (its reply
    // would otherwise go straight back to c2, past node-1).
    for _ in 0..5 {
        let r = from_pod(&t, "c2", at(node1, 30080)).unwrap();
        assert_eq!(
            (r.server.as_str(), r.seen_from.ip()),
            ("web-2", IpAddr::V4(node1))
        );
    }
    // Once web-2 is gone the Service has no endpoint: refused for everyone.
    t.write_pods(|_| false).unwrap();
    t.agents[0]
        .wait_list("no endpoints", |l| !l.contains("(in-cluster)"))
        .unwrap();
    let e = from_pod(&t, "c1", at(node1, 30080)).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused);
}

integration_tests::tests_in_modes!([tc_only = "off", xdp_native = "native"] {
    pods_inside_the_cluster_reach_a_local_service_without_a_local_endpoint,
});
