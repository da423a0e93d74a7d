//! `service-agent run`: keeps the maps equal to what the source says.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::{
    dataplane::{
        Dataplane, IfaceRole, XdpEgress, cgroup::CgroupTarget, interfaces, sock_destroy, takeover,
        writer::snat_source,
    },
    faults::{Failing, FaultKind},
    gc::{self, monotonic_ns},
    health::HealthServers,
    metrics::{self, Metrics, SyncOutcome, changes::ChangeTracker},
    plan::{self, FrontendKey, Incremental},
    source::{SharedPending, Source},
    status,
};

pub use crate::{run_config::RunConfig, source::SourceConfig};

struct Agent {
    cfg: RunConfig,
    dp: Dataplane,
    source: Box<dyn Source>,
    pending: SharedPending,
    planner: Incremental,
    last_errors: Vec<String>,
    /// What was failing when the status file was last written.
    last_failing: Vec<Failing>,
    /// Which objects each sync found changed, for the change counters and
    /// the programming latency.
    changes: ChangeTracker,
    /// (Service, port name) of each frontend in the last status file: the
    /// file is rewritten only when these, skips or problems change.
    status_names: BTreeMap<FrontendKey, (Arc<str>, Arc<str>)>,
    last_skipped: Vec<plan::Skipped>,
    health: HealthServers,
    metrics: Arc<Metrics>,
    /// Whether XDP may transmit out of each XDP interface, as last logged.
    xdp_egress: BTreeMap<String, XdpEgress>,
    /// XDP attachments that failed at the last scan, by interface.
    xdp_errors: BTreeMap<String, String>,
}

/// How much a sync looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sweep {
    /// What the watchers noted since the last sync.
    Events,
    /// The periodic safety net: the source rereads what it can (every
    /// manifest file, by its hash) and the Services that differ are
    /// compiled again; every frontend is compared with the maps. Compiling
    /// the unchanged ones again would give the same plan (the planner's
    /// tests hold the incremental plan equal to the full compile) at a
    /// cost that grows with the cluster, every period.
    Resync,
    /// Start, a relist, a lost event queue, a new node zone: a fresh
    /// planner, every Service compiled, every clash decided again.
    Everything,
}

