//! Service DNS inside the agent (the Kubernetes DNS-Based Service Discovery
//! specification), answered from the objects the planner compiles and
//! served on a ClusterIP the agent programs itself.
pub mod counters;
pub mod forward;
pub mod handler;
pub mod listen;
pub mod lookup;
pub mod ratelimit;
pub mod service;
pub mod table;
#[cfg(test)]
mod tests;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use tracing::info;

use crate::source::Source;

/// How long a forwarded query waits for the upstreams, all tries together.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);

/// Where names outside the cluster zone go.
#[derive(Clone, Debug, PartialEq)]
pub enum Upstream {
    /// The `nameserver` lines of this resolv.conf.
    ResolvConf(PathBuf),
    Servers(Vec<SocketAddr>),
    /// Refused.
    None,
}

#[derive(Clone, Debug)]
pub struct DnsConfig {
    pub cluster_domain: String,
    pub service_ip: IpAddr,
    /// The listener; default: the first node address, port 53.
    pub listen: Option<SocketAddr>,
    pub upstream: Upstream,
    /// Queries a second per source address; 0: no limit.
    pub rate_limit: u32,
    pub ttl: u32,
}

/// Starts the DNS server and returns `source` with the DNS Service added
/// (and the name table fed from it); `source` as is without `cfg`.
pub async fn attach(
    cfg: Option<&DnsConfig>,
    source: Box<dyn Source>,
    node_ips: &[Ipv4Addr],
    node_name: Option<&str>,
    state_dir: &Path,
) -> anyhow::Result<Box<dyn Source>> {
    let Some(cfg) = cfg else {
        return Ok(source);
    };
    let zone = lookup::Zone::new(&cfg.cluster_domain, cfg.ttl).map_err(anyhow::Error::msg)?;
    let listen = match cfg.listen {
        Some(l) => l,
        None => {
            let ip = match node_ips.first() {
                Some(ip) => *ip,
                None => *crate::dataplane::interfaces::node_addresses()?
                    .first()
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "DNS: this node has no IPv4 address to listen on: pass --dns-listen"
                        )
                    })?,
            };
            SocketAddr::new(IpAddr::V4(ip), 53)
        }
    };
    let upstream = match &cfg.upstream {
        Upstream::None => None,
        Upstream::Servers(s) => Some(s.clone()),
        Upstream::ResolvConf(path) => Some(
            forward::resolv_conf_servers(path, &[cfg.service_ip, listen.ip()])
                .map_err(|e| anyhow::anyhow!("--dns-upstream: reading {}: {e}", path.display()))?,
        ),
    }
    .map(|servers| forward::Forwarder::new(servers, FORWARD_TIMEOUT));
    let table = Arc::new(RwLock::new(table::Table::default()));
    let handler = Arc::new(handler::Handler {
        zone,
        table: table.clone(),
        upstream,
        limit: ratelimit::RateLimit::new(cfg.rate_limit),
    });
    let upstreams: Vec<String> = match &handler.upstream {
        Some(f) => f.servers().iter().map(|s| s.to_string()).collect(),
        None => vec!["none (refused)".into()],
    };
    listen::serve(listen, handler).await?;
    spawn_stats_writer(state_dir.to_path_buf());
    info!(
        %listen,
        service_ip = %cfg.service_ip,
        zone = %cfg.cluster_domain,
        ?upstreams,
        "serving DNS"
    );
    let own = service::objects(cfg.service_ip, listen, node_name);
    Ok(Box::new(service::DnsSource::new(
        source,
        table,
        cfg.service_ip,
        own,
    )))
}

/// Mirrors the counters into the state directory once a second while they move.
fn spawn_stats_writer(state_dir: PathBuf) {
    tokio::spawn(async move {
        let mut last = None;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let now = counters::snapshot();
            if last.as_ref() != Some(&now) {
                if let Err(e) = counters::write_snapshot(&state_dir, &now) {
                    tracing::warn!("writing DNS counters to {}: {e}", state_dir.display());
                }
                last = Some(now);
            }
        }
    });
}
