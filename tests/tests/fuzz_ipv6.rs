//! IPv6 packet fuzzing through BPF_PROG_TEST_RUN: packets to an IPv6
//! ClusterIP, replies of its backend and packets for nobody, behind random
//! chains of extension headers (hop-by-hop, routing, destination options,
//! fragment headers of first, later and whole datagrams), then damaged
//! (truncated at any offset, a payload length that lies, another version,
//! UDP checksum 0). A reference model of the IPv6 path (`Model6`) predicts
//! each packet's outcome from its bytes alone: passed untouched, rewritten
//! (to which tuple), dropped or answered, and the reasons counted. Any
//! mismatch fails the test with the packet and the seed (`TEST_SEED`).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv6Addr,
};

use integration_tests::{
    bpf::{self, Loaded, Prog, TC_ACT_OK},
    packet::{self, ACK, Builder, RST, SYN},
    rng::Rng,
};
use service_agent::{
    dataplane::IfaceRole,
    plan::{FrontendKey, FrontendKind, Plan, Protocol},
};
use service_common::Reason;

const POD: Prog = Prog::Tc(IfaceRole::Pod);
const VIP: &str = "fd00:96::10";
/// A ClusterIP without endpoints: it rejects.
const EMPTY: &str = "fd00:96::20";
const BACKEND: &str = "fd00:10:244:1::b";
const CLIENT: &str = "fd00:10:244:1::c";
/// No frontend, no backend: packets there are none of the dataplane's.
const ELSEWHERE: &str = "fd00:99::1";
const BACKEND_PORT: u16 = 8080;

const HOP: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const DEST: u8 = 60;
const ICMPV6: u8 = 58;

fn a6(s: &str) -> [u8; 16] {
    s.parse::<Ipv6Addr>().unwrap().octets()
}

type Tuple6 = ([u8; 16], u16, [u8; 16], u16, u8);
/// A fragmented datagram: source, destination, identification, protocol.
type FragId = ([u8; 16], [u8; 16], u32, u8);

/// What the model expects of one packet.
#[derive(Debug, PartialEq)]
enum Expect {
    Unchanged,
    /// The L4 tuple rewritten to this, with a valid L4 checksum.
    Rewritten(Tuple6),
    /// A later fragment: only its addresses rewritten.
    Addresses([u8; 16], [u8; 16]),
    Dropped,
    /// Turned into a RST or an ICMPv6 port unreachable.
    Answered,
}

/// The IPv6 path as the programs should run it, for the world above:
/// the parse of `packet6.rs`, then conntrack, the frontends and fragments.
#[derive(Default)]
struct Model6 {
    /// Forward (client → frontend) and reply (backend → client) entries:
    /// the tuple each rewrites to.
    ct: BTreeMap<Tuple6, Tuple6>,
    /// First fragments seen: (src, dst, id, proto) → new (src, dst).
    frags: BTreeMap<FragId, ([u8; 16], [u8; 16])>,
}

enum Parsed {
    Other,
    Untouchable(Reason),
    Later([u8; 16], [u8; 16], u32, u8),
    Flow {
        t: Tuple6,
        flags: u8,
        first_fragment: Option<(u32, u8)>,
    },
}

fn be16(b: &[u8], o: usize) -> u16 {
    u16::from_be_bytes([b[o], b[o + 1]])
}

