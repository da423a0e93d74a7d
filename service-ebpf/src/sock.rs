//! Socket-level translation: cgroup hooks at connect(), sendto(),
//! recvfrom() and getpeername() pick a backend from the same maps as the tc
//! programs, so a socket talks to the backend directly and no packet of its
//! flow needs rewriting. Whose sockets is `--socket-lb` (META_SOCKET_LB):
//! the node's own (the agent's network namespace), or pods' too (any other
//! namespace whose processes are in the cgroup), or none. IPv6 sockets
//! have hooks of their own; one asking for an IPv4-mapped address
//! (::ffff:a.b.c.d, a dual-stack socket reaching an IPv4 Service) is
//! served from the IPv4 maps and given the backend's mapped address.
//! When a translated socket is closed, a sock_release hook removes what
//! its connect() remembered.
use aya_ebpf::{
    EbpfContext as _,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    macros::{cgroup_sock, cgroup_sock_addr},
    programs::{SockAddrContext, SockContext},
};
use service_common::*;

use crate::{
    family::{Family, V4, V6},
    headers::{AF_INET, AF_INET6},
    lb::{self, Frontend},
    maps::{META, SOCK_REVNAT, SOCK_REVNAT6},
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

/// connect() on an IPv6 socket.
#[cgroup_sock_addr(connect6)]
pub fn svc_sock_connect6(ctx: SockAddrContext) -> i32 {
    forward6(&ctx, true)
}

/// sendto()/sendmsg() with an address on an unconnected IPv6 UDP socket.
#[cgroup_sock_addr(sendmsg6)]
pub fn svc_sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    forward6(&ctx, false)
}

/// recvfrom()/recvmsg() on IPv6 UDP.
#[cgroup_sock_addr(recvmsg6)]
pub fn svc_sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    reverse6(&ctx);
    PROCEED
}

/// getpeername() on an IPv6 socket.
#[cgroup_sock_addr(getpeername6)]
pub fn svc_sock_getpeername6(ctx: SockAddrContext) -> i32 {
    reverse6(&ctx);
    PROCEED
}

/// The socket's last descriptor is closed: the reverse entry its connect()
/// made goes with it, so SOCK_REVNAT holds the live translated sockets
/// rather than the last 65,536 ever opened. Left to the LRU, closed
/// sockets' entries fill it: every translated connect() then pays an
/// eviction (measured here: 1.36 µs a translated connect() against 0.57),
/// and a node's churn of short connections pushes out the entries of
/// long-lived sockets, whose getpeername() and the agent's SOCK_DESTROY
/// of a removed backend's sockets then miss them. An unconnected UDP
/// socket's entries (one per backend it sent to) are not known here and
/// age out of the LRU.
#[cgroup_sock(sock_release)]
pub fn svc_sock_release(ctx: SockContext) -> i32 {
    forget(&ctx);
    PROCEED
}

