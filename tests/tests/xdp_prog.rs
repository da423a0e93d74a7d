//! The XDP program through BPF_PROG_TEST_RUN, inside a namespace of its own
//! whose routes and neighbours the program's FIB lookups see: what it
//! forwards (source-NATed NodePort flows and their replies) comes out
//! translated with valid checksums, the next hop's MACs and a decremented
//! TTL; everything else comes out untouched for tc, which follows the
//! backend XDP recorded for a new flow. Single packets are a table of cases;
//! ends with generated packets checked against these rules. IPv6 has a world
//! of its own: the same NodePort flow forwarded both ways, hop limit and
//! checksums checked, and what XDP leaves to tc.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
};

use anyhow::ensure;
use integration_tests::{
    bpf::{self, FibNamespace, Loaded, Prog, XDP_DROP, XDP_PASS, XDP_REDIRECT},
    packet::{self, ACK, Builder, SYN},
    rng::Rng,
};
use service_agent::{
    dataplane::IfaceRole,
    plan::{FrontendKey, FrontendKind, Plan, Protocol},
};
use service_common::*;

const NODE: &str = "192.168.50.1";
const CLIENT: &str = "192.168.50.100";
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x01, 0x00];
const PEER_NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x00, 0x20];
const REMOTE: &str = "10.244.2.11";

/// NodePorts of the world: (port, proto, backend, backend port, local).
const PORTS: [(u16, Protocol, &str, u16, bool); 5] = [
    // Remote backend behind a resolved neighbour: XDP's to forward.
    (30080, Protocol::Tcp, REMOTE, 8080, false),
    (30053, Protocol::Udp, REMOTE, 5353, false),
    // A backend on this node: tc's (pod interfaces are not XDP egress).
    (30081, Protocol::Tcp, "10.244.1.5", 8080, true),
    // Routed via a neighbour not resolved yet.
    (30082, Protocol::Tcp, "10.244.3.7", 8080, false),
    // Routed out of an interface without XDP.
    (30083, Protocol::Tcp, "10.244.4.7", 8080, false),
];

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// The node's network: ext0 (XDP, facing the client and a peer node whose
/// MAC is known), ext1 without XDP, and routes to every backend's range.
fn network() -> anyhow::Result<FibNamespace> {
    let fib = FibNamespace::new("xdpw")?;
    fib.link("ext0", "wire0", "192.168.50.1/24")?
        .link("ext1", "wire1", "192.168.51.1/24")?
        .neighbour("192.168.50.20", PEER_NODE_MAC, "ext0")?
        .neighbour(CLIENT, CLIENT_MAC, "ext0")?
        .neighbour("192.168.51.20", [0x02, 0, 0, 0, 0x00, 0x33], "ext1")?
        .route("10.244.2.0/24", &["via", "192.168.50.20"])?
        // Nobody answers for 192.168.50.30: its neighbour entry never resolves.
        .route("10.244.3.0/24", &["via", "192.168.50.30"])?
        .route("10.244.4.0/24", &["via", "192.168.51.20"])?
        .route("10.244.1.0/24", &["dev", "wire1"])?;
    Ok(fib)
}

fn plan() -> Plan {
    let mut plan = Plan::default();
    for (port, proto, addr, bport, local) in PORTS {
        plan.frontends.insert(
            FrontendKey {
                addr: Ipv4Addr::UNSPECIFIED.into(),
                port,
                proto,
            },
            bpf::frontend(
                &format!("xdp/np-{port}"),
                FrontendKind::NodePort,
                vec![bpf::backend(ip(addr), bport, local)],
            ),
        );
    }
    plan
}

/// The loaded programs, on a thread that lives in the network's namespace:
/// BPF_PROG_TEST_RUN resolves the ingress interface, and the FIB lookups
/// run, in the caller's namespace.
struct World {
    l: Loaded,
    ingress: u32,
    /// ext0's MAC: frames come in addressed to it and leave from it.
    mac: [u8; 6],
}

