//! A reference model of the dataplane programs, written from the
//! specification (the README's failure behaviour and Kubernetes semantics),
//! not from the BPF code: for a world of frontends it predicts the verdict,
//! the bytes and the reasons counted for every packet, keeping its own
//! conntrack, affinity and fragment tables. Where the programs choose at
//! random (a backend, a SNAT port, a port that resolves a tuple clash) the
//! model accepts any allowed choice, learns it from the program's output and
//! holds the flow to it from then on.
mod check;
mod open;
mod world;
mod xdp;

use std::collections::HashMap;

pub use check::check;
pub use open::Candidate;
use service_common::Reason;
pub use world::{Backend, Frontend, Hop, SourceClass, World};
pub use xdp::XdpStep;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tuple {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

impl Tuple {
    /// The same flow seen from the other end.
    pub fn reversed(&self) -> Tuple {
        Tuple {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
        }
    }
}

/// What the program must do with one packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Passed on byte for byte.
    Unchanged,
    /// Dropped.
    Drop,
    /// Passed with addresses and ports rewritten (and checksums updated).
    Rewritten { to: Tuple, l4: bool },
    /// Only the IP addresses rewritten (a later fragment).
    AddressesRewritten { saddr: [u8; 4], daddr: [u8; 4] },
    /// Answered with a TCP RST to `to` (acknowledging `ack`, or with `seq`).
    Reset {
        from: Tuple,
        seq: u32,
        ack: Option<u32>,
    },
    /// Answered with ICMP port unreachable quoting the first 28 IP bytes.
    PortUnreachable { from: Tuple, quoted: Vec<u8> },
    /// An ICMP error rewritten: outer destination and quoted tuple.
    IcmpRewritten {
        outer_saddr: [u8; 4],
        outer_daddr: [u8; 4],
        inner: Tuple,
    },
    /// As the inner expectation, but sent to the next hop by the program
    /// (a redirect): the rewritten source is an address of this node, which
    /// IP input would drop as a martian.
    ToNextHop(Box<Expect>),
}

impl Expect {
    /// The outcome's name, for the tally of what a run exercised.
    pub fn kind(&self) -> &'static str {
        match self {
            Expect::Unchanged => "Unchanged",
            Expect::Drop => "Drop",
            Expect::Rewritten { .. } => "Rewritten",
            Expect::AddressesRewritten { .. } => "AddressesRewritten",
            Expect::Reset { .. } => "Reset",
            Expect::PortUnreachable { .. } => "PortUnreachable",
            Expect::IcmpRewritten { .. } => "IcmpRewritten",
            Expect::ToNextHop(_) => "ToNextHop",
        }
    }

    fn sent_on(self, redirect: bool) -> Expect {
        if redirect {
            Expect::ToNextHop(Box::new(self))
        } else {
            self
        }
    }
}

/// The model's prediction for one packet through a tc program.
#[derive(Clone, Debug)]
pub enum Predicted {
    /// What the program does is determined.
    Known(Expect, Vec<Reason>),
    /// A new flow: the program picks one of these.
    Opens(Vec<Candidate>),
}

/// A conntrack entry of the model: what a packet with its key becomes.
#[derive(Clone, Copy, Debug)]
struct Entry {
    to: Tuple,
    reply: bool,
    /// Source-NATed to the node (XDP's to forward).
    snat: bool,
    /// The rewritten packet leaves from a node address (sent to the next hop).
    local_source: bool,
}

type FragId = ([u8; 4], [u8; 4], u16, u8);

