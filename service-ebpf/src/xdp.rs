//! The XDP fast path on external interfaces: flows from outside that are
//! source-NATed to a backend on another node (NodePort, LoadBalancer and
//! externalIPs with externalTrafficPolicy Cluster), and their replies, are
//! translated and forwarded before the kernel builds an skb. Everything else,
//! and whatever this path cannot forward (fragments, IP options, ICMP, an
//! unresolved neighbour, a route out of an interface that cannot take XDP
//! frames), goes on to the tc program untouched, which handles all of it. A
//! new flow's backend is chosen and recorded here even when tc carries it,
//! so each flow is balanced by one draw.
use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use network_types::ip::Ipv4Hdr;
use service_common::{IPPROTO_UDP, Reason};

use crate::{
    access::{Packet, xdp_ptr},
    conntrack::{self, CtLookup},
    csum,
    family::V4,
    forward::{self, Hop},
    headers::{ETH_HLEN, IP_HLEN},
    lb,
    maps::XDP_EGRESS,
    nat::Target,
    opening::{self, Opening},
    packet::{self, Flow, Parsed},
    stats::{Outcome, count_packet, count_reason},
};

const PASS: u32 = xdp_action::XDP_PASS;
const DROP: u32 = xdp_action::XDP_DROP;

type XdpOutcome = Outcome<u32>;

#[inline(always)]
pub fn ingress(ctx: &XdpContext) -> XdpOutcome {
    let Some(flow) = plain_flow(ctx) else {
        return Outcome::uncounted(PASS);
    };
    match conntrack::lookup(&flow) {
        // Flows to local backends and replies to pods belong to the tc
        // programs: their packets go to pod interfaces, which XDP does not send to.
        CtLookup::Hit { snat: false, .. } => return Outcome::uncounted(PASS),
        // The kernel's conntrack translates it, after tc (which counts it).
        CtLookup::Kernel => return Outcome::uncounted(PASS),
        CtLookup::Hit {
            target,
            svc_id,
            reply,
            ..
        } => {
            let Some(hop) = next_hop(ctx, &flow, &target) else {
                return Outcome::counted(PASS, Reason::XdpPassedToTc);
            };
            // The match is an event here: the verdict says how XDP sent it.
            count_reason(if reply {
                Reason::ReplyTranslated
            } else {
                Reason::CtHit
            });
            return forward(ctx, &flow, &target, &hop, svc_id);
        }
        CtLookup::Stale | CtLookup::Miss => {}
    }
    // The same scope as tc on this interface would choose.
    let origin = lb::Origin::Wire(flow.saddr);
    // To no frontend: tc's, which also retires a translated flow whose
    // tuple the packet reuses (a client reaching a backend directly).
    let Some(fe) = lb::lookup_frontend::<V4>(flow.daddr, flow.dport, flow.proto, origin) else {
        return Outcome::uncounted(PASS);
    };
    match opening::choose(&flow, &fe, true) {
        // Dropping here spares the stack the packets no backend will see.
        Opening::Drop(reason) => Outcome::counted(DROP, reason),
        // tc builds the reset or port-unreachable.
        Opening::Reject => Outcome::uncounted(PASS),
        Opening::Open(mut c) => {
            // The backend is drawn once, here, and recorded whoever carries
            // the packet: tc finds the flow in conntrack and follows it. (A
            // second draw in tc for the flows XDP hands on would skew the
            // spread towards the backends tc carries.)
            if let Err(reason) = opening::record(&flow, &fe, &mut c) {
                return Outcome::counted(DROP, reason);
            }
            if !c.snat {
                return Outcome::uncounted(PASS);
            }
            let Some(hop) = next_hop(ctx, &flow, &c.to) else {
                return Outcome::counted(PASS, Reason::XdpPassedToTc);
            };
            forward(ctx, &flow, &c.to, &hop, c.svc_id)
        }
    }
}

/// The flows this path forwards: IPv4 TCP or UDP without options, not a
/// fragment, with TTL left to forward. Options and fragments are rare and tc
/// handles them (and counts what is malformed); the fast path stays simple.
#[inline(always)]
fn plain_flow(ctx: &XdpContext) -> Option<Flow<V4>> {
    match packet::parse(ctx) {
        Parsed::Flow(f) if f.l3_len == IP_HLEN && !f.first_fragment && f.ttl > 1 => Some(f),
        _ => None,
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
fn next_hop(ctx: &XdpContext, flow: &Flow<V4>, to: &Target<V4>) -> Option<Hop> {
    let hop = forward::route::<V4>(
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
/// next hop, TTL decremented), and sends it on.
#[inline(always)]
fn forward(
    ctx: &XdpContext,
    flow: &Flow<V4>,
    to: &Target<V4>,
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
fn rewrite(ctx: &XdpContext, flow: &Flow<V4>, to: &Target<V4>, hop: &Hop) -> Option<()> {
    let macs = xdp_ptr::<[[u8; 6]; 2]>(ctx, 0)?;
    let ip = xdp_ptr::<Ipv4Hdr>(ctx, ETH_HLEN)?;
    let ports = xdp_ptr::<[[u8; 2]; 2]>(ctx, flow.l4_off())?;
    let l4_check = xdp_ptr::<[u8; 2]>(ctx, flow.l4_csum_off())?;
    // SAFETY: each pointer was bounds-checked against data_end by xdp_ptr
    // (which the verifier requires before any access), the regions do not
    // overlap, and every type is bytes only (alignment 1).
    let (macs, ip, ports, l4_check) =
        unsafe { (&mut *macs, &mut *ip, &mut *ports, &mut *l4_check) };
    *macs = [hop.dmac, hop.smac];
    let (old_src, old_dst) = (ip.src_addr, ip.dst_addr);
    let mut check = u16::from_ne_bytes(ip.check);
    // TTL and protocol share a 16-bit checksum word.
    let old_ttl = [ip.ttl, ip.proto];
    ip.ttl -= 1;
    check = csum::replace2(check, old_ttl, [ip.ttl, ip.proto]);
    check = csum::replace4(check, old_src, to.saddr);
    check = csum::replace4(check, old_dst, to.daddr);
    ip.src_addr = to.saddr;
    ip.dst_addr = to.daddr;
    ip.check = check.to_ne_bytes();

    let old_ports = [ports[0][0], ports[0][1], ports[1][0], ports[1][1]];
    *ports = [to.sport.to_be_bytes(), to.dport.to_be_bytes()];
    let new_ports = [ports[0][0], ports[0][1], ports[1][0], ports[1][1]];
    let zero_means_none = flow.proto == IPPROTO_UDP;
    let mut check = u16::from_ne_bytes(*l4_check);
    // A zero UDP checksum means "none" and stays zero; a computed zero is sent as 0xffff.
    if zero_means_none && check == 0 {
        return Some(());
    }
    // The pseudo-header covers the addresses.
    check = csum::replace4(check, old_src, to.saddr);
    check = csum::replace4(check, old_dst, to.daddr);
    check = csum::replace4(check, old_ports, new_ports);
    if zero_means_none && check == 0 {
        check = 0xffff;
    }
    *l4_check = check.to_ne_bytes();
    Some(())
}
