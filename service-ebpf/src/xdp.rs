//! The XDP fast path on external interfaces: flows from outside that are
//! source-NATed to a backend on another node (NodePort, LoadBalancer and
//! externalIPs with externalTrafficPolicy Cluster), and their replies, are
//! translated and forwarded before the kernel builds an skb. Everything else,
//! and whatever this path cannot forward (fragments, IP options, ICMP, an
//! unresolved neighbour, a route out of an interface that cannot take XDP
//! frames), goes on to the tc program untouched, which handles all of it. A
//! new flow's backend is chosen and recorded here even when tc carries it,
//! so each flow is balanced by one draw.
use core::mem::{size_of, zeroed};

use aya_ebpf::{
    bindings::{BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup, xdp_action},
    helpers::bpf_fib_lookup as fib_lookup,
    programs::XdpContext,
};
use service_common::{IPPROTO_TCP, IPPROTO_UDP, Reason};

use crate::{
    conntrack::{self, CtLookup},
    lb,
    maps::XDP_EGRESS,
    nat::Target,
    opening::{self, Opening},
    packet::{ETH_HLEN, Flow},
    stats::{count_packet, count_reason},
};

const PASS: u32 = xdp_action::XDP_PASS;
const DROP: u32 = xdp_action::XDP_DROP;
const AF_INET: u8 = 2;
const IP_HLEN: usize = 20;
const L4_OFF: usize = ETH_HLEN + IP_HLEN;

pub fn ingress(ctx: &XdpContext) -> u32 {
    let Some(flow) = parse(ctx) else {
        return PASS;
    };
    match conntrack::lookup(&flow) {
        // Flows to local backends and replies to pods belong to the tc
        // programs: their packets go to pod interfaces, which XDP does not send to.
        CtLookup::Hit { snat: false, .. } => return PASS,
        // The kernel's conntrack translates it, after tc (which counts it).
        CtLookup::Kernel => return PASS,
        CtLookup::Hit {
            target,
            svc_id,
            reply,
            ..
        } => {
            let Some(hop) = next_hop(ctx, &flow, &target) else {
                count_reason(Reason::XdpPassedToTc);
                return PASS;
            };
            count_reason(if reply {
                Reason::ReplyTranslated
            } else {
                Reason::CtHit
            });
            return forward(ctx, &flow, &target, &hop, svc_id);
        }
        CtLookup::Stale => count_reason(Reason::StaleFlowMoved),
        CtLookup::Miss => {}
    }
    let Some(fe) = lb::lookup_frontend(&flow) else {
        return PASS;
    };
    match opening::choose(&flow, &fe, true) {
        // Dropping here spares the stack the packets no backend will see.
        Opening::Drop(reason) => {
            count_reason(reason);
            DROP
        }
        // tc builds the reset or port-unreachable.
        Opening::Reject => PASS,
        Opening::Open(mut c) => {
            // The backend is drawn once, here, and recorded whoever carries
            // the packet: tc finds the flow in conntrack and follows it. (A
            // second draw in tc for the flows XDP hands on would skew the
            // spread towards the backends tc carries.)
            if let Err(reason) = opening::record(&flow, &fe, &mut c) {
                count_reason(reason);
                return DROP;
            }
            if !c.snat {
                return PASS;
            }
            let Some(hop) = next_hop(ctx, &flow, &c.to) else {
                count_reason(Reason::XdpPassedToTc);
                return PASS;
            };
            forward(ctx, &flow, &c.to, &hop, c.svc_id)
        }
    }
}

/// A pointer to `N` bytes at `off` in the packet, if the packet has them.
#[inline(always)]
fn bytes<const N: usize>(ctx: &XdpContext, off: usize) -> Option<*mut [u8; N]> {
    let start = ctx.data();
    if start + off + N > ctx.data_end() {
        return None;
    }
    Some((start + off) as *mut [u8; N])
}

