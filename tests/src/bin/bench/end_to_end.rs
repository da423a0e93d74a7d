//! End-to-end rates through namespaces: a client namespace opens short
//! connections (connect, one request and response, close) and kept-alive
//! connections to two backend pods, over every path in turn, interleaved in
//! short slices so that all paths share the machine's moments. Each path is a
//! setup function returning what keeps it alive (namespaces, servers, the
//! agent or the loaded rules) and the addresses to load: adding a path is
//! one entry in `paths()`.
//!
//! The machine has 2 CPUs shared by client, servers and forwarding, so the
//! client is 2 threads with one connection each, and the report compares
//! paths by ratio rather than by absolute rates.
use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use anyhow::{Context as _, bail};
use integration_tests::{
    agent::{Agent, ManifestDir},
    load::{self, Lane, Load, LoadResult, LoadServer, Mode},
    manifests,
    topology::Topology,
};

use crate::{
    BACKENDS_PER_SERVICE, backend_ip, bpf_stats,
    kube_proxy::{self, SvcPort},
    packet_cost::median,
    vip,
};

/// The measured Service's ClusterIP, outside the fillers' 10.96.0.0/16.
pub const MEASURED_VIP: Ipv4Addr = Ipv4Addr::new(10, 97, 0, 10);
pub const NODE_PORT: u16 = 30080;
const BACKEND_PODS: usize = 2;
/// Worker threads per backend server: at least the client connections.
const SERVER_WORKERS: usize = 8;
const CLIENT_THREADS: usize = 2;
/// Services per `nft -f` transaction (see `kube_proxy::nft_transactions`).
const NFT_SERVICES_PER_TX: usize = 1000;
/// Filler Services per manifest file (the agent refuses files over 16 MiB).
const SERVICES_PER_FILE: u32 = 1000;

pub const DIRECT: &str = "pod IP from a pod (no Service)";
pub const ROUTED: &str = "pod IP from outside, routed (no Service)";
pub const CLUSTER_IP: &str = "ClusterIP, this dataplane (tc)";
pub const NODE_PORT_TC: &str = "NodePort from outside, this dataplane (tc)";
pub const ROUTED_REMOTE: &str = "pod IP on another node from outside, routed (no Service)";
pub const NODE_PORT_REMOTE_TC: &str = "NodePort, backends on another node, tc";
pub const NODE_PORT_REMOTE_XDP: &str = "NodePort, backends on another node, XDP native";
pub const NODE_PORT_REMOTE_XDP_GENERIC: &str = "NodePort, backends on another node, XDP generic";
pub const IPTABLES: &str = "ClusterIP, kube-proxy iptables layout";
pub const NFTABLES: &str = "ClusterIP, kube-proxy nftables layout";

/// What a path's setup leaves running; dropping it stops the agent and the
/// servers and removes every namespace (with the rules loaded in them) and
/// the manifests. Field order is drop order.
pub struct Env {
    _agent: Option<Agent>,
    _servers: Vec<LoadServer>,
    topo: Topology,
    dir: ManifestDir,
}

impl Env {
    pub(crate) fn agent(&self) -> Option<&Agent> {
        self._agent.as_ref()
    }
}

pub struct Target {
    pub guard: Env,
    /// The client's network namespace (a /run/netns path).
    pub client_ns: String,
    /// Each client thread cycles through these.
    pub addrs: Vec<SocketAddrV4>,
    /// How long loading the Services took, where the path measures it.
    pub load_ms: Option<f64>,
}

/// Sets a path up with the given number of Services loaded.
pub type Setup = fn(u32) -> anyhow::Result<Target>;

pub struct PathSpec {
    pub name: &'static str,
    /// Services loaded in the dataplane under test (0: no Service involved).
    pub services: u32,
    pub setup: Setup,
}

