//! Maglev tables through the fake maps: which frontends get one, that a
//! packet never meets a flag without its table or a table naming a missing
//! backend, the fallback when MAGLEV is full, and what a resync costs.
use super::*;
use crate::{
    dataplane::{
        fake::Op,
        maps::{Entry, EntryKey},
    },
    plan::maglev::Balancing,
};

const SIZE: u32 = 251;

fn node_port(port: u16) -> FrontendKey {
    FrontendKey {
        addr: Ipv4Addr::UNSPECIFIED.into(),
        port,
        proto: Protocol::Tcp,
    }
}

/// The plan of NodePort 30080 alone, with `backends`.
fn np_plan(backends: &[u8]) -> Plan {
    plan(vec![(
        node_port(30080),
        external(FrontendKind::NodePort, backends),
    )])
}

fn external(kind: FrontendKind, backends: &[u8]) -> FrontendPlan {
    FrontendPlan {
        kind,
        ..fe("web", backends)
    }
}

fn maglev_writer(maps: &mut FakeMaps) -> Writer {
    let mut w = writer(maps);
    w.set_balancing(Balancing::Maglev { table_size: SIZE });
    w
}

/// The table of the set whose master is `mk`, as backend addresses.
fn table_of(c: &Contents, mk: ServiceKey) -> Option<Vec<Ipv4Addr>> {
    let m = c.services.get(&mk)?;
    let t = c.maglev.get(&m.svc_id)?;
    Some(
        t.iter()
            .map(|id| Ipv4Addr::from(c.backends[id].addr))
            .collect(),
    )
}

/// What a packet may see at any moment: a master flagged for Maglev has
/// its table, and every table names backends BACKENDS holds.
fn assert_tables_consistent(c: &Contents, when: &str) {
    for (k, m) in c.services.iter().filter(|(k, _)| k.slot == 0) {
        if m.flags & SVC_F_MAGLEV != 0 {
            assert!(
                c.maglev.contains_key(&m.svc_id),
                "{when}: {k:?} is flagged but has no table"
            );
        }
    }
    for (svc_id, t) in &c.maglev {
        assert_eq!(t.len(), SIZE as usize, "{when}: table {svc_id}");
        for id in t {
            assert!(
                c.backends.contains_key(id),
                "{when}: table {svc_id} names missing backend {id}"
            );
        }
    }
}

#[test]
fn frontends_reached_from_outside_get_a_table_of_their_backends_and_cluster_ips_none() {
    let np = node_port(30080);
    let lb = key(200, 80, Protocol::Tcp);
    let p = plan(vec![
        (tcp(1), fe("web", &[1, 2, 3])),
        (np, external(FrontendKind::NodePort, &[1, 2, 3])),
        (lb, external(FrontendKind::LoadBalancer, &[1, 2, 3])),
    ]);
    let mut maps = FakeMaps::default();
    let mut w = maglev_writer(&mut maps);
    apply_clean(&mut w, &mut maps, &p);
    let c = &maps.contents;
    assert_eq!(c.services[&master_key(&tcp(1))].flags & SVC_F_MAGLEV, 0);
    assert_eq!(table_of(c, master_key(&tcp(1))), None);
    assert_eq!(c.maglev.len(), 2);
    for fk in [np, lb] {
        assert_ne!(c.services[&master_key(&fk)].flags & SVC_F_MAGLEV, 0);
        let t = table_of(c, master_key(&fk)).unwrap();
        assert_eq!(set(&t), set(&[pod(1), pod(2), pod(3)]));
        for b in [pod(1), pod(2), pod(3)] {
            let share = t.iter().filter(|a| **a == b).count();
            assert!((80..=88).contains(&share), "{b}: {share} of {SIZE}");
        }
    }
    // The same backend set, the same table.
    assert_eq!(table_of(c, master_key(&np)), table_of(c, master_key(&lb)));
    assert_tables_consistent(c, "after the first apply");
}

#[test]
fn the_in_cluster_set_of_a_local_frontend_has_a_table_of_its_own() {
    let np = node_port(30080);
    let mut f = external(FrontendKind::NodePort, &[1]);
    f.in_cluster = Some(fe("web", &[1, 2]).backends);
    let mut maps = FakeMaps::default();
    let mut w = maglev_writer(&mut maps);
    apply_clean(&mut w, &mut maps, &plan(vec![(np, f)]));
    let c = &maps.contents;
    assert_eq!(set(&table_of(c, master_key(&np)).unwrap()), set(&[pod(1)]));
    let inner = table_of(c, in_cluster_key(&np)).unwrap();
    assert_eq!(set(&inner), set(&[pod(1), pod(2)]));
}

