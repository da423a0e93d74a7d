//! HTTP servers the agent answers: the `healthCheckNodePort` of each
//! LoadBalancer Service with `externalTrafficPolicy: Local`, as kube-proxy
//! does (200 with local endpoints, 503 without), so load balancers send
//! traffic only to nodes that can serve it.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, RwLock},
};

use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse};
use serde::Serialize;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::plan::HealthCheck;

#[derive(Clone, Debug, Serialize)]
struct ServiceRef {
    namespace: String,
    name: String,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Answer {
    service: ServiceRef,
    local_endpoints: usize,
    service_proxy_healthy: bool,
}

type Shared = Arc<RwLock<Answer>>;

async fn answer(State(state): State<Shared>) -> impl IntoResponse {
    let a = state.read().map(|a| a.clone());
    match a {
        Ok(a) => {
            let code = if a.local_endpoints > 0 {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            (code, Json(a)).into_response()
        }
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

fn answer_of(h: &HealthCheck) -> Answer {
    let (namespace, name) = h.service.split_once('/').unwrap_or(("default", &h.service));
    Answer {
        service: ServiceRef {
            namespace: namespace.into(),
            name: name.into(),
        },
        local_endpoints: h.local_endpoints,
        service_proxy_healthy: true,
    }
}

/// The running health-check servers, one per port.
#[derive(Default)]
pub struct HealthServers {
    running: BTreeMap<u16, (Shared, JoinHandle<()>)>,
}

impl HealthServers {
    /// Starts, updates and stops servers to match `checks`. A port that
    /// cannot be bound is reported and retried at the next sync.
    pub async fn sync(&mut self, checks: &[HealthCheck]) -> Vec<String> {
        let mut errors = vec![];
        let wanted: BTreeMap<u16, &HealthCheck> = checks.iter().map(|h| (h.port, h)).collect();
        self.running.retain(|port, (_, task)| {
            let keep = wanted.contains_key(port);
            if !keep {
                task.abort();
                info!(port, "health check server stopped");
            }
            keep
        });
        for (port, h) in wanted {
            if let Some((state, _)) = self.running.get(&port) {
                if let Ok(mut a) = state.write() {
                    *a = answer_of(h);
                }
                continue;
            }
            let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
            let listener = match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => l,
                Err(e) => {
                    errors.push(format!(
                        "Service {}: healthCheckNodePort {port}: cannot listen: {e}",
                        h.service
                    ));
                    continue;
                }
            };
            let state: Shared = Arc::new(RwLock::new(answer_of(h)));
            let app = Router::new().fallback(answer).with_state(state.clone());
            let task = tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    warn!(port, "health check server: {e}");
                }
            });
            info!(port, service = %h.service, "health check server started");
            self.running.insert(port, (state, task));
        }
        errors
    }
}
