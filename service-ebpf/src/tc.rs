//! The tc ingress path: translates requests to frontends and their replies,
//! follows fragments and ICMP errors, and answers for frontends without
//! backends. Each path returns the packet's `Outcome`; the entry point
//! counts it.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    programs::TcContext,
};
use service_common::{
    CT_F_LOCAL_SOURCE, FragValueOf, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, Reason,
    SVC_F_REJECT_EMPTY,
};

use crate::{
    access::Packet,
    conntrack::{self, CtLookup},
    family::{Family, V4, V6},
    forward,
    headers::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6, ETH_TYPE_OFF},
    icmp::{self, IcmpVerdict},
    icmp6::{self, Icmp6Error},
    lb::{self, Frontend},
    nat::{self, Target},
    opening::{self, Choice, Opening},
    packet::{Flow, Parsed},
    scratch::{self, Scratch6},
    stats::{Outcome, count_packet, count_rejected},
};

const PASS: i32 = TC_ACT_OK as i32;
const DROP: i32 = TC_ACT_SHOT as i32;

type TcOutcome = Outcome<i32>;

#[inline(always)]
pub fn ingress(ctx: &TcContext, from_outside: bool) -> TcOutcome {
    match ctx.read::<[u8; 2]>(ETH_TYPE_OFF) {
        Some(ETH_P_IP) => ingress4(ctx, from_outside),
        Some(ETH_P_IPV6) => ingress6(ctx, from_outside),
        _ => Outcome::uncounted(PASS),
    }
}

// Each family's path is a subprogram of its own, so the verifier's 512
// bytes of stack bound each chain, not their sum. IPv6's keys and values
// do not fit one chain as IPv4's do: its steps are subprograms too
// (`Family::SPLIT`), siblings under a thin caller, on state kept in a
// per-CPU scratch slot (`scratch.rs`). A step gives its result through a
// pointer or as an `Outcome` (which fits a register): an aggregate
// returned by value leaves a pointer to the caller's stack in R0, which
// the verifier refuses at a subprogram's exit.

#[inline(never)]
fn ingress4(ctx: &TcContext, from_outside: bool) -> TcOutcome {
    ingress_of::<V4>(ctx, from_outside)
}

#[inline(never)]
fn egress4(ctx: &TcContext) -> TcOutcome {
    egress_of::<V4>(ctx)
}

/// A step's answer that is no tc action: the caller goes on to the next step.
const NEXT: i32 = i32::MIN + 1;
/// `flow_split`: a later fragment, whose key is in the scratch slot.
const LATER_FRAGMENT: i32 = i32::MIN + 2;
/// `choose_split`: the frontend has no backend at all.
const REJECT: i32 = i32::MIN + 3;
/// `flow_split`: an ICMPv6 error quoting TCP/UDP, in the scratch slot.
const ICMP_ERROR: i32 = i32::MIN + 4;

/// IPv6 ingress: the steps of `ingress_of` and `start_flow`, each a
/// subprogram of its own, on state kept in this CPU's scratch slot.
#[inline(never)]
fn ingress6(ctx: &TcContext, from_outside: bool) -> TcOutcome {
    let Some(s) = scratch::slot6(scratch::SLOT_INGRESS) else {
        return Outcome::uncounted(PASS);
    };
    let parsed = flow_split(ctx, s, true);
    match parsed.action {
        NEXT => {}
        LATER_FRAGMENT => return follow_split::<V6>(ctx, &s.frag),
        ICMP_ERROR => return icmp6_split(ctx, &s.icmp),
        _ => return parsed,
    }
    let known = established_split(ctx, &s.flow);
    if known.action != NEXT {
        return known;
    }
    if frontend_split(&s.flow, from_outside, &mut s.fe) == 0 {
        if s.flow.may_open() && retire_split(&s.flow) {
            return Outcome::counted(PASS, Reason::ReusedTupleRetired);
        }
        return Outcome::uncounted(PASS);
    }
    let chosen = choose_split(&s.flow, &s.fe, from_outside, &mut s.choice);
    match chosen.action {
        NEXT => {}
        REJECT => return reject_split(ctx, &s.flow, &s.fe),
        _ => return chosen,
    }
    let recorded = record_split(&s.flow, &s.fe, &mut s.choice);
    if recorded.action != NEXT {
        return recorded;
    }
    let c = &s.choice;
    match translate(ctx, &s.flow, &c.to, c.svc_id, c.local_source) {
        // The flow's events (new_flow, ...) already say how it was translated.
        Ok(action) => Outcome::uncounted(action),
        Err(reason) => Outcome::counted(DROP, reason),
    }
}

