//! The XDP fast path on external interfaces: flows from outside that are
//! source-NATed to a backend on another node (NodePort, LoadBalancer and
//! externalIPs with externalTrafficPolicy Cluster), and their replies, are
//! translated and forwarded before the kernel builds an skb. Everything else,
//! and whatever this path cannot forward (fragments, IP options, ICMP, an
//! unresolved neighbour, a route out of an interface that cannot take XDP
//! frames), goes on to the tc program untouched, which handles all of it. A
//! new flow's backend is chosen and recorded here even when tc carries it,
//! so each flow is balanced by one draw.
//!
//! Both families take the same steps, written once over `Family`. As in
//! tc (see `tc.rs`), IPv4's path is one function and IPv6's steps are
//! sibling subprograms under `ingress6`, on state in this CPU's XDP scratch
//! slot, since IPv6's keys and values do not fit the verifier's 512 bytes
//! of stack along one call chain.
use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use service_common::{IPPROTO_TCP, IPPROTO_UDP, Reason};

use crate::{
    access::{Packet, xdp_ptr},
    conntrack::{self, CtLookup},
    family::{Family, V4, V6},
    forward::{self, Hop},
    headers::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6, ETH_TYPE_OFF, TCP_CSUM_OFF, UDP_CSUM_OFF},
    lb::{self, Frontend},
    maps::XDP_EGRESS,
    nat::Target,
    opening::{self, Choice, Opening},
    packet::{Flow, Parsed},
    scratch,
    stats::{Outcome, count_packet, count_reason},
    tc,
};

const PASS: u32 = xdp_action::XDP_PASS;
const DROP: u32 = xdp_action::XDP_DROP;
/// A step's answer that is no XDP action: the caller goes on to the next step.
const NEXT: u32 = u32::MAX;
/// `known`: a source-NATed request / reply for XDP to send.
const SEND_REQUEST: u32 = u32::MAX - 1;
const SEND_REPLY: u32 = u32::MAX - 2;

type XdpOutcome = Outcome<u32>;

#[inline(always)]
pub fn ingress(ctx: &XdpContext) -> XdpOutcome {
    // Each path counts its own verdict: see `ingress6`.
    Outcome::uncounted(match ctx.read::<[u8; 2]>(ETH_TYPE_OFF) {
        Some(ETH_P_IP) => ingress4(ctx),
        Some(ETH_P_IPV6) => ingress6(ctx),
        _ => PASS,
    })
}

// Each family's path is a subprogram, so each chain has the verifier's 512
// bytes of stack to itself. The subprograms count their verdicts and
// return the bare action: an `Outcome` comes back through a slot in the
// caller's frame, and IPv6's deepest chain (ingress6, recording the flow,
// pinning it in conntrack) has no bytes to spare for it.

#[inline(never)]
fn ingress4(ctx: &XdpContext) -> u32 {
    let Some(flow) = plain_flow::<V4>(ctx) else {
        return PASS;
    };
    let (mut to, mut svc_id) = (Target::<V4>::none(), 0);
    match known(&flow, &mut to, &mut svc_id).finish() {
        NEXT => {}
        hit @ (SEND_REQUEST | SEND_REPLY) => {
            return send_known(ctx, &flow, &to, svc_id, hit == SEND_REPLY);
        }
        action => return action,
    }
    // The same scope as tc on this interface would choose. To no frontend:
    // tc's, which also retires a translated flow whose tuple the packet
    // reuses (a client reaching a backend directly).
    let origin = lb::Origin::Wire(flow.saddr);
    let Some(fe) = lb::lookup_frontend::<V4>(flow.daddr, flow.dport, flow.proto, origin) else {
        return PASS;
    };
    let mut c = match choose(&flow, &fe) {
        Ok(c) => c,
        Err(out) => return out.finish(),
    };
    match record(&flow, &fe, &mut c).finish() {
        NEXT => send_of(ctx, &flow, &c.to, c.svc_id),
        action => action,
    }
}

/// IPv6: the steps of `ingress4`, each a subprogram, on this CPU's XDP slot.
#[inline(never)]
fn ingress6(ctx: &XdpContext) -> u32 {
    let Some(s) = scratch::slot6(scratch::SLOT_XDP) else {
        return PASS;
    };
    if flow_split(ctx, &mut s.flow) == 0 {
        return PASS;
    }
    let c = &mut s.choice;
    match known_split(&s.flow, &mut c.to, &mut c.svc_id) {
        NEXT => {}
        hit @ (SEND_REQUEST | SEND_REPLY) => {
            return send_known(ctx, &s.flow, &c.to, c.svc_id, hit == SEND_REPLY);
        }
        action => return action,
    }
    if tc::frontend_split(&s.flow, true, &mut s.fe) == 0 {
        return PASS;
    }
    match choose_split(&s.flow, &s.fe, &mut s.choice) {
        NEXT => {}
        action => return action,
    }
    match record_split(&s.flow, &s.fe, &mut s.choice) {
        NEXT => send_split(ctx, &s.flow, &s.choice.to, s.choice.svc_id),
        action => action,
    }
}