/// The model's state: the world and the tables the programs keep.
pub struct Model {
    pub world: World,
    ct: HashMap<Tuple, Entry>,
    /// Every conntrack key, in insertion order, for generators to draw from.
    keys: Vec<Tuple>,
    /// (client, frontend index, its in-cluster set) → the backend its new
    /// flows go to.
    affinity: HashMap<([u8; 4], usize, bool), usize>,
    /// (source, destination, IP id, protocol) → rewritten (source,
    /// destination) and whether they leave from a node address.
    frags: HashMap<FragId, ([u8; 4], [u8; 4], bool)>,
    /// A flow XDP opened and passed on: tc carries its first packet.
    pending: Option<Vec<Candidate>>,
    /// What XDP counted for that packet, learnt from tc's choice.
    deferred_xdp: Vec<Reason>,
}

fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

fn addr(b: &[u8], off: usize) -> [u8; 4] {
    [b[off], b[off + 1], b[off + 2], b[off + 3]]
}

/// What parsing made of a frame, as the programs' common parser sees it.
enum Parsed {
    /// Not the dataplane's business (not IP, another protocol).
    Other,
    /// IPv4 or IPv6 that is passed untouched and counted.
    Untouchable(Reason),
    /// A fragment after the first.
    LaterFragment(FragId),
    /// An ICMP message; the slice ends where the IP packet ends.
    Icmp {
        l4: usize,
        tot: usize,
    },
    Flow(Flow),
}

/// An IPv6 frame: what the generator makes of one is an IPv4 packet under
/// the IPv6 ethertype, which the IPv6 parser passes untouched and counts
/// (`malformed_ipv6`). A well-formed IPv6 packet is not modelled, and the
/// generator must not make one until it is.
fn parse6(pkt: &[u8]) -> Parsed {
    if pkt.len() < 14 + 40 || pkt[14] >> 4 != 6 {
        return Parsed::Untouchable(Reason::MalformedIpv6);
    }
    if 14 + 40 + be16(pkt, 18) as usize > pkt.len() {
        return Parsed::Untouchable(Reason::MalformedIpv6);
    }
    unimplemented!("the reference model has no IPv6 flows yet")
}

/// A TCP or UDP packet.
#[derive(Clone, Copy)]
struct Flow {
    t: Tuple,
    flags: u8,
    ihl: usize,
    tot: usize,
    ttl: u8,
    frag_id: Option<FragId>,
}

fn parse(pkt: &[u8]) -> Parsed {
    if pkt.len() >= 14 && pkt[12..14] == [0x86, 0xdd] {
        return parse6(pkt);
    }
    if pkt.len() < 14 || pkt[12..14] != [0x08, 0x00] {
        return Parsed::Other;
    }
    if pkt.len() < 34 || pkt[14] >> 4 != 4 {
        return Parsed::Untouchable(Reason::MalformedIp);
    }
    let ip = &pkt[14..];
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    let tot = be16(ip, 2) as usize;
    if ihl < 20 || tot < ihl || 14 + tot > pkt.len() {
        return Parsed::Untouchable(Reason::MalformedIp);
    }
    let proto = ip[9];
    if proto != 1 && proto != 6 && proto != 17 {
        return Parsed::Other;
    }
    let (saddr, daddr) = (addr(ip, 12), addr(ip, 16));
    let frag = be16(ip, 6);
    let id = (saddr, daddr, be16(ip, 4), proto);
    if frag & 0x1fff != 0 {
        if proto == 1 {
            return Parsed::Other;
        }
        return Parsed::LaterFragment(id);
    }
    let l4 = 14 + ihl;
    if proto == 1 {
        return Parsed::Icmp { l4, tot };
    }
    if tot < ihl + if proto == 6 { 20 } else { 8 } {
        return Parsed::Untouchable(Reason::TruncatedL4);
    }
    Parsed::Flow(Flow {
        t: Tuple {
            saddr,
            daddr,
            sport: be16(pkt, l4),
            dport: be16(pkt, l4 + 2),
            proto,
        },
        flags: if proto == 6 { pkt[l4 + 13] } else { 0 },
        ihl,
        tot,
        ttl: ip[8],
        frag_id: (frag & 0x2000 != 0).then_some(id),
    })
}

