//! IPv6 end to end on dual-stack nodes: pods and nodes with IPv4 and IPv6
//! (ULA, inside the namespaces only) addresses, agents on the nodes, real
//! TCP and UDP over IPv6 ClusterIPs and NodePorts through the tc path
//! (spread, affinity, hairpin, refusal, source NAT to a node's IPv6 address
//! for a backend on another node, traffic policy Local, and the same
//! forwarded by the XDP fast path), a dual-stack
//! Service on both its ClusterIPs, the IPv6 socket hooks (node and pod
//! sockets, IPv4-mapped addresses), and the node's IPv6 neighbours reachable
//! with the programs attached.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    thread,
    time::{Duration, Instant},
};

use integration_tests::{
    agent::{Agent, ManifestDir},
    cgroup::TestCgroup,
    fixture::T,
    host_client::HostClient,
    netns::Netns,
    topology::Topology,
    traffic::{self, Server},
};

const CLIENT: &str = env!("CARGO_BIN_EXE_host_client");

const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
const DS_VIP4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
const DS_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x20);

/// A dual-stack node with pod `client` and `web-1..=web-3`, each web pod
/// serving TCP and UDP on 8080 on both of its addresses.
struct Node6 {
    _servers: Vec<Server>,
    topo: Topology,
    dir: ManifestDir,
}

impl Node6 {
    fn new() -> Self {
        Self::on(Topology::dual_stack().unwrap(), true)
    }

    /// The same on `topo`; the web pods serve on their IPv4 addresses too
    /// when `ipv4`.
    fn on(mut topo: Topology, ipv4: bool) -> Self {
        topo.add_node().unwrap();
        topo.add_pod(0, "client").unwrap();
        let mut servers = vec![];
        for i in 1..=3 {
            let k = topo.add_pod(0, &format!("web-{i}")).unwrap();
            let p = &topo.pods[k];
            if ipv4 {
                servers.push(Server::start(&p.ns, p.ip, 8080, &p.name).unwrap());
            }
            servers.push(Server::start(&p.ns, p.ip6.unwrap(), 8080, &p.name).unwrap());
        }
        Self {
            _servers: servers,
            topo,
            dir: ManifestDir::new().unwrap(),
        }
    }

    fn web(&self) -> impl Iterator<Item = &integration_tests::topology::Pod> {
        self.topo.pods.iter().filter(|p| p.name.starts_with("web-"))
    }

    /// An EndpointSlice of Service `svc` for family `family` with the web
    /// pods' addresses of that family, on node-1.
    fn slice(&self, svc: &str, family: &str) -> String {
        self.slice_of(svc, family, |_| true)
    }

    /// `slice` with only the web pods whose name `keep` holds.
    fn slice_of(&self, svc: &str, family: &str, keep: impl Fn(&str) -> bool) -> String {
        let mut eps = String::new();
        for p in self.web().filter(|p| keep(&p.name)) {
            let addr: IpAddr = if family == "IPv6" {
                p.ip6.unwrap().into()
            } else {
                p.ip.into()
            };
            eps.push_str(&format!(
                "- {{addresses: ['{addr}'], nodeName: node-1, conditions: {{ready: true}}}}\n"
            ));
        }
        format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: {svc}-{}, labels: {{kubernetes.io/service-name: {svc}}}}}\n\
             addressType: {family}\n\
             ports: [{{name: http, port: 8080, protocol: TCP}}, {{name: dns, port: 8080, protocol: UDP}}]\n\
             endpoints:\n{eps}---\n",
            family.to_ascii_lowercase()
        )
    }

    /// Writes `yaml` as the manifests, starts the agent and waits until
    /// `frontend` lists `n` backends.
    fn serve(&self, yaml: &str, frontend: &str, n: usize) -> Agent {
        self.dir.write("svc.yaml", yaml).unwrap();
        let agent = self.start_agent();
        agent
            .wait_list(frontend, |l| listed(l, frontend, n))
            .unwrap();
        agent
    }

    fn start_agent(&self) -> Agent {
        Agent::start(
            &self.topo.nodes[0].ns,
            &self.dir.path,
            &["--node-name", "node-1"],
        )
        .unwrap()
    }
}

/// A selector-less Service `name` on `spec_ips` (the `clusterIP` and
/// `clusterIPs` lines), ports http 80/TCP and dns 53/UDP.
fn service(name: &str, spec_ips: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n{spec_ips}  ports:\n  \
         - {{name: http, protocol: TCP, port: 80, targetPort: 8080}}\n  \
         - {{name: dns, protocol: UDP, port: 53, targetPort: 8080}}\n---\n"
    )
}

fn listed(list: &str, frontend: &str, n: usize) -> bool {
    list.lines()
        .find(|l| l.starts_with(frontend))
        .is_some_and(|l| l.matches(":8080").count() == n)
}

/// `n` TCP requests from `ns` to `to`, each on a new connection: the
/// backends that answered, and how often. Every reply must have seen `client`.
fn spread(ns: &Netns, to: SocketAddr, client: IpAddr, n: usize) -> BTreeMap<String, usize> {
    ns.within(move || {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for i in 0..n {
            let r = traffic::tcp_ask(to, T).unwrap_or_else(|e| panic!("request {i} to {to}: {e}"));
            assert_eq!(
                r.seen_from.ip(),
                client,
                "the backend sees the client's own address"
            );
            *counts.entry(r.server).or_default() += 1;
        }
        counts
    })
    .unwrap()
}

