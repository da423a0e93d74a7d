//! Source ports of NodePort flows source-NATed to a backend on another
//! node: a client reusing its ports quickly never waits on a port the
//! dataplane could not give, a range that runs out refuses new flows with a
//! counted reason and misdirects nothing, and ports come back when flows end.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, SocketAddr, SocketAddrV4, TcpStream},
    os::fd::AsRawFd as _,
    process::Command,
    time::{Duration, Instant},
};

use integration_tests::{
    agent::{Agent, agent_bin},
    fixture::{Cluster, T, TwoNodes},
    manifests,
    traffic::HeldConnection,
};

const NODE_PORT: u16 = 30080;

/// NodePort Service `web` (80/TCP -> 8080, nodePort 30080) with only web-2,
/// on node-2, ready: every connection through node-1 is source-NATed.
fn remote_backend_only(flags: &[&str]) -> Cluster {
    let nodes = TwoNodes::new("off").unwrap();
    let svc = manifests::service(
        "web",
        "web",
        "10.96.0.10",
        &[("http", "TCP", 80, "8080")],
        "  type: NodePort\n",
    )
    .replace("targetPort: 8080}", &format!("targetPort: 8080, nodePort: {NODE_PORT}}}"));
    nodes.dir.write("svc.yaml", &svc).unwrap();
    nodes.write_pods(|name| name == "web-2").unwrap();
    let t = nodes.start(flags).unwrap();
    let only_web_2 = format!("*:{NODE_PORT}/TCP -> {}:8080", t.topo.pod("web-2").ip);
    t.wait_all("web-2 alone", |l| {
        l.lines()
            .any(|line| line.starts_with(&only_web_2) && !line.contains(", "))
    })
    .unwrap();
    t
}

fn via_node_1(t: &Cluster) -> SocketAddrV4 {
    SocketAddrV4::new(t.topo.nodes[0].ip, NODE_PORT)
}

/// A counter of `agent stats -o json`'s reasons.
fn reason(agent: &Agent, name: &str) -> u64 {
    let stats = agent.cli("stats", &["-o", "json"]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
    v["reasons"][name].as_u64().unwrap_or(0)
}

/// The CONNTRACK entry count in `list`'s fill line.
fn conntrack_entries(agent: &Agent) -> usize {
    let l = agent.list().unwrap();
    let n = l.split("CONNTRACK ").nth(1).and_then(|r| r.split('/').next());
    n.and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no CONNTRACK fill in {l}"))
}

/// Waits up to `limit` for `agent`'s conntrack to be empty.
fn wait_conntrack_empty(agent: &Agent, limit: Duration) -> Result<(), usize> {
    let deadline = Instant::now() + limit;
    loop {
        let n = conntrack_entries(agent);
        if n == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(n);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One request on a new connection, ended with a reset (SO_LINGER 0), as
/// many clients and proxies end theirs: the client keeps no TIME_WAIT, so
/// it may use the same port again at once. Gives how long connect took,
/// the client's port and the reply line.
fn ask_and_abort(to: SocketAddrV4) -> std::io::Result<(Duration, u16, String)> {
    let started = Instant::now();
    let mut s = TcpStream::connect_timeout(&to.into(), T)?;
    let connected = started.elapsed();
    let local = s.local_addr()?.port();
    s.set_read_timeout(Some(T))?;
    s.write_all(b"hello\n")?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket and a linger struct of the size given.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            size_of::<libc::linger>() as u32,
        )
    };
    Ok((connected, local, line))
}

#[test]
fn short_connections_reusing_client_ports_never_stall_and_free_their_ports() {
    // The client's 128 ports lie inside the node's SNAT range of 128: each
    // flow keeps its own port, so none waits on another's. Giving ports at
    // random (8 tries) finds the range full for some openings, whose SYN is
    // then dropped until the client retransmits a second later.
    let t = remote_backend_only(&[
        "--snat-port-range",
        "20000-20127",
        "--conntrack-tcp-timeout-close",
        "2",
    ]);
    let client = &t.topo.clients[0];
    client
        .ns
        .sysctl("net.ipv4.ip_local_port_range", "20000 20127")
        .unwrap();
    let to = via_node_1(&t);
    let node_1 = IpAddr::V4(t.topo.nodes[0].ip);
    let (done, problems) = client
        .ns
        .within(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            let (mut done, mut problems) = (0, vec![]);
            while done < 2_000 && Instant::now() < deadline {
                done += 1;
                match ask_and_abort(to) {
                    // A dropped SYN shows as a connect of a second or more
                    // (the first retransmission).
                    Ok((took, _, _)) if took >= Duration::from_secs(1) => {
                        problems.push(format!("connect took {took:?}"))
                    }
                    Ok((_, port, line)) => {
                        let want = format!("web-2 {}", SocketAddr::new(node_1, port));
                        if line.trim() != want {
                            problems.push(format!("from port {port}: {line:?}, want {want:?}"));
                        }
                    }
                    Err(e) => problems.push(format!("{e}")),
                }
            }
            (done, problems)
        })
        .unwrap();
    assert!(done >= 500, "only {done} connections in a minute");
    assert!(
        problems.is_empty(),
        "{} of {done} connections stalled or went astray, e.g. {:?}",
        problems.len(),
        &problems[..problems.len().min(5)]
    );
    let agent = &t.agents[0];
    assert_eq!(reason(agent, "snat_ports_exhausted"), 0);
    // Every flow ended with a reset: both of its entries, and so its port,
    // go within the close lifetime and a garbage collection round.
    if let Err(left) = wait_conntrack_empty(agent, Duration::from_secs(30)) {
        panic!(
            "{left} conntrack entries outlived their flows:\n{}",
            agent.cli("dump", &["CONNTRACK"]).unwrap_or_default()
        );
    }
}

