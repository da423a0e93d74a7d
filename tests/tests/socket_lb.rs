//! `--socket-lb pods`: a pod's sockets reach Services through the cgroup
//! socket hooks, so its packets leave the pod already addressed to a
//! backend and the tc program on its veth translates nothing. Pod clients
//! are processes in a pod's network namespace, moved into a cgroup the
//! test made (the only place the hooks are attached).
use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::Path,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::Duration,
};

use integration_tests::{
    agent::{Agent, ManifestDir},
    cgroup::TestCgroup,
    host_client::HostClient,
    manifests,
    netns::Netns,
    topology::Topology,
    traffic::Server,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const EMPTY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const STICKY_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
const CLIENT: &str = env!("CARGO_BIN_EXE_host_client");

struct Fixture {
    // Drop order: the agent (its cleanup detaches the hooks), the servers,
    // the namespaces, the files, and the cgroups last.
    agent: Agent,
    _servers: Vec<Server>,
    topo: Topology,
    _dir: ManifestDir,
    cgroup: TestCgroup,
    /// A cgroup without hooks: its processes' sockets are what the hooks
    /// never see.
    plain: TestCgroup,
}

/// `web` (80/TCP, 53/UDP) and `sticky` (ClientIP affinity) over web-1 and
/// web-2, and `empty` selecting nothing.
fn service_yaml() -> String {
    let ports = [("http", "TCP", 80, "8080"), ("dns", "UDP", 53, "8080")];
    [
        manifests::service("web", "web", &VIP.to_string(), &ports, ""),
        manifests::service(
            "sticky",
            "web",
            &STICKY_VIP.to_string(),
            &ports[..1],
            "  sessionAffinity: ClientIP\n",
        ),
        manifests::service("empty", "nothing", &EMPTY_VIP.to_string(), &ports, ""),
    ]
    .join("---\n")
}

fn fixture(socket_lb: &str) -> Fixture {
    let cgroup = TestCgroup::new().unwrap();
    let plain = TestCgroup::new().unwrap();
    let mut topo = Topology::new().unwrap();
    topo.add_node().unwrap();
    topo.add_pod(0, "client").unwrap();
    let mut servers = vec![];
    let mut pods = String::new();
    for name in ["web-1", "web-2"] {
        let k = topo.add_pod(0, name).unwrap();
        let p = &topo.pods[k];
        servers.push(Server::start(&p.ns, p.ip, 8080, name).unwrap());
        pods.push_str(&manifests::pod(name, "web", p.ip, true, "node-1"));
        pods.push_str("---\n");
    }
    let dir = ManifestDir::new().unwrap();
    dir.write("pods.yaml", &pods).unwrap();
    dir.write("svc.yaml", &service_yaml()).unwrap();
    let agent = Agent::start(
        &topo.nodes[0].ns,
        &dir.path,
        &[
            "--node-name",
            "node-1",
            "--cgroup",
            &cgroup.flag(),
            "--socket-lb",
            socket_lb,
        ],
    )
    .unwrap();
    agent
        .wait_list("both Services with both backends", |l| {
            [VIP, STICKY_VIP].iter().all(|v| {
                l.lines()
                    .find(|l| l.starts_with(&format!("{v}:80/TCP")))
                    .is_some_and(|l| l.matches(":8080").count() == 2)
            })
        })
        .unwrap();
    Fixture {
        agent,
        _servers: servers,
        topo,
        _dir: dir,
        cgroup,
        plain,
    }
}

impl Fixture {
    /// A client process in the `client` pod, in the hooks' cgroup.
    fn pod_client(&self) -> HostClient {
        HostClient::start(Path::new(CLIENT), &self.topo.pod("client").ns, &self.cgroup).unwrap()
    }

    fn stats(&self) -> serde_json::Value {
        let stats = self.agent.cli("stats", &["--output", "json"]).unwrap();
        serde_json::from_str(&stats).unwrap()
    }

    fn reason(&self, name: &str) -> u64 {
        self.stats()["reasons"][name].as_u64().unwrap_or(0)
    }

    /// (packets the tc programs translated, new flows) of one frontend.
    fn frontend(&self, name: &str) -> (u64, u64) {
        let stats = self.stats();
        let f = stats["frontends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["frontend"].as_str() == Some(name))
            .unwrap_or_else(|| panic!("no frontend {name} in {stats}"))
            .clone();
        (
            f["packets"].as_u64().unwrap(),
            f["new_flows"].as_u64().unwrap(),
        )
    }
}

/// `ok SERVER SEEN_FROM PEER` -> (SERVER, SEEN_FROM, PEER)
fn answer_words(answer: &str) -> (String, String, String) {
    let w: Vec<&str> = answer.split_whitespace().collect();
    assert!(w.len() == 4 && w[0] == "ok", "unexpected answer {answer:?}");
    (w[1].to_string(), w[2].to_string(), w[3].to_string())
}

/// IPv4 TCP/UDP packets seen on an interface: (source, destination,
/// destination port), read by a packet socket in the interface's namespace.
/// Packet sockets see a frame before tc ingress does, so what a pod sent is
/// what is recorded, before any translation.
struct Capture {
    stop: Arc<AtomicBool>,
    handle: thread::JoinHandle<Vec<(Ipv4Addr, Ipv4Addr, u16)>>,
}

impl Capture {
    fn start(ns: &Netns, iface: &str) -> Capture {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready) = mpsc::channel();
        let iface = std::ffi::CString::new(iface).unwrap();
        let flag = stop.clone();
        let handle = ns
            .spawn(move || {
                let fd = open_packet_socket(&iface);
                ready_tx.send(()).unwrap();
                let mut seen = vec![];
                let mut buf = [0u8; 2048];
                // Bounded: the test stops it, or 30 s pass.
                let deadline = std::time::Instant::now() + Duration::from_secs(30);
                while !flag.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
                    // SAFETY: reading into our own buffer of the given length.
                    let n = unsafe {
                        libc::recv(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0)
                    };
                    if n <= 0 {
                        continue;
                    }
                    if let Some(p) = ipv4_ports(&buf[..n as usize]) {
                        seen.push(p);
                    }
                }
                // SAFETY: our descriptor, closed once.
                unsafe { libc::close(fd) };
                seen
            })
            .unwrap();
        ready
            .recv_timeout(Duration::from_secs(5))
            .expect("capture started");
        Capture { stop, handle }
    }

    fn finish(self) -> Vec<(Ipv4Addr, Ipv4Addr, u16)> {
        // Frames still in flight reach the socket meanwhile.
        thread::sleep(Duration::from_millis(200));
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap()
    }
}

