//! Taking over from kube-proxy: kube-proxy-style iptables DNAT rules in the
//! node namespace carry a long-lived connection, then the agent starts and
//! the rules are flushed. The connection keeps working (netfilter keeps its
//! NAT binding), new connections go through the dataplane, and a segment of
//! a flow neither conntrack knows is still dropped. Also: the agent starts
//! beside a process holding kube-proxy's ports.
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddrV4, TcpListener},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use integration_tests::{
    agent::Agent,
    fixture::OneNode,
    manifests,
    netns::Netns,
    packet::{ACK, Builder},
    traffic::{self, HeldConnection, Reply},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const T: Duration = Duration::from_secs(3);

fn iptables(node: &Netns, args: &[&str]) {
    node.exec("iptables", args)
        .unwrap_or_else(|e| panic!("iptables {args:?}: {e}"));
}

const KUBE_CHAINS: [&str; 3] = ["KUBE-SERVICES", "KUBE-SVC-WEB", "KUBE-SEP-WEB1"];

/// kube-proxy's iptables layout, cut down to one Service with one endpoint:
/// PREROUTING → KUBE-SERVICES → KUBE-SVC-… → KUBE-SEP-… DNAT; and the
/// CNI's masquerade rule for pod traffic leaving the cluster, which every
/// node with outgoing NAT has. (Netfilter applies an existing connection's
/// NAT binding only while its namespace has some NAT rule: with none left
/// at all, kube-proxy's connections break whoever replaces it.)
fn kube_proxy_rules(node: &Netns, backend: Ipv4Addr) {
    iptables(
        node,
        &[
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-s",
            "10.244.0.0/16",
            "!",
            "-d",
            "10.244.0.0/16",
            "-j",
            "MASQUERADE",
        ],
    );
    for chain in KUBE_CHAINS {
        iptables(node, &["-t", "nat", "-N", chain]);
    }
    iptables(
        node,
        &["-t", "nat", "-A", "PREROUTING", "-j", "KUBE-SERVICES"],
    );
    let vip = format!("{VIP}/32");
    iptables(
        node,
        &[
            "-t",
            "nat",
            "-A",
            "KUBE-SERVICES",
            "-d",
            &vip,
            "-p",
            "tcp",
            "--dport",
            "80",
            "-j",
            "KUBE-SVC-WEB",
        ],
    );
    iptables(
        node,
        &["-t", "nat", "-A", "KUBE-SVC-WEB", "-j", "KUBE-SEP-WEB1"],
    );
    let to = format!("{backend}:8080");
    iptables(
        node,
        &[
            "-t",
            "nat",
            "-A",
            "KUBE-SEP-WEB1",
            "-p",
            "tcp",
            "-j",
            "DNAT",
            "--to-destination",
            &to,
        ],
    );
}

/// `kube-proxy --cleanup`: its jumps and chains go, other rules stay.
fn flush_kube_proxy_rules(node: &Netns) {
    iptables(
        node,
        &["-t", "nat", "-D", "PREROUTING", "-j", "KUBE-SERVICES"],
    );
    for chain in KUBE_CHAINS {
        iptables(node, &["-t", "nat", "-F", chain]);
    }
    for chain in KUBE_CHAINS {
        iptables(node, &["-t", "nat", "-X", chain]);
    }
}

/// A held connection asking every 50 ms on its own thread until stopped;
/// returns every answer (or the first error).
struct Chatter {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<Result<Vec<Reply>, String>>>,
}

impl Chatter {
    fn start(mut conn: HeldConnection) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = thread::spawn(move || {
            let mut replies = vec![];
            while !s.load(Ordering::Relaxed) {
                match conn.ask() {
                    Ok(r) => replies.push(r),
                    Err(e) => return Err(format!("after {} answers: {e}", replies.len())),
                }
                thread::sleep(Duration::from_millis(50));
            }
            Ok(replies)
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Result<Vec<Reply>, String> {
        self.stop.store(true, Ordering::Relaxed);
        let t = self.thread.take().expect("finished once");
        t.join()
            .map_err(|_| "the chatter thread panicked".to_string())?
    }
}

impl Drop for Chatter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn reason(agent: &Agent, name: &str) -> u64 {
    let out = agent.cli("stats", &["-o", "json"]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    v["reasons"][name].as_u64().unwrap_or(0)
}

/// Sends one bare TCP ACK from `ns` to `to` through a raw socket: a segment
/// of a connection nobody opened.
fn send_stray_ack(ns: &Netns, from: Ipv4Addr, to: SocketAddrV4) {
    let frame = Builder::tcp(
        &from.to_string(),
        45678,
        &to.ip().to_string(),
        to.port(),
        ACK,
    )
    .build();
    ns.within(move || {
        // SAFETY: plain socket calls on a descriptor owned by this block.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW);
            assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
            let addr = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(to.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // The IP packet: the frame without its Ethernet header.
            let ip = &frame[14..];
            let n = libc::sendto(
                fd,
                ip.as_ptr().cast(),
                ip.len(),
                0,
                (&addr as *const libc::sockaddr_in).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as u32,
            );
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            assert_eq!(n, ip.len() as isize, "sendto: {err}");
        }
    })
    .unwrap();
}

#[test]
fn connections_kube_proxy_opened_survive_the_takeover_and_new_ones_use_the_dataplane() {
    let f = OneNode::new(2, 2).unwrap();
    f.dir
        .write(
            "svc.yaml",
            &manifests::service(
                "web",
                "web",
                &VIP.to_string(),
                &[("http", "TCP", 80, "8080")],
                "",
            ),
        )
        .unwrap();
    let node = &f.topo.nodes[0].ns;
    let client = f.topo.pod("client");
    let web1 = f.topo.pod("web-1").ip;
    kube_proxy_rules(node, web1);
    let front = SocketAddrV4::new(VIP, 80);

    let mut held = HeldConnection::open(&client.ns, front).unwrap();
    for _ in 0..3 {
        let r = held.ask().expect("kube-proxy's rules carry the connection");
        assert_eq!(r.server, "web-1");
    }
    let chatter = Chatter::start(held);

    let agent = Agent::start(node, &f.dir.path, &["--node-name", "node-1"]).unwrap();
    assert!(
        agent
            .log_text()
            .contains("left connections the kernel's conntrack translates"),
        "the agent took the kernel's flow over:\n{}",
        agent.log_text()
    );
    thread::sleep(Duration::from_millis(500));
    flush_kube_proxy_rules(node);
    thread::sleep(Duration::from_millis(500));

    // New connections: nothing but the dataplane can carry them now, and
    // it spreads them over both backends (kube-proxy's rule knew only web-1).
    let mut served = BTreeSet::new();
    for _ in 0..20 {
        let r = client
            .ns
            .within(move || traffic::tcp_ask(front, T))
            .unwrap()
            .expect("a new connection after the takeover");
        served.insert(r.server);
    }
    assert_eq!(
        served,
        BTreeSet::from(["web-1".to_string(), "web-2".to_string()])
    );
    assert!(reason(&agent, "new_flow") >= 20);

    thread::sleep(Duration::from_millis(500));
    let replies = chatter
        .finish()
        .expect("the connection kube-proxy opened kept working");
    assert!(
        replies.len() >= 10,
        "only {} answers on the held connection",
        replies.len()
    );
    assert!(replies.iter().all(|r| r.server == "web-1"));
    assert!(
        reason(&agent, "kernel_flow_passed") >= 2 * 10,
        "its packets, both ways, went to netfilter"
    );

    // A segment neither conntrack knows is still dropped.
    let invalid = reason(&agent, "ct_invalid");
    send_stray_ack(&client.ns, client.ip, front);
    let deadline = std::time::Instant::now() + T;
    while reason(&agent, "ct_invalid") == invalid {
        assert!(
            std::time::Instant::now() < deadline,
            "the stray ACK was not dropped as ct_invalid"
        );
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_agent_starts_beside_a_process_holding_kube_proxys_ports() {
    let f = OneNode::new(1, 1).unwrap();
    let node = &f.topo.nodes[0].ns;
    // kube-proxy's metrics (10249) and healthz (10256), as a running
    // kube-proxy binds them (metrics on localhost, healthz on every address).
    let _held = node
        .within(|| -> std::io::Result<_> {
            Ok((
                TcpListener::bind("127.0.0.1:10249")?,
                TcpListener::bind("0.0.0.0:10256")?,
            ))
        })
        .unwrap()
        .expect("the ports are free in a new namespace");
    let _agent = Agent::start(node, &f.dir.path, &["--node-name", "node-1"]).unwrap();
    let addr: SocketAddrV4 = service_agent::cli::DEFAULT_METRICS_ADDR.parse().unwrap();
    assert!(![10249, 10256].contains(&addr.port()));
    let (code, _) = node
        .within(move || traffic::http_request(addr, "/healthz", T))
        .unwrap()
        .expect("the agent serves health on its default address");
    assert_eq!(code, 200);
}
