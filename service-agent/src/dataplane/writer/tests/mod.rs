//! The writer against the in-memory maps: ordering, rollback, full maps,
//! id reuse and the conntrack it removes, without a kernel.
mod flows;
mod frontends;
mod in_cluster;
mod maglev;

use std::{collections::BTreeSet, net::Ipv4Addr};

use service_common::*;

use super::{ApplyReport, Writer};
use crate::{
    dataplane::{
        fake::{Contents, FakeMaps},
        readback::FeKey,
    },
    plan::{BackendAddr, FrontendKey, FrontendKind, FrontendPlan, Plan, Protocol},
};

const SVC_ID_LIMIT: u32 = 64;

/// The SERVICES key of an IPv4 frontend's master.
fn master_key(fk: &FrontendKey) -> ServiceKey {
    match super::master_key(fk) {
        FeKey::V4(k) => k,
        FeKey::V6(k) => panic!("{k:?} is an IPv6 key"),
    }
}

/// The SERVICES key of an IPv4 frontend's in-cluster master.
fn in_cluster_key(fk: &FrontendKey) -> ServiceKey {
    ServiceKey {
        scope: SCOPE_IN_CLUSTER,
        ..master_key(fk)
    }
}

fn key(last: u8, port: u16, proto: Protocol) -> FrontendKey {
    FrontendKey {
        addr: Ipv4Addr::new(10, 96, 0, last).into(),
        port,
        proto,
    }
}

fn tcp(last: u8) -> FrontendKey {
    key(last, 80, Protocol::Tcp)
}

fn udp(last: u8) -> FrontendKey {
    key(last, 53, Protocol::Udp)
}

/// The IPv4 address these tests' frontends have.
fn v4(a: std::net::IpAddr) -> Ipv4Addr {
    match a {
        std::net::IpAddr::V4(a) => a,
        std::net::IpAddr::V6(a) => panic!("{a} is IPv6"),
    }
}

fn pod(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 1, 0, last)
}

/// A frontend of Service `default/<name>` with backends 10.1.0.<b>:8080.
fn fe(name: &str, backends: &[u8]) -> FrontendPlan {
    FrontendPlan {
        service: format!("default/{name}").into(),
        port_name: "".into(),
        kind: FrontendKind::ClusterIp,
        backends: backends
            .iter()
            .map(|b| BackendAddr {
                addr: pod(*b).into(),
                port: 8080,
                local: false,
            })
            .collect(),
        in_cluster: None,
        affinity_timeout_s: None,
        reject_when_empty: true,
        source_ranges: vec![],
    }
}

fn with_ranges(mut f: FrontendPlan, ranges: &[&str]) -> FrontendPlan {
    f.source_ranges = ranges.iter().map(|r| r.parse().unwrap()).collect();
    f
}

fn plan(frontends: Vec<(FrontendKey, FrontendPlan)>) -> Plan {
    Plan {
        frontends: frontends.into_iter().collect(),
        ..Default::default()
    }
}

fn writer(maps: &mut FakeMaps) -> Writer {
    Writer::adopt(maps, SVC_ID_LIMIT).unwrap()
}

/// Maps and writer after a clean apply of `p`.
fn programmed(p: &Plan) -> (FakeMaps, Writer) {
    let mut maps = FakeMaps::default();
    let mut w = writer(&mut maps);
    let r = w.apply(&mut maps, p);
    assert!(r.errors.is_empty(), "{r:?}");
    (maps, w)
}

fn apply_clean(w: &mut Writer, maps: &mut FakeMaps, p: &Plan) -> ApplyReport {
    let r = w.apply(maps, p);
    assert!(r.errors.is_empty(), "{r:?}");
    r
}

/// The backends a frontend's master counts, in slot order, from the maps.
fn live_backends(c: &Contents, fk: &FrontendKey) -> Option<Vec<Ipv4Addr>> {
    let mk = master_key(fk);
    let m = c.services.get(&mk)?;
    Some(
        (1..=m.count)
            .map(|s| {
                let v = c.services[&ServiceKey { slot: s, ..mk }];
                Ipv4Addr::from(c.backends[&v.backend_id].addr)
            })
            .collect(),
    )
}

/// What a packet may see at any moment: every master counts only slots
/// that are present, each naming a backend in BACKENDS that AFFINITY_MATCH
/// knows as a member of the frontend.
fn assert_consistent(c: &Contents, when: &str) {
    for (k, m) in c.services.iter().filter(|(k, _)| k.slot == 0) {
        for s in 1..=m.count {
            let v = c
                .services
                .get(&ServiceKey { slot: s, ..*k })
                .unwrap_or_else(|| {
                    panic!("{when}: {k:?} counts {} but slot {s} is missing", m.count)
                });
            assert!(
                c.backends.contains_key(&v.backend_id),
                "{when}: slot {s} of {k:?} names missing backend {}",
                v.backend_id
            );
            assert!(
                c.affinity_match.contains(&(m.svc_id, v.backend_id)),
                "{when}: backend {} of {k:?} is not a member",
                v.backend_id
            );
        }
    }
}

fn set(ids: &[Ipv4Addr]) -> BTreeSet<Ipv4Addr> {
    ids.iter().copied().collect()
}
