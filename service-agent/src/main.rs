//! service-agent: programs the eBPF Service dataplane from Kubernetes
//! manifests and shows what is programmed.
use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use service_agent::{
    agent::{self, RunConfig, SourceConfig},
    dataplane::{MapSizes, pins, tables::Tables},
    plan::{NodeContext, ipnet_lite::Ipv4Net},
    report, status,
};
use service_common::*;

const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/service-agent";

#[derive(Parser)]
#[command(
    name = "service-agent",
    version,
    about = "eBPF Kubernetes Service dataplane (kube-proxy replacement)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Clone)]
struct PinArgs {
    /// bpffs directory holding the pinned maps.
    #[arg(long, default_value = DEFAULT_PIN_DIR, env = "SERVICE_AGENT_PIN_DIR")]
    pin_dir: PathBuf,
    /// Directory of the agent's status file (default: derived from --pin-dir under /run/service-agent).
    #[arg(long)]
    state_dir: Option<PathBuf>,
}

impl PinArgs {
    fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| status::default_state_dir(&self.pin_dir))
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum SourceKind {
    /// Kubernetes YAML files in --manifests (no cluster needed).
    Manifests,
    /// The Kubernetes API server (--kubeconfig or in-cluster).
    Kube,
}

#[derive(Clone, Copy)]
struct Listen(Option<std::net::SocketAddr>);

fn parse_listen(s: &str) -> Result<Listen, String> {
    if s == "off" {
        return Ok(Listen(None));
    }
    s.parse()
        .map(|a| Listen(Some(a)))
        .map_err(|e| format!("{s}: {e}"))
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Where Services and endpoints come from: a manifest directory, or the API server.
    #[arg(long, value_enum, default_value = "manifests")]
    source: SourceKind,
    /// Directory of Kubernetes YAML manifests (Service, Pod, EndpointSlice,
    /// Endpoints), for --source manifests.
    #[arg(long, required_if_eq("source", "manifests"))]
    manifests: Option<PathBuf>,
    /// kubeconfig for --source kube; without it the in-cluster service account is used.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Serve /metrics, /healthz and /readyz here ("off" to disable).
    #[arg(long, default_value = "127.0.0.1:10249", value_parser = parse_listen)]
    metrics_addr: Listen,
    /// /healthz turns 503 when a change has waited this long to be programmed.
    #[arg(long, default_value_t = 60)]
    healthz_max_pending_seconds: u64,
    #[command(flatten)]
    pins: PinArgs,
    /// The node's external interface(s): NodePort, LoadBalancer and externalIP
    /// traffic arrives here, and replies of backends on other nodes.
    #[arg(long = "external-iface")]
    external_ifaces: Vec<String>,
    /// Glob of the host-side pod interfaces (e.g. 'veth*', 'lxc*'); interfaces
    /// that appear later are attached too.
    #[arg(long = "pod-iface")]
    pod_ifaces: Vec<String>,
    /// This node's name, for internalTrafficPolicy / externalTrafficPolicy Local.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// This node's zone (its topology.kubernetes.io/zone label), for topology hints.
    #[arg(long)]
    node_zone: Option<String>,
    /// Addresses NodePorts answer on (default: every non-loopback IPv4 address here).
    #[arg(long = "node-ip")]
    node_ips: Vec<Ipv4Addr>,
    /// Only externalIPs inside these CIDRs are programmed (CVE-2020-8554);
    /// without it every externalIP is.
    #[arg(long = "external-ip-allow", value_parser = parse_net)]
    external_ip_allow: Vec<Ipv4Net>,
    /// Full resync period in seconds, besides file change events.
    #[arg(long, default_value_t = 30)]
    resync_seconds: u64,
    /// Capacity of the SERVICES map (frontends × (backends + 1)).
    #[arg(long, default_value_t = DEFAULT_SERVICES_MAX)]
    services_max: u32,
    /// Capacity of the BACKENDS map.
    #[arg(long, default_value_t = DEFAULT_BACKENDS_MAX)]
    backends_max: u32,
    /// Capacity of the CONNTRACK map (two entries a flow; LRU).
    #[arg(long, default_value_t = DEFAULT_CONNTRACK_MAX)]
    conntrack_max: u32,
    /// Capacity of the AFFINITY map (LRU).
    #[arg(long, default_value_t = DEFAULT_AFFINITY_MAX)]
    affinity_max: u32,
}

