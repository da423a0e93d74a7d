//! The tc program through BPF_PROG_TEST_RUN: craft a packet, run the
//! program, check the packet it leaves and the maps. No interface is
//! attached. Single packets are a table of cases; flows whose later packets
//! depend on the first are one test each.
use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::{bail, ensure};
use integration_tests::{
    bpf::{self, Loaded, Prog, TC_ACT_OK, TC_ACT_REDIRECT},
    oracle::{self, Expect, Tuple},
    packet::{self, ACK, Builder, FIN, RST, SYN},
};
use service_agent::{
    dataplane::{Dataplane, IfaceRole, MapSizes},
    plan::{FrontendKey, FrontendKind, FrontendPlan, Plan, Protocol},
};
use service_common::*;

const POD: Prog = Prog::Tc(IfaceRole::Pod);

const VIP: &str = "10.96.0.10";
/// A ClusterIP without endpoints: it rejects.
const EMPTY: &str = "10.96.0.20";
/// A ClusterIP whose one endpoint is the client pod itself.
const SELF_VIP: &str = "10.96.0.30";
const CLIENT: &str = "10.244.0.20";
const BACKEND: &str = "10.244.0.11";

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn frontend(backends: &[(&str, u16)], affinity: Option<u32>) -> FrontendPlan {
    let backends = backends
        .iter()
        .map(|(a, p)| bpf::backend(ip(a), *p, true))
        .collect();
    let mut f = bpf::frontend("default/web", FrontendKind::ClusterIp, backends);
    f.affinity_timeout_s = affinity;
    f
}

fn key(addr: &str, port: u16, proto: Protocol) -> FrontendKey {
    FrontendKey {
        addr: ip(addr).into(),
        port,
        proto,
    }
}

fn load(frontends: Vec<(FrontendKey, FrontendPlan)>) -> Loaded {
    let plan = Plan {
        frontends: frontends.into_iter().collect::<BTreeMap<_, _>>(),
        ..Default::default()
    };
    Loaded::with_plan("svct", &bpf::sizes(1024, 1024), &plan).unwrap()
}

/// Service web on VIP, TCP 80 and UDP 53, both to `backends`.
fn web(backends: &[(&str, u16)]) -> Loaded {
    load(vec![
        (key(VIP, 80, Protocol::Tcp), frontend(backends, None)),
        (key(VIP, 53, Protocol::Udp), frontend(backends, None)),
    ])
}

fn run(l: &mut Loaded, pkt: &[u8]) -> (u32, Vec<u8>) {
    let r = l.run(POD, pkt);
    (r.verdict, r.packet)
}

fn tuple(src: &str, sport: u16, dst: &str, dport: u16, proto: u8) -> Tuple {
    Tuple {
        saddr: ip(src).octets(),
        daddr: ip(dst).octets(),
        sport,
        dport,
        proto,
    }
}

/// One packet, run on its own, and what the program must make of it.
struct Case {
    name: &'static str,
    packet: Vec<u8>,
    /// The verdict and the packet it leaves (Unchanged and Rewritten pass,
    /// Drop drops, Reset and PortUnreachable are sent back).
    expect: Expect,
    /// What the packet adds to reason counters; 0: it must not count there.
    counts: &'static [(Reason, u64)],
}

fn case(
    name: &'static str,
    packet: Vec<u8>,
    expect: Expect,
    counts: &'static [(Reason, u64)],
) -> Case {
    Case {
        name,
        packet,
        expect,
        counts,
    }
}

/// The table's frontends: VIP with a backend, EMPTY without, SELF_VIP to the client itself.
fn table_world() -> Loaded {
    let one = [(BACKEND, 8080)];
    load(vec![
        (key(VIP, 80, Protocol::Tcp), frontend(&one, None)),
        (
            key(VIP, 53, Protocol::Udp),
            frontend(&[(BACKEND, 5353)], None),
        ),
        (key(EMPTY, 80, Protocol::Tcp), frontend(&[], None)),
        (key(EMPTY, 53, Protocol::Udp), frontend(&[], None)),
        (
            key(SELF_VIP, 80, Protocol::Tcp),
            frontend(&[(CLIENT, 8080)], None),
        ),
    ])
}