/// The flows this path forwards: TCP or UDP in a plain IP header (no IPv4
/// options, no IPv6 extension headers, so no fragment either), with TTL or
/// hop limit left to forward. The rest is rare and tc handles it (and
/// counts what is malformed); the fast path stays simple.
#[inline(always)]
fn plain_flow<F: Family>(ctx: &XdpContext) -> Option<Flow<F>> {
    match F::parse(ctx) {
        Parsed::Flow(f) if f.l3_len == F::PLAIN_HLEN && !f.first_fragment && f.ttl > 1 => Some(f),
        _ => None,
    }
}

/// `plain_flow` into `out`: 1, or 0 for a packet tc is to have.
#[inline(never)]
fn flow_split(ctx: &XdpContext, out: &mut Flow<V6>) -> u32 {
    match plain_flow::<V6>(ctx) {
        Some(f) => {
            *out = f;
            1
        }
        None => 0,
    }
}

/// A known flow's target into `to` and `svc_id`, to be sent as `hit`'s
/// action says (SEND_REQUEST, SEND_REPLY); NEXT when no entry decides.
/// The send is the caller's, so that the FIB lookup's frame does not sit
/// on top of this one's conntrack key.
#[inline(always)]
fn known<F: Family>(flow: &Flow<F>, to: &mut Target<F>, svc_id: &mut u32) -> XdpOutcome {
    match conntrack::lookup(flow) {
        // Flows to local backends and replies to pods belong to the tc
        // programs: their packets go to pod interfaces, which XDP does not send to.
        CtLookup::Hit { snat: false, .. } => Outcome::uncounted(PASS),
        // The kernel's conntrack translates it, after tc (which counts it).
        CtLookup::Kernel => Outcome::uncounted(PASS),
        CtLookup::Hit {
            target,
            svc_id: id,
            reply,
            ..
        } => {
            *to = target;
            *svc_id = id;
            Outcome::uncounted(if reply { SEND_REPLY } else { SEND_REQUEST })
        }
        CtLookup::Stale | CtLookup::Miss => Outcome::uncounted(NEXT),
    }
}

#[inline(never)]
fn known_split<F: Family>(flow: &Flow<F>, to: &mut Target<F>, svc_id: &mut u32) -> u32 {
    known(flow, to, svc_id).finish()
}

/// Sends a packet of a flow conntrack knows.
#[inline(always)]
fn send_known<F: Family>(
    ctx: &XdpContext,
    flow: &Flow<F>,
    to: &Target<F>,
    svc_id: u32,
    reply: bool,
) -> u32 {
    let action = send_of(ctx, flow, to, svc_id);
    // The match is an event here: the verdict says how XDP sent it, and tc
    // counts the match of a packet XDP hands on (the one PASS of `send`).
    if action != PASS {
        count_reason(if reply {
            Reason::ReplyTranslated
        } else {
            Reason::CtHit
        });
    }
    action
}

/// A new flow's backend and translation, before anything is written.
#[inline(always)]
fn choose<F: Family>(flow: &Flow<F>, fe: &Frontend<F>) -> Result<Choice<F>, XdpOutcome> {
    match opening::choose(flow, fe, true) {
        Opening::Open(c) => Ok(c),
        // Dropping here spares the stack the packets no backend will see.
        Opening::Drop(reason) => Err(Outcome::counted(DROP, reason)),
        // tc builds the reset or port-unreachable.
        Opening::Reject => Err(Outcome::uncounted(PASS)),
    }
}

/// `choose` into `out`: NEXT, or what becomes of the packet (counted).
#[inline(never)]
fn choose_split<F: Family>(flow: &Flow<F>, fe: &Frontend<F>, out: &mut Choice<F>) -> u32 {
    match choose(flow, fe) {
        Ok(c) => {
            *out = c;
            NEXT
        }
        Err(out) => out.finish(),
    }
}

/// Pins the flow: NEXT when XDP is to forward it (source-NATed), else what
/// becomes of the packet.
#[inline(always)]
fn record<F: Family>(flow: &Flow<F>, fe: &Frontend<F>, c: &mut Choice<F>) -> XdpOutcome {
    // The backend is drawn once, here, and recorded whoever carries the
    // packet: tc finds the flow in conntrack and follows it. (A second draw
    // in tc for the flows XDP hands on would skew the spread towards the
    // backends tc carries.)
    if let Err(reason) = opening::record(flow, fe, c) {
        return Outcome::counted(DROP, reason);
    }
    if !c.snat {
        return Outcome::uncounted(PASS);
    }
    Outcome::uncounted(NEXT)
}

#[inline(never)]
fn record_split<F: Family>(flow: &Flow<F>, fe: &Frontend<F>, c: &mut Choice<F>) -> u32 {
    record(flow, fe, c).finish()
}

/// `send`, counted; a subprogram for a split family, whose FIB lookup's 64
/// bytes then sit in a frame of their own.
#[inline(always)]
fn send_of<F: Family>(ctx: &XdpContext, flow: &Flow<F>, to: &Target<F>, svc_id: u32) -> u32 {
    if F::SPLIT {
        send_split(ctx, flow, to, svc_id)
    } else {
        send(ctx, flow, to, svc_id).finish()
    }
}

