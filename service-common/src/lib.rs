//! Map layouts shared by the BPF programs and the agent.
//!
//! Every type is `#[repr(C)]` with explicit padding so that the kernel, the
//! agent and `bpftool map dump` agree byte for byte. Addresses are kept as
//! `[u8; 4]` in packet order (bpftool prints them as four decimal octets) and
//! ports in host order (bpftool prints the port number a person expects).
//!
//! The types that hold addresses are generic over the address (`[u8; 4]` or
//! `[u8; 16]`), one layout for both families: `ServiceKey` is IPv4's,
//! `ServiceKey6` IPv6's, each in maps of its own family (SERVICES,
//! SERVICES6). Everything keyed by ids (ServiceValue, AFFINITY_MATCH,
//! SVC_STATS, MAGLEV) is shared: svc_ids and backend ids come from one
//! space each, whatever the family.
#![no_std]

mod reason;

pub use reason::{Reason, Verdict};

/// Bumped whenever a key or value layout below changes. The agent stores it in
/// the `META` map; a pinned map set with another version is recreated.
pub const LAYOUT_VERSION: u32 = 3;

pub const MAP_SERVICES: &str = "SERVICES";
pub const MAP_BACKENDS: &str = "BACKENDS";
pub const MAP_CONNTRACK: &str = "CONNTRACK";
pub const MAP_AFFINITY: &str = "AFFINITY";
pub const MAP_AFFINITY_MATCH: &str = "AFFINITY_MATCH";
pub const MAP_NODE_ADDRS: &str = "NODE_ADDRS";
pub const MAP_SVC_STATS: &str = "SVC_STATS";
pub const MAP_REASONS: &str = "REASONS";
pub const MAP_META: &str = "META";
pub const MAP_SOURCE_RANGES: &str = "SOURCE_RANGES";
pub const MAP_FRAGMENTS: &str = "FRAGMENTS";
pub const MAP_XDP_EGRESS: &str = "XDP_EGRESS";
pub const MAP_SOCK_REVNAT: &str = "SOCK_REVNAT";
pub const MAP_FLOOD: &str = "FLOOD";
pub const MAP_MAGLEV: &str = "MAGLEV";
pub const MAP_SERVICES6: &str = "SERVICES6";
pub const MAP_BACKENDS6: &str = "BACKENDS6";
pub const MAP_CONNTRACK6: &str = "CONNTRACK6";
pub const MAP_AFFINITY6: &str = "AFFINITY6";
pub const MAP_NODE_ADDRS6: &str = "NODE_ADDRS6";
pub const MAP_SOURCE_RANGES6: &str = "SOURCE_RANGES6";
pub const MAP_FRAGMENTS6: &str = "FRAGMENTS6";
pub const MAP_SOCK_REVNAT6: &str = "SOCK_REVNAT6";

/// Every map the programs declare, in the order the agent pins and reports them.
pub const ALL_MAPS: [&str; 23] = [
    MAP_SERVICES,
    MAP_BACKENDS,
    MAP_CONNTRACK,
    MAP_AFFINITY,
    MAP_AFFINITY_MATCH,
    MAP_NODE_ADDRS,
    MAP_SVC_STATS,
    MAP_REASONS,
    MAP_META,
    MAP_SOURCE_RANGES,
    MAP_FRAGMENTS,
    MAP_XDP_EGRESS,
    MAP_SOCK_REVNAT,
    MAP_FLOOD,
    MAP_MAGLEV,
    MAP_SERVICES6,
    MAP_BACKENDS6,
    MAP_CONNTRACK6,
    MAP_AFFINITY6,
    MAP_NODE_ADDRS6,
    MAP_SOURCE_RANGES6,
    MAP_FRAGMENTS6,
    MAP_SOCK_REVNAT6,
];

/// An IPv4 address in packet order.
pub type Addr4 = [u8; 4];
/// An IPv6 address in packet order.
pub type Addr6 = [u8; 16];