impl Model {
    pub fn new(world: World) -> Self {
        Self {
            world,
            ct: HashMap::new(),
            keys: vec![],
            affinity: HashMap::new(),
            frags: HashMap::new(),
            pending: None,
            deferred_xdp: vec![],
        }
    }

    /// The reasons XDP counted for the last packet tc carried after it, when
    /// only tc's output told which they were (a new flow XDP passed on).
    pub fn take_deferred_xdp_reasons(&mut self) -> Vec<Reason> {
        std::mem::take(&mut self.deferred_xdp)
    }

    /// A conntrack key of a flow the model holds (either direction) and
    /// what its packets become, drawn by `pick(len)`.
    pub fn known_flow(&self, pick: impl FnOnce(usize) -> usize) -> Option<(Tuple, Tuple)> {
        let k = *self.keys.get(pick(self.keys.len().max(1)))?;
        Some((k, self.ct[&k].to))
    }

    /// Predicts what a tc ingress program does with `pkt` (an Ethernet
    /// frame). State changes for a new flow wait for `Model::commit`.
    pub fn predict_tc(&mut self, pkt: &[u8]) -> Predicted {
        let known = |e: Expect, r: &[Reason]| Predicted::Known(e, r.to_vec());
        let flow = match parse(pkt) {
            Parsed::Other => return known(Expect::Unchanged, &[]),
            Parsed::Untouchable(r) => return known(Expect::Unchanged, &[r]),
            Parsed::LaterFragment(id) => {
                return match self.frags.get(&id) {
                    Some(&(saddr, daddr, local)) => known(
                        Expect::AddressesRewritten { saddr, daddr }.sent_on(local),
                        &[Reason::FragmentTranslated],
                    ),
                    None => known(Expect::Unchanged, &[Reason::FragmentPassed]),
                };
            }
            Parsed::Icmp { l4, tot } => return self.icmp(&pkt[..14 + tot], l4),
            Parsed::Flow(f) => f,
        };
        if let Some(candidates) = self.pending.take() {
            return Predicted::Opens(candidates);
        }
        if let Some(e) = self.ct.get(&flow.t).copied() {
            if let Some(id) = flow.frag_id {
                self.frags
                    .insert(id, (e.to.saddr, e.to.daddr, e.local_source));
            }
            let hit = if e.reply {
                Reason::ReplyTranslated
            } else {
                Reason::CtHit
            };
            return known(
                Expect::Rewritten { to: e.to, l4: true }.sent_on(e.local_source),
                &[hit],
            );
        }
        let t = flow.t;
        if self.world.frontend(t.daddr, t.dport, t.proto).is_none() {
            return known(Expect::Unchanged, &self.retire_reused(&flow));
        }
        match self.opening(pkt, &flow, self.world.source) {
            Ok(candidates) => Predicted::Opens(candidates),
            Err((e, r)) => known(e, &r),
        }
    }

    /// A packet to no frontend and of no known flow that may open one (a
    /// SYN alone, or UDP) is a flow between its own two ends. A translated
    /// flow whose backend sees that same tuple (a reply entry under the
    /// packet's tuple reversed) is then over: its reply entry goes, and its
    /// request entry if that still translates to the packet's tuple.
    fn retire_reused(&mut self, flow: &Flow) -> Vec<Reason> {
        let t = flow.t;
        let may_open = t.proto != 6 || flow.flags & 0x17 == 0x02;
        let reply_key = t.reversed();
        match self.ct.get(&reply_key) {
            Some(e) if may_open && e.reply => {
                let request_key = e.to.reversed();
                if self
                    .ct
                    .get(&request_key)
                    .is_some_and(|r| !r.reply && r.to == t)
                {
                    self.ct.remove(&request_key);
                }
                self.ct.remove(&reply_key);
                let ct = &self.ct;
                self.keys.retain(|k| ct.contains_key(k));
                vec![Reason::ReusedTupleRetired]
            }
            _ => vec![],
        }
    }