/// Every path at `sizes` Services loaded; the no-Service baselines once.
pub fn paths(sizes: &[u32]) -> Vec<PathSpec> {
    let mut v = vec![
        PathSpec {
            name: DIRECT,
            services: 0,
            setup: direct,
        },
        PathSpec {
            name: ROUTED,
            services: 0,
            setup: routed,
        },
        PathSpec {
            name: ROUTED_REMOTE,
            services: 0,
            setup: routed_remote,
        },
    ];
    let per_size: [(&'static str, Setup); 7] = [
        (CLUSTER_IP, cluster_ip),
        (NODE_PORT_TC, |n| node_port(n, &[])),
        (NODE_PORT_REMOTE_TC, |n| node_port_remote(n, &[])),
        (NODE_PORT_REMOTE_XDP, |n| {
            node_port_remote(n, &["--xdp", "native"])
        }),
        (NODE_PORT_REMOTE_XDP_GENERIC, |n| {
            node_port_remote(n, &["--xdp", "generic"])
        }),
        (IPTABLES, iptables),
        (NFTABLES, nftables),
    ];
    for &n in sizes {
        for (name, setup) in per_size {
            v.push(PathSpec {
                name,
                services: n,
                setup,
            });
        }
    }
    v
}

/// One node, a `client` pod and `web-1`, `web-2` serving on 8080; with
/// `outside`, also a client host on the nodes' segment.
pub(crate) fn pods_env(outside: bool) -> anyhow::Result<Env> {
    let mut topo = Topology::new()?;
    topo.add_node()?;
    let c = topo.add_pod(0, "client")?;
    load::prepare_client(&topo.pods[c].ns)?;
    if outside {
        let k = topo.add_client()?;
        load::prepare_client(&topo.clients[k].ns)?;
    }
    let mut servers = vec![];
    for i in 1..=BACKEND_PODS {
        let k = topo.add_pod(0, &format!("web-{i}"))?;
        let p = &topo.pods[k];
        servers.push(LoadServer::start(&p.ns, p.ip, 8080, SERVER_WORKERS)?);
    }
    Ok(Env {
        _agent: None,
        _servers: servers,
        topo,
        dir: ManifestDir::new()?,
    })
}

/// Two nodes and a client host on their segment; `web-1`, `web-2` on
/// node-2, so that a NodePort on node-1 source-NATs every flow to node-2:
/// what the XDP fast path carries. The segment's veths behave like wires
/// (complete checksums, NAPI on the bridge ports) for every path alike.
fn remote_env() -> anyhow::Result<Env> {
    let mut topo = Topology::new()?;
    topo.add_node()?;
    topo.add_node()?;
    let k = topo.add_client()?;
    load::prepare_client(&topo.clients[k].ns)?;
    let mut servers = vec![];
    for i in 1..=BACKEND_PODS {
        let k = topo.add_pod(1, &format!("web-{i}"))?;
        let p = &topo.pods[k];
        servers.push(LoadServer::start(&p.ns, p.ip, 8080, SERVER_WORKERS)?);
    }
    topo.emulate_wires()?;
    Ok(Env {
        _agent: None,
        _servers: servers,
        topo,
        dir: ManifestDir::new()?,
    })
}

fn routed_remote(_: u32) -> anyhow::Result<Target> {
    let env = remote_env()?;
    let node = env.topo.nodes[0].ip.to_string();
    let client = &env.topo.clients[0];
    client
        .ns
        .ip(&["route", "add", "10.244.2.0/24", "via", &node])?;
    Ok(Target {
        client_ns: client.ns.path(),
        addrs: pod_addrs(&env),
        guard: env,
        load_ms: None,
    })
}

/// NodePort on node-1 from the outside host, backends on node-2.
fn node_port_remote(n: u32, flags: &[&str]) -> anyhow::Result<Target> {
    node_port_in(remote_env()?, n, flags)
}

pub(crate) fn pod_addrs(env: &Env) -> Vec<SocketAddrV4> {
    env.topo
        .pods
        .iter()
        .filter(|p| p.name.starts_with("web-"))
        .map(|p| SocketAddrV4::new(p.ip, 8080))
        .collect()
}

pub(crate) fn client_pod(env: &Env) -> String {
    env.topo.pod("client").ns.path()
}

fn direct(_: u32) -> anyhow::Result<Target> {
    let env = pods_env(false)?;
    Ok(Target {
        client_ns: client_pod(&env),
        addrs: pod_addrs(&env),
        guard: env,
        load_ms: None,
    })
}

fn routed(_: u32) -> anyhow::Result<Target> {
    let env = pods_env(true)?;
    let node = env.topo.nodes[0].ip.to_string();
    let client = &env.topo.clients[0];
    client
        .ns
        .ip(&["route", "add", "10.244.1.0/24", "via", &node])?;
    Ok(Target {
        client_ns: client.ns.path(),
        addrs: pod_addrs(&env),
        guard: env,
        load_ms: None,
    })
}

/// The real Service's endpoints and those of the fillers, for the
/// kube-proxy layouts.
fn measured(env: &Env) -> SvcPort {
    SvcPort {
        name: "default/web:http".into(),
        vip: MEASURED_VIP,
        port: 80,
        endpoints: pod_addrs(env).iter().map(|a| (*a.ip(), a.port())).collect(),
    }
}

/// Writes `fillers` filler Services with their EndpointSlices (10
/// endpoints that do not exist each), the measured Service `web` (with
/// `web_spec` lines) and the backend Pods, then starts the agent.
pub(crate) fn start_agent(
    env: &mut Env,
    fillers: u32,
    web_spec: &str,
    web_ports: &str,
    flags: &[&str],
) -> anyhow::Result<()> {
    let mut start = 0;
    while start < fillers {
        let end = (start + SERVICES_PER_FILE).min(fillers);
        let mut text = String::new();
        for i in start..end {
            let eps: Vec<String> = (0..BACKENDS_PER_SERVICE)
                .map(|k| format!("{{addresses: [{}]}}", backend_ip(i, k)))
                .collect();
            text.push_str(&format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: svc-{i}, namespace: bench}}\nspec: {{clusterIP: {}, ports: [{{name: http, port: 80, targetPort: 8080}}]}}\n---\n\
                 apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: svc-{i}-x, namespace: bench, labels: {{kubernetes.io/service-name: svc-{i}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080, protocol: TCP}}]\nendpoints: [{}]\n---\n",
                vip(i),
                eps.join(", ")
            ));
        }
        env.dir
            .write(&format!("fillers-{start}.yaml"), &text)
            .context("writing filler manifests")?;
        start = end;
    }
    env.dir.write(
        "web.yaml",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec:\n  clusterIP: {MEASURED_VIP}\n  selector: {{app: web}}\n{web_spec}  ports: [{web_ports}]\n"
        ),
    )?;
    let mut pods = String::new();
    for p in env.topo.pods.iter().filter(|p| p.name.starts_with("web-")) {
        let node = format!("node-{}", p.node + 1);
        pods.push_str(&manifests::pod(&p.name, "web", p.ip, true, &node));
        pods.push_str("---\n");
    }
    env.dir.write("pods.yaml", &pods)?;
    // No periodic full resync during the measurement: at 10,000 Services
    // it recompiles the whole plan, a CPU burst that would land in some
    // paths' windows and not others' (its cost is in the control-plane
    // section). Changes are still picked up from file events.
    let mut args = vec!["--node-name", "node-1", "--resync-seconds", "3600"];
    args.extend_from_slice(flags);
    let agent = Agent::start(&env.topo.nodes[0].ns, &env.dir.path, &args)?;
    let want = format!("{MEASURED_VIP}:80/TCP");
    agent.wait_list("the measured Service with both backends", |l| {
        l.lines()
            .find(|l| l.starts_with(&want))
            .is_some_and(|l| l.matches(":8080").count() == BACKEND_PODS)
    })?;
    env._agent = Some(agent);
    Ok(())
}

