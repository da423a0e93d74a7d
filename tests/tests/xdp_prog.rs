//! The XDP program through BPF_PROG_TEST_RUN, inside a namespace of its own
//! whose routes and neighbours the program's FIB lookups see: what it
//! forwards (source-NATed NodePort flows and their replies) comes out
//! translated with valid checksums, the next hop's MACs and a decremented
//! TTL; everything else comes out untouched for tc, which follows the
//! backend XDP recorded for a new flow. Ends with generated packets checked
//! against these rules.
use std::{collections::BTreeMap, net::Ipv4Addr, sync::mpsc, thread};

use aya::programs::{TestRun, TestRunOptions};
use integration_tests::{
    PinDir,
    netns::Netns,
    packet::{self, ACK, Builder, SYN},
    unique,
};
use service_agent::{
    dataplane::{Dataplane, IfaceRole, MapSizes, XdpMode},
    plan::{BackendAddr, FrontendKey, FrontendKind, FrontendPlan, Plan, Protocol},
};
use service_common::*;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

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

/// Requests to the test thread that owns the loaded dataplane (it lives in
/// the world's namespace, where the FIB lookups happen).
enum Ask {
    Run(Vec<u8>, mpsc::Sender<(u32, Vec<u8>)>),
    /// Through the tc program of external interfaces, which runs after XDP.
    RunTc(Vec<u8>, mpsc::Sender<(u32, Vec<u8>)>),
    Reason(Reason, mpsc::Sender<u64>),
    Conntrack(CtKey, mpsc::Sender<Option<CtValue>>),
}

struct World {
    asks: Option<mpsc::Sender<Ask>>,
    worker: Option<thread::JoinHandle<()>>,
    ifindex: u32,
    mac: [u8; 6],
    _ns: Netns,
}