#[test]
fn ipv6_cluster_ip_spreads_tcp_over_three_pods_and_answers_udp_from_the_service() {
    let f = Node6::new();
    let spec = format!("  clusterIP: '{VIP6}'\n  ipFamilies: [IPv6]\n");
    f.dir
        .write(
            "svc.yaml",
            &(service("web6", &spec) + &f.slice("web6", "IPv6")),
        )
        .unwrap();
    let agent = f.start_agent();
    let frontend = format!("[{VIP6}]:80/TCP");
    let list = agent
        .wait_list("three IPv6 backends", |l| listed(l, &frontend, 3))
        .unwrap();
    let web1 = f.topo.pod("web-1").ip6.unwrap();
    assert!(
        list.contains(&format!("{frontend} -> [{web1}]:8080")),
        "list prints IPv6 frontends and backends bracketed:\n{list}"
    );
    for (map, want) in [
        ("SERVICES6", format!("[{VIP6}]:80 proto 6 scope 0 slot 0")),
        ("BACKENDS6", format!("[{web1}]:8080 proto 6")),
    ] {
        let dump = agent.cli("dump", &[map]).unwrap();
        assert!(dump.contains(&want), "dump {map}:\n{dump}");
    }
    let client = f.topo.pod("client");
    let client_ip: IpAddr = client.ip6.unwrap().into();
    let counts = spread(&client.ns, SocketAddr::new(VIP6.into(), 80), client_ip, 150);
    assert_eq!(counts.len(), 3, "all three backends served: {counts:?}");
    for (name, n) in &counts {
        assert!(*n >= 30, "{name} got {n} of 150, under 20%: {counts:?}");
    }
    let to = SocketAddr::new(VIP6.into(), 53);
    let (reply, from) = client
        .ns
        .within(move || traffic::udp_ask(to, T))
        .unwrap()
        .expect("a UDP reply through the IPv6 ClusterIP");
    assert!(reply.server.starts_with("web-"), "{reply:?}");
    assert_eq!(from, to, "the reply comes from the ClusterIP and port");
    assert_eq!(reply.seen_from.ip(), client_ip);
    // The packets were translated by the programs, not by chance routing:
    // the frontend's counters saw them.
    let stats = agent.cli("stats", &[]).unwrap();
    let packets: u64 = stats
        .lines()
        .find(|l| l.starts_with(&frontend))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or_else(|| panic!("no counters for {frontend}:\n{stats}"));
    assert!(
        packets >= 150 * 3,
        "{frontend} counted {packets} packets:\n{stats}"
    );
    // /metrics labels the frontend's counters with its family.
    let text = f.topo.nodes[0]
        .ns
        .within(|| {
            traffic::http_request(
                service_agent::cli::DEFAULT_METRICS_ADDR.parse().unwrap(),
                "/metrics",
                T,
            )
        })
        .unwrap()
        .unwrap()
        .1;
    assert!(
        text.lines()
            .any(|l| l.starts_with("service_agent_frontend_packets_total{")
                && l.contains(&format!("frontend=\"{frontend}\""))
                && l.contains("ip_family=\"IPv6\"")),
        "no IPv6-labelled counters for {frontend}:\n{text}"
    );
}

#[test]
fn a_require_dual_stack_service_answers_on_both_cluster_ips() {
    let f = Node6::new();
    let spec = format!(
        "  clusterIP: {DS_VIP4}\n  clusterIPs: [{DS_VIP4}, '{DS_VIP6}']\n  \
         ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: RequireDualStack\n"
    );
    let yaml = service("ds", &spec) + &f.slice("ds", "IPv4") + &f.slice("ds", "IPv6");
    f.dir.write("svc.yaml", &yaml).unwrap();
    let agent = f.start_agent();
    let (fe4, fe6) = (format!("{DS_VIP4}:80/TCP"), format!("[{DS_VIP6}]:80/TCP"));
    agent
        .wait_list("both families", |l| {
            listed(l, &fe4, 3) && listed(l, &fe6, 3)
        })
        .unwrap();
    let client = f.topo.pod("client");
    let v4 = spread(
        &client.ns,
        SocketAddr::new(DS_VIP4.into(), 80),
        client.ip.into(),
        30,
    );
    let v6 = spread(
        &client.ns,
        SocketAddr::new(DS_VIP6.into(), 80),
        client.ip6.unwrap().into(),
        30,
    );
    for (family, counts) in [("IPv4", &v4), ("IPv6", &v6)] {
        assert!(
            counts.len() >= 2 && counts.keys().all(|k| k.starts_with("web-")),
            "{family}: {counts:?}"
        );
    }
    for to in [
        SocketAddr::new(DS_VIP4.into(), 53),
        SocketAddr::new(DS_VIP6.into(), 53),
    ] {
        let (_, from) = client
            .ns
            .within(move || traffic::udp_ask(to, T))
            .unwrap()
            .unwrap_or_else(|e| panic!("UDP to {to}: {e}"));
        assert_eq!(from, to);
    }
}

/// An IPv6 LoadBalancer IP reached from outside the cluster: a client in
/// `loadBalancerSourceRanges` is served (and seen with its own address, the
/// backends being local), one outside them is dropped and counted.
#[test]
fn an_ipv6_load_balancer_ip_serves_only_its_source_ranges() {
    let mut f = Node6::new();
    f.topo.add_client().unwrap();
    f.topo.add_client().unwrap();
    let lb_ip: Ipv6Addr = "fd00:99::9".parse().unwrap();
    let node6 = f.topo.nodes[0].ip6.unwrap();
    let allowed = f.topo.clients[0].ip6.unwrap();
    for c in &f.topo.clients {
        c.ns.ip(&[
            "-6",
            "route",
            "add",
            &lb_ip.to_string(),
            "via",
            &node6.to_string(),
        ])
        .unwrap();
    }
    let spec = format!(
        "  type: LoadBalancer\n  clusterIP: '{VIP6}'\n  \
         loadBalancerSourceRanges: ['{allowed}/128', 192.0.2.0/24]\n"
    );
    let svc = service("lb6", &spec).replace(
        "port: 80, targetPort: 8080}",
        "port: 80, targetPort: 8080, nodePort: 30080}",
    ) + &format!("status:\n  loadBalancer: {{ingress: [{{ip: '{lb_ip}'}}]}}\n---\n");
    // The status belongs to the Service document, before its separator.
    let svc = svc.replacen("---\nstatus:", "status:", 1);
    let agent = f.serve(
        &(svc + &f.slice("lb6", "IPv6")),
        &format!("[{lb_ip}]:80/TCP"),
        3,
    );
    let to = SocketAddr::new(lb_ip.into(), 80);
    let counts = spread(&f.topo.clients[0].ns, to, allowed.into(), 30);
    assert!(
        counts.len() >= 2 && counts.keys().all(|k| k.starts_with("web-")),
        "{counts:?}"
    );
    let denied = f.topo.clients[1]
        .ns
        .within(move || traffic::tcp_ask(to, std::time::Duration::from_millis(500)))
        .unwrap();
    assert!(
        denied.is_err(),
        "a client outside the ranges got {denied:?}"
    );
    assert!(reason(&agent, "source_range_denied") >= 1);
}

