//! `cargo xtask bench`: numbers measured side by side in one run on this
//! machine, written to bench/results/<date>.md. No timed assertions live in
//! the tests; the targets are judged here, as ratios where the machine's
//! noise cancels out.

mod bare_xdp;
mod bpf_stats;
mod control_plane;
mod dns;
mod edge_cost;
mod end_to_end;
mod kube_proxy;
mod packet_cost;
mod packet_rate;
mod plots;
mod scale;
mod socket_lb;

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    process::Command,
    time::Duration,
};

use integration_tests::bpf;
pub use integration_tests::bpf::Loaded;
use service_agent::{
    dataplane::MapSizes,
    plan::{FrontendKey, FrontendKind, Plan, Protocol},
};

use crate::{
    control_plane::control_plane,
    end_to_end::{PathResult, measure_all, paths},
    packet_cost::{HOT_FRONTENDS, PacketCost, packet_costs},
};

pub const BACKENDS_PER_SERVICE: u32 = 10;

pub fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i)
}

pub fn backend_ip(i: u32, k: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i * BACKENDS_PER_SERVICE + k)
}

/// The IPv6 ClusterIP of bench Service `i` (ULA, as the tests' fd00:96::/64).
pub fn vip6(i: u32) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0)) + i as u128)
}

pub fn backend_ip6(i: u32, k: u32) -> Ipv6Addr {
    Ipv6Addr::from(
        u128::from(Ipv6Addr::new(0xfd00, 0x10, 0x128, 0, 0, 0, 0, 0))
            + (i * BACKENDS_PER_SERVICE + k) as u128,
    )
}

pub fn load(services: u32) -> Loaded {
    load_families(services, 1)
}

/// `load` with room for `families` frontends per Service: svc_ids and
/// backend ids are one space over both families, so a dual-stack Service
/// takes two of each per port.
pub fn load_families(services: u32, families: u32) -> Loaded {
    let sizes = MapSizes {
        frontends: services * families + 1024,
        services: services * (BACKENDS_PER_SERVICE + 1) + 1024,
        backends: services * BACKENDS_PER_SERVICE * families + 1024,
        conntrack: 1 << 20,
        affinity: 1024,
        maglev: 1024,
    };
    Loaded::new("bench", &sizes).expect("load the programs")
}

/// `services` ClusterIP Services of 10 backends, IPv4 only.
pub fn plan_of(services: u32) -> Plan {
    let mut plan = Plan::default();
    add_family(&mut plan, services, Family::V4);
    plan
}

/// `services` ClusterIP Services of 10 backends, IPv6 only.
pub fn plan6_of(services: u32) -> Plan {
    let mut plan = Plan::default();
    add_family(&mut plan, services, Family::V6);
    plan
}

/// The same Services made dual-stack: each also has an IPv6 ClusterIP
/// (`vip6`) with 10 IPv6 backends, as from its `addressType: IPv6` slice.
pub fn dual_stack_plan_of(services: u32) -> Plan {
    let mut plan = plan_of(services);
    add_family(&mut plan, services, Family::V6);
    plan
}

/// Which of the bench's address plans a Service's frontend and backends use.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// The ClusterIP of bench Service `i`.
    pub fn vip(self, i: u32) -> IpAddr {
        match self {
            Family::V4 => vip(i).into(),
            Family::V6 => vip6(i).into(),
        }
    }

    /// Backend `k` of bench Service `i`.
    pub fn backend(self, i: u32, k: u32) -> IpAddr {
        match self {
            Family::V4 => backend_ip(i, k).into(),
            Family::V6 => backend_ip6(i, k).into(),
        }
    }
}

fn add_family(plan: &mut Plan, services: u32, family: Family) {
    for i in 0..services {
        plan.frontends.insert(
            FrontendKey {
                addr: family.vip(i),
                port: 80,
                proto: Protocol::Tcp,
            },
            bpf::frontend(
                &format!("bench/svc-{i}"),
                FrontendKind::ClusterIp,
                (0..BACKENDS_PER_SERVICE)
                    .map(|k| bpf::backend(family.backend(i, k), 8080, true))
                    .collect(),
            ),
        );
    }
}

pub fn verdict(ok: bool) -> &'static str {
    if ok { "pass" } else { "FAIL" }
}

