//! The second entry set of a Local external frontend (for sources inside
//! the cluster), and the cluster's pod ranges.
use std::collections::BTreeMap;

use super::*;
use crate::dataplane::{
    fake::Op,
    maps::{Entry, EntryKey, RangeKey},
};

fn node_port(port: u16) -> FrontendKey {
    FrontendKey {
        addr: Ipv4Addr::UNSPECIFIED.into(),
        port,
        proto: Protocol::Tcp,
    }
}

/// A Local NodePort: backend 1 from outside, `inside` from inside.
fn local(inside: Option<&[u8]>) -> FrontendPlan {
    let mut f = fe("web", &[1]);
    f.kind = FrontendKind::NodePort;
    f.in_cluster = inside.map(|b| fe("web", b).backends);
    f
}

/// The backends of the set whose master is `mk`, in slot order.
fn set_backends(c: &Contents, mk: ServiceKey) -> Option<Vec<Ipv4Addr>> {
    let m = c.services.get(&mk)?;
    Some(
        (1..=m.count)
            .map(|slot| {
                Ipv4Addr::from(c.backends[&c.services[&ServiceKey { slot, ..mk }].backend_id].addr)
            })
            .collect(),
    )
}

/// Each set by master key: its flags and backends, whatever the ids.
fn logical(c: &Contents) -> BTreeMap<ServiceKey, (u16, Vec<Ipv4Addr>)> {
    (c.services.iter().filter(|(k, _)| k.slot == 0))
        .map(|(k, m)| (*k, (m.flags, set_backends(c, *k).unwrap())))
        .collect()
}

fn master_write(log: &[Op], mk: ServiceKey) -> Option<usize> {
    log.iter()
        .position(|op| matches!(op, Op::Insert(Entry::Service(k, _)) if *k == mk))
}

#[test]
fn the_in_cluster_set_has_its_own_master_and_the_flag_points_to_it() {
    let fk = node_port(30080);
    let (own, inner) = (master_key(&fk), in_cluster_key(&fk));
    let (maps, _) = programmed(&plan(vec![(fk, local(Some(&[1, 2, 3])))]));
    let c = &maps.contents;
    assert_eq!(set_backends(c, own).unwrap(), [pod(1)]);
    assert_eq!(set_backends(c, inner).unwrap(), [pod(1), pod(2), pod(3)]);
    let (o, i) = (c.services[&own], c.services[&inner]);
    assert_eq!(o.flags & SVC_F_IN_CLUSTER, SVC_F_IN_CLUSTER);
    assert_eq!(i.flags & SVC_F_IN_CLUSTER, 0);
    assert_eq!(i.flags & SVC_F_NODEPORT, SVC_F_NODEPORT);
    assert_ne!(o.svc_id, i.svc_id, "counters and affinity apart");
    assert_eq!(inner.scope, SCOPE_IN_CLUSTER);
    // Backend 1 is shared by both sets, a member of each.
    assert_eq!(c.backends.len(), 3);
    assert_consistent(c, "written");
    // Without the second set, the flag is off and the set gone.
    let (maps, _) = programmed(&plan(vec![(fk, local(None))]));
    assert_eq!(maps.contents.services[&own].flags & SVC_F_IN_CLUSTER, 0);
    assert!(!maps.contents.services.keys().any(|k| k.scope != SCOPE_ALL));
}

#[test]
fn the_set_exists_before_the_flag_and_goes_after_it() {
    let fk = node_port(30080);
    let (own, inner) = (master_key(&fk), in_cluster_key(&fk));
    let (mut maps, mut w) = programmed(&plan(vec![(fk, local(None))]));
    let start = maps.log.len();
    apply_clean(&mut w, &mut maps, &plan(vec![(fk, local(Some(&[1, 2])))]));
    let log = &maps.log[start..];
    let (i, o) = (
        master_write(log, inner).unwrap(),
        master_write(log, own).unwrap(),
    );
    assert!(i < o, "the in-cluster master before the flag: {log:?}");
    // Dropping the set: the flag goes first, then the set.
    let start = maps.log.len();
    apply_clean(&mut w, &mut maps, &plan(vec![(fk, local(None))]));
    let log = &maps.log[start..];
    let flag_off = master_write(log, own).unwrap();
    let gone = log
        .iter()
        .position(|op| *op == Op::Remove(EntryKey::Service(inner)))
        .unwrap();
    assert!(flag_off < gone, "{log:?}");
    assert_eq!(
        maps.contents,
        programmed(&plan(vec![(fk, local(None))])).0.contents
    );
    // Removing the frontend (also incrementally) removes both sets.
    for incremental in [false, true] {
        let (mut maps, mut w) = programmed(&plan(vec![(fk, local(Some(&[2])))]));
        let empty = Plan::default();
        let r = if incremental {
            w.apply_changes(&mut maps, &empty, &BTreeSet::from([fk]))
        } else {
            w.apply(&mut maps, &empty)
        };
        assert!(r.errors.is_empty(), "{r:?}");
        assert_eq!(r.frontends_removed, 2);
        assert!(maps.contents.services.is_empty(), "{:?}", maps.contents);
        assert!(maps.contents.backends.is_empty());
        assert!(maps.contents.affinity_match.is_empty());
    }
}

