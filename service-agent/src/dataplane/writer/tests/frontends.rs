use super::*;
use crate::dataplane::{
    fake::Op,
    maps::{Entry, EntryKey},
};

/// The indexes in `log` of the ops matching `f`.
fn position(log: &[Op], f: impl Fn(&Op) -> bool) -> Vec<usize> {
    log.iter()
        .enumerate()
        .filter(|(_, op)| f(op))
        .map(|(i, _)| i)
        .collect()
}

#[test]
fn new_slots_before_the_count_and_surplus_slots_after() {
    let fk = tcp(1);
    let mk = master_key(&fk);
    for (from, to) in [
        (&[1, 2, 3][..], &[4, 5, 6, 7, 8][..]),
        (&[1, 2, 3, 4, 5], &[6, 7]),
    ] {
        let (mut maps, mut w) = programmed(&plan(vec![(fk, fe("web", from))]));
        let start = maps.log.len();
        apply_clean(&mut w, &mut maps, &plan(vec![(fk, fe("web", to))]));
        let log = &maps.log[start..];
        let master = position(log, |op| {
            *op == Op::Insert(Entry::Service(mk, maps.contents.services[&mk]))
        });
        assert_eq!(master.len(), 1, "{log:?}");
        let master = master[0];
        let slot_writes = position(
            log,
            |op| matches!(op, Op::Insert(Entry::Service(k, _)) if k.slot != 0),
        );
        let slot_removals = position(log, |op| matches!(op, Op::Remove(EntryKey::Service(_))));
        let members_added = position(log, |op| matches!(op, Op::Insert(Entry::AffinityMatch(_))));
        let members_removed = position(log, |op| {
            matches!(op, Op::Remove(EntryKey::AffinityMatch(_)))
        });
        let backends_added = position(log, |op| matches!(op, Op::Insert(Entry::Backend(..))));
        let backends_removed = position(log, |op| matches!(op, Op::Remove(EntryKey::Backend(_))));
        assert_eq!(slot_writes.len(), to.len(), "{log:?}");
        assert_eq!(slot_removals.len(), from.len().saturating_sub(to.len()));
        assert_eq!(backends_added.len(), to.len());
        assert_eq!(backends_removed.len(), from.len());
        for (before, after, what) in [
            (
                &backends_added,
                &members_added,
                "backends before memberships",
            ),
            (&members_added, &slot_writes, "memberships before slots"),
            (&slot_writes, &vec![master], "slots before the master"),
            (
                &vec![master],
                &slot_removals,
                "the master before surplus slots go",
            ),
            (
                &vec![master],
                &members_removed,
                "the master before memberships go",
            ),
            (
                &members_removed,
                &backends_removed,
                "memberships before backends go",
            ),
        ] {
            if let (Some(b), Some(a)) = (before.iter().max(), after.iter().min()) {
                assert!(b < a, "{what}: {log:?}");
            }
        }
        assert_eq!(
            live_backends(&maps.contents, &fk).map(|b| set(&b)),
            Some(set(&to.iter().map(|b| pod(*b)).collect::<Vec<_>>()))
        );
    }
}

#[test]
fn no_moment_with_missing_slots_or_no_backend_during_an_update() {
    let fk = tcp(1);
    let other = tcp(2);
    let cases: [(&[u8], &[u8]); 6] = [
        (&[1], &[2, 3, 4, 5]),
        (&[1, 2, 3, 4], &[5]),
        (&[1, 2, 3], &[4, 5, 6]),
        (&[1, 2], &[1, 2, 3, 4, 5]),
        (&[1, 2, 3, 4, 5], &[2, 4]),
        (&[1, 2, 3], &[3, 2, 1, 9]),
    ];
    for (from, to) in cases {
        let (mut maps, mut w) = programmed(&plan(vec![
            (fk, fe("web", from)),
            (other, fe("db", &[1, 7])),
        ]));
        maps.record_history();
        apply_clean(
            &mut w,
            &mut maps,
            &plan(vec![(fk, fe("web", to)), (other, fe("db", &[1, 7]))]),
        );
        let history = maps.history.take().unwrap();
        assert!(!history.is_empty());
        let old = set(&from.iter().map(|b| pod(*b)).collect::<Vec<_>>());
        let new = set(&to.iter().map(|b| pod(*b)).collect::<Vec<_>>());
        for (i, c) in history.iter().enumerate() {
            let when = format!("{from:?} -> {to:?}, after write {i}");
            assert_consistent(c, &when);
            let live = live_backends(c, &fk).unwrap_or_else(|| panic!("{when}: frontend gone"));
            assert!(
                live.len() >= from.len().min(to.len()),
                "{when}: serves {live:?}"
            );
            assert!(
                live.iter().all(|b| old.contains(b) || new.contains(b)),
                "{when}: serves {live:?}"
            );
        }
    }
}

