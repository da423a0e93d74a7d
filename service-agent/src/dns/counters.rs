//! DNS counters: queries by type and response code, what was dropped and
//! why, and how long answers took. Kept in one process-wide set (the
//! server and /metrics live as long as the agent), mirrored into a file in
//! the state directory so `service-agent stats` can print them.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{LazyLock, Mutex},
    time::Duration,
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};
use serde::{Deserialize, Serialize};

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0, 5.0,
];

/// The file `service-agent stats` reads, in the state directory.
pub const STATS_FILE: &str = "dns-stats.json";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueryLabel {
    qtype: String,
    rcode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabel {
    reason: String,
}

/// Why a query got no answer at all.
#[derive(Clone, Copy, Debug)]
pub enum Dropped {
    /// Its source sent more than `--dns-rate-limit` queries a second.
    RateLimited,
    /// Too many queries were in flight.
    Overloaded,
    /// Shorter than a DNS header: nothing to answer to.
    Malformed,
}

impl Dropped {
    pub fn name(self) -> &'static str {
        match self {
            Dropped::RateLimited => "rate_limited",
            Dropped::Overloaded => "overloaded",
            Dropped::Malformed => "malformed",
        }
    }
}

/// What `service-agent stats` shows.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// "TYPE RCODE" → queries.
    pub queries: BTreeMap<String, u64>,
    pub dropped: BTreeMap<String, u64>,
    /// Bucket upper bound in seconds (as text) → queries at or below it.
    pub latency_buckets: Vec<(f64, u64)>,
}

struct Counters {
    queries: Family<QueryLabel, Counter>,
    dropped: Family<DropLabel, Counter>,
    latency: Histogram,
    snapshot: Mutex<Snapshot>,
}

static COUNTERS: LazyLock<Counters> = LazyLock::new(|| Counters {
    queries: Family::default(),
    dropped: Family::default(),
    latency: Histogram::new(BUCKETS),
    snapshot: Mutex::new(Snapshot {
        latency_buckets: BUCKETS.iter().map(|b| (*b, 0)).collect(),
        ..Default::default()
    }),
});

/// Adds the DNS metrics to /metrics.
pub fn register(registry: &mut Registry) {
    let c = &*COUNTERS;
    registry.register(
        "dns_queries",
        "DNS queries answered, by query type and response code",
        c.queries.clone(),
    );
    registry.register(
        "dns_dropped",
        "DNS queries dropped unanswered, by reason",
        c.dropped.clone(),
    );
    registry.register(
        "dns_query_duration_seconds",
        "Time from a DNS query read to its answer sent",
        c.latency.clone(),
    );
}

pub fn answered(qtype: &str, rcode: &str, took: Duration) {
    let c = &*COUNTERS;
    c.queries
        .get_or_create(&QueryLabel {
            qtype: qtype.into(),
            rcode: rcode.into(),
        })
        .inc();
    let secs = took.as_secs_f64();
    c.latency.observe(secs);
    let mut s = c.snapshot.lock().unwrap_or_else(|e| e.into_inner());
    *s.queries.entry(format!("{qtype} {rcode}")).or_default() += 1;
    for (bound, n) in s.latency_buckets.iter_mut() {
        if secs <= *bound {
            *n += 1;
        }
    }
}

pub fn dropped(why: Dropped) {
    let c = &*COUNTERS;
    c.dropped
        .get_or_create(&DropLabel {
            reason: why.name().into(),
        })
        .inc();
    let mut s = c.snapshot.lock().unwrap_or_else(|e| e.into_inner());
    *s.dropped.entry(why.name().into()).or_default() += 1;
}

pub fn snapshot() -> Snapshot {
    COUNTERS
        .snapshot
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

fn stats_path(state_dir: &Path) -> PathBuf {
    state_dir.join(STATS_FILE)
}

/// Writes the counters for `service-agent stats` (whole or not at all: a
/// reader never sees half a file).
pub fn write_snapshot(state_dir: &Path, s: &Snapshot) -> std::io::Result<()> {
    std::fs::create_dir_all(state_dir)?;
    let tmp = state_dir.join(format!(".{STATS_FILE}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec(s)?)?;
    std::fs::rename(&tmp, stats_path(state_dir))
}

/// The counters the agent last wrote, when it serves DNS.
pub fn read_snapshot(state_dir: &Path) -> Option<Snapshot> {
    serde_json::from_slice(&std::fs::read(stats_path(state_dir)).ok()?).ok()
}

/// The `stats` text: queries by type and code, drops, latency quantiles.
pub fn render(s: &Snapshot) -> String {
    let mut out = format!("{:<24} {:>12}\n", "DNS QUERY (TYPE RCODE)", "COUNT");
    for (k, n) in &s.queries {
        out += &format!("{k:<24} {n:>12}\n");
    }
    for (k, n) in &s.dropped {
        out += &format!("{:<24} {n:>12}\n", format!("dropped {k}"));
    }
    for q in [0.5, 0.99] {
        if let Some(b) = quantile(s, q) {
            out += &format!(
                "{:<24} {:>12}\n",
                format!("latency p{}", q * 100.0),
                format!("<= {}ms", b * 1e3)
            );
        }
    }
    out
}

/// The smallest bucket bound holding the `q` quantile of answered queries.
pub fn quantile(s: &Snapshot, q: f64) -> Option<f64> {
    let total: u64 = s.queries.values().sum();
    if total == 0 {
        return None;
    }
    let want = (total as f64 * q).ceil() as u64;
    s.latency_buckets
        .iter()
        .find(|(_, n)| *n >= want)
        .map(|(b, _)| *b)
}
