//! The Kubernetes API source against an API server double that speaks the
//! list/watch protocol: initial sync, changes, watch closed, 410 Gone with a
//! relist that catches a lost delete, and the server away for a while.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use integration_tests::{
    agent::Agent,
    apiserver::{self, ApiServer, Kind},
    fixture::OneNode,
    topology::Topology,
    traffic,
};

const T: Duration = Duration::from_secs(3);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

struct Setup {
    agent: Agent,
    api: ApiServer,
    node: OneNode,
}

impl std::ops::Deref for Setup {
    type Target = OneNode;
    fn deref(&self) -> &OneNode {
        &self.node
    }
}

fn backends(topo: &Topology, names: &[&str]) -> Vec<Ipv4Addr> {
    names.iter().map(|n| topo.pod(n).ip).collect()
}

/// One node with a client pod and web-1..3; the API server double (in the
/// node namespace) already holds Service `web` with web-1 and web-2.
fn setup() -> Setup {
    // The Pods of its manifest directory go unread: the API is the source.
    let node = OneNode::new(3, 3).unwrap();
    let api = api_with_web(&node, &["web-1", "web-2"]);
    let mut agent = Agent::start_kube(
        &node.topo.nodes[0].ns,
        api.kubeconfig(),
        &["--node-name", "node-1"],
    )
    .unwrap();
    agent
        .wait_log_from(0, "agent running", Duration::from_secs(30))
        .unwrap();
    Setup { agent, api, node }
}

/// The API server double in the node namespace, holding node-1 and Service
/// `web` with the pods `names` as its endpoints.
fn api_with_web(node: &OneNode, names: &[&str]) -> ApiServer {
    let topo = &node.topo;
    let api = ApiServer::start(&topo.nodes[0].ns).unwrap();
    api.apply(Kind::Node, apiserver::node("node-1", "zone-a"));
    api.apply(
        Kind::Service,
        apiserver::service("shop", "web", &VIP.to_string(), 80, "TCP"),
    );
    api.apply(
        Kind::EndpointSlice,
        apiserver::endpoint_slice("shop", "web", "a", &backends(topo, names), "TCP"),
    );
    api
}

/// Service web's one EndpointSlice now lists the pods `names`.
fn web_endpoints(s: &Setup, names: &[&str]) {
    s.api.apply(
        Kind::EndpointSlice,
        apiserver::endpoint_slice("shop", "web", "a", &backends(&s.topo, names), "TCP"),
    );
}

fn line_for(list: &str, frontend: &str) -> String {
    list.lines()
        .find(|l| l.starts_with(frontend))
        .unwrap_or_default()
        .to_string()
}

fn served_by(s: &Setup) -> std::collections::BTreeSet<String> {
    s.topo
        .pod("client")
        .ns
        .within(|| {
            (0..30)
                .map(|_| {
                    traffic::tcp_ask(SocketAddrV4::new(VIP, 80), T)
                        .unwrap()
                        .server
                })
                .collect()
        })
        .unwrap()
}

#[test]
fn initial_sync_then_adds_modifies_and_deletes_follow_the_api() {
    let s = setup();
    let l = s.agent.list().unwrap();
    let line = line_for(&l, "10.96.0.10:80/TCP");
    assert_eq!(line.matches(":8080").count(), 2, "{l}");
    assert!(line.contains("# shop/web port p"), "{l}");
    assert!(s.agent.log_text().contains("initial lists complete"));
    assert_eq!(served_by(&s).len(), 2);

    // Modify: a third endpoint.
    web_endpoints(&s, &["web-1", "web-2", "web-3"]);
    s.agent
        .wait_list("three", |l| {
            line_for(l, "10.96.0.10:80/TCP").matches(":8080").count() == 3
        })
        .unwrap();
    assert_eq!(served_by(&s).len(), 3);
    // Add a Service, then delete it.
    s.api.apply(
        Kind::Service,
        apiserver::service("shop", "dns", "10.96.0.53", 53, "UDP"),
    );
    s.api.apply(
        Kind::EndpointSlice,
        apiserver::endpoint_slice("shop", "dns", "a", &backends(&s.topo, &["web-3"]), "UDP"),
    );
    s.agent
        .wait_list("dns", |l| {
            line_for(l, "10.96.0.53:53/UDP").contains(":8080")
        })
        .unwrap();
    s.api.delete(Kind::Service, "shop", "dns");
    s.agent
        .wait_list("dns gone", |l| !l.contains("10.96.0.53"))
        .unwrap();
}