/// tc ingress on pod-facing host veths.
pub const PROG_TC_POD: &str = "svc_tc_pod";
/// tc ingress on the node's external interfaces: also source-NATs traffic
/// from outside that goes to a backend on another node.
pub const PROG_TC_EXTERNAL: &str = "svc_tc_external";
/// XDP on the node's external interfaces: the fast path for flows
/// source-NATed to backends on other nodes; everything else goes on to tc.
pub const PROG_XDP_EXTERNAL: &str = "svc_xdp_external";
/// tc egress on pod-facing and external interfaces: reverse-translates the
/// replies the node's own stack sends for translated flows (host-network
/// endpoints), which no ingress program sees.
pub const PROG_TC_EGRESS: &str = "svc_tc_egress";
/// Interfaces XDP may send translated frames out of (a DEVMAP_HASH keyed
/// and valued by ifindex): the external interfaces that can take them.
pub const XDP_EGRESS_MAX: u32 = 64;

/// Source ports for NodePort/LoadBalancer traffic source-NATed to the node:
/// 1024..=29999, below Linux's default ephemeral range (32768..=60999) so the
/// node's own outgoing connections never collide, and below the NodePort
/// range. A closed flow holds its port until conntrack GC (10 to 20 s), so
/// the range bounds new source-NATed connections per backend at about
/// 29,000 per 15 s; the 4,535 ports above 61000 used before ran out at a few
/// hundred connections a second per backend.
/// The agent's --snat-port-range overrides it (META_SNAT_PORTS).
pub const SNAT_PORT_MIN: u16 = 1_024;
pub const SNAT_PORT_COUNT: u16 = 28_976;

/// Default capacities, sized for about 10,000 Services with 10 endpoints each.
pub const DEFAULT_SERVICES_MAX: u32 = 262_144;
pub const DEFAULT_BACKENDS_MAX: u32 = 131_072;
pub const DEFAULT_CONNTRACK_MAX: u32 = 524_288;
pub const DEFAULT_AFFINITY_MAX: u32 = 131_072;
pub const NODE_ADDRS_MAX: u32 = 256;
/// svc_id indexes SVC_STATS, so its size is also the ceiling on frontends
/// (the agent's --frontends-max overrides it).
pub const SVC_STATS_MAX: u32 = 65_536;
pub const REASONS_MAX: u32 = 64;
pub const DEFAULT_SOURCE_RANGES_MAX: u32 = 16_384;
pub const DEFAULT_FRAGMENTS_MAX: u32 = 16_384;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;
pub const IPPROTO_ICMPV6: u8 = 58;

/// Scope of a service entry set: the one every source uses, except sources
/// inside the cluster when its master carries SVC_F_IN_CLUSTER. The planner
/// resolves the traffic policies into the slots of each set.
pub const SCOPE_ALL: u8 = 0;
/// The entry set for sources inside the cluster (pods, the node itself) of
/// an external frontend with `externalTrafficPolicy: Local`: that policy
/// applies to traffic from outside only, so these get the cluster-wide
/// endpoints, as kube-proxy's short-circuit gives them.
pub const SCOPE_IN_CLUSTER: u8 = 1;
/// SOURCE_RANGES entries under this id (no frontend has it: svc_ids start
/// at 1) are the cluster's pod ranges (`--cluster-cidr`): a source in them
/// arriving on an external interface is inside the cluster.
pub const CLUSTER_CIDRS_ID: u32 = 0;

/// Key of the SERVICES map. Slot 0 is the master entry of a frontend; slots
/// 1..=count hold its backends. A NodePort frontend has `addr == [0; 4]` and
/// matches any address in NODE_ADDRS (NODE_ADDRS6 for `ServiceKey6`, whose
/// NodePort address is `[0; 16]`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKeyOf<A> {
    pub addr: A,
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
    pub slot: u16,
    pub _pad: u16,
}
pub type ServiceKey = ServiceKeyOf<Addr4>;
pub type ServiceKey6 = ServiceKeyOf<Addr6>;