#[inline(never)]
fn egress6(ctx: &TcContext) -> TcOutcome {
    let Some(s) = scratch::slot6(scratch::SLOT_EGRESS) else {
        return Outcome::uncounted(PASS);
    };
    if flow_split(ctx, s, false).action != NEXT {
        return Outcome::uncounted(PASS);
    }
    if !lb::is_node_address::<V6>(s.flow.saddr) {
        return Outcome::uncounted(PASS);
    }
    local_reply_split(ctx, &s.flow)
}

/// The frontend of a new flow into `out`; 0: none of ours.
#[inline(never)]
pub(crate) fn frontend_split<F: Family>(
    flow: &Flow<F>,
    from_outside: bool,
    out: &mut Frontend<F>,
) -> u32 {
    match lb::lookup_frontend::<F>(
        flow.daddr,
        flow.dport,
        flow.proto,
        origin_of(flow, from_outside),
    ) {
        Some(fe) => {
            *out = fe;
            1
        }
        None => 0,
    }
}

/// `opening::choose` into `out`: NEXT to open the flow, REJECT, or the drop.
#[inline(never)]
fn choose_split<F: Family>(
    flow: &Flow<F>,
    fe: &Frontend<F>,
    from_outside: bool,
    out: &mut Choice<F>,
) -> TcOutcome {
    match opening::choose(flow, fe, from_outside) {
        Opening::Open(c) => {
            *out = c;
            Outcome::uncounted(NEXT)
        }
        Opening::Reject => Outcome::uncounted(REJECT),
        Opening::Drop(reason) => Outcome::counted(DROP, reason),
    }
}

/// `opening::record`: NEXT once the flow is pinned, else its drop.
#[inline(never)]
fn record_split<F: Family>(flow: &Flow<F>, fe: &Frontend<F>, c: &mut Choice<F>) -> TcOutcome {
    match opening::record(flow, fe, c) {
        Ok(()) => Outcome::uncounted(NEXT),
        Err(reason) => Outcome::counted(DROP, reason),
    }
}

#[inline(always)]
fn origin_of<F: Family>(flow: &Flow<F>, from_outside: bool) -> lb::Origin<F> {
    if from_outside {
        lb::Origin::Wire(flow.saddr)
    } else {
        lb::Origin::Inside
    }
}

/// `established` as a subprogram. An aggregate returned by value (such as
/// the `CtLookup` itself) comes back as a pointer to the caller's stack in
/// R0, which the verifier refuses at a subprogram's exit; an `Outcome<i32>`
/// fits a register.
#[inline(never)]
fn established_split<F: Family>(ctx: &TcContext, flow: &Flow<F>) -> TcOutcome {
    established(ctx, flow)
}

/// A packet of a flow conntrack knows: translated as its entry says, or
/// passed for the kernel's conntrack; NEXT when no entry decides.
#[inline(always)]
fn established<F: Family>(ctx: &TcContext, flow: &Flow<F>) -> TcOutcome {
    match conntrack::lookup(flow) {
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
            match translate(ctx, flow, &target, svc_id, local_source) {
                Ok(action) => Outcome::counted(action, hit),
                Err(reason) => Outcome::counted(DROP, reason),
            }
        }
        CtLookup::Kernel => Outcome::counted(PASS, Reason::KernelFlowPassed),
        CtLookup::Stale | CtLookup::Miss => Outcome::uncounted(NEXT),
    }
}

/// A packet no conntrack entry knows: to a frontend, or none of ours.
/// One of ours may still have to make way for it: a flow opened directly
/// to a backend on a tuple that a translated flow's backend sees
/// (`conntrack::retire_reused`). Only a packet that may open a flow asks,
/// so a TCP flow's later segments cost nothing more.
#[inline(always)]
fn new_flow<F: Family>(ctx: &TcContext, flow: &Flow<F>, from_outside: bool) -> TcOutcome {
    match lb::lookup_frontend::<F>(
        flow.daddr,
        flow.dport,
        flow.proto,
        origin_of(flow, from_outside),
    ) {
        Some(fe) => start_flow(ctx, flow, &fe, from_outside),
        None if flow.may_open() && conntrack::retire_reused(flow) => {
            Outcome::counted(PASS, Reason::ReusedTupleRetired)
        }
        None => Outcome::uncounted(PASS),
    }
}

#[inline(never)]
fn retire_split<F: Family>(flow: &Flow<F>) -> bool {
    conntrack::retire_reused(flow)
}

