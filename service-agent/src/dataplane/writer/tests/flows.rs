use std::{collections::HashMap, net::Ipv6Addr};

use super::*;
use crate::dataplane::maps::Maps;
use crate::dataplane::writer::{
    CT_TCP_CLOSING_TIMEOUT_NS, CT_TCP_SYN_TIMEOUT_NS, CT_TCP_TIMEOUT_NS, CT_UDP_TIMEOUT_NS,
    FlowLimits, Lifetimes, expire_conntrack, snat_source,
};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 9);
const NOW: u64 = 1_000 * 1_000_000_000_000;

/// Both conntrack entries of a flow from CLIENT:`sport` through `fk` to
/// `backend` (a BACKENDS id), as the programs write them.
fn flow(
    fk: &FrontendKey,
    svc_id: u32,
    backend: (u32, Ipv4Addr),
    sport: u16,
    seen: (u64, u64),
) -> [(CtKey, CtValue); 2] {
    let proto = fk.proto.number();
    let (backend_id, baddr) = backend;
    let request = CtKey {
        saddr: CLIENT.octets(),
        daddr: v4(fk.addr).octets(),
        sport,
        dport: fk.port,
        proto,
        _pad: [0; 3],
    };
    let reply = CtKey {
        saddr: baddr.octets(),
        daddr: CLIENT.octets(),
        sport: 8080,
        dport: sport,
        proto,
        _pad: [0; 3],
    };
    let value = |last_seen_ns, nat: (Ipv4Addr, u16, Ipv4Addr, u16), flags| CtValue {
        last_seen_ns,
        nat_saddr: nat.0.octets(),
        nat_sport: nat.1,
        nat_daddr: nat.2.octets(),
        nat_dport: nat.3,
        backend_id,
        svc_id,
        flags,
        proto,
        _pad: 0,
    };
    [
        (request, value(seen.0, (CLIENT, sport, baddr, 8080), 0)),
        (
            reply,
            value(seen.1, (v4(fk.addr), fk.port, CLIENT, sport), CT_F_REPLY),
        ),
    ]
}

fn ids(c: &Contents, fk: &FrontendKey, b: u8) -> (u32, (u32, Ipv4Addr)) {
    let svc_id = c.services[&master_key(fk)].svc_id;
    let id = *c
        .backends
        .iter()
        .find(|(_, v)| Ipv4Addr::from(v.addr) == pod(b))
        .unwrap()
        .0;
    (svc_id, (id, pod(b)))
}

#[test]
fn removing_a_backend_flushes_exactly_its_udp_flows_of_that_frontend() {
    let (dns, other_udp, web) = (udp(1), udp(2), tcp(3));
    let before = plan(vec![
        (dns, fe("dns", &[1, 2])),
        (other_udp, fe("dns2", &[1])),
        (web, fe("web", &[1])),
    ]);
    let (mut maps, mut w) = programmed(&before);
    let c = maps.contents.clone();
    let mut entries = vec![];
    let mut doomed = vec![];
    for (port, (fk, b)) in [(dns, 1), (dns, 2), (other_udp, 1), (web, 1)]
        .into_iter()
        .enumerate()
    {
        let (svc_id, backend) = ids(&c, &fk, b);
        let pair = flow(&fk, svc_id, backend, 40000 + port as u16, (NOW, NOW));
        if fk == dns && b == 1 {
            doomed.extend(pair.iter().map(|(k, _)| *k));
        }
        entries.extend(pair);
    }
    maps.contents.conntrack = entries.iter().copied().collect();
    let r = apply_clean(
        &mut w,
        &mut maps,
        &plan(vec![
            (dns, fe("dns", &[2])),
            (other_udp, fe("dns2", &[1])),
            (web, fe("web", &[1])),
        ]),
    );
    assert_eq!(r.udp_flows_flushed, 2);
    let left: HashMap<CtKey, CtValue> = entries
        .into_iter()
        .filter(|(k, _)| !doomed.contains(k))
        .collect();
    assert_eq!(maps.contents.conntrack, left);

    // Removing the whole frontend flushes its remaining UDP flows; the TCP
    // frontend's flows stay when it goes.
    let r = apply_clean(
        &mut w,
        &mut maps,
        &plan(vec![(other_udp, fe("dns2", &[1]))]),
    );
    assert_eq!(r.udp_flows_flushed, 2, "{r:?}");
    assert_eq!(maps.contents.conntrack.len(), 4);
    assert!(
        maps.contents
            .conntrack
            .values()
            .all(|v| v.svc_id != c.services[&master_key(&dns)].svc_id)
    );
}

