//! New flows in the model: which translations the program may choose (any
//! eligible backend, any free port where it picks one), and recording the
//! one it chose so the rest of the flow is held to it.
use service_common::Reason;

use super::{Entry, Expect, Flow, FragId, Model, SourceClass, Tuple, be16};

/// One translation a new flow may get.
#[derive(Clone, Debug)]
pub struct Candidate {
    /// The packet's tuple as it arrived.
    flow: Tuple,
    frag_id: Option<FragId>,
    fe: usize,
    /// The frontend's entry set for sources inside the cluster.
    set: bool,
    backend: usize,
    /// The translated tuple; with `any_port` its source port is any port
    /// whose reply tuple no other flow holds (how the program picks it, in
    /// which range and in what order, is its own business; that the reply
    /// tuple is free is what keeps flows apart).
    pub to: Tuple,
    pub any_port: bool,
    /// Source-NATed to the node.
    pub snat: bool,
    /// The request, and the replies, leave from a node address.
    pub request_local: bool,
    reply_local: bool,
    fresh_affinity: bool,
    /// The flow events counted when the flow is recorded.
    pub events: Vec<Reason>,
    /// What tc counts for the packet.
    pub tc_reasons: Vec<Reason>,
    /// What XDP counted for it, known once tc reveals the choice (a flow
    /// XDP recorded and passed on).
    pub xdp_reasons: Vec<Reason>,
}

type Refused = (Expect, Vec<Reason>);

impl Model {
    /// The translations a packet that may open a flow can get, or what the
    /// program does instead (nothing for no frontend, a drop, a reject).
    pub(super) fn opening(
        &self,
        pkt: &[u8],
        flow: &Flow,
        source: SourceClass,
    ) -> Result<Vec<Candidate>, Refused> {
        let t = flow.t;
        let w = &self.world;
        let Some(fi) = w.frontend(t.daddr, t.dport, t.proto) else {
            return Err((Expect::Unchanged, vec![]));
        };
        let fe = &w.frontends[fi];
        // Only a SYN opens a TCP flow: not with ACK, FIN or RST beside it.
        if t.proto == 6 && flow.flags & 0x17 != 0x02 {
            return Err((Expect::Drop, vec![Reason::CtInvalid]));
        }
        if !fe.source_allowed(t.saddr) {
            return Err((Expect::Drop, vec![Reason::SourceRangeDenied]));
        }
        let class = w.class_of(t.saddr);
        let set = fe.in_cluster_set(class, w);
        let affine = fe
            .affinity
            .then(|| self.affinity.get(&(t.saddr, fi, set)).copied())
            .flatten();
        let (eligible, reject) = fe.serving(class, w);
        let chosen = match affine {
            Some(b) => vec![b],
            None if eligible.is_empty() => {
                if !reject {
                    return Err((Expect::Drop, vec![Reason::NoLocalEndpoint]));
                }
                return Err(reject_answer(pkt, flow));
            }
            None => eligible,
        };
        let to_node_addr = w.is_node_addr(t.daddr);
        Ok(chosen
            .into_iter()
            .map(|bi| {
                let b = fe.endpoints[bi];
                let hairpin = b.addr == t.saddr;
                let snat = source == SourceClass::External && !hairpin && !b.local;
                let mut to = Tuple {
                    saddr: if hairpin { t.daddr } else { t.saddr },
                    sport: t.sport,
                    daddr: b.addr,
                    dport: b.port,
                    proto: t.proto,
                };
                let mut events = vec![Reason::NewFlow];
                let any_port = if snat {
                    to.saddr = w
                        .snat_addr
                        .expect("a world with remote backends has a SNAT address");
                    events.push(Reason::SnatFlow);
                    true
                } else {
                    // A reply tuple another flow holds: the client's port
                    // is moved to a free one.
                    let held = self.ct.get(&to.reversed());
                    let clash = held.is_some_and(|e| e.to != t.reversed());
                    if clash {
                        events.push(Reason::TupleClashPortRewritten);
                    }
                    clash
                };
                if affine.is_some() {
                    events.push(Reason::AffinityHit);
                }
                Candidate {
                    flow: t,
                    frag_id: flow.frag_id,
                    fe: fi,
                    set,
                    backend: bi,
                    to,
                    any_port,
                    snat,
                    request_local: snat || (hairpin && to_node_addr),
                    reply_local: to_node_addr,
                    fresh_affinity: fe.affinity && affine.is_none(),
                    tc_reasons: events.clone(),
                    xdp_reasons: vec![],
                    events,
                }
            })
            .collect())
    }

