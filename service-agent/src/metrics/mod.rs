//! What the agent exports on `/metrics` and answers on `/healthz` and
//! `/readyz`: the sync loop's own measurements with kube-proxy's names and
//! meanings (under the `service_agent_` prefix), failures by kind, and the
//! counters the programs keep in the maps (`maps.rs`, read at scrape time
//! off the async workers). HTTP handling is in `http.rs`.
pub mod changes;
#[cfg(test)]
mod dashboard_tests;
mod http;
mod maps;

use std::{
    sync::{Arc, Mutex, atomic::AtomicU64},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use prometheus_client::{
    metrics::{counter::Counter, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

pub use self::{
    http::{HttpConfig, router, serve},
    maps::MapCollector,
};
use crate::faults::Faults;

/// What the agent loop and the conntrack GC record; the HTTP side reads it.
pub struct Metrics {
    registry: Registry,
    pub faults: Arc<Faults>,
    pub maps: Arc<MapCollector>,
    sync_duration: Histogram,
    programming_duration: Histogram,
    last_sync: Gauge<f64, AtomicU64>,
    last_queued: Gauge<f64, AtomicU64>,
    service_changes: Counter,
    endpoint_changes: Counter,
    frontends: Gauge,
    backends: Gauge,
    health: Mutex<Health>,
}

struct Health {
    first_sync_done: bool,
    last_sync: Instant,
    /// The sync running now applies changes noted at this time.
    in_flight_since: Option<Instant>,
}

fn buckets() -> impl Iterator<Item = f64> {
    [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        60.0,
    ]
    .into_iter()
}

/// Registers each named field of the metrics under its name and help text.
macro_rules! register {
    ($registry:ident, $m:ident, $($field:ident: $name:literal, $help:literal;)*) => {
        $($registry.register($name, $help, $m.$field.clone());)*
    };
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The wall-clock time of the monotonic instant `t`.
fn wall(t: Instant) -> SystemTime {
    SystemTime::now() - t.elapsed()
}

/// What one sync did, for the metrics.
#[derive(Debug, Default)]
pub struct SyncOutcome {
    pub took: Duration,
    /// Every map write of the sync succeeded.
    pub ok: bool,
    /// When the changes it programmed began: trigger times of changed
    /// EndpointSlices, else when the source noted the change.
    pub triggers: Vec<SystemTime>,
    pub service_changes: u64,
    pub endpoint_changes: u64,
    pub frontends: usize,
    pub backends: usize,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("service_agent");
        let faults = Arc::new(Faults::default());
        let maps = Arc::new(MapCollector::default());
        let m = Metrics {
            sync_duration: Histogram::new(buckets()),
            programming_duration: Histogram::new(buckets()),
            last_sync: Gauge::default(),
            last_queued: Gauge::default(),
            service_changes: Counter::default(),
            endpoint_changes: Counter::default(),
            frontends: Gauge::default(),
            backends: Gauge::default(),
            health: Mutex::new(Health {
                first_sync_done: false,
                last_sync: Instant::now(),
                in_flight_since: None,
            }),
            registry: Registry::default(),
            faults: faults.clone(),
            maps: maps.clone(),
        };
        register!(registry, m,
            sync_duration: "sync_proxy_rules_duration_seconds", "Time to compute the plan and write the maps, per sync";
            programming_duration: "network_programming_duration_seconds", "Time from a change (the EndpointSlice's last-change-trigger-time, else the source noting it) to the maps programmed";
            last_sync: "sync_proxy_rules_last_timestamp_seconds", "Unix time of the last sync whose map writes all succeeded";
            last_queued: "sync_proxy_rules_last_queued_timestamp_seconds", "Unix time at which the oldest change not yet programmed was noted";
            service_changes: "sync_proxy_rules_service_changes", "Service objects added, updated or deleted, as the syncs found them";
            endpoint_changes: "sync_proxy_rules_endpoint_changes", "EndpointSlice objects added, updated or deleted, as the syncs found them";
            frontends: "frontends_programmed", "Service frontends in the maps";
            backends: "backends_programmed", "Backends in the maps";
        );
        registry.register(
            "sync_errors",
            "Failed operations of the agent, by kind",
            faults.counter(),
        );
        registry.register_collector(Box::new(maps));
        crate::dns::counters::register(&mut registry);
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// A sync starts that applies the changes noted since `queued`.
    pub fn sync_started(&self, queued: Option<Instant>) {
        if let Some(t) = queued {
            self.last_queued.set(unix(wall(t)));
        }
        if let Ok(mut h) = self.health.lock() {
            h.in_flight_since = queued;
        }
    }

    /// A change was noted at `t` and waits for the loop.
    pub fn queued(&self, t: Instant) {
        self.last_queued.set(unix(wall(t)));
    }

    pub fn synced(&self, o: &SyncOutcome) {
        self.sync_duration.observe(o.took.as_secs_f64());
        let now = SystemTime::now();
        for t in &o.triggers {
            let d = now.duration_since(*t).unwrap_or_default();
            self.programming_duration.observe(d.as_secs_f64());
        }
        if o.ok {
            self.last_sync.set(unix(now));
        }
        self.service_changes.inc_by(o.service_changes);
        self.endpoint_changes.inc_by(o.endpoint_changes);
        self.frontends.set(o.frontends as i64);
        self.backends.set(o.backends as i64);
        if let Ok(mut h) = self.health.lock() {
            h.first_sync_done = true;
            h.last_sync = Instant::now();
            h.in_flight_since = None;
        }
    }

    /// `/healthz`: 503 with the reasons while a change has waited longer
    /// than `max_pending` (`queued`: the oldest change the loop has not
    /// taken yet) or an operation is failing; 200 otherwise.
    pub fn health(&self, max_pending: Duration, queued: Option<Instant>) -> (bool, String) {
        let Ok(h) = self.health.lock() else {
            return (false, "poisoned\n".into());
        };
        let mut reasons = String::new();
        let oldest = [h.in_flight_since, queued].into_iter().flatten().min();
        if let Some(p) = oldest.filter(|p| p.elapsed() > max_pending) {
            reasons.push_str(&format!(
                "a change has waited {:.1}s to be programmed (limit {:.0}s)\n",
                p.elapsed().as_secs_f64(),
                max_pending.as_secs_f64()
            ));
        }
        let now = unix(SystemTime::now()) as u64;
        for f in self.faults.failing() {
            let subject = if f.subject.is_empty() {
                String::new()
            } else {
                format!(" {}", f.subject)
            };
            reasons.push_str(&format!(
                "{}{subject} failing for {}s: {}\n",
                f.kind,
                now.saturating_sub(f.since_unix),
                f.message
            ));
        }
        if reasons.is_empty() {
            let since = h.last_sync.elapsed().as_secs_f64();
            (true, format!("ok, last sync {since:.1}s ago\n"))
        } else {
            (false, reasons)
        }
    }

    pub fn ready(&self) -> bool {
        self.health.lock().is_ok_and(|h| h.first_sync_done)
    }

    /// The Prometheus text of everything registered.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }
}