fn shell_line(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Which parts to run: all, or those named with `--only a,b` (for working
/// on one part; nothing is written to bench/results then).
struct Parts(Option<Vec<String>>);

impl Parts {
    fn from_args() -> Self {
        let args: Vec<String> = std::env::args().collect();
        Self(
            args.iter()
                .position(|a| a == "--only")
                .and_then(|i| args.get(i + 1))
                .map(|v| v.split(',').map(str::to_string).collect()),
        )
    }

    fn run(&self, part: &str) -> bool {
        self.0.as_ref().is_none_or(|p| p.iter().any(|x| x == part))
    }
}

fn main() -> anyhow::Result<()> {
    let quick = std::env::args().any(|a| a == "--quick");
    let parts = Parts::from_args();
    let args: Vec<String> = std::env::args().collect();
    // `--sizes 10,100,1000`: other numbers of Services for the per-packet rows.
    let custom: Option<Vec<u32>> = args
        .iter()
        .position(|a| a == "--sizes")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.split(',').filter_map(|n| n.parse().ok()).collect());
    let sizes: &[u32] = match &custom {
        Some(v) if !v.is_empty() => v,
        _ if quick => &[10, 1_000, 10_000],
        _ => &[10, 1_000, 10_000, 100_000],
    };
    let (flows, rounds) = if quick { (1_000, 5) } else { (2_000, 9) };
    // --quick keeps what the targets are judged on (10,000 Services) and
    // leaves out the slowest setup, loading kube-proxy's nftables layout of
    // 10,000 Services (over a minute on this machine).
    let e2e_sizes: &[u32] = if quick { &[10_000] } else { &[100, 10_000] };
    // Per path and mode: rounds × seconds (2-3 s a cell).
    let (e2e_rounds, e2e_limit) = if quick {
        (2, Duration::from_millis(750))
    } else {
        (3, Duration::from_millis(1000))
    };
    let date = shell_line("date", &["+%Y-%m-%d"]);
    let results = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../bench/results");
    // A --quick run measures less; its files sit beside the full run's
    // instead of replacing them.
    let stem = if quick {
        format!("{date}-quick")
    } else {
        date.clone()
    };
    // A partial run (--only) must not overwrite the plots of the last full one.
    let dir = if parts.0.is_none() {
        results
    } else {
        std::env::temp_dir()
    };
    let mut md = String::new();
    let host = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let kernel = shell_line("uname", &["-r"]);
    let _ = writeln!(
        md,
        "# Benchmark {date}\n\nMachine: {host}, {} CPUs, kernel {kernel}, {}, {}. {} Services × {BACKENDS_PER_SERVICE} backends at most. Measured in one run by `cargo xtask bench`{}.\n",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        shell_line("iptables", &["--version"]),
        shell_line("nft", &["--version"]),
        sizes.last().unwrap(),
        if quick { " --quick" } else { "" }
    );
    let mut targets: Vec<(String, bool, String)> = vec![];
    let mut pngs: Vec<(String, String)> = vec![];
    if parts.run("plots") || parts.0.is_none() {
        plots::register_fonts()?;
    }

    let mut costs: Vec<PacketCost> = vec![];
    if parts.run("packet") {
        eprintln!("per-packet cost ...");
        costs = packet_costs(sizes, flows, rounds);
        packet_cost_report(&mut md, &costs, flows, rounds, &mut targets);
        let name = format!("{stem}-packet-cost.png");
        match plots::packet_cost(&costs, &dir.join(&name)) {
            Ok(()) => pngs.push(("Per-packet cost".into(), name)),
            Err(e) => eprintln!("plot: {e:#}"),
        }
    }

    if parts.run("edge") {
        eprintln!("external interfaces: XDP and tc ...");
        let edge = edge_cost::edge_costs(sizes, flows, rounds).unwrap_or_else(|e| {
            eprintln!("  failed: {e:#}");
            vec![]
        });
        edge_cost::report(&mut md, &edge, flows, rounds, &mut targets);
    }

    if parts.run("rate") {
        eprintln!("packet rate (live frames) ...");
        let rate_rounds = if quick { 5 } else { 9 };
        match packet_rate::packet_rates(&[10, 100_000], rate_rounds) {
            Ok(rows) => {
                for r in &rows {
                    eprintln!(
                        "  {} at {:?}: {:.2} Mpps, program {:.0} ns",
                        r.what, r.services, r.mpps, r.prog_ns
                    );
                }
                packet_rate::report(&mut md, &rows, rate_rounds, &mut targets);
            }
            Err(e) => {
                eprintln!("  failed: {e:#}");
                // The targets stay in the table, failed, with why.
                let why = format!("not measured: {e:#}").replace('|', "/");
                let _ = writeln!(
                    md,
                    "## Packet rate (live frames)

{why}
"
                );
                for target in [
                    "XDP NodePort ≤ 3× bare XDP_TX per packet",
                    "XDP NodePort Mpps at 100000 within 1.25× of 10",
                ] {
                    targets.push((target.to_string(), false, why.clone()));
                }
            }
        }
    }

    if parts.run("control") {
        eprintln!("control plane ...");
        let cp = control_plane(10_000, 100);
        control_plane::report(&mut md, &cp, &mut targets);
    }

    if parts.run("scale") {
        eprintln!("the agent at scale ...");
        let runs = scale::scale(quick);
        scale::report(&mut md, &runs, &mut targets);
    }

    let mut e2e: Vec<PathResult> = vec![];
    if parts.run("e2e") {
        eprintln!("end to end ...");
        let specs: Vec<_> = paths(e2e_sizes)
            .into_iter()
            .filter(|p| !(quick && p.name == end_to_end::NFTABLES))
            .collect();
        e2e = measure_all(&specs, e2e_rounds, e2e_limit);
        for r in &e2e {
            eprintln!(
                "  {} at {}: {:.0} conn/s, {:.0} req/s",
                r.name, r.services, r.short_rate, r.kept_rate
            );
        }
        end_to_end_report(&mut md, &e2e, e2e_rounds, e2e_limit, &mut targets);
        let progs: Vec<_> = e2e
            .iter()
            .filter(|r| !r.programs.is_empty())
            .map(|r| (r.name.to_string(), r.services, r.programs.clone()))
            .collect();
        bpf_stats::report(&mut md, &progs);
        let name = format!("{stem}-end-to-end.png");
        match plots::end_to_end(&e2e, e2e_sizes, &dir.join(&name)) {
            Ok(()) => pngs.push(("End-to-end rates".into(), name)),
            Err(e) => eprintln!("plot: {e:#}"),
        }
    }

    if parts.run("socket-lb") {
        eprintln!("ClusterIP through the socket hooks ...");
        let (rounds, limit) = if quick {
            (6, Duration::from_millis(750))
        } else {
            (16, Duration::from_secs(1))
        };
        match socket_lb::measure(10_000, rounds, limit) {
            Ok(rows) => socket_lb::report(&mut md, &rows, 10_000, rounds, limit, &mut targets),
            Err(e) => eprintln!("  failed: {e:#}"),
        }
    }

    if parts.run("layouts") {
        eprintln!("kube-proxy layouts ...");
        layouts_report(&mut md, &e2e, quick);
    }

    if parts.run("dns") {
        eprintln!("DNS ...");
        match dns::dns_rates() {
            Ok(rows) => {
                for r in &rows {
                    eprintln!(
                        "  {}: {:.0}/s, p50 {:.0} µs, p99 {:.0} µs, {} unanswered",
                        r.what, r.qps, r.p50_us, r.p99_us, r.lost
                    );
                }
                dns::report(&mut md, &rows);
            }
            Err(e) => eprintln!("  failed: {e:#}"),
        }
    }

    let _ = writeln!(md, "## Targets\n\n| target | result | |\n|---|---:|---|");
    for (what, ok, value) in &targets {
        let _ = writeln!(md, "| {what} | {value} | {} |", verdict(*ok));
    }
    if !pngs.is_empty() {
        let _ = writeln!(md, "\n## Plots\n");
        for (what, file) in &pngs {
            let _ = writeln!(md, "![{what}]({file})\n");
        }
    }

    print!("{md}");
    if parts.0.is_none() {
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("{stem}.md"));
        std::fs::write(&path, &md)?;
        eprintln!("written to {}", path.display());
        let readme = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../README.md");
        match update_readme(&readme, &md, &format!("{stem}.md")) {
            Ok(()) => eprintln!("targets written to {}", readme.display()),
            Err(e) => eprintln!("README not updated: {e:#}"),
        }
    }
    Ok(())
}

