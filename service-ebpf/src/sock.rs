//! Socket-level translation: cgroup hooks at connect(), sendto(),
//! recvfrom() and getpeername() pick a backend from the same maps as the tc
//! programs, so a socket talks to the backend directly and no packet of its
//! flow needs rewriting. Whose sockets is `--socket-lb` (META_SOCKET_LB):
//! the node's own (the agent's network namespace), or pods' too (any other
//! namespace whose processes are in the cgroup), or none.
use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use service_common::*;

use crate::{
    conntrack::snat_address,
    family::V4,
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
    forward(&ctx, true)
}

/// sendto()/sendmsg() with an address on an unconnected UDP socket.
#[cgroup_sock_addr(sendmsg4)]
pub fn svc_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    forward(&ctx, false)
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

/// Whose socket a hook runs for, as far as translating it goes.
#[derive(Clone, Copy)]
enum Caller {
    /// The agent's own network namespace: the node's processes.
    Node,
    /// Another network namespace (a pod), under `--socket-lb pods`; its
    /// namespace cookie identifies the pod for session affinity.
    Pod { netns: u64 },
}

/// The caller when `--socket-lb` says its sockets are translated here.
/// Under `host`, pods' sockets (in other namespaces, maybe in the same
/// cgroup) keep the tc path, which sees their packets on the pod's veth.
#[inline(always)]
fn caller(ctx: &SockAddrContext) -> Option<Caller> {
    let mode = META.get(META_SOCKET_LB).copied().unwrap_or(SOCKET_LB_HOST);
    if mode == SOCKET_LB_OFF {
        return None;
    }
    let own = META.get(META_NETNS_COOKIE).copied().unwrap_or(0);
    // SAFETY: the helper takes the program's own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if own != 0 && netns == own {
        return Some(Caller::Node);
    }
    (mode == SOCKET_LB_PODS).then_some(Caller::Pod { netns })
}

/// The client a pod socket is, for session affinity: its pod's address is
/// not known at connect() (the kernel chooses the source after the hook),
/// so the pod's namespace stands for it, as an address in 0.0.0.0/8, which
/// no packet carries as its source and so no tc-path affinity entry has.
/// Namespace cookies count up from 1, so the 24 low bits tell apart every
/// namespace but one made 16,777,216 namespaces later.
#[inline(always)]
fn pod_client(netns: u64) -> [u8; 4] {
    let b = (netns as u32).to_be_bytes();
    [0, b[1], b[2], b[3]]
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
fn refuse(fe: &Frontend<V4>, reason: Reason) -> i32 {
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
fn forward(ctx: &SockAddrContext, connect: bool) -> i32 {
    let Some(who) = caller(ctx) else {
        return PROCEED;
    };
    let Some(proto) = protocol(ctx) else {
        return PROCEED;
    };
    let (daddr, dport) = user_addr(ctx);
    // Pods and the node's own processes are inside the cluster: a Local
    // external frontend gives them its cluster-wide endpoints (kube-proxy
    // short-circuits and masquerades the node's; the tc path on a pod's
    // veth does the same for a pod).
    let Some(fe) = lb::lookup_frontend::<V4>(daddr, dport, proto, lb::Origin::Inside) else {
        return PROCEED;
    };
    let client = match who {
        // ClientIP affinity and source ranges see host processes as the
        // node's own address, the source their packets carry to other nodes.
        Caller::Node => snat_address().unwrap_or([0; 4]),
        Caller::Pod { netns } => {
            // A connected UDP socket keeps its peer: were it a backend that
            // left, only the agent's SOCK_DESTROY could end it, and that
            // reaches its own namespace only. On the tc path its flow moves
            // to a live backend instead. Source ranges need the pod's
            // address, which only its packets carry.
            if (connect && proto == IPPROTO_UDP) || fe.master.flags & SVC_F_SOURCE_RANGES != 0 {
                count_reason(Reason::SockPassedToTc);
                return PROCEED;
            }
            pod_client(netns)
        }
    };
    if !lb::source_allowed(&fe, client) {
        // A firewall's answer: the kernel's default EPERM.
        count_reason(Reason::SourceRangeDenied);
        return REFUSE;
    }
    let Some(pick) = lb::select_backend(&fe, client, None) else {
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
    if caller(ctx).is_none() {
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
