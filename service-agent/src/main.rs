//! service-agent: programs the eBPF Service dataplane from Kubernetes
//! manifests and shows what is programmed.
use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::Context as _;
use clap::Parser as _;
use service_agent::dataplane::maps::Maps as _;
use service_agent::{
    agent::{self, RunConfig, SourceConfig},
    cli::*,
    dataplane::{
        MapSizes,
        cgroup::{self, CgroupTarget},
        pins,
        tables::Tables,
    },
    dns,
    plan::NodeContext,
    report, status,
};
use service_common::*;

fn open(pins: &PinArgs) -> anyhow::Result<Tables> {
    Tables::open_pinned(&pins.pin_dir).with_context(|| {
        format!(
            "opening the maps pinned in {} (is the agent running with this --pin-dir?)",
            pins.pin_dir.display()
        )
    })
}

/// With the API source, every thread allocates from glibc's one main
/// arena. By default each thread that allocates gets an arena of its own,
/// and what one frees the others cannot reuse: the watchers deserialize
/// list pages on whichever worker thread polls them, the first sync
/// compiles on the main thread, and at 10,000 Services the arenas held
/// 76 MiB for a live heap of about 25. With one arena the peak is 62 MiB.
/// The manifest source parses files on every CPU at once, where arenas
/// pay for themselves (one arena made its start twice as slow), so it
/// keeps glibc's default. A `MALLOC_ARENA_MAX` or `GLIBC_TUNABLES` in the
/// environment is the operator's choice and wins.
fn one_malloc_arena() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some()
        || std::env::var_os("GLIBC_TUNABLES").is_some()
    {
        return;
    }
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt sets an allocator parameter; no other thread exists yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run(_)) {
        // The inspection commands print to pipes (`stats | head -3`): a
        // closed pipe ends them quietly, as it does any Unix filter, instead
        // of println! panicking on EPIPE. Rust ignores SIGPIPE by default.
        // SAFETY: restores the default disposition before any thread exists.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Run(args) => {
            let dns = args.dns_config().map_err(anyhow::Error::msg)?;
            let RunArgs {
                source,
                manifests,
                kubeconfig,
                api_server,
                metrics_addr,
                healthz_max_pending_seconds,
                pins,
                external_ifaces,
                xdp,
                pod_ifaces,
                node_name,
                node_zone,
                node_ips,
                external_ip_allow,
                service_cidrs,
                cluster_cidrs,
                resync_seconds,
                frontends_max,
                services_max,
                backends_max,
                conntrack_max,
                affinity_max,
                lb_algorithm,
                maglev_table_size,
                maglev_max,
                cgroup,
                socket_lb,
                lifetimes,
                flow_limits,
                ..
            } = *args;
            let (node_ips, node_ips6) = split_node_ips(&node_ips);
            let source = match source {
                SourceKind::Manifests => SourceConfig::Manifests(
                    manifests.context("--manifests is required with --source manifests")?,
                ),
                SourceKind::Kube => SourceConfig::Kube {
                    kubeconfig,
                    api_server: api_server
                        .filter(|s| !s.is_empty())
                        .map(|s| {
                            s.parse::<http::Uri>()
                                .with_context(|| format!("--api-server {s}: not a URL"))
                        })
                        .transpose()?,
                },
            };
            let cfg = RunConfig {
                source,
                metrics_addr: metrics_addr.0,
                max_pending: Duration::from_secs(healthz_max_pending_seconds),
                xdp: xdp.into(),
                state_dir: pins.state_dir(),
                pin_dir: pins.pin_dir,
                external_ifaces,
                pod_iface_globs: pod_ifaces,
                node: NodeContext {
                    name: node_name,
                    external_ip_allow,
                    service_cidrs,
                    zone: node_zone,
                },
                node_ips,
                node_ips6,
                cluster_cidrs,
                sizes: MapSizes {
                    frontends: frontends_max,
                    services: services_max,
                    backends: backends_max,
                    conntrack: conntrack_max,
                    affinity: affinity_max,
                    maglev: maglev_max,
                },
                balancing: lb_algorithm.balancing(maglev_table_size),
                resync: Duration::from_secs(resync_seconds.max(1)),
                cgroup: CgroupTarget::from_flag(cgroup.as_deref())?,
                socket_lb,
                lifetimes: lifetimes.lifetimes(),
                flow_limits: flow_limits.limits(),
                dns,
            };
            if matches!(cfg.source, SourceConfig::Kube { .. }) {
                one_malloc_arena();
            }
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(agent::run(cfg))
        }
        Command::List { pins, output } => {
            let t = open(&pins)?;
            let st = status::read(&pins.state_dir());
            let fes = report::programmed(&t, st.as_ref())?;
            let fill = report::fill(&t, &pins.pin_dir);
            match output {
                Output::Text => print!(
                    "{}{}{}",
                    report::render_list(&fes, st.as_ref()),
                    report::render_fill(&fill),
                    cgroup::render(&pins.pin_dir)
                ),
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "frontends": fes,
                        "skipped": st.as_ref().map(|s| &s.skipped),
                        "problems": st.as_ref().map(|s| &s.problems),
                        "socket_hooks": cgroup::pinned_hooks(&pins.pin_dir),
                        "maps": fill
                            .iter()
                            .map(|(n, e, c)| serde_json::json!({"map": n, "entries": e, "capacity": c}))
                            .collect::<Vec<_>>(),
                    }))?
                ),
            }
            Ok(())
        }
        Command::Stats { pins, output } => {
            let t = open(&pins)?;
            let st = status::read(&pins.state_dir());
            let fes = report::programmed(&t, st.as_ref())?;
            let (per, reasons) = report::counters(&t, &fes)?;
            match output {
                Output::Text => {
                    println!(
                        "{:<28} {:>12} {:>14} {:>10} {:>9}",
                        "FRONTEND", "PACKETS", "BYTES", "NEW_FLOWS", "REJECTED"
                    );
                    for (f, s) in &per {
                        println!(
                            "{f:<28} {:>12} {:>14} {:>10} {:>9}",
                            s.packets, s.bytes, s.new_flows, s.rejected
                        );
                    }
                    println!();
                    println!("{:<24} {:>12}  VERDICT", "REASON", "COUNT");
                    for (r, n) in &reasons {
                        println!("{:<24} {n:>12}  {}", r.name(), r.verdict().name());
                    }
                    if let Some(d) = dns::counters::read_snapshot(&pins.state_dir()) {
                        print!("\n{}", dns::counters::render(&d));
                    }
                }
                Output::Json => {
                    let per: Vec<_> = per
                        .iter()
                        .map(|(f, s)| serde_json::json!({"frontend": f, "packets": s.packets, "bytes": s.bytes, "new_flows": s.new_flows, "rejected": s.rejected}))
                        .collect();
                    let reasons: serde_json::Map<String, serde_json::Value> = reasons
                        .iter()
                        .map(|(r, n)| (r.name().to_string(), (*n).into()))
                        .collect();
                    println!(
                        "{}",
                        serde_json::to_string_pretty(
                            &serde_json::json!({"frontends": per, "reasons": reasons, "dns": dns::counters::read_snapshot(&pins.state_dir())})
                        )?
                    );
                }
            }
            Ok(())
        }
        Command::Dump { pins, map } => {
            let t = open(&pins)?;
            dump(&t, &map)
        }
        Command::Cleanup { pins } => {
            pins::remove_pins(&pins.pin_dir)
                .with_context(|| format!("removing pins in {}", pins.pin_dir.display()))?;
            let sd = pins.state_dir();
            if sd.exists() {
                std::fs::remove_dir_all(&sd)?;
            }
            println!("removed {} and {}", pins.pin_dir.display(), sd.display());
            Ok(())
        }
    }
}