/// Runs `test` in a fresh world.
fn in_world(test: impl FnOnce(&mut World) + Send + 'static) {
    let fib = network().unwrap();
    let mac = fib.mac("ext0").unwrap();
    fib.ns
        .within(move || {
            let mut l = Loaded::with_plan("xdpt", &bpf::sizes(1024, 1 << 16), &plan()).unwrap();
            let ingress = l.attach_xdp("ext0").unwrap();
            l.set_node_addr(ip(NODE)).unwrap();
            test(&mut World { l, ingress, mac })
        })
        .expect("the test in the world's namespace passed");
}

impl World {
    /// `pkt` as a frame from the client to this node.
    fn frame(&self, pkt: &[u8]) -> Vec<u8> {
        let mut pkt = pkt.to_vec();
        if pkt.len() >= 12 {
            pkt[0..6].copy_from_slice(&self.mac);
            pkt[6..12].copy_from_slice(&CLIENT_MAC);
        }
        pkt
    }

    /// Runs `pkt` (as a frame to this node) through XDP: the frame sent and the run.
    fn run(&mut self, pkt: &[u8]) -> (Vec<u8>, bpf::Run) {
        let frame = self.frame(pkt);
        let r = self.l.run(
            Prog::Xdp {
                ingress: self.ingress,
            },
            &frame,
        );
        (frame, r)
    }

    /// Through the tc program of external interfaces, which runs after XDP.
    fn run_tc(&mut self, pkt: &[u8]) -> bpf::Run {
        self.l.run(Prog::Tc(IfaceRole::External), pkt)
    }

    fn reason(&self, r: Reason) -> u64 {
        self.l.reason(r)
    }

    fn conntrack(
        &self,
        saddr: &str,
        sport: u16,
        daddr: &str,
        dport: u16,
        proto: u8,
    ) -> Option<CtValue> {
        self.l
            .conntrack(&bpf::ct_key(ip(saddr), sport, ip(daddr), dport, proto))
    }
}

/// What is wrong with `out` as a forwarded `input`: the next hop's MAC,
/// this interface's MAC, TTL one less, checksums as valid as they came,
/// payload and length as they came.
fn forwarding_fault(w: &World, input: &[u8], out: &[u8], dmac: [u8; 6]) -> Option<String> {
    let seen = packet::parse(out);
    let l4 = 14 + 20 + if seen.proto == packet::TCP { 20 } else { 8 };
    let faults = [
        (out[0..6] != dmac, "destination MAC is not the next hop's"),
        (
            out[6..12] != w.mac,
            "source MAC is not the egress interface's",
        ),
        (out.len() != input.len(), "length changed"),
        (out[22] + 1 != input[22], "TTL not decremented"),
        (!seen.ip_csum_ok, "IP checksum broken"),
        (
            seen.l4_csum_ok != packet::parse(input).l4_csum_ok,
            "L4 checksum validity changed",
        ),
        (out[l4..] != input[l4..], "payload changed"),
    ];
    let what: Vec<&str> = faults.iter().filter(|f| f.0).map(|f| f.1).collect();
    (!what.is_empty()).then(|| format!("{}: {seen:?}", what.join(", ")))
}

fn assert_forwarded(w: &World, input: &[u8], out: &[u8], dmac: [u8; 6]) -> packet::Seen {
    if let Some(f) = forwarding_fault(w, input, out, dmac) {
        panic!("{f}");
    }
    packet::parse(out)
}

