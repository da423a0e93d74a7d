//! Source ports of NodePort flows source-NATed to a backend on another
//! node: a client reusing its ports quickly never waits on a port the
//! dataplane could not give, a range that runs out refuses new flows with a
//! counted reason and misdirects nothing, and ports come back when flows end.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, SocketAddr, SocketAddrV4, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _},
    process::Command,
    time::{Duration, Instant},
};

use integration_tests::{
    agent::{Agent, agent_bin},
    fixture::{Cluster, T, TwoNodes},
    manifests,
    traffic::{self, HeldConnection},
};

const NODE_PORT: u16 = 30080;

/// NodePort Service `web` (80/TCP -> 8080, nodePort 30080) with only web-2,
/// on node-2, ready: every connection through node-1 is source-NATed, to a
/// port of `snat_ports`; closed flows are forgotten after `close_s` seconds.
/// `xdp` is the agents' --xdp mode (XDP carries these flows when it can).
fn remote_backend_only(xdp: &'static str, snat_ports: &str, close_s: &str) -> Cluster {
    let flags = [
        "--snat-port-range",
        snat_ports,
        "--conntrack-tcp-timeout-close",
        close_s,
    ];
    let nodes = TwoNodes::new(xdp).unwrap();
    let svc = manifests::service(
        "web",
        "web",
        "10.96.0.10",
        &[("http", "TCP", 80, "8080")],
        "  type: NodePort\n",
    )
    .replace(
        "targetPort: 8080}",
        &format!("targetPort: 8080, nodePort: {NODE_PORT}}}"),
    );
    nodes.dir.write("svc.yaml", &svc).unwrap();
    nodes.write_pods(|name| name == "web-2").unwrap();
    let t = nodes.start(&flags).unwrap();
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
    let n = l
        .split("CONNTRACK ")
        .nth(1)
        .and_then(|r| r.split('/').next());
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

/// A TCP connection to `to` from local port `port` (SO_REUSEADDR, as a
/// client pinning its ports would), within `T`.
fn connect_from(port: u16, to: SocketAddrV4) -> std::io::Result<TcpStream> {
    let sa = |a: SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    let check = |r: i32| {
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r)
        }
    };
    let len = size_of::<libc::sockaddr_in>() as u32;
    // SAFETY: plain socket calls on a socket this function owns, with
    // argument structs of the sizes given.
    unsafe {
        let fd = check(libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0))?;
        let s = TcpStream::from_raw_fd(fd);
        let one: libc::c_int = 1;
        let timeout = libc::timeval {
            tv_sec: T.as_secs() as i64,
            tv_usec: 0,
        };
        set(&s, libc::SO_REUSEADDR, &one)?;
        // A blocking connect gives up after the send timeout.
        set(&s, libc::SO_SNDTIMEO, &timeout)?;
        let local = sa(SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, port));
        check(libc::bind(
            fd,
            (&local as *const libc::sockaddr_in).cast(),
            len,
        ))?;
        let remote = sa(to);
        check(libc::connect(
            fd,
            (&remote as *const libc::sockaddr_in).cast(),
            len,
        ))?;
        Ok(s)
    }
}

/// Sets a SOL_SOCKET option of `s` to `v`.
fn set<V>(s: &TcpStream, opt: i32, v: &V) -> std::io::Result<()> {
    // SAFETY: a valid socket and a value of the size given.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (v as *const V).cast(),
            size_of::<V>() as u32,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// One request on a new connection from `port`, ended with a reset
/// (SO_LINGER 0), as many clients and proxies end theirs: the client keeps
/// no TIME_WAIT and may use the port again at once. Gives how long connect
/// took and the reply line.
fn ask_and_abort(port: u16, to: SocketAddrV4) -> std::io::Result<(Duration, String)> {
    let started = Instant::now();
    let mut s = connect_from(port, to)?;
    let connected = started.elapsed();
    s.set_read_timeout(Some(T))?;
    s.write_all(b"hello\n")?;
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line)?;
    let abort = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    set(&s, libc::SO_LINGER, &abort)?;
    Ok((connected, line))
}

