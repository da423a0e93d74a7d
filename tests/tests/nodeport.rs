//! NodePort, LoadBalancer and externalIP traffic from outside the cluster on
//! a two-node topology, with both traffic policies.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddrV4},
    time::Duration,
};

use integration_tests::{
    agent::Agent,
    fixture::{Cluster, T, TwoNodes},
    manifests,
    traffic::{self, HeldConnection},
};

/// Service `web` as a NodePort: 80 -> http (nodePort 30080), 53/UDP -> 8080
/// (nodePort 30053), of `kind` with `extra_spec` added.
fn node_port_service(ports: &[(&str, &str, u16, &str)], kind: &str, extra_spec: &str) -> String {
    manifests::service(
        "web",
        "web",
        "10.96.0.10",
        ports,
        &format!("  type: {kind}\n{extra_spec}"),
    )
    .replace(
        "targetPort: \"http\"}",
        "targetPort: \"http\", nodePort: 30080}",
    )
    .replace("targetPort: 8080}", "targetPort: 8080, nodePort: 30053}")
}

const HTTP: (&str, &str, u16, &str) = ("http", "TCP", 80, "http");

fn two_nodes(xdp: &'static str, extra_spec: &str) -> Cluster {
    two_nodes_with(xdp, extra_spec, &[])
}

/// TwoNodes with the NodePort Service `web` (TCP and UDP) with
/// `extra_spec`, and agents with `flags`; `xdp` is the agents' --xdp mode.
fn two_nodes_with(xdp: &'static str, extra_spec: &str, flags: &[&str]) -> Cluster {
    let nodes = TwoNodes::new(xdp).unwrap();
    let svc = node_port_service(&[HTTP, ("dns", "UDP", 53, "8080")], "NodePort", extra_spec);
    nodes.dir.write("svc.yaml", &svc).unwrap();
    nodes.start(flags).unwrap()
}