fn packet_cost_report(
    md: &mut String,
    costs: &[PacketCost],
    flows: u32,
    rounds: u32,
    targets: &mut Vec<(String, bool, String)>,
) {
    let _ = writeln!(
        md,
        "## Per-packet cost (pod-side tc program, BPF_PROG_TEST_RUN)\n\n\
         Nanoseconds per packet, the median of {rounds} rounds; each round is {flows} SYNs of new flows, \
         then one more packet of each of those flows. Every packet runs once (`repeat` 1) and the runs are summed: a \
         program rewrites its input in place, so repeating one packet would time one translation and then packets that no \
         longer match the flow.\n\n\
         - **first packet, hot set**: every SYN opens a new flow (Service lookup, backend pick, two conntrack inserts, rewrite) \
         to one of the same {HOT_FRONTENDS} frontends at every size, spread evenly over the N Services. Only the number of Services \
         changes from row to row: this is what the flatness target is judged on.\n\
         - **first packet, uniform**: the same, to frontends drawn uniformly from all N. At 100,000 the frontends, their backend \
         slots and per-frontend counters are far more than the CPU caches hold, so this row grows with the working set (cache \
         misses), not with the work done per packet. Informational.\n\
         - **established**: the next packet of each hot-set flow (one conntrack lookup, rewrite).\n\n\
         | Services | first packet, hot set (ns) | first packet, uniform (ns) | established flow (ns) | programming from nothing (ms) |\n\
         |---:|---:|---:|---:|---:|"
    );
    for c in costs {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} | {:.0} | {:.1} |",
            c.services, c.first_hot_ns, c.first_uniform_ns, c.established_ns, c.program_ms
        );
    }
    let (Some(lo), Some(hi)) = (costs.first(), costs.last()) else {
        return;
    };
    let hot = hi.first_hot_ns / lo.first_hot_ns;
    let uniform = hi.first_uniform_ns / lo.first_uniform_ns;
    let est = hi.established_ns / lo.established_ns;
    let _ = writeln!(
        md,
        "\nAt {} vs {} Services: first packet (hot set) {hot:.2}×, first packet (uniform) {uniform:.2}×, established {est:.2}×.\n",
        hi.services, lo.services
    );
    targets.extend([
        (
            format!(
                "per-packet cost flat: first packet (hot set) at {} Services within 1.25× of {}",
                hi.services, lo.services
            ),
            hot <= 1.25,
            format!("{hot:.2}×"),
        ),
        (
            "per-packet cost flat: established flow within 1.25×".to_string(),
            est <= 1.25,
            format!("{est:.2}×"),
        ),
    ]);
    ipv6_report(md, costs, targets);
}

