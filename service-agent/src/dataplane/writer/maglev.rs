//! The Maglev tables of the frontends that use them: what the writer keeps
//! of each (the backend set it was built from, not its entries) and the
//! tables built during one apply, shared by the frontends with the same
//! backends (a Service's NodePort, LoadBalancer IPs and externalIPs).
use std::collections::HashMap;

use service_common::*;

use crate::plan::maglev::{Member, table};

/// A frontend's table as the writer knows it: its size and members, each
/// with its backend id. Equal states build equal tables, so comparing them
/// decides whether a table must be written, without building it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct MaglevState {
    pub size: u32,
    /// Sorted, without duplicates: the order `table` numbers members in.
    pub members: Vec<Member>,
    /// `ids[i]` is the BACKENDS id of `members[i]`.
    pub ids: Vec<u32>,
}

impl MaglevState {
    pub fn new(size: u32, members: impl IntoIterator<Item = (Member, u32)>) -> Self {
        let mut pairs: Vec<(Member, u32)> = members.into_iter().collect();
        pairs.sort();
        pairs.dedup_by_key(|(m, _)| *m);
        let (members, ids) = pairs.into_iter().unzip();
        MaglevState { size, members, ids }
    }
}

/// Tables (as member indexes) built since the last apply ended, by size
/// and members.
#[derive(Clone, Debug, Default)]
pub(super) struct TableCache {
    built: HashMap<(u32, Vec<Member>), Vec<u32>>,
}

impl TableCache {
    /// The MAGLEV value for `s`: each entry the backend id of its owner.
    pub fn value(&mut self, s: &MaglevState) -> Box<MaglevTable> {
        let owners = self
            .built
            .entry((s.size, s.members.clone()))
            .or_insert_with(|| table(&s.members, s.size).1);
        let mut v = Box::new(MaglevTable {
            size: s.size,
            backends: [0; MAGLEV_TABLE_MAX as usize],
        });
        for (slot, owner) in v.backends.iter_mut().zip(owners.iter()) {
            *slot = s.ids[*owner as usize];
        }
        v
    }

    /// Forgets the tables: one apply's worth is kept, not every backend
    /// set ever seen.
    pub fn clear(&mut self) {
        self.built.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn m(last: u8) -> Member {
        Member {
            addr: Ipv4Addr::new(10, 1, 0, last).into(),
            port: 80,
        }
    }

    #[test]
    fn a_state_is_the_same_whatever_order_backends_arrive_in() {
        let a = MaglevState::new(251, [(m(3), 7), (m(1), 5), (m(2), 9)]);
        let b = MaglevState::new(251, [(m(2), 9), (m(3), 7), (m(1), 5), (m(1), 5)]);
        assert_eq!(a, b);
        assert_eq!(a.ids, vec![5, 9, 7]);
    }

    #[test]
    fn a_value_names_backend_ids_in_the_shares_of_the_table() {
        let s = MaglevState::new(251, [(m(1), 40), (m(2), 41)]);
        let v = TableCache::default().value(&s);
        assert_eq!(v.size, 251);
        let used = &v.backends[..251];
        let first = used.iter().filter(|&&id| id == 40).count();
        assert_eq!(first + used.iter().filter(|&&id| id == 41).count(), 251);
        assert!((120..=131).contains(&first), "{first} of 251");
        assert!(v.backends[251..].iter().all(|&id| id == 0));
    }
}