/// Every write of an update, failed in turn: what the frontend write did
/// is taken back, the report names the Service, frontend and map, and the
/// next apply (once the fault is gone) gets the update through.
#[test]
fn a_failed_write_at_any_step_leaves_the_state_before() {
    let fk = udp(1);
    let other = tcp(2);
    let before_plan = plan(vec![
        (
            fk,
            with_ranges(fe("dns", &[1, 2, 3]), &["192.0.2.0/24", "198.51.100.0/24"]),
        ),
        (other, fe("web", &[1])),
    ]);
    let mut updated = fe("dns", &[2, 4]);
    updated.affinity_timeout_s = Some(30);
    let after_plan = plan(vec![
        (
            fk,
            with_ranges(updated, &["192.0.2.0/24", "203.0.113.0/24"]),
        ),
        (other, fe("web", &[1])),
    ]);
    let clean = |maps: &mut FakeMaps, w: &mut Writer| {
        let start = maps.writes();
        apply_clean(w, maps, &after_plan);
        (maps.log[start..].to_vec(), maps.contents.clone())
    };
    let (steps, after) = {
        let (mut maps, mut w) = programmed(&before_plan);
        clean(&mut maps, &mut w)
    };
    assert!(steps.len() > 10, "{steps:?}");
    for (n, step) in steps.iter().enumerate() {
        let (mut maps, mut w) = programmed(&before_plan);
        let before = maps.contents.clone();
        maps.fail_write(n);
        let r = w.apply(&mut maps, &after_plan);
        assert_eq!(r.errors.len(), 1, "step {n} ({step:?}): {r:?}");
        match step {
            // Releasing an unused backend comes after the frontend is written.
            Op::Remove(EntryKey::Backend(id)) => {
                let mut expect = after.clone();
                expect.backends.insert(*id, before.backends[id]);
                assert_eq!(maps.contents, expect, "step {n}");
                assert_eq!(
                    r.errors[0],
                    format!("removing backend {id}: `bpf_map_delete_elem` failed")
                );
            }
            _ => {
                assert_eq!(
                    maps.contents, before,
                    "step {n} ({step:?}) left the maps changed"
                );
                let want = format!("Service default/dns frontend {fk}: map {}: ", step.map());
                assert!(
                    r.errors[0].starts_with(&want),
                    "step {n}: {} (want {want})",
                    r.errors[0]
                );
                assert_eq!(r.frontends_written, 0, "step {n}");
            }
        }
        maps.heal();
        let r = w.apply_changes(&mut maps, &after_plan, &BTreeSet::new());
        assert!(r.errors.is_empty(), "retry after step {n}: {r:?}");
        assert_eq!(maps.contents, after, "retry after step {n}");
    }
}

/// A rollback that fails too: the writer still knows exactly what is in
/// the maps, which stay usable, and the next apply finishes the change.
#[test]
fn a_failed_rollback_is_finished_by_the_next_apply() {
    let fk = udp(1);
    let before = plan(vec![(fk, fe("dns", &[1, 2]))]);
    let after = plan(vec![(fk, fe("dns", &[3]))]);
    let (mut clean, mut w) = programmed(&before);
    let start = clean.log.len();
    apply_clean(&mut w, &mut clean, &after);
    // The first write after the master switched, and the rollback's first.
    let first_cleanup = position(&clean.log[start..], |op| matches!(op, Op::Remove(_)))[0];
    let (mut maps, mut w) = programmed(&before);
    maps.fail_write(first_cleanup);
    maps.fail_write(first_cleanup + 1);
    let r = w.apply(&mut maps, &after);
    assert_eq!(r.errors.len(), 1, "{r:?}");
    let e = &r.errors[0];
    assert!(
        e.starts_with(&format!(
            "Service default/dns frontend {fk}: map SERVICES: "
        )),
        "{e}"
    );
    assert!(e.contains("; and rolling back: map SERVICES: "), "{e}");
    // The failed rollback is reported as its own kind too.
    assert_eq!(r.faults.len(), 1, "{r:?}");
    assert_eq!(r.faults[0].0, crate::faults::FaultKind::Rollback);
    assert_consistent(&maps.contents, "after the failed rollback");
    let r = w.apply_changes(&mut maps, &after, &BTreeSet::new());
    assert!(r.errors.is_empty(), "{r:?}");
    assert_eq!(maps.contents, clean.contents);
    assert_eq!(w.backend_count(), 1);
}