#[test]
fn a_restarted_writer_adopts_both_sets_and_rewrites_nothing() {
    let fk = node_port(30080);
    let p = plan(vec![(fk, local(Some(&[1, 2])))]);
    let (mut maps, _) = programmed(&p);
    let mut w = writer(&mut maps);
    let start = maps.log.len();
    let r = apply_clean(&mut w, &mut maps, &p);
    assert_eq!(r.frontends_written, 0);
    assert_eq!(&maps.log[start..], &[] as &[Op]);
}

#[test]
fn a_failed_write_of_either_set_is_named_and_retried() {
    let fk = node_port(30080);
    let before = plan(vec![(fk, local(None))]);
    let after = plan(vec![(fk, local(Some(&[2, 3])))]);
    let (want, steps) = {
        let (mut maps, mut w) = programmed(&before);
        let start = maps.writes();
        apply_clean(&mut w, &mut maps, &after);
        let steps = maps.writes() - start;
        (maps, steps)
    };
    for n in 0..steps {
        let (mut maps, mut w) = programmed(&before);
        maps.fail_write(n);
        let r = w.apply(&mut maps, &after);
        assert_eq!(r.errors.len(), 1, "step {n}: {r:?}");
        assert!(
            r.errors[0].starts_with(&format!("Service default/web frontend {fk}: ")),
            "{}",
            r.errors[0]
        );
        assert_consistent(&maps.contents, &format!("step {n}"));
        maps.heal();
        let r = w.apply_changes(&mut maps, &after, &BTreeSet::new());
        assert!(r.errors.is_empty(), "retry after step {n}: {r:?}");
        // Ids may come out in another order after a rollback.
        assert_eq!(
            logical(&maps.contents),
            logical(&want.contents),
            "retry after step {n}"
        );
        assert_eq!(maps.contents.backends.len(), want.contents.backends.len());
    }
}

#[test]
fn cluster_cidrs_are_kept_under_their_id_and_survive_adoption() {
    let range = |s: &str| {
        let n: crate::plan::ipnet_lite::IpNet = s.parse().unwrap();
        RangeKey {
            svc_id: CLUSTER_CIDRS_ID,
            prefix: n.prefix,
            addr: n.network(),
        }
    };
    let fk = tcp(1);
    let p = plan(vec![(fk, with_ranges(fe("web", &[1]), &["192.0.2.0/24"]))]);
    let (mut maps, w) = programmed(&p);
    let nets = |v: &[&str]| v.iter().map(|s| s.parse().unwrap()).collect::<Vec<_>>();
    w.set_cluster_cidrs(&mut maps, &nets(&["10.244.0.0/16", "10.245.3.7/24"]))
        .unwrap();
    let ours = |c: &Contents| -> BTreeSet<RangeKey> {
        (c.source_ranges.iter())
            .filter(|r| r.svc_id == CLUSTER_CIDRS_ID)
            .copied()
            .collect()
    };
    assert_eq!(
        ours(&maps.contents),
        BTreeSet::from([range("10.244.0.0/16"), range("10.245.3.0/24")])
    );
    // A restarted agent leaves them to set_cluster_cidrs, which replaces them.
    let mut w = writer(&mut maps);
    apply_clean(&mut w, &mut maps, &p);
    assert_eq!(ours(&maps.contents).len(), 2);
    w.set_cluster_cidrs(&mut maps, &nets(&["10.244.0.0/16"]))
        .unwrap();
    assert_eq!(
        ours(&maps.contents),
        BTreeSet::from([range("10.244.0.0/16")])
    );
    w.set_cluster_cidrs(&mut maps, &[]).unwrap();
    assert!(ours(&maps.contents).is_empty());
    // The frontend's own range is untouched throughout.
    assert_eq!(maps.contents.source_ranges.len(), 1);
}