/// The cases run in order on one dataplane; each uses a client port of its
/// own, so a case meets another's flow only where it says so ("its reply").
fn cases() -> Vec<Case> {
    let rewritten = |to: Tuple| Expect::Rewritten { to, l4: true };
    let tcp = |sport, dst, dport, flags| Builder::tcp(CLIENT, sport, dst, dport, flags);
    let with = |mut b: Builder, f: &dyn Fn(&mut Builder)| {
        f(&mut b);
        b.build()
    };
    let damaged = |sport, f: &dyn Fn(&mut Vec<u8>)| {
        let mut p = tcp(sport, VIP, 80, SYN).build();
        f(&mut p);
        p
    };
    let rejected_udp = with(Builder::udp(CLIENT, 5002, EMPTY, 53), &|b| {
        b.payload = b"0123456789abcdef".to_vec()
    });
    let untranslated_error = packet::icmp_error(
        "10.0.0.254",
        CLIENT,
        3,
        4,
        &tcp(41000, "10.244.0.99", 80, ACK).build(),
    );
    vec![
        case(
            "a SYN to the ClusterIP is translated to the backend",
            tcp(40000, VIP, 80, SYN).build(),
            rewritten(tuple(CLIENT, 40000, BACKEND, 8080, packet::TCP)),
            &[(Reason::NewFlow, 1)],
        ),
        case(
            "a UDP datagram to the ClusterIP has its checksum updated",
            with(Builder::udp(CLIENT, 5000, VIP, 53), &|b| {
                b.payload = b"query".to_vec()
            }),
            rewritten(tuple(CLIENT, 5000, BACKEND, 5353, packet::UDP)),
            &[(Reason::NewFlow, 1)],
        ),
        case(
            "a UDP datagram without checksum stays without",
            with(Builder::udp(CLIENT, 5001, VIP, 53), &|b| {
                b.udp_zero_csum = true
            }),
            rewritten(tuple(CLIENT, 5001, BACKEND, 5353, packet::UDP)),
            &[],
        ),
        case(
            "IP options are carried through translation",
            with(tcp(40001, VIP, 80, SYN), &|b| b.ip_options = 8),
            rewritten(tuple(CLIENT, 40001, BACKEND, 8080, packet::TCP)),
            &[],
        ),
        case(
            "a pod picked as its own backend is source-translated to the ClusterIP",
            tcp(40002, SELF_VIP, 80, SYN).build(),
            rewritten(tuple(SELF_VIP, 40002, CLIENT, 8080, packet::TCP)),
            &[],
        ),
        case(
            "its reply goes back to the pod from the ClusterIP",
            Builder::tcp(CLIENT, 8080, SELF_VIP, 40002, SYN | ACK).build(),
            rewritten(tuple(SELF_VIP, 80, CLIENT, 40002, packet::TCP)),
            &[(Reason::ReplyTranslated, 1)],
        ),
        case(
            "an ACK of an unknown flow is dropped, not sent to a random backend",
            tcp(40003, VIP, 80, ACK).build(),
            Expect::Drop,
            &[(Reason::CtInvalid, 1), (Reason::NewFlow, 0)],
        ),
        case(
            "a SYN|ACK of an unknown flow is dropped",
            tcp(40004, VIP, 80, SYN | ACK).build(),
            Expect::Drop,
            &[(Reason::CtInvalid, 1), (Reason::NewFlow, 0)],
        ),
        case(
            "a SYN|FIN opens no flow",
            tcp(40010, VIP, 80, SYN | FIN).build(),
            Expect::Drop,
            &[(Reason::CtInvalid, 1), (Reason::NewFlow, 0)],
        ),
        case(
            "a SYN|RST opens no flow",
            tcp(40011, VIP, 80, SYN | RST).build(),
            Expect::Drop,
            &[(Reason::CtInvalid, 1), (Reason::NewFlow, 0)],
        ),
        case(
            "a SYN to a frontend without backends is answered with a reset",
            with(tcp(40005, EMPTY, 80, SYN), &|b| b.seq = 7777),
            Expect::Reset {
                from: tuple(EMPTY, 80, CLIENT, 40005, packet::TCP),
                seq: 0,
                ack: Some(7778),
            },
            &[(Reason::RejectedNoBackend, 1)],
        ),
        case(
            "a RST to a frontend without backends is never answered",
            tcp(40006, EMPTY, 80, RST).build(),
            Expect::Drop,
            &[(Reason::RejectedNoBackend, 0)],
        ),
        case(
            "UDP to a frontend without backends gets port unreachable",
            rejected_udp.clone(),
            Expect::PortUnreachable {
                from: tuple(EMPTY, 0, CLIENT, 0, packet::ICMP),
                quoted: rejected_udp[14..42].to_vec(),
            },
            &[(Reason::RejectedNoBackend, 1)],
        ),
        case(
            "a packet not addressed to a frontend passes untouched",
            tcp(40007, BACKEND, 8080, SYN).build(),
            Expect::Unchanged,
            &[(Reason::NewFlow, 0)],
        ),
        case(
            "a later fragment whose first was never seen passes untouched",
            // Offset 128 bytes.
            with(Builder::udp(CLIENT, 5003, VIP, 53), &|b| b.frag = 0x0010),
            Expect::Unchanged,
            &[(Reason::FragmentPassed, 1)],
        ),
        case(
            "an IP header length below 20 passes untouched",
            damaged(40008, &|p| p[14] = 0x44),
            Expect::Unchanged,
            &[(Reason::MalformedIp, 1)],
        ),
        case(
            "an IP total length beyond the frame passes untouched",
            damaged(40009, &|p| p[16] = 0x05),
            Expect::Unchanged,
            &[(Reason::MalformedIp, 1)],
        ),
        case(
            "a truncated TCP header passes untouched",
            damaged(40010, &|p| {
                p.truncate(14 + 20 + 10);
                p[16..18].copy_from_slice(&30u16.to_be_bytes());
            }),
            Expect::Unchanged,
            &[(Reason::TruncatedL4, 1)],
        ),
        case(
            "a frame that is not IPv4 passes untouched",
            damaged(40011, &|p| p[12..14].copy_from_slice(&[0x08, 0x06])),
            Expect::Unchanged,
            &[(Reason::NewFlow, 0)],
        ),
        case(
            "an ICMP error about a flow the dataplane did not translate passes untouched",
            untranslated_error,
            Expect::Unchanged,
            &[(Reason::IcmpErrorTranslated, 0)],
        ),
    ]
}