#[inline(never)]
fn send_split<F: Family>(ctx: &XdpContext, flow: &Flow<F>, to: &Target<F>, svc_id: u32) -> u32 {
    send(ctx, flow, to, svc_id).finish()
}

/// Forwards the packet rewritten to `to` when XDP can; otherwise tc takes
/// it untouched (counted as `xdp_passed_to_tc`).
#[inline(always)]
fn send<F: Family>(ctx: &XdpContext, flow: &Flow<F>, to: &Target<F>, svc_id: u32) -> XdpOutcome {
    match next_hop(ctx, flow, to) {
        Some(hop) => forward(ctx, flow, to, &hop, svc_id),
        None => Outcome::counted(PASS, Reason::XdpPassedToTc),
    }
}

#[inline(always)]
fn ingress_ifindex(ctx: &XdpContext) -> u32 {
    ctx.ingress_ifindex() as u32
}

/// Where the translated packet goes: a route with a resolved neighbour out
/// of an interface in XDP_EGRESS (which the agent fills only with external
/// interfaces able to take XDP frames). Otherwise None: tc takes the packet.
#[inline(always)]
fn next_hop<F: Family>(ctx: &XdpContext, flow: &Flow<F>, to: &Target<F>) -> Option<Hop> {
    let hop = forward::route::<F>(
        ctx.ctx.cast(),
        ingress_ifindex(ctx),
        (to.saddr, to.daddr),
        flow.proto,
        flow.ip_len,
    )?;
    if !hop.resolved {
        return None;
    }
    XDP_EGRESS.get_ifindex(hop.ifindex)?;
    Some(hop)
}

/// Rewrites the packet to `to`, as a router would forward it (MACs of the
/// next hop, TTL or hop limit decremented), and sends it on.
#[inline(always)]
fn forward<F: Family>(
    ctx: &XdpContext,
    flow: &Flow<F>,
    to: &Target<F>,
    hop: &Hop,
    svc_id: u32,
) -> XdpOutcome {
    if rewrite(ctx, flow, to, hop).is_none() {
        return Outcome::counted(DROP, Reason::RewriteFailed);
    }
    count_packet(svc_id, ctx.size() as u32);
    // Out of the arrival interface too through the devmap rather than
    // XDP_TX: a veth flushes XDP_TX frames to its peer only when the peer
    // runs XDP itself, while the devmap's transmit path works whenever the
    // device reports NDO_XMIT, which is what the agent checked.
    let how = if hop.ifindex == ingress_ifindex(ctx) {
        Reason::XdpTx
    } else {
        Reason::XdpRedirect
    };
    let action = XDP_EGRESS
        .redirect(hop.ifindex, 0)
        .unwrap_or(xdp_action::XDP_ABORTED);
    Outcome::counted(action, how)
}

#[inline(always)]
fn rewrite<F: Family>(ctx: &XdpContext, flow: &Flow<F>, to: &Target<F>, hop: &Hop) -> Option<()> {
    // Offsets from constants, not from the flow's l3_len: a plain header's
    // length is known, and an offset read back from the scratch map would
    // be unbounded to the verifier.
    let l4_off = ETH_HLEN + F::PLAIN_HLEN;
    let csum_off = l4_off
        + if flow.proto == IPPROTO_TCP {
            TCP_CSUM_OFF
        } else {
            UDP_CSUM_OFF
        };
    let macs = xdp_ptr::<[[u8; 6]; 2]>(ctx, 0)?;
    let ports = xdp_ptr::<[[u8; 2]; 2]>(ctx, l4_off)?;
    let l4_check = xdp_ptr::<[u8; 2]>(ctx, csum_off)?;
    F::xdp_rewrite_ip(ctx, to)?;
    // SAFETY: each pointer was bounds-checked against data_end by xdp_ptr
    // (which the verifier requires before any access), the regions do not
    // overlap, and every type is bytes only (alignment 1).
    let (macs, ports, l4_check) = unsafe { (&mut *macs, &mut *ports, &mut *l4_check) };
    *macs = [hop.dmac, hop.smac];

    let old_ports = [ports[0][0], ports[0][1], ports[1][0], ports[1][1]];
    *ports = [to.sport.to_be_bytes(), to.dport.to_be_bytes()];
    let new_ports = [ports[0][0], ports[0][1], ports[1][0], ports[1][1]];
    let zero_means_none = flow.proto == IPPROTO_UDP;
    let mut check = u16::from_ne_bytes(*l4_check);
    // A zero UDP checksum means "none" over IPv4 and stays zero (IPv6's
    // never gets here: packet6 passes it to tc); a computed zero is sent
    // as 0xffff.
    if zero_means_none && check == 0 {
        return Some(());
    }
    // The pseudo-header covers the addresses (as they were in the header).
    check = F::csum_replace_addr(check, flow.saddr, to.saddr);
    check = F::csum_replace_addr(check, flow.daddr, to.daddr);
    check = crate::csum::replace4(check, old_ports, new_ports);
    if zero_means_none && check == 0 {
        check = 0xffff;
    }
    *l4_check = check.to_ne_bytes();
    Some(())
}