#[test]
fn a_node_port_flow_to_a_remote_backend_is_forwarded_by_xdp_both_ways() {
    in_world(|w| {
        let mut syn = Builder::tcp(CLIENT, 40000, NODE, 30080, SYN);
        syn.payload = b"hello".to_vec();
        let (syn, out) = w.run(&syn.build());
        assert_eq!(out.verdict, XDP_REDIRECT);
        let s = assert_forwarded(w, &syn, &out.packet, PEER_NODE_MAC);
        assert_eq!(s.src, ip(NODE), "source-NATed to the node");
        assert!((SNAT_PORT_MIN..SNAT_PORT_MIN + SNAT_PORT_COUNT).contains(&s.sport));
        assert_eq!((s.dst, s.dport), (ip(REMOTE), 8080));
        assert_eq!(w.reason(Reason::SnatFlow), 1);
        assert_eq!(
            w.reason(Reason::XdpTx),
            1,
            "out of the interface it came in on"
        );

        // The backend's answer comes back to the node and leaves as the NodePort's.
        let reply = Builder::tcp(REMOTE, 8080, NODE, s.sport, SYN | ACK).build();
        let (reply, out) = w.run(&reply);
        assert_eq!(out.verdict, XDP_REDIRECT);
        let r = assert_forwarded(w, &reply, &out.packet, CLIENT_MAC);
        assert_eq!((r.src, r.sport), (ip(NODE), 30080));
        assert_eq!((r.dst, r.dport), (ip(CLIENT), 40000));
        assert_eq!(w.reason(Reason::ReplyTranslated), 1);

        // The rest of the flow follows conntrack.
        let (ack, out) = w.run(&Builder::tcp(CLIENT, 40000, NODE, 30080, ACK).build());
        assert_eq!(out.verdict, XDP_REDIRECT);
        let a = assert_forwarded(w, &ack, &out.packet, PEER_NODE_MAC);
        assert_eq!((a.sport, a.dst), (s.sport, s.dst));
        assert_eq!(w.reason(Reason::XdpTx), 3);
        assert_eq!(w.reason(Reason::XdpPassedToTc), 0);
    });
}