/// A walk cut short and removals the kernel refuses are reported, with
/// what could be done done: the flush is not silently partial.
#[test]
fn flush_errors_are_reported_as_conntrack_flush_faults() {
    let dns = udp(1);
    let (mut maps, mut w) = programmed(&plan(vec![(dns, fe("dns", &[1, 2]))]));
    let (svc_id, backend) = ids(&maps.contents, &dns, 1);
    maps.contents.conntrack = flow(&dns, svc_id, backend, 40000, (NOW, NOW))
        .into_iter()
        .collect();
    maps.fail_map(MAP_CONNTRACK);
    let r = w.apply(&mut maps, &plan(vec![(dns, fe("dns", &[2]))]));
    assert!(r.errors.is_empty(), "{r:?}");
    assert_eq!(r.udp_flows_flushed, 0);
    let kinds: Vec<_> = r.faults.iter().map(|(k, _)| *k).collect();
    assert_eq!(kinds, [crate::faults::FaultKind::ConntrackFlush], "{r:?}");
    assert!(
        r.faults[0]
            .1
            .starts_with("removing 2 CONNTRACK entries failed, the first with: "),
        "{r:?}"
    );
    assert_eq!(maps.contents.conntrack.len(), 2);
}

/// The GC names a walk that failed and removals that failed, and says how
/// many entries it read (what /metrics reports as CONNTRACK's fill).
#[test]
fn gc_errors_are_reported_with_what_was_read() {
    let web = tcp(2);
    let old = NOW - CT_TCP_TIMEOUT_NS - 1_000_000_000;
    let mut maps = FakeMaps::default();
    for port in 1..=3 {
        maps.contents
            .conntrack
            .extend(flow(&web, 2, (1, pod(1)), port, (old, old)));
    }
    maps.fail_conntrack_walk(4);
    maps.fail_map(MAP_CONNTRACK);
    let pass = expire_conntrack(&mut maps, NOW, &Lifetimes::default());
    assert_eq!((pass.entries, pass.removed), (4, 0), "{pass:?}");
    assert_eq!(pass.errors.len(), 2, "{pass:?}");
    assert!(
        pass.errors[0].starts_with("walking CONNTRACK: `bpf_map_get_next_key` failed: "),
        "{pass:?}"
    );
    assert!(pass.errors[0].contains("Input/output error"), "{pass:?}");
    assert!(pass.errors[1].starts_with("removing "), "{pass:?}");
    maps.heal();
    let pass = expire_conntrack(&mut maps, NOW, &Lifetimes::default());
    assert_eq!((pass.entries, pass.removed), (6, 6), "{pass:?}");
    assert!(pass.errors.is_empty());
}

/// Only UDP flows are flushed: a TCP frontend losing a backend, or going,
/// does not walk CONNTRACK at all.
#[test]
fn a_tcp_change_does_not_walk_conntrack() {
    let (web, dns) = (tcp(1), udp(2));
    let (mut maps, mut w) = programmed(&plan(vec![
        (web, fe("web", &[1, 2])),
        (dns, fe("dns", &[1, 2])),
    ]));
    let walks = |m: &FakeMaps| m.conntrack_walks.get();
    let r = apply_clean(
        &mut w,
        &mut maps,
        &plan(vec![(web, fe("web", &[1])), (dns, fe("dns", &[1, 2]))]),
    );
    assert_eq!((r.frontends_written, walks(&maps)), (1, 0), "{r:?}");
    assert!(r.removed_pairs.is_empty(), "{r:?}");
    let r = apply_clean(&mut w, &mut maps, &plan(vec![(dns, fe("dns", &[1, 2]))]));
    assert_eq!((r.frontends_removed, walks(&maps)), (1, 0), "{r:?}");
    let r = apply_clean(&mut w, &mut maps, &plan(vec![(dns, fe("dns", &[2]))]));
    assert_eq!(walks(&maps), 1, "{r:?}");
    assert_eq!(r.removed_pairs.len(), 1, "{r:?}");
}

