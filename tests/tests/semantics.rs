//! Service semantics on two nodes, checked by what the backends see and what
//! the clients get: traffic policies, endpoint conditions, multi-port
//! Services, topology hints, and the Services the dataplane leaves alone.
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4},
};

use integration_tests::{
    fixture::{Cluster, T, TwoNodes},
    traffic::{self, HeldConnection},
};

/// TwoNodes (backends web-1 on node-1 and web-2 on node-2 on 8080 and 9090,
/// client pods c1 and c2) with their agents; `xdp` is the agents' --xdp
/// mode (pod traffic between nodes crosses it).
fn cluster(xdp: &'static str) -> Cluster {
    TwoNodes::new(xdp).unwrap().start(&[]).unwrap()
}

/// An endpoint line for an EndpointSlice: `(pod, conditions, extra)`.
fn endpoint(c: &Cluster, pod: &str, conditions: &str, extra: &str) -> String {
    let p = c.topo.pod(pod);
    format!(
        "- {{addresses: [{}], nodeName: node-{}, conditions: {{{conditions}}}{extra}}}\n",
        p.ip,
        p.node + 1
    )
}

fn slice(name: &str, ports: &str, endpoints: &str) -> String {
    format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}-x, labels: {{kubernetes.io/service-name: {name}}}}}\naddressType: IPv4\nports: {ports}\nendpoints:\n{endpoints}---\n"
    )
}

fn service(name: &str, ip: &str, spec: &str, ports: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  clusterIP: {ip}\n{spec}  ports: {ports}\n---\n"
    )
}

fn wait(c: &Cluster, what: &str, pred: impl Fn(&str) -> bool) {
    c.wait_all(what, pred).unwrap();
}

fn servers_seen(c: &Cluster, from: &str, to: SocketAddrV4, n: usize) -> BTreeSet<String> {
    let client_ip = c.topo.pod(from).ip;
    c.topo
        .pod(from)
        .ns
        .within(move || {
            (0..n)
                .map(|_| {
                    let r = traffic::tcp_ask(to, T).unwrap_or_else(|e| panic!("{to}: {e}"));
                    assert_eq!(r.seen_from.ip(), client_ip);
                    r.server
                })
                .collect()
        })
        .unwrap()
}

const TCP_PORTS: &str = "[{name: http, port: 8080, protocol: TCP}]";

/// Programs Service `web` on 10.96.0.10:80 with `spec` and the endpoints `eps`.
fn program_web(c: &Cluster, spec: &str, eps: &str) {
    c.dir
        .write(
            "svc.yaml",
            &(service("web", "10.96.0.10", spec, "[{name: http, port: 80}]")
                + &slice("web", TCP_PORTS, eps)),
        )
        .unwrap();
    wait(c, "programmed", |l| {
        l.contains("10.96.0.10:80/TCP -> 10.244")
    });
}

/// Each client pod is served only by the backend on its own node.
fn assert_clients_stay_on_their_node(c: &Cluster) {
    let vip = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);
    for (client, backend) in [("c1", "web-1"), ("c2", "web-2")] {
        assert_eq!(
            servers_seen(c, client, vip, 20),
            BTreeSet::from([backend.to_string()]),
            "{client}"
        );
    }
}

fn internal_traffic_policy_local_keeps_pod_traffic_on_its_node(xdp: &'static str) {
    let c = cluster(xdp);
    let eps = endpoint(&c, "web-1", "ready: true", "") + &endpoint(&c, "web-2", "ready: true", "");
    program_web(&c, "  internalTrafficPolicy: Local\n", &eps);
    assert_clients_stay_on_their_node(&c);
}

fn terminating_endpoints_serve_only_when_nothing_is_ready_and_held_connections_continue(
    xdp: &'static str,
) {
    let c = cluster(xdp);
    let write = |c1: &str, c2: &str| {
        let eps = endpoint(&c, "web-1", c1, "") + &endpoint(&c, "web-2", c2, "");
        c.dir
            .write(
                "svc.yaml",
                &(service("web", "10.96.0.10", "", "[{name: http, port: 80}]")
                    + &slice("web", TCP_PORTS, &eps)),
            )
            .unwrap();
    };
    let vip = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);
    write("ready: true", "ready: true");
    wait(&c, "two", |l| l.matches(":8080").count() == 2);
    let mut held = HeldConnection::open(&c.topo.pod("c1").ns, vip).unwrap();
    let first = held.ask().unwrap().server;
    // The held connection's backend starts terminating while the other stays ready.
    let terminating = "ready: false, serving: true, terminating: true";
    if first == "web-1" {
        write(terminating, "ready: true");
    } else {
        write("ready: true", terminating);
    }
    wait(&c, "one ready", |l| l.matches(":8080").count() == 1);
    let other = if first == "web-1" { "web-2" } else { "web-1" };
    assert_eq!(
        servers_seen(&c, "c1", vip, 10),
        BTreeSet::from([other.to_string()])
    );
    assert_eq!(
        held.ask().unwrap().server,
        first,
        "an existing connection to a terminating endpoint continues"
    );
    // Nothing ready: both terminating endpoints take new connections (KEP-1669).
    write(terminating, terminating);
    wait(&c, "fallback", |l| l.matches(":8080").count() == 2);
    assert_eq!(servers_seen(&c, "c2", vip, 30).len(), 2);
    // Terminating and not serving: nothing left; refused at once.
    write(
        "ready: false, serving: false, terminating: true",
        "ready: false, serving: false, terminating: true",
    );
    wait(&c, "none", |l| {
        l.contains("10.96.0.10:80/TCP -> (no endpoints")
    });
    let r = c
        .topo
        .pod("c1")
        .ns
        .within(move || traffic::tcp_ask(vip, T))
        .unwrap();
    assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::ConnectionRefused);
}