/// What XDP must leave of a packet.
enum Out {
    /// Source-NATed to the node and forwarded to `dst` (address, port) through the peer node.
    Forwarded(&'static str, u16),
    /// Passed to tc untouched, having recorded the flow with this backend,
    /// which tc then follows.
    ToTcWithBackend(&'static str),
    /// Passed to tc untouched, and no flow recorded.
    ToTcUnrecorded,
    Dropped,
}

/// One packet from the client to the node, and what XDP must do with it.
struct Case {
    name: &'static str,
    packet: Vec<u8>,
    verdict: u32,
    out: Out,
    /// What the packet adds to reason counters; 0: it must not count there.
    counts: &'static [(Reason, u64)],
}

/// The cases run in order on one world, each on a client port of its own.
fn cases() -> Vec<Case> {
    let tcp = |sport, port| Builder::tcp(CLIENT, sport, NODE, port, SYN);
    let udp = |sport, zero_csum| {
        let mut b = Builder::udp(CLIENT, sport, NODE, 30053);
        b.payload = vec![7; 33];
        b.udp_zero_csum = zero_csum;
        b.build()
    };
    let case = |name, packet, verdict, out, counts| Case {
        name,
        packet,
        verdict,
        out,
        counts,
    };
    let forwarded: &[(Reason, u64)] = &[(Reason::SnatFlow, 1), (Reason::XdpTx, 1)];
    let passed_on = &[(Reason::XdpPassedToTc, 1)];
    let unrecorded = &[(Reason::NewFlow, 0)];
    vec![
        case(
            "UDP to a remote backend has its checksum updated",
            udp(41000, false),
            XDP_REDIRECT,
            Out::Forwarded(REMOTE, 5353),
            forwarded,
        ),
        case(
            "UDP without checksum stays without",
            udp(41001, true),
            XDP_REDIRECT,
            Out::Forwarded(REMOTE, 5353),
            forwarded,
        ),
        case(
            "a backend on this node is tc's",
            tcp(42100, 30081).build(),
            XDP_PASS,
            Out::ToTcWithBackend("10.244.1.5"),
            // Not counted: nothing for XDP to try.
            &[(Reason::XdpPassedToTc, 0)],
        ),
        case(
            "a next hop not resolved yet is tc's",
            tcp(42101, 30082).build(),
            XDP_PASS,
            Out::ToTcWithBackend("10.244.3.7"),
            passed_on,
        ),
        case(
            "an egress interface without XDP is tc's",
            tcp(42102, 30083).build(),
            XDP_PASS,
            Out::ToTcWithBackend("10.244.4.7"),
            passed_on,
        ),
        case(
            "IP options are left to tc",
            {
                let mut b = tcp(42004, 30080);
                b.ip_options = 4;
                b.build()
            },
            XDP_PASS,
            Out::ToTcUnrecorded,
            unrecorded,
        ),
        case(
            "a first fragment is left to tc",
            {
                let mut b = Builder::udp(CLIENT, 42005, NODE, 30053);
                b.frag = 0x2000;
                b.build()
            },
            XDP_PASS,
            Out::ToTcUnrecorded,
            unrecorded,
        ),
        case(
            "a TTL about to expire is left to tc",
            {
                let mut p = tcp(42006, 30080).build();
                p[22] = 1;
                p[24..26].copy_from_slice(&[0, 0]);
                let c = packet::checksum(&p[14..34]);
                p[24..26].copy_from_slice(&c.to_be_bytes());
                p
            },
            XDP_PASS,
            Out::ToTcUnrecorded,
            unrecorded,
        ),
        case(
            "a port that is not a frontend is left to tc",
            tcp(42007, 22).build(),
            XDP_PASS,
            Out::ToTcUnrecorded,
            unrecorded,
        ),
        case(
            "an ICMP error is left to tc",
            {
                let quoted = Builder::tcp(NODE, 30080, CLIENT, 42008, ACK).build();
                packet::icmp_error("10.0.0.254", NODE, 3, 4, &quoted)
            },
            XDP_PASS,
            Out::ToTcUnrecorded,
            unrecorded,
        ),
        case(
            "a frame that is not IPv4 is left to tc",
            {
                let mut p = tcp(42009, 30080).build();
                p[12..14].copy_from_slice(&[0x86, 0xdd]);
                p
            },
            XDP_PASS,
            Out::ToTcUnrecorded,
            unrecorded,
        ),
        case(
            "a segment of an unknown flow is dropped in XDP",
            Builder::tcp(CLIENT, 43000, NODE, 30080, ACK).build(),
            XDP_DROP,
            Out::Dropped,
            &[(Reason::CtInvalid, 1)],
        ),
    ]
}

/// The flow tuple of a client's packet to the node, read from its bytes.
fn client_flow(pkt: &[u8]) -> (u16, u16, u8) {
    let ihl = ((pkt[14] & 0x0f) as usize) * 4;
    let port = |at: usize| u16::from_be_bytes([pkt[14 + ihl + at], pkt[15 + ihl + at]]);
    (port(0), port(2), pkt[23])
}

fn check_case(w: &mut World, c: &Case) -> anyhow::Result<()> {
    let counts = w.l.counts(c.counts);
    let (frame, run) = w.run(&c.packet);
    ensure!(
        run.verdict == c.verdict,
        "verdict {}, expected {}",
        run.verdict,
        c.verdict
    );
    if run.verdict == XDP_PASS {
        ensure!(
            run.packet == frame,
            "a passed packet is changed: {:02x?}",
            run.packet
        );
    }
    let (sport, dport, proto) = client_flow(&frame);
    match c.out {
        Out::Forwarded(dst, port) => {
            if let Some(f) = forwarding_fault(w, &frame, &run.packet, PEER_NODE_MAC) {
                anyhow::bail!("{f}");
            }
            let s = packet::parse(&run.packet);
            ensure!(s.src == ip(NODE), "not source-NATed to the node: {s:?}");
            ensure!(
                (s.dst, s.dport) == (ip(dst), port),
                "sent to {}:{}",
                s.dst,
                s.dport
            );
        }
        Out::ToTcWithBackend(backend) => {
            // The backend was drawn once, in XDP; tc follows the record.
            let ct = w.conntrack(CLIENT, sport, NODE, dport, proto);
            ensure!(
                ct.is_some_and(|v| v.nat_daddr == ip(backend).octets()),
                "no conntrack entry to {backend}: {ct:?}"
            );
            let hits = w.reason(Reason::CtHit);
            let s = packet::parse(&w.run_tc(&frame).packet);
            ensure!(s.dst == ip(backend), "tc sent it to {}", s.dst);
            ensure!(
                s.ip_csum_ok && s.l4_csum_ok == Some(true),
                "tc's checksums: {s:?}"
            );
            ensure!(
                w.reason(Reason::CtHit) == hits + 1,
                "tc did not find the flow"
            );
        }
        Out::ToTcUnrecorded => {
            let ct = w.conntrack(CLIENT, sport, NODE, dport, proto);
            ensure!(ct.is_none(), "a conntrack entry was left behind: {ct:?}");
        }
        Out::Dropped => {}
    }
    counts.check(&w.l)
}

#[test]
fn single_packets_get_the_verdict_and_output_of_their_case() {
    in_world(|w| bpf::check_table(&cases(), |c| c.name, |c| check_case(w, c)));
}

/// Generated packets around the world's flows, checked against the rules
/// XDP must keep whatever it is given.
#[test]
fn generated_packets_keep_the_xdp_rules() {
    in_world(|w| {
        let mut rng = Rng::for_test("xdp_prog generated packets");
        let mut verdicts: BTreeMap<u32, u64> = BTreeMap::new();
        let mut snat_ports: Vec<u16> = vec![];
        for i in 0..20_000 {
            let cport = 44000 + rng.below(50) as u16;
            let (port, _, _, _, _) = *rng.pick(&PORTS);
            let any = rng.next_u64() as u8;
            let flags = *rng.pick(&[SYN, ACK, SYN | ACK, 0x11, 0x04, any]);
            let mut b = match rng.below(4) {
                0 | 1 => Builder::tcp(CLIENT, cport, NODE, port, flags),
                2 if !snat_ports.is_empty() => {
                    let p = *rng.pick(&snat_ports);
                    Builder::tcp(REMOTE, 8080, NODE, p, flags)
                }
                _ => Builder::udp(
                    CLIENT,
                    cport,
                    NODE,
                    if rng.chance(50) { 30053 } else { port },
                ),
            };
            b.payload = vec![rng.next_u64() as u8; rng.below(40) as usize];
            b.udp_zero_csum = rng.below(7) == 0;
            let mut pkt = b.build();
            // Some damage: a flipped bit or a cut.
            match rng.below(8) {
                0 => {
                    let at = rng.below(pkt.len() as u64) as usize;
                    pkt[at] ^= 1 << rng.below(8);
                }
                1 => pkt.truncate(34 + rng.below(pkt.len() as u64 - 34) as usize),
                _ => {}
            }
            let (input, run) = w.run(&pkt);
            let out = &run.packet;
            *verdicts.entry(run.verdict).or_default() += 1;
            match run.verdict {
                XDP_PASS => assert_eq!(out, &input, "#{i}: a passed packet is untouched"),
                XDP_DROP => {
                    assert!(
                        pkt[23] == packet::TCP
                            && pkt[47] & (SYN | ACK | packet::FIN | packet::RST) != SYN,
                        "#{i}: only segments of unknown TCP flows are dropped: {pkt:02x?}"
                    );
                }
                XDP_REDIRECT => {
                    let seen = packet::parse(out);
                    assert_eq!(out[22] + 1, input[22], "#{i}");
                    assert!(seen.ip_csum_ok || !packet::parse(&input).ip_csum_ok, "#{i}");
                    // A damaged checksum stays damaged; a good one stays good.
                    assert_eq!(
                        seen.l4_csum_ok,
                        packet::parse(&input).l4_csum_ok,
                        "#{i}: {input:02x?} -> {out:02x?}"
                    );
                    if seen.dst == ip(REMOTE) && seen.proto == packet::TCP {
                        snat_ports.push(seen.sport);
                    }
                }
                other => panic!("#{i}: verdict {other} for {pkt:02x?}"),
            }
        }
        for v in [XDP_PASS, XDP_DROP, XDP_REDIRECT] {
            assert!(
                verdicts.get(&v).copied().unwrap_or(0) >= 100,
                "verdict {v} too rare: {verdicts:?}"
            );
        }
    });
}

const NODE6: &str = "fd00:50::1";
const CLIENT6: &str = "fd00:50::100";
const PEER_NODE6: &str = "fd00:50::20";
const REMOTE6: &str = "fd00:10:244:2::11";

fn ip6(s: &str) -> Ipv6Addr {
    s.parse().unwrap()
}

/// The IPv6 counterpart of `network`: ext0 facing the client and the peer
/// node, a route to the remote backend's range through the peer node.
fn network6() -> anyhow::Result<FibNamespace> {
    let fib = FibNamespace::new("xdp6")?;
    // Addresses usable at once (no duplicate detection), and forwarding on,
    // without which the IPv6 FIB lookup answers "forwarding disabled".
    for k in [
        "net.ipv6.conf.all.accept_dad",
        "net.ipv6.conf.default.accept_dad",
        "net.ipv6.conf.all.forwarding",
        "net.ipv6.conf.default.forwarding",
    ] {
        let v = if k.ends_with("accept_dad") { "0" } else { "1" };
        fib.ns.sysctl(k, v)?;
    }
    fib.link("ext0", "wire0", "fd00:50::1/64")?
        .neighbour(PEER_NODE6, PEER_NODE_MAC, "ext0")?
        .neighbour(CLIENT6, CLIENT_MAC, "ext0")?
        .route("fd00:10:244:2::/64", &["via", PEER_NODE6])?;
    Ok(fib)
}

fn plan6() -> Plan {
    let mut plan = Plan::default();
    for (port, proto, bport) in [(30080, Protocol::Tcp, 8080), (30053, Protocol::Udp, 5353)] {
        plan.frontends.insert(
            FrontendKey {
                addr: Ipv6Addr::UNSPECIFIED.into(),
                port,
                proto,
            },
            bpf::frontend(
                &format!("xdp6/np-{port}"),
                FrontendKind::NodePort,
                vec![bpf::backend(ip6(REMOTE6), bport, false)],
            ),
        );
    }
    plan
}

fn in_world6(test: impl FnOnce(&mut World) + Send + 'static) {
    let fib = network6().unwrap();
    let mac = fib.mac("ext0").unwrap();
    fib.ns
        .within(move || {
            let mut l = Loaded::with_plan("xdp6t", &bpf::sizes(1024, 1 << 16), &plan6()).unwrap();
            let ingress = l.attach_xdp("ext0").unwrap();
            l.set_node_addr6(ip6(NODE6)).unwrap();
            test(&mut World { l, ingress, mac })
        })
        .expect("the test in the world's namespace passed");
}

/// `out` as `input` forwarded: the next hop's and this interface's MACs,
/// hop limit one less, the L4 checksum valid, payload and length kept.
/// Returns the tuple it carries.
fn assert_forwarded6(
    w: &World,
    input: &[u8],
    out: &[u8],
    dmac: [u8; 6],
) -> (Ipv6Addr, u16, Ipv6Addr, u16) {
    assert_eq!(out[0..6], dmac, "destination MAC is the next hop's");
    assert_eq!(out[6..12], w.mac, "source MAC is the egress interface's");
    assert_eq!(out.len(), input.len(), "length kept");
    assert_eq!(out[21] + 1, input[21], "hop limit decremented");
    let l4 = 14 + 40 + if input[20] == packet::TCP { 20 } else { 8 };
    assert_eq!(out[l4..], input[l4..], "payload kept");
    let (src, sport, dst, dport, ok) = packet::parse6(out);
    assert!(ok, "L4 checksum valid after the rewrite");
    (src, sport, dst, dport)
}

#[test]
fn an_ipv6_node_port_flow_to_a_remote_backend_is_forwarded_by_xdp_both_ways() {
    in_world6(|w| {
        let mut syn = Builder::tcp(CLIENT6, 40000, NODE6, 30080, SYN);
        syn.payload = b"hello".to_vec();
        let (syn, out) = w.run(&syn.build());
        assert_eq!(out.verdict, XDP_REDIRECT);
        let (src, sport, dst, dport) = assert_forwarded6(w, &syn, &out.packet, PEER_NODE_MAC);
        assert_eq!(src, ip6(NODE6), "source-NATed to the node");
        assert!((SNAT_PORT_MIN..SNAT_PORT_MIN + SNAT_PORT_COUNT).contains(&sport));
        assert_eq!((dst, dport), (ip6(REMOTE6), 8080));
        assert_eq!(w.reason(Reason::SnatFlow), 1);
        assert_eq!(w.reason(Reason::XdpTx), 1);

        // The backend's answer leaves as the NodePort's, to the client.
        let reply = Builder::tcp(REMOTE6, 8080, NODE6, sport, SYN | ACK).build();
        let (reply, out) = w.run(&reply);
        assert_eq!(out.verdict, XDP_REDIRECT);
        let r = assert_forwarded6(w, &reply, &out.packet, CLIENT_MAC);
        assert_eq!(r, (ip6(NODE6), 30080, ip6(CLIENT6), 40000));
        assert_eq!(w.reason(Reason::ReplyTranslated), 1);

        // The rest of the flow follows conntrack.
        let (ack, out) = w.run(&Builder::tcp(CLIENT6, 40000, NODE6, 30080, ACK).build());
        assert_eq!(out.verdict, XDP_REDIRECT);
        let a = assert_forwarded6(w, &ack, &out.packet, PEER_NODE_MAC);
        assert_eq!((a.1, a.2), (sport, ip6(REMOTE6)));
        assert_eq!(w.reason(Reason::CtHit), 1);

        // UDP: the checksum follows the addresses and ports.
        let mut udp = Builder::udp(CLIENT6, 41000, NODE6, 30053);
        udp.payload = vec![7; 33];
        let (udp, out) = w.run(&udp.build());
        assert_eq!(out.verdict, XDP_REDIRECT);
        let u = assert_forwarded6(w, &udp, &out.packet, PEER_NODE_MAC);
        assert_eq!((u.0, u.2, u.3), (ip6(NODE6), ip6(REMOTE6), 5353));
        assert_eq!(w.reason(Reason::XdpTx), 4);
        assert_eq!(w.reason(Reason::XdpPassedToTc), 0);
    });
}

#[test]
fn ipv6_packets_xdp_cannot_forward_go_to_tc_untouched() {
    in_world6(|w| {
        // UDP without checksum is never translated over IPv6 (tc counts it).
        let mut zero = Builder::udp(CLIENT6, 41001, NODE6, 30053);
        zero.udp_zero_csum = true;
        // A hop limit of 1 would expire here.
        let mut last_hop = Builder::tcp(CLIENT6, 42000, NODE6, 30080, SYN).build();
        last_hop[21] = 1;
        // A hop-by-hop header (padding only) before TCP.
        let hop_by_hop = {
            let plain = Builder::tcp(CLIENT6, 42001, NODE6, 30080, SYN).build();
            let mut p = plain[..54].to_vec();
            p[20] = 0;
            let payload = u16::from_be_bytes([p[18], p[19]]) + 8;
            p[18..20].copy_from_slice(&payload.to_be_bytes());
            p.extend_from_slice(&[packet::TCP, 0, 1, 4, 0, 0, 0, 0]);
            p.extend_from_slice(&plain[54..]);
            p
        };
        for (what, pkt) in [
            ("zero UDP checksum", zero.build()),
            ("hop limit 1", last_hop),
            ("extension header", hop_by_hop),
        ] {
            let (sent, out) = w.run(&pkt);
            assert_eq!(out.verdict, XDP_PASS, "{what}");
            assert_eq!(out.packet, sent, "{what}: untouched");
        }
        for r in [Reason::NewFlow, Reason::XdpPassedToTc, Reason::XdpTx] {
            assert_eq!(w.reason(r), 0, "{r:?}: nothing opened or sent");
        }
    });
}