fn check_case(l: &mut Loaded, c: &Case) -> anyhow::Result<()> {
    let counts = l.counts(c.counts);
    let out = l.run(POD, &c.packet);
    if let Some(m) = oracle::check(&c.packet, out.verdict, &out.packet, &c.expect) {
        bail!(
            "{m}\n    in  {:02x?}\n    out {:02x?}",
            c.packet,
            out.packet
        );
    }
    if out.verdict == TC_ACT_REDIRECT {
        let (p, o) = (&c.packet, &out.packet);
        ensure!(
            (&o[0..6], &o[6..12]) == (&p[6..12], &p[0..6]),
            "an answer goes back with the MACs swapped"
        );
        ensure!(
            !matches!(c.expect, Expect::Reset { ack: Some(_), .. }) || o[47] == RST | ACK,
            "a reset acking a SYN has flags RST|ACK, not {:#x}",
            o[47]
        );
    }
    counts.check(l)
}

#[test]
fn single_packets_get_the_verdict_and_output_of_their_case() {
    let mut l = table_world();
    bpf::check_table(&cases(), |c| c.name, |c| check_case(&mut l, c));
}

#[test]
fn a_syn_to_the_cluster_ip_is_translated_and_its_reply_reversed() {
    let mut l = web(&[("10.244.0.11", 8080)]);
    let (rc, out) = run(&mut l, &Builder::tcp(CLIENT, 40000, VIP, 80, SYN).build());
    assert_eq!(rc, TC_ACT_OK);
    let s = packet::parse(&out);
    assert_eq!((s.src, s.sport), (CLIENT.parse().unwrap(), 40000));
    assert_eq!((s.dst, s.dport), ("10.244.0.11".parse().unwrap(), 8080));
    assert!(s.ip_csum_ok && s.l4_csum_ok == Some(true), "{s:?}");

    // Both directions are in conntrack.
    let fwd = CtKey {
        saddr: [10, 244, 0, 20],
        daddr: [10, 96, 0, 10],
        sport: 40000,
        dport: 80,
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    };
    let v = l.dp.tables.conntrack.get(&fwd, 0).expect("request entry");
    assert_eq!((v.nat_daddr, v.nat_dport), ([10, 244, 0, 11], 8080));
    // An opening until answered: the agent forgets it within the SYN lifetime.
    let rev = CtKey {
        saddr: [10, 244, 0, 11],
        daddr: [10, 244, 0, 20],
        sport: 8080,
        dport: 40000,
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    };
    let r = l.conntrack(&rev).expect("reply entry");
    assert_ne!(v.flags & CT_F_SYN_ONLY, 0, "request entry marked opening");
    assert_ne!(r.flags & CT_F_SYN_ONLY, 0, "reply entry marked opening");

    let (rc, out) = run(
        &mut l,
        &Builder::tcp("10.244.0.11", 8080, CLIENT, 40000, SYN | ACK).build(),
    );
    assert_eq!(rc, TC_ACT_OK);
    let s = packet::parse(&out);
    assert_eq!(
        (s.src, s.sport),
        (VIP.parse().unwrap(), 80),
        "the reply comes from the ClusterIP"
    );
    assert_eq!((s.dst, s.dport), (CLIENT.parse().unwrap(), 40000));
    assert!(s.ip_csum_ok && s.l4_csum_ok == Some(true), "{s:?}");
    assert_eq!(l.reason(Reason::NewFlow), 1);
    assert_eq!(l.reason(Reason::ReplyTranslated), 1);
    let r = l.conntrack(&rev).expect("reply entry");
    assert_eq!(
        r.flags & CT_F_SYN_ONLY,
        0,
        "the reply made the flow established"
    );
    let master = ServiceKey {
        addr: [10, 96, 0, 10],
        port: 80,
        proto: IPPROTO_TCP,
        ..Default::default()
    };
    let svc_id = l.dp.tables.services.get(&master, 0).unwrap().svc_id;
    let stats: SvcStats =
        l.dp.tables
            .svc_stats
            .get(&svc_id, 0)
            .unwrap()
            .iter()
            .fold(SvcStats::default(), |a, s| SvcStats {
                packets: a.packets + s.packets,
                new_flows: a.new_flows + s.new_flows,
                ..a
            });
    assert_eq!((stats.packets, stats.new_flows), (2, 1));
}

#[test]
fn later_packets_of_a_flow_stay_on_its_backend() {
    let mut l = web(&[
        ("10.244.0.11", 8080),
        ("10.244.0.12", 8080),
        ("10.244.0.13", 8080),
    ]);
    let (_, first) = run(&mut l, &Builder::tcp(CLIENT, 40001, VIP, 80, SYN).build());
    let chosen = packet::parse(&first).dst;
    for _ in 0..20 {
        let mut b = Builder::tcp(CLIENT, 40001, VIP, 80, ACK);
        b.payload = b"GET / HTTP/1.1\r\n\r\n".to_vec();
        let (_, out) = run(&mut l, &b.build());
        let s = packet::parse(&out);
        assert_eq!(s.dst, chosen);
        assert_eq!(s.l4_csum_ok, Some(true));
    }
    // New flows spread.
    let mut seen = std::collections::BTreeSet::new();
    for port in 41000..41060 {
        let (_, out) = run(&mut l, &Builder::tcp(CLIENT, port, VIP, 80, SYN).build());
        seen.insert(packet::parse(&out).dst);
    }
    assert_eq!(seen.len(), 3, "60 new flows used every backend: {seen:?}");
}