/// The frontend answers with a reject (RST / ICMP) when it has no backend.
pub const SVC_F_REJECT_EMPTY: u16 = 1 << 0;
/// sessionAffinity: ClientIP.
pub const SVC_F_AFFINITY: u16 = 1 << 1;
/// The frontend is a NodePort (addr 0 in the key).
pub const SVC_F_NODEPORT: u16 = 1 << 2;
/// New flows are accepted only from sources in SOURCE_RANGES for this svc_id
/// (a LoadBalancer's `loadBalancerSourceRanges`).
pub const SVC_F_SOURCE_RANGES: u16 = 1 << 3;
/// Sources inside the cluster use the SCOPE_IN_CLUSTER entry set under the
/// same address, port and protocol (its own master, svc_id and slots).
pub const SVC_F_IN_CLUSTER: u16 = 1 << 4;
/// New flows (without a live affinity entry) pick their backend from the
/// frontend's MAGLEV table by a hash of the flow, so every node picks the
/// same one; without a table they are spread at random.
pub const SVC_F_MAGLEV: u16 = 1 << 5;

/// Value of the SERVICES map. In the master entry (slot 0) `count`, `flags`
/// and `affinity_timeout_s` are meaningful and `backend_id` is 0; in a slot
/// entry `backend_id` names a BACKENDS entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    pub backend_id: u32,
    pub count: u16,
    pub flags: u16,
    pub svc_id: u32,
    pub affinity_timeout_s: u32,
}

/// The endpoint is on this node.
pub const BE_F_LOCAL: u8 = 1 << 0;

/// Value of the BACKENDS map (BACKENDS6: `Backend6`), keyed by a backend
/// id (u32); an id names a backend in one of the two maps only.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BackendOf<A> {
    pub addr: A,
    pub port: u16,
    pub proto: u8,
    pub flags: u8,
}
pub type Backend = BackendOf<Addr4>;
pub type Backend6 = BackendOf<Addr6>;

/// Entries of the largest Maglev table the programs can index: a prime,
/// Cilium's default, 100 entries a backend up to 163 backends. Every table
/// takes this much room whatever its own size, so a smaller size saves the
/// agent's build time, not kernel memory.
pub const MAGLEV_TABLE_MAX: u32 = 16_381;
/// Default capacity of the MAGLEV map: frontends with a table (allocated
/// as they are written, about 64 KiB each).
pub const DEFAULT_MAGLEV_MAX: u32 = 1_024;

/// Value of the MAGLEV map, keyed by the master's svc_id: the Maglev lookup
/// table of a frontend. Entry `hash % size` names the backend (a BACKENDS
/// id) of a new flow. One map update replaces a whole table, so a packet
/// sees either the old table or the new one.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevTable {
    /// Entries in use (a prime, at most MAGLEV_TABLE_MAX).
    pub size: u32,
    pub backends: [u32; MAGLEV_TABLE_MAX as usize],
}

/// The hash of a new flow that indexes a Maglev table: the source address
/// and port, the destination port and the protocol, not the destination
/// address (a NodePort is reached on a different address on every node).
/// The same function on every node, in the programs and in the tests.
#[inline(always)]
pub fn maglev_flow_hash(saddr: [u8; 4], sport: u16, dport: u16, proto: u8) -> u64 {
    let mut h = (u32::from_be_bytes(saddr) as u64) << 32 | (sport as u64) << 16 | dport as u64;
    h ^= (proto as u64) << 59 | 0x9e37_79b9_7f4a_7c15;
    // splitmix64's finaliser: every input bit reaches the low bits that
    // `% size` keeps.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// `maglev_flow_hash` for an IPv6 source: its four 32-bit words folded
/// into one by XOR (the finaliser spreads them), then the IPv4 hash.
#[inline(always)]
pub fn maglev_flow_hash6(saddr: Addr6, sport: u16, dport: u16, proto: u8) -> u64 {
    let w = |i: usize| [saddr[i], saddr[i + 1], saddr[i + 2], saddr[i + 3]];
    let folded = u32::from_be_bytes(w(0))
        ^ u32::from_be_bytes(w(4))
        ^ u32::from_be_bytes(w(8))
        ^ u32::from_be_bytes(w(12));
    maglev_flow_hash(folded.to_be_bytes(), sport, dport, proto)
}

/// A 5-tuple as seen in the packet, before translation.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKeyOf<A> {
    pub saddr: A,
    pub daddr: A,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}
pub type CtKey = CtKeyOf<Addr4>;
pub type CtKey6 = CtKeyOf<Addr6>;

