//! The address family a path is compiled for. The parse, lookup and rewrite
//! logic (conntrack, frontend and backend choice, NAT, fragments, routing)
//! is written once over `Family` and monomorphised for `V4` and `V6`, so
//! the verifier sees concrete code for each, as Cilium pairs its lb4_/lb6_
//! functions over shared helpers; what differs is only here: which maps,
//! how the IP header is read, how an address and its checksums are
//! rewritten, how a reject is built.
use aya_ebpf::{
    bindings::{BPF_F_PSEUDO_HDR, bpf_fib_lookup},
    btf_maps::lpm_trie::Key,
    helpers::bpf_csum_diff,
    programs::{TcContext, XdpContext},
};
use network_types::ip::{Ipv4Hdr, Ipv6Hdr};
use service_common::*;

use crate::{
    access::{Packet, xdp_ptr},
    conntrack::{snat_address, snat_address6},
    csum::{self, word},
    headers::*,
    maps::*,
    nat::Target,
    packet::{self, Flow, Parsed},
    packet6,
    reject::{self, RejectFailed},
    reject6,
};

pub trait Family: Sized + Copy + 'static {
    /// An address in packet order.
    type Addr: Copy + PartialEq + Default + AsMut<[u8]>;
    type FragKey: Copy;
    /// The address of NodePort frontends' keys.
    const ANY: Self::Addr;
    /// The family's path is cut into BPF subprograms (`tc.rs`): IPv6's
    /// wider keys and values do not fit the verifier's 512 bytes of stack
    /// in one function, IPv4's path stays one function as it always was.
    const SPLIT: bool;
    /// The IP header's address fields in the frame.
    const SRC_OFF: usize;
    const DST_OFF: usize;
    /// The IP header without options or extension headers: all the XDP
    /// fast path rewrites.
    const PLAIN_HLEN: usize;

    fn parse<P: Packet>(ctx: &P) -> Parsed<Self>;

    /// A copy of the SERVICES entry at `key`.
    fn service(key: &ServiceKeyOf<Self::Addr>) -> Option<ServiceValue>;
    /// A copy of the BACKENDS entry `id`.
    fn backend(id: u32) -> Option<BackendOf<Self::Addr>>;
    fn has_backend(id: u32) -> bool;
    fn ct_ptr(key: &CtKeyOf<Self::Addr>) -> Option<*mut CtValueOf<Self::Addr>>;
    fn ct_insert(key: &CtKeyOf<Self::Addr>, v: &CtValueOf<Self::Addr>, flags: u64) -> bool;
    fn ct_remove(key: &CtKeyOf<Self::Addr>);
    fn affinity_ptr(key: &AffinityKeyOf<Self::Addr>) -> Option<*mut AffinityValue>;
    fn affinity_insert(key: &AffinityKeyOf<Self::Addr>, v: &AffinityValue);
    fn is_node_address(a: Self::Addr) -> bool;
    /// Whether a SOURCE_RANGES entry under `id` holds `addr`.
    fn in_ranges(id: u32, addr: Self::Addr) -> bool;
    /// The node address the agent configured as SNAT source.
    fn snat_address() -> Option<Self::Addr>;
    fn maglev_hash(client: Self::Addr, sport: u16, dport: u16, proto: u8) -> u64;

    fn frag_key(flow: &Flow<Self>) -> Self::FragKey;
    /// The source, destination and protocol a fragment key names.
    fn frag_tuple(key: &Self::FragKey) -> (Self::Addr, Self::Addr, u8);
    fn frag_get(key: &Self::FragKey) -> Option<FragValueOf<Self::Addr>>;
    fn frag_insert(key: &Self::FragKey, v: &FragValueOf<Self::Addr>);

    /// Writes `new` over the address `old` at `field_off` and fixes the
    /// checksums that cover it: the IP header's (IPv4 only) and, given
    /// `l4` (the L4 checksum's offset and the helper's flags), the L4
    /// checksum's pseudo-header.
    fn rewrite_addr(
        ctx: &TcContext,
        l4: Option<(usize, u64)>,
        field_off: usize,
        old: Self::Addr,
        new: Self::Addr,
    ) -> Result<(), ()>;
    /// Updates an L4 checksum for the pseudo-header's address `old`
    /// becoming `new`, in the packet's byte order.
    fn csum_replace_addr(check: u16, old: Self::Addr, new: Self::Addr) -> u16;
    /// XDP: rewrites the plain IP header of `flow` to `to`'s addresses with
    /// the TTL or hop limit decremented, as a router forwards it.
    fn xdp_rewrite_ip(ctx: &XdpContext, to: &Target<Self>) -> Option<()>;
    /// Fills the family and addresses of a FIB lookup.
    fn fib_addrs(p: &mut bpf_fib_lookup, saddr: Self::Addr, daddr: Self::Addr);

    /// Turns the segment into the RST its peer would have sent.
    fn tcp_reset(ctx: &TcContext, flow: &Flow<Self>) -> Result<i32, RejectFailed>;
    /// Turns the datagram into an ICMP(v6) port unreachable.
    fn port_unreachable(ctx: &TcContext, flow: &Flow<Self>) -> Result<i32, RejectFailed>;
}