impl Agent {
    /// Brings the maps (and health checks) to the source; see [`Sweep`].
    async fn sync(&mut self, sweep: Sweep) {
        let started = Instant::now();
        let pending = self.pending.take();
        self.metrics.sync_started(pending.first_noted);
        let mut observed = metrics::changes::Observed::default();
        let mut node = self.cfg.node.clone();
        if node.zone.is_none() {
            node.zone = self.source.node_zone();
        }
        // Node context (zone) changes every Service: compile all of them.
        let sweep = if pending.everything || node != *self.planner.node() {
            Sweep::Everything
        } else {
            sweep
        };
        let dirty = match sweep {
            Sweep::Events => self.source.refresh(&pending, false),
            Sweep::Resync => Some(self.source.resync(&pending)),
            Sweep::Everything => self.source.refresh(&pending, true),
        };
        let changed = match dirty {
            Some(ids) => {
                for id in ids {
                    let (services, slices) = self.source.objects(&id);
                    self.changes.observe(&id, &services, &slices, &mut observed);
                    self.planner.set(id, services, slices);
                }
                self.planner.set_unlabeled(&self.source.unlabeled_slices());
                self.planner.commit()
            }
            None => {
                // A fresh planner from the plan in force: every Service
                // compiled again, every clash decided again.
                let previous = std::mem::take(&mut self.planner).into_plan();
                let mut planner = Incremental::new(node, previous);
                let ids = self.source.ids();
                for id in &ids {
                    let (services, slices) = self.source.objects(id);
                    self.changes.observe(id, &services, &slices, &mut observed);
                    planner.set(id.clone(), services, slices);
                }
                (self.changes).forget_except(&|id| ids.contains(id), &mut observed);
                planner.set_unlabeled(&self.source.unlabeled_slices());
                let changed = planner.commit();
                self.planner = planner;
                changed
            }
        };
        let full = sweep != Sweep::Events;
        let plan = self.planner.plan();
        let report = if full {
            self.dp.writer.apply(&mut self.dp.tables, plan)
        } else {
            self.dp
                .writer
                .apply_changes(&mut self.dp.tables, plan, &changed)
        };
        let ended = sock_destroy::destroy_removed(&mut self.dp.tables, &report.removed_pairs);
        if ended.sockets > 0 {
            info!(
                sockets = ended.sockets,
                "ended host UDP sockets of removed backends"
            );
        }
        let health_errors = self.health.sync(&plan.health_checks).await;
        let faults = &self.metrics.faults;
        faults.record_sync(&report, &ended.errors, &health_errors);
        // What the input got wrong is logged here, each distinct problem
        // once, not at every resync (the faults log their own).
        let mut problems = self.source.errors();
        let input = problems.iter().cloned();
        for p in input.chain(plan.problems.iter().map(|p| p.to_string())) {
            if !self.last_errors.contains(&p) {
                error!("{p}");
            }
        }
        problems.extend(report.errors.iter().cloned());
        problems.extend(ended.errors);
        problems.extend(health_errors);
        let all: Vec<String> = problems
            .iter()
            .cloned()
            .chain(plan.problems.iter().map(|p| p.to_string()))
            .collect();
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
        // The status file names every frontend: rewriting it for a change
        // of backends only would cost more than the change itself.
        let mut names_changed = sweep == Sweep::Everything;
        for k in &changed {
            let now = plan
                .frontends
                .get(k)
                .map(|f| (f.service.clone(), f.port_name.clone()));
            if now.as_ref() != self.status_names.get(k) {
                names_changed = true;
                match now {
                    Some(n) => self.status_names.insert(*k, n),
                    None => self.status_names.remove(k),
                };
            }
        }
        if sweep == Sweep::Everything {
            self.status_names = plan
                .frontends
                .iter()
                .map(|(k, f)| (*k, (f.service.clone(), f.port_name.clone())))
                .collect();
        }
        let failing = faults.failing();
        if names_changed
            || all != self.last_errors
            || plan.skipped != self.last_skipped
            || failing != self.last_failing
        {
            let st = status::Status::from_plan(plan, &problems, failing.clone());
            let written = status::write(&self.cfg.state_dir, &st)
                .map_err(|e| format!("writing {}: {e}", self.cfg.state_dir.display()));
            faults.outcome(FaultKind::StatusFile, "", written);
            self.last_skipped = plan.skipped.clone();
            self.last_failing = failing;
        }
        self.last_errors = all;
        // Without a slice's own trigger time, a change starts when the
        // source noted it (a manifest file written, a Service event). The
        // first sync programs what existed before the agent ran, which
        // is no change: it has no sample.
        if observed.triggers.is_empty() && !changed.is_empty() && self.metrics.ready() {
            let noted = pending.first_noted.map(|t| SystemTime::now() - t.elapsed());
            observed.triggers.extend(noted);
        }
        self.metrics.synced(&SyncOutcome {
            took: started.elapsed(),
            ok: report.errors.is_empty() && report.faults.is_empty(),
            triggers: observed.triggers,
            service_changes: observed.service_changes,
            endpoint_changes: observed.endpoint_changes,
            frontends: self.dp.writer.frontend_count(),
            backends: self.dp.writer.backend_count(),
        });
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
            if role == IfaceRole::External {
                self.attach_xdp(name);
            }
        }
        self.xdp_errors.retain(|i, _| names.contains(i));
        let standing: BTreeMap<_, _> = self.dp.sync_xdp_egress(self.cfg.xdp).into_iter().collect();
        for (iface, s) in &standing {
            if self.xdp_egress.get(iface) != Some(s) {
                match s {
                    XdpEgress::Allowed => {
                        info!(iface = %iface, "XDP forwards out of this interface")
                    }
                    XdpEgress::Refused(why) => warn!(
                        iface = %iface,
                        "XDP passes flows leaving through this interface to tc: {why}"
                    ),
                }
            }
        }
        self.xdp_egress = standing;
        let (fixed, fixed6) = (self.cfg.node_ips.clone(), self.cfg.node_ips6.clone());
        let listed = self.dp.writer.refresh_node_addrs(
            &mut self.dp.tables,
            || {
                if fixed.is_empty() {
                    interfaces::node_addresses()
                } else {
                    Ok(fixed)
                }
            },
            || {
                if fixed6.is_empty() {
                    interfaces::node_addresses6()
                } else {
                    Ok(fixed6)
                }
            },
        );
        let faults = &self.metrics.faults;
        let (addrs, addrs6) = match listed {
            Ok(a) => {
                faults.succeeded(FaultKind::NodeAddrs, "");
                a
            }
            Err(e) => {
                faults.failed(FaultKind::NodeAddrs, "", e);
                return;
            }
        };
        let snat = self.snat_address(&addrs);
        let set = self.dp.writer.set_snat_addr(&mut self.dp.tables, snat);
        let snat6 = self.snat_address6(&addrs6);
        let set = set
            .and_then(|()| self.dp.writer.set_snat_addr6(&mut self.dp.tables, snat6))
            .map_err(|e| format!("setting the SNAT address: {e}"));
        self.metrics
            .faults
            .outcome(FaultKind::NodeAddrs, "snat", set);
    }

    /// Attaches (or, with `--cgroup none` or `--socket-lb off`, removes)
    /// the socket hooks.
    fn attach_sock_hooks(&mut self) -> anyhow::Result<()> {
        let (mode, dir) = match &self.cfg.cgroup {
            CgroupTarget::Dir(dir) => (self.cfg.socket_lb, Some(dir.as_path())),
            CgroupTarget::Off => (crate::dataplane::cgroup::SocketLb::Off, None),
        };
        let hooks = self.dp.attach_sock_hooks(dir, mode)?;
        if let (Some(dir), false) = (dir, hooks.is_empty()) {
            info!(cgroup = %dir.display(), socket_lb = mode.as_str(), ?hooks, "attached socket hooks (hook, adopted)");
        } else {
            let gone = crate::dataplane::cgroup::detach_all(&self.dp.pin_dir);
            if !gone.is_empty() {
                info!(hooks = ?gone, "--cgroup none or --socket-lb off: detached the socket hooks");
            }
        }
        Ok(())
    }

    fn attach_xdp(&mut self, iface: &str) {
        let mode = self.cfg.xdp;
        match self.dp.attach_xdp(iface, mode) {
            Ok(Some(adopted)) => {
                self.xdp_errors.remove(iface);
                info!(iface = %iface, mode = mode.as_str(), adopted, "attached XDP");
            }
            Ok(None) => {}
            Err(e) => {
                let e = format!("{e:#}");
                if self.xdp_errors.get(iface) != Some(&e) {
                    warn!(iface = %iface, "{e}");
                }
                self.xdp_errors.insert(iface.to_string(), e);
            }
        }
    }

    /// Where replies of source-NATed IPv4 flows come back to (`snat_source`).
    fn snat_address(&self, node_addrs: &[Ipv4Addr]) -> Option<Ipv4Addr> {
        let external = (self.cfg.external_ifaces.iter())
            .map(|i| interfaces::interface_addresses(i).unwrap_or_default());
        snat_source(&self.cfg.node_ips, external, node_addrs)
    }

    /// The same for IPv6 flows.
    fn snat_address6(&self, node_addrs: &[Ipv6Addr]) -> Option<Ipv6Addr> {
        let external = (self.cfg.external_ifaces.iter())
            .map(|i| interfaces::interface_addresses6(i).unwrap_or_default());
        snat_source(&self.cfg.node_ips6, external, node_addrs)
    }
}