#[test]
fn a_full_map_refuses_the_frontend_by_name_and_leaves_the_others() {
    let first = plan(vec![
        (tcp(1), with_ranges(fe("web", &[1, 2]), &["192.0.2.0/24"])),
        (tcp(2), fe("db", &[3])),
    ]);
    let mut grown = first.clone();
    grown.frontends.insert(tcp(2), fe("db", &[3, 4]));
    grown
        .frontends
        .insert(tcp(3), with_ranges(fe("new", &[5]), &["198.51.100.0/24"]));
    let (want, _) = programmed(&grown);
    for (map, message, refused) in [
        (
            MAP_SERVICES,
            "map SERVICES is full; raise --services-max",
            &["db", "new"][..],
        ),
        (
            MAP_BACKENDS,
            "map BACKENDS is full; raise --backends-max",
            &["db", "new"],
        ),
        (
            MAP_AFFINITY_MATCH,
            "map AFFINITY_MATCH is full; raise --backends-max",
            &["db", "new"],
        ),
        (MAP_SOURCE_RANGES, "map SOURCE_RANGES is full", &["new"]),
    ] {
        let (mut maps, mut w) = programmed(&first);
        maps.set_capacity(map, maps.contents.entries(map));
        let r = w.apply(&mut maps, &grown);
        let named: Vec<String> = refused
            .iter()
            .map(|s| {
                let fk = grown
                    .frontends
                    .iter()
                    .find(|(_, f)| *f.service == format!("default/{s}"))
                    .unwrap()
                    .0;
                format!("Service default/{s} frontend {fk}: {message}")
            })
            .collect();
        assert_eq!(r.errors, named, "{map}");
        assert_consistent(&maps.contents, map);
        // The refused frontends keep their state before, the others are written.
        let expect = |fk: &FrontendKey, s: &str| {
            if refused.contains(&s) {
                live_backends(&programmed(&first).0.contents, fk)
            } else {
                live_backends(&want.contents, fk)
            }
        };
        for (fk, s) in [(tcp(1), "web"), (tcp(2), "db"), (tcp(3), "new")] {
            assert_eq!(
                live_backends(&maps.contents, &fk),
                expect(&fk, s),
                "{map}: {s}"
            );
        }
        // Room again: the refused frontends get in without a new change.
        maps.set_capacity(map, usize::MAX);
        let r = w.apply_changes(&mut maps, &grown, &BTreeSet::new());
        assert!(r.errors.is_empty(), "{map}: {r:?}");
        for fk in [tcp(1), tcp(2), tcp(3)] {
            assert_eq!(
                live_backends(&maps.contents, &fk),
                live_backends(&want.contents, &fk),
                "{map}"
            );
        }
        // Backend ids may come back in another order; nothing more or less is there.
        for m in [
            MAP_SERVICES,
            MAP_BACKENDS,
            MAP_AFFINITY_MATCH,
            MAP_SOURCE_RANGES,
        ] {
            assert_eq!(
                maps.contents.entries(m),
                want.contents.entries(m),
                "{map}: {m}"
            );
        }
    }
}