/// An address of either family in map order, as people read it.
fn addr<A>(a: A) -> IpAddr
where
    IpAddr: From<A>,
{
    IpAddr::from(a)
}

fn dump_services<A: Copy>(
    m: &aya::maps::HashMap<aya::maps::MapData, ServiceKeyOf<A>, ServiceValue>,
) -> anyhow::Result<()>
where
    ServiceKeyOf<A>: aya::Pod,
    IpAddr: From<A>,
{
    for e in m.iter() {
        let (k, v) = e?;
        println!(
            "{} proto {} scope {} slot {} => backend_id {} count {} flags {:#x} svc_id {} affinity_timeout_s {}",
            SocketAddr::new(addr(k.addr), k.port),
            k.proto,
            k.scope,
            k.slot,
            v.backend_id,
            v.count,
            v.flags,
            v.svc_id,
            v.affinity_timeout_s
        );
    }
    Ok(())
}

fn dump_backends<A: Copy>(
    m: &aya::maps::HashMap<aya::maps::MapData, u32, BackendOf<A>>,
) -> anyhow::Result<()>
where
    BackendOf<A>: aya::Pod,
    IpAddr: From<A>,
{
    for e in m.iter() {
        let (id, b) = e?;
        println!(
            "{id} => {} proto {} flags {:#x}",
            SocketAddr::new(addr(b.addr), b.port),
            b.proto,
            b.flags
        );
    }
    Ok(())
}