fn open_packet_socket(iface: &std::ffi::CStr) -> libc::c_int {
    let proto = (libc::ETH_P_ALL as u16).to_be() as libc::c_int;
    // SAFETY: plain syscalls on values we own; every result is checked.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto);
        assert!(
            fd >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        let index = libc::if_nametoindex(iface.as_ptr());
        assert!(index != 0, "no interface {iface:?}");
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto as u16;
        sll.sll_ifindex = index as i32;
        let r = libc::bind(
            fd,
            &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        );
        assert!(r == 0, "bind: {}", std::io::Error::last_os_error());
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
        fd
    }
}

/// (source, destination, destination port) of an Ethernet frame holding
/// IPv4 TCP or UDP.
fn ipv4_ports(frame: &[u8]) -> Option<(Ipv4Addr, Ipv4Addr, u16)> {
    if frame.len() < 14 + 20 || frame[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = &frame[14..];
    let ihl = (ip[0] & 0x0f) as usize * 4;
    if !(ip[9] == 6 || ip[9] == 17) || ip.len() < ihl + 4 {
        return None;
    }
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    Some((src, dst, u16::from_be_bytes([ip[ihl + 2], ip[ihl + 3]])))
}

#[test]
fn pod_tcp_and_udp_reach_backends_directly_and_see_the_service_address() {
    let f = fixture("pods");
    let client = f.topo.pod("client");
    let backends: BTreeSet<Ipv4Addr> = f
        .topo
        .pods
        .iter()
        .filter(|p| p.name.starts_with("web-"))
        .map(|p| p.ip)
        .collect();
    let mut c = f.pod_client();
    let capture = Capture::start(&f.topo.nodes[0].ns, &client.host_if);
    let mut seen = BTreeSet::new();
    for _ in 0..40 {
        let (server, from, peer) = answer_words(&c.ask(&format!("tcp {VIP}:80")).unwrap());
        assert_eq!(peer, format!("{VIP}:80"), "getpeername is the Service");
        assert!(
            from.starts_with(&format!("{}:", client.ip)),
            "the backend sees the pod's own address: {from}"
        );
        seen.insert(server);
    }
    assert_eq!(seen.len(), 2, "both backends serve the pod: {seen:?}");
    let packets = capture.finish();
    let sent: Vec<_> = packets.iter().filter(|p| p.0 == client.ip).collect();
    assert!(
        sent.len() >= 40,
        "the pod's packets were captured: {packets:?}"
    );
    assert!(
        sent.iter().all(|p| p.1 != VIP),
        "a packet on the pod's veth still carries the ClusterIP: {sent:?}"
    );
    assert!(
        sent.iter().all(|p| backends.contains(&p.1) && p.2 == 8080),
        "every packet the pod sent is addressed to a backend: {sent:?}"
    );
    let (packets, new_flows) = f.frontend(&format!("{VIP}:80/TCP"));
    assert_eq!(packets, 0, "the tc program translated no packet of it");
    assert!(new_flows >= 40, "the hook counted its flows: {new_flows}");
    assert!(f.reason("sock_translated") >= 40);
    // The pod's closed sockets took their reverse entries with them.
    assert_eq!(f.reason("sock_revnat_released"), 40);
    let list = f.agent.cli("list", &["--output", "json"]).unwrap();
    let stats: serde_json::Value = serde_json::from_str(&list).unwrap();
    let revnat = stats["maps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["map"] == "SOCK_REVNAT")
        .unwrap_or_else(|| panic!("no SOCK_REVNAT in {stats}"))
        .clone();
    assert_eq!(
        revnat["entries"], 0,
        "closed sockets left entries: {revnat}"
    );

    // Unconnected UDP: the hook translates each sendto, and recvfrom shows
    // the ClusterIP as the reply's source.
    let a = c.ask(&format!("udp-sendto {VIP}:53")).unwrap();
    let w: Vec<&str> = a.split_whitespace().collect();
    assert!(w[0] == "ok" && w[1].starts_with("web-"), "{a}");
    assert_eq!(w[3], format!("{VIP}:53"), "recvfrom shows the Service: {a}");
    assert!(f.reason("sock_reply_translated") >= 1);
    assert_eq!(f.frontend(&format!("{VIP}:53/UDP")).0, 0);

    // Connected UDP is left to tc (the pod's stale flows move there), and
    // looks the same to the pod.
    let passed = f.reason("sock_passed_to_tc");
    assert_eq!(
        c.ask(&format!("udp-connect {VIP}:53")).unwrap(),
        format!("ok {VIP}:53")
    );
    let (server, _, peer) = answer_words(&c.ask("udp-ask").unwrap());
    assert!(server.starts_with("web-"));
    assert_eq!(peer, format!("{VIP}:53"));
    assert_eq!(f.reason("sock_passed_to_tc"), passed + 1);
    assert!(
        f.frontend(&format!("{VIP}:53/UDP")).0 >= 2,
        "tc translated the connected UDP socket's request and reply"
    );
}

#[test]
fn pod_affinity_sticks_and_is_kept_per_pod() {
    let f = fixture("pods");
    let mut c = f.pod_client();
    let mut seen = BTreeSet::new();
    for _ in 0..20 {
        let (server, _, peer) = answer_words(&c.ask(&format!("tcp {STICKY_VIP}:80")).unwrap());
        assert_eq!(peer, format!("{STICKY_VIP}:80"));
        seen.insert(server);
    }
    assert_eq!(
        seen.len(),
        1,
        "ClientIP affinity holds for the pod: {seen:?}"
    );
    assert!(f.reason("affinity_hit") >= 19);
    // Another process of the same pod is the same client.
    let mut again = f.pod_client();
    let (server, _, _) = answer_words(&again.ask(&format!("tcp {STICKY_VIP}:80")).unwrap());
    assert!(seen.contains(&server), "{server} is not the pod's {seen:?}");
    // The entry is the pod's network namespace, in 0.0.0.0/8: an address
    // no packet has as its source, so never a tc-path client's entry.
    let dump = f.agent.cli("dump", &["AFFINITY"]).unwrap();
    let clients: Vec<&str> = dump
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(clients.len(), 1, "{dump}");
    assert!(
        clients[0].starts_with("0.") && clients[0] != "0.0.0.0",
        "{dump}"
    );
    assert_eq!(f.frontend(&format!("{STICKY_VIP}:80/TCP")).0, 0);
}

#[test]
fn pod_connect_to_a_service_without_endpoints_is_refused_at_once() {
    let f = fixture("pods");
    let mut c = f.pod_client();
    c.assert_refused_at_once(EMPTY_VIP);
    assert!(f.reason("sock_refused") >= 2);
    assert_eq!(
        f.reason("rejected_no_backend"),
        0,
        "tc never saw a packet to answer"
    );
}

#[test]
fn pods_outside_the_cgroup_keep_the_tc_path() {
    let f = fixture("pods");
    let client = f.topo.pod("client");
    let mut outsider = HostClient::start(Path::new(CLIENT), &client.ns, &f.plain).unwrap();
    let capture = Capture::start(&f.topo.nodes[0].ns, &client.host_if);
    for _ in 0..5 {
        let (server, _, peer) = answer_words(&outsider.ask(&format!("tcp {VIP}:80")).unwrap());
        assert!(server.starts_with("web-"));
        assert_eq!(peer, format!("{VIP}:80"));
    }
    let sent: Vec<_> = capture
        .finish()
        .into_iter()
        .filter(|p| p.0 == client.ip)
        .collect();
    assert!(
        sent.iter().any(|p| p.1 == VIP),
        "the pod's packets carry the ClusterIP to tc: {sent:?}"
    );
    assert_eq!(f.reason("sock_translated"), 0);
    let (packets, new_flows) = f.frontend(&format!("{VIP}:80/TCP"));
    assert!(packets >= 10, "tc translated them: {packets}");
    assert_eq!(new_flows, 5);
}

#[test]
fn host_mode_leaves_pods_to_tc_and_off_detaches_the_hooks() {
    let mut f = fixture("host");
    let mut c = f.pod_client();
    for _ in 0..5 {
        let (_, _, peer) = answer_words(&c.ask(&format!("tcp {VIP}:80")).unwrap());
        assert_eq!(peer, format!("{VIP}:80"));
    }
    assert_eq!(f.reason("sock_translated"), 0, "the hook skipped the pod");
    assert!(f.frontend(&format!("{VIP}:80/TCP")).0 >= 10);
    // The node's own sockets still go through the hooks.
    let mut host = HostClient::start(Path::new(CLIENT), &f.topo.nodes[0].ns, &f.cgroup).unwrap();
    let (_, _, peer) = answer_words(&host.ask(&format!("tcp {VIP}:80")).unwrap());
    assert_eq!(peer, format!("{VIP}:80"));
    assert_eq!(f.reason("sock_translated"), 1);

    // Restarted with --socket-lb pods, the adopted hooks take the pod too.
    f.agent.kill();
    f.agent.set_flag("--socket-lb", "pods");
    f.agent.spawn().unwrap();
    let (_, _, peer) = answer_words(&c.ask(&format!("tcp {VIP}:80")).unwrap());
    assert_eq!(peer, format!("{VIP}:80"));
    assert_eq!(f.reason("sock_translated"), 2);

    // And with --socket-lb off, the agent takes its hooks away.
    f.agent.kill();
    f.agent.set_flag("--socket-lb", "off");
    f.agent.spawn().unwrap();
    let list = f.agent.list().unwrap();
    assert!(list.contains("host socket hooks: not attached"), "{list}");
    let out = Command::new("bpftool")
        .args(["cgroup", "show", &f.cgroup.flag()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("svc_sock"), "still attached:\n{text}");
    let (_, _, peer) = answer_words(&c.ask(&format!("tcp {VIP}:80")).unwrap());
    assert_eq!(peer, format!("{VIP}:80"), "tc serves the pod again");
    assert_eq!(f.reason("sock_translated"), 2);
}