#[test]
fn client_ip_affinity_pins_new_flows_and_ignores_removed_backends() {
    let bs = [
        ("10.244.0.11", 8080),
        ("10.244.0.12", 8080),
        ("10.244.0.13", 8080),
    ];
    let mut l = load(vec![(key(VIP, 80, Protocol::Tcp), frontend(&bs, Some(60)))]);
    let (_, out) = run(&mut l, &Builder::tcp(CLIENT, 40000, VIP, 80, SYN).build());
    let chosen = packet::parse(&out).dst;
    for port in 40001..40040 {
        let (_, out) = run(&mut l, &Builder::tcp(CLIENT, port, VIP, 80, SYN).build());
        assert_eq!(
            packet::parse(&out).dst,
            chosen,
            "every new connection of the client goes to one backend"
        );
    }
    // Remove the chosen backend: the affinity entry must not be used.
    let rest: Vec<(&str, u16)> = bs
        .iter()
        .filter(|(a, _)| a.parse::<Ipv4Addr>().unwrap() != chosen)
        .copied()
        .collect();
    let plan = Plan {
        frontends: [(key(VIP, 80, Protocol::Tcp), frontend(&rest, Some(60)))].into(),
        ..Default::default()
    };
    l.apply(&plan).unwrap();
    let (_, out) = run(&mut l, &Builder::tcp(CLIENT, 40100, VIP, 80, SYN).build());
    let now = packet::parse(&out).dst;
    assert_ne!(now, chosen);
    assert!(l.reason(Reason::AffinityStale) >= 1);
    for port in 40101..40110 {
        let (_, out) = run(&mut l, &Builder::tcp(CLIENT, port, VIP, 80, SYN).build());
        assert_eq!(
            packet::parse(&out).dst,
            now,
            "a new affinity entry takes over"
        );
    }
}

#[test]
fn a_restarted_agent_adopts_the_pinned_maps() {
    let l = web(&[("10.244.0.11", 8080), ("10.244.0.12", 8080)]);
    let sizes = bpf::sizes(1024, 1024);
    let again = Dataplane::load(l.pin_dir().to_path_buf(), &sizes).unwrap();
    assert_eq!(again.writer.frontend_count(), 2);
    assert_eq!(again.writer.backend_count(), 4);
    // Other sizes: the maps are recreated, not misread.
    let bigger = MapSizes {
        services: 2048,
        ..sizes
    };
    let fresh = Dataplane::load(l.pin_dir().to_path_buf(), &bigger).unwrap();
    assert_eq!(fresh.writer.frontend_count(), 0);
}

#[test]
fn icmp_errors_about_a_translated_flow_are_translated_too() {
    let backend = "10.244.0.11";
    let mut l = web(&[(backend, 8080)]);
    let syn = Builder::tcp(CLIENT, 40000, VIP, 80, SYN).build();
    run(&mut l, &syn);
    // A reply as the client saw it (from the ClusterIP) was too big for a
    // router on the way: the router tells its source, the ClusterIP.
    let reply_seen = Builder::tcp(VIP, 80, CLIENT, 40000, ACK).build();
    let err = packet::icmp_error("10.0.0.254", VIP, 3, 4, &reply_seen);
    let (rc, out) = run(&mut l, &err);
    assert_eq!(rc, TC_ACT_OK);
    let s = packet::parse(&out);
    assert_eq!(
        s.dst,
        backend.parse::<Ipv4Addr>().unwrap(),
        "the backend that sent it gets the error"
    );
    assert!(
        s.ip_csum_ok && s.l4_csum_ok == Some(true),
        "outer and ICMP checksums: {s:?}"
    );
    let (qs, qsp, qd, qdp, qok) = packet::quoted(&out);
    assert_eq!(
        (qs, qsp, qd, qdp),
        (
            backend.parse().unwrap(),
            8080,
            CLIENT.parse().unwrap(),
            40000
        )
    );
    assert!(qok, "the quoted header's checksum holds");

    // The request as the backend got it was too big: the client gets an
    // error about the packet it sent, to the ClusterIP.
    let request_sent = Builder::tcp(CLIENT, 40000, backend, 8080, ACK).build();
    let err = packet::icmp_error("10.0.0.254", CLIENT, 3, 4, &request_sent);
    let (_, out) = run(&mut l, &err);
    let s = packet::parse(&out);
    assert_eq!(s.dst, CLIENT.parse::<Ipv4Addr>().unwrap());
    assert!(s.ip_csum_ok && s.l4_csum_ok == Some(true), "{s:?}");
    let (qs, qsp, qd, qdp, qok) = packet::quoted(&out);
    assert_eq!(
        (qs, qsp, qd, qdp),
        (CLIENT.parse().unwrap(), 40000, VIP.parse().unwrap(), 80)
    );
    assert!(qok);
    assert_eq!(
        s.src,
        "10.0.0.254".parse::<Ipv4Addr>().unwrap(),
        "a router's error keeps its source"
    );

    // The backend itself refuses (port unreachable): the client gets the
    // error from the ClusterIP it talked to, not from an address it never
    // knew, so its stack and firewall match it to the flow.
    let err = packet::icmp_error(backend, CLIENT, 3, 3, &request_sent);
    let (rc, out) = run(&mut l, &err);
    assert_eq!(rc, TC_ACT_OK);
    let s = packet::parse(&out);
    assert_eq!(
        (s.src, s.dst),
        (VIP.parse::<Ipv4Addr>().unwrap(), CLIENT.parse().unwrap())
    );
    assert!(s.ip_csum_ok && s.l4_csum_ok == Some(true), "{s:?}");
    let (qs, qsp, qd, qdp, qok) = packet::quoted(&out);
    assert_eq!(
        (qs, qsp, qd, qdp),
        (CLIENT.parse().unwrap(), 40000, VIP.parse().unwrap(), 80)
    );
    assert!(qok);
    assert_eq!(l.reason(Reason::IcmpErrorTranslated), 3);
}

