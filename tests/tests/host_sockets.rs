//! The node's own sockets reaching Services through the cgroup socket hooks:
//! host clients are processes in the node's network namespace, moved into a
//! cgroup the test made (the only place the hooks are attached).
use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::Path,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use integration_tests::{
    agent::{Agent, ManifestDir},
    cgroup::TestCgroup,
    host_client::HostClient,
    manifests,
    topology::Topology,
    traffic::Server,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const NODE_PORT: u16 = 30080;
const CLIENT: &str = env!("CARGO_BIN_EXE_host_client");

struct Fixture {
    // Drop order: the agent (its cleanup detaches the hooks), the servers,
    // the namespaces, the files, and the cgroup last.
    agent: Agent,
    _servers: Vec<Server>,
    topo: Topology,
    dir: ManifestDir,
    cgroup: TestCgroup,
}

/// `web` on VIP (80/TCP, 53/UDP, NodePort 30080 for 80) over web-1 and
/// web-2, and `empty` on EMPTY_VIP selecting nothing.
fn service_yaml() -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  type: NodePort
  clusterIP: {VIP}
  selector: {{app: web}}
  ports:
  - {{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: {NODE_PORT}}}
  - {{name: dns, protocol: UDP, port: 53, targetPort: 8080, nodePort: 30053}}
---
{}"#,
        manifests::service(
            "empty",
            "nothing",
            &EMPTY_VIP.to_string(),
            &[("http", "TCP", 80, "8080"), ("dns", "UDP", 53, "8080")],
            "",
        )
    )
}

fn write_pods(topo: &Topology, dir: &ManifestDir, ready: impl Fn(&str) -> bool) {
    let mut text = String::new();
    for p in topo.pods.iter().filter(|p| p.name.starts_with("web-")) {
        text.push_str(&manifests::pod(
            &p.name,
            "web",
            p.ip,
            ready(&p.name),
            "node-1",
        ));
        text.push_str("---\n");
    }
    dir.write("pods.yaml", &text).unwrap();
}

fn fixture() -> Fixture {
    let cgroup = TestCgroup::new().unwrap();
    let mut topo = Topology::new().unwrap();
    topo.add_node().unwrap();
    topo.add_pod(0, "client").unwrap();
    let mut servers = vec![];
    for name in ["web-1", "web-2"] {
        let k = topo.add_pod(0, name).unwrap();
        let p = &topo.pods[k];
        servers.push(Server::start(&p.ns, p.ip, 8080, name).unwrap());
    }
    let dir = ManifestDir::new().unwrap();
    write_pods(&topo, &dir, |_| true);
    dir.write("svc.yaml", &service_yaml()).unwrap();
    let agent = Agent::start(
        &topo.nodes[0].ns,
        &dir.path,
        &["--node-name", "node-1", "--cgroup", &cgroup.flag()],
    )
    .unwrap();
    Fixture {
        agent,
        _servers: servers,
        topo,
        dir,
        cgroup,
    }
}

impl Fixture {
    fn host_client(&self) -> HostClient {
        HostClient::start(Path::new(CLIENT), &self.topo.nodes[0].ns, &self.cgroup).unwrap()
    }

    fn stats(&self) -> serde_json::Value {
        let stats = self.agent.cli("stats", &["--output", "json"]).unwrap();
        serde_json::from_str(&stats).unwrap()
    }

    fn reason(&self, name: &str) -> u64 {
        self.stats()["reasons"][name].as_u64().unwrap_or(0)
    }

    /// The entries of one of the agent's maps, as `list` counts them.
    fn entries(&self, map: &str) -> u64 {
        let list = self.agent.cli("list", &["--output", "json"]).unwrap();
        let stats: serde_json::Value = serde_json::from_str(&list).unwrap();
        stats["maps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["map"].as_str() == Some(map))
            .unwrap_or_else(|| panic!("no map {map} in {stats}"))["entries"]
            .as_u64()
            .unwrap()
    }
}

/// `ok SERVER SEEN_FROM PEER` -> (SERVER, PEER)
fn server_and_peer(answer: &str) -> (String, String) {
    let w: Vec<&str> = answer.split_whitespace().collect();
    assert!(w.len() == 4 && w[0] == "ok", "unexpected answer {answer:?}");
    (w[1].to_string(), w[3].to_string())
}

/// No program of any test may sit on the machine's root cgroup.
fn assert_root_cgroup_untouched() {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    let root = service_agent::dataplane::cgroup::cgroup2_mount(&mounts).unwrap();
    let out = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(&root)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("svc_sock"),
        "a socket hook is attached to the root cgroup {}:\n{text}",
        root.display()
    );
}