/// The entry rewrites a reply (backend → client); unset: a request.
pub const CT_F_REPLY: u16 = 1 << 0;
/// A TCP FIN or RST was seen; the agent expires the entry sooner.
pub const CT_F_CLOSING: u16 = 1 << 2;
/// The entry carries a source NAT to the node address (from outside to a remote backend).
pub const CT_F_SNAT: u16 = 1 << 3;
/// After rewriting, the packet's source is an address of this node: it is
/// sent to its next hop directly rather than through IP input (martian check).
pub const CT_F_LOCAL_SOURCE: u16 = 1 << 4;
/// A flow the kernel's own conntrack translates (one kube-proxy opened
/// before the agent took over): its packets are passed untouched, in both
/// directions, and netfilter keeps rewriting them. The nat fields say what
/// the kernel rewrites the packet to, so the GC pairs the two entries.
pub const CT_F_KERNEL: u16 = 1 << 5;
/// A TCP flow no reply has answered yet (its SYN is the only thing seen):
/// set on both entries when the flow opens, cleared on the reply entry by
/// the first reply. The agent forgets such flows within the SYN lifetime.
pub const CT_F_SYN_ONLY: u16 = 1 << 6;

/// What to write into a packet whose 5-tuple matches a CONNTRACK key. Both
/// directions of a translated flow have an entry; each says the whole
/// translation, so a packet is rewritten with one lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValueOf<A> {
    pub last_seen_ns: u64,
    pub nat_saddr: A,
    pub nat_daddr: A,
    pub nat_sport: u16,
    pub nat_dport: u16,
    pub backend_id: u32,
    pub svc_id: u32,
    pub flags: u16,
    pub proto: u8,
    pub _pad: u8,
}
pub type CtValue = CtValueOf<Addr4>;
pub type CtValue6 = CtValueOf<Addr6>;

impl<A: Copy> CtValueOf<A> {
    /// The key of the entry for the other direction of this entry's flow
    /// (of protocol `proto`): what this entry rewrites packets into, reversed.
    #[inline(always)]
    pub fn partner_key(&self, proto: u8) -> CtKeyOf<A> {
        CtKeyOf {
            saddr: self.nat_daddr,
            daddr: self.nat_saddr,
            sport: self.nat_dport,
            dport: self.nat_sport,
            proto,
            _pad: [0; 3],
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityKeyOf<A> {
    pub client: A,
    pub svc_id: u32,
}
pub type AffinityKey = AffinityKeyOf<Addr4>;
pub type AffinityKey6 = AffinityKeyOf<Addr6>;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AffinityValue {
    pub last_used_ns: u64,
    pub backend_id: u32,
    pub _pad: u32,
}

/// Membership of a backend in a frontend: lets the program refuse an
/// affinity entry that points at a backend the Service no longer has.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AffinityMatchKey {
    pub svc_id: u32,
    pub backend_id: u32,
}

/// A fragmented datagram: what the fragments share (RFC 791 reassembly key).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub id: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// An IPv6 fragmented datagram (RFC 8200 4.5: addresses and the 32-bit
/// identification of the fragment header; `proto` is the upper layer's).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey6 {
    pub saddr: Addr6,
    pub daddr: Addr6,
    pub id: u32,
    pub proto: u8,
    pub _pad: [u8; 3],
}

/// The addresses the first fragment was rewritten to; later fragments (which
/// carry no ports) get the same.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragValueOf<A> {
    /// The first fragment's addresses after translation.
    pub nat_saddr: A,
    pub nat_daddr: A,
    pub svc_id: u32,
    /// CT_F_LOCAL_SOURCE when the rewritten source is a node address.
    pub flags: u16,
    pub _pad: u16,
}
pub type FragValue = FragValueOf<Addr4>;
pub type FragValue6 = FragValueOf<Addr6>;

/// Data of a SOURCE_RANGES key (an LPM trie; SOURCE_RANGES6 for
/// `SourceRange6`): the frontend's svc_id in big endian, then the source
/// address. The prefix length is 32 + the CIDR's.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SourceRangeOf<A> {
    pub svc_id: [u8; 4],
    pub addr: A,
}
pub type SourceRange = SourceRangeOf<Addr4>;
pub type SourceRange6 = SourceRangeOf<Addr6>;