/// The IPv6 rows beside the IPv4 ones, and their ratio per packet.
fn ipv6_report(md: &mut String, costs: &[PacketCost], targets: &mut Vec<(String, bool, String)>) {
    let _ = writeln!(
        md,
        "### IPv6 beside IPv4\n\n\
         Every Service above is dual-stack: besides its IPv4 ClusterIP it has an IPv6 one (fd00:96::/64) with 10 IPv6 \
         backends, in SERVICES6/BACKENDS6 of the same loaded programs. In every round the IPv4 and IPv6 flows of the hot set \
         run one after the other (alternating which goes first) to the same {HOT_FRONTENDS} Services, from fresh clients \
         (10.244.0.0/16, fd00:10:244::/64); the IPv6 frames are Ethernet, a 40-byte IPv6 header without extension headers, \
         TCP. First packet: the hot-set row above; established: one more packet of each of those flows. The IPv6 tc path runs \
         its steps as subprograms over a per-CPU scratch slot. Target: IPv6 / IPv4 per packet ≤ 1.2×.\n\n\
         | Services | first packet IPv4 (ns) | first packet IPv6 (ns) | IPv6 / IPv4 | established IPv4 (ns) | established IPv6 (ns) | IPv6 / IPv4 |\n\
         |---:|---:|---:|---:|---:|---:|---:|"
    );
    for c in costs {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} | {:.2}× | {:.0} | {:.0} | {:.2}× |",
            c.services,
            c.first_hot_ns,
            c.first_hot6_ns,
            c.first_hot6_ns / c.first_hot_ns,
            c.established_ns,
            c.established6_ns,
            c.established6_ns / c.established_ns
        );
    }
    let _ = writeln!(md);
    let (Some(lo), Some(hi)) = (costs.first(), costs.last()) else {
        return;
    };
    let ends = if costs.len() > 1 {
        vec![lo, hi]
    } else {
        vec![lo]
    };
    for c in ends {
        for (what, v6, v4) in [
            ("first packet of a flow", c.first_hot6_ns, c.first_hot_ns),
            (
                "packet of an established flow",
                c.established6_ns,
                c.established_ns,
            ),
        ] {
            let ratio = v6 / v4;
            targets.push((
                format!(
                    "IPv6 / IPv4 per packet ≤ 1.2×, tc ClusterIP, {what} at {} Services",
                    c.services
                ),
                ratio <= 1.2,
                format!("{ratio:.2}×"),
            ));
        }
    }
}