#[inline(always)]
fn forget(ctx: &SockContext) {
    // SAFETY: the context the kernel passed; the verifier checks the field accesses.
    let sk = unsafe { &*ctx.sock };
    if !matches!(sk.protocol, 6 | 17) {
        return;
    }
    // Zero: never connected (or disconnected), so no entry of connect().
    let port = u16::from_be(sk.dst_port);
    if port == 0 {
        return;
    }
    // SAFETY: the helper takes the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let removed = if sk.family == AF_INET as u32 {
        let key = SockRevKey {
            cookie,
            addr: sk.dst_ip4.to_ne_bytes(),
            port,
            _pad: 0,
        };
        SOCK_REVNAT.remove(key).is_ok()
    } else if sk.family == AF_INET6 as u32 {
        // An IPv4-mapped peer is in SOCK_REVNAT6 as the socket sees it.
        let mut addr = [0u8; 16];
        for (i, w) in sk.dst_ip6.iter().enumerate() {
            addr[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        let key = SockRevKey6 {
            cookie,
            addr,
            port,
            _pad: [0; 6],
        };
        SOCK_REVNAT6.remove(key).is_ok()
    } else {
        false
    };
    if removed {
        count_reason(Reason::SockRevNatReleased);
    }
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
/// so the pod's namespace stands for it, as an address in 0.0.0.0/8 (IPv6:
/// ::/104), which no packet carries as its source and so no tc-path
/// affinity entry has. Namespace cookies count up from 1, so the 24 low
/// bits tell apart every namespace but one made 16,777,216 namespaces later.
#[inline(always)]
fn pod_client<F: Family>(netns: u64) -> F::Addr {
    let mut a = F::ANY;
    let b = (netns as u32).to_be_bytes();
    let n = a.as_mut().len();
    a.as_mut()[n - 3..].copy_from_slice(&b[1..]);
    a
}

/// The client the node's own processes are: its SNAT address, the source
/// their packets carry to other nodes (unset: the unspecified address).
#[inline(always)]
fn node_client<F: Family>() -> F::Addr {
    F::snat_address().unwrap_or(F::ANY)
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

#[inline(always)]
fn user_addr6(ctx: &SockAddrContext) -> (Addr6, u16) {
    // SAFETY: as in `protocol`.
    let sa = unsafe { &*ctx.sock_addr };
    let mut a = [0u8; 16];
    for (i, w) in sa.user_ip6.iter().enumerate() {
        a[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    (a, u16::from_be(sa.user_port as u16))
}

#[inline(always)]
fn set_user_addr6(ctx: &SockAddrContext, addr: Addr6, port: u16) {
    // SAFETY: as in `set_user_addr`; user_ip6 is writable in every IPv6 hook here.
    let sa = unsafe { &mut *ctx.sock_addr };
    for i in 0..4 {
        sa.user_ip6[i] = u32::from_ne_bytes([
            addr[i * 4],
            addr[i * 4 + 1],
            addr[i * 4 + 2],
            addr[i * 4 + 3],
        ]);
    }
    sa.user_port = port.to_be() as u32;
}

/// The IPv4 address an IPv4-mapped IPv6 address (::ffff:a.b.c.d) stands for.
#[inline(always)]
fn unmapped(a: &Addr6) -> Option<Addr4> {
    let prefix_ok = a[..10].iter().all(|b| *b == 0) && a[10] == 0xff && a[11] == 0xff;
    prefix_ok.then(|| [a[12], a[13], a[14], a[15]])
}

#[inline(always)]
fn mapped(a: Addr4) -> Addr6 {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}

/// Fails the calling connect()/sendmsg() with ECONNREFUSED, as a TCP reset
/// or an ICMP port unreachable would, but at once and without a packet.
#[inline(always)]
fn refuse<F: Family>(fe: &Frontend<F>, reason: Reason) -> i32 {
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

/// Where `choose` sends a socket: on unchanged, refused (the hook's return
/// code), or to a backend.
enum Choice<F: Family> {
    Proceed,
    Refuse(i32),
    To(Chosen<F::Addr>),
}

/// A socket's backend, and what SOCK_REVNAT needs to find the socket again.
struct Chosen<A> {
    addr: A,
    port: u16,
    proto: u8,
    svc_id: u32,
    backend_id: u32,
}

/// The backend a socket asking for `daddr:dport` goes to, with the flow's
/// events counted (but not the hook's own translation).
#[inline(always)]
fn choose<F: Family>(
    who: Caller,
    proto: u8,
    connect: bool,
    daddr: F::Addr,
    dport: u16,
) -> Choice<F> {
    // Pods and the node's own processes are inside the cluster: a Local
    // external frontend gives them its cluster-wide endpoints (kube-proxy
    // short-circuits and masquerades the node's; the tc path on a pod's
    // veth does the same for a pod).
    let Some(fe) = lb::lookup_frontend::<F>(daddr, dport, proto, lb::Origin::Inside) else {
        return Choice::Proceed;
    };
    let client = match who {
        // ClientIP affinity and source ranges see host processes as the
        // node's own address, the source their packets carry to other nodes.
        Caller::Node => node_client::<F>(),
        Caller::Pod { netns } => {
            // A connected UDP socket keeps its peer: were it a backend that
            // left, only the agent's SOCK_DESTROY could end it, and that
            // reaches its own namespace only. On the tc path its flow moves
            // to a live backend instead. Source ranges need the pod's
            // address, which only its packets carry.
            if (connect && proto == IPPROTO_UDP) || fe.master.flags & SVC_F_SOURCE_RANGES != 0 {
                count_reason(Reason::SockPassedToTc);
                return Choice::Proceed;
            }
            pod_client::<F>(netns)
        }
    };
    if !lb::source_allowed(&fe, client) {
        // A firewall's answer: the kernel's default EPERM.
        count_reason(Reason::SourceRangeDenied);
        return Choice::Refuse(REFUSE);
    }
    let Some(pick) = lb::select_backend(&fe, client, None) else {
        let reason = if fe.master.count != 0 {
            Reason::NoBackendEntry
        } else if fe.master.flags & SVC_F_REJECT_EMPTY == 0 {
            Reason::SockNoLocalEndpoint
        } else {
            Reason::SockRefused
        };
        return Choice::Refuse(refuse(&fe, reason));
    };
    lb::note_affinity(&fe, client, &pick);
    count_flow_opened(fe.master.svc_id, false, pick.affinity);
    Choice::To(Chosen {
        addr: pick.backend.addr,
        port: pick.backend.port,
        proto,
        svc_id: fe.master.svc_id,
        backend_id: pick.id,
    })
}

/// The hook's answer for `chosen`: a translated socket gets its backend
/// written (`set`) and what it asked for remembered (`remember`: false when
/// the LRU refused, counted), both per the socket's family.
#[inline(always)]
fn finish<F: Family>(
    chosen: Choice<F>,
    remember: impl FnOnce(&Chosen<F::Addr>) -> bool,
    set: impl FnOnce(F::Addr, u16),
) -> i32 {
    match chosen {
        Choice::Proceed => PROCEED,
        Choice::Refuse(rc) => rc,
        Choice::To(to) => {
            if !remember(&to) {
                count_reason(Reason::SockRevNatFailed);
            }
            set(to.addr, to.port);
            count_reason(Reason::SockTranslated);
            PROCEED
        }
    }
}

/// The socket's caller and protocol when this hook translates it.
#[inline(always)]
fn translatable(ctx: &SockAddrContext) -> Option<(Caller, u8)> {
    Some((caller(ctx)?, protocol(ctx)?))
}

#[inline(always)]
fn forward(ctx: &SockAddrContext, connect: bool) -> i32 {
    let Some((who, proto)) = translatable(ctx) else {
        return PROCEED;
    };
    let (daddr, dport) = user_addr(ctx);
    let chosen = choose::<V4>(who, proto, connect, daddr, dport);
    let remember = |to: &Chosen<Addr4>| {
        let key = SockRevKey {
            cookie: socket_cookie(ctx),
            addr: to.addr,
            port: to.port,
            _pad: 0,
        };
        let value = SockRevValue {
            addr: daddr,
            port: dport,
            proto: to.proto,
            _pad: 0,
            svc_id: to.svc_id,
            backend_id: to.backend_id,
        };
        SOCK_REVNAT.insert(key, value, 0).is_ok()
    };
    finish(chosen, remember, |addr, port| {
        set_user_addr(ctx, addr, port)
    })
}

/// An IPv6 socket: an IPv6 Service from the IPv6 maps, an IPv4-mapped
/// address from the IPv4 maps; both remembered in SOCK_REVNAT6 as the
/// socket sees them.
#[inline(always)]
fn forward6(ctx: &SockAddrContext, connect: bool) -> i32 {
    let Some((who, proto)) = translatable(ctx) else {
        return PROCEED;
    };
    let (daddr, dport) = user_addr6(ctx);
    let chosen = match unmapped(&daddr) {
        Some(daddr4) => match choose::<V4>(who, proto, connect, daddr4, dport) {
            Choice::Proceed => Choice::Proceed,
            Choice::Refuse(rc) => Choice::Refuse(rc),
            Choice::To(to) => Choice::<V6>::To(Chosen {
                addr: mapped(to.addr),
                port: to.port,
                proto: to.proto,
                svc_id: to.svc_id,
                backend_id: to.backend_id,
            }),
        },
        None => choose::<V6>(who, proto, connect, daddr, dport),
    };
    let remember = |to: &Chosen<Addr6>| {
        let key = SockRevKey6 {
            cookie: socket_cookie(ctx),
            addr: to.addr,
            port: to.port,
            _pad: [0; 6],
        };
        let value = SockRevValue6 {
            addr: daddr,
            port: dport,
            proto: to.proto,
            _pad: 0,
            svc_id: to.svc_id,
            backend_id: to.backend_id,
        };
        SOCK_REVNAT6.insert(key, value, 0).is_ok()
    };
    finish(chosen, remember, |addr, port| {
        set_user_addr6(ctx, addr, port)
    })
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

#[inline(always)]
fn reverse6(ctx: &SockAddrContext) {
    if caller(ctx).is_none() {
        return;
    }
    let (addr, port) = user_addr6(ctx);
    let key = SockRevKey6 {
        cookie: socket_cookie(ctx),
        addr,
        port,
        _pad: [0; 6],
    };
    // SAFETY: as in `reverse`.
    if let Some(v) = unsafe { SOCK_REVNAT6.get(key) }.copied() {
        set_user_addr6(ctx, v.addr, v.port);
        count_reason(Reason::SockReplyTranslated);
        return;
    }
    // sendto() an IPv4-mapped address runs the IPv4 sendmsg hook (the kernel
    // hands the datagram to IPv4 first), so its entry is in SOCK_REVNAT.
    let Some(addr4) = unmapped(&addr) else {
        return;
    };
    let key = SockRevKey {
        cookie: key.cookie,
        addr: addr4,
        port,
        _pad: 0,
    };
    // SAFETY: as in `reverse`.
    if let Some(v) = unsafe { SOCK_REVNAT.get(key) }.copied() {
        set_user_addr6(ctx, mapped(v.addr), v.port);
        count_reason(Reason::SockReplyTranslated);
    }
}
