//! ClusterIP end to end: a client pod, backend pods and the node in network
//! namespaces, the agent in the node namespace, real TCP and UDP.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use integration_tests::{
    fixture::{self, OneNode, Running, T, VIP},
    manifests,
    traffic::{self, HeldConnection, UdpFlow},
};

/// A node with a client pod `client` and backend pods `web-1..=web-<backends>`
/// (all serving on 8080), and a Service `web` on VIP:80 (TCP, targetPort by
/// name) and VIP:53 (UDP) selecting the first `ready` of them.
fn fixture(backends: usize, ready: usize) -> Running {
    OneNode::new(backends, ready)
        .unwrap()
        .start(
            &[("http", "TCP", 80, "http"), ("dns", "UDP", 53, "8080")],
            &["--node-name", "node-1"],
        )
        .unwrap()
}

fn backends_listed(list: &str, n: usize) -> bool {
    list.lines()
        .find(|l| l.starts_with("10.96.0.10:80/TCP"))
        .is_some_and(|l| l.matches(":8080").count() == n)
}

#[test]
fn tcp_connections_spread_over_ready_backends_and_keep_the_client_address() {
    let f = fixture(3, 3);
    let client = f.topo.pod("client");
    let client_ip = client.ip;
    let counts = client
        .ns
        .within(move || {
            let mut counts: BTreeMap<String, usize> = BTreeMap::new();
            for _ in 0..300 {
                let r = traffic::tcp_ask(SocketAddrV4::new(VIP, 80), T)
                    .expect("connection through the ClusterIP");
                assert_eq!(
                    r.seen_from.ip(),
                    client_ip,
                    "the backend sees the client pod's own address"
                );
                *counts.entry(r.server).or_default() += 1;
            }
            counts
        })
        .unwrap();
    assert_eq!(counts.len(), 3, "all three backends served: {counts:?}");
    for (name, n) in &counts {
        assert!(
            *n >= 60,
            "{name} got {n} of 300 connections, under 20%: {counts:?}"
        );
    }
}

#[test]
fn udp_request_gets_a_reply_from_the_service_address() {
    let f = fixture(3, 3);
    let client = f.topo.pod("client");
    let (reply, from) = client
        .ns
        .within(|| traffic::udp_ask(SocketAddrV4::new(VIP, 53), T))
        .unwrap()
        .expect("UDP reply through the ClusterIP");
    assert!(reply.server.starts_with("web-"), "{reply:?}");
    assert_eq!(
        from,
        SocketAddrV4::new(VIP, 53).into(),
        "the reply comes from ClusterIP:port"
    );
    assert_eq!(reply.seen_from.ip(), client.ip);
}

#[test]
fn list_shows_what_the_manifests_say_and_skips_not_ready_pods() {
    let f = fixture(3, 2);
    let list = f
        .agent
        .wait_list("two backends", |l| backends_listed(l, 2))
        .unwrap();
    let web1 = f.topo.pod("web-1").ip;
    let web2 = f.topo.pod("web-2").ip;
    let want_tcp = format!("10.96.0.10:80/TCP -> {web1}:8080, {web2}:8080");
    let want_udp = format!("10.96.0.10:53/UDP -> {web1}:8080, {web2}:8080");
    assert!(list.contains(&want_tcp), "{list}");
    assert!(list.contains(&want_udp), "{list}");
    assert!(
        !list.contains(&f.topo.pod("web-3").ip.to_string()),
        "not-ready pod listed:\n{list}"
    );
    // bpftool prints the BTF field names of the pinned maps.
    let dump = std::process::Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(f.agent.pin_dir.join("SERVICES"))
        .output()
        .unwrap();
    let dump = String::from_utf8_lossy(&dump.stdout);
    for field in [
        "\"addr\"",
        "\"port\"",
        "\"slot\"",
        "\"backend_id\"",
        "\"count\"",
        "\"svc_id\"",
    ] {
        assert!(dump.contains(field), "bpftool dump lacks {field}:\n{dump}");
    }
}