fn find<'a>(e2e: &'a [PathResult], name: &str, services: u32) -> Option<&'a PathResult> {
    e2e.iter()
        .find(|r| r.name == name && r.services == services && r.error.is_none())
}

fn end_to_end_report(
    md: &mut String,
    e2e: &[PathResult],
    rounds: u32,
    limit: Duration,
    targets: &mut Vec<(String, bool, String)>,
) {
    use end_to_end::{
        CLUSTER_IP, DIRECT, IPTABLES, NFTABLES, NODE_PORT_REMOTE_TC, NODE_PORT_REMOTE_XDP,
        NODE_PORT_REMOTE_XDP_GENERIC, ROUTED_REMOTE,
    };
    let _ = writeln!(
        md,
        "## End to end through namespaces\n\n\
         A client namespace loads two backend pods over each path: **short connections** (connect, one 6-byte request and its \
         64-byte response, close; connections/s) and **kept-alive** connections (one request at a time on an open connection; \
         requests/s). 2 client threads, one connection each; {rounds} round(s) of {:.1} s per path and mode. Within a round all paths run \
         interleaved, {} ms each in turn, in an order shuffled every turn, so that every path sees the same moments of this \
         shared machine (measured one after the other, the same path's rate moves by 10 % from one second to the next). Rates are \
         the median over rounds, latency percentiles pooled, and ratios are the median of each round's ratio. Client, servers \
         and forwarding share this machine's 2 CPUs: compare ratios.\n\n\
         - pod IP from a pod: the client pod to the pods' own addresses through the node, no Service (baseline for ClusterIP).\n\
         - pod IP from outside, routed: a host on the nodes' segment to the pods' addresses, no Service (baseline for NodePort).\n\
         - ClusterIP, this dataplane: the client pod to the Service's ClusterIP; the agent runs with N Services loaded.\n\
         - NodePort, this dataplane: the outside host to the node's address and nodePort, through the tc program on the node's interface.\n\
         - NodePort, backends on another node: the outside host to node-1's NodePort, both backends on node-2, so every flow is \
         source-NATed and forwarded back out of node-1's interface: by tc, or by the XDP program in native or generic mode. \
         Baseline: the same host to the pods' addresses routed through node-1 (same two hops, no Service). The segment's veths \
         behave like wires in these four (senders complete their checksums; NAPI on the bridge ports).\n\
         - kube-proxy iptables / nftables layout: the same client pod to the same ClusterIP, translated by the rules kube-proxy's \
         iptables or nftables mode would write for N Services, loaded in the node's namespace instead of the agent. The measured \
         Service is the last of the N in KUBE-SERVICES (the worst case of a linear chain; nftables looks it up in a verdict map).\n\n\
         | path | Services loaded | short conn/s | p50 / p99 / max (µs) | kept-alive req/s | p50 / p99 / max (µs) | failed |\n\
         |---|---:|---:|---:|---:|---:|---:|",
        limit.as_secs_f64(),
        end_to_end::SLICE.as_millis()
    );
    for r in e2e {
        if let Some(e) = &r.error {
            let _ = writeln!(
                md,
                "| {} | {} | not measured: {} | | | | |",
                r.name,
                r.services,
                e.replace('|', "/").lines().next().unwrap_or("")
            );
            continue;
        }
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {:.0} / {:.0} / {:.0} | {:.0} | {:.0} / {:.0} / {:.0} | {} |",
            r.name,
            r.services,
            r.short_rate,
            r.short.percentile_us(0.5),
            r.short.percentile_us(0.99),
            // The maximum shows stalls too rare for p99 that still weigh on
            // the rate (a lost SYN costs a 1 s retransmission).
            r.short.percentile_us(1.0),
            r.kept_rate,
            r.kept.percentile_us(0.5),
            r.kept.percentile_us(0.99),
            r.kept.percentile_us(1.0),
            r.short.errors + r.kept.errors
        );
    }
    let direct = find(e2e, DIRECT, 0);
    let _ = writeln!(md);
    for n in [100, 10_000]
        .into_iter()
        .filter(|n| e2e.iter().any(|r| r.services == *n))
    {
        let ours = find(e2e, CLUSTER_IP, n);
        let ipt = find(e2e, IPTABLES, n);
        let nft = find(e2e, NFTABLES, n);
        // Paths run interleaved in every round: the median of each
        // round's ratio compares them in the same window.
        let ratio =
            |a: Option<&PathResult>, b: Option<&PathResult>, f: fn(&PathResult) -> &[f64]| {
                a.zip(b)
                    .and_then(|(a, b)| end_to_end::paired_ratio(f(a), f(b)))
            };
        let short: fn(&PathResult) -> &[f64] = |r| &r.short_rounds;
        let kept: fn(&PathResult) -> &[f64] = |r| &r.kept_rounds;
        let show = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("{v:.2}×"));
        let _ = writeln!(
            md,
            "At {n} Services: ClusterIP / pod IP {} (short), {} (kept-alive); ClusterIP / iptables layout {} (short), {} (kept-alive); ClusterIP / nftables layout {} (short), {} (kept-alive).\n",
            show(ratio(ours, direct, short)),
            show(ratio(ours, direct, kept)),
            show(ratio(ours, ipt, short)),
            show(ratio(ours, ipt, kept)),
            show(ratio(ours, nft, short)),
            show(ratio(ours, nft, kept)),
        );
        let remote_tc = find(e2e, NODE_PORT_REMOTE_TC, n);
        let routed_remote = find(e2e, ROUTED_REMOTE, 0);
        let _ = writeln!(
            md,
            "At {n} Services, NodePort to another node: XDP native / tc {} (short), {} (kept-alive); XDP generic / tc {} (short), {} (kept-alive); tc / routed pod IP {} (short), {} (kept-alive); XDP native / routed pod IP {} (short), {} (kept-alive).\n",
            show(ratio(find(e2e, NODE_PORT_REMOTE_XDP, n), remote_tc, short)),
            show(ratio(find(e2e, NODE_PORT_REMOTE_XDP, n), remote_tc, kept)),
            show(ratio(
                find(e2e, NODE_PORT_REMOTE_XDP_GENERIC, n),
                remote_tc,
                short
            )),
            show(ratio(
                find(e2e, NODE_PORT_REMOTE_XDP_GENERIC, n),
                remote_tc,
                kept
            )),
            show(ratio(remote_tc, routed_remote, short)),
            show(ratio(remote_tc, routed_remote, kept)),
            show(ratio(
                find(e2e, NODE_PORT_REMOTE_XDP, n),
                routed_remote,
                short
            )),
            show(ratio(
                find(e2e, NODE_PORT_REMOTE_XDP, n),
                routed_remote,
                kept
            )),
        );
        if n == 10_000 {
            for (what, f) in [("short connections", short), ("kept-alive requests", kept)] {
                let v = ratio(ours, direct, f);
                targets.push((
                    format!("ClusterIP at {n} Services ≥ 0.9× pod IP rate, {what}"),
                    v.is_some_and(|v| v >= 0.9),
                    show(v),
                ));
            }
            let v = ratio(ours, ipt, short);
            targets.push((
                format!(
                    "ClusterIP ≥ 2× kube-proxy iptables layout, short connections at {n} Services"
                ),
                v.is_some_and(|v| v >= 2.0),
                show(v),
            ));
        }
    }
}