    /// The candidate the program took, read from its output, with the
    /// expectation it must then meet in full (`check`: None when met).
    pub(super) fn choose(
        &self,
        pkt: &[u8],
        out: &[u8],
        candidates: Vec<Candidate>,
        check: impl Fn(&Expect) -> Option<String>,
    ) -> Result<(Expect, Candidate), String> {
        let l4 = 14 + ((pkt[14] & 0x0f) as usize) * 4;
        let expect_of = |c: &Candidate, sport| {
            Expect::Rewritten {
                to: Tuple { sport, ..c.to },
                l4: true,
            }
            .sent_on(c.request_local)
        };
        let fail = |why: &str| {
            let wanted: Vec<String> = candidates
                .iter()
                .map(|c| format!("{:?} any_port={}", c.to, c.any_port))
                .collect();
            Err(format!("{why}; allowed: {}", wanted.join(" | ")))
        };
        if out.len() < l4 + 4 || out.len() != pkt.len() {
            return match candidates.first() {
                Some(c) => Err(check(&expect_of(c, c.to.sport)).unwrap_or_default()),
                None => fail("no output"),
            };
        }
        let got = Tuple {
            saddr: super::addr(out, 26),
            daddr: super::addr(out, 30),
            sport: be16(out, l4),
            dport: be16(out, l4 + 2),
            proto: pkt[23],
        };
        let Some(c) = candidates.iter().find(|c| {
            let port_ok = if c.any_port {
                got.sport != 0 && !self.ct.contains_key(&got.reversed())
            } else {
                got.sport == c.to.sport
            };
            (got.saddr, got.daddr, got.dport) == (c.to.saddr, c.to.daddr, c.to.dport) && port_ok
        }) else {
            return fail(&format!("new flow sent as {got:?}"));
        };
        let e = expect_of(c, got.sport);
        match check(&e) {
            Some(m) => Err(m),
            None => Ok((e, c.clone())),
        }
    }

    /// Records the flow the program opened with `c` (its translation in `e`).
    pub(super) fn commit(&mut self, c: &Candidate, e: &Expect) {
        let to = match e {
            Expect::Rewritten { to, .. } => *to,
            Expect::ToNextHop(inner) => match **inner {
                Expect::Rewritten { to, .. } => to,
                _ => unreachable!("a new flow is rewritten"),
            },
            _ => unreachable!("a new flow is rewritten"),
        };
        let reply = Entry {
            to: c.flow.reversed(),
            reply: true,
            snat: c.snat,
            local_source: c.reply_local,
        };
        let request = Entry {
            to,
            reply: false,
            snat: c.snat,
            local_source: c.request_local,
        };
        for (k, v) in [(to.reversed(), reply), (c.flow, request)] {
            if self.ct.insert(k, v).is_none() {
                self.keys.push(k);
            }
        }
        if c.fresh_affinity {
            self.affinity.insert((c.flow.saddr, c.fe, c.set), c.backend);
        }
        if let Some(id) = c.frag_id {
            self.frags.insert(id, (to.saddr, to.daddr, c.request_local));
        }
    }
}

/// A frontend without any endpoint answers as kube-proxy's REJECT does.
fn reject_answer(pkt: &[u8], flow: &Flow) -> Refused {
    let t = flow.t;
    let from = t.reversed();
    let l4 = 14 + flow.ihl;
    if t.proto == 6 {
        // A segment carrying RST is never answered (RFC 9293 3.10.7.1).
        if flow.flags & 0x04 != 0 {
            return (Expect::Drop, vec![Reason::RejectFailed]);
        }
        let seq = u32::from_be_bytes(pkt[l4 + 4..l4 + 8].try_into().unwrap());
        let doff = ((pkt[l4 + 12] >> 4) as usize) * 4;
        let seg = flow.tot.saturating_sub(flow.ihl).saturating_sub(doff) as u32
            + (flow.flags & 0x02 != 0) as u32
            + (flow.flags & 0x01 != 0) as u32;
        // Reached only by a SYN without ACK: the RST acknowledges it.
        let e = Expect::Reset {
            from,
            seq: 0,
            ack: Some(seq.wrapping_add(seg)),
        };
        return (e, vec![Reason::RejectedNoBackend]);
    }
    if flow.ihl != 20 {
        return (Expect::Drop, vec![Reason::RejectFailed]);
    }
    let e = Expect::PortUnreachable {
        from,
        quoted: pkt[14..42].to_vec(),
    };
    (e, vec![Reason::RejectedNoBackend])
}