#[test]
fn a_long_connection_keeps_its_backend_while_the_service_scales() {
    let f = fixture(5, 3);
    let client = f.topo.pod("client");
    let mut held = HeldConnection::open(&client.ns, SocketAddrV4::new(VIP, 80)).unwrap();
    let first = held.ask().unwrap().server;
    let serving: usize = first[4..].parse().unwrap();
    // 3 -> 5 backends.
    f.write_pods(|_| true).unwrap();
    f.agent
        .wait_list("five backends", |l| backends_listed(l, 5))
        .unwrap();
    assert_eq!(held.ask().unwrap().server, first);
    // 5 -> 1 backend: keep only the one serving the held connection.
    f.write_pods(|i| i == serving).unwrap();
    f.agent
        .wait_list("one backend", |l| backends_listed(l, 1))
        .unwrap();
    for _ in 0..5 {
        assert_eq!(
            held.ask().unwrap().server,
            first,
            "the held connection stays on its backend"
        );
    }
    // New connections now all land on the remaining backend.
    let r = fixture::ask_from(client, SocketAddrV4::new(VIP, 80)).unwrap();
    assert_eq!(r.server, first);
}

#[test]
fn a_client_looping_while_backends_scale_sees_no_failure() {
    let f = fixture(5, 3);
    let client = f.topo.pod("client");
    let looping = fixture::loop_from(client, false, Duration::from_secs(6), 5000);
    for ready in [5, 1, 4, 2, 3] {
        std::thread::sleep(Duration::from_millis(800));
        f.write_pods(|i| i <= ready).unwrap();
        f.agent
            .wait_list("scaled", |l| backends_listed(l, ready))
            .unwrap();
    }
    looping
        .join()
        .unwrap()
        .assert_clean(50, "connections while backends scale");
}

#[test]
fn a_service_without_ready_endpoints_refuses_at_once() {
    let f = fixture(2, 0);
    let client = f.topo.pod("client");
    f.agent
        .wait_list("rejecting frontend", |l| {
            l.contains("10.96.0.10:80/TCP -> (no endpoints: rejects)")
        })
        .unwrap();
    let started = Instant::now();
    let tcp = fixture::ask_from(client, SocketAddrV4::new(VIP, 80));
    let err = tcp.expect_err("no endpoint: the connection must fail");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    let udp = client
        .ns
        .within(|| traffic::udp_ask(SocketAddrV4::new(VIP, 53), T))
        .unwrap();
    let err = udp.expect_err("no endpoint: UDP must get port unreachable");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refusals took {:?}",
        started.elapsed()
    );
    let stats = f.agent.cli("stats", &["-o", "json"]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert!(
        v["reasons"]["rejected_no_backend"].as_u64().unwrap() >= 2,
        "{stats}"
    );
}

#[test]
fn a_pod_reaching_itself_through_its_service_gets_the_reply() {
    let f = fixture(1, 1);
    let me = f.topo.pod("web-1");
    for _ in 0..5 {
        let r = fixture::ask_from(me, SocketAddrV4::new(VIP, 80)).expect("hairpin connection");
        assert_eq!(r.server, "web-1");
        let (u, from) = me
            .ns
            .within(|| traffic::udp_ask(SocketAddrV4::new(VIP, 53), T))
            .unwrap()
            .expect("hairpin UDP");
        assert_eq!(u.server, "web-1");
        assert_eq!(from, SocketAddrV4::new(VIP, 53).into());
    }
}