#[test]
fn later_fragments_follow_the_translation_of_their_first_fragment() {
    let mut l = web(&[("10.244.0.11", 5353)]);
    let mut first = Builder::udp(CLIENT, 5000, VIP, 53);
    first.payload = vec![7u8; 64];
    first.frag = 0x2000; // more fragments, offset 0
    let (rc, out) = run(&mut l, &first.build());
    assert_eq!(rc, TC_ACT_OK);
    let s = packet::parse(&out);
    assert_eq!((s.dst, s.dport), ("10.244.0.11".parse().unwrap(), 5353));
    assert!(s.ip_csum_ok);
    // The rest of the datagram: same IP id, no UDP header, addresses only.
    let mut later = Builder::udp(CLIENT, 5000, VIP, 53);
    later.frag = 0x0009; // offset 72 bytes, last fragment
    let sent = later.build();
    let (rc, out) = run(&mut l, &sent);
    assert_eq!(rc, TC_ACT_OK);
    assert_eq!(
        &out[14 + 16..14 + 20],
        &[10, 244, 0, 11],
        "destination follows the first fragment"
    );
    assert_eq!(
        &out[14 + 12..14 + 16],
        &sent[14 + 12..14 + 16],
        "source unchanged"
    );
    assert_eq!(packet::checksum(&out[14..34]), 0, "IP checksum holds");
    assert_eq!(&out[34..], &sent[34..], "the payload is not touched");
    assert_eq!(l.reason(Reason::FragmentTranslated), 1);
    // Another datagram (other IP id) without its first fragment: untouched.
    let mut stray = sent.clone();
    stray[18] = 0x99;
    stray[24] = 0;
    stray[25] = 0;
    let c = packet::checksum(&stray[14..34]);
    stray[24..26].copy_from_slice(&c.to_be_bytes());
    assert_eq!(run(&mut l, &stray), (TC_ACT_OK, stray.clone()));
    assert_eq!(l.reason(Reason::FragmentPassed), 1);
}

#[test]
fn flows_the_kernel_translates_are_passed_untouched_both_ways() {
    let mut l = web(&[("10.244.0.11", 8080)]);
    // What the agent writes for a connection kube-proxy DNATed to
    // 10.244.0.12:8080 (a backend this Service does not have).
    let request = CtKey {
        saddr: [10, 244, 0, 20],
        daddr: [10, 96, 0, 10],
        sport: 40000,
        dport: 80,
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    };
    let reply = CtKey {
        saddr: [10, 244, 0, 12],
        daddr: [10, 244, 0, 20],
        sport: 8080,
        dport: 40000,
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    };
    let entry = |into: &CtKey, flags| CtValue {
        nat_saddr: into.daddr,
        nat_daddr: into.saddr,
        nat_sport: into.dport,
        nat_dport: into.sport,
        flags: CT_F_KERNEL | flags,
        proto: IPPROTO_TCP,
        ..Default::default()
    };
    let ct = &mut l.dp.tables.conntrack;
    ct.insert(request, entry(&reply, 0), 0).unwrap();
    ct.insert(reply, entry(&request, CT_F_REPLY), 0).unwrap();

    let data = Builder::tcp(CLIENT, 40000, VIP, 80, ACK).build();
    assert_eq!(
        run(&mut l, &data),
        (TC_ACT_OK, data.clone()),
        "not ct_invalid"
    );
    let back = Builder::tcp("10.244.0.12", 8080, CLIENT, 40000, ACK).build();
    assert_eq!(run(&mut l, &back), (TC_ACT_OK, back.clone()));
    assert_eq!(l.reason(Reason::KernelFlowPassed), 2);
    assert_eq!(l.reason(Reason::CtInvalid), 0);
    let seen = l.dp.tables.conntrack.get(&request, 0).unwrap();
    assert!(seen.last_seen_ns > 0, "the GC sees the flow is alive");

    // A FIN marks it closing, as for the dataplane's own flows.
    let fin = Builder::tcp(CLIENT, 40000, VIP, 80, ACK | 0x01).build();
    assert_eq!(run(&mut l, &fin), (TC_ACT_OK, fin.clone()));
    let seen = l.dp.tables.conntrack.get(&request, 0).unwrap();
    assert_ne!(seen.flags & CT_F_CLOSING, 0);

    // A new SYN on the same tuple is a new connection: the dataplane opens it.
    let (rc, out) = run(&mut l, &Builder::tcp(CLIENT, 40000, VIP, 80, SYN).build());
    assert_eq!(rc, TC_ACT_OK);
    let s = packet::parse(&out);
    assert_eq!((s.dst, s.dport), ("10.244.0.11".parse().unwrap(), 8080));
    let now = l.dp.tables.conntrack.get(&request, 0).unwrap();
    assert_eq!(now.flags & CT_F_KERNEL, 0);
    assert_eq!(l.reason(Reason::NewFlow), 1);

    // ICMP errors about a kernel flow are netfilter's to translate: here
    // one about the DNATed request, on its way to the old backend.
    let quoted = Builder::tcp(CLIENT, 40000, "10.244.0.12", 8080, ACK).build();
    let err = packet::icmp_error("10.0.0.254", CLIENT, 3, 4, &quoted);
    assert_eq!(run(&mut l, &err), (TC_ACT_OK, err.clone()));
    assert_eq!(l.reason(Reason::IcmpErrorTranslated), 0);
}

