//! Reading SERVICES, SERVICES6 and SOURCE_RANGES back into frontends: what
//! the writer adopts at start and what `list` shows are one reading of the
//! maps.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use aya::maps::MapError;
use service_common::*;

use super::maps::{Entry, EntryKey, Maps, RangeKey};

/// A SERVICES or SERVICES6 key: each family's frontends live in that
/// family's map, with the same value layout and one svc_id space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FeKey {
    V4(ServiceKey),
    V6(ServiceKey6),
}

impl FeKey {
    pub fn addr(&self) -> IpAddr {
        match self {
            FeKey::V4(k) => Ipv4Addr::from(k.addr).into(),
            FeKey::V6(k) => Ipv6Addr::from(k.addr).into(),
        }
    }

    pub fn port(&self) -> u16 {
        match self {
            FeKey::V4(k) => k.port,
            FeKey::V6(k) => k.port,
        }
    }

    pub fn proto(&self) -> u8 {
        match self {
            FeKey::V4(k) => k.proto,
            FeKey::V6(k) => k.proto,
        }
    }

    pub fn scope(&self) -> u8 {
        match self {
            FeKey::V4(k) => k.scope,
            FeKey::V6(k) => k.scope,
        }
    }

    pub fn slot(&self) -> u16 {
        match self {
            FeKey::V4(k) => k.slot,
            FeKey::V6(k) => k.slot,
        }
    }

    /// The same frontend's key with `scope`.
    pub fn with_scope(self, scope: u8) -> Self {
        match self {
            FeKey::V4(k) => FeKey::V4(ServiceKey { scope, ..k }),
            FeKey::V6(k) => FeKey::V6(ServiceKey6 { scope, ..k }),
        }
    }

    /// A NodePort frontend: the unspecified address of its family.
    pub fn is_node_port(&self) -> bool {
        self.addr().is_unspecified()
    }

    /// The entry writing `v` under this key.
    pub fn entry(self, v: ServiceValue) -> Entry {
        match self {
            FeKey::V4(k) => Entry::Service(k, v),
            FeKey::V6(k) => Entry::Service6(k, v),
        }
    }

    pub fn entry_key(self) -> EntryKey {
        match self {
            FeKey::V4(k) => EntryKey::Service(k),
            FeKey::V6(k) => EntryKey::Service6(k),
        }
    }
}

/// A frontend as SERVICES holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredFrontend {
    pub master: ServiceValue,
    /// Every slot entry under the frontend's key, also those beyond the
    /// master's count (left by an update that did not finish).
    pub slots: BTreeMap<u16, ServiceValue>,
}

impl StoredFrontend {
    /// The backend id of each slot the master counts; `None` for a slot
    /// that is missing.
    pub fn counted_backends(&self) -> impl Iterator<Item = (u16, Option<u32>)> + '_ {
        (1..=self.master.count).map(|s| (s, self.slots.get(&s).map(|v| v.backend_id)))
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stored {
    /// Keyed by the master's key (slot 0).
    pub frontends: BTreeMap<FeKey, StoredFrontend>,
    /// Slot entries with no master: a removal that did not finish.
    pub orphan_slots: Vec<FeKey>,
    /// loadBalancerSourceRanges by svc_id.
    pub ranges: BTreeMap<u32, BTreeSet<RangeKey>>,
}

/// The key of `slot` of the frontend whose master key is `master`.
pub fn slot_key(master: &FeKey, slot: u16) -> FeKey {
    match *master {
        FeKey::V4(k) => FeKey::V4(ServiceKey { slot, ..k }),
        FeKey::V6(k) => FeKey::V6(ServiceKey6 { slot, ..k }),
    }
}

pub fn read_frontends(m: &impl Maps) -> Result<Stored, MapError> {
    let mut masters = BTreeMap::new();
    let mut slots: BTreeMap<FeKey, BTreeMap<u16, ServiceValue>> = BTreeMap::new();
    let v4 = m.services()?.into_iter().map(|(k, v)| (FeKey::V4(k), v));
    let v6 = m.services6()?.into_iter().map(|(k, v)| (FeKey::V6(k), v));
    for (k, v) in v4.chain(v6) {
        if k.slot() == 0 {
            masters.insert(k, v);
        } else {
            slots
                .entry(slot_key(&k, 0))
                .or_default()
                .insert(k.slot(), v);
        }
    }
    let mut stored = Stored::default();
    for (k, master) in masters {
        let slots = slots.remove(&k).unwrap_or_default();
        stored.frontends.insert(k, StoredFrontend { master, slots });
    }
    for (k, rest) in slots {
        stored
            .orphan_slots
            .extend(rest.keys().map(|s| slot_key(&k, *s)));
    }
    for r in m.source_ranges()? {
        stored.ranges.entry(r.svc_id).or_default().insert(r);
    }
    Ok(stored)
}