#[test]
fn closed_watches_and_expired_history_are_recovered_and_lost_deletes_caught() {
    let s = setup();
    s.api.close_watches();
    web_endpoints(&s, &["web-3"]);
    s.agent
        .wait_list("after reconnect", |l| {
            line_for(l, "10.96.0.10:80/TCP").matches(":8080").count() == 1
        })
        .unwrap();

    // A delete the agent never hears of, then the history expires: the
    // watcher gets 410 Gone, relists, and the relist shows the Service gone.
    let lists_before = s.api.lists();
    s.api.delete_silently(Kind::Service, "shop", "web");
    s.api.expire_history();
    s.agent
        .wait_list("relisted", |l| !l.contains("10.96.0.10:80/TCP"))
        .unwrap();
    assert!(s.api.lists() > lists_before, "a relist happened");
}

#[test]
fn the_dataplane_keeps_serving_while_the_api_server_is_away() {
    let s = setup();
    s.api.set_down(true);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(served_by(&s).len(), 2, "traffic still served from the maps");
    let l = s.agent.list().unwrap();
    assert_eq!(
        line_for(&l, "10.96.0.10:80/TCP").matches(":8080").count(),
        2,
        "nothing dropped: {l}"
    );
    web_endpoints(&s, &["web-2", "web-3"]);
    s.api.set_down(false);
    let l = s
        .agent
        .wait_list("back", |l| {
            line_for(l, "10.96.0.10:80/TCP").contains(&format!("{}:8080", s.topo.pod("web-3").ip))
        })
        .unwrap();
    assert!(
        !l.contains(&format!("{}:8080", s.topo.pod("web-1").ip)),
        "{l}"
    );
}

#[test]
fn nothing_is_programmed_before_the_initial_lists_are_complete() {
    let node = OneNode::with_clients(&[], 0, 0).unwrap();
    let topo = &node.topo;
    let api = ApiServer::start(&topo.nodes[0].ns).unwrap();
    api.apply(
        Kind::Service,
        apiserver::service("shop", "web", &VIP.to_string(), 80, "TCP"),
    );
    api.set_down(true);
    let mut agent = Agent::start_kube(
        &topo.nodes[0].ns,
        api.kubeconfig(),
        &["--node-name", "node-1"],
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !agent.log_text().contains("agent running"),
        "{}",
        agent.log_text()
    );
    assert!(!agent.log_text().contains("maps synced"));
    api.set_down(false);
    agent
        .wait_log_from(0, "agent running", Duration::from_secs(30))
        .unwrap();
    assert!(agent.list().unwrap().contains("10.96.0.10:80/TCP"));
}

/// `--api-server` replaces the server the kubeconfig (or the in-cluster
/// environment, the `kubernetes` ClusterIP) names: a node without
/// kube-proxy reaches its API server by its real address.
#[test]
fn api_server_flag_replaces_the_configured_server() {
    let node = OneNode::new(1, 1).unwrap();
    let topo = &node.topo;
    let api = api_with_web(&node, &["web-1"]);
    // The kubeconfig names a port nothing listens on, as a ClusterIP that
    // nothing translates yet would be.
    let text = std::fs::read_to_string(api.kubeconfig()).unwrap();
    let dead = text.replace(&format!("127.0.0.1:{}", api.port), "127.0.0.1:1");
    let kubeconfig = api.kubeconfig().with_extension("dead");
    std::fs::write(&kubeconfig, dead).unwrap();
    let url = format!("http://127.0.0.1:{}", api.port);
    let mut agent = Agent::start_kube(
        &topo.nodes[0].ns,
        &kubeconfig,
        &["--node-name", "node-1", "--api-server", &url],
    )
    .unwrap();
    let started = agent.wait_log_from(0, "agent running", Duration::from_secs(30));
    let _ = std::fs::remove_file(&kubeconfig);
    started.unwrap();
    let r = topo
        .pod("client")
        .ns
        .within(|| traffic::tcp_ask(SocketAddrV4::new(VIP, 80), T))
        .unwrap()
        .unwrap();
    assert_eq!(r.server, "web-1");
}
