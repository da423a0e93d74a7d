//! Opening a flow to a frontend: deciding its backend and its translation
//! (`choose`), then pinning it in conntrack (`record`). The two are apart so
//! XDP can check that it is able to forward the packet before anything is
//! written, and hand the untouched packet to tc when it is not.
use service_common::{BE_F_LOCAL, CT_F_LOCAL_SOURCE, Reason};

use crate::{
    conntrack,
    family::Family,
    flood,
    lb::{self, Frontend, Pick},
    nat::Target,
    packet::Flow,
    stats::{count_flow_opened, count_reason},
};

pub struct Choice<F: Family> {
    pub pick: Pick<F>,
    pub to: Target<F>,
    pub svc_id: u32,
    /// A pod picked as the backend of its own request.
    pub hairpin: bool,
    /// From outside to a backend on another node: the source becomes this node.
    pub snat: bool,
    /// Flags the reply entry carries.
    reply_flags: u16,
    /// The translated packet leaves with one of this node's addresses as source.
    pub local_source: bool,
}

pub enum Opening<F: Family> {
    Open(Choice<F>),
    /// No backend at all: answer as kube-proxy's REJECT does (or drop, per the frontend).
    Reject,
    Drop(Reason),
}

#[inline(always)]
pub fn choose<F: Family>(flow: &Flow<F>, fe: &Frontend<F>, from_outside: bool) -> Opening<F> {
    // Only a SYN opens a TCP flow. Anything else without a conntrack entry
    // belongs to a flow this node does not know (conntrack's INVALID): a
    // random backend would answer it with a reset, so it is dropped; so is
    // a SYN with FIN or RST.
    if !flow.may_open() {
        return Opening::Drop(Reason::CtInvalid);
    }
    if !lb::source_allowed(fe, flow.saddr) {
        return Opening::Drop(Reason::SourceRangeDenied);
    }
    let Some(pick) = lb::select_backend(fe, flow.saddr, Some(flow.sport)) else {
        if fe.master.count == 0 {
            return Opening::Reject;
        }
        return Opening::Drop(Reason::NoBackendEntry);
    };
    // A pod picked as the backend of its own request would see a packet from
    // itself to itself and drop it as a martian; its source becomes the
    // frontend address instead, and the reply entry undoes both rewrites.
    let hairpin = pick.backend.addr == flow.saddr;
    // From outside to a backend on another node: the backend's reply would
    // go straight back to the client, past this node's reverse translation,
    // so the source becomes this node (kube-proxy masquerades the same way).
    let snat = from_outside && !hairpin && pick.backend.flags & BE_F_LOCAL == 0;
    let mut to = Target {
        saddr: if hairpin { flow.daddr } else { flow.saddr },
        sport: flow.sport,
        daddr: pick.backend.addr,
        dport: pick.backend.port,
    };
    if snat {
        let Some(addr) = F::snat_address() else {
            return Opening::Drop(Reason::SnatFailed);
        };
        to.saddr = addr;
    }
    // Replies to a frontend on a node address leave with that address as source.
    let reply_flags = if fe.to_node_addr {
        CT_F_LOCAL_SOURCE
    } else {
        0
    };
    Opening::Open(Choice {
        svc_id: fe.master.svc_id,
        to,
        hairpin,
        snat,
        reply_flags,
        local_source: snat || (hairpin && fe.to_node_addr),
        pick,
    })
}

/// Records both conntrack entries of the flow; `Ok(true)`: the client's
/// port was moved off a clashing tuple.
#[inline(always)]
fn pin<F: Family>(flow: &Flow<F>, c: &mut Choice<F>) -> Result<bool, Reason> {
    if c.snat {
        conntrack::create_snat(flow, &mut c.to, c.pick.id, c.svc_id, c.reply_flags)?;
        return Ok(false);
    }
    conntrack::create(
        flow,
        &mut c.to,
        c.pick.id,
        c.svc_id,
        c.hairpin,
        c.reply_flags,
    )
}

/// `pin` as a subprogram of its own, for IPv6 (`Family::SPLIT`).
#[inline(never)]
fn pin_split<F: Family>(flow: &Flow<F>, c: &mut Choice<F>) -> Result<bool, Reason> {
    pin(flow, c)
}

/// Pins the flow to its backend in conntrack (picking the SNAT source port)
/// and notes its affinity, unless the flood guard refuses another opening
/// on this CPU this second; from here on the packet must be translated.
/// Err: the reason the packet is dropped.
#[inline(always)]
pub fn record<F: Family>(
    flow: &Flow<F>,
    fe: &Frontend<F>,
    c: &mut Choice<F>,
) -> Result<(), Reason> {
    if !flood::admit() {
        return Err(Reason::FloodDropped);
    }
    let moved = if F::SPLIT {
        pin_split(flow, c)
    } else {
        pin(flow, c)
    }?;
    if moved {
        count_reason(Reason::TupleClashPortRewritten);
    }
    lb::note_affinity(fe, flow.saddr, &c.pick);
    count_flow_opened(c.svc_id, c.snat, c.pick.affinity);
    Ok(())
}
