//! The node's own addresses: NODE_ADDRS (where NodePorts answer) and the
//! SNAT source in META.
use std::{collections::BTreeSet, net::Ipv4Addr};

use aya::maps::MapError;
use service_common::*;

use super::Writer;
use crate::dataplane::maps::{Entry, EntryKey, Maps};

impl Writer {
    /// Sets the address traffic from outside is source-NATed to when its
    /// backend runs on another node.
    pub fn set_snat_addr(&self, t: &mut impl Maps, addr: Option<Ipv4Addr>) -> Result<(), MapError> {
        let v = addr.map_or(0, |a| u32::from_ne_bytes(a.octets()) as u64);
        t.insert(Entry::Meta(META_SNAT_ADDR, v))
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
}
