//! The Service dataplane programs. Every decision about Kubernetes semantics
//! was made by the agent's planner; these programs only follow the maps.
#![no_std]
#![no_main]

mod access;
mod conntrack;
mod csum;
mod family;
mod flood;
mod forward;
mod headers;
mod icmp;
mod icmp6;
mod lb;
mod maps;
mod nat;
mod opening;
mod packet;
mod packet6;
mod ports;
mod reject;
mod reject6;
mod scratch;
mod sock;
mod stats;
mod tc;
mod xdp;

use aya_ebpf::{
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

/// tc ingress on pod-facing host veths: translates pods' requests to Service
/// frontends and the replies of local backends.
#[classifier]
pub fn svc_tc_pod(ctx: TcContext) -> i32 {
    tc::ingress(&ctx, false).finish()
}

/// tc ingress on the node's external interfaces: NodePort, LoadBalancer and
/// externalIP traffic from outside, and replies of backends on other nodes.
#[classifier]
pub fn svc_tc_external(ctx: TcContext) -> i32 {
    tc::ingress(&ctx, true).finish()
}

/// tc egress on pod-facing and external interfaces: replies of host-network
/// endpoints (the node's own stack) to translated flows.
#[classifier]
pub fn svc_tc_egress(ctx: TcContext) -> i32 {
    tc::egress(&ctx).finish()
}

/// XDP on the node's external interfaces: the fast path for flows from
/// outside that are source-NATed to backends on other nodes.
#[xdp]
pub fn svc_xdp_external(ctx: XdpContext) -> u32 {
    xdp::ingress(&ctx).finish()
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