/// A client port used through the ClusterIP and then directly towards the
/// backend that served it (ports are reused): the backend sees one tuple
/// (client:port <-> backend:8080) for both, so the direct connection's
/// replies must reach the client from the backend's own address, not be
/// taken for replies of the closed ClusterIP flow. The other order too.
#[test]
fn a_client_port_reused_directly_to_its_backend_gets_the_backends_own_replies() {
    let f = fixture(2, 2);
    let client = f.topo.pod("client");
    let backends: Vec<(String, Ipv4Addr)> = ["web-1", "web-2"]
        .map(|n| (n.to_string(), f.topo.pod(n).ip))
        .into();
    let client_ip = client.ip;
    client
        .ns
        .within(move || {
            let me = |port| SocketAddrV4::new(client_ip, port);
            let at = |name: &str| {
                let (_, ip) = backends.iter().find(|(n, _)| n == name).unwrap();
                SocketAddrV4::new(*ip, 8080)
            };
            let (vip_tcp, vip_udp) = (SocketAddrV4::new(VIP, 80), SocketAddrV4::new(VIP, 53));
            // Lets the backend finish closing the previous connection, so a
            // SYN on its tuple meets no socket still in CLOSE_WAIT.
            let settle = || std::thread::sleep(Duration::from_millis(200));

            // TCP: through the ClusterIP, then directly, from port 41000.
            let through =
                traffic::tcp_ask_from(me(41000), vip_tcp, T).expect("TCP through the ClusterIP");
            settle();
            let direct = traffic::tcp_ask_from(me(41000), at(&through.server), T)
                .expect("TCP directly to the backend that served, from the same port");
            assert_eq!(direct.server, through.server);
            assert_eq!(direct.seen_from, me(41000).into());

            // UDP: through the ClusterIP, then directly, from port 41001.
            let (through, from) =
                traffic::udp_ask_from(me(41001), vip_udp, T).expect("UDP through the ClusterIP");
            assert_eq!(from, vip_udp.into());
            let backend = at(&through.server);
            let (direct, from) = traffic::udp_ask_from(me(41001), backend, T)
                .expect("UDP directly to the backend that served, from the same port");
            assert_eq!(direct.server, through.server);
            assert_eq!(
                from,
                backend.into(),
                "the answer comes from the backend itself"
            );

            // The other order: directly to both backends, then through the
            // ClusterIP (whichever backend it picks, its tuple was used),
            // from ports 41002 (TCP) and 41003 (UDP).
            for b in ["web-1", "web-2"] {
                traffic::tcp_ask_from(me(41002), at(b), T).expect("TCP directly to a backend");
                traffic::udp_ask_from(me(41003), at(b), T).expect("UDP directly to a backend");
            }
            settle();
            let after = traffic::tcp_ask_from(me(41002), vip_tcp, T)
                .expect("TCP through the ClusterIP from a port used directly");
            assert_eq!(after.seen_from, me(41002).into());
            let (_, from) = traffic::udp_ask_from(me(41003), vip_udp, T)
                .expect("UDP through the ClusterIP from a port used directly");
            assert_eq!(from, vip_udp.into());
        })
        .unwrap();
    assert_eq!(
        f.agent.reason("reused_tuple_retired").unwrap(),
        2,
        "the TCP and the UDP ClusterIP flow were retired, once each"
    );
}

