//! Packet fuzzing through BPF_PROG_TEST_RUN: packets generated around the
//! fuzz world's flows (`integration_tests::fuzz`: ClusterIPs, NodePorts
//! source-NATed to backends on other nodes, several backends, affinity,
//! source ranges, policy Local) run through each program, and the
//! reference model (`integration_tests::oracle`) predicts verdict, bytes and
//! counted reasons; it accepts any backend or port the program may choose
//! for a new flow and holds the flow to it. The XDP program runs first on
//! external traffic, and what it passes goes on to tc, as on a node.
//!
//! `FUZZ_PACKETS` (default 60,000 per program), `FUZZ_SECONDS` and the seed
//! (`TEST_SEED`, see `integration_tests::rng`) tune a run; `cargo xtask
//! fuzz` runs a long one.
use std::{collections::BTreeMap, net::Ipv4Addr, time::Instant};

use integration_tests::{
    bpf::{Loaded, Prog},
    fuzz::{self, EXTERNAL_CLIENTS, POD_CLIENTS, generate},
    oracle::{Model, SourceClass, XdpStep},
    rng::Rng,
};
use service_agent::dataplane::{IfaceRole, MapSizes};
use service_common::{Reason, Verdict};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Program {
    Pod,
    External,
    /// XDP, then tc on external interfaces for what it passes.
    Xdp,
}

/// What a run saw.
#[derive(Default)]
struct Report {
    packets: u64,
    refused: u64,
    mismatches: Vec<String>,
    /// The model's outcomes by kind (for tc: every packet tc ran).
    kinds: BTreeMap<&'static str, u64>,
    /// XDP's own verdicts.
    xdp: BTreeMap<String, u64>,
    /// Reasons the model predicted, and what the programs counted.
    predicted: BTreeMap<&'static str, u64>,
    counted: BTreeMap<&'static str, u64>,
}

