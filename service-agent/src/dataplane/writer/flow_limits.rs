//! How the programs give out ports and admit new flows: the SNAT port range
//! and the flood guard's threshold, in META.
use aya::maps::MapError;
use service_common::*;

use super::Writer;
use crate::dataplane::maps::{Entry, Maps};

/// The ports source NAT (and tuple-clash rewrites) may use, `min..=max`,
/// and the new flows one CPU may open per second (0: no limit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowLimits {
    pub snat_ports: (u16, u16),
    pub flood_threshold: u64,
}

impl Default for FlowLimits {
    fn default() -> Self {
        Self {
            snat_ports: (SNAT_PORT_MIN, SNAT_PORT_MIN + (SNAT_PORT_COUNT - 1)),
            flood_threshold: 0,
        }
    }
}

impl FlowLimits {
    /// META_SNAT_PORTS: the first port, then the count above it.
    pub fn snat_ports_word(&self) -> u64 {
        let (min, max) = self.snat_ports;
        let count = (max - min) as u64 + 1;
        min as u64 | count << 16
    }
}

impl Writer {
    /// Writes the limits for the programs; they take effect at the next new flow.
    pub fn set_flow_limits(&self, t: &mut impl Maps, l: &FlowLimits) -> Result<(), MapError> {
        t.insert(Entry::Meta(META_SNAT_PORTS, l.snat_ports_word()))?;
        t.insert(Entry::Meta(META_FLOOD_THRESHOLD, l.flood_threshold))
    }
}