#[derive(Clone, Copy)]
pub struct V4;
#[derive(Clone, Copy)]
pub struct V6;

impl Family for V4 {
    type Addr = Addr4;
    type FragKey = FragKey;
    const ANY: Addr4 = [0; 4];
    const SPLIT: bool = false;
    const SRC_OFF: usize = IP_SRC_OFF;
    const DST_OFF: usize = IP_DST_OFF;
    const PLAIN_HLEN: usize = IP_HLEN;

    #[inline(always)]
    fn parse<P: Packet>(ctx: &P) -> Parsed<Self> {
        packet::parse(ctx)
    }

    #[inline(always)]
    fn service(key: &ServiceKey) -> Option<ServiceValue> {
        // SAFETY: copied out at once; the kernel keeps a looked-up value
        // alive until the program returns, and the agent replaces an entry
        // with one map update, so the copy is one whole version of it.
        unsafe { SERVICES.get(key) }.copied()
    }

    #[inline(always)]
    fn backend(id: u32) -> Option<Backend> {
        // SAFETY: as in `service`.
        unsafe { BACKENDS.get(id) }.copied()
    }

    #[inline(always)]
    fn has_backend(id: u32) -> bool {
        // SAFETY: only the presence of the entry is used.
        unsafe { BACKENDS.get(id) }.is_some()
    }

    #[inline(always)]
    fn ct_ptr(key: &CtKey) -> Option<*mut CtValue> {
        CONNTRACK.get_ptr_mut(key)
    }

    #[inline(always)]
    fn ct_insert(key: &CtKey, v: &CtValue, flags: u64) -> bool {
        CONNTRACK.insert(key, v, flags).is_ok()
    }

    #[inline(always)]
    fn ct_remove(key: &CtKey) {
        let _ = CONNTRACK.remove(key);
    }

    #[inline(always)]
    fn affinity_ptr(key: &AffinityKey) -> Option<*mut AffinityValue> {
        AFFINITY.get_ptr_mut(key)
    }

    #[inline(always)]
    fn affinity_insert(key: &AffinityKey, v: &AffinityValue) {
        // LRU: a failed insert only costs the client its stickiness.
        let _ = AFFINITY.insert(key, v, 0);
    }

    #[inline(always)]
    fn is_node_address(a: Addr4) -> bool {
        // SAFETY: only the presence of the entry is used, never its value.
        unsafe { NODE_ADDRS.get(a) }.is_some()
    }

    #[inline(always)]
    fn in_ranges(id: u32, addr: Addr4) -> bool {
        let data = SourceRange {
            svc_id: id.to_be_bytes(),
            addr,
        };
        SOURCE_RANGES.get(&Key::new(64, data)).is_some()
    }

    #[inline(always)]
    fn snat_address() -> Option<Addr4> {
        snat_address()
    }

    #[inline(always)]
    fn maglev_hash(client: Addr4, sport: u16, dport: u16, proto: u8) -> u64 {
        maglev_flow_hash(client, sport, dport, proto)
    }

    #[inline(always)]
    fn frag_key(flow: &Flow<Self>) -> FragKey {
        FragKey {
            saddr: flow.saddr,
            daddr: flow.daddr,
            id: flow.ip_id as u16,
            proto: flow.proto,
            _pad: 0,
        }
    }

    #[inline(always)]
    fn frag_tuple(key: &FragKey) -> (Addr4, Addr4, u8) {
        (key.saddr, key.daddr, key.proto)
    }

    #[inline(always)]
    fn frag_get(key: &FragKey) -> Option<FragValue> {
        // SAFETY: copied out at once (see `service`); each record is written whole.
        unsafe { FRAGMENTS.get(key) }.copied()
    }

    #[inline(always)]
    fn frag_insert(key: &FragKey, v: &FragValue) {
        // LRU: a failed insert only leaves the later fragments untranslated
        // (passed and counted), never sent elsewhere.
        let _ = FRAGMENTS.insert(key, v, 0);
    }

