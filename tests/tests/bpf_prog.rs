//! The tc program through BPF_PROG_TEST_RUN: craft a packet, run the
//! program, check the packet it leaves and the maps. No interface is attached.
use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf};

use aya::programs::{TestRun, TestRunOptions};
use integration_tests::{
    packet::{self, ACK, Builder, ICMP, RST, SYN},
    unique,
};
use service_agent::{
    dataplane::{Dataplane, IfaceRole, MapSizes, pins},
    plan::{BackendAddr, FrontendKey, FrontendKind, FrontendPlan, Plan, Protocol},
};
use service_common::*;

const TC_ACT_OK: u32 = 0;
const TC_ACT_REDIRECT: u32 = 7;

/// A loaded dataplane on a pin directory of its own, removed on drop.
struct Loaded {
    dp: Dataplane,
    pin_dir: PathBuf,
}

impl Drop for Loaded {
    fn drop(&mut self) {
        let _ = pins::remove_pins(&self.pin_dir);
    }
}

fn frontend(service: &str, backends: &[(&str, u16)], affinity: Option<u32>) -> FrontendPlan {
    FrontendPlan {
        service: service.into(),
        port_name: String::new(),
        kind: FrontendKind::ClusterIp,
        backends: backends
            .iter()
            .map(|(a, p)| BackendAddr {
                addr: a.parse().unwrap(),
                port: *p,
                local: true,
            })
            .collect(),
        affinity_timeout_s: affinity,
        reject_when_empty: true,
        source_ranges: vec![],
    }
}

fn key(addr: &str, port: u16, proto: Protocol) -> FrontendKey {
    FrontendKey {
        addr: addr.parse().unwrap(),
        port,
        proto,
    }
}

fn load(frontends: Vec<(FrontendKey, FrontendPlan)>) -> Loaded {
    let pin_dir = PathBuf::from("/sys/fs/bpf").join(unique("svct"));
    let sizes = MapSizes {
        frontends: 1024,
        services: 1024,
        backends: 1024,
        conntrack: 1024,
        affinity: 1024,
    };
    let mut dp = Dataplane::load(pin_dir.clone(), &sizes)
        .expect("the program loads and passes the verifier");
    let plan = Plan {
        frontends: frontends.into_iter().collect::<BTreeMap<_, _>>(),
        ..Default::default()
    };
    let report = dp.writer.apply(&mut dp.tables, &plan);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    Loaded { dp, pin_dir }
}

fn run(l: &mut Loaded, pkt: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; 1600];
    let prog = l.dp.program(IfaceRole::Pod).unwrap();
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(pkt),
            data_out: Some(&mut out),
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

fn reason(l: &Loaded, r: Reason) -> u64 {
    l.dp.tables
        .reasons
        .get(&(r as u32), 0)
        .unwrap()
        .iter()
        .sum()
}

const VIP: &str = "10.96.0.10";
const CLIENT: &str = "10.244.0.20";