/// One client port reaching two ClusterIPs that share a backend gives two
/// flows with the same reply tuple (backend:8080 -> client:40000). The one
/// opened second gets a free client port as the backend sees it, so each
/// flow receives its own replies, from its own ClusterIP; in both orders.
#[test]
fn flows_whose_reply_tuples_clash_each_get_their_own_replies() {
    const OTHER_VIP: &str = "10.96.0.40";
    for (first, second) in [(VIP, OTHER_VIP), (OTHER_VIP, VIP)] {
        let mut l = load(vec![
            (
                key(VIP, 80, Protocol::Tcp),
                frontend(&[(BACKEND, 8080)], None),
            ),
            (
                key(OTHER_VIP, 80, Protocol::Tcp),
                frontend(&[(BACKEND, 8080)], None),
            ),
        ]);
        let (rc, out) = run(&mut l, &Builder::tcp(CLIENT, 40000, first, 80, SYN).build());
        assert_eq!(rc, TC_ACT_OK);
        let a = packet::parse(&out);
        assert_eq!(
            (a.dst, a.dport, a.sport),
            (ip(BACKEND), 8080, 40000),
            "first keeps its port"
        );
        let (rc, out) = run(
            &mut l,
            &Builder::tcp(CLIENT, 40000, second, 80, SYN).build(),
        );
        assert_eq!(rc, TC_ACT_OK);
        let b = packet::parse(&out);
        assert_eq!((b.src, b.dst, b.dport), (ip(CLIENT), ip(BACKEND), 8080));
        assert_ne!(
            b.sport, 40000,
            "second ({second}) moved off the clashing port"
        );
        assert!(b.ip_csum_ok && b.l4_csum_ok == Some(true), "{b:?}");
        assert_eq!(l.reason(Reason::TupleClashPortRewritten), 1);
        // Each flow's replies come back from its own ClusterIP to port 40000.
        for (port, vip) in [(40000, first), (b.sport, second)] {
            let (rc, out) = run(
                &mut l,
                &Builder::tcp(BACKEND, 8080, CLIENT, port, SYN | ACK).build(),
            );
            assert_eq!(rc, TC_ACT_OK);
            let r = packet::parse(&out);
            assert_eq!(
                (r.src, r.sport, r.dst, r.dport),
                (ip(vip), 80, ip(CLIENT), 40000),
                "reply to backend port {port}"
            );
            assert!(r.l4_csum_ok == Some(true), "{r:?}");
        }
        // The same SYN again is the same flow: it keeps its translation.
        let (_, out) = run(
            &mut l,
            &Builder::tcp(CLIENT, 40000, second, 80, SYN).build(),
        );
        assert_eq!(packet::parse(&out).sport, b.sport, "retransmitted SYN");
        assert_eq!(l.reason(Reason::TupleClashPortRewritten), 1);
    }
}

/// The entry set a new flow to a Local external frontend uses: sources
/// inside the cluster (a pod interface, or the external interface from the
/// cluster's pod range) the in-cluster set, everyone else the frontend's
/// own. The two sets share no backend here, so the backend names the set.
#[test]
fn sources_inside_the_cluster_use_the_in_cluster_set_of_a_local_frontend() {
    const NODE: &str = "192.168.77.11";
    const OWN: &str = "10.244.1.5";
    const IN_CLUSTER: &str = "10.244.1.6";
    let mut np = bpf::frontend(
        "default/web",
        FrontendKind::NodePort,
        vec![bpf::backend(ip(OWN), 8080, true)],
    );
    np.in_cluster = Some(vec![bpf::backend(ip(IN_CLUSTER), 8080, true)].into());
    let mut l = load(vec![(key("0.0.0.0", 30080, Protocol::Tcp), np)]);
    l.set_node_addr(ip(NODE)).unwrap();
    (l.dp.writer)
        .set_cluster_cidrs(&mut l.dp.tables, &["10.244.0.0/16".parse().unwrap()])
        .unwrap();
    let external = Prog::Tc(IfaceRole::External);
    let rows = [
        ("a pod of this node", POD, CLIENT, IN_CLUSTER),
        ("outside the cluster", external, "192.168.77.101", OWN),
        ("a pod of another node", external, "10.244.3.7", IN_CLUSTER),
        ("next to the pod range", external, "10.245.0.7", OWN),
    ];
    bpf::check_table(
        &rows,
        |r| r.0,
        |&(_, prog, src, to)| {
            let syn = Builder::tcp(src, 41000, NODE, 30080, SYN).build();
            let out = l.run(prog, &syn);
            let expect = Expect::Rewritten {
                to: tuple(src, 41000, to, 8080, packet::TCP),
                l4: true,
            };
            match oracle::check(&syn, out.verdict, &out.packet, &expect) {
                Some(m) => bail!("{m}"),
                None => Ok(()),
            }
        },
    );
}

