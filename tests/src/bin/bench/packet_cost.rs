//! Per-packet cost of the pod-side tc program through BPF_PROG_TEST_RUN.
//!
//! Three numbers per number of Services, each the median of several rounds
//! (one round is short; the median keeps a burst of someone else's build on
//! this shared machine from deciding the result):
//! - first packet, hot set: new flows to the same 16 frontends at every size,
//!   spread evenly over the N Services. Only the number of Services changes
//!   between sizes, so this is the row the flatness target is judged on.
//! - first packet, uniform: new flows to frontends drawn uniformly from all N.
//!   At 100,000 the frontends, their backend slots and counters no longer fit
//!   in the CPU caches: this shows the working-set effect, not the algorithm.
//! - established: one more packet of each hot-set flow, each run once.
use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use integration_tests::{bpf::Prog, packet::Builder, rng::Rng};
use service_agent::dataplane::IfaceRole;

use crate::{Loaded, load, plan_of, vip};

/// How many distinct frontends the hot-set row cycles through.
pub const HOT_FRONTENDS: u32 = 16;

pub fn test_run(l: &mut Loaded, pkt: &[u8], repeat: u32) -> Duration {
    l.test_run(Prog::Tc(IfaceRole::Pod), pkt, repeat)
        .unwrap()
        .duration
}

pub struct PacketCost {
    pub services: u32,
    pub program_ms: f64,
    pub first_hot_ns: f64,
    pub first_uniform_ns: f64,
    pub established_ns: f64,
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// A source of never-repeating client (address, port) pairs, so that every
/// SYN is the first packet of its flow however many rounds run.
struct Clients(u32);

impl Clients {
    fn next(&mut self) -> (String, u16) {
        let j = self.0;
        self.0 += 1;
        let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 0, 0)) + j / 50_000);
        (addr.to_string(), 1024 + (j % 50_000) as u16)
    }
}

/// Mean cost of `flows` first packets, the i-th to `frontend(i)`, and of
/// one more packet of each of those flows once established. Every packet
/// runs once: the program rewrites its input in place, so repeating one
/// packet would measure one translation and then packets that no longer
/// belong to the flow.
fn first_packets(
    l: &mut Loaded,
    clients: &mut Clients,
    flows: u32,
    frontend: impl Fn(u32) -> u32,
) -> (f64, f64) {
    // Build the packets before timing so only the program runs are summed.
    let pkts: Vec<Vec<u8>> = (0..flows)
        .map(|i| {
            let (addr, port) = clients.next();
            Builder::tcp(&addr, port, &vip(frontend(i)).to_string(), 80, 0x02).build()
        })
        .collect();
    let total: Duration = pkts.iter().map(|p| test_run(l, p, 1)).sum();
    let acks: Vec<Vec<u8>> = pkts
        .into_iter()
        .map(|mut p| {
            p[47] = 0x10;
            p
        })
        .collect();
    let est: Duration = acks.iter().map(|p| test_run(l, p, 1)).sum();
    (
        total.as_nanos() as f64 / flows as f64,
        est.as_nanos() as f64 / flows as f64,
    )
}

/// One loaded dataplane and what has been measured on it.
struct Size {
    services: u32,
    l: Loaded,
    program_ms: f64,
    hot: Vec<u32>,
    hot_ns: Vec<f64>,
    uniform_ns: Vec<f64>,
    est_ns: Vec<f64>,
}

/// Per-packet cost at each of `sizes` Services of 10 backends: `rounds`
/// rounds of `flows` new flows per first-packet row; the established cost
/// is that of one more packet of each hot-set flow.
///
/// All sizes are loaded at once and every round visits each size in turn,
/// so whatever else the machine does at some moment is spread over all
/// sizes instead of landing on one. The rows run one after the other (all
/// hot-set rounds, then the uniform ones) so that the uniform
/// rounds, which sweep the caches, never precede a hot-set round.
pub fn packet_costs(sizes: &[u32], flows: u32, rounds: u32) -> Vec<PacketCost> {
    let mut loaded: Vec<Size> = sizes
        .iter()
        .map(|&services| {
            eprintln!("  programming {services} Services");
            let mut l = load(services);
            let plan = plan_of(services);
            let started = Instant::now();
            let report = l.dp.writer.apply(&mut l.dp.tables, &plan);
            let program_ms = started.elapsed().as_secs_f64() * 1e3;
            assert!(report.errors.is_empty(), "{:?}", &report.errors[..1]);
            Size {
                services,
                l,
                program_ms,
                hot: (0..HOT_FRONTENDS)
                    .map(|h| (h as u64 * services as u64 / HOT_FRONTENDS as u64) as u32)
                    .collect(),
                hot_ns: vec![],
                uniform_ns: vec![],
                est_ns: vec![],
            }
        })
        .collect();
    let mut clients = Clients(0);
    eprintln!("  first packets, hot set");
    for _ in 0..rounds {
        for s in loaded.iter_mut() {
            let hot = s.hot.clone();
            let (first, established) = first_packets(&mut s.l, &mut clients, flows, |i| {
                hot[(i % HOT_FRONTENDS) as usize]
            });
            s.hot_ns.push(first);
            s.est_ns.push(established);
        }
    }
    eprintln!("  first packets, uniform");
    // Reproducible draws, the same in every run of the bench.
    let mut rng = Rng::fixed(0x2545_f491);
    for _ in 0..rounds {
        for s in loaded.iter_mut() {
            let draws: Vec<u32> = (0..flows)
                .map(|_| rng.below(s.services as u64) as u32)
                .collect();
            let (first, _) = first_packets(&mut s.l, &mut clients, flows, |i| draws[i as usize]);
            s.uniform_ns.push(first);
        }
    }
    loaded
        .into_iter()
        .map(|s| PacketCost {
            services: s.services,
            program_ms: s.program_ms,
            first_hot_ns: median(s.hot_ns),
            first_uniform_ns: median(s.uniform_ns),
            established_ns: median(s.est_ns),
        })
        .collect()
}
