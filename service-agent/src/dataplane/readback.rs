//! Reading SERVICES and SOURCE_RANGES back into frontends: what the writer
//! adopts at start and what `list` shows are one reading of the maps.
use std::collections::{BTreeMap, BTreeSet};

use aya::maps::MapError;
use service_common::*;

use super::maps::{Maps, RangeKey};

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
    pub frontends: BTreeMap<ServiceKey, StoredFrontend>,
    /// Slot entries with no master: a removal that did not finish.
    pub orphan_slots: Vec<ServiceKey>,
    /// loadBalancerSourceRanges by svc_id.
    pub ranges: BTreeMap<u32, BTreeSet<RangeKey>>,
}

/// The key of `slot` of the frontend whose master key is `master`.
pub fn slot_key(master: &ServiceKey, slot: u16) -> ServiceKey {
    ServiceKey { slot, ..*master }
}

pub fn read_frontends(m: &impl Maps) -> Result<Stored, MapError> {
    let mut masters = BTreeMap::new();
    let mut slots: BTreeMap<ServiceKey, BTreeMap<u16, ServiceValue>> = BTreeMap::new();
    for (k, v) in m.services()? {
        if k.slot == 0 {
            masters.insert(k, v);
        } else {
            slots.entry(slot_key(&k, 0)).or_default().insert(k.slot, v);
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