#[test]
fn an_update_that_keeps_the_backends_flushes_nothing() {
    let fk = udp(1);
    let (mut maps, mut w) = programmed(&plan(vec![(fk, fe("dns", &[1, 2]))]));
    let (svc_id, backend) = ids(&maps.contents, &fk, 1);
    maps.contents.conntrack = flow(&fk, svc_id, backend, 40000, (NOW, NOW))
        .into_iter()
        .collect();
    let mut changed = fe("dns", &[1, 2, 3]);
    changed.affinity_timeout_s = Some(60);
    let r = apply_clean(&mut w, &mut maps, &plan(vec![(fk, changed)]));
    assert_eq!((r.frontends_written, r.udp_flows_flushed), (1, 0));
    assert_eq!(maps.contents.conntrack.len(), 2);
}

#[test]
fn idle_flows_expire_by_their_timeout_both_directions_together() {
    let (dns, web) = (udp(1), tcp(2));
    let backend = (1, pod(1));
    let closing = |mut pair: [(CtKey, CtValue); 2]| {
        for (_, v) in &mut pair {
            v.flags |= CT_F_CLOSING;
        }
        pair
    };
    let just = 1_000_000_000;
    // (name, entries, expected to expire)
    let cases = [
        (
            "udp idle",
            flow(
                &dns,
                1,
                backend,
                1,
                (
                    NOW - CT_UDP_TIMEOUT_NS - just,
                    NOW - CT_UDP_TIMEOUT_NS - just,
                ),
            ),
            true,
        ),
        (
            "udp recent",
            flow(&dns, 1, backend, 2, (NOW - CT_UDP_TIMEOUT_NS + just, NOW)),
            false,
        ),
        (
            "udp replies still run",
            flow(&dns, 1, backend, 3, (NOW - CT_UDP_TIMEOUT_NS - just, NOW)),
            false,
        ),
        (
            "tcp idle a while",
            flow(
                &web,
                2,
                backend,
                4,
                (
                    NOW - CT_UDP_TIMEOUT_NS - just,
                    NOW - CT_UDP_TIMEOUT_NS - just,
                ),
            ),
            false,
        ),
        (
            "tcp idle for hours",
            flow(
                &web,
                2,
                backend,
                5,
                (
                    NOW - CT_TCP_TIMEOUT_NS - just,
                    NOW - CT_TCP_TIMEOUT_NS - just,
                ),
            ),
            true,
        ),
        (
            "tcp closing",
            closing(flow(
                &web,
                2,
                backend,
                6,
                (
                    NOW - CT_TCP_CLOSING_TIMEOUT_NS - just,
                    NOW - CT_TCP_CLOSING_TIMEOUT_NS - just,
                ),
            )),
            true,
        ),
        (
            "tcp closing, recent",
            closing(flow(
                &web,
                2,
                backend,
                7,
                (NOW - CT_TCP_CLOSING_TIMEOUT_NS + just, NOW),
            )),
            false,
        ),
    ];
    let mut maps = FakeMaps::default();
    for (_, pair, _) in &cases {
        maps.contents.conntrack.extend(pair.iter().copied());
    }
    // A request whose reply entry is gone expires alone.
    let lone = flow(&dns, 1, backend, 8, (NOW - CT_UDP_TIMEOUT_NS - just, 0))[0];
    maps.contents.conntrack.insert(lone.0, lone.1);
    let n = expire_conntrack(&mut maps, NOW, &Lifetimes::default()).removed;
    let expired = cases.iter().filter(|c| c.2).count() * 2 + 1;
    assert_eq!(n, expired);
    for (name, pair, gone) in &cases {
        for (k, _) in pair {
            assert_eq!(!maps.contents.conntrack.contains_key(k), *gone, "{name}");
        }
    }
    assert!(!maps.contents.conntrack.contains_key(&lone.0));
}

