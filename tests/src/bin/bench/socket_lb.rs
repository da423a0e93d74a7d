//! ClusterIP through the socket hooks (`--socket-lb pods`) against the
//! pod IP it stands for: the client pod of the end-to-end topology, with
//! the agent holding N Services, loads the Service's ClusterIP and the
//! backend pods' own addresses, from the same pod and the same cgroup,
//! interleaved in slices of 50 ms (`load::run_interleaved`) so that
//! whatever else the machine does falls on both alike. For context, a
//! second topology runs the agent with the default `--socket-lb host`,
//! where the same pod's ClusterIP connections are translated by tc, and a
//! third has no agent at all (the end-to-end section's pod IP baseline);
//! those two are interleaved with each other, outside the hooks' cgroup.
//! The tc topology measures only its ClusterIP: its pod's direct
//! connections would reuse ports whose closed ClusterIP flows still have
//! conntrack entries, and their replies would be turned into the
//! ClusterIP's (see the report).
//!
//! Every request (every kept-alive connection) to pod IPs goes to a pod
//! chosen at random, as the Service's backend choice does, so both sides
//! load the backends alike.
//!
//! Cgroup membership is per process and the load threads are the bench's
//! own, so the bench moves itself into the hooks' cgroup (a child of the
//! cgroup2 mount it made) for the first pair's runs and back to where it
//! was for the other pair's; sockets keep the cgroup they were made in.
use std::{
    fmt::Write as _,
    fs,
    net::SocketAddrV4,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context as _;
use integration_tests::{
    cgroup::TestCgroup,
    load::{self, Lane, Load, Mode},
};

use crate::{
    bpf_stats,
    end_to_end::{
        Env, MEASURED_VIP, Pooled, SLICE, client_pod, one_request, paired_ratio, pod_addrs,
        pods_env, start_agent,
    },
};

pub const HOOKED: &str = "ClusterIP, --socket-lb pods";
pub const HOOKED_POD_IP: &str = "pod IP, same pod (hooks attached)";
pub const TC: &str = "ClusterIP, --socket-lb host (tc)";
pub const PLAIN_POD_IP: &str = "pod IP, no agent, no hooks";
const CLIENT_THREADS: usize = 2;

pub struct Row {
    pub name: &'static str,
    pub short_rate: f64,
    pub short: load::LoadResult,
    pub kept_rate: f64,
    pub kept: load::LoadResult,
    /// Each round's rates, in round order, for ratios paired by round.
    pub short_rounds: Vec<f64>,
    pub kept_rounds: Vec<f64>,
    /// The hooked agent's programs that ran for this path's short
    /// connections, with BPF statistics on (the two paths in the hooks'
    /// cgroup only).
    pub programs: Vec<bpf_stats::Row>,
}

struct Measured {
    name: &'static str,
    client_ns: String,
    addrs: Vec<SocketAddrV4>,
    in_cgroup: bool,
    short: Pooled,
    kept: Pooled,
}

/// The bench process inside the hooks' cgroup while it lives; back in the
/// cgroup it came from when dropped (also on failure), before the test
/// cgroup is removed.
struct Inside<'a> {
    home: PathBuf,
    cgroup: &'a TestCgroup,
}

impl<'a> Inside<'a> {
    fn enter(cgroup: &'a TestCgroup) -> anyhow::Result<Self> {
        let home = own_cgroup()?;
        cgroup.add(std::process::id())?;
        Ok(Self { home, cgroup })
    }
}

impl Drop for Inside<'_> {
    fn drop(&mut self) {
        let procs = self.home.join("cgroup.procs");
        if let Err(e) = fs::write(&procs, std::process::id().to_string()) {
            eprintln!(
                "    could not move back to {} from {}: {e}",
                procs.display(),
                self.cgroup.flag()
            );
        }
    }
}