/// Per-frontend traffic counters (per CPU).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SvcStats {
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub rejected: u64,
}

/// META map slots (array of u64).
pub const META_LAYOUT_VERSION: u32 = 0;
/// The node address (as `u32::from_ne_bytes(octets)`) used as SNAT source.
pub const META_SNAT_ADDR: u32 = 1;
/// The network namespace cookie of the agent: socket hooks translate only
/// sockets of this namespace (0: none).
pub const META_NETNS_COOKIE: u32 = 2;
/// The ports source NAT and tuple-clash rewrites may give a flow: the first
/// port in bits 0..16, the number of ports in bits 16..32 (0: the default
/// SNAT_PORT_MIN / SNAT_PORT_COUNT).
pub const META_SNAT_PORTS: u32 = 3;
/// The flood guard: new flows one CPU opens per second before it refuses
/// more until the next second (0: no limit).
pub const META_FLOOD_THRESHOLD: u32 = 4;
/// Whose sockets the socket hooks translate (`--socket-lb`): one of the
/// SOCKET_LB_* values. 0, what a META written before this slot existed
/// holds, is the node's own sockets only.
pub const META_SOCKET_LB: u32 = 5;
/// The node's IPv6 SNAT source, bytes 0..8 and 8..16 of the address each as
/// `u64::from_ne_bytes`; a high half of 0 (never a node's global or
/// unique-local address) is none. Two slots cannot change in one update:
/// the agent clears HI, writes LO, then writes HI, and the programs read
/// HI, LO, HI and use the address only when both HI reads agree.
pub const META_SNAT_ADDR6_HI: u32 = 6;
pub const META_SNAT_ADDR6_LO: u32 = 7;
pub const META_MAX: u32 = 8;

/// The flood guard's count of one CPU (FLOOD, a per-CPU array of one).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FloodWindow {
    /// When the current one-second window began.
    pub start_ns: u64,
    /// New flows this CPU was asked to open in it.
    pub new_flows: u64,
}

/// Socket (cgroup) hooks translating the node's own sockets.
pub const PROG_SOCK_CONNECT4: &str = "svc_sock_connect4";
pub const PROG_SOCK_SENDMSG4: &str = "svc_sock_sendmsg4";
pub const PROG_SOCK_RECVMSG4: &str = "svc_sock_recvmsg4";
pub const PROG_SOCK_GETPEERNAME4: &str = "svc_sock_getpeername4";
/// The same for IPv6 sockets, IPv4-mapped addresses (::ffff:a.b.c.d) included.
pub const PROG_SOCK_CONNECT6: &str = "svc_sock_connect6";
pub const PROG_SOCK_SENDMSG6: &str = "svc_sock_sendmsg6";
pub const PROG_SOCK_RECVMSG6: &str = "svc_sock_recvmsg6";
pub const PROG_SOCK_GETPEERNAME6: &str = "svc_sock_getpeername6";
/// The hook at a socket's last close (cgroup/sock_release), which removes
/// the socket's SOCK_REVNAT entry.
pub const PROG_SOCK_RELEASE: &str = "svc_sock_release";
/// Every socket-address hook with the name of its attach point (the pin name too).
pub const SOCK_HOOKS: [(&str, &str); 8] = [
    (PROG_SOCK_CONNECT4, "connect4"),
    (PROG_SOCK_SENDMSG4, "sendmsg4"),
    (PROG_SOCK_RECVMSG4, "recvmsg4"),
    (PROG_SOCK_GETPEERNAME4, "getpeername4"),
    (PROG_SOCK_CONNECT6, "connect6"),
    (PROG_SOCK_SENDMSG6, "sendmsg6"),
    (PROG_SOCK_RECVMSG6, "recvmsg6"),
    (PROG_SOCK_GETPEERNAME6, "getpeername6"),
];
pub const DEFAULT_SOCK_REVNAT_MAX: u32 = 65_536;
/// META_SOCKET_LB: sockets of the agent's own network namespace only.
pub const SOCKET_LB_HOST: u64 = 0;
/// META_SOCKET_LB: those and the sockets of every other network namespace
/// (pods) whose processes are in the hooks' cgroup.
pub const SOCKET_LB_PODS: u64 = 1;
/// META_SOCKET_LB: no socket is translated at connect() time.
pub const SOCKET_LB_OFF: u64 = 2;