#[test]
fn host_tcp_and_udp_reach_both_backends_and_see_the_service_address() {
    let f = fixture();
    let mut c = f.host_client();
    let mut seen = BTreeSet::new();
    for _ in 0..40 {
        let (server, peer) = server_and_peer(&c.ask(&format!("tcp {VIP}:80")).unwrap());
        assert_eq!(
            peer,
            format!("{VIP}:80"),
            "getpeername on TCP is the Service"
        );
        seen.insert(server);
    }
    assert_eq!(seen.len(), 2, "both backends serve host TCP: {seen:?}");
    // Each connection remembered the Service while it was open (getpeername
    // above) and took its entry with it when it was closed.
    assert_eq!(f.reason("sock_revnat_released"), 40);
    assert_eq!(f.entries("SOCK_REVNAT"), 0, "closed sockets left entries");
    // Unconnected UDP: the reply's source is the ClusterIP, not the pod.
    let a = c.ask(&format!("udp-sendto {VIP}:53")).unwrap();
    let w: Vec<&str> = a.split_whitespace().collect();
    assert!(w[0] == "ok" && w[1].starts_with("web-"), "{a}");
    assert_eq!(w[3], format!("{VIP}:53"), "recvfrom shows the Service: {a}");
    // Connected UDP: getpeername and the replies are the Service too.
    assert_eq!(
        c.ask(&format!("udp-connect {VIP}:53")).unwrap(),
        format!("ok {VIP}:53")
    );
    let (server, peer) = server_and_peer(&c.ask("udp-ask").unwrap());
    assert!(server.starts_with("web-"));
    assert_eq!(peer, format!("{VIP}:53"));
    // 40 connects, one sendto, one UDP connect.
    assert!(f.reason("sock_translated") >= 42);
    assert!(f.reason("sock_reply_translated") >= 1);
    // The open connected socket's entry and the sendto's (an unconnected
    // socket's entries age out of the LRU); when the client exits, its
    // connected socket's entry goes.
    assert_eq!(f.entries("SOCK_REVNAT"), 2);
    drop(c);
    assert_eq!(f.entries("SOCK_REVNAT"), 1, "the connected socket's entry");
    assert_eq!(f.reason("sock_revnat_released"), 41);
    let list = f.agent.list().unwrap();
    for hook in [
        "connect4",
        "sendmsg4",
        "recvmsg4",
        "getpeername4",
        "sock_release",
    ] {
        assert!(
            list.lines()
                .any(|l| l.contains(hook) && l.contains(&f.cgroup.flag())),
            "list names {hook} on the test cgroup:\n{list}"
        );
    }

    // A pod's process in the same cgroup is left to tc: other namespace.
    let before = f.reason("sock_translated");
    let mut pod_client =
        HostClient::start(Path::new(CLIENT), &f.topo.pod("client").ns, &f.cgroup).unwrap();
    let (_, peer) = server_and_peer(&pod_client.ask(&format!("tcp {VIP}:80")).unwrap());
    assert_eq!(
        peer,
        format!("{VIP}:80"),
        "the pod talks to the ClusterIP itself"
    );
    assert_eq!(
        f.reason("sock_translated"),
        before,
        "the hook skipped the pod"
    );
    assert_root_cgroup_untouched();
}

#[test]
fn host_reaches_its_own_node_port() {
    let f = fixture();
    let node_ip = f.topo.nodes[0].ip;
    let mut c = f.host_client();
    let (server, peer) = server_and_peer(&c.ask(&format!("tcp {node_ip}:{NODE_PORT}")).unwrap());
    assert!(server.starts_with("web-"), "{server}");
    assert_eq!(peer, format!("{node_ip}:{NODE_PORT}"));
}

/// `externalTrafficPolicy: Local` does not apply to the node's own
/// sockets: with no endpoint on this node they reach the other nodes'
/// (kube-proxy short-circuits LOCAL sources to its cluster policy chain).
#[test]
fn host_reaches_a_local_node_port_without_a_local_endpoint() {
    let f = fixture();
    let local = service_yaml().replacen(
        "type: NodePort\n",
        "type: NodePort\n  externalTrafficPolicy: Local\n",
        1,
    );
    f.dir.write("svc.yaml", &local).unwrap();
    // The backends' Pods say they run on node-2 (their namespaces stay
    // reachable from node-1, as another node's pods would be).
    let pods: String = (f.topo.pods.iter().filter(|p| p.name.starts_with("web-")))
        .map(|p| manifests::pod(&p.name, "web", p.ip, true, "node-2") + "---\n")
        .collect();
    f.dir.write("pods.yaml", &pods).unwrap();
    f.agent
        .wait_list("in-cluster set", |l| {
            l.contains(&format!("*:{NODE_PORT}/TCP -> (no endpoints"))
                && l.contains(&format!("*:{NODE_PORT}/TCP (in-cluster) -> "))
        })
        .unwrap();
    let node_ip = f.topo.nodes[0].ip;
    let mut c = f.host_client();
    let (server, peer) = server_and_peer(&c.ask(&format!("tcp {node_ip}:{NODE_PORT}")).unwrap());
    assert!(server.starts_with("web-"), "{server}");
    assert_eq!(peer, format!("{node_ip}:{NODE_PORT}"));
    assert_eq!(f.reason("sock_no_local_endpoint"), 0);
}

