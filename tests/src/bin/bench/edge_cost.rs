//! Per-packet cost on the node's external interfaces, XDP against tc, for
//! what the XDP fast path carries: flows from outside to frontends whose
//! backends are on another node (source-NATed), first packets and packets
//! of established flows, both directions of the flow alike. Runs in a
//! namespace of its own whose routes and neighbours the programs' FIB
//! lookups see; no packet is sent anywhere.
//!
//! Every packet runs once (`repeat` 1) and the runs are summed: a program
//! rewrites its input in place, so repeating one packet would measure one
//! translation and then a stream of packets that no longer match anything.
use std::{net::Ipv4Addr, time::Duration};

use integration_tests::{
    bpf::{FibNamespace, Loaded, Prog},
    netns::enter,
    packet::Builder,
};
use service_agent::dataplane::IfaceRole;

use crate::{load, packet_cost::median, plan_of, vip};

const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 1);
/// Frontends the first packets go to, spread over all Services.
const HOT: u32 = 16;

pub struct EdgeCost {
    pub services: u32,
    pub xdp_first_ns: f64,
    pub xdp_established_ns: f64,
    pub tc_first_ns: f64,
    pub tc_established_ns: f64,
}

/// The namespace: the external interface, a peer node whose neighbour entry
/// is known and that routes the backends' range, and the client.
fn world() -> anyhow::Result<FibNamespace> {
    let fib = FibNamespace::new("bench-edge")?;
    fib.link("ext0", "wire0", "192.168.50.1/24")?
        .neighbour("192.168.50.20", [0x02, 0, 0, 0, 0x00, 0x20], "ext0")?
        .route("10.128.0.0/12", &["via", "192.168.50.20"])?
        .route("172.16.0.0/12", &["via", "192.168.50.20"])?;
    Ok(fib)
}

/// Mean cost of first packets (SYNs of new flows to the hot frontends) and
/// of packets of those flows once established (the replies and the next
/// segments), for one program.
fn costs(
    l: &mut Loaded,
    prog: Prog,
    services: u32,
    flows: u32,
    next_client: &mut u32,
) -> (f64, f64) {
    let hot: Vec<u32> = (0..HOT)
        .map(|h| (h as u64 * services as u64 / HOT as u64) as u32)
        .collect();
    let syns: Vec<Vec<u8>> = (0..flows)
        .map(|i| {
            let j = *next_client;
            *next_client += 1;
            let client = Ipv4Addr::from(u32::from(Ipv4Addr::new(172, 16, 0, 0)) + j / 50_000);
            let port = 1024 + (j % 50_000) as u16;
            let fe = vip(hot[(i % HOT) as usize]).to_string();
            Builder::tcp(&client.to_string(), port, &fe, 80, 0x02).build()
        })
        .collect();
    let mut first = Duration::ZERO;
    let mut later = vec![];
    for syn in &syns {
        let r = l.run(prog, syn);
        let out = r.packet;
        first += r.duration;
        // The backend's SYN-ACK to the node, then the client's ACK: both
        // are packets of an established flow.
        let (sport, dst) = (
            u16::from_be_bytes([out[34], out[35]]),
            Ipv4Addr::new(out[30], out[31], out[32], out[33]),
        );
        later.push(Builder::tcp(&dst.to_string(), 8080, &NODE.to_string(), sport, 0x12).build());
        let mut ack = syn.clone();
        ack[47] = 0x10;
        later.push(ack);
    }
    let est: Duration = later.iter().map(|p| l.run(prog, p).duration).sum();
    (
        first.as_nanos() as f64 / flows as f64,
        est.as_nanos() as f64 / later.len() as f64,
    )
}

