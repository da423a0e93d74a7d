//! Packet fuzzing through BPF_PROG_TEST_RUN: packets generated around valid
//! ones (truncated, bad header lengths, options, fragments, every TCP flag,
//! bad data offsets, UDP length mismatches, ICMP errors quoting translated
//! flows and garbage, non-IPv4 frames) run through each program; a reference
//! model (`integration_tests::oracle`) predicts verdict and bytes, and every
//! rewritten packet's checksums are verified.
//!
//! `FUZZ_PACKETS` (default 100,000 per program), `FUZZ_SECONDS` and the
//! seed (`TEST_SEED`, see `integration_tests::rng`) tune a run; `cargo xtask
//! fuzz` runs a long one.
use std::time::Instant;

use integration_tests::{
    bpf::{self, Loaded, Prog},
    oracle::{self, Frontend, Model},
    packet::{self, Builder},
    rng::Rng,
};
use service_agent::{
    dataplane::{IfaceRole, MapSizes},
    plan::{FrontendKey, FrontendKind, Plan, Protocol},
};

const VIP: &str = "10.96.0.10";
const EMPTY: &str = "10.96.0.20";
const BACKEND: &str = "10.244.0.11";
const CLIENTS: [&str; 3] = ["10.244.0.20", "10.244.0.21", BACKEND];

fn world() -> Vec<Frontend> {
    let a = |s: &str| s.parse::<std::net::Ipv4Addr>().unwrap().octets();
    vec![
        Frontend {
            addr: a(VIP),
            port: 80,
            proto: 6,
            backend: Some((a(BACKEND), 8080)),
        },
        Frontend {
            addr: a(VIP),
            port: 53,
            proto: 17,
            backend: Some((a(BACKEND), 5353)),
        },
        Frontend {
            addr: a(EMPTY),
            port: 80,
            proto: 6,
            backend: None,
        },
        Frontend {
            addr: a(EMPTY),
            port: 53,
            proto: 17,
            backend: None,
        },
    ]
}

fn plan_of(frontends: &[Frontend]) -> Plan {
    let mut plan = Plan::default();
    for f in frontends {
        let key = FrontendKey {
            addr: f.addr.into(),
            port: f.port,
            proto: if f.proto == 6 {
                Protocol::Tcp
            } else {
                Protocol::Udp
            },
        };
        let backends = f
            .backend
            .iter()
            .map(|(a, p)| bpf::backend((*a).into(), *p, true))
            .collect();
        plan.frontends.insert(
            key,
            bpf::frontend("fuzz/world", FrontendKind::ClusterIp, backends),
        );
    }
    plan
}

/// A packet near a valid one.
fn generate(r: &mut Rng) -> Vec<u8> {
    let client = *r.pick(&CLIENTS);
    let cport = 40000 + r.below(64) as u16;
    let mut b = match r.below(10) {
        0 => Builder::tcp(client, cport, VIP, 80, packet::SYN),
        1 => Builder::tcp(client, cport, VIP, 80, r.below(256) as u8),
        2 => Builder::tcp(BACKEND, 8080, client, cport, packet::SYN | packet::ACK),
        3 => Builder::udp(client, cport, VIP, 53),
        4 => Builder::udp(BACKEND, 5353, client, cport),
        5 => Builder::tcp(
            client,
            cport,
            EMPTY,
            80,
            if r.chance(70) {
                packet::SYN
            } else {
                r.below(256) as u8
            },
        ),
        6 => Builder::udp(client, cport, EMPTY, 53),
        7 => Builder::tcp(client, cport, "10.244.0.99", 80, packet::SYN),
        8 => {
            // An ICMP error quoting a flow (maybe translated, maybe not).
            let quoted = if r.chance(50) {
                Builder::tcp(VIP, 80, client, cport, packet::ACK).build()
            } else {
                Builder::udp(client, cport, BACKEND, 5353).build()
            };
            let mut pkt = packet::icmp_error(
                "10.0.0.254",
                if r.chance(50) { VIP } else { client },
                *r.pick(&[3u8, 11, 12, 0, 8]),
                4,
                &quoted,
            );
            mutate(r, &mut pkt);
            return pkt;
        }
        _ => {
            let mut b = Builder::udp(client, cport, VIP, 53);
            b.frag = if r.chance(50) {
                0x2000
            } else {
                1 + r.below(0x1fff) as u16
            };
            b
        }
    };
    b.payload = (0..r.below(64)).map(|_| r.next_u64() as u8).collect();
    b.udp_zero_csum = r.chance(15);
    if r.chance(10) {
        b.ip_options = 4 * r.below(11) as usize;
    }
    b.seq = r.next_u64() as u32;
    let mut pkt = b.build();
    // Fragments of one datagram share an id; a few ids only, so later
    // fragments meet first ones.
    if b.frag != 0 {
        pkt[18] = 0;
        pkt[19] = r.below(4) as u8;
        fix_ip_checksum(&mut pkt);
    }
    mutate(r, &mut pkt);
    pkt
}

fn fix_ip_checksum(pkt: &mut [u8]) {
    if pkt.len() < 34 {
        return;
    }
    let ihl = ((pkt[14] & 0x0f) as usize) * 4;
    if pkt.len() >= 14 + ihl && ihl >= 20 {
        pkt[24] = 0;
        pkt[25] = 0;
        let c = packet::checksum(&pkt[14..14 + ihl]);
        pkt[24..26].copy_from_slice(&c.to_be_bytes());
    }
}