#[derive(Subcommand)]
enum Command {
    /// Load the programs, attach them, and keep the maps in sync with the source.
    Run(Box<RunArgs>),
    /// Print the programmed frontends and their backends, read from the pinned maps.
    List {
        #[command(flatten)]
        pins: PinArgs,
        #[arg(short, long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Print per-frontend packet counters and per-reason counters.
    Stats {
        #[command(flatten)]
        pins: PinArgs,
        #[arg(short, long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Print the raw entries of one pinned map (as `bpftool map dump` would, decoded).
    Dump {
        #[command(flatten)]
        pins: PinArgs,
        /// One of SERVICES, BACKENDS, CONNTRACK, AFFINITY, NODE_ADDRS.
        map: String,
    },
    /// Remove every pin and the status file this agent made (run after stopping it).
    Cleanup {
        #[command(flatten)]
        pins: PinArgs,
    },
}

fn parse_net(s: &str) -> Result<Ipv4Net, String> {
    s.parse()
}

fn open(pins: &PinArgs) -> anyhow::Result<Tables> {
    Tables::open_pinned(&pins.pin_dir).with_context(|| {
        format!(
            "opening the maps pinned in {} (is the agent running with this --pin-dir?)",
            pins.pin_dir.display()
        )
    })
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Run(args) => {
            let RunArgs {
                source,
                manifests,
                kubeconfig,
                metrics_addr,
                healthz_max_pending_seconds,
                pins,
                external_ifaces,
                pod_ifaces,
                node_name,
                node_zone,
                node_ips,
                external_ip_allow,
                resync_seconds,
                services_max,
                backends_max,
                conntrack_max,
                affinity_max,
            } = *args;
            let source = match source {
                SourceKind::Manifests => SourceConfig::Manifests(
                    manifests.context("--manifests is required with --source manifests")?,
                ),
                SourceKind::Kube => SourceConfig::Kube { kubeconfig },
            };
            let cfg = RunConfig {
                source,
                metrics_addr: metrics_addr.0,
                max_pending: Duration::from_secs(healthz_max_pending_seconds),
                state_dir: pins.state_dir(),
                pin_dir: pins.pin_dir,
                external_ifaces,
                pod_iface_globs: pod_ifaces,
                node: NodeContext {
                    name: node_name,
                    external_ip_allow: (!external_ip_allow.is_empty()).then_some(external_ip_allow),
                    zone: node_zone,
                },
                node_ips,
                sizes: MapSizes {
                    services: services_max,
                    backends: backends_max,
                    conntrack: conntrack_max,
                    affinity: affinity_max,
                },
                resync: Duration::from_secs(resync_seconds.max(1)),
            };
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
            match output {
                Output::Text => print!("{}", report::render_list(&fes, st.as_ref())),
                Output::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "frontends": fes,
                        "skipped": st.as_ref().map(|s| &s.skipped),
                        "problems": st.as_ref().map(|s| &s.problems),
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
                        let verdict = if r.is_drop() {
                            "dropped"
                        } else {
                            "passed/answered"
                        };
                        println!("{:<24} {n:>12}  {verdict}", r.name());
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
                            &serde_json::json!({"frontends": per, "reasons": reasons})
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

fn ip(a: [u8; 4]) -> Ipv4Addr {
    Ipv4Addr::from(a)
}

fn dump(t: &Tables, map: &str) -> anyhow::Result<()> {
    match map.to_ascii_uppercase().as_str() {
        MAP_SERVICES => {
            for e in t.services.iter() {
                let (k, v) = e?;
                println!(
                    "{}:{} proto {} scope {} slot {} => backend_id {} count {} flags {:#x} svc_id {} affinity_timeout_s {}",
                    ip(k.addr),
                    k.port,
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
        }
        MAP_BACKENDS => {
            for e in t.backends.iter() {
                let (id, b) = e?;
                println!(
                    "{id} => {}:{} proto {} flags {:#x}",
                    ip(b.addr),
                    b.port,
                    b.proto,
                    b.flags
                );
            }
        }
        MAP_CONNTRACK => {
            for e in t.conntrack.iter() {
                let (k, v) = e?;
                println!(
                    "{}:{} -> {}:{} proto {} => {}:{} -> {}:{} backend {} svc {} flags {:#x} last_seen_ns {}",
                    ip(k.saddr),
                    k.sport,
                    ip(k.daddr),
                    k.dport,
                    k.proto,
                    ip(v.nat_saddr),
                    v.nat_sport,
                    ip(v.nat_daddr),
                    v.nat_dport,
                    v.backend_id,
                    v.svc_id,
                    v.flags,
                    v.last_seen_ns
                );
            }
        }
        MAP_AFFINITY => {
            for e in t.affinity.iter() {
                let (k, v) = e?;
                println!(
                    "{} svc {} => backend {} last_used_ns {}",
                    ip(k.client),
                    k.svc_id,
                    v.backend_id,
                    v.last_used_ns
                );
            }
        }
        MAP_NODE_ADDRS => {
            for e in t.node_addrs.keys() {
                println!("{}", ip(e?));
            }
        }
        other => anyhow::bail!(
            "unknown map {other}: one of SERVICES, BACKENDS, CONNTRACK, AFFINITY, NODE_ADDRS"
        ),
    }
    Ok(())
}
