//! `service-agent run`: keeps the maps equal to what the manifests say.
use std::{
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::{
    dataplane::{Dataplane, IfaceRole, MapSizes, interfaces, writer},
    health::HealthServers,
    manifest::ManifestDir,
    plan::{self, NodeContext, Plan},
    status,
};

#[derive(Clone, Debug)]
pub struct RunConfig {
    pub manifests: PathBuf,
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
    pub external_ifaces: Vec<String>,
    pub pod_iface_globs: Vec<String>,
    pub node: NodeContext,
    /// Fixed node addresses; empty: every non-loopback IPv4 address of the namespace.
    pub node_ips: Vec<Ipv4Addr>,
    pub sizes: MapSizes,
    pub resync: Duration,
}

struct Agent {
    cfg: RunConfig,
    dp: Dataplane,
    source: ManifestDir,
    previous: Plan,
    last_errors: Vec<String>,
    health: HealthServers,
}

impl Agent {
    /// Reads the manifests and brings the maps (and health checks) to them.
    async fn sync(&mut self) {
        let started = Instant::now();
        let (cluster, errors) = self.source.load(&self.cfg.manifests);
        let manifest_errors: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        let slices = cluster.all_endpoint_slices();
        let mut plan = plan::compile(&cluster.services, &slices, &self.cfg.node);
        plan.keep_refused_from(&self.previous);
        let report = self.dp.writer.apply(&mut self.dp.tables, &plan);
        let mut problems = manifest_errors.clone();
        problems.extend(report.errors.iter().cloned());
        problems.extend(self.health.sync(&plan.health_checks).await);
        // Log each distinct problem once, not at every resync.
        let all: Vec<String> = problems
            .iter()
            .cloned()
            .chain(plan.problems.iter().map(|p| p.to_string()))
            .collect();
        for p in &all {
            if !self.last_errors.contains(p) {
                error!("{p}");
            }
        }
        self.last_errors = all;
        if report.frontends_written + report.frontends_removed > 0 || report.udp_flows_flushed > 0 {
            info!(
                written = report.frontends_written,
                removed = report.frontends_removed,
                backends_added = report.backends_added,
                backends_removed = report.backends_removed,
                udp_flows_flushed = report.udp_flows_flushed,
                frontends = self.dp.writer.frontend_count(),
                elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                "maps synced"
            );
        }
        if let Err(e) = status::write(
            &self.cfg.state_dir,
            &status::Status::from_plan(&plan, &problems),
        ) {
            warn!("writing {}: {e}", self.cfg.state_dir.display());
        }
        self.previous = plan;
    }

    /// Attaches to new interfaces and keeps NODE_ADDRS current.
    fn watch_interfaces(&mut self) {
        let names = match interfaces::interface_names() {
            Ok(n) => n,
            Err(e) => {
                warn!("listing interfaces: {e}");
                return;
            }
        };
        for gone in self.dp.forget_missing(&names) {
            info!(iface = %gone, "interface gone");
        }
        for name in &names {
            let role = if self.cfg.external_ifaces.contains(name) {
                IfaceRole::External
            } else if self
                .cfg
                .pod_iface_globs
                .iter()
                .any(|g| interfaces::glob_match(g, name))
            {
                IfaceRole::Pod
            } else {
                continue;
            };
            match self.dp.attach(name, role) {
                Ok(Some(false)) => info!(iface = %name, ?role, "attached tc ingress"),
                Ok(Some(true)) => {
                    info!(iface = %name, ?role, "attached tc ingress (adopted the pinned link)")
                }
                Ok(None) => {}
                Err(e) => warn!(iface = %name, "{e:#}"),
            }
        }
        let addrs = if self.cfg.node_ips.is_empty() {
            interfaces::node_addresses().unwrap_or_default()
        } else {
            self.cfg.node_ips.clone()
        };
        if let Err(e) = self.dp.writer.set_node_addrs(&mut self.dp.tables, &addrs) {
            warn!("updating NODE_ADDRS: {e}");
        }
        let snat = self.snat_address(&addrs);
        if let Err(e) = self.dp.writer.set_snat_addr(&mut self.dp.tables, snat) {
            warn!("setting the SNAT address: {e}");
        }
    }
}

impl Agent {
    /// The first --node-ip, else the first address of the first external
    /// interface: where replies of source-NATed flows come back to.
    fn snat_address(&self, node_addrs: &[Ipv4Addr]) -> Option<Ipv4Addr> {
        if let Some(a) = self.cfg.node_ips.first() {
            return Some(*a);
        }
        self.cfg
            .external_ifaces
            .iter()
            .find_map(|i| interfaces::interface_addresses(i).ok()?.into_iter().next())
            .or_else(|| node_addrs.first().copied())
    }
}

fn monotonic_ns() -> u64 {
    // The same clock as bpf_ktime_get_ns(), which stamps conntrack entries.
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64,
        Err(_) => 0,
    }
}

pub async fn run(cfg: RunConfig) -> anyhow::Result<()> {
    for iface in &cfg.external_ifaces {
        if !interfaces::interface_names()?.contains(iface) {
            anyhow::bail!("--external-iface {iface}: no such interface in this network namespace");
        }
    }
    if !cfg.manifests.is_dir() {
        anyhow::bail!("--manifests {}: not a directory", cfg.manifests.display());
    }
    let dp = Dataplane::load(cfg.pin_dir.clone(), &cfg.sizes)?;
    let mut agent = Agent {
        cfg,
        dp,
        source: ManifestDir::default(),
        previous: Plan::default(),
        last_errors: vec![],
        health: HealthServers::default(),
    };
    // Program before attaching, so no packet meets an empty table.
    agent.sync().await;
    agent.watch_interfaces();
    info!(
        pin_dir = %agent.cfg.pin_dir.display(),
        manifests = %agent.cfg.manifests.display(),
        attached = ?agent.dp.attached().collect::<Vec<_>>(),
        "agent running"
    );

    let (tx, mut changes) = mpsc::channel::<()>(16);
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if res.is_ok() {
            let _ = tx.try_send(());
        }
    })
    .context("starting the file watcher")?;
    watcher
        .watch(&agent.cfg.manifests, RecursiveMode::NonRecursive)
        .with_context(|| format!("watching {}", agent.cfg.manifests.display()))?;

    let mut iface_tick = tokio::time::interval(Duration::from_millis(500));
    let mut resync_tick = tokio::time::interval(agent.cfg.resync);
    let mut gc_tick = tokio::time::interval(Duration::from_secs(10));
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            Some(()) = changes.recv() => {
                // Editors write in bursts (truncate, write, rename): settle first.
                tokio::time::sleep(Duration::from_millis(50)).await;
                while changes.try_recv().is_ok() {}
                agent.sync().await;
            }
            _ = iface_tick.tick() => agent.watch_interfaces(),
            _ = resync_tick.tick() => agent.sync().await,
            _ = gc_tick.tick() => {
                let n = writer::expire_conntrack(&mut agent.dp.tables, monotonic_ns());
                if n > 0 {
                    info!(expired = n, "conntrack entries expired");
                }
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    info!("stopping; pinned maps are kept for the next agent");
    Ok(())
}