#[test]
fn two_nodes_build_the_same_table_whatever_their_order_and_locality() {
    let np = node_port(30080);
    let mut a = external(FrontendKind::NodePort, &[4, 9, 2, 7]);
    let mut b = external(FrontendKind::NodePort, &[7, 2, 9, 4]);
    let mark_local = |f: &mut FrontendPlan, i: usize| {
        let mut v = f.backends.to_vec();
        v[i].local = true;
        f.backends = v.into();
    };
    mark_local(&mut a, 0);
    mark_local(&mut b, 2);
    let tables: Vec<_> = [a, b]
        .into_iter()
        .map(|f| {
            let mut maps = FakeMaps::default();
            let mut w = maglev_writer(&mut maps);
            // Different ids on each node: another frontend came first here.
            if f.backends[0].addr == pod(7) {
                apply_clean(&mut w, &mut maps, &plan(vec![(tcp(1), fe("x", &[50, 9]))]));
            }
            apply_clean(&mut w, &mut maps, &plan(vec![(np, f)]));
            table_of(&maps.contents, master_key(&np)).unwrap()
        })
        .collect();
    assert_eq!(tables[0], tables[1]);
}

#[test]
fn a_resync_of_an_unchanged_plan_writes_nothing() {
    let p = plan(vec![
        (
            node_port(30080),
            external(FrontendKind::NodePort, &[1, 2, 3]),
        ),
        (
            node_port(30081),
            external(FrontendKind::NodePort, &[1, 2, 3]),
        ),
    ]);
    let mut maps = FakeMaps::default();
    let mut w = maglev_writer(&mut maps);
    apply_clean(&mut w, &mut maps, &p);
    let writes = maps.writes();
    let r = apply_clean(&mut w, &mut maps, &p);
    assert_eq!((r.frontends_written, maps.writes()), (0, writes));
    // Also after a restart: the adopted tables are the plan's.
    let mut again = maglev_writer(&mut maps);
    apply_clean(&mut again, &mut maps, &p);
    assert_eq!(maps.writes(), writes);
}

#[test]
fn no_moment_of_a_change_shows_a_flag_without_its_table_or_a_table_without_its_backends() {
    let np = node_port(30080);
    let steps: Vec<(&str, Balancing, Vec<u8>)> = vec![
        ("random", Balancing::Random, vec![1, 2, 3]),
        (
            "to maglev",
            Balancing::Maglev { table_size: SIZE },
            vec![1, 2, 3],
        ),
        (
            "one replaced",
            Balancing::Maglev { table_size: SIZE },
            vec![1, 2, 4],
        ),
        (
            "all replaced",
            Balancing::Maglev { table_size: SIZE },
            vec![5, 6],
        ),
        ("back to random", Balancing::Random, vec![5, 6]),
        (
            "maglev again",
            Balancing::Maglev { table_size: SIZE },
            vec![5],
        ),
        ("removed", Balancing::Maglev { table_size: SIZE }, vec![]),
    ];
    let mut maps = FakeMaps::default();
    maps.record_history();
    let mut w = writer(&mut maps);
    for (name, b, backends) in steps {
        w.set_balancing(b);
        let p = if name == "removed" {
            plan(vec![])
        } else {
            np_plan(&backends)
        };
        apply_clean(&mut w, &mut maps, &p);
        for (i, c) in maps.history.take().unwrap().iter().enumerate() {
            assert_consistent(c, &format!("{name}, write {i}"));
            assert_tables_consistent(c, &format!("{name}, write {i}"));
        }
        maps.record_history();
        let c = &maps.contents;
        match (name, table_of(c, master_key(&np))) {
            ("removed", _) => assert!(c.maglev.is_empty() && c.services.is_empty()),
            ("random" | "back to random", t) => assert!(t.is_none() && c.maglev.is_empty()),
            (_, t) => {
                let want: Vec<Ipv4Addr> = backends.iter().map(|b| pod(*b)).collect();
                assert_eq!(set(&t.unwrap()), set(&want), "{name}");
            }
        }
    }
}

#[test]
fn a_table_replaced_in_one_write_after_its_new_backends_exist() {
    let mut maps = FakeMaps::default();
    let mut w = maglev_writer(&mut maps);
    apply_clean(&mut w, &mut maps, &np_plan(&[1, 2]));
    maps.log.clear();
    apply_clean(&mut w, &mut maps, &np_plan(&[1, 3]));
    let log = &maps.log;
    let pos = |f: &dyn Fn(&Op) -> bool| log.iter().position(f).unwrap();
    let table = pos(&|op| matches!(op, Op::InsertMaglev(_)));
    let added = pos(&|op| matches!(op, Op::Insert(Entry::Backend(..))));
    let dropped = pos(&|op| matches!(op, Op::Remove(EntryKey::Backend(_))));
    assert!(added < table && table < dropped, "{log:?}");
    assert_eq!(log.iter().filter(|op| op.map() == MAP_MAGLEV).count(), 1);
}

