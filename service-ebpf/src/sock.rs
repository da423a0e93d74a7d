//! Socket-level translation for the node's own processes: cgroup hooks at
//! connect(), sendto(), recvfrom() and getpeername() pick a backend from the
//! same maps as the tc programs, so host sockets talk to the backend
//! directly and no packet of theirs needs rewriting.
use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use service_common::*;

use crate::{
    conntrack::snat_address,
    lb::{self, Frontend},
    maps::{META, SOCK_REVNAT},
    stats::{count_flow_opened, count_reason, count_rejected},
};

const PROCEED: i32 = 1;
const REFUSE: i32 = 0;
const ECONNREFUSED: i32 = 111;

/// connect(): TCP and connected UDP.
#[cgroup_sock_addr(connect4)]
pub fn svc_sock_connect4(ctx: SockAddrContext) -> i32 {
    forward(&ctx)
}

/// sendto()/sendmsg() with an address on an unconnected UDP socket.
#[cgroup_sock_addr(sendmsg4)]
pub fn svc_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    forward(&ctx)
}

/// recvfrom()/recvmsg() on UDP: the datagram's source as the Service address.
#[cgroup_sock_addr(recvmsg4)]
pub fn svc_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx);
    // recvmsg and getpeername hooks may only proceed.
    PROCEED
}

/// getpeername(): the peer as the Service address.
#[cgroup_sock_addr(getpeername4)]
pub fn svc_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse(&ctx);
    PROCEED
}

/// Whether the socket lives in the agent's own network namespace. Pods'
/// sockets (in other namespaces, maybe in the same cgroup) keep the tc path,
/// which sees their packets on the pod's veth.
#[inline(always)]
fn in_node_netns(ctx: &SockAddrContext) -> bool {
    let Some(own) = META.get(META_NETNS_COOKIE).copied() else {
        return false;
    };
    // SAFETY: the helper takes the program's own context.
    own != 0 && unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } == own
}

/// The socket's protocol when the dataplane translates it.
#[inline(always)]
fn protocol(ctx: &SockAddrContext) -> Option<u8> {
    // SAFETY: the context the kernel passed; the verifier checks the field access.
    match unsafe { (*ctx.sock_addr).protocol } {
        6 => Some(IPPROTO_TCP),
        17 => Some(IPPROTO_UDP),
        _ => None,
    }
}

#[inline(always)]
fn user_addr(ctx: &SockAddrContext) -> ([u8; 4], u16) {
    // SAFETY: as in `protocol`.
    let sa = unsafe { &*ctx.sock_addr };
    // Both fields are in network order; the port in the low 16 bits.
    (sa.user_ip4.to_ne_bytes(), u16::from_be(sa.user_port as u16))
}

#[inline(always)]
fn set_user_addr(ctx: &SockAddrContext, addr: [u8; 4], port: u16) {
    // SAFETY: as in `protocol`; these two fields are writable in every hook here.
    let sa = unsafe { &mut *ctx.sock_addr };
    sa.user_ip4 = u32::from_ne_bytes(addr);
    sa.user_port = port.to_be() as u32;
}

/// Fails the calling connect()/sendmsg() with ECONNREFUSED, as a TCP reset
/// or an ICMP port unreachable would, but at once and without a packet.
#[inline(always)]
fn refuse(fe: &Frontend, reason: Reason) -> i32 {
    count_reason(reason);
    count_rejected(fe.master.svc_id);
    // SAFETY: a helper call on plain values. (The kernel keeps an error set
    // here instead of its default EPERM for a refusing hook, Linux >= 5.18.)
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    REFUSE
}

#[inline(always)]
fn socket_cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: the helper takes the program's own context.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

#[inline(always)]
fn forward(ctx: &SockAddrContext) -> i32 {
    if !in_node_netns(ctx) {
        return PROCEED;
    }
    let Some(proto) = protocol(ctx) else {
        return PROCEED;
    };
    let (daddr, dport) = user_addr(ctx);
    // ClientIP affinity and source ranges see host processes as the node's
    // own address, the source its packets carry to other nodes.
    let client = snat_address().unwrap_or([0; 4]);
    // The node's own processes are inside the cluster: a Local external
    // frontend gives them its cluster-wide endpoints (kube-proxy
    // short-circuits and masquerades them; here they connect from a node
    // address anyway).
    let Some(fe) = lb::lookup_frontend(daddr, dport, proto, lb::Origin::Inside) else {
        return PROCEED;
    };
    if !lb::source_allowed(&fe, client) {
        // A firewall's answer: the kernel's default EPERM.
        count_reason(Reason::SourceRangeDenied);
        return REFUSE;
    }
    let Some(pick) = lb::select_backend(&fe, client) else {
        if fe.master.count != 0 {
            return refuse(&fe, Reason::NoBackendEntry);
        }
        if fe.master.flags & SVC_F_REJECT_EMPTY == 0 {
            return refuse(&fe, Reason::SockNoLocalEndpoint);
        }
        return refuse(&fe, Reason::SockRefused);
    };
    lb::note_affinity(&fe, client, &pick);
    let key = SockRevKey {
        cookie: socket_cookie(ctx),
        addr: pick.backend.addr,
        port: pick.backend.port,
        _pad: 0,
    };
    let value = SockRevValue {
        addr: daddr,
        port: dport,
        proto,
        _pad: 0,
        svc_id: fe.master.svc_id,
        backend_id: pick.id,
    };
    if SOCK_REVNAT.insert(key, value, 0).is_err() {
        count_reason(Reason::SockRevNatFailed);
    }
    set_user_addr(ctx, pick.backend.addr, pick.backend.port);
    count_flow_opened(fe.master.svc_id, false, pick.affinity);
    count_reason(Reason::SockTranslated);
    PROCEED
}

#[inline(always)]
fn reverse(ctx: &SockAddrContext) {
    if !in_node_netns(ctx) {
        return;
    }
    let (addr, port) = user_addr(ctx);
    let key = SockRevKey {
        cookie: socket_cookie(ctx),
        addr,
        port,
        _pad: 0,
    };
    // SAFETY: copied out at once, while the kernel keeps the value alive.
    if let Some(v) = unsafe { SOCK_REVNAT.get(key) }.copied() {
        set_user_addr(ctx, v.addr, v.port);
        count_reason(Reason::SockReplyTranslated);
    }
}