/// `packet6::parse` over the frame's bytes.
fn parse(pkt: &[u8]) -> Parsed {
    if pkt.len() < 14 + 40 || pkt[14] >> 4 != 6 {
        return Parsed::Untouchable(Reason::MalformedIpv6);
    }
    let ip = &pkt[14..];
    let ip_end = 14 + 40 + be16(ip, 4) as usize;
    if ip_end > pkt.len() {
        return Parsed::Untouchable(Reason::MalformedIpv6);
    }
    let src: [u8; 16] = ip[8..24].try_into().unwrap();
    let dst: [u8; 16] = ip[24..40].try_into().unwrap();
    let ext = |n: u8| matches!(n, HOP | ROUTING | FRAGMENT | DEST);
    let mut next = ip[6];
    let mut off = 14 + 40;
    let mut frag = None;
    for _ in 0..6 {
        if !ext(next) {
            break;
        }
        if off + 8 > pkt.len() {
            return Parsed::Untouchable(Reason::MalformedIpv6);
        }
        let h = &pkt[off..off + 8];
        if next == FRAGMENT {
            let field = be16(h, 2);
            let id = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
            if field & 0xfff8 != 0 {
                if h[0] != packet::TCP && h[0] != packet::UDP {
                    return Parsed::Other;
                }
                return Parsed::Later(src, dst, id, h[0]);
            }
            frag = Some((id, h[0], field & 1 != 0));
            off += 8;
        } else {
            off += (h[1] as usize + 1) * 8;
        }
        next = h[0];
        if off > ip_end {
            return Parsed::Untouchable(Reason::MalformedIpv6);
        }
    }
    if ext(next) {
        return Parsed::Untouchable(Reason::Ipv6ExtChainTooLong);
    }
    if next == ICMPV6 || (next != packet::TCP && next != packet::UDP) {
        // The generator makes no ICMPv6 errors: every ICMPv6 message here
        // (neighbour discovery) is none of the dataplane's.
        return Parsed::Other;
    }
    let l4_min = if next == packet::TCP { 20 } else { 8 };
    if ip_end < off + l4_min {
        return Parsed::Untouchable(Reason::TruncatedL4);
    }
    let flags = if next == packet::TCP {
        pkt[off + 13]
    } else {
        0
    };
    if next == packet::UDP && be16(pkt, off + 6) == 0 {
        return Parsed::Untouchable(Reason::Ipv6UdpZeroChecksum);
    }
    Parsed::Flow {
        t: (src, be16(pkt, off), dst, be16(pkt, off + 2), next),
        flags,
        first_fragment: frag.and_then(|(id, proto, more)| more.then_some((id, proto))),
    }
}

fn may_open(proto: u8, flags: u8) -> bool {
    proto != packet::TCP || flags & (SYN | ACK | RST | 0x01) == SYN
}

fn reversed(t: &Tuple6) -> Tuple6 {
    (t.2, t.3, t.0, t.1, t.4)
}

impl Model6 {
    /// The outcome of `pkt` and the reasons it counts; updates the state.
    fn predict(&mut self, pkt: &[u8]) -> (Expect, Vec<Reason>) {
        let (t, flags, first_fragment) = match parse(pkt) {
            Parsed::Other => return (Expect::Unchanged, vec![]),
            Parsed::Untouchable(r) => return (Expect::Unchanged, vec![r]),
            Parsed::Later(s, d, id, proto) => {
                return match self.frags.get(&(s, d, id, proto)) {
                    Some(&(ns, nd)) => {
                        (Expect::Addresses(ns, nd), vec![Reason::FragmentTranslated])
                    }
                    None => (Expect::Unchanged, vec![Reason::FragmentPassed]),
                };
            }
            Parsed::Flow {
                t,
                flags,
                first_fragment,
            } => (t, flags, first_fragment),
        };
        let remember = |m: &mut Self, to: &Tuple6| {
            if let Some((id, proto)) = first_fragment {
                m.frags.insert((t.0, t.2, id, proto), (to.0, to.2));
            }
        };
        if let Some(to) = self.ct.get(&t).copied() {
            let reply = t.0 == a6(BACKEND);
            remember(self, &to);
            let r = if reply {
                Reason::ReplyTranslated
            } else {
                Reason::CtHit
            };
            return (Expect::Rewritten(to), vec![r]);
        }
        let (daddr, dport, proto) = (t.2, t.3, t.4);
        let to_vip = daddr == a6(VIP)
            && ((dport, proto) == (80, packet::TCP) || (dport, proto) == (53, packet::UDP));
        let to_empty = daddr == a6(EMPTY) && (dport, proto) == (80, packet::TCP);
        if !to_vip && !to_empty {
            // A packet opening a flow straight to a backend would retire a
            // translated flow on its tuple; none is generated.
            return (Expect::Unchanged, vec![]);
        }
        if !may_open(proto, flags) {
            return (Expect::Dropped, vec![Reason::CtInvalid]);
        }
        if to_empty {
            return (Expect::Answered, vec![Reason::RejectedNoBackend]);
        }
        let to = (t.0, t.1, a6(BACKEND), BACKEND_PORT, proto);
        self.ct.insert(t, to);
        self.ct.insert(reversed(&to), reversed(&t));
        remember(self, &to);
        (Expect::Rewritten(to), vec![Reason::NewFlow])
    }
}