fn short_connections_reusing_client_ports_never_stall_and_free_their_ports(xdp: &'static str) {
    // The client cycles through 64 ports, the node's whole SNAT range: each
    // flow keeps its own port, so none waits on another's. Giving ports at
    // random (8 tries) finds the range full for some openings, whose SYN is
    // then dropped until the client retransmits a second later.
    let t = remote_backend_only(xdp, "20000-20063", "2");
    let client = &t.topo.clients[0];
    let to = via_node_1(&t);
    let node_1 = IpAddr::V4(t.topo.nodes[0].ip);
    let (done, stalled, astray) = client
        .ns
        .within(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            let (mut done, mut stalled, mut astray) = (0, vec![], vec![]);
            while done < 2_000 && Instant::now() < deadline {
                let port = 20_000 + (done % 64) as u16;
                done += 1;
                match ask_and_abort(port, to) {
                    // A dropped SYN shows as a connect of a second or more
                    // (the first retransmission).
                    Ok((took, _)) if took >= Duration::from_secs(1) => {
                        stalled.push(format!("connect took {took:?}"))
                    }
                    Ok((_, line)) => {
                        let want = format!("web-2 {}", SocketAddr::new(node_1, port));
                        if line.trim() != want {
                            astray.push(format!("from port {port}: {line:?}, want {want:?}"));
                        }
                    }
                    Err(e) => stalled.push(format!("{e}")),
                }
            }
            (done, stalled, astray)
        })
        .unwrap();
    assert!(done >= 500, "only {done} connections in a minute");
    assert!(
        stalled.is_empty(),
        "{} of {done} connections stalled, e.g. {:?}",
        stalled.len(),
        &stalled[..stalled.len().min(5)]
    );
    // Each kept its own port.
    assert!(
        astray.is_empty(),
        "{} of {done} connections were not seen from the node with their own port, e.g. {:?}",
        astray.len(),
        &astray[..astray.len().min(5)]
    );
    let agent = &t.agents[0];
    assert_eq!(reason(agent, "snat_ports_exhausted"), 0);
    if xdp != "off" {
        let by_xdp = reason(agent, "xdp_tx") + reason(agent, "xdp_redirect");
        assert!(by_xdp > 1_000, "XDP carried {by_xdp} packets");
    }
    // Every flow ended with a reset: both of its entries, and so its port,
    // go within the close lifetime and a garbage collection round.
    if let Err(left) = wait_conntrack_empty(agent, Duration::from_secs(30)) {
        panic!(
            "{left} conntrack entries outlived their flows:\n{}",
            agent.cli("dump", &["CONNTRACK"]).unwrap_or_default()
        );
    }
}

fn a_full_snat_port_range_refuses_new_flows_counted_and_misdirects_nothing(xdp: &'static str) {
    let t = remote_backend_only(xdp, "20000-20003", "1");
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
    let metrics = t.topo.nodes[0]
        .ns
        .within(|| {
            let at = service_agent::cli::DEFAULT_METRICS_ADDR.parse().unwrap();
            traffic::http_request(at, "/metrics", T)
        })
        .unwrap()
        .unwrap()
        .1;
    let line = r#"service_agent_packets_by_reason_total{reason="snat_ports_exhausted",verdict="dropped"} "#;
    let counted = metrics
        .lines()
        .find_map(|l| l.strip_prefix(line))
        .and_then(|n| n.trim().parse::<u64>().ok());
    assert!(counted.is_some_and(|n| n > 0), "in /metrics: {counted:?}");
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
            .args([
                "run",
                "--manifests",
                "/nonexistent",
                "--snat-port-range",
                bad,
            ])
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

integration_tests::tests_in_modes!([tc_only = "off", xdp_native = "native"] {
    short_connections_reusing_client_ports_never_stall_and_free_their_ports,
    a_full_snat_port_range_refuses_new_flows_counted_and_misdirects_nothing,
});