#[test]
fn a_full_snat_port_range_refuses_new_flows_counted_and_misdirects_nothing() {
    let t = remote_backend_only(&[
        "--snat-port-range",
        "20000-20003",
        "--conntrack-tcp-timeout-close",
        "1",
    ]);
    let client = &t.topo.clients[0];
    let to = via_node_1(&t);
    let mut held: Vec<HeldConnection> = (0..4)
        .map(|_| HeldConnection::open(&client.ns, to).unwrap())
        .collect();
    let mut seen = vec![];
    for h in &mut held {
        let r = h.ask().unwrap();
        assert_eq!(r.server, "web-2");
        assert_eq!(r.seen_from.ip(), IpAddr::V4(t.topo.nodes[0].ip));
        seen.push(r.seen_from);
    }
    let mut ports: Vec<u16> = seen.iter().map(|a| a.port()).collect();
    ports.sort();
    assert_eq!(ports, [20000, 20001, 20002, 20003], "{seen:?}");
    // The fifth flow finds every port of the range held.
    let before = reason(&t.agents[0], "snat_ports_exhausted");
    let fifth = client
        .ns
        .within(move || TcpStream::connect_timeout(&to.into(), Duration::from_millis(1500)))
        .unwrap();
    assert!(fifth.is_err(), "a fifth flow got through: {fifth:?}");
    assert!(
        reason(&t.agents[0], "snat_ports_exhausted") > before,
        "the refusal is counted"
    );
    // The held flows keep their own ports and replies.
    for (h, was) in held.iter_mut().zip(&seen) {
        let r = h.ask().unwrap();
        assert_eq!((r.server.as_str(), r.seen_from), ("web-2", *was));
    }
    // A flow that ends gives its port back (FIN both ways: the close
    // lifetime, then the next garbage collection).
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(30);
    let again = loop {
        let r = client.ns.within(move || {
            TcpStream::connect_timeout(&to.into(), Duration::from_millis(500)).is_ok()
        });
        if r.unwrap() || Instant::now() > deadline {
            break Instant::now() <= deadline;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(again, "the port of the ended flow never came back");
}

#[test]
fn a_bad_snat_port_range_is_refused_naming_the_flag() {
    for bad in ["30000-20000", "0-100", "1024"] {
        let out = Command::new(agent_bin())
            .args(["run", "--manifests", "/nonexistent", "--snat-port-range", bad])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad} accepted");
        assert!(
            err.contains("--snat-port-range") && err.contains(bad),
            "{bad}: {err}"
        );
    }
}