#[test]
fn a_bad_manifest_is_reported_and_the_previous_state_keeps_serving() {
    let f = fixture(3, 3);
    let before = f
        .agent
        .wait_list("three backends", |l| backends_listed(l, 3))
        .unwrap();
    f.dir
        .write("svc.yaml", "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{port: eighty}]\n")
        .unwrap();
    let after = f
        .agent
        .wait_list("the problem reported", |l| l.contains("problem:"))
        .unwrap();
    assert!(
        after.contains("svc.yaml document 1 (Service default/web): field spec.ports[0].port"),
        "{after}"
    );
    let programmed = |l: &str| {
        l.lines()
            .filter(|x| x.contains(" -> "))
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    assert_eq!(programmed(&before), programmed(&after));
    let client = f.topo.pod("client");
    let r = fixture::ask_from(client, SocketAddrV4::new(VIP, 80));
    assert!(r.is_ok(), "still serving: {r:?}");
    // A Service the dataplane cannot express keeps its previous state too.
    f.dir
        .write(
            "svc.yaml",
            &manifests::service(
                "web",
                "web",
                "10.96.0.10",
                &[("http", "TCP", 80, "70000")],
                "",
            ),
        )
        .unwrap();
    let l = f
        .agent
        .wait_list("range problem", |l| l.contains("spec.ports[0].targetPort"))
        .unwrap();
    assert_eq!(programmed(&before), programmed(&l), "{l}");
}

#[test]
fn udp_clients_move_off_a_removed_backend() {
    let f = fixture(3, 3);
    let client = f.topo.pod("client");
    let flow = UdpFlow::open(&client.ns, SocketAddrV4::new(VIP, 53)).unwrap();
    let first = flow.ask().unwrap().server;
    for _ in 0..3 {
        assert_eq!(
            flow.ask().unwrap().server,
            first,
            "a UDP flow sticks to its backend"
        );
    }
    // Take the flow's backend out of the Service (the pod keeps running, as a
    // terminating pod would): the next datagram must reach a remaining backend.
    let gone: usize = first[4..].parse().unwrap();
    let log_from = std::fs::metadata(&f.agent.log).map_or(0, |m| m.len()) as usize;
    f.write_pods(|i| i != gone).unwrap();
    f.agent
        .wait_list("two backends", |l| backends_listed(l, 2))
        .unwrap();
    // `list` shows the new slots as soon as they are written; the flow's
    // conntrack entries go at the end of the same sync, which its log line
    // reports.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&f.agent.log)
        .unwrap_or_default()
        .get(log_from..)
        .is_some_and(|t| {
            t.lines()
                .any(|l| l.contains("maps synced") && !l.contains("udp_flows_flushed=0"))
        })
    {
        assert!(
            Instant::now() < deadline,
            "no sync flushed the flow: {}",
            f.agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for _ in 0..5 {
        let r = flow.ask().unwrap();
        assert_ne!(
            r.server, first,
            "the UDP flow still goes to the removed backend"
        );
    }
}

#[test]
fn pods_created_after_the_agent_started_are_served() {
    let mut f = fixture(1, 1);
    let k = f.node.topo.add_pod(0, "late").unwrap();
    let late = &f.topo.pods[k];
    f.agent
        .wait_list("attached", |_| {
            f.agent
                .log_text()
                .contains(&format!("attached tc ingress iface={}", late.host_if))
        })
        .unwrap();
    let r = fixture::ask_from(late, SocketAddrV4::new(VIP, 80))
        .expect("the new pod reaches the Service");
    assert_eq!(r.server, "web-1");
}

/// GET on the agent's metrics address, from inside the node namespace.
fn http_get_local(f: &Running, path: &str) -> (u16, String) {
    let path = path.to_string();
    f.topo.nodes[0]
        .ns
        .within(move || {
            traffic::http_request(
                service_agent::cli::DEFAULT_METRICS_ADDR.parse().unwrap(),
                &path,
                T,
            )
        })
        .unwrap()
        .unwrap()
}

#[test]
fn metrics_health_and_readiness_are_served() {
    let f = fixture(3, 3);
    let client = f.topo.pod("client");
    client
        .ns
        .within(|| {
            for _ in 0..10 {
                traffic::tcp_ask(SocketAddrV4::new(VIP, 80), T).unwrap();
            }
        })
        .unwrap();
    assert_eq!(http_get_local(&f, "/readyz").0, 200);
    assert_eq!(http_get_local(&f, "/healthz").0, 200);
    let (code, text) = http_get_local(&f, "/metrics");
    assert_eq!(code, 200);
    for want in [
        "service_agent_frontends_programmed 2",
        "service_agent_backends_programmed 6",
        "service_agent_sync_proxy_rules_duration_seconds_count",
        "service_agent_network_programming_duration_seconds_bucket",
        "service_agent_map_entries{map=\"SERVICES\"} 8",
        "service_agent_map_capacity{map=\"CONNTRACK\"}",
        "service_agent_packets_by_reason_total{reason=\"new_flow\",verdict=\"translated\"} 10",
    ] {
        assert!(
            text.contains(want),
            "{want:?} missing from /metrics:\n{text}"
        );
    }
    let packets = text
        .lines()
        .find(|l| {
            l.starts_with("service_agent_frontend_packets_total{")
                && l.contains("10.96.0.10:80/TCP")
        })
        .unwrap_or_else(|| panic!("no per-frontend packets:\n{text}"));
    let n: u64 = packets.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= 40, "{packets}");
    assert!(packets.contains("service=\"default/web\""), "{packets}");
    assert!(packets.contains("ip_family=\"IPv4\""), "{packets}");
}

#[test]
fn large_udp_datagrams_are_fragmented_and_reach_one_backend_whole() {
    let f = fixture(3, 3);
    let client = f.topo.pod("client");
    let results = client
        .ns
        .within(|| {
            (0..20)
                .map(|_| traffic::udp_ask_big(SocketAddrV4::new(VIP, 53), 4000, T))
                .collect::<Vec<_>>()
        })
        .unwrap();
    let mut servers = std::collections::BTreeSet::new();
    for r in results {
        let (reply, len) =
            r.expect("a 4000-byte datagram through the ClusterIP and a 4000-byte reply");
        assert_eq!(len, 4000);
        servers.insert(reply.server);
    }
    assert!(servers.len() >= 2, "{servers:?}");
    let stats = f.agent.cli("stats", &["-o", "json"]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert!(
        v["reasons"]["fragment_translated"].as_u64().unwrap() >= 40,
        "{stats}"
    );
}

/// `service-agent stats | head -3` and the like: a reader that stops early
/// ends the command by SIGPIPE, as any filter, with nothing on stderr (no
/// panic about a broken pipe).
#[test]
fn inspection_commands_end_quietly_on_a_closed_pipe() {
    use std::os::unix::process::ExitStatusExt as _;
    let f = fixture(2, 2);
    for (sub, extra) in [
        ("list", vec![]),
        ("stats", vec![]),
        ("stats", vec!["--output", "json"]),
        ("dump", vec!["SERVICES"]),
    ] {
        let (status, stderr) = f.agent.cli_into_closed_pipe(sub, &extra).unwrap();
        assert_eq!(
            status.signal(),
            Some(libc::SIGPIPE),
            "{sub} {extra:?}: {status}, stderr: {stderr}"
        );
        assert!(stderr.trim().is_empty(), "{sub} {extra:?}: {stderr}");
    }
}

/// How many entries CONNTRACK holds, from the fill line `list` ends with.
fn conntrack_entries(f: &Running) -> u64 {
    let list = f.agent.list().unwrap();
    let fill = list
        .split_whitespace()
        .skip_while(|w| *w != "CONNTRACK")
        .nth(1)
        .unwrap_or_else(|| panic!("no CONNTRACK fill in:\n{list}"));
    fill.split('/').next().unwrap().parse().unwrap()
}

/// SYNs nobody answers (forged sources, a backend that is not there) hold
/// their entries for the SYN lifetime only, not the established one; an
/// established connection idle for longer than that keeps working.
#[test]
fn unanswered_syns_release_their_entries_within_the_syn_lifetime() {
    let f = OneNode::new(1, 1)
        .unwrap()
        .start(
            &[("http", "TCP", 80, "http")],
            &["--node-name", "node-1", "--conntrack-tcp-timeout-syn", "2"],
        )
        .unwrap();
    // A Service whose one endpoint does not exist: nothing answers its SYNs.
    let void = std::net::Ipv4Addr::new(10, 96, 0, 30);
    f.dir
        .write(
            "void.yaml",
            &format!(
                r#"apiVersion: v1
kind: Service
metadata: {{name: void}}
spec:
  clusterIP: {void}
  ports: [{{name: http, protocol: TCP, port: 80, targetPort: 8080}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: void
  labels: {{kubernetes.io/service-name: void}}
addressType: IPv4
ports: [{{name: http, protocol: TCP, port: 8080}}]
endpoints: [{{addresses: ["10.244.1.99"], conditions: {{ready: true}}}}]
"#
            ),
        )
        .unwrap();
    f.agent
        .wait_list("the void Service", |l| {
            l.contains("10.96.0.30:80/TCP -> 10.244.1.99")
        })
        .unwrap();
    let client = f.topo.pod("client");
    let mut held = HeldConnection::open(&client.ns, SocketAddrV4::new(VIP, 80)).unwrap();
    held.ask().unwrap();
    let before = conntrack_entries(&f);
    let to = SocketAddrV4::new(void, 80);
    let sent = client
        .ns
        .within(move || traffic::syn_flood(to, 200, Duration::from_secs(5)))
        .unwrap()
        .unwrap();
    assert_eq!(sent, 200);
    let flooded = conntrack_entries(&f);
    assert!(flooded >= before + 300, "{before} -> {flooded}");
    // The garbage collection runs every 10 s.
    let deadline = Instant::now() + Duration::from_secs(30);
    while conntrack_entries(&f) > before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
    }
    let after = conntrack_entries(&f);
    assert!(
        after <= before,
        "entries left: {before} -> {flooded} -> {after}"
    );
    // Idle well past the SYN lifetime, the established connection lives on.
    assert_eq!(held.ask().unwrap().server, "web-1");
}