#[test]
fn service_without_endpoints_refuses_at_once() {
    let f = fixture();
    let mut c = f.host_client();
    c.assert_refused_at_once(EMPTY_VIP);
    assert!(f.reason("sock_refused") >= 2);
    assert_root_cgroup_untouched();
}

#[test]
fn connected_udp_socket_recovers_after_its_backend_is_removed() {
    let f = fixture();
    let mut c = f.host_client();
    c.ask(&format!("udp-connect {VIP}:53")).unwrap();
    let (first, _) = server_and_peer(&c.ask("udp-ask").unwrap());
    write_pods(&f.topo, &f.dir, |name| name != first);
    f.agent
        .wait_list("one UDP backend", |l| {
            l.lines()
                .find(|l| l.starts_with(&format!("{VIP}:53/UDP")))
                .is_some_and(|l| l.matches(":8080").count() == 1)
        })
        .unwrap();
    // The agent ends the socket; the application sees an error, not silence.
    let deadline = Instant::now() + Duration::from_secs(5);
    let error = loop {
        let a = c.ask("udp-ask").unwrap();
        if a.starts_with("err") {
            break a;
        }
        assert!(
            Instant::now() < deadline,
            "the socket kept its removed backend: {a}"
        );
        thread::sleep(Duration::from_millis(100));
    };
    // ECONNABORTED to a reader blocked at the destroy; EDESTADDRREQ to the
    // next send, the socket being disconnected.
    assert!(
        error.starts_with("err 103") || error.starts_with("err 89"),
        "{error}"
    );
    assert!(
        f.agent.log_text().contains("ended host UDP sockets"),
        "{}",
        f.agent.log_text()
    );
    c.ask(&format!("udp-connect {VIP}:53")).unwrap();
    let (now, peer) = server_and_peer(&c.ask("udp-ask").unwrap());
    assert_ne!(now, first, "reconnected to the live backend");
    assert_eq!(peer, format!("{VIP}:53"));
}

#[test]
fn agent_kill_and_restart_leaves_host_connections_alone() {
    let mut f = fixture();
    let mut c = f.host_client();
    assert!(c.ask(&format!("hold {VIP}:80")).unwrap().starts_with("ok"));
    let mut looping = f.host_client();
    looping.send(&format!("loop {VIP}:80 4000")).unwrap();
    thread::sleep(Duration::from_millis(500));
    f.agent.kill();
    thread::sleep(Duration::from_millis(500));
    assert!(
        c.ask("held").unwrap().starts_with("ok web-"),
        "held while down"
    );
    f.agent.spawn().unwrap();
    let a = looping.answer("loop").unwrap();
    let w: Vec<&str> = a.split_whitespace().collect();
    assert_eq!(w[0], "ok", "{a}");
    let (n, failed): (u64, u64) = (w[1].parse().unwrap(), w[2].parse().unwrap());
    assert!(n > 20, "only {n} connections in the loop");
    assert_eq!(failed, 0, "connections failed across the restart: {a}");
    assert!(
        c.ask("held").unwrap().starts_with("ok web-"),
        "held after restart"
    );
    assert!(
        f.agent.log_text().contains("(\"connect4\", true)"),
        "the restarted agent adopted the pinned links"
    );
    let (_, peer) = server_and_peer(&c.ask(&format!("tcp {VIP}:80")).unwrap());
    assert_eq!(peer, format!("{VIP}:80"));

    // Restarted with --cgroup none, the agent takes its hooks away.
    f.agent.kill();
    f.agent.set_flag("--cgroup", "none");
    f.agent.spawn().unwrap();
    assert!(
        f.agent
            .list()
            .unwrap()
            .contains("host socket hooks: not attached"),
        "{}",
        f.agent.list().unwrap()
    );
    let out = Command::new("bpftool")
        .args(["cgroup", "show", &f.cgroup.flag()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("svc_sock"), "still attached:\n{text}");
}