/// An extension header of `kind` whose next header is `next`, `units` of 8
/// bytes long (a fragment header is always 8, with `frag_field` and `id`).
fn ext_header(kind: u8, next: u8, units: u8, frag_field: u16, id: u32) -> Vec<u8> {
    let mut h = vec![next];
    if kind == FRAGMENT {
        h.push(0);
        h.extend_from_slice(&frag_field.to_be_bytes());
        h.extend_from_slice(&id.to_be_bytes());
        return h;
    }
    h.push(units - 1);
    let len = units as usize * 8;
    if kind == ROUTING {
        // Type 4 (segment routing) with no segment left: every stack skips it.
        h.extend_from_slice(&[4, 0]);
    } else {
        // One PadN option filling the header.
        h.extend_from_slice(&[1, (len - 4) as u8]);
    }
    h.resize(len, 0);
    h
}

/// `frame` (Ethernet + fixed IPv6 header + L4) with `chain` inserted after
/// the fixed header; the payload length follows.
fn with_chain(frame: &[u8], chain: &[(u8, u8, u16, u32)]) -> Vec<u8> {
    let l4_proto = frame[14 + 6];
    let mut pkt = frame[..14 + 40].to_vec();
    let mut exts = vec![];
    for (i, (kind, units, field, id)) in chain.iter().enumerate() {
        let next = chain.get(i + 1).map_or(l4_proto, |c| c.0);
        exts.extend(ext_header(*kind, next, *units, *field, *id));
    }
    if let Some(first) = chain.first() {
        pkt[14 + 6] = first.0;
    }
    pkt.extend_from_slice(&exts);
    pkt.extend_from_slice(&frame[14 + 40..]);
    let payload = (pkt.len() - 14 - 40) as u16;
    pkt[14 + 4..14 + 6].copy_from_slice(&payload.to_be_bytes());
    pkt
}

fn generate(r: &mut Rng, m: &Model6) -> Vec<u8> {
    let cport = 40000 + r.below(16) as u16;
    let flags = if r.chance(75) {
        SYN
    } else {
        r.below(256) as u8
    };
    let base = match r.below(10) {
        0..=3 => Builder::tcp(CLIENT, cport, VIP, 80, flags),
        4..=5 => Builder::udp(CLIENT, cport, VIP, 53),
        6 => Builder::tcp(CLIENT, cport, EMPTY, 80, flags),
        7 => {
            // A reply of a flow the model knows, or to nobody.
            let known: Vec<&Tuple6> = m.ct.keys().filter(|t| t.0 == a6(BACKEND)).collect();
            match known.get(r.below(known.len().max(1) as u64) as usize) {
                Some(t) if t.4 == packet::TCP => Builder::tcp(BACKEND, t.1, CLIENT, t.3, ACK),
                Some(t) => Builder::udp(BACKEND, t.1, CLIENT, t.3),
                None => Builder::udp(BACKEND, BACKEND_PORT, CLIENT, cport),
            }
        }
        8 => Builder::udp(CLIENT, cport, ELSEWHERE, 53),
        _ => Builder::tcp(CLIENT, cport, ELSEWHERE, 80, flags),
    };
    let mut b = base;
    b.payload = vec![b'p'; r.below(64) as usize];
    b.udp_zero_csum = b.proto == packet::UDP && r.chance(5);
    let frame = b.build();
    let mut chain = vec![];
    let id = r.below(4) as u32;
    for _ in 0..r.below(9) {
        let kind = *r.pick(&[HOP, ROUTING, DEST, DEST, FRAGMENT]);
        let units = 1 + r.below(3) as u8;
        let field = match r.below(4) {
            0 => 0,                                                  // a whole datagram (atomic fragment)
            1 => 1,                                                  // a first fragment
            _ => ((1 + r.below(8) as u16) << 3) | r.below(2) as u16, // a later one
        };
        chain.push((kind, units, field, id));
    }
    if r.chance(50) {
        chain.truncate(r.below(3) as usize);
    }
    let mut pkt = with_chain(&frame, &chain);
    match r.below(12) {
        0 => {
            // Cut short anywhere past the fixed header.
            let at = 14 + 40 + r.below((pkt.len() - 54) as u64) as usize;
            pkt.truncate(at);
        }
        1 => {
            let v = r.below(200) as u16;
            pkt[18..20].copy_from_slice(&v.to_be_bytes());
        }
        2 => pkt[14] = (r.below(16) as u8) << 4,
        3 => {
            // An ICMPv6 message (neighbour solicitation) is never ours.
            pkt[14 + 6] = ICMPV6;
            pkt[14 + 40] = 135;
        }
        _ => {}
    }
    pkt
}

