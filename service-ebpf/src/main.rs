//! The Service dataplane programs. Every decision about Kubernetes semantics
//! was made by the agent's planner; these programs only follow the maps.
#![no_std]
#![no_main]

mod conntrack;
mod forward;
mod icmp;
mod lb;
mod maps;
mod nat;
mod opening;
mod packet;
mod reject;
mod sock;
mod stats;
mod xdp;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use service_common::{
    CT_F_LOCAL_SOURCE, FragKey, FragValue, IPPROTO_TCP, Reason, SVC_F_REJECT_EMPTY,
};

use crate::{
    conntrack::CtLookup,
    lb::Frontend,
    maps::FRAGMENTS,
    nat::{Target, rewrite_tuple},
    opening::Opening,
    packet::{Flow, Parsed},
    stats::{count_packet, count_reason, count_rejected},
};

const PASS: i32 = TC_ACT_OK as i32;
const DROP: i32 = TC_ACT_SHOT as i32;

/// tc ingress on pod-facing host veths: translates pods' requests to Service
/// frontends and the replies of local backends.
#[classifier]
pub fn svc_tc_pod(ctx: TcContext) -> i32 {
    ingress(&ctx, false)
}

/// tc ingress on the node's external interfaces: NodePort, LoadBalancer and
/// externalIP traffic from outside, and replies of backends on other nodes.
#[classifier]
pub fn svc_tc_external(ctx: TcContext) -> i32 {
    ingress(&ctx, true)
}

/// XDP on the node's external interfaces: the fast path for flows from
/// outside that are source-NATed to backends on other nodes.
#[xdp]
pub fn svc_xdp_external(ctx: XdpContext) -> u32 {
    xdp::ingress(&ctx)
}

#[inline(always)]
fn ingress(ctx: &TcContext, from_outside: bool) -> i32 {
    let flow = match packet::parse(ctx) {
        Parsed::Other => return PASS,
        Parsed::Untouchable(reason) => {
            count_reason(reason);
            return PASS;
        }
        Parsed::Flow(flow) => flow,
        Parsed::LaterFragment(key) => return follow_first_fragment(ctx, &key),
        Parsed::IcmpError(e) => {
            return match icmp::translate(ctx, &e) {
                icmp::IcmpVerdict::NotOurs => PASS,
                icmp::IcmpVerdict::Translated { svc_id } => {
                    count_reason(Reason::IcmpErrorTranslated);
                    count_packet(svc_id, ctx.len());
                    PASS
                }
                icmp::IcmpVerdict::Failed => {
                    count_reason(Reason::RewriteFailed);
                    DROP
                }
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
            count_reason(if reply {
                Reason::ReplyTranslated
            } else {
                Reason::CtHit
            });
            return translate(ctx, &flow, &target, svc_id, local_source);
        }
        CtLookup::Stale => count_reason(Reason::StaleFlowMoved),
        CtLookup::Miss => {}
    }
    match lb::lookup_frontend(&flow) {
        Some(fe) => start_flow(ctx, &flow, &fe, from_outside),
        None => PASS,
    }
}

#[inline(always)]
fn translate(ctx: &TcContext, flow: &Flow, to: &Target, svc_id: u32, local_source: bool) -> i32 {
    if rewrite_tuple(ctx, flow, to).is_err() {
        count_reason(Reason::RewriteFailed);
        return DROP;
    }
    count_packet(svc_id, ctx.len());
    if flow.first_fragment {
        remember_fragments(flow, to, svc_id, local_source);
    }
    if local_source {
        return forward::to_next_hop(ctx, to.saddr, to.daddr, flow.proto, flow.ip_len);
    }
    PASS
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
fn follow_first_fragment(ctx: &TcContext, key: &FragKey) -> i32 {
    let Some(v) = (unsafe { FRAGMENTS.get(*key) }).copied() else {
        count_reason(Reason::FragmentPassed);
        return PASS;
    };
    if nat::rewrite_addresses(ctx, (&key.saddr, &key.daddr), (&v.nat_saddr, &v.nat_daddr)).is_err()
    {
        count_reason(Reason::RewriteFailed);
        return DROP;
    }
    count_reason(Reason::FragmentTranslated);
    count_packet(v.svc_id, ctx.len());
    if v.flags & CT_F_LOCAL_SOURCE != 0 {
        let ip_len = ctx.len().saturating_sub(packet::ETH_HLEN as u32) as u16;
        return forward::to_next_hop(ctx, v.nat_saddr, v.nat_daddr, key.proto, ip_len);
    }
    PASS
}

/// The first packet of a flow to a frontend: pick a backend, record the flow, rewrite.
#[inline(always)]
fn start_flow(ctx: &TcContext, flow: &Flow, fe: &Frontend, from_outside: bool) -> i32 {
    match opening::choose(flow, fe, from_outside) {
        Opening::Drop(reason) => {
            count_reason(reason);
            DROP
        }
        Opening::Reject => reject(ctx, flow, fe),
        Opening::Open(mut c) => match opening::record(flow, fe, &mut c) {
            Ok(()) => translate(ctx, flow, &c.to, c.svc_id, c.local_source),
            Err(reason) => {
                count_reason(reason);
                DROP
            }
        },
    }
}

#[inline(always)]
fn reject(ctx: &TcContext, flow: &Flow, fe: &Frontend) -> i32 {
    if fe.master.flags & SVC_F_REJECT_EMPTY == 0 {
        count_reason(Reason::NoLocalEndpoint);
        return DROP;
    }
    let answered = if flow.proto == IPPROTO_TCP {
        reject::tcp_reset(ctx, flow)
    } else {
        reject::icmp_port_unreachable(ctx, flow)
    };
    match answered {
        Ok(verdict) => {
            count_reason(Reason::RejectedNoBackend);
            count_rejected(fe.master.svc_id);
            verdict
        }
        Err(_) => {
            count_reason(Reason::RejectFailed);
            DROP
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