    /// An ICMP message: an error quoting a translated flow is rewritten
    /// like the packet it quotes; everything else passes.
    fn icmp(&self, pkt: &[u8], l4: usize) -> Predicted {
        let unchanged = Predicted::Known(Expect::Unchanged, vec![]);
        if pkt.len() < l4 + 1 || ![3u8, 11, 12].contains(&pkt[l4]) {
            return unchanged;
        }
        let inner = l4 + 8;
        if pkt.len() < inner + 24 || pkt[inner] != 0x45 || ![6u8, 17].contains(&pkt[inner + 9]) {
            return unchanged;
        }
        let q = Tuple {
            saddr: addr(pkt, inner + 12),
            daddr: addr(pkt, inner + 16),
            sport: be16(pkt, inner + 20),
            dport: be16(pkt, inner + 22),
            proto: pkt[inner + 9],
        };
        let Some(e) = self.ct.get(&q.reversed()).map(|e| e.to) else {
            return unchanged;
        };
        // An error from the backend itself comes from the frontend.
        let outer = addr(pkt, 26);
        let source = if outer == q.daddr && q.daddr != e.saddr {
            e.saddr
        } else {
            outer
        };
        let expect = Expect::IcmpRewritten {
            outer_saddr: source,
            outer_daddr: e.daddr,
            inner: e.reversed(),
        };
        let local = source != outer && self.world.is_node_addr(source);
        Predicted::Known(expect.sent_on(local), vec![Reason::IcmpErrorTranslated])
    }

    /// Predicts what tc egress does with `pkt`: the replies of host-network
    /// endpoints (a source that is a node address) to translated flows are
    /// reverse-translated; nothing else is its business.
    fn predict_egress(&mut self, pkt: &[u8]) -> (Expect, Vec<Reason>) {
        let Parsed::Flow(flow) = parse(pkt) else {
            return (Expect::Unchanged, vec![]);
        };
        if !self.world.is_node_addr(flow.t.saddr) {
            return (Expect::Unchanged, vec![]);
        }
        match self.ct.get(&flow.t).copied() {
            Some(e) if e.reply => {
                if let Some(id) = flow.frag_id {
                    self.frags.insert(id, (e.to.saddr, e.to.daddr, false));
                }
                let to = Expect::Rewritten { to: e.to, l4: true };
                (to, vec![Reason::LocalReplyTranslated])
            }
            _ => (Expect::Unchanged, vec![]),
        }
    }

    /// As `observe_tc`, for tc egress.
    pub fn observe_egress(
        &mut self,
        pkt: &[u8],
        verdict: u32,
        out: &[u8],
    ) -> Result<(Expect, Vec<Reason>), String> {
        let (e, r) = self.predict_egress(pkt);
        match check(pkt, verdict, out, &e) {
            None => Ok((e, r)),
            Some(m) => Err(format!("egress: {m}")),
        }
    }

    /// Runs the prediction for a tc program against what it did: Ok(the
    /// expectation met and the reasons it counts), Err(the disagreement).
    /// Updates the model's state as the program updated its maps.
    pub fn observe_tc(
        &mut self,
        pkt: &[u8],
        verdict: u32,
        out: &[u8],
    ) -> Result<(Expect, Vec<Reason>), String> {
        match self.predict_tc(pkt) {
            Predicted::Known(e, r) => match check(pkt, verdict, out, &e) {
                None => Ok((e, r)),
                Some(m) => Err(m),
            },
            Predicted::Opens(candidates) => {
                let (e, c) = self
                    .choose(pkt, out, candidates, |e| check(pkt, verdict, out, e))
                    .map_err(|m| format!("{m} (verdict {verdict})"))?;
                let reasons = c.tc_reasons.clone();
                self.deferred_xdp = c.xdp_reasons.clone();
                self.commit(&c, &e);
                Ok((e, reasons))
            }
        }
    }
}
