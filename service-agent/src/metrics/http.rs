//! `/metrics` (Prometheus text format), `/healthz` and `/readyz`.
use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use tracing::{info, warn};

use super::Metrics;
use crate::source::SharedPending;

#[derive(Clone)]
pub struct HttpConfig {
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
    /// /healthz turns 503 when a change has waited longer than this.
    pub max_pending: Duration,
    /// The changes the loop has not taken yet: a change waits from when a
    /// watcher noted it, also while the loop is busy elsewhere.
    pub pending: SharedPending,
}

type Shared = (Arc<Metrics>, HttpConfig);

async fn metrics(State((m, cfg)): State<Shared>) -> impl IntoResponse {
    if let Some(t) = cfg.pending.first_noted() {
        m.queued(t);
    }
    // Map reads are syscalls: off the async workers, so a scrape delays
    // neither the agent loop nor other requests.
    let maps = m.maps.clone();
    let (pins, state) = (cfg.pin_dir.clone(), cfg.state_dir.clone());
    match tokio::task::spawn_blocking(move || maps.read(&pins, &state)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!("reading the maps for /metrics: {e:#}"),
        Err(e) => warn!("reading the maps for /metrics: {e}"),
    }
    match m.encode() {
        Ok(text) => (
            [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
            text,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn healthz(State((m, cfg)): State<Shared>) -> impl IntoResponse {
    match m.health(cfg.max_pending, cfg.pending.first_noted()) {
        (true, text) => (StatusCode::OK, text),
        (false, text) => (StatusCode::SERVICE_UNAVAILABLE, text),
    }
}

async fn readyz(State((m, _)): State<Shared>) -> impl IntoResponse {
    if m.ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "initial sync not done\n")
    }
}

pub fn router(m: Arc<Metrics>, cfg: HttpConfig) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state((m, cfg))
}

/// Serves /metrics, /healthz and /readyz on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, m: Arc<Metrics>, cfg: HttpConfig) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("--metrics-addr {addr}: {e}"))?;
    let app = router(m, cfg);
    info!(%addr, "serving /metrics, /healthz, /readyz");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            warn!("metrics server: {e}");
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use axum::body::Body;
    use tower::ServiceExt as _;

    use super::*;
    use crate::{faults::FaultKind, metrics::SyncOutcome};

    fn config(max_pending: Duration) -> HttpConfig {
        HttpConfig {
            pin_dir: "/nonexistent/pins".into(),
            state_dir: "/nonexistent/state".into(),
            max_pending,
            pending: SharedPending::default(),
        }
    }

    async fn get(app: &Router, path: &str) -> (u16, String) {
        let req = http::Request::get(path).body(Body::empty()).unwrap();
        let res = app.clone().oneshot(req).await.unwrap();
        let code = res.status().as_u16();
        let body = axum::body::to_bytes(res.into_body(), 1 << 20)
            .await
            .unwrap();
        (code, String::from_utf8(body.to_vec()).unwrap())
    }

    fn synced(m: &Metrics) {
        m.synced(&SyncOutcome {
            ok: true,
            ..SyncOutcome::default()
        });
    }

    #[tokio::test]
    async fn readyz_waits_for_the_first_sync() {
        let m = Arc::new(Metrics::default());
        let app = router(m.clone(), config(Duration::from_secs(60)));
        assert_eq!(
            get(&app, "/readyz").await,
            (503, "initial sync not done\n".into())
        );
        synced(&m);
        assert_eq!(get(&app, "/readyz").await, (200, "ready\n".into()));
    }

    #[tokio::test]
    async fn healthz_fails_while_a_change_waits_past_the_limit() {
        let m = Arc::new(Metrics::default());
        let cfg = config(Duration::from_millis(50));
        let pending = cfg.pending.clone();
        let app = router(m.clone(), cfg);
        synced(&m);
        assert_eq!(get(&app, "/healthz").await.0, 200);
        // Noted by a watcher, not yet taken by the loop: it waits too.
        pending.note(|p| p.everything = true);
        assert_eq!(get(&app, "/healthz").await.0, 200, "within the limit");
        std::thread::sleep(Duration::from_millis(80));
        let (code, text) = get(&app, "/healthz").await;
        assert_eq!(code, 503, "{text}");
        assert!(text.starts_with("a change has waited "), "{text}");
        // Taken by a sync that is still running: still waiting.
        let taken = pending.take();
        m.sync_started(taken.first_noted);
        assert_eq!(get(&app, "/healthz").await.0, 503);
        synced(&m);
        assert_eq!(get(&app, "/healthz").await.0, 200);
    }

    #[tokio::test]
    async fn healthz_fails_while_an_operation_fails_and_recovers_with_it() {
        let m = Arc::new(Metrics::default());
        let app = router(m.clone(), config(Duration::from_secs(60)));
        synced(&m);
        m.faults
            .failed(FaultKind::ConntrackGc, "", "walking CONNTRACK: EIO");
        m.faults.failed(FaultKind::Watch, "services", "410 Gone");
        let (code, text) = get(&app, "/healthz").await;
        assert_eq!(code, 503, "{text}");
        assert!(
            text.contains("conntrack_gc failing for 0s: walking CONNTRACK: EIO\n"),
            "{text}"
        );
        assert!(
            text.contains("watch services failing for 0s: 410 Gone\n"),
            "{text}"
        );
        m.faults.succeeded(FaultKind::ConntrackGc, "");
        assert_eq!(get(&app, "/healthz").await.0, 503, "the watch still fails");
        m.faults.succeeded(FaultKind::Watch, "services");
        let (code, text) = get(&app, "/healthz").await;
        assert_eq!(code, 200, "{text}");
        let (_, metrics) = get(&app, "/metrics").await;
        assert!(
            metrics.contains("service_agent_sync_errors_total{kind=\"conntrack_gc\"} 1\n"),
            "{metrics}"
        );
        assert!(
            metrics.contains("service_agent_sync_errors_total{kind=\"apply\"} 0\n"),
            "{metrics}"
        );
    }

    /// What is exported, by name and type: the dashboard's test checks its
    /// queries against this.
    #[tokio::test]
    async fn counters_are_counters_and_gauges_gauges() {
        let m = Arc::new(Metrics::default());
        let app = router(m.clone(), config(Duration::from_secs(60)));
        let started = Instant::now();
        m.sync_started(Some(started));
        m.synced(&SyncOutcome {
            ok: true,
            service_changes: 2,
            endpoint_changes: 3,
            triggers: vec![std::time::SystemTime::now() - Duration::from_secs(2)],
            ..SyncOutcome::default()
        });
        let (_, text) = get(&app, "/metrics").await;
        for want in [
            "# TYPE service_agent_frontend_packets counter",
            "# TYPE service_agent_frontend_bytes counter",
            "# TYPE service_agent_packets_by_reason counter",
            "# TYPE service_agent_sync_errors counter",
            "# TYPE service_agent_map_entries gauge",
            "# TYPE service_agent_sync_proxy_rules_last_timestamp_seconds gauge",
            "# TYPE service_agent_sync_proxy_rules_last_queued_timestamp_seconds gauge",
            "# TYPE service_agent_network_programming_duration_seconds histogram",
            "service_agent_sync_proxy_rules_service_changes_total 2\n",
            "service_agent_sync_proxy_rules_endpoint_changes_total 3\n",
            "service_agent_network_programming_duration_seconds_bucket{le=\"2.5\"} 1\n",
            "service_agent_network_programming_duration_seconds_bucket{le=\"1.0\"} 0\n",
        ] {
            assert!(text.contains(want), "{want:?} missing:\n{text}");
        }
        let ts = |name: &str| -> f64 {
            let line = text
                .lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_else(|| panic!("{name} missing:\n{text}"));
            line.rsplit(' ').next().unwrap().parse().unwrap()
        };
        let now = super::super::unix(std::time::SystemTime::now());
        for name in [
            "service_agent_sync_proxy_rules_last_timestamp_seconds ",
            "service_agent_sync_proxy_rules_last_queued_timestamp_seconds ",
        ] {
            assert!((now - ts(name)).abs() < 5.0, "{name}: {text}");
        }
    }
}