fn layouts_report(md: &mut String, e2e: &[PathResult], quick: bool) {
    use end_to_end::{IPTABLES, NFTABLES};
    let n = 10_000;
    let svcs = kube_proxy::services(n, None);
    let ipt_lines = kube_proxy::iptables_rules(&svcs).lines().count();
    let nft_lines: usize = kube_proxy::nft_transactions(&svcs, 1000)
        .iter()
        .map(|t| t.lines().count())
        .sum();
    let loaded = |name: &str| {
        e2e.iter()
            .find(|r| r.name == name && r.services == n)
            .and_then(|r| r.load_ms)
            .map_or_else(
                || (if quick { "full run only" } else { "n/a" }).to_string(),
                |ms| format!("{:.1} s", ms / 1e3),
            )
    };
    let single: Vec<(u32, String)> = [1_000, 2_000]
        .into_iter()
        .map(|k| {
            if quick {
                return (k, "full run only".to_string());
            }
            let t = kube_proxy::single_transaction(k).map_or_else(
                |e| format!("failed: {e:#}"),
                |ms| format!("{:.1} s", ms / 1e3),
            );
            (k, t)
        })
        .collect();
    let _ = writeln!(
        md,
        "## The same 10,000 Services as kube-proxy would program them\n\n\
         Loaded into the node namespace of the end-to-end topology above (so the time includes nothing but the load).\n\n\
         | layout | size | load from nothing |\n|---|---:|---:|\n\
         | iptables (`iptables-restore`, one transaction as kube-proxy does; KUBE-SERVICES → KUBE-SVC → KUBE-SEP, filter table) | {ipt_lines} lines | {} |\n\
         | nftables (`nft -f`, transactions of 1,000 Services; `service-ips` verdict map → service chain `numgen random mod 10 vmap` → endpoint chains) | {nft_lines} lines | {} |\n\
         | nftables, one transaction (as kube-proxy's first full sync), 1,000 / 2,000 Services | | {} / {} |\n",
        loaded(IPTABLES),
        loaded(NFTABLES),
        single[0].1,
        single[1].1,
    );
    let _ = writeln!(
        md,
        "Why nftables is loaded in several transactions: every Service chain holds an anonymous verdict map (`numgen random mod N vmap {{ … }}`), \
         and this kernel binds each anonymous set by walking the whole pending transaction (`__nft_set_trans_bind`, 33 % of a \
         `perf` profile of the load), so one transaction is quadratic in the number of Services: doubling from 1,000 to 2,000 \
         above costs about 4×, and 10,000 in one transaction took 206 s. What remains per transaction is also linear in the \
         anonymous sets already in the table (their names are allocated and looked up by walking the table's set list), so \
         even in transactions of 1,000 the 10,000-Service layout takes tens of seconds on this kernel. This dataplane's \
         maps are filled in well under 1 s (control plane above).\n"
    );
}

const README_BEGIN: &str =
    "<!-- bench-results:begin (written by cargo xtask bench; do not edit) -->";
const README_END: &str = "<!-- bench-results:end -->";

/// Puts the run's machine line and Targets table between the README's
/// markers, so the Performance section shows the latest run, not a copy
/// edited by hand.
fn update_readme(readme: &std::path::Path, md: &str, results: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(readme)?;
    let (Some(b), Some(e)) = (text.find(README_BEGIN), text.find(README_END)) else {
        anyhow::bail!("no {README_BEGIN} … {README_END} block");
    };
    let machine = md
        .lines()
        .find(|l| l.starts_with("Machine:"))
        .unwrap_or_default();
    let targets: String = md
        .split("## Targets\n")
        .nth(1)
        .unwrap_or_default()
        .split("\n## ")
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    let block = format!(
        "{README_BEGIN}\nLatest run: [bench/results/{results}](bench/results/{results}). {machine}\n\n{targets}\n{README_END}"
    );
    let new = format!("{}{block}{}", &text[..b], &text[e + README_END.len()..]);
    std::fs::write(readme, new)?;
    Ok(())
}
