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
use service_agent::{
    dataplane::{IfaceRole, MapSizes},
    plan::ipnet_lite::IpNet,
};
use service_common::{Reason, Verdict};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Program {
    Pod,
    External,
    /// XDP, then tc on external interfaces for what it passes.
    Xdp,
}

/// What one program of a run was predicted to do, as the model met it.
#[derive(Default, Debug)]
struct Tally {
    /// Outcomes by kind (the model's, or XDP's own step).
    kinds: BTreeMap<String, u64>,
    reasons: BTreeMap<&'static str, u64>,
}

impl Tally {
    fn add(&mut self, kind: String, reasons: Vec<Reason>) {
        *self.kinds.entry(kind).or_default() += 1;
        self.count(reasons);
    }

    fn count(&mut self, reasons: Vec<Reason>) {
        for reason in reasons {
            *self.reasons.entry(reason.name()).or_default() += 1;
        }
    }

    /// Packets counted under a reason of `verdict`.
    fn verdict(&self, verdict: Verdict) -> u64 {
        Reason::ALL
            .iter()
            .filter(|x| x.verdict() == verdict)
            .map(|x| self.reasons.get(x.name()).copied().unwrap_or(0))
            .sum()
    }
}

/// What a run saw.
#[derive(Default)]
struct Report {
    packets: u64,
    refused: u64,
    mismatches: Vec<String>,
    /// By program part: tc ingress, tc egress, XDP.
    tc: Tally,
    egress: Tally,
    xdp: Tally,
    /// What the programs counted (one REASONS map for all of them).
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

    fn predicted(&self) -> BTreeMap<&'static str, u64> {
        let mut all = self.tc.reasons.clone();
        for (k, v) in self.egress.reasons.iter().chain(&self.xdp.reasons) {
            *all.entry(k).or_default() += v;
        }
        all
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

/// The world's `--cluster-cidr` as the agent takes it.
fn model_cidrs(w: &integration_tests::oracle::World) -> Vec<IpNet> {
    w.cluster_cidrs
        .iter()
        .map(|(n, l)| format!("{}/{l}", Ipv4Addr::from(*n)).parse().unwrap())
        .collect()
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
            let cidrs: Vec<_> = model_cidrs(&world);
            l.dp.writer
                .set_cluster_cidrs(&mut l.dp.tables, &cidrs)
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
                            r.xdp.add(format!("{step:?}"), reasons);
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
                let (observed, tally) = if from_node {
                    let out = l.run(Prog::TcEgress, &pkt);
                    let o = model.observe_egress(&pkt, out.verdict, &out.packet);
                    (o, &mut r.egress)
                } else {
                    let out = l.run(Prog::Tc(role), &pkt);
                    let o = model.observe_tc(&pkt, out.verdict, &out.packet);
                    (o, &mut r.tc)
                };
                match observed {
                    Ok((e, reasons)) => tally.add(e.kind().to_string(), reasons),
                    Err(m) => r.mismatch(n, &pkt, m),
                }
                r.xdp.count(model.take_deferred_xdp_reasons());
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

/// The reasons tc ingress must count in each world, at least `MIN` times each.
fn tc_reasons(program: Program) -> Vec<Reason> {
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
        IcmpErrorTranslated,
        CtInvalid,
        SourceRangeDenied,
        TupleClashPortRewritten,
        ReusedTupleRetired,
    ];
    // Policy Local drops only what comes from outside the cluster.
    if program != Program::Pod {
        r.extend([SnatFlow, NoLocalEndpoint]);
    }
    r
}

/// XDP's own: how it sends, what it hands to tc, what it drops, and the
/// flows it opens.
const XDP_REASONS: [Reason; 11] = [
    Reason::XdpTx,
    Reason::XdpRedirect,
    Reason::XdpPassedToTc,
    Reason::CtInvalid,
    Reason::SourceRangeDenied,
    Reason::NewFlow,
    Reason::SnatFlow,
    Reason::CtHit,
    Reason::ReplyTranslated,
    Reason::AffinityHit,
    Reason::TupleClashPortRewritten,
];

const MIN: u64 = 20;

/// Fails unless every reason of `reasons`, every verdict of `verdicts` and
/// every outcome of `kinds` occurred `MIN` times or more in `t`.
fn assert_covered(part: &str, t: &Tally, reasons: &[Reason], verdicts: &[Verdict], kinds: &[&str]) {
    for reason in reasons {
        let got = t.reasons.get(reason.name()).copied().unwrap_or(0);
        assert!(
            got >= MIN,
            "{part}: only {got} packets counted {reason:?}: {t:?}"
        );
    }
    for v in verdicts {
        let got = t.verdict(*v);
        assert!(got >= MIN, "{part}: only {got} packets {}: {t:?}", v.name());
    }
    for kind in kinds {
        let got = t.kinds.get(*kind).copied().unwrap_or(0);
        assert!(
            got >= MIN,
            "{part}: only {got} packets expected {kind}: {t:?}"
        );
    }
}

fn fuzz(program: Program, stream: &'static str) {
    let (packets, seconds) = settings();
    let seed = integration_tests::rng::seed();
    eprintln!(
        "{program:?}: seed {seed:#x}; replay with TEST_SEED={seed:#x} cargo test -p integration-tests --test fuzz"
    );
    let r = run(program, stream, packets, seconds);
    eprintln!(
        "{program:?}: {} packets\n  tc {:?}\n  egress {:?}\n  XDP {:?}",
        r.packets, r.tc, r.egress, r.xdp
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
        r.predicted(),
        r.counted,
        "reasons the model predicted (left) and the programs counted (right) {replay}"
    );
    // A short run (FUZZ_SECONDS, FUZZ_PACKETS) cannot be held to the tallies.
    if r.packets < 60_000 {
        return;
    }
    use Verdict::*;
    let kinds = [
        "Unchanged",
        "Drop",
        "Rewritten",
        "AddressesRewritten",
        "Reset",
        "PortUnreachable",
        "IcmpRewritten",
        "ToNextHop",
    ];
    let all = [Passed, Translated, Answered, Dropped];
    assert_covered("tc ingress", &r.tc, &tc_reasons(program), &all, &kinds);
    match program {
        Program::External => assert_covered(
            "tc egress",
            &r.egress,
            &[Reason::LocalReplyTranslated],
            &[Translated],
            &["Unchanged", "Rewritten"],
        ),
        Program::Xdp => assert_covered(
            "XDP",
            &r.xdp,
            &XDP_REASONS,
            &[Passed, Translated, Dropped],
            &["Passed", "Dropped", "Forwarded"],
        ),
        Program::Pod => {}
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