    #[inline(always)]
    fn rewrite_addr(
        ctx: &TcContext,
        l4: Option<(usize, u64)>,
        field_off: usize,
        old: Addr4,
        new: Addr4,
    ) -> Result<(), ()> {
        let (o, n) = (word(old), word(new));
        if let Some((csum_off, flags)) = l4 {
            ctx.l4_csum_replace(csum_off, o, n, flags | BPF_F_PSEUDO_HDR as u64 | 4)
                .map_err(|_| ())?;
        }
        ctx.l3_csum_replace(IP_CSUM_OFF, o, n, 4).map_err(|_| ())?;
        ctx.store(field_off, &new, 0).map_err(|_| ())
    }

    #[inline(always)]
    fn csum_replace_addr(check: u16, old: Addr4, new: Addr4) -> u16 {
        csum::replace4(check, old, new)
    }

    #[inline(always)]
    fn xdp_rewrite_ip(ctx: &XdpContext, to: &Target<Self>) -> Option<()> {
        let ip = xdp_ptr::<Ipv4Hdr>(ctx, ETH_HLEN)?;
        // SAFETY: bounds-checked against data_end by xdp_ptr; the header is
        // bytes only (alignment 1).
        let ip = unsafe { &mut *ip };
        let mut check = u16::from_ne_bytes(ip.check);
        // TTL and protocol share a 16-bit checksum word.
        let old_ttl = [ip.ttl, ip.proto];
        ip.ttl -= 1;
        check = csum::replace2(check, old_ttl, [ip.ttl, ip.proto]);
        check = csum::replace4(check, ip.src_addr, to.saddr);
        check = csum::replace4(check, ip.dst_addr, to.daddr);
        ip.src_addr = to.saddr;
        ip.dst_addr = to.daddr;
        ip.check = check.to_ne_bytes();
        Some(())
    }

    #[inline(always)]
    fn fib_addrs(p: &mut bpf_fib_lookup, saddr: Addr4, daddr: Addr4) {
        p.family = AF_INET;
        p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(saddr);
        p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(daddr);
    }

    #[inline(always)]
    fn tcp_reset(ctx: &TcContext, flow: &Flow<Self>) -> Result<i32, RejectFailed> {
        reject::tcp_reset(ctx, flow)
    }

    #[inline(always)]
    fn port_unreachable(ctx: &TcContext, flow: &Flow<Self>) -> Result<i32, RejectFailed> {
        reject::icmp_port_unreachable(ctx, flow)
    }
}

impl Family for V6 {
    type Addr = Addr6;
    type FragKey = FragKey6;
    const ANY: Addr6 = [0; 16];
    const SPLIT: bool = true;
    const SRC_OFF: usize = IP6_SRC_OFF;
    const DST_OFF: usize = IP6_DST_OFF;
    const PLAIN_HLEN: usize = IP6_HLEN;

    #[inline(always)]
    fn parse<P: Packet>(ctx: &P) -> Parsed<Self> {
        packet6::parse(ctx)
    }

    #[inline(always)]
    fn service(key: &ServiceKey6) -> Option<ServiceValue> {
        // SAFETY: as for V4.
        unsafe { SERVICES6.get(key) }.copied()
    }

    #[inline(always)]
    fn backend(id: u32) -> Option<Backend6> {
        // SAFETY: as for V4.
        unsafe { BACKENDS6.get(id) }.copied()
    }

    #[inline(always)]
    fn has_backend(id: u32) -> bool {
        // SAFETY: only the presence of the entry is used.
        unsafe { BACKENDS6.get(id) }.is_some()
    }

    #[inline(always)]
    fn ct_ptr(key: &CtKey6) -> Option<*mut CtValue6> {
        CONNTRACK6.get_ptr_mut(key)
    }

    #[inline(always)]
    fn ct_insert(key: &CtKey6, v: &CtValue6, flags: u64) -> bool {
        CONNTRACK6.insert(key, v, flags).is_ok()
    }

    #[inline(always)]
    fn ct_remove(key: &CtKey6) {
        let _ = CONNTRACK6.remove(key);
    }

    #[inline(always)]
    fn affinity_ptr(key: &AffinityKey6) -> Option<*mut AffinityValue> {
        AFFINITY6.get_ptr_mut(key)
    }

    #[inline(always)]
    fn affinity_insert(key: &AffinityKey6, v: &AffinityValue) {
        let _ = AFFINITY6.insert(key, v, 0);
    }

    #[inline(always)]
    fn is_node_address(a: Addr6) -> bool {
        // SAFETY: only the presence of the entry is used, never its value.
        unsafe { NODE_ADDRS6.get(a) }.is_some()
    }