/// The conntrack key of a TCP packet from `src`:`sport` to `dst`:`dport`.
fn tcp_key(src: &str, sport: u16, dst: &str, dport: u16) -> CtKey {
    CtKey {
        saddr: ip(src).octets(),
        daddr: ip(dst).octets(),
        sport,
        dport,
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    }
}

/// A RST ends the connection in both directions: both entries are marked
/// closing, or the reply entry (and a SNAT port under it) would be held for
/// the established lifetime. A SYN on the closing tuple is a new connection
/// (a client port reused at once) and takes the marks off as it is answered.
#[test]
fn a_reset_closes_both_entries_and_a_new_syn_reopens_the_tuple() {
    let mut l = web(&[(BACKEND, 8080)]);
    let request = tcp_key(CLIENT, 40000, VIP, 80);
    let reply = tcp_key(BACKEND, 8080, CLIENT, 40000);
    let closing =
        |l: &Loaded| [request, reply].map(|k| l.conntrack(&k).unwrap().flags & CT_F_CLOSING != 0);
    let open = |l: &mut Loaded| {
        run(l, &Builder::tcp(CLIENT, 40000, VIP, 80, SYN).build());
        run(
            l,
            &Builder::tcp(BACKEND, 8080, CLIENT, 40000, SYN | ACK).build(),
        );
    };
    open(&mut l);
    assert_eq!(closing(&l), [false, false]);
    run(
        &mut l,
        &Builder::tcp(CLIENT, 40000, VIP, 80, RST | ACK).build(),
    );
    assert_eq!(closing(&l), [true, true], "a reset from the client");
    open(&mut l);
    assert_eq!(closing(&l), [false, false], "reopened by SYN and SYN-ACK");
    run(
        &mut l,
        &Builder::tcp(BACKEND, 8080, CLIENT, 40000, RST).build(),
    );
    assert_eq!(closing(&l), [true, true], "a reset from the backend");
    // A FIN closes its own direction only: the other may still send.
    open(&mut l);
    run(
        &mut l,
        &Builder::tcp(CLIENT, 40000, VIP, 80, FIN | ACK).build(),
    );
    assert_eq!(closing(&l), [true, false], "a half-close");
}

/// The flood guard counts openings per CPU per second: past the threshold
/// a new flow is dropped with nothing recorded; known flows go on.
#[test]
fn the_flood_guard_refuses_openings_past_its_threshold() {
    // BPF_PROG_TEST_RUN runs on the caller's CPU: stay on one.
    // SAFETY: affinity of this thread only, with a set built by the libc macros.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(libc::sched_getcpu() as usize, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
    let mut l = web(&[(BACKEND, 8080)]);
    l.dp.tables.meta.set(META_FLOOD_THRESHOLD, 2, 0).unwrap();
    let syn = |port| Builder::tcp(CLIENT, port, VIP, 80, SYN).build();
    for port in [40001, 40002] {
        let (rc, out) = run(&mut l, &syn(port));
        assert_eq!(rc, TC_ACT_OK);
        assert_eq!(packet::parse(&out).dst, ip(BACKEND));
    }
    let (rc, _) = run(&mut l, &syn(40003));
    assert_eq!(rc, bpf::TC_ACT_SHOT, "the third opening this second");
    assert_eq!(l.reason(Reason::FloodDropped), 1);
    assert_eq!(l.reason(Reason::NewFlow), 2);
    let third = tcp_key(CLIENT, 40003, VIP, 80);
    assert!(l.conntrack(&third).is_none(), "nothing recorded");
    // A flow already open is no opening.
    let data = Builder::tcp(CLIENT, 40001, VIP, 80, ACK).build();
    assert_eq!(run(&mut l, &data).0, TC_ACT_OK);
    assert_eq!(l.reason(Reason::FloodDropped), 1);
    // Without a threshold the opening gets in.
    l.dp.tables.meta.set(META_FLOOD_THRESHOLD, 0, 0).unwrap();
    let (_, out) = run(&mut l, &syn(40003));
    assert_eq!(packet::parse(&out).dst, ip(BACKEND));
}