#[test]
fn ids_of_removed_frontends_and_backends_are_reused() {
    let (mut maps, mut w) = programmed(&plan(vec![
        (tcp(1), fe("a", &[1])),
        (tcp(2), fe("b", &[2])),
    ]));
    let svc_id = |c: &Contents, fk: &FrontendKey| c.services[&master_key(fk)].svc_id;
    let id_of = |c: &Contents, b: u8| {
        *c.backends
            .iter()
            .find(|(_, v)| Ipv4Addr::from(v.addr) == pod(b))
            .unwrap()
            .0
    };
    let (svc_a, backend_1) = (svc_id(&maps.contents, &tcp(1)), id_of(&maps.contents, 1));
    let r = apply_clean(&mut w, &mut maps, &plan(vec![(tcp(2), fe("b", &[2]))]));
    assert_eq!((r.frontends_removed, r.backends_removed), (1, 1));
    assert_eq!(
        maps.stats_reset,
        vec![svc_a],
        "a freed svc_id starts from zero counters"
    );
    assert!(
        !maps
            .contents
            .affinity_match
            .iter()
            .any(|(s, _)| *s == svc_a)
    );
    apply_clean(
        &mut w,
        &mut maps,
        &plan(vec![(tcp(2), fe("b", &[2])), (tcp(3), fe("c", &[9]))]),
    );
    assert_eq!(svc_id(&maps.contents, &tcp(3)), svc_a);
    assert_eq!(id_of(&maps.contents, 9), backend_1);
    assert_eq!(w.frontend_count(), 2);
    assert_eq!(w.backend_count(), 2);
}

#[test]
fn svc_ids_stop_at_the_stats_array_size() {
    let frontends: Vec<_> = (1..=SVC_ID_LIMIT as u8)
        .map(|i| (tcp(i), fe("many", &[1])))
        .collect();
    let mut maps = FakeMaps::default();
    let mut w = writer(&mut maps);
    let r = w.apply(&mut maps, &plan(frontends));
    assert_eq!(r.errors.len(), 1, "{r:?}");
    assert!(r.errors[0].ends_with(&format!(
        "more than {} frontends; raise --frontends-max",
        SVC_ID_LIMIT - 1
    )));
    assert_eq!(w.frontend_count(), SVC_ID_LIMIT as usize - 1);
}

#[test]
fn a_restarted_writer_rewrites_nothing_and_repairs_half_writes() {
    let p = plan(vec![
        (tcp(1), fe("a", &[1, 2, 3])),
        (udp(2), with_ranges(fe("b", &[2]), &["192.0.2.0/24"])),
    ]);
    let (mut maps, _) = programmed(&p);
    let mut again = writer(&mut maps);
    let start = maps.writes();
    let r = apply_clean(&mut again, &mut maps, &p);
    assert_eq!(maps.writes(), start, "{r:?}");
    // An agent that died mid-update: a stray slot beyond the count, a
    // missing slot, and the leftovers of a frontend whose master went.
    let mk = master_key(&tcp(1));
    let mut half = maps.contents.clone();
    let slot1 = half.services[&ServiceKey { slot: 1, ..mk }];
    half.services.insert(ServiceKey { slot: 7, ..mk }, slot1);
    half.services.remove(&ServiceKey { slot: 3, ..mk });
    let gone = ServiceKey { port: 9, ..mk };
    half.services.insert(ServiceKey { slot: 1, ..gone }, slot1);
    half.affinity_match.insert((40, slot1.backend_id));
    maps.contents = half;
    let mut adopted = writer(&mut maps);
    apply_clean(&mut adopted, &mut maps, &p);
    assert_eq!(maps.contents, programmed(&p).0.contents);
}

/// A removed frontend's counters that cannot be zeroed are reported (a
/// reused svc_id would start from the old counts), and the removal stands.
#[test]
fn a_failed_counter_reset_is_reported() {
    let (mut maps, mut w) = programmed(&plan(vec![(tcp(1), fe("web", &[1]))]));
    maps.fail_map(MAP_SVC_STATS);
    let r = w.apply(&mut maps, &plan(vec![]));
    assert!(r.errors.is_empty(), "{r:?}");
    assert_eq!(r.frontends_removed, 1);
    assert_eq!(r.faults.len(), 1, "{r:?}");
    let (kind, e) = &r.faults[0];
    assert_eq!(*kind, crate::faults::FaultKind::StatsReset);
    assert!(e.starts_with("zeroing the counters of svc_id "), "{e}");
}
