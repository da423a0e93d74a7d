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
//!
//! Every Service is dual-stack: the hot-set and established rows are
//! measured for IPv6 too, on the same loaded programs, round by round beside
//! IPv4, so that their ratio compares the two families under the same load.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use anyhow::ensure;
use integration_tests::{
    bpf::{Prog, TC_ACT_OK},
    packet::{self, Builder},
    rng::Rng,
};
use service_agent::dataplane::IfaceRole;

use crate::{
    BACKENDS_PER_SERVICE, Loaded, backend_ip, backend_ip6, dual_stack_plan_of, load_families,
    plan_of, vip, vip6,
};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn vip(self, i: u32) -> IpAddr {
        match self {
            Family::V4 => vip(i).into(),
            Family::V6 => vip6(i).into(),
        }
    }

    fn backend(self, i: u32, k: u32) -> IpAddr {
        match self {
            Family::V4 => backend_ip(i, k).into(),
            Family::V6 => backend_ip6(i, k).into(),
        }
    }
}

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
    /// The hot-set and established rows over IPv6 (the Services' IPv6 ClusterIPs).
    pub first_hot6_ns: f64,
    pub established6_ns: f64,
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
    /// IPv4 clients in 10.244.0.0/16, IPv6 ones in fd00:10:244::/64 (pod
    /// ranges of the tests' topology).
    fn next(&mut self, family: Family) -> (IpAddr, u16) {
        let j = self.0;
        self.0 += 1;
        let addr: IpAddr = match family {
            Family::V4 => {
                Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 0, 0)) + j / 50_000).into()
            }
            Family::V6 => Ipv6Addr::from(
                u128::from(Ipv6Addr::new(0xfd00, 0x10, 0x244, 0, 0, 0, 0, 0))
                    + (j / 50_000) as u128,
            )
            .into(),
        };
        (addr, 1024 + (j % 50_000) as u16)
    }
}

/// One SYN to frontend `fe` of `family` must come out translated to one of
/// its backends with valid checksums: otherwise the rows would time packets
/// the program passes untouched (no frontend found), which cost far less.
fn check_translates(
    l: &mut Loaded,
    clients: &mut Clients,
    family: Family,
    fe: u32,
) -> anyhow::Result<()> {
    let (addr, port) = clients.next(family);
    let syn = Builder::tcp(
        &addr.to_string(),
        port,
        &family.vip(fe).to_string(),
        80,
        packet::SYN,
    )
    .build();
    let run = l.run(Prog::Tc(IfaceRole::Pod), &syn);
    ensure!(
        run.verdict == TC_ACT_OK,
        "{family:?} SYN: verdict {}",
        run.verdict
    );
    let (dst, dport, csum_ok): (IpAddr, u16, bool) = match family {
        Family::V4 => {
            let s = packet::parse(&run.packet);
            (
                s.dst.into(),
                s.dport,
                s.ip_csum_ok && s.l4_csum_ok == Some(true),
            )
        }
        Family::V6 => {
            let (_, _, dst, dport, ok) = packet::parse6(&run.packet);
            (dst.into(), dport, ok)
        }
    };
    ensure!(
        (0..BACKENDS_PER_SERVICE).any(|k| family.backend(fe, k) == dst) && dport == 8080,
        "{family:?} SYN to {} left as {dst}:{dport}, not sent to a backend",
        family.vip(fe)
    );
    ensure!(csum_ok, "{family:?} SYN translated with a bad checksum");
    Ok(())
}

/// Mean cost of `flows` first packets, the i-th to `frontend(i)`, and of
/// one more packet of each of those flows once established. Every packet
/// runs once: the program rewrites its input in place, so repeating one
/// packet would measure one translation and then packets that no longer
/// belong to the flow.
fn first_packets(
    l: &mut Loaded,
    clients: &mut Clients,
    family: Family,
    flows: u32,
    frontend: impl Fn(u32) -> u32,
) -> (f64, f64) {
    // Build the packets before timing so only the program runs are summed;
    // each flow's next packet is its ACK, built with its own checksum.
    let (pkts, acks): (Vec<Vec<u8>>, Vec<Vec<u8>>) = (0..flows)
        .map(|i| {
            let (addr, port) = clients.next(family);
            let dst = family.vip(frontend(i)).to_string();
            let mut b = Builder::tcp(&addr.to_string(), port, &dst, 80, packet::SYN);
            let syn = b.build();
            b.tcp_flags = packet::ACK;
            b.seq += 1;
            (syn, b.build())
        })
        .unzip();
    let total: Duration = pkts.iter().map(|p| test_run(l, p, 1)).sum();
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
    hot6_ns: Vec<f64>,
    est6_ns: Vec<f64>,
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
            let mut l = load_families(services, 2);
            let plan = plan_of(services);
            let started = Instant::now();
            let report = l.dp.writer.apply(&mut l.dp.tables, &plan);
            let program_ms = started.elapsed().as_secs_f64() * 1e3;
            assert!(report.errors.is_empty(), "{:?}", &report.errors[..1]);
            // The IPv6 half after the timed IPv4 one, so that "programming
            // from nothing" keeps meaning N IPv4 Services; the writer's diff
            // writes only the IPv6 frontends here.
            let report =
                l.dp.writer
                    .apply(&mut l.dp.tables, &dual_stack_plan_of(services));
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
                hot6_ns: vec![],
                est6_ns: vec![],
            }
        })
        .collect();
    let mut clients = Clients(0);
    for s in loaded.iter_mut() {
        for family in [Family::V4, Family::V6] {
            if let Err(e) = check_translates(&mut s.l, &mut clients, family, s.hot[1]) {
                panic!("at {} Services: {e:#}", s.services);
            }
        }
    }
    eprintln!("  first packets, hot set, IPv4 and IPv6");
    for round in 0..rounds {
        // Alternate which family goes first, so neither always follows the
        // other's cache footprint.
        let order = if round % 2 == 0 {
            [Family::V4, Family::V6]
        } else {
            [Family::V6, Family::V4]
        };
        for s in loaded.iter_mut() {
            let hot = s.hot.clone();
            for family in order {
                let (first, established) =
                    first_packets(&mut s.l, &mut clients, family, flows, |i| {
                        hot[(i % HOT_FRONTENDS) as usize]
                    });
                let (f, e) = match family {
                    Family::V4 => (&mut s.hot_ns, &mut s.est_ns),
                    Family::V6 => (&mut s.hot6_ns, &mut s.est6_ns),
                };
                f.push(first);
                e.push(established);
            }
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
            let (first, _) = first_packets(&mut s.l, &mut clients, Family::V4, flows, |i| {
                draws[i as usize]
            });
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
            first_hot6_ns: median(s.hot6_ns),
            established6_ns: median(s.est6_ns),
        })
        .collect()
}
