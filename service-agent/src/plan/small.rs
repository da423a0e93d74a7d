//! Sets and maps of a few entries, as sorted vectors.
//!
//! The incremental planner keeps, per Service, the frontends it asks for,
//! holds and won, and per frontend the Services claiming it: one or two
//! entries almost always. A B-tree's smallest node has room for eleven, so
//! at 10,000 Services these took most of the planner's memory. They grow
//! one entry at a time: a vector's first push makes room for four, which
//! for a map of frontend plans is most of a kilobyte a Service.
use std::ops::Index;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SmallSet<T>(Vec<T>);

impl<T> Default for SmallSet<T> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<T: Ord> SmallSet<T> {
    /// Whether it was not there yet.
    pub fn insert(&mut self, v: T) -> bool {
        match self.0.binary_search(&v) {
            Ok(_) => false,
            Err(i) => {
                self.0.reserve_exact(1);
                self.0.insert(i, v);
                true
            }
        }
    }

    pub fn remove(&mut self, v: &T) -> bool {
        match self.0.binary_search(v) {
            Ok(i) => {
                self.0.remove(i);
                true
            }
            Err(_) => false,
        }
    }

    pub fn contains(&self, v: &T) -> bool {
        self.0.binary_search(v).is_ok()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> std::slice::Iter<'_, T> {
        self.0.iter()
    }
}

impl<T: Ord> FromIterator<T> for SmallSet<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        let mut v: Vec<T> = iter.into_iter().collect();
        v.sort();
        v.dedup();
        v.shrink_to_fit();
        Self(v)
    }
}

impl<'a, T> IntoIterator for &'a SmallSet<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct SmallMap<K, V>(Vec<(K, V)>);

impl<K, V> Default for SmallMap<K, V> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<K: Ord, V> SmallMap<K, V> {
    pub fn get(&self, k: &K) -> Option<&V> {
        let i = self.0.binary_search_by(|(x, _)| x.cmp(k)).ok()?;
        Some(&self.0[i].1)
    }

    pub fn insert(&mut self, k: K, v: V) -> Option<V> {
        match self.0.binary_search_by(|(x, _)| x.cmp(&k)) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, v)),
            Err(i) => {
                self.0.reserve_exact(1);
                self.0.insert(i, (k, v));
                None
            }
        }
    }

    pub fn keys(&self) -> impl Iterator<Item = &K> {
        self.0.iter().map(|(k, _)| k)
    }

    pub fn clear(&mut self) {
        self.0.clear();
    }
}

impl<K: Ord, V> Extend<(K, V)> for SmallMap<K, V> {
    fn extend<I: IntoIterator<Item = (K, V)>>(&mut self, iter: I) {
        for (k, v) in iter {
            self.insert(k, v);
        }
    }
}

impl<K: Ord, V> Index<&K> for SmallMap<K, V> {
    type Output = V;
    fn index(&self, k: &K) -> &V {
        self.get(k).expect("a key of the map")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn they_behave_as_the_btree_ones() {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut s = SmallSet::default();
        let mut b = std::collections::BTreeSet::new();
        let mut m = SmallMap::default();
        let mut bm = std::collections::BTreeMap::new();
        for _ in 0..2000 {
            let k = rng.u8(0..20);
            match rng.u8(0..3) {
                0 => assert_eq!(s.insert(k), b.insert(k)),
                1 => assert_eq!(s.remove(&k), b.remove(&k)),
                _ => assert_eq!(
                    m.insert(k, rng.u32(..)).is_some(),
                    bm.insert(k, 0).is_some()
                ),
            }
            assert!(s.iter().eq(b.iter()));
            assert!(m.keys().eq(bm.keys()));
            assert_eq!(s.contains(&k), b.contains(&k));
        }
    }
}