/// How often the conntrack GC passes over the table.
const GC_PERIOD: Duration = Duration::from_secs(10);

pub async fn run(cfg: RunConfig) -> anyhow::Result<()> {
    let present = interfaces::interface_names()?;
    for iface in &cfg.external_ifaces {
        if !present.contains(iface) {
            anyhow::bail!("--external-iface {iface}: no such interface in this network namespace");
        }
    }
    // Wakes the loop; what changed is in `pending`.
    let (tx, mut changes) = mpsc::channel::<()>(1);
    let pending = SharedPending::default();
    let metrics = Arc::new(Metrics::default());
    let source = cfg
        .source
        .start(
            cfg.node.name.as_deref(),
            tx,
            pending.clone(),
            metrics.faults.clone(),
        )
        .await?;
    let node = cfg.node.name.as_deref();
    let source = crate::dns::attach(
        cfg.dns.as_ref(),
        source,
        &cfg.node_ips,
        node,
        &cfg.state_dir,
    )
    .await?;
    let mut dp = Dataplane::load(cfg.pin_dir.clone(), &cfg.sizes)?;
    dp.writer.set_balancing(cfg.balancing);
    (dp.writer)
        .set_cluster_cidrs(&mut dp.tables, &cfg.cluster_cidrs)
        .context("writing --cluster-cidr")?;
    dp.writer
        .set_flow_limits(&mut dp.tables, &cfg.flow_limits)
        .context("writing the SNAT port range and flood threshold to META")?;
    gc::spawn(
        cfg.pin_dir.clone(),
        cfg.lifetimes,
        GC_PERIOD,
        metrics.clone(),
    )?;
    if let Some(addr) = cfg.metrics_addr {
        metrics::serve(
            addr,
            metrics.clone(),
            metrics::HttpConfig {
                pin_dir: cfg.pin_dir.clone(),
                state_dir: cfg.state_dir.clone(),
                max_pending: cfg.max_pending,
                pending: pending.clone(),
            },
        )
        .await?;
    }
    // Until the initial lists are in, the maps keep what a previous agent
    // programmed (and the pinned links keep serving it).
    source.wait_until_synced().await?;
    let mut agent = Agent {
        cfg,
        dp,
        source,
        pending,
        planner: Incremental::default(),
        last_errors: vec![],
        last_failing: vec![],
        changes: ChangeTracker::default(),
        status_names: BTreeMap::new(),
        last_skipped: vec![],
        health: HealthServers::default(),
        metrics,
        xdp_egress: BTreeMap::new(),
        xdp_errors: BTreeMap::new(),
    };
    for gone in agent.dp.detach_other_xdp_modes(agent.cfg.xdp) {
        info!(link = %gone, "detached XDP of another mode");
    }
    // Program before attaching, so no packet meets an empty table.
    agent.sync(Sweep::Everything).await;
    // kube-proxy's connections are left to the kernel before the programs
    // see them, and once more after, for those opened in between.
    let ips = agent.cfg.node_ips.clone();
    takeover::take_over(&mut agent.dp.tables, &ips, monotonic_ns(), "before");
    agent.watch_interfaces();
    takeover::take_over(&mut agent.dp.tables, &ips, monotonic_ns(), "after");
    agent.attach_sock_hooks()?;
    // Asked for XDP and could not have it: say so and stop, rather than run
    // without the fast path unnoticed.
    if let Some((iface, e)) = agent.xdp_errors.iter().next() {
        anyhow::bail!("--xdp {}: {iface}: {e}", agent.cfg.xdp.as_str());
    }
    info!(
        pin_dir = %agent.cfg.pin_dir.display(),
        source = ?agent.cfg.source,
        attached = ?agent.dp.attached().collect::<Vec<_>>(),
        xdp = ?agent.dp.xdp_attached().collect::<Vec<_>>(),
        "agent running"
    );

    let links =
        interfaces::LinkEvents::subscribe().context("subscribing to rtnetlink link events")?;
    // Link events attach new pod interfaces at once; the slow tick is only a
    // safety net.
    let mut iface_tick = tokio::time::interval(Duration::from_secs(10));
    // The first full sync has just run: the next is one period away (an
    // interval's first tick would otherwise come at once and repeat it).
    let mut resync_tick = tokio::time::interval_at(
        tokio::time::Instant::now() + agent.cfg.resync,
        agent.cfg.resync,
    );
    let mut takeover_tick = tokio::time::interval(takeover::REFRESH_PERIOD);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            Some(()) = changes.recv() => {
                // No settling delay: a sync costs what the change touches,
                // and events that arrive meanwhile are handled together at
                // the next one.
                agent.sync(Sweep::Events).await;
            }
            r = links.changed() => {
                if let Err(e) = r {
                    warn!("rtnetlink: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                agent.watch_interfaces();
            }
            _ = iface_tick.tick() => agent.watch_interfaces(),
            _ = resync_tick.tick() => agent.sync(Sweep::Resync).await,
            _ = takeover_tick.tick() => takeover::renew(&mut agent.dp.tables, monotonic_ns()),
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
        }
    }
    info!("stopping; pinned maps and links keep serving until the next agent");
    Ok(())
}