impl Report {
    fn mismatch(&mut self, n: u64, pkt: &[u8], m: String) {
        if self.mismatches.len() < 5 {
            self.mismatches.push(format!("packet #{n} {pkt:02x?}: {m}"));
        } else {
            self.mismatches.push(String::new());
        }
    }
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

/// An IPv4 packet whose source is one of the node's addresses.
fn sent_by_node(pkt: &[u8]) -> bool {
    pkt.len() >= 34
        && pkt[12..14] == [0x08, 0x00]
        && [fuzz::NODE, fuzz::NODE2]
            .iter()
            .any(|n| pkt[26..30] == fuzz::a(n))
}

fn settings() -> (u64, u64) {
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    (env("FUZZ_PACKETS", 60_000), env("FUZZ_SECONDS", 600))
}

/// Runs generated packets through `program` in the world's namespace.
fn run(program: Program, stream: &'static str, packets: u64, seconds: u64) -> Report {
    let fib = fuzz::network().unwrap();
    let (ext0, ext2) = (fib.mac("ext0").unwrap(), fib.mac("ext2").unwrap());
    fib.ns
        .within(move || {
            let source = match program {
                Program::Pod => SourceClass::InCluster,
                _ => SourceClass::External,
            };
            let world = fuzz::world(source, ext0, ext2);
            let sizes = MapSizes {
                conntrack: 1 << 20,
                ..MapSizes::default()
            };
            let mut l = Loaded::with_plan("fuzz", &sizes, &fuzz::plan(&world)).unwrap();
            let node = |s: &str| s.parse::<Ipv4Addr>().unwrap();
            l.set_node_addrs(&[node(fuzz::NODE), node(fuzz::NODE2)], node(fuzz::NODE))
                .unwrap();
            let ingress = match program {
                Program::Xdp => {
                    l.attach_xdp("ext2").unwrap();
                    l.attach_xdp("ext0").unwrap()
                }
                _ => 0,
            };
            let mut rng = Rng::for_test(stream);
            let clients: &[&str] = match program {
                Program::Pod => &POD_CLIENTS,
                _ => &EXTERNAL_CLIENTS,
            };
            let mut model = Model::new(world);
            let mut r = Report::default();
            let deadline = Instant::now() + std::time::Duration::from_secs(seconds);
            while r.packets < packets && Instant::now() < deadline {
                let pkt = generate::packet(&mut rng, &model, clients);
                if pkt.len() < 14 || refused_by_test_run(&pkt) {
                    // BPF_PROG_TEST_RUN refuses frames shorter than their headers.
                    r.refused += 1;
                    continue;
                }
                r.packets += 1;
                let n = r.packets;
                if program == Program::Xdp {
                    let x = l.run(Prog::Xdp { ingress }, &pkt);
                    match model.observe_xdp(&pkt, x.verdict, &x.packet) {
                        Err(m) => {
                            r.mismatch(n, &pkt, m);
                            continue;
                        }
                        Ok((step, reasons)) => {
                            *r.xdp.entry(format!("{step:?}")).or_default() += 1;
                            for reason in reasons {
                                *r.predicted.entry(reason.name()).or_default() += 1;
                            }
                            if !matches!(step, XdpStep::Passed) {
                                continue;
                            }
                        }
                    }
                }
                let role = match program {
                    Program::Pod => IfaceRole::Pod,
                    _ => IfaceRole::External,
                };
                // What the node itself sends (a host-network endpoint's
                // replies) leaves through egress; ingress never sees it.
                let from_node = program == Program::External && sent_by_node(&pkt);
                let observed = if from_node {
                    let out = l.run(Prog::TcEgress, &pkt);
                    model.observe_egress(&pkt, out.verdict, &out.packet)
                } else {
                    let out = l.run(Prog::Tc(role), &pkt);
                    model.observe_tc(&pkt, out.verdict, &out.packet)
                };
                match observed {
                    Ok((e, reasons)) => {
                        *r.kinds.entry(e.kind()).or_default() += 1;
                        for reason in reasons {
                            *r.predicted.entry(reason.name()).or_default() += 1;
                        }
                    }
                    Err(m) => r.mismatch(n, &pkt, m),
                }
            }
            for reason in Reason::ALL {
                let c = l.reason(reason);
                if c > 0 {
                    r.counted.insert(reason.name(), c);
                }
            }
            r
        })
        .expect("the fuzz run in the world's namespace")
}

/// The reasons each program's world must produce, at least `MIN` times each.
fn expected_reasons(program: Program) -> Vec<Reason> {
    use Reason::*;
    let mut r = vec![
        RejectedNoBackend,
        RejectFailed,
        FragmentPassed,
        FragmentTranslated,
        MalformedIp,
        TruncatedL4,
        ReplyTranslated,
        CtHit,
        NewFlow,
        AffinityHit,
        NoLocalEndpoint,
        IcmpErrorTranslated,
        CtInvalid,
        SourceRangeDenied,
        TupleClashPortRewritten,
    ];
    if program != Program::Pod {
        r.push(SnatFlow);
    }
    if program == Program::Xdp {
        r.extend([XdpTx, XdpRedirect, XdpPassedToTc]);
    }
    if program == Program::External {
        r.push(LocalReplyTranslated);
    }
    r
}

const MIN: u64 = 20;

fn fuzz(program: Program, stream: &'static str) {
    let (packets, seconds) = settings();
    let seed = integration_tests::rng::seed();
    eprintln!(
        "{program:?}: seed {seed:#x}; replay with TEST_SEED={seed:#x} cargo test -p integration-tests --test fuzz"
    );
    let r = run(program, stream, packets, seconds);
    eprintln!(
        "{program:?}: {} packets; tc outcomes {:?}; XDP {:?}\n  reasons counted {:?}",
        r.packets, r.kinds, r.xdp, r.counted
    );
    let replay = format!("(replay: TEST_SEED={seed:#x})");
    assert!(
        r.mismatches.is_empty(),
        "{} mismatches in {} packets {replay}:\n{}",
        r.mismatches.len(),
        r.packets,
        r.mismatches.join("\n")
    );
    assert!(
        r.refused * 20 <= r.packets,
        "{} frames refused by BPF_PROG_TEST_RUN for {} run",
        r.refused,
        r.packets
    );
    assert_eq!(
        r.predicted, r.counted,
        "reasons the model predicted (left) and the programs counted (right) {replay}"
    );
    // A short run (FUZZ_SECONDS, FUZZ_PACKETS) cannot be held to the tallies.
    if r.packets < 60_000 {
        return;
    }
    for reason in expected_reasons(program) {
        let got = r.counted.get(reason.name()).copied().unwrap_or(0);
        assert!(
            got >= MIN,
            "{program:?}: only {got} packets counted {reason:?} {replay}"
        );
    }
    for verdict in [
        Verdict::Passed,
        Verdict::Translated,
        Verdict::Answered,
        Verdict::Dropped,
    ] {
        let got: u64 = Reason::ALL
            .iter()
            .filter(|x| x.verdict() == verdict)
            .map(|x| r.counted.get(x.name()).copied().unwrap_or(0))
            .sum();
        assert!(
            got >= 10 * MIN,
            "{program:?}: only {got} packets {}",
            verdict.name()
        );
    }
    for kind in [
        "Unchanged",
        "Drop",
        "Rewritten",
        "AddressesRewritten",
        "Reset",
        "PortUnreachable",
        "IcmpRewritten",
        "ToNextHop",
    ] {
        let got = r.kinds.get(kind).copied().unwrap_or(0);
        assert!(
            got >= MIN,
            "{program:?}: only {got} packets expected {kind}: {:?}",
            r.kinds
        );
    }
    if program == Program::Xdp {
        for step in ["Passed", "Dropped", "Forwarded"] {
            let got = r.xdp.get(step).copied().unwrap_or(0);
            assert!(got >= MIN, "XDP {step} only {got} times: {:?}", r.xdp);
        }
    }
}

#[test]
fn pod_program_matches_the_model_on_generated_packets() {
    fuzz(Program::Pod, "fuzz pod program");
}

#[test]
fn external_program_matches_the_model_on_generated_packets() {
    fuzz(Program::External, "fuzz external program");
}

#[test]
fn xdp_then_tc_match_the_model_on_generated_packets() {
    fuzz(Program::Xdp, "fuzz xdp program");
}