fn ask_many(t: &Cluster, to: SocketAddrV4, n: usize) -> BTreeMap<String, Vec<IpAddr>> {
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

fn node_port_with_cluster_policy_reaches_pods_on_both_nodes_from_either_node(xdp: &'static str) {
    let t = two_nodes(xdp, "");
    let client_ip = IpAddr::V4(t.topo.clients[0].ip);
    for node in 0..2 {
        let node_ip = t.topo.nodes[node].ip;
        let seen = ask_many(&t, SocketAddrV4::new(node_ip, 30080), 100);
        assert_eq!(seen.len(), 2, "via node-{}: {seen:?}", node + 1);
        // One fair draw per connection, whichever program carries it (an
        // even split gives 50 each; under 35 is 3 standard deviations off).
        for (server, sources) in &seen {
            assert!(
                sources.len() >= 35,
                "via node-{}: {server} got {} of 100",
                node + 1,
                sources.len()
            );
        }
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
    assert_xdp_forwarded(&t, xdp, &[0, 1]);
}

/// With XDP on, the source-NATed flows through `nodes` went through it
/// (requests and replies sent back out of eth0), not through tc behind it.
fn assert_xdp_forwarded(t: &Cluster, xdp: &str, nodes: &[usize]) {
    for &n in nodes {
        let a = &t.agents[n];
        let (tx, passed) = (counter(a, "xdp_tx"), counter(a, "xdp_passed_to_tc"));
        if xdp == "off" {
            assert_eq!(tx, 0);
        } else {
            assert!(
                tx > 0,
                "--xdp {xdp}: nothing went out through XDP on node-{}",
                n + 1
            );
            // Only packets meeting a neighbour not yet resolved go to tc.
            assert!(
                passed * 4 < tx,
                "--xdp {xdp}: node-{}: {passed} packets passed to tc, {tx} sent by XDP",
                n + 1
            );
        }
    }
}

fn counter(agent: &Agent, reason: &str) -> u64 {
    let v: serde_json::Value =
        serde_json::from_str(&agent.cli("stats", &["-o", "json"]).unwrap()).unwrap();
    v["reasons"][reason].as_u64().unwrap()
}

fn node_port_with_local_policy_keeps_the_client_address_and_stays_on_the_node(xdp: &'static str) {
    let t = two_nodes(xdp, "  externalTrafficPolicy: Local\n");
    let client_ip = IpAddr::V4(t.topo.clients[0].ip);
    for (node, only) in [(0, "web-1"), (1, "web-2")] {
        let seen = ask_many(&t, SocketAddrV4::new(t.topo.nodes[node].ip, 30080), 20);
        assert_eq!(
            seen.keys().collect::<Vec<_>>(),
            [only],
            "via node-{}",
            node + 1
        );
        assert!(
            seen[only].iter().all(|s| *s == client_ip),
            "source kept: {seen:?}"
        );
    }
    // web-2 stops being ready: node-2 has no local endpoint and must not forward.
    t.write_pods(|name| name == "web-1").unwrap();
    t.agents[1]
        .wait_list("no local endpoint", |l| {
            l.contains("*:30080/TCP -> (no endpoints")
        })
        .unwrap();
    let to = SocketAddrV4::new(t.topo.nodes[1].ip, 30080);
    let r = t.topo.clients[0]
        .ns
        .within(move || traffic::tcp_ask(to, Duration::from_millis(700)))
        .unwrap();
    assert_eq!(
        r.unwrap_err().kind(),
        std::io::ErrorKind::TimedOut,
        "dropped, not rejected and not forwarded"
    );
    assert!(counter(&t.agents[1], "no_local_endpoint") >= 1);
    // The ClusterIP is unaffected by the external policy: from a pod on node-2 it reaches web-1.
    let pod2 = t.topo.pod("web-2");
    let r = pod2
        .ns
        .within(|| traffic::tcp_ask(SocketAddrV4::new("10.96.0.10".parse().unwrap(), 80), T))
        .unwrap()
        .unwrap();
    assert_eq!(r.server, "web-1");
}

fn node_port_udp_and_node_port_from_a_pod(xdp: &'static str) {
    let t = two_nodes(xdp, "");
    let to = SocketAddrV4::new(t.topo.nodes[1].ip, 30053);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..30 {
        let (r, from) = t.topo.clients[0]
            .ns
            .within(move || traffic::udp_ask(to, T))
            .unwrap()
            .unwrap();
        assert_eq!(
            from,
            to.into(),
            "the reply comes from the node address and NodePort"
        );
        seen.insert(r.server);
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_xdp_forwarded(&t, xdp, &[1]);
    // A pod on node-1 to node-2's NodePort.
    let pod = t.topo.pod("web-1");
    let to = SocketAddrV4::new(t.topo.nodes[1].ip, 30080);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..30 {
        seen.insert(
            pod.ns
                .within(move || traffic::tcp_ask(to, T))
                .unwrap()
                .unwrap()
                .server,
        );
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
}

fn node_ports_answer_on_addresses_the_node_gains_later(xdp: &'static str) {
    let t = two_nodes(xdp, "");
    let extra = "192.168.77.50";
    t.topo.nodes[1]
        .ns
        .ip(&["addr", "add", &format!("{extra}/24"), "dev", "eth0"])
        .unwrap();
    t.agents[1]
        .wait_list("address learnt", |_| {
            t.agents[1]
                .cli("dump", &["NODE_ADDRS"])
                .unwrap()
                .contains(extra)
        })
        .unwrap();
    let to = SocketAddrV4::new(extra.parse().unwrap(), 30080);
    let r = t.topo.clients[0]
        .ns
        .within(move || traffic::tcp_ask(to, T))
        .unwrap();
    assert!(r.is_ok(), "{r:?}");
    // An address node-1 does not own is not a NodePort there.
    assert!(
        !t.agents[0]
            .cli("dump", &["NODE_ADDRS"])
            .unwrap()
            .contains(extra)
    );
}

fn external_ips_and_load_balancer_ips_are_served_with_the_service_port(xdp: &'static str) {
    let lb = "status:\n  loadBalancer:\n    ingress: [{ip: 198.51.100.20}]\n";
    let t = two_nodes_with(
        xdp,
        "  externalIPs: [203.0.113.10]\n",
        &["--external-ip-allow", "203.0.113.0/24"],
    );
    let svc = node_port_service(&[HTTP], "LoadBalancer", "  externalIPs: [203.0.113.10]\n");
    t.dir.write("svc.yaml", &format!("{svc}{lb}")).unwrap();
    t.agents[0]
        .wait_list("lb ip", |l| l.contains("198.51.100.20:80/TCP"))
        .unwrap();
    let client = &t.topo.clients[0];
    for ip in ["203.0.113.10", "198.51.100.20"] {
        // The outside world routes these addresses to node-1 (what an L2 or BGP announcer would arrange).
        client
            .ns
            .ip(&["route", "add", ip, "via", &t.topo.nodes[0].ip.to_string()])
            .unwrap();
        let to = SocketAddrV4::new(ip.parse().unwrap(), 80);
        let seen = ask_many(&t, to, 30);
        assert_eq!(seen.len(), 2, "{ip}: {seen:?}");
    }
}

fn session_affinity_switches_on_and_off_on_a_live_service(xdp: &'static str) {
    let t = two_nodes(xdp, "");
    let to = SocketAddrV4::new(t.topo.nodes[0].ip, 30080);
    assert_eq!(ask_many(&t, to, 30).len(), 2);
    let svc = |extra: &str| node_port_service(&[HTTP], "NodePort", extra);
    t.dir.write("svc.yaml", &svc("  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 2}}\n")).unwrap();
    t.agents[0]
        .wait_list("affinity on", |l| l.contains("affinity ClientIP 2s"))
        .unwrap();
    let seen = ask_many(&t, to, 30);
    assert_eq!(
        seen.len(),
        1,
        "affinity: one backend for every new connection: {seen:?}"
    );
    // The timeout passes without a new connection: the next pick is free again.
    std::thread::sleep(Duration::from_millis(2500));
    let _ = ask_many(&t, to, 1);
    assert!(counter(&t.agents[0], "affinity_stale") >= 1);
    t.dir.write("svc.yaml", &svc("")).unwrap();
    t.agents[0]
        .wait_list("affinity off", |l| !l.contains("affinity ClientIP"))
        .unwrap();
    assert_eq!(ask_many(&t, to, 30).len(), 2, "affinity off: spread again");
}

fn load_balancer_source_ranges_admit_listed_clients_only(xdp: &'static str) {
    let t = two_nodes(xdp, "");
    let lb_ip = "198.51.100.20";
    let write = |ranges: &str| {
        let svc = node_port_service(
            &[HTTP],
            "LoadBalancer",
            &format!("  loadBalancerSourceRanges: [{ranges}]\n"),
        );
        t.dir
            .write(
                "svc.yaml",
                &format!("{svc}status:\n  loadBalancer:\n    ingress: [{{ip: {lb_ip}}}]\n"),
            )
            .unwrap();
    };
    let client = &t.topo.clients[0];
    client
        .ns
        .ip(&[
            "route",
            "add",
            lb_ip,
            "via",
            &t.topo.nodes[0].ip.to_string(),
        ])
        .unwrap();
    let to = SocketAddrV4::new(lb_ip.parse().unwrap(), 80);
    write(&format!("{}/32", client.ip));
    t.agents[0]
        .wait_list("lb", |l| l.contains("198.51.100.20:80/TCP"))
        .unwrap();
    assert_eq!(
        ask_many(&t, to, 10).values().map(Vec::len).sum::<usize>(),
        10
    );
    write("10.0.0.0/8");
    t.agents[0]
        .wait_list("new ranges", |l| l.contains("from 10.0.0.0/8"))
        .unwrap();
    let r = client
        .ns
        .within(move || traffic::tcp_ask(to, Duration::from_millis(700)))
        .unwrap();
    assert!(r.is_err(), "a client outside the ranges is refused: {r:?}");
    assert!(counter(&t.agents[0], "source_range_denied") >= 1);
    // The NodePort of the same Service is not filtered.
    let np = SocketAddrV4::new(t.topo.nodes[0].ip, 30080);
    assert!(
        client
            .ns
            .within(move || traffic::tcp_ask(np, T))
            .unwrap()
            .is_ok()
    );
}

/// `GET /healthz` on a node port from the outside client: status and body.
fn http_status(t: &Cluster, node: usize, port: u16) -> std::io::Result<(u16, String)> {
    let to = SocketAddrV4::new(t.topo.nodes[node].ip, port);
    t.topo.clients[0]
        .ns
        .within(move || traffic::http_request(to, "/healthz", T))
        .unwrap()
}

fn health_check_node_port_reports_local_ready_endpoints(xdp: &'static str) {
    let t = two_nodes(xdp, "");
    let svc = node_port_service(
        &[HTTP],
        "LoadBalancer",
        "  externalTrafficPolicy: Local\n  healthCheckNodePort: 32100\n",
    );
    t.dir.write("svc.yaml", &svc).unwrap();
    let wait_for = |node: usize, code: u16| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let got = http_status(&t, node, 32100);
            if let Ok((c, body)) = &got
                && *c == code
            {
                return body.clone();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "node-{} kept answering {got:?}",
                node + 1
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let body = wait_for(0, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["localEndpoints"], 1, "{body}");
    assert_eq!(v["service"]["name"], "web");
    wait_for(1, 200);
    // web-2 no longer ready: node-2 has nothing local to serve.
    t.write_pods(|name| name == "web-1").unwrap();
    let body = wait_for(1, 503);
    assert!(body.contains("\"localEndpoints\":0"), "{body}");
    assert_eq!(http_status(&t, 0, 32100).unwrap().0, 200);
}

/// Whether an XDP program is attached to the node's eth0.
fn xdp_attached(t: &Cluster, node: usize) -> bool {
    let out = t.topo.nodes[node].ns.ip(&["link", "show", "eth0"]).unwrap();
    String::from_utf8_lossy(&out.stdout).contains("prog/xdp")
}

#[test]
fn xdp_keeps_forwarding_across_a_restart_and_leaves_when_switched_off() {
    let mut t = two_nodes("native", "");
    let to = SocketAddrV4::new(t.topo.nodes[0].ip, 30080);
    let client = t.topo.clients[0].ns.name.clone();
    // A connection source-NATed to the backend on node-2: XDP's to carry.
    let mut held = (0..40)
        .find_map(|_| {
            let mut c = HeldConnection::open(&t.topo.clients[0].ns, to).unwrap();
            (c.ask().unwrap().server == "web-2").then_some(c)
        })
        .expect("a connection to web-2 within 40 tries");
    t.agents[0].kill();
    assert!(
        xdp_attached(&t, 0),
        "the pinned XDP link outlives the agent"
    );
    let before = counter(&t.agents[0], "xdp_tx");
    assert_eq!(held.ask().unwrap().server, "web-2", "{client}");
    assert!(
        counter(&t.agents[0], "xdp_tx") > before,
        "XDP forwarded while the agent was down"
    );
    t.agents[0].spawn().unwrap();
    assert!(
        t.agents[0].log_text().contains("adopted=true"),
        "the restarted agent adopted the XDP link: {}",
        t.agents[0].log_text()
    );
    assert_eq!(held.ask().unwrap().server, "web-2");
    // Switched off: the link goes, tc carries the same flow on.
    t.agents[0].kill();
    t.agents[0].set_flag("--xdp", "off");
    t.agents[0].spawn().unwrap();
    assert!(!xdp_attached(&t, 0), "--xdp off detaches the old link");
    let tx = counter(&t.agents[0], "xdp_tx");
    assert_eq!(held.ask().unwrap().server, "web-2");
    assert_eq!(ask_many(&t, to, 20).len(), 2);
    assert_eq!(
        counter(&t.agents[0], "xdp_tx"),
        tx,
        "nothing through XDP any more"
    );
}

// Every test runs with tc only, and with the XDP fast path in native and
// in generic mode in front of it.
integration_tests::tests_in_modes!([tc_only = "off", xdp_native = "native", xdp_generic = "generic"] {
    node_port_with_cluster_policy_reaches_pods_on_both_nodes_from_either_node,
    node_port_with_local_policy_keeps_the_client_address_and_stays_on_the_node,
    node_port_udp_and_node_port_from_a_pod,
    node_ports_answer_on_addresses_the_node_gains_later,
    external_ips_and_load_balancer_ips_are_served_with_the_service_port,
    session_affinity_switches_on_and_off_on_a_live_service,
    load_balancer_source_ranges_admit_listed_clients_only,
    health_check_node_port_reports_local_ready_endpoints,
});