fn dump_conntrack<A: Copy>(
    m: &aya::maps::HashMap<aya::maps::MapData, CtKeyOf<A>, CtValueOf<A>>,
) -> anyhow::Result<()>
where
    CtKeyOf<A>: aya::Pod,
    CtValueOf<A>: aya::Pod,
    IpAddr: From<A>,
{
    for e in m.iter() {
        let (k, v) = e?;
        println!(
            "{} -> {} proto {} => {} -> {} backend {} svc {} flags {:#x} last_seen_ns {}",
            SocketAddr::new(addr(k.saddr), k.sport),
            SocketAddr::new(addr(k.daddr), k.dport),
            k.proto,
            SocketAddr::new(addr(v.nat_saddr), v.nat_sport),
            SocketAddr::new(addr(v.nat_daddr), v.nat_dport),
            v.backend_id,
            v.svc_id,
            v.flags,
            v.last_seen_ns
        );
    }
    Ok(())
}

fn dump_affinity<A: Copy>(
    m: &aya::maps::HashMap<aya::maps::MapData, AffinityKeyOf<A>, AffinityValue>,
) -> anyhow::Result<()>
where
    AffinityKeyOf<A>: aya::Pod,
    IpAddr: From<A>,
{
    for e in m.iter() {
        let (k, v) = e?;
        println!(
            "{} svc {} => backend {} last_used_ns {}",
            addr(k.client),
            k.svc_id,
            v.backend_id,
            v.last_used_ns
        );
    }
    Ok(())
}

fn dump(t: &Tables, map: &str) -> anyhow::Result<()> {
    match map.to_ascii_uppercase().as_str() {
        MAP_SERVICES => dump_services(&t.services)?,
        MAP_SERVICES6 => dump_services(&t.services6)?,
        MAP_BACKENDS => dump_backends(&t.backends)?,
        MAP_BACKENDS6 => dump_backends(&t.backends6)?,
        MAP_CONNTRACK => dump_conntrack(&t.conntrack)?,
        MAP_CONNTRACK6 => dump_conntrack(&t.conntrack6)?,
        MAP_AFFINITY => dump_affinity(&t.affinity)?,
        MAP_AFFINITY6 => dump_affinity(&t.affinity6)?,
        MAP_NODE_ADDRS => {
            for e in t.node_addrs.keys() {
                println!("{}", addr(e?));
            }
        }
        MAP_NODE_ADDRS6 => {
            for e in t.node_addrs6.keys() {
                println!("{}", addr(e?));
            }
        }
        MAP_MAGLEV => {
            // A table's entries summed per backend: 16,381 numbers say less.
            for (svc_id, st) in t.maglev_tables()? {
                let table = t.maglev.get(&svc_id, 0)?;
                let shares: Vec<String> = st
                    .ids
                    .iter()
                    .map(|id| {
                        let n = table.backends[..st.size as usize]
                            .iter()
                            .filter(|b| *b == id)
                            .count();
                        format!("backend {id} x {n}")
                    })
                    .collect();
                println!("svc {svc_id} size {} => {}", st.size, shares.join(", "));
            }
        }
        other => anyhow::bail!(
            "unknown map {other}: one of SERVICES, BACKENDS, CONNTRACK, AFFINITY, NODE_ADDRS \
             (each also with 6 for IPv6), MAGLEV"
        ),
    }
    Ok(())
}
