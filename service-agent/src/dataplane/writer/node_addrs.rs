//! The node's own addresses: NODE_ADDRS (where NodePorts answer) and the
//! SNAT source in META; and the cluster's pod ranges (in SOURCE_RANGES under
//! CLUSTER_CIDRS_ID), which tell traffic from inside the cluster on the wire.
use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, Ipv6Addr},
};

use aya::maps::MapError;
use service_common::*;

use super::Writer;
use crate::{
    dataplane::maps::{Entry, EntryKey, Maps, RangeKey},
    plan::ipnet_lite::IpNet,
};

/// The address flows from outside are source-NATed to when their backend
/// runs on another node, for one family: the first `--node-ip` of it, else
/// the first address of the first external interface that has one, else
/// the first of the node's addresses (`node`). Replies of such flows come
/// back to it, so it must be where other nodes route to this one: an
/// external interface's address is, an arbitrary node address (a pod
/// gateway) may not be.
pub fn snat_source<A: Copy>(
    fixed: &[A],
    external: impl IntoIterator<Item = Vec<A>>,
    node: &[A],
) -> Option<A> {
    fixed
        .first()
        .copied()
        .or_else(|| external.into_iter().find_map(|a| a.first().copied()))
        .or_else(|| node.first().copied())
}

impl Writer {
    /// Sets the address traffic from outside is source-NATed to when its
    /// backend runs on another node.
    pub fn set_snat_addr(&self, t: &mut impl Maps, addr: Option<Ipv4Addr>) -> Result<(), MapError> {
        let v = addr.map_or(0, |a| u32::from_ne_bytes(a.octets()) as u64);
        t.insert(Entry::Meta(META_SNAT_ADDR, v))
    }

    /// The IPv6 counterpart of `set_snat_addr`, over two META slots. An
    /// unchanged address is not written again: each change leaves the
    /// programs without an address for a moment (see META_SNAT_ADDR6_HI),
    /// which a refresh at every resync must not cost.
    pub fn set_snat_addr6(
        &self,
        t: &mut impl Maps,
        addr: Option<Ipv6Addr>,
    ) -> Result<(), MapError> {
        let (hi, lo) = addr.map_or((0, 0), |a| {
            let o = a.octets();
            let half = |i: usize| u64::from_ne_bytes(o[i..i + 8].try_into().expect("8 bytes"));
            (half(0), half(8))
        });
        if t.meta(META_SNAT_ADDR6_HI) == hi && t.meta(META_SNAT_ADDR6_LO) == lo {
            return Ok(());
        }
        t.insert(Entry::Meta(META_SNAT_ADDR6_HI, 0))?;
        t.insert(Entry::Meta(META_SNAT_ADDR6_LO, lo))?;
        t.insert(Entry::Meta(META_SNAT_ADDR6_HI, hi))
    }

    /// Keeps NODE_ADDRS and NODE_ADDRS6 equal to what `list` and `list6`
    /// read and returns both. A listing that fails leaves its map as it is:
    /// an empty set would stop every NodePort answering, so the last good
    /// one stays until the addresses can be read again.
    pub fn refresh_node_addrs<E: std::fmt::Display>(
        &self,
        t: &mut impl Maps,
        list: impl FnOnce() -> Result<Vec<Ipv4Addr>, E>,
        list6: impl FnOnce() -> Result<Vec<Ipv6Addr>, E>,
    ) -> Result<(Vec<Ipv4Addr>, Vec<Ipv6Addr>), String> {
        let addrs = list().map_err(|e| {
            format!("listing the node's addresses failed, {MAP_NODE_ADDRS} keeps its last set: {e}")
        })?;
        self.set_node_addrs(t, &addrs)
            .map_err(|e| format!("updating {MAP_NODE_ADDRS}: {e}"))?;
        let addrs6 = list6().map_err(|e| {
            format!("listing the node's IPv6 addresses failed, {MAP_NODE_ADDRS6} keeps its last set: {e}")
        })?;
        self.set_node_addrs6(t, &addrs6)
            .map_err(|e| format!("updating {MAP_NODE_ADDRS6}: {e}"))?;
        Ok((addrs, addrs6))
    }

    /// Keeps NODE_ADDRS6 equal to `addrs`.
    pub fn set_node_addrs6(&self, t: &mut impl Maps, addrs: &[Ipv6Addr]) -> Result<(), MapError> {
        let want: BTreeSet<Addr6> = addrs.iter().map(|a| a.octets()).collect();
        let have: BTreeSet<Addr6> = t.node_addrs6().into_iter().collect();
        for a in want.difference(&have) {
            t.insert(Entry::NodeAddr6(*a))?;
        }
        for a in have.difference(&want) {
            t.remove(EntryKey::NodeAddr6(*a))?;
        }
        Ok(())
    }

    /// Keeps NODE_ADDRS equal to `addrs`.
    pub fn set_node_addrs(&self, t: &mut impl Maps, addrs: &[Ipv4Addr]) -> Result<(), MapError> {
        let want: BTreeSet<[u8; 4]> = addrs.iter().map(|a| a.octets()).collect();
        let have: BTreeSet<[u8; 4]> = t.node_addrs().into_iter().collect();
        for a in want.difference(&have) {
            t.insert(Entry::NodeAddr(*a))?;
        }
        for a in have.difference(&want) {
            t.remove(EntryKey::NodeAddr(*a))?;
        }
        Ok(())
    }

    /// Keeps the cluster's pod ranges (`--cluster-cidr`) equal to `cidrs`.
    pub fn set_cluster_cidrs(&self, t: &mut impl Maps, cidrs: &[IpNet]) -> Result<(), MapError> {
        let want: BTreeSet<RangeKey> = cidrs
            .iter()
            .map(|n| RangeKey {
                svc_id: CLUSTER_CIDRS_ID,
                prefix: n.prefix,
                addr: n.network(),
            })
            .collect();
        let have: BTreeSet<RangeKey> = (t.source_ranges()?.into_iter())
            .filter(|r| r.svc_id == CLUSTER_CIDRS_ID)
            .collect();
        for r in want.difference(&have) {
            t.insert(Entry::SourceRange(*r))?;
        }
        for r in have.difference(&want) {
            t.remove(EntryKey::SourceRange(*r))?;
        }
        Ok(())
    }
}