/// This process's cgroup v2 directory (the `0::` line of /proc/self/cgroup).
fn own_cgroup() -> anyhow::Result<PathBuf> {
    let text = fs::read_to_string("/proc/self/cgroup")?;
    let rel = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .context("no cgroup v2 line in /proc/self/cgroup")?;
    let mounts = fs::read_to_string("/proc/mounts")?;
    let root = service_agent::dataplane::cgroup::cgroup2_mount(&mounts)?;
    Ok(root.join(Path::new(rel.trim_start_matches('/'))))
}

/// Measures the four paths at `services` Services, `rounds` rounds of
/// `limit` per mode and path.
pub fn measure(services: u32, rounds: u32, limit: Duration) -> anyhow::Result<Vec<Row>> {
    let cgroup = TestCgroup::new()?;
    let web_ports = "{name: http, port: 80, targetPort: 8080}";
    let mut hooked: Env = pods_env(false)?;
    start_agent(
        &mut hooked,
        services.saturating_sub(1),
        "",
        web_ports,
        &["--cgroup", &cgroup.flag(), "--socket-lb", "pods"],
    )?;
    let mut tc: Env = pods_env(false)?;
    start_agent(&mut tc, services.saturating_sub(1), "", web_ports, &[])?;
    let plain: Env = pods_env(false)?;
    let vip = vec![SocketAddrV4::new(MEASURED_VIP, 80)];
    let mut paths = [
        (HOOKED, &hooked, vip.clone(), true),
        (HOOKED_POD_IP, &hooked, pod_addrs(&hooked), true),
        (TC, &tc, vip, false),
        (PLAIN_POD_IP, &plain, pod_addrs(&plain), false),
    ]
    .map(|(name, env, addrs, in_cgroup)| Measured {
        name,
        client_ns: client_pod(env),
        addrs,
        in_cgroup,
        short: Pooled::default(),
        kept: Pooled::default(),
    });
    for p in &paths {
        let _inside = p.in_cgroup.then(|| Inside::enter(&cgroup)).transpose()?;
        let probe = one_request(&p.client_ns, &p.addrs)?;
        anyhow::ensure!(
            probe.ok == 1,
            "{}: no answer ({})",
            p.name,
            probe.first_error.unwrap_or_default()
        );
    }
    // Paths that share the bench's cgroup state run interleaved
    // (`load::run_interleaved`): the two in the hooks' cgroup, the two
    // outside it. Moving the process between cgroups every slice would
    // cost more than what is measured, so the two pairs take turns.
    let pairs: [[usize; 2]; 2] = [[0, 1], [2, 3]];
    for round in 0..rounds {
        eprintln!("  round {} of {rounds}", round + 1);
        // Every other round runs the pairs in reverse order.
        let order: Vec<[usize; 2]> = if round % 2 == 0 {
            pairs.to_vec()
        } else {
            pairs.iter().rev().copied().collect()
        };
        for pair in order {
            let _inside = paths[pair[0]]
                .in_cgroup
                .then(|| Inside::enter(&cgroup))
                .transpose()?;
            for mode in [Mode::ShortConnections, Mode::KeptAlive] {
                let lanes: Vec<Lane> = pair
                    .iter()
                    .map(|&i| Lane {
                        client_ns: &paths[i].client_ns,
                        targets: &paths[i].addrs,
                    })
                    .collect();
                let rs = load::run_interleaved(
                    &lanes,
                    Load {
                        mode,
                        threads: CLIENT_THREADS,
                        warmup: Duration::from_millis(200),
                        limit,
                        max_ops: 2_000_000,
                    },
                    SLICE,
                )?;
                for (&i, r) in pair.iter().zip(rs) {
                    let p = &mut paths[i];
                    eprintln!(
                        "    {}, {mode:?}: {:.0}/s{}",
                        p.name,
                        r.rate(),
                        r.first_error.as_ref().map_or(String::new(), |e| format!(
                            " ({} failed, first: {e}; max {:.0} µs)",
                            r.errors,
                            r.percentile_us(1.0)
                        ))
                    );
                    match mode {
                        Mode::ShortConnections => p.short.add(r),
                        Mode::KeptAlive => p.kept.add(r),
                    }
                }
            }
        }
    }
    let programs = program_time(&hooked, &cgroup, &paths[..2], limit)?;
    eprintln!("  the hooked agent's counters: {}", reasons(&hooked)?);
    eprintln!("  the tc agent's counters: {}", reasons(&tc)?);
    let rows = paths
        .into_iter()
        .zip(
            programs
                .into_iter()
                .map(Some)
                .chain(std::iter::repeat(None)),
        )
        .map(|(p, programs)| {
            let (short_rate, short, short_rounds) = p.short.finish();
            let (kept_rate, kept, kept_rounds) = p.kept.finish();
            Row {
                name: p.name,
                short_rate,
                short,
                kept_rate,
                kept,
                short_rounds,
                kept_rounds,
                programs: programs.unwrap_or_default(),
            }
        })
        .collect();
    drop((hooked, tc, plain));
    Ok(rows)
}

