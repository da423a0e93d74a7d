//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): a lookup table of
//! prime size `M` in which every backend owns about `M / N` entries. The
//! table depends only on the set of backends, never on the order the agent
//! learnt them in or on the node it runs on, so every node maps a flow hash to
//! the same backend, and removing one of N backends moves the entries it held
//! and only a few others.
//!
//! The agent builds the table; the programs only index it with a flow hash.
use std::net::IpAddr;

use super::FrontendKind;

/// Table size used when `--maglev-table-size` is not given: the largest the
/// programs index (Cilium's default), 100 entries a backend up to 163.
pub const DEFAULT_TABLE_SIZE: u32 = service_common::MAGLEV_TABLE_MAX;

/// The MAGLEV map's value holds this many entries: a table cannot be larger.
pub const MAX_TABLE_SIZE: u32 = service_common::MAGLEV_TABLE_MAX;

/// How new flows of the frontends reached from outside the cluster
/// (NodePort, LoadBalancer IP, externalIP) pick their backend. ClusterIPs
/// are reached from inside, where no upstream balancer moves flows between
/// nodes: they always pick at random.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Balancing {
    #[default]
    Random,
    /// A Maglev table of `table_size` entries per frontend (a prime).
    Maglev { table_size: u32 },
}

impl Balancing {
    /// The table size a frontend of `kind` uses; `None`: it picks at random.
    pub fn table_size(self, kind: FrontendKind) -> Option<u32> {
        match (self, kind) {
            (Balancing::Random, _) | (_, FrontendKind::ClusterIp) => None,
            (Balancing::Maglev { table_size }, _) => Some(table_size),
        }
    }
}

/// Whether `m` can be a Maglev table size: a prime, so that every skip in
/// `1..m` generates a full permutation of the table.
pub fn valid_table_size(m: u32) -> Result<(), String> {
    if !(7..=MAX_TABLE_SIZE).contains(&m) {
        return Err(format!(
            "{m} is outside 7..={MAX_TABLE_SIZE} (a prime such as 251, 1021, 4093 or 16381)"
        ));
    }
    if !is_prime(m) {
        return Err(format!(
            "{m} is not a prime; the nearest primes below and above are {} and {}",
            prime_below(m),
            prime_above(m)
        ));
    }
    Ok(())
}

fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2u32;
    while d.saturating_mul(d) <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

fn prime_below(n: u32) -> u32 {
    (2..n).rev().find(|&p| is_prime(p)).unwrap_or(2)
}

fn prime_above(n: u32) -> u32 {
    (n + 1..).find(|&p| is_prime(p)).unwrap_or(n)
}

/// A backend as Maglev sees it: its identity on the wire, which is the same
/// on every node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Member {
    pub addr: IpAddr,
    pub port: u16,
}