/// A backend's ICMPv6 error about a translated flow reaches the client as
/// if the ClusterIP had sent it: UDP to a backend port nothing listens on
/// makes the backend answer "port unreachable" quoting the translated
/// datagram, and the client's connected socket, which only knows the
/// ClusterIP, sees ECONNREFUSED at once instead of silence.
#[test]
fn an_icmpv6_error_from_a_backend_is_translated_back_to_the_cluster_ip() {
    let f = Node6::new();
    let spec = format!("  clusterIP: '{VIP6}'\n");
    // The UDP port's endpoints are on 9999, where no pod listens.
    let slice = f
        .slice("web6", "IPv6")
        .replace("port: 8080, protocol: UDP", "port: 9999, protocol: UDP");
    f.dir
        .write("svc.yaml", &(service("web6", &spec) + &slice))
        .unwrap();
    let agent = f.start_agent();
    agent
        .wait_list("the IPv6 UDP frontend", |l| {
            l.lines().any(|l| {
                l.starts_with(&format!("[{VIP6}]:53/UDP")) && l.matches(":9999").count() == 3
            })
        })
        .unwrap();
    let client = f.topo.pod("client");
    let to = SocketAddr::new(VIP6.into(), 53);
    let got = client
        .ns
        .within(move || {
            let s = std::net::UdpSocket::bind("[::]:0").unwrap();
            s.connect(to).unwrap();
            s.set_read_timeout(Some(T)).unwrap();
            s.send(b"hello").unwrap();
            let mut buf = [0u8; 64];
            let started = Instant::now();
            (s.recv(&mut buf).map(|_| ()), started.elapsed())
        })
        .unwrap();
    assert!(
        got.0
            .as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused),
        "the client's socket saw {:?}",
        got.0
    );
    assert!(got.1 < Duration::from_secs(1), "refused after {:?}", got.1);
    assert!(reason(&agent, "icmp_error_translated") >= 1);
}

/// 4000-byte UDP datagrams over IPv6 leave the client in fragments (the
/// fragment header); the first picks a backend, the later ones follow it,
/// and the reply comes back whole, fragmented the other way.
#[test]
fn large_ipv6_udp_datagrams_are_fragmented_and_reach_one_backend_whole() {
    let f = Node6::new();
    let spec = format!("  clusterIP: '{VIP6}'\n");
    let web6 = service("web6", &spec) + &f.slice("web6", "IPv6");
    let agent = f.serve(&web6, &format!("[{VIP6}]:53/UDP"), 3);
    let to = SocketAddr::new(VIP6.into(), 53);
    let results = f
        .topo
        .pod("client")
        .ns
        .within(move || {
            (0..20)
                .map(|_| traffic::udp_ask_big(to, 4000, T))
                .collect::<Vec<_>>()
        })
        .unwrap();
    let mut servers = BTreeSet::new();
    for r in results {
        let (reply, len) = r.expect("a 4000-byte datagram over IPv6 and a 4000-byte reply");
        assert_eq!(len, 4000);
        servers.insert(reply.server);
    }
    assert!(servers.len() >= 2, "{servers:?}");
    // At 1500 bytes of MTU each 4000-byte datagram is 3 fragments each way.
    assert!(reason(&agent, "fragment_translated") >= 40);
}

/// Path MTU discovery through a NodePort: a client outside the cluster,
/// behind a router whose link to it carries 1280 bytes, fetches 200 KB. The
/// backend's full-size segments get "packet too big" from the router,
/// addressed to the node (the replies' source after translation); the
/// dataplane hands it to the backend as an error about its own segment, the
/// backend lowers its path MTU, and the transfer completes.
#[test]
fn path_mtu_discovery_works_through_an_ipv6_node_port() {
    let mut f = Node6::new();
    let c = f.topo.add_routed_client(1280).unwrap();
    let spec = format!("  type: NodePort\n  clusterIP: '{VIP6}'\n");
    let svc = service("web6", &spec).replace(
        "port: 80, targetPort: 8080}",
        "port: 80, targetPort: 8080, nodePort: 30080}",
    );
    let agent = f.serve(&(svc + &f.slice("web6", "IPv6")), "[*]:30080/TCP", 3);
    let to = SocketAddr::new(f.topo.nodes[0].ip6.unwrap().into(), 30080);
    let client_ip: IpAddr = f.topo.clients[c].ip6.unwrap().into();
    let (reply, got) = f.topo.clients[c]
        .ns
        .within(move || traffic::tcp_fetch(to, 200_000, Duration::from_secs(5)))
        .unwrap()
        .expect("a connection through the NodePort");
    assert!(reply.server.starts_with("web-"), "{reply:?}");
    assert_eq!(
        reply.seen_from.ip(),
        client_ip,
        "local backend: client kept"
    );
    assert_eq!(got, 200_000, "the transfer stalled: {got} of 200000 bytes");
    assert!(reason(&agent, "icmp_error_translated") >= 1);
}

