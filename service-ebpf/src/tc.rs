//! The tc ingress path: translates requests to frontends and their replies,
//! follows fragments and ICMP errors, and answers for frontends without
//! backends. Each path returns the packet's `Outcome`; the entry point
//! counts it.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use service_common::{
    CT_F_LOCAL_SOURCE, FragKey, FragValue, IPPROTO_ICMP, IPPROTO_TCP, Reason, SVC_F_REJECT_EMPTY,
};

use crate::{
    access::Packet,
    conntrack::{self, CtLookup},
    forward,
    headers::ETH_HLEN,
    icmp::{self, IcmpVerdict},
    lb::{self, Frontend},
    maps::FRAGMENTS,
    nat::{self, Target},
    opening::{self, Opening},
    packet::{self, Flow, Parsed},
    reject,
    stats::{Outcome, count_packet, count_rejected},
};

const PASS: i32 = TC_ACT_OK as i32;
const DROP: i32 = TC_ACT_SHOT as i32;

type TcOutcome = Outcome<i32>;

#[inline(always)]
pub fn ingress(ctx: &TcContext, from_outside: bool) -> TcOutcome {
    let flow = match packet::parse(ctx) {
        Parsed::Other => return Outcome::uncounted(PASS),
        Parsed::Untouchable(reason) => return Outcome::counted(PASS, reason),
        Parsed::Flow(flow) => flow,
        Parsed::LaterFragment(key) => return follow_first_fragment(ctx, &key),
        Parsed::IcmpError(e) => {
            return match icmp::translate(ctx, &e) {
                IcmpVerdict::NotOurs => Outcome::uncounted(PASS),
                IcmpVerdict::Translated {
                    svc_id,
                    source,
                    client,
                    local_source,
                } => {
                    count_packet(svc_id, ctx.len());
                    // From a node address, IP input would drop it as a martian.
                    let action = if local_source {
                        let ip_len = ctx.size().saturating_sub(ETH_HLEN) as u16;
                        forward::to_next_hop(ctx, source, client, IPPROTO_ICMP, ip_len)
                    } else {
                        PASS
                    };
                    Outcome::counted(action, Reason::IcmpErrorTranslated)
                }
                IcmpVerdict::Failed(reason) => Outcome::counted(DROP, reason),
            };
        }
    };
    match conntrack::lookup(&flow) {
        CtLookup::Hit {
            target,
            svc_id,
            reply,
            local_source,
            ..
        } => {
            let hit = if reply {
                Reason::ReplyTranslated
            } else {
                Reason::CtHit
            };
            return match translate(ctx, &flow, &target, svc_id, local_source) {
                Ok(action) => Outcome::counted(action, hit),
                Err(reason) => Outcome::counted(DROP, reason),
            };
        }
        CtLookup::Kernel => return Outcome::counted(PASS, Reason::KernelFlowPassed),
        CtLookup::Stale | CtLookup::Miss => {}
    }
    let origin = if from_outside {
        lb::Origin::Wire(flow.saddr)
    } else {
        lb::Origin::Inside
    };
    match lb::lookup_frontend(flow.daddr, flow.dport, flow.proto, origin) {
        Some(fe) => start_flow(ctx, &flow, &fe, from_outside),
        None => Outcome::uncounted(PASS),
    }
}

/// Replies that the node's own stack sends: a flow translated at ingress to
/// a host-network endpoint (an address of this node) is answered by a local
/// socket, and its replies leave through egress without crossing any
/// ingress program. Only packets from a node address can be such replies,
/// so everything else costs one lookup in a small map. The route was chosen
/// for the client's address, which translation keeps, so the packet goes on
/// where it was going.
#[inline(always)]
pub fn egress(ctx: &TcContext) -> TcOutcome {
    let flow = match packet::parse(ctx) {
        Parsed::Flow(flow) => flow,
        _ => return Outcome::uncounted(PASS),
    };
    if !lb::is_node_address(flow.saddr) {
        return Outcome::uncounted(PASS);
    }
    let CtLookup::Hit {
        target,
        svc_id,
        reply: true,
        ..
    } = conntrack::lookup(&flow)
    else {
        return Outcome::uncounted(PASS);
    };
    match translate(ctx, &flow, &target, svc_id, false) {
        Ok(action) => Outcome::counted(action, Reason::LocalReplyTranslated),
        Err(reason) => Outcome::counted(DROP, reason),
    }
}

