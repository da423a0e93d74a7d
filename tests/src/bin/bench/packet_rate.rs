//! Packet rate on one core: BPF_PROG_TEST_RUN in live-frame mode
//! (BPF_F_TEST_XDP_LIVE_FRAMES) as the traffic generator. The kernel runs
//! the XDP program on each repetition of the frame in batches and carries
//! out its verdict for real: frames the program transmits go out of a veth
//! whose peer (in the same namespace) takes them with an XDP sink and drops
//! them. Mpps is frames over the wall time of the syscall, on a thread
//! pinned to one CPU; the sink's work lands on that CPU too (the veth peer's
//! NAPI runs in the softirq the batch's flush raises).
//!
//! Three programs side by side, round by round (A B C A B C ...):
//! - the bare `XDP_TX` program (two instructions): the limit of this path;
//! - the dataplane's XDP program on an established NodePort flow whose
//!   backend is on another node (conntrack hit, DNAT + SNAT, FIB lookup,
//!   MAC rewrite, devmap transmit): its fast path;
//! - the tc program on the same packet. Live frames are XDP only, so tc
//!   runs through the ordinary BPF_PROG_TEST_RUN, one call a packet
//!   (`repeat` 1; a repeated run would translate the packet once and then
//!   meet its own output), and its rate is that of the kernel's measured
//!   program time alone: no skb is built, nothing is transmitted.
//!
//! The NodePort rows are measured over IPv4 and over IPv6 (the same
//! Services, flow and topology in the other family).
//!
//! Each is also run once with BPF_ENABLE_STATS on, for the program's own
//! time per packet as the kernel measures it in this traffic.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use aya::programs::{ProgramInfo, TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode};
use integration_tests::{
    PinDir,
    bpf::{FibNamespace, Loaded, Prog, TC_ACT_REDIRECT, XDP_REDIRECT},
    netns::enter,
    packet::{ACK, Builder, SYN},
};
use nix::{
    sched::{CpuSet, sched_setaffinity},
    unistd::Pid,
};
use service_agent::{
    dataplane::IfaceRole,
    plan::{FrontendKey, FrontendKind, Protocol},
};
use service_common::Reason;

use crate::{
    BACKENDS_PER_SERVICE, Family as Ip, bare_xdp, bpf_stats, load, packet_cost::median, plan_of,
    plan6_of,
};

const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 1);
const NODE6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x50, 0, 0, 0, 0, 0, 1);
const PEER_NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x00, 0x20];
const NODE_PORT: u16 = 30080;
const CLIENT: &str = "172.16.0.1";
const CLIENT6: &str = "fd00:172:16::1";
const CLIENT_PORT: u16 = 40_000;
/// Frames per live-frame batch (the kernel's default, a NAPI budget).
const BATCH: u32 = 64;
/// Frames per live-frame call: long enough that the call's setup (a page
/// pool per call) is noise, short enough for many rounds.
const FRAMES: u32 = 1 << 18;
/// tc calls per round.
const TC_CALLS: u32 = 20_000;

pub const BARE: &str = "bare XDP_TX (the limit)";
pub const XDP: &str = "XDP NodePort, backend on another node";
pub const TC: &str = "tc NodePort, backend on another node (program time only)";
pub const XDP6: &str = "XDP NodePort over IPv6, backend on another node";
pub const TC6: &str = "tc NodePort over IPv6, backend on another node (program time only)";

pub struct Rate {
    pub what: &'static str,
    /// None for the bare program, which has no Services.
    pub services: Option<u32>,
    pub mpps: f64,
    /// The program's own ns per packet (BPF_ENABLE_STATS).
    pub prog_ns: f64,
    /// The sink's ns per frame, for the transmitting programs.
    pub sink_ns: Option<f64>,
}

/// One namespace and dataplane per number of Services: the external
/// interface `ext0`, its peer `wire0` with the sink, a peer node that routes
/// the backends' range and whose neighbour entry is known.
struct World {
    fib: FibNamespace,
    ip: Ip,
    services: u32,
    l: Loaded,
    ifindex: u32,
    frame: Vec<u8>,
    sink: Xdp,
}