/// A SYN on a request entry whose reply entry is gone (the agent expired
/// the idle flow while the client reused its port): it opens the flow
/// afresh, with both entries, so the SYN-ACK is translated; a segment that
/// is not a SYN keeps using the request entry.
#[test]
fn a_syn_on_half_a_flow_opens_it_afresh() {
    let mut l = web(&[(BACKEND, 8080)]);
    let request = bpf::ct_key(ip(CLIENT), 40100, ip(VIP), 80, IPPROTO_TCP);
    let reply = bpf::ct_key(ip(BACKEND), 8080, ip(CLIENT), 40100, IPPROTO_TCP);
    let syn = Builder::tcp(CLIENT, 40100, VIP, 80, SYN).build();
    run(&mut l, &syn);
    l.dp.tables.conntrack.remove(&reply).unwrap();
    // Not a SYN: the request entry still carries it, nothing is reopened.
    let counts = l.counts(&[(Reason::HalfFlowReopened, 0)]);
    let (_, out) = run(&mut l, &Builder::tcp(CLIENT, 40100, VIP, 80, ACK).build());
    assert_eq!(packet::parse(&out).dst, ip(BACKEND));
    counts.check(&l).unwrap();
    assert!(l.conntrack(&reply).is_none());

    let counts = l.counts(&[(Reason::HalfFlowReopened, 1), (Reason::NewFlow, 1)]);
    let (_, out) = run(&mut l, &syn);
    counts.check(&l).unwrap();
    assert_eq!(packet::parse(&out).dst, ip(BACKEND));
    assert!(l.conntrack(&request).is_some() && l.conntrack(&reply).is_some());
    let (_, out) = run(
        &mut l,
        &Builder::tcp(BACKEND, 8080, CLIENT, 40100, SYN | ACK).build(),
    );
    assert_eq!(
        packet::parse(&out).src,
        ip(VIP),
        "the SYN-ACK is translated"
    );
}

/// A client port that reached the backend through the ClusterIP, reused to
/// reach that backend directly: the backend sees one tuple for both, so the
/// direct opening retires the ClusterIP flow, whose reply entry would turn
/// the backend's answers into the ClusterIP's; TCP and UDP. A segment that
/// opens nothing retires nothing.
#[test]
fn a_direct_opening_on_a_translated_flows_tuple_retires_that_flow() {
    let mut l = web(&[(BACKEND, 8080)]);
    let key = |src, sport, dst, dport, proto| bpf::ct_key(ip(src), sport, ip(dst), dport, proto);
    let unchanged = |l: &mut Loaded, pkt: Vec<u8>| {
        let out = l.run(POD, &pkt);
        if let Some(m) = oracle::check(&pkt, out.verdict, &out.packet, &Expect::Unchanged) {
            panic!("{m}");
        }
    };
    for (proto, vip_port, sport) in [(IPPROTO_TCP, 80, 40000), (IPPROTO_UDP, 53, 5000)] {
        let pkt = |src, sport, dst, dport, flags| match proto {
            IPPROTO_TCP => Builder::tcp(src, sport, dst, dport, flags).build(),
            _ => Builder::udp(src, sport, dst, dport).build(),
        };
        let request = key(CLIENT, sport, VIP, vip_port, proto);
        let reply = key(BACKEND, 8080, CLIENT, sport, proto);
        run(&mut l, &pkt(CLIENT, sport, VIP, vip_port, SYN));
        let (_, out) = run(&mut l, &pkt(BACKEND, 8080, CLIENT, sport, SYN | ACK));
        assert_eq!(
            packet::parse(&out).src,
            ip(VIP),
            "the ClusterIP flow's reply"
        );
        if proto == IPPROTO_TCP {
            unchanged(&mut l, pkt(CLIENT, sport, BACKEND, 8080, ACK));
            assert!(l.conntrack(&reply).is_some(), "an ACK opens nothing");
        }

        let counts = l.counts(&[(Reason::ReusedTupleRetired, 1)]);
        unchanged(&mut l, pkt(CLIENT, sport, BACKEND, 8080, SYN));
        counts.check(&l).unwrap();
        assert!(l.conntrack(&reply).is_none(), "reply entry retired");
        assert!(l.conntrack(&request).is_none(), "request entry retired");
        let counts = l.counts(&[(Reason::ReplyTranslated, 0)]);
        unchanged(&mut l, pkt(BACKEND, 8080, CLIENT, sport, SYN | ACK));
        counts.check(&l).unwrap();
    }

    // The client port since reused through the ClusterIP to another
    // backend: that newer flow's request entry stays.
    let (request, reply) = (
        key(CLIENT, 40001, VIP, 80, IPPROTO_TCP),
        key(BACKEND, 8080, CLIENT, 40001, IPPROTO_TCP),
    );
    let entry = |to: &CtKey, flags| CtValue {
        nat_saddr: to.saddr,
        nat_daddr: to.daddr,
        nat_sport: to.sport,
        nat_dport: to.dport,
        flags,
        proto: IPPROTO_TCP,
        ..Default::default()
    };
    let from_vip = key(VIP, 80, CLIENT, 40001, IPPROTO_TCP);
    let to_other = key(CLIENT, 40001, "10.244.0.12", 8080, IPPROTO_TCP);
    let ct = &mut l.dp.tables.conntrack;
    ct.insert(reply, entry(&from_vip, CT_F_REPLY), 0).unwrap();
    ct.insert(request, entry(&to_other, 0), 0).unwrap();
    unchanged(
        &mut l,
        Builder::tcp(CLIENT, 40001, BACKEND, 8080, SYN).build(),
    );
    assert!(l.conntrack(&reply).is_none(), "the old reply entry retired");
    assert!(l.conntrack(&request).is_some(), "the newer flow kept");
    assert_eq!(l.reason(Reason::ReusedTupleRetired), 3);
}