/// An IPv6-only pod network (no IPv4 address or route in any pod): an
/// IPv6 Service is reached from a pod on its ClusterIP, TCP and UDP, and
/// from outside on its NodePort at the node's IPv6 address.
#[test]
fn an_ipv6_only_pod_network_is_served() {
    let mut f = Node6::on(Topology::ipv6_pods_only().unwrap(), false);
    f.topo.add_client().unwrap();
    let client = f.topo.pod("client");
    let no_ipv4 = client
        .ns
        .exec("ip", &["-4", "-o", "addr", "show", "dev", "eth0"])
        .unwrap();
    assert!(
        String::from_utf8_lossy(&no_ipv4.stdout).trim().is_empty(),
        "the pod has no IPv4 address"
    );
    let spec = format!("  type: NodePort\n  clusterIP: '{VIP6}'\n  ipFamilies: [IPv6]\n");
    let svc = service("web6", &spec).replace(
        "port: 80, targetPort: 8080}",
        "port: 80, targetPort: 8080, nodePort: 30080}",
    );
    let agent = f.serve(&(svc + &f.slice("web6", "IPv6")), "[*]:30080/TCP", 3);
    let client_ip: IpAddr = client.ip6.unwrap().into();
    let counts = spread(&client.ns, SocketAddr::new(VIP6.into(), 80), client_ip, 30);
    assert!(counts.len() >= 2, "{counts:?}");
    let to = SocketAddr::new(VIP6.into(), 53);
    let (_, from) = client
        .ns
        .within(move || traffic::udp_ask(to, T))
        .unwrap()
        .expect("UDP through the IPv6 ClusterIP");
    assert_eq!(from, to);
    let outside = &f.topo.clients[0];
    let node6 = f.topo.nodes[0].ip6.unwrap();
    let counts = spread(
        &outside.ns,
        SocketAddr::new(node6.into(), 30080),
        outside.ip6.unwrap().into(),
        30,
    );
    assert!(counts.len() >= 2, "{counts:?}");
    assert_eq!(reason(&agent, "snat_failed"), 0);
}

/// `ping` once from `ns` to `to` after forgetting every neighbour, so the
/// exchange needs neighbour discovery first.
fn ping_fresh(ns: &Netns, to: Ipv6Addr) -> bool {
    let _ = ns.ip(&["-6", "neigh", "flush", "all"]);
    ns.exec("ping", &["-6", "-c", "1", "-W", "2", &to.to_string()])
        .is_ok_and(|o| o.status.success())
}

#[test]
fn ipv6_neighbours_stay_reachable_with_the_programs_attached() {
    let mut f = Node6::new();
    f.topo.add_client().unwrap();
    let spec = format!("  clusterIP: '{VIP6}'\n");
    let web6 = service("web6", &spec) + &f.slice("web6", "IPv6");
    let agent = f.serve(&web6, &format!("[{VIP6}]:80/TCP"), 3);
    let node = &f.topo.nodes[0];
    let client = f.topo.pod("client");
    let outside = &f.topo.clients[0];
    // Pod <-> node over a pod veth (svc_tc_pod), node <-> outside host over
    // the external interface (svc_tc_external and svc_tc_egress), each way.
    let checks = [
        (&client.ns, node.pod_gateway6(), "pod -> node"),
        (&node.ns, client.ip6.unwrap(), "node -> pod"),
        (&outside.ns, node.ip6.unwrap(), "outside -> node"),
        (&node.ns, outside.ip6.unwrap(), "node -> outside"),
    ];
    for (ns, to, what) in checks {
        assert!(
            ping_fresh(ns, to),
            "{what} ({to}) unreachable with the programs attached"
        );
    }
    // Neighbour discovery, router and MLD messages are not the dataplane's:
    // none was counted as malformed or dropped for IPv6.
    let stats = agent.cli("stats", &[]).unwrap();
    for reason in ["malformed_ipv6", "ipv6_ext_chain_too_long"] {
        let n = stats
            .lines()
            .find(|l| l.contains(reason))
            .and_then(|l| l.split_whitespace().find_map(|w| w.parse::<u64>().ok()));
        assert!(n.is_none_or(|n| n == 0), "{reason}: {stats}");
    }
}

#[test]
fn ipv6_node_port_from_outside_reaches_local_pods_and_keeps_the_client_address() {
    let mut f = Node6::new();
    f.topo.add_client().unwrap();
    let spec = format!("  type: NodePort\n  clusterIP: '{VIP6}'\n");
    let svc = service("web6", &spec).replace(
        "port: 80, targetPort: 8080}",
        "port: 80, targetPort: 8080, nodePort: 30080}",
    );
    let _agent = f.serve(&(svc + &f.slice("web6", "IPv6")), "[*]:30080/TCP", 3);
    let node6 = f.topo.nodes[0].ip6.unwrap();
    let outside = &f.topo.clients[0];
    let counts = spread(
        &outside.ns,
        SocketAddr::new(node6.into(), 30080),
        outside.ip6.unwrap().into(),
        60,
    );
    assert!(
        counts.len() >= 2 && counts.keys().all(|k| k.starts_with("web-")),
        "{counts:?}"
    );
}

#[test]
fn an_ipv6_frontend_without_endpoints_refuses_tcp_and_udp_at_once() {
    let f = Node6::new();
    let vip: Ipv6Addr = "fd00:96::30".parse().unwrap();
    f.dir
        .write(
            "svc.yaml",
            &service("empty", &format!("  clusterIP: '{vip}'\n")),
        )
        .unwrap();
    let agent = f.start_agent();
    agent
        .wait_list("the empty frontend", |l| {
            l.contains(&format!("[{vip}]:80/TCP -> (no endpoints: rejects)"))
        })
        .unwrap();
    let client = f.topo.pod("client");
    let (tcp, udp) = client
        .ns
        .within(move || {
            let tcp = std::net::TcpStream::connect_timeout(&SocketAddr::new(vip.into(), 80), T);
            let s = std::net::UdpSocket::bind("[::]:0").unwrap();
            s.connect(SocketAddr::new(vip.into(), 53)).unwrap();
            s.set_read_timeout(Some(T)).unwrap();
            s.send(b"hello").unwrap();
            let mut buf = [0u8; 64];
            (tcp.map(|_| ()), s.recv(&mut buf).map(|_| ()))
        })
        .unwrap();
    let refused = |r: &std::io::Result<()>| {
        r.as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
    };
    assert!(refused(&tcp), "TCP: a reset, not {tcp:?}");
    assert!(
        refused(&udp),
        "UDP: an ICMPv6 port unreachable, not {udp:?}"
    );
}