fn world(services: u32, ip: Ip, pins: &PinDir) -> anyhow::Result<World> {
    let fib = FibNamespace::new("bench-rate")?;
    match ip {
        Ip::V4 => {
            fib.link("ext0", "wire0", "192.168.50.1/24")?
                .neighbour("192.168.50.20", PEER_NODE_MAC, "ext0")?
                .route("10.128.0.0/12", &["via", "192.168.50.20"])?
                .route("172.16.0.0/12", &["via", "192.168.50.20"])?;
            // No IPv6 chatter (router and neighbour solicitations) towards the sink.
            fib.ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
            fib.ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
        }
        Ip::V6 => {
            // The address usable at once (no duplicate detection), and
            // forwarding on, without which the IPv6 FIB lookup answers
            // "forwarding disabled". The stack's own solicitations that
            // reach the sink only add to its count.
            for (k, v) in [
                ("net.ipv6.conf.all.accept_dad", "0"),
                ("net.ipv6.conf.default.accept_dad", "0"),
                ("net.ipv6.conf.all.forwarding", "1"),
                ("net.ipv6.conf.default.forwarding", "1"),
            ] {
                fib.ns.sysctl(k, v)?;
            }
            fib.link("ext0", "wire0", "fd00:50::1/64")?
                .neighbour("fd00:50::20", PEER_NODE_MAC, "ext0")?
                .route("fd00:10:128::/48", &["via", "fd00:50::20"])?;
        }
    }
    enter(&fib.ns.path())?;
    // The measured NodePort Service and `services - 1` ClusterIP fillers,
    // every backend on another node.
    let mut l = load(services);
    let (mut plan, any): (_, IpAddr) = match ip {
        Ip::V4 => (plan_of(services - 1), Ipv4Addr::UNSPECIFIED.into()),
        Ip::V6 => (plan6_of(services - 1), Ipv6Addr::UNSPECIFIED.into()),
    };
    plan.frontends.insert(
        FrontendKey {
            addr: any,
            port: NODE_PORT,
            proto: Protocol::Tcp,
        },
        integration_tests::bpf::frontend(
            "bench/node-port",
            FrontendKind::NodePort,
            (0..BACKENDS_PER_SERVICE)
                .map(|k| integration_tests::bpf::backend(ip.backend(services, k), 8080, true))
                .collect(),
        ),
    );
    for fe in plan.frontends.values_mut() {
        fe.backends = fe
            .backends
            .iter()
            .map(|b| service_agent::plan::BackendAddr { local: false, ..*b })
            .collect();
    }
    l.apply(&plan)?;
    let (client, node) = match ip {
        Ip::V4 => {
            l.set_node_addr(NODE)?;
            (CLIENT, NODE.to_string())
        }
        Ip::V6 => {
            l.set_node_addr6(NODE6)?;
            (CLIENT6, NODE6.to_string())
        }
    };
    let syn = Builder::tcp(client, CLIENT_PORT, &node, NODE_PORT, SYN).build();
    let frame = Builder::tcp(client, CLIENT_PORT, &node, NODE_PORT, ACK).build();
    // The sink first: a veth takes XDP frames only once its peer runs XDP
    // (which is also what makes the agent's egress check allow ext0).
    let mut sink = bare_xdp::load("bench_sink", &bare_xdp::restoring_sink_insns(&frame), pins)?;
    sink.attach("wire0", XdpMode::Driver)
        .context("attaching the sink to wire0 (native)")?;
    let ifindex = l.attach_xdp("ext0")?;
    // Open the flow: the SYN picks the backend and records it; every live
    // frame after is its next segment.
    let r = l.run(Prog::Xdp { ingress: ifindex }, &syn);
    ensure!(
        r.verdict == XDP_REDIRECT,
        "the SYN to the NodePort at {services} Services got XDP verdict {} (expected redirect: the fast path)",
        r.verdict
    );
    Ok(World {
        fib,
        ip,
        services,
        l,
        ifindex,
        frame,
        sink,
    })
}

/// Frames the sink on wire0 has received (veth counts XDP frames in rx).
/// The namespace's own stack may add one now and then (a neighbour
/// probe out of ext0), so a run checks for at least its frames.
fn sink_received(w: &World) -> anyhow::Result<u64> {
    let out = w.fib.ns.ip(&["-s", "-j", "link", "show", "dev", "wire0"])?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .context("no stats64.rx.packets for wire0 in `ip -s -j link`")
}