/// A client reusing the port of an expired flow while the agent removes it:
/// the walk saw both flows idle, but before the removals one flow's SYN
/// touched its request entry, and the other's request entry was already
/// gone when a SYN came, so the program wrote a new flow's reply entry at
/// the old key. Only what is still as walked goes: both halves of the
/// touched flow stay, and so does the new reply entry.
#[test]
fn expiry_keeps_the_entries_a_reused_port_touched_after_the_walk() {
    let web = tcp(2);
    let backend = (1, pod(1));
    let old = NOW - CT_TCP_CLOSING_TIMEOUT_NS - 1_000_000_000;
    let closing = |sport| {
        let mut pair = flow(&web, 2, backend, sport, (old, old));
        for (_, v) in &mut pair {
            v.flags |= CT_F_CLOSING;
        }
        pair
    };
    let (touched, rewritten, idle) = (closing(10), closing(11), closing(12));
    let mut maps = FakeMaps::default();
    for pair in [&touched, &rewritten, &idle] {
        maps.contents.conntrack.extend(pair.iter().copied());
    }
    // After the walk: a SYN on `touched`'s request entry, and a new flow's
    // reply entry at `rewritten`'s reply key.
    let mut syn = touched[0].1;
    syn.last_seen_ns = NOW;
    syn.flags &= !CT_F_CLOSING;
    maps.conntrack_since_walk.insert(touched[0].0, syn);
    let mut fresh = rewritten[1].1;
    fresh.last_seen_ns = NOW;
    fresh.flags = CT_F_REPLY | CT_F_SYN_ONLY;
    maps.conntrack_since_walk.insert(rewritten[1].0, fresh);
    let removed = expire_conntrack(&mut maps, NOW, &Lifetimes::default()).removed;
    let left = |k: &CtKey| maps.contents.conntrack.contains_key(k);
    assert!(
        left(&touched[0].0) && left(&touched[1].0),
        "the touched flow stays whole"
    );
    assert!(!left(&rewritten[0].0), "the old request entry goes");
    assert!(left(&rewritten[1].0), "the new flow's reply entry stays");
    assert!(!left(&idle[0].0) && !left(&idle[1].0), "the idle flow goes");
    assert_eq!(removed, 3);
}

/// An opening no reply answered (both entries still marked SYN_ONLY, as the
/// programs write a new TCP flow) is forgotten within the SYN lifetime; once
/// the first reply cleared the mark on the reply entry, the flow has the
/// established lifetime; entries without any mark (written before the mark
/// existed) are established too.
#[test]
fn unanswered_openings_expire_within_the_syn_lifetime_established_flows_live_on() {
    let web = tcp(2);
    let backend = (1, pod(1));
    let just = 1_000_000_000;
    let idle = NOW - CT_TCP_SYN_TIMEOUT_NS - just;
    let mark = |mut pair: [(CtKey, CtValue); 2], request: bool, reply: bool| {
        if request {
            pair[0].1.flags |= CT_F_SYN_ONLY;
        }
        if reply {
            pair[1].1.flags |= CT_F_SYN_ONLY;
        }
        pair
    };
    // (name, entries, expected to expire)
    let cases = [
        (
            "unanswered SYN, idle",
            mark(flow(&web, 2, backend, 1, (idle, idle)), true, true),
            true,
        ),
        (
            "unanswered SYN, recent",
            mark(
                flow(&web, 2, backend, 2, (NOW - just, NOW - just)),
                true,
                true,
            ),
            false,
        ),
        (
            "answered, idle past the SYN lifetime",
            mark(flow(&web, 2, backend, 3, (idle, idle)), true, false),
            false,
        ),
        (
            "no marks (older agent), idle",
            flow(&web, 2, backend, 4, (idle, idle)),
            false,
        ),
        (
            "answered, idle for hours",
            mark(
                flow(
                    &web,
                    2,
                    backend,
                    5,
                    (
                        NOW - CT_TCP_TIMEOUT_NS - just,
                        NOW - CT_TCP_TIMEOUT_NS - just,
                    ),
                ),
                true,
                false,
            ),
            true,
        ),
    ];
    let mut maps = FakeMaps::default();
    for (_, pair, _) in &cases {
        maps.contents.conntrack.extend(pair.iter().copied());
    }
    // An opening whose reply entry is gone expires by the SYN lifetime alone.
    let mut lone = flow(&web, 2, backend, 6, (idle, 0))[0];
    lone.1.flags |= CT_F_SYN_ONLY;
    maps.contents.conntrack.insert(lone.0, lone.1);
    let n = expire_conntrack(&mut maps, NOW, &Lifetimes::default()).removed;
    assert_eq!(n, cases.iter().filter(|c| c.2).count() * 2 + 1);
    for (name, pair, gone) in &cases {
        for (k, _) in pair {
            assert_eq!(!maps.contents.conntrack.contains_key(k), *gone, "{name}");
        }
    }
    assert!(!maps.contents.conntrack.contains_key(&lone.0));
    // Shorter lifetimes from the flags apply as given.
    let short = Lifetimes {
        tcp_syn_ns: just,
        ..Lifetimes::default()
    };
    let pair = mark(
        flow(&web, 2, backend, 7, (NOW - 2 * just, NOW - 2 * just)),
        true,
        true,
    );
    maps.contents.conntrack.extend(pair);
    assert_eq!(expire_conntrack(&mut maps, NOW, &short).removed, 2);
}