/// The L4 tuple and checksum of an output frame whose extension headers
/// are those of `input` (the program never adds or removes any).
fn tuple_of(out: &[u8], l4_off: usize, proto: u8) -> (Tuple6, bool) {
    let src: [u8; 16] = out[22..38].try_into().unwrap();
    let dst: [u8; 16] = out[38..54].try_into().unwrap();
    let ip_end = 54 + be16(out, 18) as usize;
    let l4 = &out[l4_off..ip_end];
    let mut s = packet::pseudo6(src.into(), dst.into(), proto, l4.len());
    s.extend_from_slice(l4);
    let ok = packet::checksum(&s) == 0;
    ((src, be16(l4, 0), dst, be16(l4, 2), proto), ok)
}

/// Where the L4 header of a frame the model parsed as a flow starts.
fn l4_offset(pkt: &[u8]) -> usize {
    let mut next = pkt[20];
    let mut off = 54;
    while matches!(next, HOP | ROUTING | FRAGMENT | DEST) {
        let h = &pkt[off..off + 8];
        off += if next == FRAGMENT {
            8
        } else {
            (h[1] as usize + 1) * 8
        };
        next = h[0];
    }
    off
}

fn check(expect: &Expect, input: &[u8], verdict: u32, out: &[u8]) -> Result<(), String> {
    match expect {
        Expect::Unchanged => {
            if verdict != TC_ACT_OK || out != input {
                return Err(format!(
                    "expected it passed untouched, got verdict {verdict}"
                ));
            }
        }
        Expect::Dropped => {
            if verdict != bpf::TC_ACT_SHOT {
                return Err(format!("expected a drop, got verdict {verdict}"));
            }
        }
        Expect::Answered => {
            if verdict == TC_ACT_OK || out == input {
                return Err(format!("expected an answer, got verdict {verdict}"));
            }
        }
        Expect::Addresses(s, d) => {
            let want: Vec<u8> = [&input[..22], &s[..], &d[..], &input[54..]].concat();
            if verdict != TC_ACT_OK || out != want.as_slice() {
                return Err(format!("expected addresses {s:02x?} -> {d:02x?}"));
            }
        }
        Expect::Rewritten(to) => {
            if verdict != TC_ACT_OK || out.len() != input.len() {
                return Err(format!("expected rewritten, got verdict {verdict}"));
            }
            let off = l4_offset(input);
            let (got, csum_ok) = tuple_of(out, off, to.4);
            // An incremental update keeps a checksum as valid as it was
            // (a payload length that lies leaves it invalid both times).
            let (_, was_ok) = tuple_of(input, off, to.4);
            if &got != to || csum_ok != was_ok {
                return Err(format!(
                    "expected {to:02x?}, got {got:02x?}, checksum ok {csum_ok} (was {was_ok})"
                ));
            }
            // Nothing else moves: the tuple's fields and the L4 checksum
            // aside, the frame is the input.
            let csum = off + if to.4 == packet::TCP { 16 } else { 6 };
            let mut want = input.to_vec();
            want[22..38].copy_from_slice(&to.0);
            want[38..54].copy_from_slice(&to.2);
            want[off..off + 2].copy_from_slice(&to.1.to_be_bytes());
            want[off + 2..off + 4].copy_from_slice(&to.3.to_be_bytes());
            want[csum..csum + 2].copy_from_slice(&out[csum..csum + 2]);
            if out != want.as_slice() {
                return Err("bytes beyond the tuple changed".into());
            }
        }
    }
    Ok(())
}