/// Key of SOCK_REVNAT: a socket (its cookie) and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevKey {
    pub cookie: u64,
    pub addr: [u8; 4],
    pub port: u16,
    pub _pad: u16,
}

/// The Service address a host socket asked for, shown back to it by
/// recvmsg and getpeername; svc_id and backend_id let the agent find the
/// sockets of a backend that leaves its frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRevValue {
    pub addr: [u8; 4],
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
    pub svc_id: u32,
    pub backend_id: u32,
}

/// Key of SOCK_REVNAT6: an IPv6 socket (its cookie) and the backend it was
/// sent to, an IPv4 backend as its IPv4-mapped address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockRevKey6 {
    pub cookie: u64,
    pub addr: Addr6,
    pub port: u16,
    pub _pad: [u8; 6],
}

/// SOCK_REVNAT's value for an IPv6 socket: the Service address it asked
/// for (IPv4-mapped when it was an IPv4 Service).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockRevValue6 {
    pub addr: Addr6,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
    pub svc_id: u32,
    pub backend_id: u32,
}

#[cfg(feature = "user")]
mod user {
    use super::*;

    macro_rules! pod {
        ($($t:ty),*) => {$(
            // SAFETY: repr(C), every field is an integer or byte array and the
            // padding is spelled out, so every bit pattern is valid.
            unsafe impl aya::Pod for $t {}
            unsafe impl bytemuck::Zeroable for $t {}
            unsafe impl bytemuck::Pod for $t {}
        )*};
    }
    pod!(
        ServiceKey,
        ServiceKey6,
        ServiceValue,
        Backend,
        Backend6,
        CtKey,
        CtKey6,
        CtValue,
        CtValue6,
        AffinityKey,
        AffinityKey6,
        AffinityValue,
        AffinityMatchKey,
        SvcStats,
        SourceRange,
        SourceRange6,
        FragKey,
        FragKey6,
        FragValue,
        FragValue6,
        SockRevKey,
        SockRevValue,
        SockRevKey6,
        SockRevValue6,
        FloodWindow,
        MaglevTable
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<ServiceKey>(), 12);
        assert_eq!(size_of::<ServiceValue>(), 16);
        assert_eq!(size_of::<Backend>(), 8);
        assert_eq!(size_of::<CtKey>(), 16);
        assert_eq!(size_of::<CtValue>(), 32);
        assert_eq!(size_of::<AffinityKey>(), 8);
        assert_eq!(size_of::<AffinityValue>(), 16);
        assert_eq!(size_of::<AffinityMatchKey>(), 8);
        assert_eq!(size_of::<SvcStats>(), 32);
        assert_eq!(size_of::<SourceRange>(), 8);
        assert_eq!(size_of::<FragKey>(), 12);
        assert_eq!(size_of::<FragValue>(), 16);
        assert_eq!(size_of::<SockRevKey>(), 16);
        assert_eq!(size_of::<SockRevValue>(), 16);
        assert_eq!(size_of::<FloodWindow>(), 16);
        assert_eq!(size_of::<ServiceKey6>(), 24);
        assert_eq!(size_of::<Backend6>(), 20);
        assert_eq!(size_of::<CtKey6>(), 40);
        assert_eq!(size_of::<CtValue6>(), 56);
        assert_eq!(size_of::<AffinityKey6>(), 20);
        assert_eq!(size_of::<SourceRange6>(), 20);
        assert_eq!(size_of::<FragKey6>(), 40);
        assert_eq!(size_of::<FragValue6>(), 40);
        assert_eq!(size_of::<SockRevKey6>(), 32);
        assert_eq!(size_of::<SockRevValue6>(), 28);
        assert_eq!(
            size_of::<MaglevTable>(),
            4 * (1 + MAGLEV_TABLE_MAX as usize)
        );
    }
}