#[test]
fn node_addresses_follow_the_list() {
    let mut maps = FakeMaps::default();
    let w = writer(&mut maps);
    let a = |last| Ipv4Addr::new(192, 168, 0, last);
    w.set_node_addrs(&mut maps, &[a(1), a(2)]).unwrap();
    w.set_node_addrs(&mut maps, &[a(2), a(3)]).unwrap();
    assert_eq!(
        maps.contents.node_addrs,
        [a(2).octets(), a(3).octets()].into_iter().collect()
    );
    w.set_snat_addr(&mut maps, Some(a(2))).unwrap();
    assert_eq!(
        maps.contents.meta[&META_SNAT_ADDR],
        u32::from_ne_bytes(a(2).octets()) as u64
    );
    w.set_snat_addr(&mut maps, None).unwrap();
    assert_eq!(maps.contents.meta[&META_SNAT_ADDR], 0);
    maps.fail_map(MAP_NODE_ADDRS);
    assert!(w.set_node_addrs(&mut maps, &[a(4)]).is_err());
}

#[test]
fn a_failed_address_listing_keeps_the_last_good_node_addresses() {
    let mut maps = FakeMaps::default();
    let w = writer(&mut maps);
    let a = |last| Ipv4Addr::new(192, 168, 0, last);
    let b: Ipv6Addr = "fd00:77::11".parse().unwrap();
    let listed = w.refresh_node_addrs(
        &mut maps,
        || Ok::<_, String>(vec![a(1), a(2)]),
        || Ok(vec![b]),
    );
    assert_eq!(listed, Ok((vec![a(1), a(2)], vec![b])));
    let before = maps.contents.node_addrs.clone();
    let e = w
        .refresh_node_addrs(&mut maps, || Err("netlink: EBUSY"), || Ok(vec![]))
        .unwrap_err();
    assert_eq!(maps.contents.node_addrs, before);
    assert!(
        e.contains("NODE_ADDRS keeps its last set: netlink: EBUSY"),
        "{e}"
    );
    let e = w
        .refresh_node_addrs(&mut maps, || Ok(vec![a(1)]), || Err("netlink: EBUSY"))
        .unwrap_err();
    assert!(e.contains("NODE_ADDRS6 keeps its last set"), "{e}");
    assert_eq!(
        maps.contents.node_addrs6,
        [b.octets()].into_iter().collect()
    );
    // A listing that comes back empty is a listing: NodePorts answer nowhere.
    w.refresh_node_addrs(&mut maps, || Ok::<_, String>(vec![]), || Ok(vec![]))
        .unwrap();
    assert!(maps.contents.node_addrs.is_empty());
    assert!(maps.contents.node_addrs6.is_empty());
}

/// The address as the programs put it together from META (conntrack.rs's
/// `snat_address6`), None when HI is 0.
fn snat6_in(maps: &FakeMaps) -> Option<Ipv6Addr> {
    let (hi, lo) = (maps.meta(META_SNAT_ADDR6_HI), maps.meta(META_SNAT_ADDR6_LO));
    let mut o = [0u8; 16];
    o[..8].copy_from_slice(&hi.to_ne_bytes());
    o[8..].copy_from_slice(&lo.to_ne_bytes());
    (hi != 0).then(|| Ipv6Addr::from(o))
}