/// The IPv6 parse as a subprogram: its temporaries (the copied header, the
/// `Parsed` enum) stay in its own frame. NEXT with the flow in the slot,
/// LATER_FRAGMENT with the fragment's key there (`ingress` only), or what
/// to do with a packet that has no flow (passed; counted at ingress when
/// it may not be rewritten).
#[inline(never)]
fn flow_split(ctx: &TcContext, s: &mut Scratch6, ingress: bool) -> TcOutcome {
    match V6::parse(ctx) {
        Parsed::Flow(flow) => {
            s.flow = flow;
            Outcome::uncounted(NEXT)
        }
        Parsed::Untouchable(reason) if ingress => Outcome::counted(PASS, reason),
        Parsed::LaterFragment(key) if ingress => {
            s.frag = key;
            Outcome::uncounted(LATER_FRAGMENT)
        }
        Parsed::Icmp6Error(e) if ingress => {
            s.icmp = e;
            Outcome::uncounted(ICMP_ERROR)
        }
        _ => Outcome::uncounted(PASS),
    }
}

/// One family's ingress path.
#[inline(always)]
fn ingress_of<F: Family>(ctx: &TcContext, from_outside: bool) -> TcOutcome {
    let flow = match F::parse(ctx) {
        Parsed::Other => return Outcome::uncounted(PASS),
        Parsed::Untouchable(reason) => return Outcome::counted(PASS, reason),
        Parsed::Flow(flow) => flow,
        Parsed::LaterFragment(key) => return follow_first_fragment::<F>(ctx, &key),
        Parsed::IcmpError(e) => {
            return icmp_outcome::<V4>(ctx, icmp::translate(ctx, &e), IPPROTO_ICMP);
        }
        Parsed::Icmp6Error(_) => return Outcome::uncounted(PASS),
    };
    tracked_or_new(ctx, &flow, from_outside)
}

/// What an ICMP error's translation comes to; `proto` is the error's own
/// (ICMP or ICMPv6), for the route it takes from a node address.
#[inline(always)]
fn icmp_outcome<F: Family>(ctx: &TcContext, v: IcmpVerdict<F::Addr>, proto: u8) -> TcOutcome {
    match v {
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
                forward::to_next_hop::<F>(ctx, source, client, proto, ip_len)
            } else {
                PASS
            };
            Outcome::counted(action, Reason::IcmpErrorTranslated)
        }
        IcmpVerdict::Failed(reason) => Outcome::counted(DROP, reason),
    }
}

#[inline(never)]
fn icmp6_split(ctx: &TcContext, e: &Icmp6Error) -> TcOutcome {
    icmp_outcome::<V6>(ctx, icmp6::translate(ctx, e), IPPROTO_ICMPV6)
}

/// A TCP or UDP packet: translated as conntrack says, or as a new flow.
#[inline(always)]
fn tracked_or_new<F: Family>(ctx: &TcContext, flow: &Flow<F>, from_outside: bool) -> TcOutcome {
    let known = established(ctx, flow);
    if known.action != NEXT {
        return known;
    }
    new_flow(ctx, flow, from_outside)
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
    match ctx.read::<[u8; 2]>(ETH_TYPE_OFF) {
        Some(ETH_P_IP) => egress4(ctx),
        Some(ETH_P_IPV6) => egress6(ctx),
        _ => Outcome::uncounted(PASS),
    }
}

#[inline(always)]
fn egress_of<F: Family>(ctx: &TcContext) -> TcOutcome {
    let flow = match F::parse(ctx) {
        Parsed::Flow(flow) => flow,
        _ => return Outcome::uncounted(PASS),
    };
    if !lb::is_node_address::<F>(flow.saddr) {
        return Outcome::uncounted(PASS);
    }
    local_reply(ctx, &flow)
}

#[inline(never)]
fn local_reply_split<F: Family>(ctx: &TcContext, flow: &Flow<F>) -> TcOutcome {
    local_reply(ctx, flow)
}

/// A reply from a node address: translated when it belongs to a flow
/// translated at ingress, else none of ours.
#[inline(always)]
fn local_reply<F: Family>(ctx: &TcContext, flow: &Flow<F>) -> TcOutcome {
    let CtLookup::Hit {
        target,
        svc_id,
        reply: true,
        ..
    } = conntrack::lookup(flow)
    else {
        return Outcome::uncounted(PASS);
    };
    match translate(ctx, flow, &target, svc_id, false) {
        Ok(action) => Outcome::counted(action, Reason::LocalReplyTranslated),
        Err(reason) => Outcome::counted(DROP, reason),
    }
}

/// Rewrites the packet to `to` and sends it on; Err: why it must be dropped.