fn cluster_ip(n: u32) -> anyhow::Result<Target> {
    let mut env = pods_env(false)?;
    start_agent(
        &mut env,
        n.saturating_sub(1),
        "",
        "{name: http, port: 80, targetPort: 8080}",
        &[],
    )?;
    Ok(Target {
        client_ns: client_pod(&env),
        addrs: vec![SocketAddrV4::new(MEASURED_VIP, 80)],
        guard: env,
        load_ms: None,
    })
}

/// NodePort from the outside client through the node's external interface;
/// `flags` go to the agent (e.g. an XDP mode).
pub fn node_port(n: u32, flags: &[&str]) -> anyhow::Result<Target> {
    node_port_in(pods_env(true)?, n, flags)
}

/// The agent on node-1 of `env` with the NodePort Service and `n - 1`
/// fillers; the outside host loads node-1's NodePort.
fn node_port_in(mut env: Env, n: u32, flags: &[&str]) -> anyhow::Result<Target> {
    start_agent(
        &mut env,
        n.saturating_sub(1),
        "  type: NodePort\n",
        &format!("{{name: http, port: 80, targetPort: 8080, nodePort: {NODE_PORT}}}"),
        flags,
    )?;
    Ok(Target {
        client_ns: env.topo.clients[0].ns.path(),
        addrs: vec![SocketAddrV4::new(env.topo.nodes[0].ip, NODE_PORT)],
        guard: env,
        load_ms: None,
    })
}