/// Rewrites the packet to `to` and sends it on; Err: why it must be dropped.
#[inline(always)]
fn translate(
    ctx: &TcContext,
    flow: &Flow,
    to: &Target,
    svc_id: u32,
    local_source: bool,
) -> Result<i32, Reason> {
    nat::rewrite_tuple(ctx, flow, to).map_err(|_| Reason::RewriteFailed)?;
    count_packet(svc_id, ctx.len());
    if flow.first_fragment {
        remember_fragments(flow, to, svc_id, local_source);
    }
    if local_source {
        return Ok(forward::to_next_hop(
            ctx,
            to.saddr,
            to.daddr,
            flow.proto,
            flow.ip_len,
        ));
    }
    Ok(PASS)
}

/// Records how a first fragment was rewritten, for the rest of its datagram.
#[inline(always)]
fn remember_fragments(flow: &Flow, to: &Target, svc_id: u32, local_source: bool) {
    let key = FragKey {
        saddr: flow.saddr,
        daddr: flow.daddr,
        id: flow.ip_id,
        proto: flow.proto,
        _pad: 0,
    };
    let value = FragValue {
        nat_saddr: to.saddr,
        nat_daddr: to.daddr,
        svc_id,
        flags: if local_source { CT_F_LOCAL_SOURCE } else { 0 },
        _pad: 0,
    };
    // LRU: a failed insert only leaves the later fragments untranslated
    // (passed and counted), never sent elsewhere.
    let _ = FRAGMENTS.insert(key, value, 0);
}

/// A later fragment gets the addresses its first fragment got; without a
/// record of the first it is passed untouched and counted.
#[inline(always)]
fn follow_first_fragment(ctx: &TcContext, key: &FragKey) -> TcOutcome {
    // SAFETY: copied out at once; the kernel keeps a looked-up value alive
    // until the program returns, and each record is written whole.
    let Some(v) = (unsafe { FRAGMENTS.get(*key) }).copied() else {
        return Outcome::counted(PASS, Reason::FragmentPassed);
    };
    if nat::rewrite_addresses(ctx, (&key.saddr, &key.daddr), (&v.nat_saddr, &v.nat_daddr)).is_err()
    {
        return Outcome::counted(DROP, Reason::RewriteFailed);
    }
    count_packet(v.svc_id, ctx.len());
    let mut action = PASS;
    if v.flags & CT_F_LOCAL_SOURCE != 0 {
        let ip_len = ctx.size().saturating_sub(ETH_HLEN) as u16;
        action = forward::to_next_hop(ctx, v.nat_saddr, v.nat_daddr, key.proto, ip_len);
    }
    Outcome::counted(action, Reason::FragmentTranslated)
}

/// The first packet of a flow to a frontend: pick a backend, record the flow
/// (counting its events), rewrite.
#[inline(always)]
fn start_flow(ctx: &TcContext, flow: &Flow, fe: &Frontend, from_outside: bool) -> TcOutcome {
    let opened = match opening::choose(flow, fe, from_outside) {
        Opening::Drop(reason) => Err(reason),
        Opening::Reject => return reject(ctx, flow, fe),
        Opening::Open(mut c) => opening::record(flow, fe, &mut c)
            .and_then(|()| translate(ctx, flow, &c.to, c.svc_id, c.local_source)),
    };
    match opened {
        // The flow's events (new_flow, ...) already say how it was translated.
        Ok(action) => Outcome::uncounted(action),
        Err(reason) => Outcome::counted(DROP, reason),
    }
}

#[inline(always)]
fn reject(ctx: &TcContext, flow: &Flow, fe: &Frontend) -> TcOutcome {
    if fe.master.flags & SVC_F_REJECT_EMPTY == 0 {
        return Outcome::counted(DROP, Reason::NoLocalEndpoint);
    }
    let answered = if flow.proto == IPPROTO_TCP {
        reject::tcp_reset(ctx, flow)
    } else {
        reject::icmp_port_unreachable(ctx, flow)
    };
    match answered {
        Ok(action) => {
            count_rejected(fe.master.svc_id);
            Outcome::counted(action, Reason::RejectedNoBackend)
        }
        Err(_) => Outcome::counted(DROP, Reason::RejectFailed),
    }
}