fn mutate(r: &mut Rng, pkt: &mut Vec<u8>) {
    if !r.chance(40) {
        return;
    }
    match r.below(9) {
        0 => pkt.truncate(r.below(pkt.len() as u64 + 1) as usize),
        1 => pkt[14] = 0x40 | r.below(16) as u8,
        2 => {
            let v = r.below(1600) as u16;
            pkt[16..18].copy_from_slice(&v.to_be_bytes());
        }
        3 => pkt[22] = r.below(2) as u8, // TTL 0 or 1
        4 if !pkt.is_empty() => {
            let i = r.below(pkt.len() as u64) as usize;
            pkt[i] ^= 1 << r.below(8);
        }
        5 => {
            // TCP data offset out of range (if TCP with a plain header).
            if pkt.len() > 46 && pkt[23] == 6 {
                pkt[46] = (r.below(16) as u8) << 4;
            }
        }
        6 => {
            // UDP length that disagrees with the IP length.
            if pkt.len() > 40 && pkt[23] == 17 {
                let v = r.below(2000) as u16;
                pkt[38..40].copy_from_slice(&v.to_be_bytes());
            }
        }
        7 => {
            // A VLAN tag or another ethertype.
            const OTHER: [[u8; 2]; 3] = [[0x81, 0x00], [0x86, 0xdd], [0x08, 0x06]];
            let t = *r.pick(&OTHER);
            pkt[12..14].copy_from_slice(&t);
        }
        _ => {
            pkt[20] = r.below(256) as u8;
            pkt[21] = r.below(256) as u8;
        }
    }
    if r.chance(50) {
        fix_ip_checksum(pkt);
    }
}

/// Runs `packets` generated packets (or as many as `seconds` allow) through
/// the program of `role`: how many ran, and the mismatches with the model.
fn run_program(role: IfaceRole, rng: &mut Rng, packets: u64, seconds: u64) -> (u64, Vec<String>) {
    let sizes = MapSizes {
        conntrack: 1 << 20,
        ..MapSizes::default()
    };
    let frontends = world();
    let mut l = Loaded::with_plan("fuzz", &sizes, &plan_of(&frontends)).unwrap();
    let mut model = Model::new(frontends);
    let deadline = Instant::now() + std::time::Duration::from_secs(seconds);
    let mut mismatches = vec![];
    let mut n = 0;
    let mut refused = 0u64;
    let mut seen: std::collections::BTreeMap<String, u64> = Default::default();
    while n < packets && Instant::now() < deadline {
        let pkt = generate(rng);
        if pkt.len() < 14 {
            refused += 1; // BPF_PROG_TEST_RUN refuses frames shorter than Ethernet.
            continue;
        }
        let expect = model.step(&pkt);
        let kind = format!("{expect:?}");
        *seen
            .entry(kind.split([' ', '{']).next().unwrap_or("").to_string())
            .or_insert(0u64) += 1;
        let r = match l.test_run(Prog::Tc(role), &pkt, 1) {
            Ok(r) => r,
            Err(_) if refused_by_test_run(&pkt) => {
                refused += 1;
                continue;
            }
            Err(e) => panic!("{e:#}: {pkt:02x?}"),
        };
        n += 1;
        if let Some(m) = oracle::check(&pkt, r.verdict, &r.packet, &expect) {
            if mismatches.len() < 5 {
                mismatches.push(format!("packet #{n} {pkt:02x?}: {m}"));
            } else {
                mismatches.push(String::new());
            }
        }
    }
    // Every kind of outcome was exercised, so agreement means something.
    if n >= 100_000 {
        for kind in [
            "Unchanged",
            "Drop",
            "Rewritten",
            "AddressesRewritten",
            "Reset",
            "PortUnreachable",
            "IcmpRewritten",
        ] {
            let got = seen.get(kind).copied().unwrap_or(0);
            assert!(got >= 100, "only {got} packets expected {kind}: {seen:?}");
        }
    }
    eprintln!("{role:?}: {seen:?}");
    // The harness, not the program: a few percent at most.
    assert!(
        refused * 20 <= n,
        "{refused} frames refused by BPF_PROG_TEST_RUN for {n} run"
    );
    (n, mismatches)
}

/// BPF_PROG_TEST_RUN refuses an IPv4/IPv6 frame too short to hold its
/// network header (the kernel reads it to fill the test socket); a NIC
/// would hand such a frame over, and the model says "unchanged" for it.
fn refused_by_test_run(pkt: &[u8]) -> bool {
    match [pkt[12], pkt[13]] {
        [0x08, 0x00] => pkt.len() < 14 + 20,
        [0x86, 0xdd] => pkt.len() < 14 + 40,
        _ => false,
    }
}

fn settings() -> (u64, u64) {
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    (env("FUZZ_PACKETS", 100_000), env("FUZZ_SECONDS", 600))
}

fn fuzz(role: IfaceRole, stream: &'static str) {
    let (packets, seconds) = settings();
    let mut rng = Rng::for_test(stream);
    let (n, m) = run_program(role, &mut rng, packets, seconds);
    assert!(
        m.is_empty(),
        "{} mismatches in {n} packets:\n{}",
        m.len(),
        m.join("\n")
    );
    assert!(
        n >= packets.min(100_000) || seconds < 600,
        "only {n} packets"
    );
    eprintln!(
        "{role:?} program: {n} packets, 0 mismatches (TEST_SEED={:#x})",
        rng.seed()
    );
}

#[test]
fn pod_program_matches_the_model_on_generated_packets() {
    fuzz(IfaceRole::Pod, "fuzz pod program");
}

#[test]
fn external_program_matches_the_model_on_generated_packets() {
    fuzz(IfaceRole::External, "fuzz external program");
}