fn iptables(n: u32) -> anyhow::Result<Target> {
    let env = pods_env(false)?;
    let svcs = kube_proxy::services(n.saturating_sub(1), Some(&measured(&env)));
    let ms = kube_proxy::load_iptables(&env.topo.nodes[0].ns, &svcs)?;
    Ok(Target {
        client_ns: client_pod(&env),
        addrs: vec![SocketAddrV4::new(MEASURED_VIP, 80)],
        guard: env,
        load_ms: Some(ms),
    })
}

fn nftables(n: u32) -> anyhow::Result<Target> {
    let env = pods_env(false)?;
    let svcs = kube_proxy::services(n.saturating_sub(1), Some(&measured(&env)));
    let ms = kube_proxy::load_nft(&env.topo.nodes[0].ns, &svcs, NFT_SERVICES_PER_TX)?;
    Ok(Target {
        client_ns: client_pod(&env),
        addrs: vec![SocketAddrV4::new(MEASURED_VIP, 80)],
        guard: env,
        load_ms: Some(ms),
    })
}

/// One path's numbers: rates are medians over rounds, latencies pooled.
pub struct PathResult {
    pub name: &'static str,
    pub services: u32,
    pub short_rate: f64,
    pub short: LoadResult,
    pub kept_rate: f64,
    pub kept: LoadResult,
    /// Each round's rates, in round order (see `paired_ratio`).
    pub short_rounds: Vec<f64>,
    pub kept_rounds: Vec<f64>,
    pub load_ms: Option<f64>,
    /// Why the path could not be measured.
    pub error: Option<String>,
    /// The agent's attached programs during the rounds, when statistics
    /// were on: name, runs, mean ns per run (see `bpf_stats`).
    pub programs: Vec<bpf_stats::Row>,
}

/// Rounds of one mode on one path.
#[derive(Default)]
pub(crate) struct Pooled {
    /// Each round's rate, in round order: rounds of different paths run in
    /// the same window, so ratios can be paired by round.
    pub(crate) rates: Vec<f64>,
    all: LoadResult,
}

impl Pooled {
    pub(crate) fn add(&mut self, r: LoadResult) {
        self.rates.push(r.rate());
        self.all.ok += r.ok;
        self.all.errors += r.errors;
        self.all.elapsed += r.elapsed;
        self.all.first_error = self.all.first_error.take().or(r.first_error);
        self.all.latencies_us.extend(r.latencies_us);
    }

    /// The median rate over rounds, the pooled results, and the rates by round.
    pub(crate) fn finish(mut self) -> (f64, LoadResult, Vec<f64>) {
        self.all.latencies_us.sort_by(|a, b| a.total_cmp(b));
        (median(self.rates.clone()), self.all, self.rates)
    }
}

/// The median over rounds of `a`'s rate over `b`'s in the same round
/// (None when either has no rounds).
pub(crate) fn paired_ratio(a: &[f64], b: &[f64]) -> Option<f64> {
    let per_round: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
    (!per_round.is_empty()).then(|| median(per_round))
}

/// How long each path runs before the next takes over, within a round.
pub(crate) const SLICE: Duration = Duration::from_millis(50);