/// `ok SERVER SEEN_FROM PEER` -> (SERVER, PEER)
fn server_and_peer(answer: &str) -> (String, String) {
    let w: Vec<&str> = answer.split_whitespace().collect();
    assert!(w.len() == 4 && w[0] == "ok", "unexpected answer {answer:?}");
    (w[1].to_string(), w[3].to_string())
}

/// `n` TCP connections from `c` to `to`: the servers that answered; each
/// connection's getpeername() must be `to` itself.
fn hooked_spread(c: &mut HostClient, to: &str, n: usize) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    for _ in 0..n {
        let (server, peer) = server_and_peer(&c.ask(&format!("tcp {to}")).unwrap());
        assert_eq!(peer, to, "getpeername() names the Service");
        seen.insert(server);
    }
    seen
}

/// Asks over `c`'s connected UDP socket until the agent has ended it (5 s
/// at most): the error the application sees.
fn ended(c: &mut HostClient) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let a = c.ask("udp-ask").unwrap();
        if a.starts_with("err") {
            return a;
        }
        assert!(
            Instant::now() < deadline,
            "the socket kept its removed backend: {a}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

fn reason(agent: &Agent, name: &str) -> u64 {
    let stats = agent.cli("stats", &["--output", "json"]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
    v["reasons"][name].as_u64().unwrap_or(0)
}

/// The IPv6 socket hooks: the node's own processes and (with `--socket-lb
/// pods`) a pod's reach a dual-stack Service on its IPv6 ClusterIP, and an
/// IPv6 socket reaches its IPv4 ClusterIP through the IPv4-mapped address,
/// over TCP, unconnected and connected UDP, with every reply and
/// getpeername() showing the Service address the socket asked for.
#[test]
fn ipv6_sockets_reach_a_dual_stack_service_on_both_families_through_the_hooks() {
    let f = Node6::new();
    let cgroup = TestCgroup::new().unwrap();
    let spec = format!(
        "  clusterIP: {DS_VIP4}\n  clusterIPs: [{DS_VIP4}, '{DS_VIP6}']\n  \
         ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: RequireDualStack\n"
    );
    let empty: Ipv6Addr = "fd00:96::30".parse().unwrap();
    let yaml = service("ds", &spec)
        + &f.slice("ds", "IPv4")
        + &f.slice("ds", "IPv6")
        + &service("empty6", &format!("  clusterIP: '{empty}'\n"));
    f.dir.write("svc.yaml", &yaml).unwrap();
    let agent = Agent::start(
        &f.topo.nodes[0].ns,
        &f.dir.path,
        &[
            "--node-name",
            "node-1",
            "--cgroup",
            &cgroup.flag(),
            "--socket-lb",
            "pods",
        ],
    )
    .unwrap();
    let (fe4, fe6) = (format!("{DS_VIP4}:80/TCP"), format!("[{DS_VIP6}]:80/TCP"));
    let list = agent
        .wait_list("both families", |l| {
            listed(l, &fe4, 3) && listed(l, &fe6, 3)
        })
        .unwrap();
    for hook in ["connect6", "sendmsg6", "recvmsg6", "getpeername6"] {
        assert!(
            list.lines()
                .any(|l| l.contains(hook) && l.contains(&cgroup.flag())),
            "list names {hook} on the test cgroup:\n{list}"
        );
    }
    let v6 = format!("[{DS_VIP6}]:80");
    let mapped = format!("[::ffff:{DS_VIP4}]:80");
    let mut host = HostClient::start(Path::new(CLIENT), &f.topo.nodes[0].ns, &cgroup).unwrap();
    let mut pod = HostClient::start(Path::new(CLIENT), &f.topo.pod("client").ns, &cgroup).unwrap();
    for (who, c) in [("node", &mut host), ("pod", &mut pod)] {
        for to in [&v6, &mapped] {
            let seen = hooked_spread(c, to, 30);
            assert!(
                seen.len() >= 2 && seen.iter().all(|s| s.starts_with("web-")),
                "{who} -> {to}: {seen:?}"
            );
        }
    }
    // Every closed connection took its reverse entry with it (an IPv6
    // socket's, the mapped ones too, are in SOCK_REVNAT6).
    assert_eq!(reason(&agent, "sock_revnat_released"), 120);
    let list = agent.cli("list", &["--output", "json"]).unwrap();
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    for map in ["SOCK_REVNAT", "SOCK_REVNAT6"] {
        let m = list["maps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["map"] == map)
            .unwrap_or_else(|| panic!("no {map} in {list}"));
        assert_eq!(m["entries"], 0, "closed sockets left entries: {m}");
    }
    // UDP from the node: unconnected replies come from the Service, and a
    // connected socket's peer is the Service.
    for to in [format!("[{DS_VIP6}]:53"), format!("[::ffff:{DS_VIP4}]:53")] {
        let a = host.ask(&format!("udp-sendto {to}")).unwrap();
        let w: Vec<&str> = a.split_whitespace().collect();
        assert!(w[0] == "ok" && w[1].starts_with("web-"), "{a}");
        assert_eq!(w[3], to, "recvfrom shows the Service: {a}");
        assert_eq!(
            host.ask(&format!("udp-connect {to}")).unwrap(),
            format!("ok {to}")
        );
        let (server, peer) = server_and_peer(&host.ask("udp-ask").unwrap());
        assert!(server.starts_with("web-"), "{server}");
        assert_eq!(peer, to);
    }
    // A frontend without endpoints refuses connect() at once.
    for c in [&mut host, &mut pod] {
        let a = c.ask(&format!("tcp [{empty}]:80")).unwrap();
        let w: Vec<&str> = a.split_whitespace().collect();
        assert_eq!(w[..2], ["err", "111"], "ECONNREFUSED: {a}");
        let ms: u64 = w[2].parse().unwrap();
        assert!(ms < 100, "refused after {ms} ms");
    }
    assert!(reason(&agent, "sock_refused") >= 2);
    // 120 connects, two sendto, two UDP connects.
    assert!(reason(&agent, "sock_translated") >= 124);
    assert!(reason(&agent, "sock_reply_translated") >= 2);
}

/// Connected UDP sockets of the node, one to the IPv6 ClusterIP and one to
/// the IPv4 one through its mapped address, are ended (SOCK_DESTROY over
/// sock_diag's AF_INET6) when their backend leaves its family's slice, and
/// reconnect to a live backend.
#[test]
fn connected_ipv6_udp_sockets_are_ended_when_their_backend_leaves() {
    let f = Node6::new();
    let cgroup = TestCgroup::new().unwrap();
    let spec = format!(
        "  clusterIP: {DS_VIP4}\n  clusterIPs: [{DS_VIP4}, '{DS_VIP6}']\n  \
         ipFamilies: [IPv4, IPv6]\n  ipFamilyPolicy: RequireDualStack\n"
    );
    let write = |skip4: &str, skip6: &str| {
        let yaml = service("ds", &spec)
            + &f.slice_of("ds", "IPv4", |n| n != skip4)
            + &f.slice_of("ds", "IPv6", |n| n != skip6);
        f.dir.write("svc.yaml", &yaml).unwrap();
    };
    write("", "");
    let agent = Agent::start(
        &f.topo.nodes[0].ns,
        &f.dir.path,
        &["--node-name", "node-1", "--cgroup", &cgroup.flag()],
    )
    .unwrap();
    let (fe4, fe6) = (format!("{DS_VIP4}:53/UDP"), format!("[{DS_VIP6}]:53/UDP"));
    agent
        .wait_list("both families", |l| {
            listed(l, &fe4, 3) && listed(l, &fe6, 3)
        })
        .unwrap();
    let to6 = format!("[{DS_VIP6}]:53");
    let mapped = format!("[::ffff:{DS_VIP4}]:53");
    let node = &f.topo.nodes[0].ns;
    let mut c6 = HostClient::start(Path::new(CLIENT), node, &cgroup).unwrap();
    let mut c4 = HostClient::start(Path::new(CLIENT), node, &cgroup).unwrap();
    let mut first = vec![];
    for (c, to) in [(&mut c6, &to6), (&mut c4, &mapped)] {
        assert_eq!(
            c.ask(&format!("udp-connect {to}")).unwrap(),
            format!("ok {to}")
        );
        first.push(server_and_peer(&c.ask("udp-ask").unwrap()).0);
    }
    write(&first[1], &first[0]);
    agent
        .wait_list("one backend gone from each family", |l| {
            listed(l, &fe4, 2) && listed(l, &fe6, 2)
        })
        .unwrap();
    for (c, to, gone) in [(&mut c6, &to6, &first[0]), (&mut c4, &mapped, &first[1])] {
        let error = ended(c);
        // ECONNABORTED to a reader blocked at the destroy; EDESTADDRREQ to
        // the next send, the socket being disconnected.
        assert!(
            error.starts_with("err 103") || error.starts_with("err 89"),
            "{to}: {error}"
        );
        c.ask(&format!("udp-connect {to}")).unwrap();
        let (now, peer) = server_and_peer(&c.ask("udp-ask").unwrap());
        assert_ne!(&now, gone, "{to}: reconnected to a live backend");
        assert_eq!(&peer, to);
    }
}

/// Two dual-stack nodes and an outside client: `web-1` on node-1 and
/// `web-2` on node-2 serving TCP and UDP on 8080 (IPv6), pod `c1` on
/// node-1, and an agent on each node.
struct TwoNodes6 {
    _servers: Vec<Server>,
    topo: Topology,
    dir: ManifestDir,
}

impl TwoNodes6 {
    fn new() -> Self {
        let mut topo = Topology::dual_stack().unwrap();
        topo.add_node().unwrap();
        topo.add_node().unwrap();
        topo.add_client().unwrap();
        let mut servers = vec![];
        for (name, node) in [("web-1", 0), ("web-2", 1)] {
            let k = topo.add_pod(node, name).unwrap();
            let p = &topo.pods[k];
            servers.push(Server::start(&p.ns, p.ip6.unwrap(), 8080, name).unwrap());
        }
        topo.add_pod(0, "c1").unwrap();
        Self {
            _servers: servers,
            topo,
            dir: ManifestDir::new().unwrap(),
        }
    }

    /// Writes the IPv6 NodePort Service `web6` (80/TCP as 30080, 53/UDP as
    /// 30053) with `extra_spec`, its endpoints the pods in `pods`, each with
    /// its own node as nodeName.
    fn write(&self, extra_spec: &str, pods: &[&str]) {
        let spec = format!("  type: NodePort\n  clusterIP: '{VIP6}'\n{extra_spec}");
        let svc = service("web6", &spec)
            .replace(
                "port: 80, targetPort: 8080}",
                "port: 80, targetPort: 8080, nodePort: 30080}",
            )
            .replace(
                "port: 53, targetPort: 8080}",
                "port: 53, targetPort: 8080, nodePort: 30053}",
            );
        let mut eps = String::new();
        for name in pods {
            let p = self.topo.pod(name);
            eps.push_str(&format!(
                "- {{addresses: ['{}'], nodeName: node-{}, conditions: {{ready: true}}}}\n",
                p.ip6.unwrap(),
                p.node + 1
            ));
        }
        let slice = format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
             metadata: {{name: web6-ipv6, labels: {{kubernetes.io/service-name: web6}}}}\n\
             addressType: IPv6\n\
             ports: [{{name: http, port: 8080, protocol: TCP}}, {{name: dns, port: 8080, protocol: UDP}}]\n\
             endpoints:\n{eps}"
        );
        self.dir.write("svc.yaml", &(svc + &slice)).unwrap();
    }

    fn start_agents(&self) -> Vec<Agent> {
        self.start_agents_with(&[])
    }

    /// The agents, node-1's with `node1_flags` added.
    fn start_agents_with(&self, node1_flags: &[&str]) -> Vec<Agent> {
        (0..2)
            .map(|i| {
                let node = format!("node-{}", i + 1);
                let mut args = vec!["--node-name", &node];
                if i == 0 {
                    args.extend_from_slice(node1_flags);
                }
                Agent::start(&self.topo.nodes[i].ns, &self.dir.path, &args).unwrap()
            })
            .collect()
    }

    fn node6(&self, i: usize) -> Ipv6Addr {
        self.topo.nodes[i].ip6.unwrap()
    }

    fn outside(&self) -> &Netns {
        &self.topo.clients[0].ns
    }
}

/// `n` TCP requests from `ns` to `to` on new connections: each answer's
/// server and the source it saw.
fn ask_all(ns: &Netns, to: SocketAddr, n: usize) -> Vec<(String, IpAddr)> {
    ns.within(move || {
        (0..n)
            .map(|i| {
                let r =
                    traffic::tcp_ask(to, T).unwrap_or_else(|e| panic!("request {i} to {to}: {e}"));
                (r.server, r.seen_from.ip())
            })
            .collect()
    })
    .unwrap()
}

/// Policy Cluster: an outside client on node-1's IPv6 address reaches the
/// only backend, on node-2, source-NATed to node-1's IPv6 address (the
/// agent's choice: node-1's address on its external interface), over TCP
/// and UDP; node-2 itself serves it with the client's address kept.
#[test]
fn ipv6_node_port_to_a_backend_on_another_node_is_source_nated_to_the_node() {
    let f = TwoNodes6::new();
    f.write("", &["web-2"]);
    let agents = f.start_agents();
    for a in &agents {
        a.wait_list("the IPv6 NodePort", |l| listed(l, "[*]:30080/TCP", 1))
            .unwrap();
    }
    let client6: IpAddr = f.topo.clients[0].ip6.unwrap().into();
    let via1 = SocketAddr::new(f.node6(0).into(), 30080);
    for (server, seen) in ask_all(f.outside(), via1, 20) {
        assert_eq!(server, "web-2");
        assert_eq!(
            seen,
            IpAddr::from(f.node6(0)),
            "a remote backend sees node-1's IPv6 address"
        );
    }
    let udp_to = SocketAddr::new(f.node6(0).into(), 30053);
    let (reply, from) = f
        .outside()
        .within(move || traffic::udp_ask(udp_to, T))
        .unwrap()
        .expect("a UDP reply through node-1's IPv6 NodePort");
    assert_eq!(reply.server, "web-2");
    assert_eq!(reply.seen_from.ip(), IpAddr::from(f.node6(0)));
    assert_eq!(from, udp_to, "the reply comes from the NodePort");
    let via2 = SocketAddr::new(f.node6(1).into(), 30080);
    for (server, seen) in ask_all(f.outside(), via2, 5) {
        assert_eq!(
            (server.as_str(), seen),
            ("web-2", client6),
            "local: client kept"
        );
    }
    assert_eq!(reason(&agents[0], "snat_failed"), 0);
    assert!(reason(&agents[0], "reply_translated") >= 20);
}

/// The XDP fast path carries IPv6 as it does IPv4: with `--xdp` on node-1
/// (wires emulated, as XDP sees raw frames), an outside client's TCP and
/// UDP through node-1's IPv6 NodePort reach the only backend, on node-2,
/// source-NATed to node-1's IPv6 address, and XDP sent the requests and
/// replies back out of eth0 rather than handing them to tc.
fn ipv6_node_port_to_a_remote_backend_is_forwarded_by_xdp(xdp: &'static str) {
    let f = TwoNodes6::new();
    f.topo.emulate_wires().unwrap();
    f.write("", &["web-2"]);
    let agents = f.start_agents_with(&["--xdp", xdp]);
    agents[0]
        .wait_list("the IPv6 NodePort", |l| listed(l, "[*]:30080/TCP", 1))
        .unwrap();
    let node1 = IpAddr::from(f.node6(0));
    let via1 = SocketAddr::new(node1, 30080);
    for (server, seen) in ask_all(f.outside(), via1, 20) {
        assert_eq!((server.as_str(), seen), ("web-2", node1));
    }
    let udp_to = SocketAddr::new(node1, 30053);
    for _ in 0..5 {
        let (reply, from) = f
            .outside()
            .within(move || traffic::udp_ask(udp_to, T))
            .unwrap()
            .expect("a UDP reply through node-1's IPv6 NodePort");
        assert_eq!(
            (reply.server.as_str(), reply.seen_from.ip()),
            ("web-2", node1)
        );
        assert_eq!(from, udp_to, "the reply comes from the NodePort");
    }
    let a = &agents[0];
    let sent = reason(a, "xdp_tx") + reason(a, "xdp_redirect");
    let passed = reason(a, "xdp_passed_to_tc");
    assert!(sent > 0, "--xdp {xdp}: nothing went out through XDP");
    // Only packets meeting a neighbour not yet resolved go to tc.
    assert!(
        passed * 4 < sent,
        "--xdp {xdp}: {passed} packets passed to tc, {sent} sent by XDP"
    );
    // Both directions: the matches XDP counts as events.
    assert!(reason(a, "ct_hit") > 0 && reason(a, "reply_translated") > 0);
    assert_eq!(reason(a, "snat_failed"), 0);
    assert_eq!(reason(a, "rewrite_failed"), 0);
}

integration_tests::tests_in_modes!([xdp_native = "native", xdp_generic = "generic"] {
    ipv6_node_port_to_a_remote_backend_is_forwarded_by_xdp,
});

/// An IPv6 `--node-ip` is node-1's IPv6 SNAT source (here a second address
/// on its external interface, not the one the agent would pick itself) and
/// the only IPv6 address its NodePorts answer on.
#[test]
fn an_ipv6_node_ip_is_the_snat_source_and_where_ipv6_node_ports_answer() {
    let f = TwoNodes6::new();
    let extra: Ipv6Addr = "fd00:77::99".parse().unwrap();
    f.topo.nodes[0]
        .ns
        .add_addr6(&format!("{extra}/64"), "eth0")
        .unwrap();
    f.write("", &["web-2"]);
    let fixed = extra.to_string();
    let agents = f.start_agents_with(&["--node-ip", &fixed]);
    agents[0]
        .wait_list("the IPv6 NodePort", |l| listed(l, "[*]:30080/TCP", 1))
        .unwrap();
    let to = SocketAddr::new(extra.into(), 30080);
    for (server, seen) in ask_all(f.outside(), to, 10) {
        assert_eq!((server.as_str(), seen), ("web-2", IpAddr::from(extra)));
    }
    // node-1's other IPv6 address is no NodePort address now: the kernel
    // answers for it, and nothing listens there.
    let other = SocketAddr::new(f.node6(0).into(), 30080);
    let r = f
        .outside()
        .within(move || traffic::tcp_ask(other, T))
        .unwrap();
    assert_eq!(
        r.map(|r| r.server).unwrap_err().kind(),
        std::io::ErrorKind::ConnectionRefused
    );
}

/// Policy Local with the only endpoint on node-1: through node-1 it sees
/// the outside client's own IPv6 address; node-2 has no local endpoint and
/// drops (no answer, no reset), never forwarding to node-1.
#[test]
fn ipv6_node_port_with_local_policy_keeps_the_client_and_does_not_forward() {
    let f = TwoNodes6::new();
    f.write("  externalTrafficPolicy: Local\n", &["web-1"]);
    let agents = f.start_agents();
    agents[0]
        .wait_list("the local endpoint", |l| listed(l, "[*]:30080/TCP", 1))
        .unwrap();
    agents[1]
        .wait_list("no local endpoint", |l| {
            l.contains("[*]:30080/TCP -> (no endpoints")
        })
        .unwrap();
    let client6: IpAddr = f.topo.clients[0].ip6.unwrap().into();
    let via1 = SocketAddr::new(f.node6(0).into(), 30080);
    for (server, seen) in ask_all(f.outside(), via1, 20) {
        assert_eq!((server.as_str(), seen), ("web-1", client6));
    }
    let via2 = SocketAddr::new(f.node6(1).into(), 30080);
    let r = f
        .outside()
        .within(move || traffic::tcp_ask(via2, Duration::from_millis(700)))
        .unwrap();
    assert_eq!(
        r.map(|r| r.server).unwrap_err().kind(),
        std::io::ErrorKind::TimedOut,
        "dropped, not rejected and not forwarded"
    );
    assert!(reason(&agents[1], "no_local_endpoint") >= 1);
    assert_eq!(reason(&agents[1], "snat_failed"), 0);
}

/// ClientIP affinity on an IPv6 ClusterIP: a pod's 20 connections all reach
/// one of three backends.
#[test]
fn ipv6_client_ip_affinity_holds_a_pod_to_one_backend() {
    let f = Node6::new();
    let spec = format!(
        "  clusterIP: '{VIP6}'\n  sessionAffinity: ClientIP\n  \
         sessionAffinityConfig: {{clientIP: {{timeoutSeconds: 60}}}}\n"
    );
    f.dir
        .write(
            "svc.yaml",
            &(service("web6", &spec) + &f.slice("web6", "IPv6")),
        )
        .unwrap();
    let agent = f.start_agent();
    let frontend = format!("[{VIP6}]:80/TCP");
    agent
        .wait_list("affinity on three backends", |l| {
            listed(l, &frontend, 3) && l.contains("affinity ClientIP 60s")
        })
        .unwrap();
    let client = f.topo.pod("client");
    let counts = spread(
        &client.ns,
        SocketAddr::new(VIP6.into(), 80),
        client.ip6.unwrap().into(),
        20,
    );
    assert_eq!(counts.len(), 1, "one backend for the client: {counts:?}");
    assert_eq!(counts.values().sum::<usize>(), 20);
}

/// Hairpin over IPv6: a pod that is the only endpoint of an IPv6 ClusterIP
/// reaches itself through it, over TCP and UDP (its request arrives from
/// the ClusterIP, so it answers through the dataplane).
#[test]
fn an_ipv6_pod_reaches_itself_through_its_cluster_ip() {
    let f = Node6::new();
    let spec = format!("  clusterIP: '{VIP6}'\n");
    f.dir
        .write(
            "svc.yaml",
            &(service("web6", &spec) + &f.slice_of("web6", "IPv6", |n| n == "web-1")),
        )
        .unwrap();
    let agent = f.start_agent();
    agent
        .wait_list("one backend", |l| listed(l, &format!("[{VIP6}]:80/TCP"), 1))
        .unwrap();
    let me = f.topo.pod("web-1");
    let tcp_to = SocketAddr::new(VIP6.into(), 80);
    let udp_to = SocketAddr::new(VIP6.into(), 53);
    let (tcp, udp) = me
        .ns
        .within(move || (traffic::tcp_ask(tcp_to, T), traffic::udp_ask(udp_to, T)))
        .unwrap();
    let tcp = tcp.expect("hairpin TCP over IPv6");
    assert_eq!(tcp.server, "web-1");
    assert_eq!(
        tcp.seen_from.ip(),
        IpAddr::from(VIP6),
        "the request arrives from the ClusterIP, not from the pod itself"
    );
    let (udp, from) = udp.expect("hairpin UDP over IPv6");
    assert_eq!(udp.server, "web-1");
    assert_eq!(from, udp_to);
}