#[test]
fn the_ipv6_path_matches_the_model_on_generated_packets() {
    let backend: Ipv6Addr = BACKEND.parse().unwrap();
    let backends = vec![bpf::backend(backend, BACKEND_PORT, true)];
    let key = |addr: &str, port, proto| FrontendKey {
        addr: addr.parse::<Ipv6Addr>().unwrap().into(),
        port,
        proto,
    };
    let mut frontends = BTreeMap::new();
    for (port, proto) in [(80, Protocol::Tcp), (53, Protocol::Udp)] {
        let f = bpf::frontend("default/web6", FrontendKind::ClusterIp, backends.clone());
        frontends.insert(key(VIP, port, proto), f);
    }
    frontends.insert(
        key(EMPTY, 80, Protocol::Tcp),
        bpf::frontend("default/empty6", FrontendKind::ClusterIp, vec![]),
    );
    let plan = Plan {
        frontends,
        ..Default::default()
    };
    let mut l = Loaded::with_plan("svcf6", &bpf::sizes(1024, 65536), &plan).unwrap();
    let mut r = Rng::for_test("fuzz_ipv6");
    let mut m = Model6::default();
    let packets: u64 = std::env::var("FUZZ_PACKETS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let mut predicted: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut kinds: BTreeSet<String> = BTreeSet::new();
    let mut mismatches = vec![];
    for n in 0..packets {
        let pkt = generate(&mut r, &m);
        let (expect, reasons) = m.predict(&pkt);
        let run = l.run(POD, &pkt);
        if let Err(e) = check(&expect, &pkt, run.verdict, &run.packet)
            && mismatches.len() < 5
        {
            mismatches.push(format!("packet #{n} {pkt:02x?}: {e} (model: {expect:?})"));
        }
        kinds.insert(format!("{expect:?}").split('(').next().unwrap().to_string());
        for reason in reasons {
            *predicted.entry(reason.name()).or_default() += 1;
        }
    }
    let replay = format!("replay: TEST_SEED={:#x}", r.seed());
    assert!(mismatches.is_empty(), "{replay}\n{}", mismatches.join("\n"));
    let counted: BTreeMap<&'static str, u64> = Reason::ALL
        .iter()
        .map(|x| (x.name(), l.reason(*x)))
        .filter(|(_, n)| *n > 0)
        .collect();
    assert_eq!(
        predicted, counted,
        "reasons predicted (left) and counted (right) ({replay})"
    );
    // The run met every kind of outcome and the parser's every verdict.
    for kind in ["Unchanged", "Rewritten", "Addresses", "Dropped", "Answered"] {
        assert!(kinds.contains(kind), "no packet came out {kind} ({replay})");
    }
    for reason in [
        Reason::MalformedIpv6,
        Reason::Ipv6ExtChainTooLong,
        Reason::Ipv6UdpZeroChecksum,
        Reason::TruncatedL4,
        Reason::FragmentTranslated,
        Reason::FragmentPassed,
        Reason::NewFlow,
        Reason::CtHit,
        Reason::ReplyTranslated,
    ] {
        assert!(
            predicted.get(reason.name()).is_some_and(|n| *n > 0),
            "no packet counted {} ({replay})",
            reason.name()
        );
    }
}