/// The hooked agent's programs' own time for each of `paths` (those in
/// the hooks' cgroup), over `limit` of short connections each, alone, with
/// BPF statistics on: what a translated connect() costs the hook against
/// one it passes. Not counted in the rates (the statistics slow every run).
fn program_time(
    hooked: &Env,
    cgroup: &TestCgroup,
    paths: &[Measured],
    limit: Duration,
) -> anyhow::Result<Vec<Vec<bpf_stats::Row>>> {
    let ids = bpf_stats::attached_programs(&hooked.agent().context("no agent")?.pin_dir);
    let _on = bpf_stats::enable()?;
    let _inside = Inside::enter(cgroup)?;
    let mut rows = vec![];
    for p in paths {
        let before = bpf_stats::sample(&ids);
        load::run(
            &p.client_ns,
            &p.addrs,
            Load {
                mode: Mode::ShortConnections,
                threads: CLIENT_THREADS,
                warmup: Duration::ZERO,
                limit,
                max_ops: 2_000_000,
            },
        )?;
        let mut times = Default::default();
        bpf_stats::accumulate(&mut times, &before, &bpf_stats::sample(&ids));
        rows.push(bpf_stats::rows(&times));
    }
    Ok(rows)
}

/// The measured frontend's tc packets and every reason counted, to show in
/// the log that the hooks (not tc) carried the ClusterIP path, and why a
/// path stalled.
fn reasons(env: &Env) -> anyhow::Result<String> {
    let text = env
        .agent()
        .context("no agent")?
        .cli("stats", &["--output", "json"])?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    let packets = v["frontends"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|f| f["frontend"].as_str() == Some(&format!("{MEASURED_VIP}:80/TCP")))
        })
        .map(|f| f["packets"].clone());
    // Every reason counted, for what went wrong when a path stalls.
    let counted: Vec<String> = v["reasons"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, n)| n.as_u64().is_some_and(|n| n > 0))
        .map(|(k, n)| format!("{k} {n}"))
        .collect();
    Ok(format!(
        "tc packets of {MEASURED_VIP}:80/TCP {}; {}",
        packets.unwrap_or_default(),
        counted.join(", ")
    ))
}