#[test]
fn the_ipv6_snat_address_reaches_meta_in_two_halves_never_torn() {
    let mut maps = FakeMaps::default();
    let w = writer(&mut maps);
    let (a, b): (Ipv6Addr, Ipv6Addr) = (
        "fd00:77::11".parse().unwrap(),
        "fd00:78::1:2".parse().unwrap(),
    );
    w.set_snat_addr6(&mut maps, Some(a)).unwrap();
    assert_eq!(snat6_in(&maps), Some(a));
    // A change clears HI first and sets it last: every state a reader can
    // meet between the writes is the old address, none, or the new one.
    maps.record_history();
    w.set_snat_addr6(&mut maps, Some(b)).unwrap();
    let seen: Vec<Option<Ipv6Addr>> = (maps.history.take().unwrap().iter())
        .map(|c| {
            let mut m = FakeMaps::default();
            m.contents = c.clone();
            snat6_in(&m)
        })
        .collect();
    assert_eq!(seen, [None, None, Some(b)]);
    // Unchanged: nothing written, so the programs never lose it for a moment.
    let writes = maps.writes();
    w.set_snat_addr6(&mut maps, Some(b)).unwrap();
    assert_eq!(maps.writes(), writes);
    w.set_snat_addr6(&mut maps, None).unwrap();
    assert_eq!(snat6_in(&maps), None);
    assert_eq!(maps.meta(META_SNAT_ADDR6_LO), 0);
    // The IPv4 slot is its own.
    w.set_snat_addr(&mut maps, Some(Ipv4Addr::new(192, 168, 0, 1)))
        .unwrap();
    w.set_snat_addr6(&mut maps, Some(a)).unwrap();
    assert_eq!(snat6_in(&maps), Some(a));
    assert_eq!(
        maps.meta(META_SNAT_ADDR),
        u32::from_ne_bytes([192, 168, 0, 1]) as u64
    );
}

#[test]
fn the_snat_source_is_the_first_fixed_then_external_then_any_node_address() {
    let (x, y, z): (Ipv6Addr, Ipv6Addr, Ipv6Addr) = (
        "fd00:77::11".parse().unwrap(),
        "2001:db8::5".parse().unwrap(),
        "fd00:10:244:1::1".parse().unwrap(),
    );
    // --node-ip wins, in the order given.
    assert_eq!(snat_source(&[y, x], [vec![x]], &[z]), Some(y));
    // Else the first external interface that has an address of the family
    // (an interface without one, such as an IPv4-only uplink, is skipped).
    assert_eq!(snat_source(&[], [vec![], vec![x, y]], &[z]), Some(x));
    // Else any address of the node.
    assert_eq!(snat_source(&[], [vec![], vec![]], &[z, x]), Some(z));
    // None at all: the programs refuse such flows (snat_failed).
    assert_eq!(snat_source::<Ipv6Addr>(&[], [vec![]], &[]), None);
    let v4 = Ipv4Addr::new(192, 168, 77, 11);
    assert_eq!(snat_source(&[], [vec![v4]], &[]), Some(v4));
}

#[test]
fn flow_limits_reach_meta_as_the_programs_read_them() {
    let mut maps = FakeMaps::default();
    let w = writer(&mut maps);
    let l = FlowLimits {
        snat_ports: (20_000, 20_003),
        flood_threshold: 500,
    };
    w.set_flow_limits(&mut maps, &l).unwrap();
    let ports = maps.contents.meta[&META_SNAT_PORTS];
    assert_eq!((ports & 0xffff, ports >> 16), (20_000, 4));
    assert_eq!(maps.contents.meta[&META_FLOOD_THRESHOLD], 500);
    // The whole port space fits: 65,535 ports from 1.
    let all = FlowLimits {
        snat_ports: (1, 65_535),
        ..l
    };
    assert_eq!(all.snat_ports_word(), 1 | 65_535 << 16);
    let d = FlowLimits::default().snat_ports_word();
    assert_eq!(
        (d & 0xffff, d >> 16),
        (SNAT_PORT_MIN as u64, SNAT_PORT_COUNT as u64)
    );
}
