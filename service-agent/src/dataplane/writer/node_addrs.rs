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

impl Writer {
    /// Sets the address traffic from outside is source-NATed to when its
    /// backend runs on another node.
    pub fn set_snat_addr(&self, t: &mut impl Maps, addr: Option<Ipv4Addr>) -> Result<(), MapError> {
        let v = addr.map_or(0, |a| u32::from_ne_bytes(a.octets()) as u64);
        t.insert(Entry::Meta(META_SNAT_ADDR, v))
    }

    /// Keeps NODE_ADDRS equal to what `list` reads and returns it. A
    /// listing that fails leaves NODE_ADDRS as it is: an empty set would
    /// stop every NodePort answering, so the last good one stays until the
    /// addresses can be read again.
    pub fn refresh_node_addrs<E: std::fmt::Display>(
        &self,
        t: &mut impl Maps,
        list: impl FnOnce() -> Result<Vec<Ipv4Addr>, E>,
    ) -> Result<Vec<Ipv4Addr>, String> {
        let addrs = list().map_err(|e| {
            format!("listing the node's addresses failed, {MAP_NODE_ADDRS} keeps its last set: {e}")
        })?;
        self.set_node_addrs(t, &addrs)
            .map_err(|e| format!("updating {MAP_NODE_ADDRS}: {e}"))?;
        // IPv6 NodePorts answer on every global or unique-local address of
        // the node (--node-ip names IPv4 ones).
        let addrs6 = crate::dataplane::interfaces::node_addresses6().map_err(|e| {
            format!("listing the node's IPv6 addresses failed, {MAP_NODE_ADDRS6} keeps its last set: {e}")
        })?;
        self.set_node_addrs6(t, &addrs6)
            .map_err(|e| format!("updating {MAP_NODE_ADDRS6}: {e}"))?;
        Ok(addrs)
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