/// IPv4 TCP or UDP without options, not a fragment, TTL left to forward.
#[inline(always)]
fn parse(ctx: &XdpContext) -> Option<Flow> {
    let eth = unsafe { *bytes::<ETH_HLEN>(ctx, 0)? };
    if eth[12..14] != [0x08, 0x00] {
        return None;
    }
    let ip = unsafe { *bytes::<IP_HLEN>(ctx, ETH_HLEN)? };
    // 0x45: version 4, no options. Options and fragments are rare and tc
    // handles them; the fast path stays simple.
    if ip[0] != 0x45 || ip[6] & 0x3f != 0 || ip[7] != 0 || ip[8] <= 1 {
        return None;
    }
    let proto = ip[9];
    let ip_len = u16::from_be_bytes([ip[2], ip[3]]);
    let l4_min = match proto {
        IPPROTO_TCP => 20,
        IPPROTO_UDP => 8,
        _ => return None,
    };
    if (ip_len as usize) < IP_HLEN + l4_min
        || ctx.data() + ETH_HLEN + ip_len as usize > ctx.data_end()
    {
        return None;
    }
    let l4 = unsafe { *bytes::<8>(ctx, L4_OFF)? };
    let tcp_flags = if proto == IPPROTO_TCP {
        unsafe { (*bytes::<20>(ctx, L4_OFF)?)[13] }
    } else {
        0
    };
    Some(Flow {
        saddr: [ip[12], ip[13], ip[14], ip[15]],
        daddr: [ip[16], ip[17], ip[18], ip[19]],
        sport: u16::from_be_bytes([l4[0], l4[1]]),
        dport: u16::from_be_bytes([l4[2], l4[3]]),
        proto,
        tcp_flags,
        ihl: IP_HLEN,
        ip_len,
        ip_id: u16::from_be_bytes([ip[4], ip[5]]),
        first_fragment: false,
    })
}

struct NextHop {
    ifindex: u32,
    smac: [u8; 6],
    dmac: [u8; 6],
}