/// `FRAMES` live frames of `frame` through `prog` as if received on
/// `ingress`; the wall time of the call.
fn live(prog: &mut Xdp, ingress: u32, frame: &[u8]) -> anyhow::Result<Duration> {
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
    let mut md = [0u8; 24];
    md[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
    md[12..16].copy_from_slice(&ingress.to_ne_bytes());
    let opts = TestRunOptions {
        data_in: Some(frame),
        ctx_in: Some(&md),
        repeat: FRAMES,
        attrs: TestRunAttrs::new().xdp_live_frames(BATCH),
        ..Default::default()
    };
    let started = Instant::now();
    prog.test_run(opts)
        .context("BPF_PROG_TEST_RUN with BPF_F_TEST_XDP_LIVE_FRAMES")?;
    Ok(started.elapsed())
}

/// The bare program's frames, checked at the sink.
fn run_bare(bare: &mut Xdp, w: &World) -> anyhow::Result<Duration> {
    let before = sink_received(w)?;
    let t = live(bare, w.ifindex, &w.frame)?;
    let got = sink_received(w)? - before;
    ensure!(
        got >= FRAMES as u64,
        "bare XDP_TX: the sink received {got} of {FRAMES} frames"
    );
    Ok(t)
}

/// The dataplane's frames, each checked to have taken the fast path (the
/// program counts every frame it transmits back out of its arrival
/// interface under XdpTx) and to have reached the sink.
fn run_xdp(w: &mut World) -> anyhow::Result<Duration> {
    let (sent, seen) = (w.l.reason(Reason::XdpTx), sink_received(w)?);
    let t = live(w.l.dp.xdp_program()?, w.ifindex, &w.frame)?;
    let sent = w.l.reason(Reason::XdpTx) - sent;
    let seen = sink_received(w)? - seen;
    if sent != FRAMES as u64 || seen < FRAMES as u64 {
        bail!(
            "XDP NodePort at {} Services: {sent} of {FRAMES} frames took the fast path, the sink received {seen}",
            w.services
        );
    }
    Ok(t)
}

/// Mean kernel-measured ns per tc run over `TC_CALLS` single runs.
fn run_tc(w: &mut World) -> anyhow::Result<f64> {
    let mut total = Duration::ZERO;
    for _ in 0..TC_CALLS {
        let r = w.l.test_run(Prog::Tc(IfaceRole::External), &w.frame, 1)?;
        ensure!(
            r.verdict == TC_ACT_REDIRECT,
            "tc at {} Services: verdict {} (expected redirect)",
            w.services,
            r.verdict
        );
        total += r.duration;
    }
    Ok(total.as_nanos() as f64 / TC_CALLS as f64)
}

/// Program time per run between two infos of one program.
fn per_run(before: &ProgramInfo, after: &ProgramInfo) -> f64 {
    let runs = after.run_count().saturating_sub(before.run_count()).max(1);
    (after.run_time() - before.run_time()).as_nanos() as f64 / runs as f64
}

fn pin_to_one_cpu() -> anyhow::Result<usize> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cpu = cpus - 1;
    let mut set = CpuSet::new();
    set.set(cpu)?;
    sched_setaffinity(Pid::from_raw(0), &set).context("sched_setaffinity")?;
    Ok(cpu)
}