#[test]
fn a_full_maglev_map_leaves_the_frontend_random_reported_until_there_is_room() {
    let (a, b) = (node_port(30080), node_port(30081));
    let p = plan(vec![
        (a, external(FrontendKind::NodePort, &[1, 2])),
        (b, external(FrontendKind::NodePort, &[3, 4])),
    ]);
    let mut maps = FakeMaps::default();
    maps.set_capacity(MAP_MAGLEV, 1);
    let mut w = maglev_writer(&mut maps);
    let r = w.apply(&mut maps, &p);
    assert_eq!(r.errors.len(), 1, "{r:?}");
    let e = &r.errors[0];
    assert!(
        e.contains("default/web") && e.contains("*:30081") && e.contains("raise --maglev-max"),
        "{e}"
    );
    let c = &maps.contents;
    let m = c.services[&master_key(&b)];
    assert_eq!(m.flags & SVC_F_MAGLEV, 0);
    assert_eq!(live_backends(c, &b).unwrap(), [pod(3), pod(4)]);
    assert!(table_of(c, master_key(&a)).is_some());
    assert_tables_consistent(c, "while full");
    // Still reported at the next apply; written once there is room.
    assert_eq!(w.apply(&mut maps, &p).errors.len(), 1);
    maps.set_capacity(MAP_MAGLEV, 2);
    apply_clean(&mut w, &mut maps, &p);
    let t = table_of(&maps.contents, master_key(&b)).unwrap();
    assert_eq!(set(&t), set(&[pod(3), pod(4)]));
    assert_ne!(
        maps.contents.services[&master_key(&b)].flags & SVC_F_MAGLEV,
        0
    );
}

#[test]
fn a_table_that_cannot_be_written_or_removed_leaves_the_frontend_as_it_was() {
    let np = node_port(30080);
    let mut maps = FakeMaps::default();
    let mut w = maglev_writer(&mut maps);
    let before = np_plan(&[1, 2]);
    let after = np_plan(&[3]);
    apply_clean(&mut w, &mut maps, &before);
    let was = maps.contents.clone();
    maps.record_history();
    maps.fail_map(MAP_MAGLEV);
    let r = w.apply(&mut maps, &after);
    assert_eq!(r.errors.len(), 1, "{r:?}");
    assert!(r.errors[0].contains("MAGLEV"), "{r:?}");
    for (i, c) in maps.history.take().unwrap().iter().enumerate() {
        assert_consistent(c, &format!("write {i}"));
        assert_tables_consistent(c, &format!("write {i}"));
    }
    assert_eq!(maps.contents, was);
    maps.heal();
    apply_clean(&mut w, &mut maps, &after);
    let t = table_of(&maps.contents, master_key(&np)).unwrap();
    assert_eq!(t, vec![pod(3); SIZE as usize]);
    assert_eq!(maps.contents.backends.len(), 1);
}

#[test]
fn more_backends_than_table_entries_are_spread_at_random_and_reported() {
    let np = node_port(30080);
    let all: Vec<u8> = (1..=12).collect();
    let mut maps = FakeMaps::default();
    let mut w = writer(&mut maps);
    w.set_balancing(Balancing::Maglev { table_size: 11 });
    let r = w.apply(&mut maps, &np_plan(&all));
    assert!(
        r.errors.len() == 1 && r.errors[0].contains("--maglev-table-size"),
        "{r:?}"
    );
    assert_eq!(live_backends(&maps.contents, &np).unwrap().len(), 12);
    assert!(maps.contents.maglev.is_empty());
}

#[test]
fn adopting_removes_tables_no_frontend_owns() {
    let np = node_port(30080);
    let mut maps = FakeMaps::default();
    let mut w = maglev_writer(&mut maps);
    apply_clean(&mut w, &mut maps, &np_plan(&[1]));
    // An agent that died between removing the master and the table.
    let orphan = maps.contents.services[&master_key(&np)].svc_id;
    maps.contents.services.clear();
    let _ = maglev_writer(&mut maps);
    assert!(!maps.contents.maglev.contains_key(&orphan));
    assert!(maps.log.contains(&Op::Remove(EntryKey::Maglev(orphan))));
}
