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
mod packet;
mod reject;
mod stats;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use service_common::{
    BE_F_LOCAL, CT_F_LOCAL_SOURCE, FragKey, FragValue, IPPROTO_TCP, Reason, SVC_F_REJECT_EMPTY,
};

use crate::{
    conntrack::CtLookup,
    lb::Frontend,
    maps::FRAGMENTS,
    nat::{Target, rewrite_tuple},
    packet::{Flow, Parsed, TCP_ACK, TCP_SYN},
    stats::{count_new_flow, count_packet, count_reason, count_rejected},
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
    let svc_id = fe.master.svc_id;
    // Only a SYN opens a TCP flow. Anything else without a conntrack entry
    // belongs to a flow this node does not know (conntrack's INVALID): a
    // random backend would answer it with a reset, so it is dropped.
    if flow.proto == IPPROTO_TCP && flow.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        count_reason(Reason::CtInvalid);
        return DROP;
    }
    if !lb::source_allowed(fe, flow.saddr) {
        count_reason(Reason::SourceRangeDenied);
        return DROP;
    }
    let Some((backend_id, backend)) = lb::select_backend(fe, flow) else {
        if fe.master.count == 0 {
            return reject(ctx, flow, fe);
        }
        count_reason(Reason::NoBackendEntry);
        return DROP;
    };
    // A pod picked as the backend of its own request would see a packet from
    // itself to itself and drop it as a martian; its source becomes the
    // frontend address instead, and the reply entry undoes both rewrites.
    let hairpin = backend.addr == flow.saddr;
    let mut to = Target {
        saddr: if hairpin { flow.daddr } else { flow.saddr },
        sport: flow.sport,
        daddr: backend.addr,
        dport: backend.port,
    };
    // From outside to a backend on another node: the backend's reply would
    // go straight back to the client, past this node's reverse translation,
    // so the source becomes this node (kube-proxy masquerades the same way).
    // Replies to a frontend on a node address leave with that address as source.
    let reply_flags = if fe.to_node_addr {
        CT_F_LOCAL_SOURCE
    } else {
        0
    };
    let mut local_source = hairpin && fe.to_node_addr;
    if from_outside && !hairpin && backend.flags & BE_F_LOCAL == 0 {
        let Some(addr) = conntrack::snat_address() else {
            count_reason(Reason::SnatFailed);
            return DROP;
        };
        to.saddr = addr;
        if conntrack::create_snat(flow, &mut to, backend_id, svc_id, reply_flags).is_err() {
            count_reason(Reason::SnatFailed);
            return DROP;
        }
        count_reason(Reason::SnatFlow);
        local_source = true;
    } else if conntrack::create(flow, &to, backend_id, svc_id, hairpin, reply_flags).is_err() {
        count_reason(Reason::CtInsertFailed);
        return DROP;
    }
    count_reason(Reason::NewFlow);
    count_new_flow(svc_id);
    translate(ctx, flow, &to, svc_id, local_source)
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