/// FNV-1a over the member's bytes with a seed mixed in first, then a final
/// avalanche: stable across builds, platforms and agent versions (unlike
/// std's hasher), which the cross-node promise depends on.
fn member_hash(m: &Member, seed: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed;
    // IPv4 members hash their four octets, as before IPv6 existed.
    let (octets, n) = match m.addr {
        IpAddr::V4(a) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a.octets());
            (b, 4)
        }
        IpAddr::V6(a) => (a.octets(), 16),
    };
    for b in octets[..n].iter().copied().chain(m.port.to_be_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64's finaliser: FNV alone leaves the low bits of similar
    // addresses correlated, and offset/skip are taken modulo M.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

const OFFSET_SEED: u64 = 0x6d61_676c_6576_3031;
const SKIP_SEED: u64 = 0x6b69_7073_6576_3031;

/// The lookup table for `members`: entry `i` holds the index, in the sorted
/// and de-duplicated member list returned alongside, of the member that owns
/// hash value `i`. Empty when there are no members.
pub fn table(members: &[Member], size: u32) -> (Vec<Member>, Vec<u32>) {
    let mut sorted = members.to_vec();
    sorted.sort();
    sorted.dedup();
    let m = size as u64;
    if sorted.is_empty() || m == 0 {
        return (sorted, Vec::new());
    }
    let perm: Vec<(u64, u64)> = sorted
        .iter()
        .map(|b| {
            let offset = member_hash(b, OFFSET_SEED) % m;
            let skip = member_hash(b, SKIP_SEED) % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    const EMPTY: u32 = u32::MAX;
    let mut entry = vec![EMPTY; size as usize];
    let mut next = vec![0u64; sorted.len()];
    let mut filled = 0u64;
    // Each member in turn claims its next preferred free entry; the turn
    // order is the sorted order, so the result is canonical.
    'fill: loop {
        for (i, &(offset, skip)) in perm.iter().enumerate() {
            let mut c = (offset + next[i] * skip) % m;
            while entry[c as usize] != EMPTY {
                next[i] += 1;
                c = (offset + next[i] * skip) % m;
            }
            entry[c as usize] = i as u32;
            next[i] += 1;
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    (sorted, entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: u32) -> Vec<Member> {
        (0..n)
            .map(|i| Member {
                addr: std::net::Ipv4Addr::from(0x0af4_0000 + i * 7 + 3).into(),
                port: 8080,
            })
            .collect()
    }

    fn owners(ms: &[Member], size: u32) -> Vec<Member> {
        let (sorted, t) = table(ms, size);
        t.iter().map(|&i| sorted[i as usize]).collect()
    }

    #[test]
    fn sizes_must_be_prime_and_bounded() {
        assert!(valid_table_size(4093).is_ok());
        assert!(valid_table_size(DEFAULT_TABLE_SIZE).is_ok());
        let e = valid_table_size(4096).unwrap_err();
        assert!(e.contains("4093") && e.contains("4099"), "{e}");
        assert!(valid_table_size(5).is_err());
        assert!(valid_table_size(65521).is_err());
    }

    #[test]
    fn only_frontends_reached_from_outside_use_maglev() {
        let m = Balancing::Maglev { table_size: 1021 };
        assert_eq!(m.table_size(FrontendKind::ClusterIp), None);
        for k in [
            FrontendKind::NodePort,
            FrontendKind::LoadBalancer,
            FrontendKind::ExternalIp,
        ] {
            assert_eq!(m.table_size(k), Some(1021));
            assert_eq!(Balancing::Random.table_size(k), None);
        }
    }

    #[test]
    fn every_entry_is_owned_and_shares_are_within_one_percent_of_even() {
        for n in [1u32, 2, 3, 10, 40] {
            let size = 4093;
            let (sorted, t) = table(&members(n), size);
            assert_eq!(t.len(), size as usize);
            let mut count = vec![0u32; sorted.len()];
            for &i in &t {
                count[i as usize] += 1;
            }
            let even = size as f64 / n as f64;
            for c in count {
                let off = (c as f64 - even).abs() / even;
                assert!(off <= 0.01, "n={n}: a share of {c} against {even:.1}");
            }
        }
    }

    #[test]
    fn the_table_does_not_depend_on_the_order_members_arrive_in() {
        let ms = members(10);
        let mut rev = ms.clone();
        rev.reverse();
        rev.push(ms[3]);
        assert_eq!(owners(&ms, 1021), owners(&rev, 1021));
    }

    #[test]
    fn removing_one_of_ten_moves_its_entries_and_at_most_three_percent_of_the_rest() {
        let size = DEFAULT_TABLE_SIZE;
        let ms = members(10);
        let before = owners(&ms, size);
        for gone in 0..ms.len() {
            let mut rest = ms.clone();
            rest.remove(gone);
            let after = owners(&rest, size);
            let mut others = 0;
            let mut moved = 0;
            for (b, a) in before.iter().zip(&after) {
                assert_ne!(*a, ms[gone]);
                if *b != ms[gone] {
                    others += 1;
                    moved += usize::from(a != b);
                }
            }
            let share = moved as f64 / others as f64;
            assert!(
                share <= 0.03,
                "removing {gone}: {:.2}% of other entries moved",
                share * 100.0
            );
        }
    }

    #[test]
    fn adding_a_backend_takes_about_its_share_and_little_else() {
        let size = DEFAULT_TABLE_SIZE;
        let ms = members(10);
        let before = owners(&ms, size);
        let mut more = ms.clone();
        more.push(Member {
            addr: std::net::Ipv4Addr::new(10, 250, 9, 9).into(),
            port: 8080,
        });
        let after = owners(&more, size);
        let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
        let share = moved as f64 / size as f64;
        assert!(share <= 1.0 / 11.0 + 0.03, "{:.2}% moved", share * 100.0);
    }

    #[test]
    fn empty_and_single_member_tables() {
        assert!(table(&[], 1021).1.is_empty());
        let one = members(1);
        assert!(table(&one, 1021).1.iter().all(|&i| i == 0));
    }
}