#[inline(always)]
fn translate<F: Family>(
    ctx: &TcContext,
    flow: &Flow<F>,
    to: &Target<F>,
    svc_id: u32,
    local_source: bool,
) -> Result<i32, Reason> {
    let action = if F::SPLIT {
        translated_split(ctx, flow, to, svc_id, local_source)
    } else {
        translated(ctx, flow, to, svc_id, local_source)
    };
    match action {
        REWRITE_FAILED => Err(Reason::RewriteFailed),
        action => Ok(action),
    }
}

/// No tc action: what `translated` returns when the rewrite failed.
const REWRITE_FAILED: i32 = i32::MIN;

/// `translated` as a subprogram. It returns the action or REWRITE_FAILED:
/// a plain integer comes back in a register, a Result or Option through a
/// pointer, which would be a sixth argument (a BPF call takes five).
#[inline(never)]
fn translated_split<F: Family>(
    ctx: &TcContext,
    flow: &Flow<F>,
    to: &Target<F>,
    svc_id: u32,
    local_source: bool,
) -> i32 {
    translated(ctx, flow, to, svc_id, local_source)
}

#[inline(always)]
fn translated<F: Family>(
    ctx: &TcContext,
    flow: &Flow<F>,
    to: &Target<F>,
    svc_id: u32,
    local_source: bool,
) -> i32 {
    if nat::rewrite_tuple(ctx, flow, to).is_err() {
        return REWRITE_FAILED;
    }
    count_packet(svc_id, ctx.len());
    if flow.first_fragment {
        remember_fragments(flow, to, svc_id, local_source);
    }
    if local_source {
        return forward::to_next_hop::<F>(ctx, to.saddr, to.daddr, flow.proto, flow.ip_len);
    }
    PASS
}

/// Records how a first fragment was rewritten, for the rest of its datagram.
#[inline(always)]
fn remember_fragments<F: Family>(flow: &Flow<F>, to: &Target<F>, svc_id: u32, local_source: bool) {
    let value = FragValueOf {
        nat_saddr: to.saddr,
        nat_daddr: to.daddr,
        svc_id,
        flags: if local_source { CT_F_LOCAL_SOURCE } else { 0 },
        _pad: 0,
    };
    F::frag_insert(&F::frag_key(flow), &value);
}

#[inline(never)]
fn follow_split<F: Family>(ctx: &TcContext, key: &F::FragKey) -> TcOutcome {
    follow_first_fragment::<F>(ctx, key)
}

/// A later fragment gets the addresses its first fragment got; without a
/// record of the first it is passed untouched and counted.
#[inline(always)]
fn follow_first_fragment<F: Family>(ctx: &TcContext, key: &F::FragKey) -> TcOutcome {
    let Some(v) = F::frag_get(key) else {
        return Outcome::counted(PASS, Reason::FragmentPassed);
    };
    let (saddr, daddr, proto) = F::frag_tuple(key);
    if nat::rewrite_addresses::<F>(ctx, (saddr, daddr), (v.nat_saddr, v.nat_daddr)).is_err() {
        return Outcome::counted(DROP, Reason::RewriteFailed);
    }
    count_packet(v.svc_id, ctx.len());
    let mut action = PASS;
    if v.flags & CT_F_LOCAL_SOURCE != 0 {
        let ip_len = ctx.size().saturating_sub(ETH_HLEN) as u16;
        action = forward::to_next_hop::<F>(ctx, v.nat_saddr, v.nat_daddr, proto, ip_len);
    }
    Outcome::counted(action, Reason::FragmentTranslated)
}

/// The first packet of a flow to a frontend: pick a backend, record the flow
/// (counting its events), rewrite.
#[inline(always)]
fn start_flow<F: Family>(
    ctx: &TcContext,
    flow: &Flow<F>,
    fe: &Frontend<F>,
    from_outside: bool,
) -> TcOutcome {
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

#[inline(never)]
fn reject_split<F: Family>(ctx: &TcContext, flow: &Flow<F>, fe: &Frontend<F>) -> TcOutcome {
    reject(ctx, flow, fe)
}

#[inline(always)]
fn reject<F: Family>(ctx: &TcContext, flow: &Flow<F>, fe: &Frontend<F>) -> TcOutcome {
    if fe.master.flags & SVC_F_REJECT_EMPTY == 0 {
        return Outcome::counted(DROP, Reason::NoLocalEndpoint);
    }
    let answered = if flow.proto == IPPROTO_TCP {
        F::tcp_reset(ctx, flow)
    } else {
        F::port_unreachable(ctx, flow)
    };
    match answered {
        Ok(action) => {
            count_rejected(fe.master.svc_id);
            Outcome::counted(action, Reason::RejectedNoBackend)
        }
        Err(_) => Outcome::counted(DROP, Reason::RejectFailed),
    }
}