fn multi_port_services_resolve_each_port_including_one_number_for_two_protocols(xdp: &'static str) {
    let c = cluster(xdp);
    let eps = endpoint(&c, "web-1", "ready: true", "") + &endpoint(&c, "web-2", "ready: true", "");
    let ports = "[{name: http, port: 80}, {name: alt, port: 81}, {name: dns-udp, port: 53, protocol: UDP}, {name: dns-tcp, port: 53, protocol: TCP}]";
    let slice_ports = "[{name: http, port: 8080}, {name: alt, port: 9090}, {name: dns-udp, port: 8080, protocol: UDP}, {name: dns-tcp, port: 9090, protocol: TCP}]";
    c.dir
        .write(
            "svc.yaml",
            &(service("multi", "10.96.0.30", "", ports) + &slice("multi", slice_ports, &eps)),
        )
        .unwrap();
    wait(&c, "four frontends", |l| {
        l.matches("10.96.0.30:").count() == 4
    });
    let ip = Ipv4Addr::new(10, 96, 0, 30);
    let c1 = &c.topo.pod("c1").ns;
    let names = |port: u16| servers_seen(&c, "c1", SocketAddrV4::new(ip, port), 20);
    assert_eq!(names(80), BTreeSet::from(["web-1".into(), "web-2".into()]));
    assert_eq!(
        names(81),
        BTreeSet::from(["web-1-alt".into(), "web-2-alt".into()])
    );
    assert!(
        names(53).iter().all(|n| n.ends_with("-alt")),
        "TCP 53 goes to 9090"
    );
    let (udp, from) = c1
        .within(move || traffic::udp_ask(SocketAddrV4::new(ip, 53), T))
        .unwrap()
        .unwrap();
    assert!(
        !udp.server.ends_with("-alt"),
        "UDP 53 goes to 8080: {udp:?}"
    );
    assert_eq!(from, SocketAddrV4::new(ip, 53).into());
}

fn topology_hints_keep_traffic_in_the_clients_zone(xdp: &'static str) {
    let c = cluster(xdp);
    let eps = endpoint(
        &c,
        "web-1",
        "ready: true",
        ", zone: a, hints: {forZones: [{name: a}]}",
    ) + &endpoint(
        &c,
        "web-2",
        "ready: true",
        ", zone: b, hints: {forZones: [{name: b}]}",
    );
    program_web(&c, "  trafficDistribution: PreferClose\n", &eps);
    assert_clients_stay_on_their_node(&c);
}

fn services_the_dataplane_leaves_alone_are_listed_as_skipped(xdp: &'static str) {
    let c = cluster(xdp);
    let text = [
        "apiVersion: v1\nkind: Service\nmetadata: {name: headless}\nspec: {clusterIP: None, ports: [{port: 80}]}\n---\n",
        "apiVersion: v1\nkind: Service\nmetadata: {name: ext}\nspec: {type: ExternalName, externalName: db.example.com}\n---\n",
        "apiVersion: v1\nkind: Service\nmetadata: {name: other, labels: {service.kubernetes.io/service-proxy-name: other-proxy}}\nspec: {clusterIP: 10.96.0.41, ports: [{port: 80}]}\n---\n",
        "apiVersion: v1\nkind: Service\nmetadata: {name: labelled, labels: {service.kubernetes.io/headless: \"\"}}\nspec: {clusterIP: 10.96.0.42, ports: [{port: 80}]}\n---\n",
        "apiVersion: v1\nkind: Service\nmetadata: {name: sctp}\nspec: {clusterIP: 10.96.0.43, ports: [{name: a, port: 80}, {name: s, port: 9, protocol: SCTP}]}\n",
    ]
    .concat();
    c.dir.write("svc.yaml", &text).unwrap();
    let l = c.agents[0]
        .wait_list("skips", |l| l.contains("skipped default/labelled"))
        .unwrap();
    for want in [
        "skipped default/headless: clusterIP None: headless",
        "skipped default/ext: type ExternalName: DNS only",
        "skipped default/other: label service.kubernetes.io/service-proxy-name=other-proxy",
        "skipped default/labelled: label service.kubernetes.io/headless",
        "problem: ",
        "(Service default/sctp): field spec.ports[1].protocol: SCTP is not supported",
        "10.96.0.43:80/TCP -> (no endpoints: rejects)",
    ] {
        assert!(l.contains(want), "{want:?} missing from:\n{l}");
    }
    assert!(
        !l.contains("10.96.0.41") && !l.contains("10.96.0.42"),
        "{l}"
    );
}

// Every test runs with tc only and with native XDP in front of it, which
// must hand everything that is not a source-NATed external flow to tc.
integration_tests::tests_in_modes!([tc_only = "off", xdp_native = "native"] {
    internal_traffic_policy_local_keeps_pod_traffic_on_its_node,
    terminating_endpoints_serve_only_when_nothing_is_ready_and_held_connections_continue,
    multi_port_services_resolve_each_port_including_one_number_for_two_protocols,
    topology_hints_keep_traffic_in_the_clients_zone,
    services_the_dataplane_leaves_alone_are_listed_as_skipped,
});