/// Where the translated packet goes: a route with a resolved neighbour out
/// of an interface in XDP_EGRESS (which the agent fills only with external
/// interfaces able to take XDP frames). Otherwise None: tc takes the packet.
#[inline(always)]
fn next_hop(ctx: &XdpContext, flow: &Flow, to: &Target) -> Option<NextHop> {
    let mut p: bpf_fib_lookup = unsafe { zeroed() };
    p.family = AF_INET;
    p.l4_protocol = flow.proto;
    p.__bindgen_anon_1.tot_len = flow.ip_len;
    p.ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
    p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(to.saddr);
    p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(to.daddr);
    let rc = unsafe {
        fib_lookup(
            ctx.ctx.cast(),
            &mut p,
            size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return None;
    }
    XDP_EGRESS.get_ifindex(p.ifindex)?;
    Some(NextHop {
        ifindex: p.ifindex,
        smac: p.smac,
        dmac: p.dmac,
    })
}

/// One's-complement update of a checksum for a 32-bit field changing from
/// `old` to `new` (RFC 1624), all in the packet's byte order.
#[inline(always)]
fn csum_replace4(check: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    let (o, n) = (u32::from_ne_bytes(old), u32::from_ne_bytes(new));
    let mut sum = (!check) as u32;
    sum += (!o & 0xffff) + (!o >> 16);
    sum += (n & 0xffff) + (n >> 16);
    fold(sum)
}

#[inline(always)]
fn csum_replace2(check: u16, old: [u8; 2], new: [u8; 2]) -> u16 {
    let mut sum = (!check) as u32;
    sum += (!u16::from_ne_bytes(old)) as u32;
    sum += u16::from_ne_bytes(new) as u32;
    fold(sum)
}

#[inline(always)]
fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Rewrites the packet to `to`, as a router would forward it (MACs of the
/// next hop, TTL decremented), and sends it on.
#[inline(always)]
fn forward(ctx: &XdpContext, flow: &Flow, to: &Target, hop: &NextHop, svc_id: u32) -> u32 {
    if rewrite(ctx, flow, to, hop).is_none() {
        count_reason(Reason::RewriteFailed);
        return DROP;
    }
    count_packet(svc_id, (ctx.data_end() - ctx.data()) as u32);
    // Out of the arrival interface too through the devmap rather than
    // XDP_TX: a veth flushes XDP_TX frames to its peer only when the peer
    // runs XDP itself, while the devmap's transmit path works whenever the
    // device reports NDO_XMIT, which is what the agent checked.
    count_reason(if hop.ifindex == unsafe { (*ctx.ctx).ingress_ifindex } {
        Reason::XdpTx
    } else {
        Reason::XdpRedirect
    });
    XDP_EGRESS
        .redirect(hop.ifindex, 0)
        .unwrap_or(xdp_action::XDP_ABORTED)
}

#[inline(always)]
fn rewrite(ctx: &XdpContext, flow: &Flow, to: &Target, hop: &NextHop) -> Option<()> {
    let eth = bytes::<12>(ctx, 0)?;
    let ip = bytes::<IP_HLEN>(ctx, ETH_HLEN)?;
    let (old_src, old_dst) = unsafe {
        let eth = &mut *eth;
        eth[..6].copy_from_slice(&hop.dmac);
        eth[6..].copy_from_slice(&hop.smac);
        let ip = &mut *ip;
        let old_src = [ip[12], ip[13], ip[14], ip[15]];
        let old_dst = [ip[16], ip[17], ip[18], ip[19]];
        let mut check = u16::from_ne_bytes([ip[10], ip[11]]);
        let old_ttl = [ip[8], ip[9]];
        ip[8] -= 1;
        check = csum_replace2(check, old_ttl, [ip[8], ip[9]]);
        check = csum_replace4(check, old_src, to.saddr);
        check = csum_replace4(check, old_dst, to.daddr);
        ip[12..16].copy_from_slice(&to.saddr);
        ip[16..20].copy_from_slice(&to.daddr);
        ip[10..12].copy_from_slice(&check.to_ne_bytes());
        (old_src, old_dst)
    };
    let addrs = [(old_src, to.saddr), (old_dst, to.daddr)];
    if flow.proto == IPPROTO_TCP {
        rewrite_l4::<20, 16>(bytes(ctx, L4_OFF)?, to, addrs, false);
    } else {
        rewrite_l4::<8, 6>(bytes(ctx, L4_OFF)?, to, addrs, true);
    }
    Some(())
}

/// Ports and the L4 checksum (whose pseudo-header covers the addresses) of
/// an `N`-byte header with its checksum at `CSUM`.
#[inline(always)]
fn rewrite_l4<const N: usize, const CSUM: usize>(
    hdr: *mut [u8; N],
    to: &Target,
    addrs: [([u8; 4], [u8; 4]); 2],
    zero_means_none: bool,
) {
    let hdr = unsafe { &mut *hdr };
    let old_ports = [hdr[0], hdr[1], hdr[2], hdr[3]];
    let (s, d) = (to.sport.to_be_bytes(), to.dport.to_be_bytes());
    let new_ports = [s[0], s[1], d[0], d[1]];
    hdr[0..4].copy_from_slice(&new_ports);
    let mut check = u16::from_ne_bytes([hdr[CSUM], hdr[CSUM + 1]]);
    // A zero UDP checksum means "none" and stays zero; a computed zero is sent as 0xffff.
    if zero_means_none && check == 0 {
        return;
    }
    for (old, new) in addrs {
        check = csum_replace4(check, old, new);
    }
    check = csum_replace4(check, old_ports, new_ports);
    if zero_means_none && check == 0 {
        check = 0xffff;
    }
    hdr[CSUM..CSUM + 2].copy_from_slice(&check.to_ne_bytes());
}
