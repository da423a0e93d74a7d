//! The XDP program in the model: it forwards source-NATed flows whose next
//! hop it can reach, drops what opens no flow, and passes everything else
//! on to tc untouched, having recorded the backend of a new flow it passes
//! (tc then follows the record).
use service_common::Reason;

use super::{
    Candidate, Expect, Hop, Model, Parsed, SourceClass, Tuple, check::check_forwarded, parse,
};
use crate::bpf::{XDP_DROP, XDP_PASS};

/// What XDP does with a packet.
#[derive(Debug)]
pub enum XdpStep {
    /// On to tc, untouched.
    Passed,
    Dropped,
    Forwarded,
}

/// A prediction for XDP.
enum Xdp {
    Pass(Vec<Reason>),
    Drop(Vec<Reason>),
    Forward(Expect, Hop, Vec<Reason>),
    Opens(Vec<Candidate>),
}

fn sent_by(hop: Hop) -> Reason {
    match hop {
        Hop::Xdp {
            same_iface: true, ..
        } => Reason::XdpTx,
        _ => Reason::XdpRedirect,
    }
}

impl Model {
    fn predict_xdp(&self, pkt: &[u8]) -> Xdp {
        // Options, fragments and a TTL about to expire are left to tc.
        let flow = match parse(pkt) {
            Parsed::Flow(f) if f.ihl == 20 && f.frag_id.is_none() && f.ttl > 1 => f,
            _ => return Xdp::Pass(vec![]),
        };
        if let Some(e) = self.ct.get(&flow.t) {
            // Flows to local backends and replies to pods are tc's.
            if !e.snat {
                return Xdp::Pass(vec![]);
            }
            let hit = if e.reply {
                Reason::ReplyTranslated
            } else {
                Reason::CtHit
            };
            return match self.world.hop(e.to.daddr) {
                hop @ Hop::Xdp { .. } => Xdp::Forward(
                    Expect::Rewritten { to: e.to, l4: true },
                    hop,
                    vec![hit, sent_by(hop)],
                ),
                Hop::Tc => Xdp::Pass(vec![Reason::XdpPassedToTc]),
            };
        }
        match self.opening(pkt, &flow, SourceClass::External) {
            Ok(c) => Xdp::Opens(c),
            // Drops of what opens no flow spare the stack; rejects are tc's to build.
            Err((Expect::Drop, r))
                if r == [Reason::CtInvalid] || r == [Reason::SourceRangeDenied] =>
            {
                Xdp::Drop(r)
            }
            Err(_) => Xdp::Pass(vec![]),
        }
    }

    /// Runs the prediction for XDP against what it did, as `observe_tc`;
    /// a packet passed goes on to `observe_tc` next.
    pub fn observe_xdp(
        &mut self,
        pkt: &[u8],
        verdict: u32,
        out: &[u8],
    ) -> Result<(XdpStep, Vec<Reason>), String> {
        let passed = |r: Vec<Reason>| {
            if verdict == XDP_PASS && out == pkt {
                Ok((XdpStep::Passed, r))
            } else {
                Err(format!(
                    "XDP changed or kept a packet it must pass to tc (verdict {verdict})"
                ))
            }
        };
        match self.predict_xdp(pkt) {
            Xdp::Pass(r) => passed(r),
            Xdp::Drop(r) if verdict == XDP_DROP => Ok((XdpStep::Dropped, r)),
            Xdp::Drop(r) => Err(format!("XDP did not drop ({r:?}): verdict {verdict}")),
            Xdp::Forward(e, hop, r) => match hop {
                Hop::Xdp { dmac, smac, .. } => {
                    match check_forwarded(pkt, verdict, out, &e, (dmac, smac)) {
                        None => Ok((XdpStep::Forwarded, r)),
                        Some(m) => Err(m),
                    }
                }
                Hop::Tc => unreachable!("only reachable hops are forwarded"),
            },
            Xdp::Opens(candidates) => self.xdp_opens(pkt, verdict, out, candidates),
        }
    }

    /// A new flow in XDP: forwarded when it is source-NATed towards a hop
    /// XDP reaches; otherwise recorded and passed, and tc, finding the
    /// record, translates it (counting a conntrack hit).
    fn xdp_opens(
        &mut self,
        pkt: &[u8],
        verdict: u32,
        out: &[u8],
        candidates: Vec<Candidate>,
    ) -> Result<(XdpStep, Vec<Reason>), String> {
        let hop_of = |c: &Candidate| match self.world.hop(c.to.daddr) {
            hop @ Hop::Xdp { .. } if c.snat => Some(hop),
            _ => None,
        };
        let (forwarding, passing): (Vec<Candidate>, Vec<Candidate>) =
            candidates.into_iter().partition(|c| hop_of(c).is_some());
        if verdict == XDP_PASS {
            if out != pkt || passing.is_empty() {
                return Err(format!(
                    "XDP passed a new flow it must forward or changed it; forwardable: {:?}",
                    forwarding.iter().map(|c| c.to).collect::<Vec<Tuple>>()
                ));
            }
            self.pending = Some(
                passing
                    .into_iter()
                    .map(|mut c| {
                        c.xdp_reasons = c.events.clone();
                        if c.snat {
                            c.xdp_reasons.push(Reason::XdpPassedToTc);
                        }
                        c.tc_reasons = vec![Reason::CtHit];
                        c
                    })
                    .collect(),
            );
            return Ok((XdpStep::Passed, vec![]));
        }
        let (e, c) = self.choose(pkt, out, forwarding, |e| {
            // The forwarded flow's hop is its backend's.
            let e = match e {
                Expect::ToNextHop(inner) => &**inner,
                e => e,
            };
            let Expect::Rewritten { to, .. } = e else {
                return Some(format!("{e:?} is not forwarded"));
            };
            let Hop::Xdp { dmac, smac, .. } = self.world.hop(to.daddr) else {
                return Some("no hop".into());
            };
            check_forwarded(pkt, verdict, out, e, (dmac, smac))
        })?;
        let hop = self.world.hop(c.to.daddr);
        let mut reasons = c.events.clone();
        reasons.push(sent_by(hop));
        self.commit(&c, &e);
        Ok((XdpStep::Forwarded, reasons))
    }
}