/// Both programs at each of `sizes` frontends of 10 remote backends each:
/// medians over `rounds` rounds of `flows` flows, the rounds interleaved
/// across sizes so that whatever else this machine does lands on every size
/// alike.
pub fn edge_costs(sizes: &[u32], flows: u32, rounds: u32) -> anyhow::Result<Vec<EdgeCost>> {
    let worlds: Vec<FibNamespace> = sizes.iter().map(|_| world()).collect::<Result<_, _>>()?;
    let paths: Vec<String> = worlds.iter().map(|w| w.ns.path()).collect();
    let sizes = sizes.to_vec();
    // One thread hops between the worlds' namespaces: BPF_PROG_TEST_RUN
    // resolves the ingress interface, and the FIB lookups run, in the
    // caller's network namespace.
    let worker = std::thread::spawn(move || -> anyhow::Result<Vec<EdgeCost>> {
        let mut loaded = vec![];
        for (path, &services) in paths.iter().zip(&sizes) {
            enter(path)?;
            let mut l = load(services);
            let mut plan = plan_of(services);
            for fe in plan.frontends.values_mut() {
                fe.backends = fe
                    .backends
                    .iter()
                    .map(|b| service_agent::plan::BackendAddr { local: false, ..*b })
                    .collect();
            }
            l.apply(&plan)?;
            l.set_node_addr(NODE)?;
            let ifindex = l.attach_xdp("ext0")?;
            loaded.push((l, ifindex));
        }
        let mut next_client = 0;
        let mut samples = vec![[vec![], vec![], vec![], vec![]]; sizes.len()];
        for _ in 0..rounds {
            for (k, ((l, ifindex), &services)) in loaded.iter_mut().zip(&sizes).enumerate() {
                enter(&paths[k])?;
                let (f, e) = costs(
                    l,
                    Prog::Xdp { ingress: *ifindex },
                    services,
                    flows,
                    &mut next_client,
                );
                samples[k][0].push(f);
                samples[k][1].push(e);
                let (f, e) = costs(
                    l,
                    Prog::Tc(IfaceRole::External),
                    services,
                    flows,
                    &mut next_client,
                );
                samples[k][2].push(f);
                samples[k][3].push(e);
            }
        }
        Ok(sizes
            .iter()
            .zip(samples)
            .map(|(&services, [xf, xe, tf, te])| EdgeCost {
                services,
                xdp_first_ns: median(xf),
                xdp_established_ns: median(xe),
                tc_first_ns: median(tf),
                tc_established_ns: median(te),
            })
            .collect())
    });
    let out = worker
        .join()
        .map_err(|_| anyhow::anyhow!("the per-packet worker panicked"))?;
    drop(worlds);
    out
}

pub fn report(
    md: &mut String,
    rows: &[EdgeCost],
    flows: u32,
    rounds: u32,
    targets: &mut Vec<(String, bool, String)>,
) {
    use std::fmt::Write as _;
    let _ = writeln!(
        md,
        "## Per-packet cost on external interfaces: XDP and tc (BPF_PROG_TEST_RUN)\n\n\
         What the XDP fast path carries: flows from outside to frontends whose 10 backends are on another node \
         (source-NATed), in a namespace whose FIB the programs consult. Nanoseconds per packet, the median of {rounds} \
         rounds of {flows} new flows to {HOT} frontends spread over the N Services; **first packet** is the SYN (lookup, \
         backend pick, SNAT port, two conntrack inserts, rewrite, FIB lookup), **established** the backend's SYN-ACK and \
         the client's next segment. XDP rewrites the Ethernet header and TTL too and hands the frame to the devmap; \
         tc rewrites and redirects an skb the kernel has already built, a cost this table does not show (the \
         end-to-end rates do).\n\n\
         | Services | XDP first packet (ns) | XDP established (ns) | tc first packet (ns) | tc established (ns) |\n\
         |---:|---:|---:|---:|---:|"
    );
    for r in rows {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} |",
            r.services, r.xdp_first_ns, r.xdp_established_ns, r.tc_first_ns, r.tc_established_ns
        );
    }
    let (Some(lo), Some(hi)) = (rows.first(), rows.last()) else {
        return;
    };
    let first = hi.xdp_first_ns / lo.xdp_first_ns;
    let est = hi.xdp_established_ns / lo.xdp_established_ns;
    let _ = writeln!(
        md,
        "\nXDP at {} vs {} Services: first packet {first:.2}×, established {est:.2}×.\n",
        hi.services, lo.services
    );
    targets.extend([
        (
            format!(
                "XDP per-packet cost flat: first packet at {} Services within 1.25× of {}",
                hi.services, lo.services
            ),
            first <= 1.25,
            format!("{first:.2}×"),
        ),
        (
            "XDP per-packet cost flat: established flow within 1.25×".to_string(),
            est <= 1.25,
            format!("{est:.2}×"),
        ),
    ]);
}