pub fn report(
    md: &mut String,
    rows: &[Row],
    services: u32,
    rounds: u32,
    limit: Duration,
    targets: &mut Vec<(String, bool, String)>,
) {
    let _ = writeln!(
        md,
        "## ClusterIP through the socket hooks (`--socket-lb pods`)\n\n\
         The client pod of the end-to-end topology, the agent holding {services} Services, in the hooks' cgroup: its \
         connect() to the ClusterIP is given a backend by the cgroup hook, so its packets leave the pod addressed to the \
         backend and tc on its veth translates none of them. Baseline: the same pod, in the same cgroup, to the backend \
         pods' addresses. {rounds} rounds of {:.1} s per path and mode; in each round the two run interleaved, {} ms \
         each in turn, so that both see the same moments of this shared machine; rates are medians over rounds, ratios the \
         median of each round's ratio. For context, a second topology whose agent runs `--socket-lb host`: the same \
         ClusterIP through tc, and a third with no agent: the pods' addresses with no hook on the client (the end-to-end \
         section's baseline); these two are interleaved with each other, outside the hooks' cgroup, so ratios across the \
         two pairs compare runs a few seconds apart. Every request (every kept-alive connection) to pod IPs goes to a pod \
         chosen at random, as the Service's do.\n\n\
         | path | short conn/s | p50 / p99 (µs) | kept-alive req/s | p50 / p99 (µs) | failed |\n|---|---:|---:|---:|---:|---:|",
        limit.as_secs_f64(),
        SLICE.as_millis()
    );
    for r in rows {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} / {:.0} | {:.0} | {:.0} / {:.0} | {} |",
            r.name,
            r.short_rate,
            r.short.percentile_us(0.5),
            r.short.percentile_us(0.99),
            r.kept_rate,
            r.kept.percentile_us(0.5),
            r.kept.percentile_us(0.99),
            r.short.errors + r.kept.errors
        );
    }
    let get = |name: &str| rows.iter().find(|r| r.name == name);
    // The median over rounds of each round's ratio: a pair measured
    // back to back shares that moment's load on this machine.
    let ratio = |a: &str, b: &str, f: fn(&Row) -> &[f64]| {
        let (a, b) = get(a).zip(get(b))?;
        paired_ratio(f(a), f(b))
    };
    let short: fn(&Row) -> &[f64] = |r| &r.short_rounds;
    let kept: fn(&Row) -> &[f64] = |r| &r.kept_rounds;
    let show = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("{v:.3}×"));
    let _ = writeln!(
        md,
        "\nMedians of the per-round ratios. ClusterIP with --socket-lb pods / pod IP (same pod, hooks attached): {} (short), {} (kept-alive). \
         ClusterIP through tc / pod IP without agent: {} (short), {} (kept-alive). \
         ClusterIP with --socket-lb pods / pod IP without agent: {} (short), {} (kept-alive). \
         Pod IP with the agent and hooks / without: {} (short), {} (kept-alive).\n",
        show(ratio(HOOKED, HOOKED_POD_IP, short)),
        show(ratio(HOOKED, HOOKED_POD_IP, kept)),
        show(ratio(TC, PLAIN_POD_IP, short)),
        show(ratio(TC, PLAIN_POD_IP, kept)),
        show(ratio(HOOKED, PLAIN_POD_IP, short)),
        show(ratio(HOOKED, PLAIN_POD_IP, kept)),
        show(ratio(HOOKED_POD_IP, PLAIN_POD_IP, short)),
        show(ratio(HOOKED_POD_IP, PLAIN_POD_IP, kept)),
    );
    let _ = writeln!(
        md,
        "The hooked agent's programs over {:.1} s of short connections on each path alone, with BPF statistics on \
         (not counted in the rates above): a connect() to the ClusterIP is translated by the hook, one to a pod IP \
         passes it after the frontend lookup.\n\n| path | program | runs | ns/run |\n|---|---|---:|---:|",
        limit.as_secs_f64()
    );
    for r in rows {
        for (name, runs, ns) in &r.programs {
            let _ = writeln!(md, "| {} | {name} | {runs} | {ns:.0} |", r.name);
        }
    }
    let _ = writeln!(md);
    for (what, f) in [("short connections", short), ("kept-alive requests", kept)] {
        let v = ratio(HOOKED, HOOKED_POD_IP, f);
        targets.push((
            format!(
                "ClusterIP with --socket-lb pods at {services} Services ≥ 0.98× pod IP, {what}"
            ),
            v.is_some_and(|v| v >= 0.98),
            show(v),
        ));
    }
}
