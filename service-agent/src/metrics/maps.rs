//! The counters the programs keep (per-frontend packets, bytes, new flows
//! and rejects; packets by reason) and the maps' fill levels, read from the
//! pinned maps through descriptors of the scrape's own and exported as
//! Prometheus counters and gauges. They are counters although read as
//! absolute values: the programs only add to them, and `service-agent
//! stats --reset` (or a frontend's svc_id reused) zeroes them, which
//! Prometheus' `rate()` takes as a counter reset.
//!
//! CONNTRACK is never walked here: at 500k flows a walk costs seconds of
//! syscalls. Its entry count is the one the conntrack GC publishes after
//! each pass.
use std::{
    path::Path,
    sync::{
        Mutex,
        atomic::{AtomicI64, Ordering},
    },
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{TypedMetric, counter::ConstCounter, gauge::ConstGauge},
};
use service_common::SvcStats;

use crate::{dataplane::tables::Tables, report, status};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabel {
    map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FrontendLabel {
    frontend: String,
    service: String,
    /// `IPv4` or `IPv6`, as Kubernetes names a Service's `ipFamilies`.
    ip_family: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
    verdict: String,
}

/// What the last scrape read from the maps.
#[derive(Debug, Default)]
struct Snapshot {
    frontends: Vec<(FrontendLabel, SvcStats)>,
    reasons: Vec<(ReasonLabel, u64)>,
    fill: Vec<(MapLabel, usize, u32)>,
}

#[derive(Debug)]
pub struct MapCollector {
    snapshot: Mutex<Snapshot>,
    /// CONNTRACK's entries at the last GC pass; negative: none yet.
    conntrack_entries: AtomicI64,
}

impl Default for MapCollector {
    fn default() -> Self {
        Self {
            snapshot: Mutex::default(),
            conntrack_entries: AtomicI64::new(-1),
        }
    }
}

impl MapCollector {
    pub fn set_conntrack_entries(&self, n: usize) {
        self.conntrack_entries.store(n as i64, Ordering::Relaxed);
    }

    fn conntrack_entries(&self) -> Option<usize> {
        usize::try_from(self.conntrack_entries.load(Ordering::Relaxed)).ok()
    }

    /// Reads the counters and fill levels from the pins. Blocking (map
    /// syscalls): the caller runs it off the async workers.
    pub fn read(&self, pin_dir: &Path, state_dir: &Path) -> anyhow::Result<()> {
        let t = Tables::open_pinned(pin_dir)?;
        let st = status::read(state_dir);
        let fes = report::programmed(&t, st.as_ref())?;
        let (per, reasons) = report::counters(&t, &fes)?;
        let mut snap = Snapshot::default();
        for (f, s) in per {
            let service = fes
                .iter()
                .find(|x| x.frontend == f)
                .and_then(|x| x.service.clone())
                .unwrap_or_default();
            // Frontends print IPv6 addresses bracketed (`[fd00::10]:80/TCP`,
            // `[*]:30080/TCP`).
            let ip_family = if f.starts_with('[') { "IPv6" } else { "IPv4" };
            let l = FrontendLabel {
                frontend: f,
                service,
                ip_family,
            };
            snap.frontends.push((l, s));
        }
        for (r, n) in reasons {
            let l = ReasonLabel {
                reason: r.name().into(),
                verdict: r.verdict().name().into(),
            };
            snap.reasons.push((l, n));
        }
        // Before the first GC pass CONNTRACK's count is not known: it is
        // left out rather than walked here.
        let ct = self.conntrack_entries();
        for (map, entries, capacity) in report::fill_with(&t, pin_dir, Some(ct.unwrap_or(0))) {
            if map == service_common::MAP_CONNTRACK && ct.is_none() {
                continue;
            }
            snap.fill
                .push((MapLabel { map: map.into() }, entries, capacity));
        }
        *self.snapshot.lock().unwrap_or_else(|e| e.into_inner()) = snap;
        Ok(())
    }
}

/// Encodes one family: `name` with a value per label set. The descriptor
/// is written also without values, so every name is on `/metrics` from
/// the start.
fn family<L: EncodeLabelSet, M: EncodeMetric + TypedMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    items: impl Iterator<Item = (L, M)>,
) -> Result<(), std::fmt::Error> {
    let mut enc = encoder.encode_descriptor(name, help, None, M::TYPE)?;
    for (l, m) in items {
        m.encode(enc.encode_family(&l)?)?;
    }
    Ok(())
}

impl Collector for MapCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.snapshot.lock().unwrap_or_else(|e| e.into_inner());
        let per = |f: fn(&SvcStats) -> u64| {
            s.frontends
                .iter()
                .map(move |(l, st)| (l.clone(), ConstCounter::new(f(st))))
        };
        family(
            &mut encoder,
            "frontend_packets",
            "Packets translated per frontend",
            per(|s| s.packets),
        )?;
        family(
            &mut encoder,
            "frontend_bytes",
            "Bytes translated per frontend",
            per(|s| s.bytes),
        )?;
        family(
            &mut encoder,
            "frontend_new_flows",
            "Flows opened per frontend",
            per(|s| s.new_flows),
        )?;
        family(
            &mut encoder,
            "frontend_rejected",
            "Connections refused per frontend for want of an endpoint",
            per(|s| s.rejected),
        )?;
        family(
            &mut encoder,
            "packets_by_reason",
            "Packets counted per reason, with what happened to them (passed, translated, answered, dropped)",
            s.reasons
                .iter()
                .map(|(l, n)| (l.clone(), ConstCounter::new(*n))),
        )?;
        family(
            &mut encoder,
            "map_entries",
            "Entries in each pinned map (CONNTRACK: at the last garbage collection pass)",
            s.fill
                .iter()
                .map(|(l, n, _)| (l.clone(), ConstGauge::new(*n as i64))),
        )?;
        family(
            &mut encoder,
            "map_capacity",
            "max_entries of each pinned map",
            s.fill
                .iter()
                .map(|(l, _, c)| (l.clone(), ConstGauge::new(i64::from(*c)))),
        )
    }
}