/// Every row at each of `sizes` Services, medians over `rounds` rounds.
pub fn packet_rates(sizes: &[u32], rounds: u32) -> anyhow::Result<Vec<Rate>> {
    let sizes = sizes.to_vec();
    // One thread of our own: it hops between the worlds' namespaces
    // (live frames resolve the ingress interface, and the programs' FIB
    // lookups run, in the caller's namespace) and stays on one CPU.
    let worker = std::thread::spawn(move || -> anyhow::Result<Vec<Rate>> {
        let pins = PinDir::new("bench-rate");
        let cpu = pin_to_one_cpu()?;
        eprintln!("  on CPU {cpu}");
        let mut worlds = vec![];
        for ip in [Ip::V4, Ip::V6] {
            for &n in &sizes {
                let family = if ip == Ip::V4 { "IPv4" } else { "IPv6" };
                eprintln!("  programming {n} {family} Services");
                worlds.push(world(n, ip, &pins)?);
            }
        }
        enter(&worlds[0].fib.ns.path())?;
        let mut bare = bare_xdp::load("bench_xdp_tx", &bare_xdp::tx_insns(), &pins)?;
        let mut bare_t = vec![];
        let mut xdp_t = vec![vec![]; worlds.len()];
        let mut tc_ns = vec![vec![]; worlds.len()];
        for round in 0..rounds {
            eprintln!("  round {} of {rounds}", round + 1);
            enter(&worlds[0].fib.ns.path())?;
            bare_t.push(run_bare(&mut bare, &worlds[0])?.as_secs_f64());
            for (k, w) in worlds.iter_mut().enumerate() {
                enter(&w.fib.ns.path())?;
                xdp_t[k].push(run_xdp(w)?.as_secs_f64());
            }
            for (k, w) in worlds.iter_mut().enumerate() {
                enter(&w.fib.ns.path())?;
                tc_ns[k].push(run_tc(w)?);
            }
        }
        let mpps = |secs: Vec<f64>| FRAMES as f64 / median(secs) / 1e6;

        // The programs' own time, in one more pass with statistics on (they
        // cost two clock reads a run, so the rates above ran without).
        let stats = bpf_stats::enable()?;
        enter(&worlds[0].fib.ns.path())?;
        let (b0, s0) = (bare.info()?, worlds[0].sink.info()?);
        run_bare(&mut bare, &worlds[0])?;
        let bare_ns = per_run(&b0, &bare.info()?);
        let bare_sink = per_run(&s0, &worlds[0].sink.info()?);
        let mut rows = vec![Rate {
            what: BARE,
            services: None,
            mpps: mpps(bare_t),
            prog_ns: bare_ns,
            sink_ns: Some(bare_sink),
        }];
        let mut tc_rows = vec![];
        for (k, w) in worlds.iter_mut().enumerate() {
            enter(&w.fib.ns.path())?;
            let (p0, s0) = (w.l.dp.xdp_program()?.info()?, w.sink.info()?);
            run_xdp(w)?;
            let prog_ns = per_run(&p0, &w.l.dp.xdp_program()?.info()?);
            let sink_ns = per_run(&s0, &w.sink.info()?);
            let t0 = w.l.dp.program(IfaceRole::External)?.info()?;
            run_tc(w)?;
            let tc_prog = per_run(&t0, &w.l.dp.program(IfaceRole::External)?.info()?);
            let (xdp, tc) = match w.ip {
                Ip::V4 => (XDP, TC),
                Ip::V6 => (XDP6, TC6),
            };
            rows.push(Rate {
                what: xdp,
                services: Some(w.services),
                mpps: mpps(std::mem::take(&mut xdp_t[k])),
                prog_ns,
                sink_ns: Some(sink_ns),
            });
            let ns = median(std::mem::take(&mut tc_ns[k]));
            tc_rows.push(Rate {
                what: tc,
                services: Some(w.services),
                mpps: 1e3 / ns,
                prog_ns: tc_prog,
                sink_ns: None,
            });
        }
        drop(stats);
        rows.extend(tc_rows);
        // Programs and links go before their namespaces.
        drop(bare);
        drop(worlds);
        Ok(rows)
    });
    worker
        .join()
        .map_err(|_| anyhow::anyhow!("the packet-rate worker panicked"))?
}