fn web(backends: &[(&str, u16)]) -> Loaded {
    load(vec![
        (
            key(VIP, 80, Protocol::Tcp),
            frontend("default/web", backends, None),
        ),
        (
            key(VIP, 53, Protocol::Udp),
            frontend("default/web", backends, None),
        ),
    ])
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
    assert_eq!(reason(&l, Reason::NewFlow), 1);
    assert_eq!(reason(&l, Reason::ReplyTranslated), 1);
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
fn udp_checksums_are_updated_and_a_zero_checksum_stays_zero() {
    let mut l = web(&[("10.244.0.11", 5353)]);
    let mut b = Builder::udp(CLIENT, 5000, VIP, 53);
    b.payload = b"query".to_vec();
    let (_, out) = run(&mut l, &b.build());
    let s = packet::parse(&out);
    assert_eq!((s.dst, s.dport), ("10.244.0.11".parse().unwrap(), 5353));
    assert_eq!(s.l4_csum_ok, Some(true), "{s:?}");
    b.sport = 5001;
    b.udp_zero_csum = true;
    let (_, out) = run(&mut l, &b.build());
    let s = packet::parse(&out);
    assert_eq!(s.dport, 5353);
    assert_eq!(s.l4_csum, 0, "no checksum stays no checksum");
    assert!(s.ip_csum_ok);
}

#[test]
fn a_frontend_without_backends_answers_tcp_with_a_reset() {
    let mut l = web(&[]);
    let mut b = Builder::tcp(CLIENT, 40000, VIP, 80, SYN);
    b.seq = 7777;
    let sent = b.build();
    let (rc, out) = run(&mut l, &sent);
    assert_eq!(
        rc, TC_ACT_REDIRECT,
        "sent back out of the interface it came in on"
    );
    assert_eq!(out.len(), 14 + 40);
    let s = packet::parse(&out);
    assert_eq!((s.src, s.sport), (VIP.parse().unwrap(), 80));
    assert_eq!((s.dst, s.dport), (CLIENT.parse().unwrap(), 40000));
    assert!(s.ip_csum_ok && s.l4_csum_ok == Some(true), "{s:?}");
    let tcp = &out[34..];
    assert_eq!(tcp[13], RST | ACK);
    assert_eq!(
        u32::from_be_bytes(tcp[8..12].try_into().unwrap()),
        7778,
        "acks the SYN"
    );
    assert_eq!(
        (&out[0..6], &out[6..12]),
        (&sent[6..12], &sent[0..6]),
        "MACs swapped"
    );
    assert_eq!(reason(&l, Reason::RejectedNoBackend), 1);
    // A RST is never answered.
    let (rc, _) = run(&mut l, &Builder::tcp(CLIENT, 40000, VIP, 80, RST).build());
    assert_ne!(rc, TC_ACT_REDIRECT);
}

#[test]
fn a_frontend_without_backends_answers_udp_with_port_unreachable() {
    let mut l = web(&[]);
    let mut b = Builder::udp(CLIENT, 5000, VIP, 53);
    b.payload = b"0123456789abcdef".to_vec();
    let sent = b.build();
    let (rc, out) = run(&mut l, &sent);
    assert_eq!(rc, TC_ACT_REDIRECT);
    let s = packet::parse(&out);
    assert_eq!(s.proto, ICMP);
    assert_eq!(
        (s.src, s.dst),
        (VIP.parse().unwrap(), CLIENT.parse().unwrap())
    );
    assert!(s.ip_csum_ok && s.l4_csum_ok == Some(true), "{s:?}");
    assert_eq!(
        &out[34..36],
        &[3, 3],
        "destination unreachable / port unreachable"
    );
    assert_eq!(
        &out[42..70],
        &sent[14..42],
        "quotes the IP header and 8 bytes"
    );
}

#[test]
fn a_pod_picked_as_its_own_backend_is_source_translated() {
    let mut l = web(&[(CLIENT, 8080)]);
    let (_, out) = run(&mut l, &Builder::tcp(CLIENT, 40000, VIP, 80, SYN).build());
    let s = packet::parse(&out);
    assert_eq!(
        (s.src, s.dst),
        (VIP.parse().unwrap(), CLIENT.parse().unwrap()),
        "no martian self-to-self packet"
    );
    assert_eq!(s.l4_csum_ok, Some(true));
    let (_, out) = run(
        &mut l,
        &Builder::tcp(CLIENT, 8080, VIP, 40000, SYN | ACK).build(),
    );
    let s = packet::parse(&out);
    assert_eq!((s.src, s.sport), (VIP.parse().unwrap(), 80));
    assert_eq!((s.dst, s.dport), (CLIENT.parse().unwrap(), 40000));
    assert_eq!(s.l4_csum_ok, Some(true));
}

#[test]
fn packets_the_program_must_not_touch_pass_unchanged_and_counted() {
    let mut l = web(&[("10.244.0.11", 8080)]);
    // Not addressed to a frontend.
    let other = Builder::tcp(CLIENT, 40000, "10.244.0.11", 8080, SYN).build();
    assert_eq!(run(&mut l, &other), (TC_ACT_OK, other.clone()));
    // A later fragment whose first fragment was never seen.
    let mut b = Builder::udp(CLIENT, 5000, VIP, 53);
    b.frag = 0x0010; // offset 128 bytes
    let frag = b.build();
    assert_eq!(run(&mut l, &frag), (TC_ACT_OK, frag.clone()));
    assert_eq!(reason(&l, Reason::FragmentPassed), 1);
    // IP header length below 20.
    let mut bad = Builder::tcp(CLIENT, 40000, VIP, 80, SYN).build();
    bad[14] = 0x44;
    assert_eq!(run(&mut l, &bad), (TC_ACT_OK, bad.clone()));
    // Total length beyond the packet.
    let mut bad = Builder::tcp(CLIENT, 40000, VIP, 80, SYN).build();
    bad[16] = 0x05;
    assert_eq!(run(&mut l, &bad), (TC_ACT_OK, bad.clone()));
    assert_eq!(reason(&l, Reason::MalformedIp), 2);
    // Truncated L4 header.
    let mut b = Builder::tcp(CLIENT, 40000, VIP, 80, SYN).build();
    b.truncate(14 + 20 + 10);
    b[16] = 0;
    b[17] = 30;
    assert_eq!(run(&mut l, &b), (TC_ACT_OK, b.clone()));
    assert_eq!(reason(&l, Reason::TruncatedL4), 1);
    // Non-IPv4.
    let mut arp = other.clone();
    arp[12] = 0x08;
    arp[13] = 0x06;
    assert_eq!(run(&mut l, &arp), (TC_ACT_OK, arp.clone()));
}

#[test]
fn ip_options_are_carried_through_translation() {
    let mut l = web(&[("10.244.0.11", 8080)]);
    let mut b = Builder::tcp(CLIENT, 40000, VIP, 80, SYN);
    b.ip_options = 8;
    let (rc, out) = run(&mut l, &b.build());
    assert_eq!(rc, TC_ACT_OK);
    let s = packet::parse(&out);
    assert_eq!((s.dst, s.dport), ("10.244.0.11".parse().unwrap(), 8080));
    assert!(s.ip_csum_ok && s.l4_csum_ok == Some(true), "{s:?}");
}

#[test]
fn client_ip_affinity_pins_new_flows_and_ignores_removed_backends() {
    let bs = [
        ("10.244.0.11", 8080),
        ("10.244.0.12", 8080),
        ("10.244.0.13", 8080),
    ];
    let mut l = load(vec![(
        key(VIP, 80, Protocol::Tcp),
        frontend("default/web", &bs, Some(60)),
    )]);
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
        frontends: [(
            key(VIP, 80, Protocol::Tcp),
            frontend("default/web", &rest, Some(60)),
        )]
        .into(),
        ..Default::default()
    };
    l.dp.writer.apply(&mut l.dp.tables, &plan);
    let (_, out) = run(&mut l, &Builder::tcp(CLIENT, 40100, VIP, 80, SYN).build());
    let now = packet::parse(&out).dst;
    assert_ne!(now, chosen);
    assert!(reason(&l, Reason::AffinityStale) >= 1);
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
    let sizes = MapSizes {
        frontends: 1024,
        services: 1024,
        backends: 1024,
        conntrack: 1024,
        affinity: 1024,
    };
    let again = Dataplane::load(l.pin_dir.clone(), &sizes).unwrap();
    assert_eq!(again.writer.frontend_count(), 2);
    assert_eq!(again.writer.backend_count(), 4);
    // Other sizes: the maps are recreated, not misread.
    let bigger = MapSizes {
        services: 2048,
        ..sizes
    };
    let fresh = Dataplane::load(l.pin_dir.clone(), &bigger).unwrap();
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
    assert_eq!(reason(&l, Reason::IcmpErrorTranslated), 2);

    // An error about a flow the dataplane did not translate is left alone.
    let other = Builder::tcp(CLIENT, 41000, "10.244.0.99", 80, ACK).build();
    let err = packet::icmp_error("10.0.0.254", CLIENT, 3, 4, &other);
    assert_eq!(run(&mut l, &err), (TC_ACT_OK, err.clone()));
}