/// Sets up every path in `specs` (they coexist: each lives in namespaces of
/// its own), checks that one request gets through each, then runs `rounds`
/// rounds, each one `limit` a path of short connections then of kept-alive
/// requests, all paths interleaved in slices of `SLICE`
/// (`load::run_interleaved`), and one more round with BPF_ENABLE_STATS on
/// for the programs' own time, whose rates are not counted: the statistics
/// add two clock reads to every program run, which a node does not pay and
/// the no-program baselines would not either. A path that cannot be set up
/// is reported with its error and the others go on.
pub fn measure_all(specs: &[PathSpec], rounds: u32, limit: Duration) -> Vec<PathResult> {
    let mut live: Vec<(usize, Target, Pooled, Pooled, Vec<u32>)> = vec![];
    let mut times: Vec<BTreeMap<String, bpf_stats::Sample>> = vec![BTreeMap::new(); specs.len()];
    let mut errors: Vec<Option<String>> = vec![None; specs.len()];
    for (i, spec) in specs.iter().enumerate() {
        eprintln!("  setting up {} at {} Services", spec.name, spec.services);
        match set_up(spec) {
            Ok(t) => {
                // The programs the agent attached (none on the baselines).
                let ids = t
                    .guard
                    ._agent
                    .as_ref()
                    .map(|a| bpf_stats::attached_programs(&a.pin_dir))
                    .unwrap_or_default();
                live.push((i, t, Pooled::default(), Pooled::default(), ids))
            }
            Err(e) => {
                eprintln!("    failed: {e:#}");
                errors[i] = Some(format!("{e:#}"));
            }
        }
    }
    for round in 0..=rounds {
        let timing = round == rounds;
        let _stats = if timing {
            eprintln!("  one more round, for the programs' time");
            match bpf_stats::enable() {
                Ok(on) => Some(on),
                Err(e) => {
                    eprintln!("  no program statistics: {e:#}");
                    break;
                }
            }
        } else {
            eprintln!("  round {} of {rounds}", round + 1);
            None
        };
        for mode in [Mode::ShortConnections, Mode::KeptAlive] {
            let lanes: Vec<Lane> = live
                .iter()
                .map(|(_, t, ..)| Lane {
                    client_ns: &t.client_ns,
                    targets: &t.addrs,
                })
                .collect();
            let load = Load {
                mode,
                threads: CLIENT_THREADS,
                warmup: Duration::from_millis(200),
                limit,
                // A bound on count as well as time, far above what 2
                // CPUs do in `limit`: time is what ends a round.
                max_ops: 2_000_000,
            };
            let before: Option<Vec<_>> =
                timing.then(|| live.iter().map(|l| bpf_stats::sample(&l.4)).collect());
            let run = load::run_interleaved(&lanes, load, SLICE);
            if let Some(before) = before {
                for ((i, .., ids), before) in live.iter().zip(&before) {
                    bpf_stats::accumulate(&mut times[*i], before, &bpf_stats::sample(ids));
                }
            }
            match run {
                Ok(rs) if !timing => {
                    for ((_, _, short, kept, _), r) in live.iter_mut().zip(rs) {
                        match mode {
                            Mode::ShortConnections => short.add(r),
                            Mode::KeptAlive => kept.add(r),
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    for (i, ..) in &live {
                        errors[*i].get_or_insert_with(|| format!("{e:#}"));
                    }
                }
            }
        }
    }
    let mut results: Vec<PathResult> = specs
        .iter()
        .zip(&errors)
        .map(|(spec, e)| PathResult {
            name: spec.name,
            services: spec.services,
            short_rate: f64::NAN,
            short: LoadResult::default(),
            short_rounds: vec![],
            kept_rate: f64::NAN,
            kept: LoadResult::default(),
            kept_rounds: vec![],
            load_ms: None,
            error: e.clone(),
            programs: vec![],
        })
        .collect();
    for (i, target, short, kept, _) in live {
        let r = &mut results[i];
        (r.short_rate, r.short, r.short_rounds) = short.finish();
        (r.kept_rate, r.kept, r.kept_rounds) = kept.finish();
        r.load_ms = target.load_ms;
        r.programs = bpf_stats::rows(&times[i]);
        // Everything the path set up goes now.
        drop(target.guard);
    }
    results
}

/// One short connection from `ns` to `addrs`: whether a path answers at all.
pub(crate) fn one_request(ns: &str, addrs: &[SocketAddrV4]) -> anyhow::Result<LoadResult> {
    load::run(
        ns,
        addrs,
        Load {
            mode: Mode::ShortConnections,
            threads: 1,
            warmup: Duration::ZERO,
            limit: Duration::from_secs(3),
            max_ops: 1,
        },
    )
}

/// Runs the path's setup and one request through it.
fn set_up(spec: &PathSpec) -> anyhow::Result<Target> {
    let target = (spec.setup)(spec.services)?;
    let probe = one_request(&target.client_ns, &target.addrs)?;
    if probe.ok != 1 {
        bail!(
            "no answer through the path: {}",
            probe.first_error.unwrap_or_default()
        );
    }
    Ok(target)
}