pub fn report(
    md: &mut String,
    rows: &[Rate],
    rounds: u32,
    targets: &mut Vec<(String, bool, String)>,
) {
    use std::fmt::Write as _;
    let _ = writeln!(
        md,
        "## Packet rate on one core (BPF_PROG_TEST_RUN live frames)\n\n\
         The kernel's live-frame mode (BPF_F_TEST_XDP_LIVE_FRAMES, batches of {BATCH}) as the traffic generator: \
         {FRAMES} repetitions of one frame per call, each run through the XDP program as if received on a veth, \
         the verdict carried out. The transmitted frames cross to the veth's peer, where a sink program takes them \
         (it writes the original frame back, since the kernel recycles a frame's page with the data as the program \
         left it, and drops it); every frame is checked at the sink, and the NodePort program's own counter shows each \
         one took the fast path. One thread pinned to one CPU, the sink's softirq on the same CPU; Mpps is frames over \
         the call's wall time, the median of {rounds} rounds, the programs interleaved round by round.\n\n\
         - **{BARE}**: `r0 = XDP_TX; exit`, loaded from two raw instructions: the cost of the path itself.\n\
         - **{XDP}**: the next segment of an open flow from outside to a NodePort whose 10 backends are on another node: \
         conntrack hit, DNAT and SNAT, FIB lookup, MAC and TTL rewrite, out of the arrival interface through the devmap. \
         The Services besides the NodePort are ClusterIP fillers.\n\
         - **{TC}**: the same packet through the tc program. Live frames are XDP only: this is the ordinary \
         BPF_PROG_TEST_RUN, one call per packet with `repeat` 1 (a repeated run keeps the program's output as the next \
         input), {TC_CALLS} calls a round, and the rate is 1 / the kernel's measured program time: no skb is built and \
         nothing is sent, so it is an upper bound that the XDP rows do not get.\n\
         - **{XDP6}**, **{TC6}**: the same over IPv6 (the Services, the NodePort flow and the routes in the other \
         family, the node's address the source of the SNAT).\n\n\
         Program ns is the program's own time per packet from BPF_ENABLE_STATS (run_time_ns / run_cnt) in one more \
         call of each with statistics on; sink ns the same for the sink. The bare program's figure is this measure's \
         floor (the clock reads around each run on this machine), and it is why a program ns can exceed the wall ns per \
         packet measured with statistics off.\n\n\
         | path | Services | Mpps | ns per packet (wall) | program ns | sink ns |\n|---|---:|---:|---:|---:|---:|"
    );
    for r in rows {
        let _ = writeln!(
            md,
            "| {} | {} | {:.2} | {:.0} | {:.0} | {} |",
            r.what,
            r.services.map_or("—".into(), |n| n.to_string()),
            r.mpps,
            1e3 / r.mpps,
            r.prog_ns,
            r.sink_ns.map_or("—".into(), |n| format!("{n:.0}"))
        );
    }
    let Some(bare) = rows.iter().find(|r| r.what == BARE) else {
        return;
    };
    let xdp: Vec<&Rate> = rows.iter().filter(|r| r.what == XDP).collect();
    let (Some(lo), Some(hi)) = (xdp.first(), xdp.last()) else {
        return;
    };
    // The worst size decides the ratio target.
    let worst = xdp
        .iter()
        .map(|r| (bare.mpps / r.mpps, r.services.unwrap_or(0)))
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .unwrap_or((f64::NAN, 0));
    let flat = lo.mpps / hi.mpps;
    let _ = writeln!(
        md,
        "\nXDP NodePort per packet / bare XDP_TX: {} ; Mpps at {} / at {} Services: {flat:.2}×.\n",
        xdp.iter()
            .map(|r| format!("{:.2}× at {}", bare.mpps / r.mpps, r.services.unwrap_or(0)))
            .collect::<Vec<_>>()
            .join(", "),
        lo.services.unwrap_or(0),
        hi.services.unwrap_or(0),
    );
    // IPv6 against IPv4, per packet, at each size both were measured at.
    let per_packet = |what: &str, n: Option<u32>| {
        rows.iter()
            .find(|r| r.what == what && r.services == n)
            .map(|r| 1e3 / r.mpps)
    };
    let family: Vec<String> = [(XDP, XDP6, "XDP"), (TC, TC6, "tc")]
        .iter()
        .flat_map(|&(v4, v6, path)| {
            xdp.iter().filter_map(move |r| {
                let (a, b) = (per_packet(v4, r.services)?, per_packet(v6, r.services)?);
                Some(format!(
                    "{path} {:.2}× at {}",
                    b / a,
                    r.services.unwrap_or(0)
                ))
            })
        })
        .collect();
    if !family.is_empty() {
        let _ = writeln!(
            md,
            "IPv6 / IPv4 per packet, NodePort to another node: {}.\n",
            family.join(", ")
        );
    }
    targets.extend([
        (
            format!(
                "XDP NodePort ≤ 3× bare XDP_TX per packet (worst: {} Services)",
                worst.1
            ),
            worst.0 <= 3.0,
            format!("{:.2}×", worst.0),
        ),
        (
            format!(
                "XDP NodePort Mpps at {} within 1.25× of {}",
                hi.services.unwrap_or(0),
                lo.services.unwrap_or(0)
            ),
            flat <= 1.25,
            format!("{flat:.2}×"),
        ),
    ]);
}