    #[inline(always)]
    fn in_ranges(id: u32, addr: Addr6) -> bool {
        let data = SourceRange6 {
            svc_id: id.to_be_bytes(),
            addr,
        };
        SOURCE_RANGES6.get(&Key::new(32 + 128, data)).is_some()
    }

    /// None while the agent has no IPv6 address for the node: source-NATed
    /// IPv6 flows are then refused (`snat_failed`) rather than sent with a
    /// source replies cannot reach.
    #[inline(always)]
    fn snat_address() -> Option<Addr6> {
        snat_address6()
    }

    #[inline(always)]
    fn maglev_hash(client: Addr6, sport: u16, dport: u16, proto: u8) -> u64 {
        maglev_flow_hash6(client, sport, dport, proto)
    }

    #[inline(always)]
    fn frag_key(flow: &Flow<Self>) -> FragKey6 {
        FragKey6 {
            saddr: flow.saddr,
            daddr: flow.daddr,
            id: flow.ip_id,
            proto: flow.frag_proto,
            _pad: [0; 3],
        }
    }

    #[inline(always)]
    fn frag_tuple(key: &FragKey6) -> (Addr6, Addr6, u8) {
        (key.saddr, key.daddr, key.proto)
    }

    #[inline(always)]
    fn frag_get(key: &FragKey6) -> Option<FragValue6> {
        // SAFETY: as for V4.
        unsafe { FRAGMENTS6.get(key) }.copied()
    }

    #[inline(always)]
    fn frag_insert(key: &FragKey6, v: &FragValue6) {
        let _ = FRAGMENTS6.insert(key, v, 0);
    }

    #[inline(always)]
    fn rewrite_addr(
        ctx: &TcContext,
        l4: Option<(usize, u64)>,
        field_off: usize,
        mut old: Addr6,
        mut new: Addr6,
    ) -> Result<(), ()> {
        if let Some((csum_off, flags)) = l4 {
            // One difference for the 16 bytes, applied as a sum (size 0):
            // IPv6 has no header checksum, only the pseudo-header's share.
            // SAFETY: both buffers are 16-byte stack arrays, the sizes given.
            let diff = unsafe {
                bpf_csum_diff(old.as_mut_ptr().cast(), 16, new.as_mut_ptr().cast(), 16, 0)
            };
            if diff < 0 {
                return Err(());
            }
            ctx.l4_csum_replace(
                csum_off,
                0,
                diff as u32 as u64,
                flags | BPF_F_PSEUDO_HDR as u64,
            )
            .map_err(|_| ())?;
        }
        ctx.store(field_off, &new, 0).map_err(|_| ())
    }

    #[inline(always)]
    fn csum_replace_addr(mut check: u16, old: Addr6, new: Addr6) -> u16 {
        let w = |a: &Addr6, i: usize| [a[i], a[i + 1], a[i + 2], a[i + 3]];
        for i in [0, 4, 8, 12] {
            check = csum::replace4(check, w(&old, i), w(&new, i));
        }
        check
    }

    #[inline(always)]
    fn xdp_rewrite_ip(ctx: &XdpContext, to: &Target<Self>) -> Option<()> {
        let ip = xdp_ptr::<Ipv6Hdr>(ctx, ETH_HLEN)?;
        // SAFETY: as for V4.
        let ip = unsafe { &mut *ip };
        // No header checksum: the hop limit is covered by none, the
        // addresses only by the L4 pseudo-header (the caller's part).
        ip.hop_limit -= 1;
        ip.src_addr = to.saddr;
        ip.dst_addr = to.daddr;
        Some(())
    }

    #[inline(always)]
    fn fib_addrs(p: &mut bpf_fib_lookup, saddr: Addr6, daddr: Addr6) {
        p.family = AF_INET6;
        let w = |a: &Addr6, i: usize| u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]);
        p.__bindgen_anon_3.ipv6_src = [w(&saddr, 0), w(&saddr, 4), w(&saddr, 8), w(&saddr, 12)];
        p.__bindgen_anon_4.ipv6_dst = [w(&daddr, 0), w(&daddr, 4), w(&daddr, 8), w(&daddr, 12)];
    }

    #[inline(always)]
    fn tcp_reset(ctx: &TcContext, flow: &Flow<Self>) -> Result<i32, RejectFailed> {
        reject6::tcp_reset(ctx, flow)
    }

    #[inline(always)]
    fn port_unreachable(ctx: &TcContext, flow: &Flow<Self>) -> Result<i32, RejectFailed> {
        reject6::port_unreachable(ctx, flow)
    }
}
