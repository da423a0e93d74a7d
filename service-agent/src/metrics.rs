//! `/metrics` (Prometheus text format), `/healthz` and `/readyz`.
//!
//! Counters kept by the programs (per-frontend packets and bytes, drops by
//! reason) and map fill levels are read from the pinned maps at scrape time,
//! through file descriptors of the scrape's own: the packet path is never
//! touched and the agent loop is never blocked by a scrape.
use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use tracing::{info, warn};

use crate::{dataplane::tables::Tables, report, status};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabel {
    map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FrontendLabel {
    frontend: String,
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
    verdict: String,
}

/// What the agent loop records; the HTTP side reads it.
pub struct Metrics {
    registry: Registry,
    pub sync_duration: Histogram,
    pub programming_duration: Histogram,
    pub sync_errors: Counter,
    frontends: Gauge,
    backends: Gauge,
    map_entries: Family<MapLabel, Gauge>,
    map_capacity: Family<MapLabel, Gauge>,
    packets: Family<FrontendLabel, Gauge>,
    bytes: Family<FrontendLabel, Gauge>,
    reasons: Family<ReasonLabel, Gauge>,
    health: Mutex<Health>,
}

struct Health {
    first_sync_done: bool,
    last_sync: Instant,
    /// A change arrived and is not programmed yet.
    pending_since: Option<Instant>,
}

fn buckets() -> impl Iterator<Item = f64> {
    [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ]
    .into_iter()
}

/// Registers each named field of the metrics under its name and help text.
macro_rules! register {
    ($registry:ident, $m:ident, $($field:ident: $name:literal, $help:literal;)*) => {
        $($registry.register($name, $help, $m.$field.clone());)*
    };
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("service_agent");
        let m = Metrics {
            sync_duration: Histogram::new(buckets()),
            programming_duration: Histogram::new(buckets()),
            sync_errors: Counter::default(),
            frontends: Gauge::default(),
            backends: Gauge::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            packets: Family::default(),
            bytes: Family::default(),
            reasons: Family::default(),
            health: Mutex::new(Health {
                first_sync_done: false,
                last_sync: Instant::now(),
                pending_since: None,
            }),
            registry: Registry::default(),
        };
        register!(registry, m,
            sync_duration: "sync_proxy_rules_duration_seconds", "Time to compute the plan and write the maps, per sync";
            programming_duration: "network_programming_duration_seconds", "Time from a change seen by the source to the maps programmed";
            sync_errors: "sync_errors", "Syncs that reported a problem";
            frontends: "frontends_programmed", "Service frontends in the maps";
            backends: "backends_programmed", "Backends in the maps";
            map_entries: "map_entries", "Entries in each pinned map";
            map_capacity: "map_capacity", "max_entries of each pinned map";
            packets: "frontend_packets", "Packets translated per frontend";
            bytes: "frontend_bytes", "Bytes translated per frontend";
            reasons: "packets_by_reason", "Packets counted per reason, with what happened to them (passed, translated, answered, dropped)";
        );
        crate::dns::counters::register(&mut registry);
        Metrics { registry, ..m }
    }
}

impl Metrics {
    pub fn change_seen(&self) {
        if let Ok(mut h) = self.health.lock()
            && h.pending_since.is_none()
        {
            h.pending_since = Some(Instant::now());
        }
    }

    /// Records a completed sync; `changed_at` is when the change it applied was seen.
    pub fn synced(
        &self,
        took: Duration,
        changed_at: Option<Instant>,
        frontends: usize,
        backends: usize,
    ) {
        self.sync_duration.observe(took.as_secs_f64());
        if let Some(t) = changed_at {
            self.programming_duration.observe(t.elapsed().as_secs_f64());
        }
        self.frontends.set(frontends as i64);
        self.backends.set(backends as i64);
        if let Ok(mut h) = self.health.lock() {
            h.first_sync_done = true;
            h.last_sync = Instant::now();
            h.pending_since = None;
        }
    }

    /// When the oldest unprogrammed change was seen.
    pub fn pending_since(&self) -> Option<Instant> {
        self.health.lock().ok()?.pending_since
    }

    fn refresh_from_maps(&self, cfg: &HttpConfig) -> anyhow::Result<()> {
        let t = Tables::open_pinned(&cfg.pin_dir)?;
        let st = status::read(&cfg.state_dir);
        let fes = report::programmed(&t, st.as_ref())?;
        let (per, reasons) = report::counters(&t, &fes)?;
        for (f, s) in per {
            let service = fes
                .iter()
                .find(|x| x.frontend == f)
                .and_then(|x| x.service.clone())
                .unwrap_or_default();
            let l = FrontendLabel {
                frontend: f,
                service,
            };
            self.packets.get_or_create(&l).set(s.packets as i64);
            self.bytes.get_or_create(&l).set(s.bytes as i64);
        }
        for (r, n) in reasons {
            let l = ReasonLabel {
                reason: r.name().into(),
                verdict: r.verdict().name().into(),
            };
            self.reasons.get_or_create(&l).set(n as i64);
        }
        for (map, entries, capacity) in report::fill(&t, &cfg.pin_dir) {
            let l = MapLabel { map: map.into() };
            self.map_entries.get_or_create(&l).set(entries as i64);
            self.map_capacity.get_or_create(&l).set(capacity as i64);
        }
        Ok(())
    }
}

#[derive(Clone)]
pub struct HttpConfig {
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
    /// /healthz turns 503 when a change has waited longer than this.
    pub max_pending: Duration,
}

type Shared = (Arc<Metrics>, HttpConfig);

async fn metrics(State((m, cfg)): State<Shared>) -> impl IntoResponse {
    if let Err(e) = m.refresh_from_maps(&cfg) {
        warn!("reading the maps for /metrics: {e:#}");
    }
    let mut text = String::new();
    if encode(&mut text, &m.registry).is_err() {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    (
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        text,
    )
        .into_response()
}

async fn healthz(State((m, cfg)): State<Shared>) -> impl IntoResponse {
    let Ok(h) = m.health.lock() else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "poisoned".to_string());
    };
    let since = h.last_sync.elapsed().as_secs_f64();
    match h.pending_since {
        Some(p) if p.elapsed() > cfg.max_pending => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "a change has waited {:.1}s to be programmed (limit {:.0}s)\n",
                p.elapsed().as_secs_f64(),
                cfg.max_pending.as_secs_f64()
            ),
        ),
        _ => (StatusCode::OK, format!("ok, last sync {since:.1}s ago\n")),
    }
}

async fn readyz(State((m, _)): State<Shared>) -> impl IntoResponse {
    match m.health.lock() {
        Ok(h) if h.first_sync_done => (StatusCode::OK, "ready\n"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "initial sync not done\n"),
    }
}

/// Serves /metrics, /healthz and /readyz on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, m: Arc<Metrics>, cfg: HttpConfig) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("--metrics-addr {addr}: {e}"))?;
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state((m, cfg));
    info!(%addr, "serving /metrics, /healthz, /readyz");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            warn!("metrics server: {e}");
        }
    });
    Ok(())
}