#[test]
fn tcp_segments_of_unknown_flows_are_dropped_not_sent_to_a_random_backend() {
    let mut l = web(&[("10.244.0.11", 8080)]);
    let (rc, _) = run(&mut l, &Builder::tcp(CLIENT, 40000, VIP, 80, ACK).build());
    assert_eq!(rc, 2, "TC_ACT_SHOT");
    let (rc, _) = run(
        &mut l,
        &Builder::tcp(CLIENT, 40000, VIP, 80, SYN | ACK).build(),
    );
    assert_eq!(rc, 2);
    assert_eq!(reason(&l, Reason::CtInvalid), 2);
    assert_eq!(reason(&l, Reason::NewFlow), 0);
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
    assert_eq!(reason(&l, Reason::FragmentTranslated), 1);
    // Another datagram (other IP id) without its first fragment: untouched.
    let mut stray = sent.clone();
    stray[18] = 0x99;
    stray[24] = 0;
    stray[25] = 0;
    let c = packet::checksum(&stray[14..34]);
    stray[24..26].copy_from_slice(&c.to_be_bytes());
    assert_eq!(run(&mut l, &stray), (TC_ACT_OK, stray.clone()));
    assert_eq!(reason(&l, Reason::FragmentPassed), 1);
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
    assert_eq!(reason(&l, Reason::KernelFlowPassed), 2);
    assert_eq!(reason(&l, Reason::CtInvalid), 0);
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
    assert_eq!(reason(&l, Reason::NewFlow), 1);

    // ICMP errors about a kernel flow are netfilter's to translate: here
    // one about the DNATed request, on its way to the old backend.
    let quoted = Builder::tcp(CLIENT, 40000, "10.244.0.12", 8080, ACK).build();
    let err = packet::icmp_error("10.0.0.254", CLIENT, 3, 4, &quoted);
    assert_eq!(run(&mut l, &err), (TC_ACT_OK, err.clone()));
    assert_eq!(reason(&l, Reason::IcmpErrorTranslated), 0);
}