impl Drop for World {
    fn drop(&mut self) {
        drop(self.asks.take());
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

fn mac_of(ns: &Netns, iface: &str) -> [u8; 6] {
    let out = ns.ip(&["-br", "link", "show", iface]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mac = text.split_whitespace().nth(2).unwrap();
    let v: Vec<u8> = mac
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect();
    v.try_into().unwrap()
}

fn world() -> World {
    let ns = Netns::new(&unique("xdpw")).unwrap();
    for args in [
        &[
            "link", "add", "ext0", "type", "veth", "peer", "name", "wire0",
        ][..],
        &[
            "link", "add", "ext1", "type", "veth", "peer", "name", "wire1",
        ],
        &["addr", "add", "192.168.50.1/24", "dev", "ext0"],
        &["addr", "add", "192.168.51.1/24", "dev", "ext1"],
        &["link", "set", "ext0", "up"],
        &["link", "set", "wire0", "up"],
        &["link", "set", "ext1", "up"],
        &["link", "set", "wire1", "up"],
        &[
            "neigh",
            "add",
            "192.168.50.20",
            "lladdr",
            "02:00:00:00:00:20",
            "dev",
            "ext0",
            "nud",
            "permanent",
        ],
        &[
            "neigh",
            "add",
            CLIENT,
            "lladdr",
            "02:00:00:00:01:00",
            "dev",
            "ext0",
            "nud",
            "permanent",
        ],
        &[
            "neigh",
            "add",
            "192.168.51.20",
            "lladdr",
            "02:00:00:00:00:33",
            "dev",
            "ext1",
            "nud",
            "permanent",
        ],
        &["route", "add", "10.244.2.0/24", "via", "192.168.50.20"],
        &["route", "add", "10.244.3.0/24", "via", "192.168.50.30"],
        &["route", "add", "10.244.4.0/24", "via", "192.168.51.20"],
        &["route", "add", "10.244.1.0/24", "dev", "wire1"],
    ] {
        ns.ip(args).unwrap();
    }
    ns.sysctl("net.ipv4.ip_forward", "1").unwrap();
    let mac = mac_of(&ns, "ext0");
    let (tx, rx) = mpsc::channel::<Ask>();
    let (ready_tx, ready_rx) = mpsc::channel::<u32>();
    let worker = ns
        .spawn(move || {
            let pins = PinDir::new("xdpt");
            let sizes = MapSizes {
                frontends: 1024,
                services: 1024,
                backends: 1024,
                conntrack: 1 << 16,
                affinity: 1024,
            };
            let mut dp = Dataplane::load(pins.0.clone(), &sizes).expect("the programs load");
            dp.attach_xdp("ext0", XdpMode::Generic).unwrap();
            let standing = dp.sync_xdp_egress(XdpMode::Generic);
            assert_eq!(standing.len(), 1, "{standing:?}");
            let mut plan = Plan::default();
            for (port, proto, addr, bport, local) in PORTS {
                plan.frontends.insert(
                    FrontendKey {
                        addr: Ipv4Addr::UNSPECIFIED,
                        port,
                        proto,
                    },
                    FrontendPlan {
                        service: format!("xdp/np-{port}"),
                        port_name: String::new(),
                        kind: FrontendKind::NodePort,
                        backends: vec![BackendAddr {
                            addr: addr.parse().unwrap(),
                            port: bport,
                            local,
                        }],
                        affinity_timeout_s: None,
                        reject_when_empty: true,
                        source_ranges: vec![],
                    },
                );
            }
            let report = dp.writer.apply(&mut dp.tables, &plan);
            assert!(report.errors.is_empty(), "{:?}", report.errors);
            let node: Ipv4Addr = NODE.parse().unwrap();
            dp.writer.set_node_addrs(&mut dp.tables, &[node]).unwrap();
            dp.writer.set_snat_addr(&mut dp.tables, Some(node)).unwrap();
            let ifindex = nix::net::if_::if_nametoindex("ext0").unwrap();
            ready_tx.send(ifindex).unwrap();
            while let Ok(ask) = rx.recv() {
                match ask {
                    Ask::Run(pkt, reply) => {
                        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, ...
                        let mut ctx = [0u8; 24];
                        ctx[4..8].copy_from_slice(&(pkt.len() as u32).to_ne_bytes());
                        ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
                        let mut out = vec![0u8; 2048];
                        let r = dp
                            .xdp_program()
                            .unwrap()
                            .test_run(TestRunOptions {
                                data_in: Some(&pkt),
                                data_out: Some(&mut out),
                                ctx_in: Some(&ctx),
                                ..Default::default()
                            })
                            .expect("BPF_PROG_TEST_RUN");
                        out.truncate(r.data_size_out as usize);
                        let _ = reply.send((r.return_value, out));
                    }
                    Ask::RunTc(pkt, reply) => {
                        let mut out = vec![0u8; 2048];
                        let r = dp
                            .program(IfaceRole::External)
                            .unwrap()
                            .test_run(TestRunOptions {
                                data_in: Some(&pkt),
                                data_out: Some(&mut out),
                                ..Default::default()
                            })
                            .expect("BPF_PROG_TEST_RUN");
                        out.truncate(r.data_size_out as usize);
                        let _ = reply.send((r.return_value, out));
                    }
                    Ask::Reason(reason, reply) => {
                        let n = dp
                            .tables
                            .reasons
                            .get(&(reason as u32), 0)
                            .unwrap()
                            .iter()
                            .sum();
                        let _ = reply.send(n);
                    }
                    Ask::Conntrack(key, reply) => {
                        let _ = reply.send(dp.tables.conntrack.get(&key, 0).ok());
                    }
                }
            }
        })
        .unwrap();
    let ifindex = ready_rx.recv().expect("the dataplane thread came up");
    World {
        asks: Some(tx),
        worker: Some(worker),
        ifindex,
        mac,
        _ns: ns,
    }
}

impl World {
    fn ask<T>(&self, make: impl FnOnce(mpsc::Sender<T>) -> Ask) -> T {
        let (tx, rx) = mpsc::channel();
        self.asks.as_ref().unwrap().send(make(tx)).unwrap();
        rx.recv().unwrap()
    }

    /// Runs `pkt` (its Ethernet destination set to this node) through XDP.
    fn run(&self, pkt: &[u8]) -> (u32, Vec<u8>) {
        let mut pkt = pkt.to_vec();
        if pkt.len() >= 12 {
            pkt[0..6].copy_from_slice(&self.mac);
            pkt[6..12].copy_from_slice(&CLIENT_MAC);
        }
        let input = pkt.clone();
        let (rc, out) = self.ask(|tx| Ask::Run(pkt, tx));
        if rc == XDP_PASS {
            assert_eq!(out, input, "a passed packet is untouched");
        }
        (rc, out)
    }

    fn run_tc(&self, pkt: &[u8]) -> (u32, Vec<u8>) {
        let pkt = pkt.to_vec();
        self.ask(|tx| Ask::RunTc(pkt, tx))
    }

    fn reason(&self, r: Reason) -> u64 {
        self.ask(|tx| Ask::Reason(r, tx))
    }

    fn conntrack(&self, key: CtKey) -> Option<CtValue> {
        self.ask(|tx| Ask::Conntrack(key, tx))
    }
}

fn ct_key(saddr: &str, sport: u16, daddr: &str, dport: u16, proto: u8) -> CtKey {
    CtKey {
        saddr: saddr.parse::<Ipv4Addr>().unwrap().octets(),
        daddr: daddr.parse::<Ipv4Addr>().unwrap().octets(),
        sport,
        dport,
        proto,
        _pad: [0; 3],
    }
}

/// A forwarded frame: the next hop's MAC, this interface's MAC, TTL one
/// less, both checksums valid, payload and length as they came.
fn assert_forwarded(w: &World, input: &[u8], out: &[u8], dmac: [u8; 6]) -> packet::Seen {
    assert_eq!(&out[0..6], &dmac, "destination MAC of the next hop");
    assert_eq!(&out[6..12], &w.mac, "source MAC of the egress interface");
    assert_eq!(out.len(), input.len());
    assert_eq!(out[22], input[22] - 1, "TTL decremented");
    let seen = packet::parse(out);
    assert!(seen.ip_csum_ok, "{seen:?}");
    assert_ne!(seen.l4_csum_ok, Some(false), "{seen:?}");
    let l4 = 14 + 20 + if seen.proto == packet::TCP { 20 } else { 8 };
    assert_eq!(&out[l4..], &input[l4..], "payload untouched");
    seen
}

#[test]
fn a_node_port_flow_to_a_remote_backend_is_forwarded_by_xdp_both_ways() {
    let w = world();
    let mut syn = Builder::tcp(CLIENT, 40000, NODE, 30080, SYN);
    syn.payload = b"hello".to_vec();
    let syn = syn.build();
    let (rc, out) = w.run(&syn);
    assert_eq!(rc, XDP_REDIRECT);
    let s = assert_forwarded(&w, &syn, &out, PEER_NODE_MAC);
    assert_eq!(
        s.src,
        NODE.parse::<Ipv4Addr>().unwrap(),
        "source-NATed to the node"
    );
    assert!((SNAT_PORT_MIN..SNAT_PORT_MIN + SNAT_PORT_COUNT).contains(&s.sport));
    assert_eq!((s.dst, s.dport), (REMOTE.parse().unwrap(), 8080));
    assert_eq!(w.reason(Reason::SnatFlow), 1);
    assert_eq!(
        w.reason(Reason::XdpTx),
        1,
        "out of the interface it came in on"
    );

    // The backend's answer comes back to the node and leaves as the NodePort's.
    let reply = Builder::tcp(REMOTE, 8080, NODE, s.sport, SYN | ACK).build();
    let (rc, out) = w.run(&reply);
    assert_eq!(rc, XDP_REDIRECT);
    let r = assert_forwarded(&w, &reply, &out, CLIENT_MAC);
    assert_eq!((r.src, r.sport), (NODE.parse().unwrap(), 30080));
    assert_eq!((r.dst, r.dport), (CLIENT.parse().unwrap(), 40000));
    assert_eq!(w.reason(Reason::ReplyTranslated), 1);

    // The rest of the flow follows conntrack.
    let ack = Builder::tcp(CLIENT, 40000, NODE, 30080, ACK).build();
    let (rc, out) = w.run(&ack);
    assert_eq!(rc, XDP_REDIRECT);
    let a = assert_forwarded(&w, &ack, &out, PEER_NODE_MAC);
    assert_eq!((a.sport, a.dst), (s.sport, s.dst));
    assert_eq!(w.reason(Reason::XdpTx), 3);
    assert_eq!(w.reason(Reason::XdpPassedToTc), 0);
}

#[test]
fn udp_checksums_are_updated_and_a_zero_checksum_stays_zero() {
    let w = world();
    for zero in [false, true] {
        let mut b = Builder::udp(CLIENT, 41000 + zero as u16, NODE, 30053);
        b.payload = vec![7; 33];
        b.udp_zero_csum = zero;
        let pkt = b.build();
        let (rc, out) = w.run(&pkt);
        assert_eq!(rc, XDP_REDIRECT);
        let s = assert_forwarded(&w, &pkt, &out, PEER_NODE_MAC);
        assert_eq!((s.dst, s.dport), (REMOTE.parse().unwrap(), 5353));
        if zero {
            assert_eq!(s.l4_csum_ok, None, "a zero UDP checksum stays zero");
        } else {
            assert_eq!(s.l4_csum_ok, Some(true));
        }
    }
}

#[test]
fn flows_xdp_cannot_forward_go_to_tc_untouched_with_their_backend_recorded() {
    let w = world();
    // (what, port, backend, counted as passed to tc)
    let cases = [
        ("backend on this node", 30081, "10.244.1.5", false),
        ("next hop not resolved", 30082, "10.244.3.7", true),
        ("egress without XDP", 30083, "10.244.4.7", true),
    ];
    for (k, (what, port, backend, counted)) in cases.into_iter().enumerate() {
        let sport = 42100 + k as u16;
        let syn = Builder::tcp(CLIENT, sport, NODE, port, SYN).build();
        let passed = w.reason(Reason::XdpPassedToTc);
        let (rc, _) = w.run(&syn);
        assert_eq!(rc, XDP_PASS, "{what}");
        assert_eq!(
            w.reason(Reason::XdpPassedToTc),
            passed + counted as u64,
            "{what}"
        );
        // The backend was drawn once, in XDP; tc follows the record.
        let ct = w
            .conntrack(ct_key(CLIENT, sport, NODE, port, IPPROTO_TCP))
            .unwrap_or_else(|| panic!("{what}: no conntrack entry"));
        assert_eq!(ct.nat_daddr, backend.parse::<Ipv4Addr>().unwrap().octets());
        let hits = w.reason(Reason::CtHit);
        let (_, out) = w.run_tc(&syn);
        let s = packet::parse(&out);
        assert_eq!(s.dst, backend.parse::<Ipv4Addr>().unwrap(), "{what}");
        assert!(s.ip_csum_ok && s.l4_csum_ok == Some(true), "{what}: {s:?}");
        assert_eq!(
            w.reason(Reason::CtHit),
            hits + 1,
            "{what}: tc found the flow"
        );
    }
}

#[test]
fn packets_xdp_leaves_alone_go_to_tc_untouched_and_unrecorded() {
    let w = world();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("IP options", {
            let mut b = Builder::tcp(CLIENT, 42004, NODE, 30080, SYN);
            b.ip_options = 4;
            b.build()
        }),
        ("first fragment", {
            let mut b = Builder::udp(CLIENT, 42005, NODE, 30053);
            b.frag = 0x2000;
            b.build()
        }),
        ("TTL about to expire", {
            let mut p = Builder::tcp(CLIENT, 42006, NODE, 30080, SYN).build();
            p[22] = 1;
            p[24] = 0;
            p[25] = 0;
            let c = packet::checksum(&p[14..34]);
            p[24..26].copy_from_slice(&c.to_be_bytes());
            p
        }),
        (
            "not a frontend",
            Builder::tcp(CLIENT, 42007, NODE, 22, SYN).build(),
        ),
        ("ICMP error", {
            let quoted = Builder::tcp(NODE, 30080, CLIENT, 42008, ACK).build();
            packet::icmp_error("10.0.0.254", NODE, 3, 4, &quoted)
        }),
        ("not IPv4", {
            let mut p = Builder::tcp(CLIENT, 42009, NODE, 30080, SYN).build();
            p[12..14].copy_from_slice(&[0x86, 0xdd]);
            p
        }),
    ];
    for (what, pkt) in cases {
        let (rc, _) = w.run(&pkt);
        assert_eq!(rc, XDP_PASS, "{what}");
        let ihl = ((pkt[14] & 0x0f) as usize) * 4;
        let sport = u16::from_be_bytes([pkt[14 + ihl], pkt[15 + ihl]]);
        let dport = u16::from_be_bytes([pkt[16 + ihl], pkt[17 + ihl]]);
        assert!(
            w.conntrack(ct_key(CLIENT, sport, NODE, dport, pkt[23]))
                .is_none(),
            "{what}: a conntrack entry was left behind"
        );
    }
    assert_eq!(w.reason(Reason::NewFlow), 0);
}

#[test]
fn segments_of_unknown_flows_are_dropped_in_xdp() {
    let w = world();
    let (rc, _) = w.run(&Builder::tcp(CLIENT, 43000, NODE, 30080, ACK).build());
    assert_eq!(rc, XDP_DROP);
    assert_eq!(w.reason(Reason::CtInvalid), 1);
}

/// Generated packets around the world's flows, checked against the rules
/// XDP must keep whatever it is given.
#[test]
fn generated_packets_keep_the_xdp_rules() {
    let w = world();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut verdicts: BTreeMap<u32, u64> = BTreeMap::new();
    let mut snat_ports: Vec<u16> = vec![];
    let n = 20_000;
    for i in 0..n {
        let r = next();
        let cport = 44000 + (r % 50) as u16;
        let (port, _, _, _, _) = PORTS[(r >> 8) as usize % PORTS.len()];
        let flags = [SYN, ACK, SYN | ACK, 0x11, 0x04, (r >> 16) as u8][(r >> 24) as usize % 6];
        let mut b = match (r >> 32) % 4 {
            0 | 1 => Builder::tcp(CLIENT, cport, NODE, port, flags),
            2 if !snat_ports.is_empty() => {
                let p = snat_ports[(r >> 40) as usize % snat_ports.len()];
                Builder::tcp(REMOTE, 8080, NODE, p, flags)
            }
            _ => Builder::udp(CLIENT, cport, NODE, if r & 1 == 0 { 30053 } else { port }),
        };
        b.payload = vec![(r >> 48) as u8; (r >> 52) as usize % 40];
        b.udp_zero_csum = (r >> 56) % 7 == 0;
        let mut pkt = b.build();
        // Some damage: a flipped bit or a cut.
        match (r >> 60) % 8 {
            0 => {
                let at = (next() as usize) % pkt.len();
                pkt[at] ^= 1 << (next() % 8);
            }
            1 => pkt.truncate(34 + (next() as usize) % (pkt.len() - 34)),
            _ => {}
        }
        let (rc, out) = w.run(&pkt);
        *verdicts.entry(rc).or_default() += 1;
        match rc {
            XDP_PASS => {}
            XDP_DROP => {
                assert!(
                    pkt[23] == packet::TCP && pkt[47] & (SYN | ACK) != SYN,
                    "#{i}: only segments of unknown TCP flows are dropped: {pkt:02x?}"
                );
            }
            XDP_REDIRECT => {
                let mut input = pkt.clone();
                input[0..6].copy_from_slice(&w.mac);
                let seen = packet::parse(&out);
                assert_eq!(out[22] + 1, input[22], "#{i}");
                assert!(seen.ip_csum_ok || !packet::parse(&input).ip_csum_ok, "#{i}");
                // A damaged checksum stays damaged; a good one stays good.
                assert_eq!(
                    seen.l4_csum_ok,
                    packet::parse(&input).l4_csum_ok,
                    "#{i}: {input:02x?} -> {out:02x?}"
                );
                if seen.dst == REMOTE.parse::<Ipv4Addr>().unwrap() && seen.proto == packet::TCP {
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
    let _ = w.ifindex;
}
