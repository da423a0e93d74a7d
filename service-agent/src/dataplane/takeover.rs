//! Taking over from kube-proxy without cutting its connections.
//!
//! A connection kube-proxy opened is translated by netfilter: its DNAT
//! binding lives in the kernel's conntrack entry until the connection ends,
//! also after kube-proxy's rules are flushed. The programs, which see its
//! packets first, know nothing of it and would drop them as `ct_invalid`.
//! So the agent reads the kernel's table and, for each flow netfilter
//! translates away from one of our frontends, writes a `CT_F_KERNEL` entry
//! for both of its tuples: the programs then pass its packets untouched and
//! netfilter keeps translating them. A packet that neither table knows is
//! still dropped.
//!
//! Flows the programs open themselves never match: the kernel sees them
//! already translated, with a backend as destination.
use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
};

use aya::maps::MapError;
use service_common::*;
use tracing::{info, warn};

use super::{
    kernel_conntrack::{self, DumpError, KernelFlow, Tuple},
    tables::Tables,
};

/// How often the agent looks at the kernel's table while kernel flows remain.
pub const REFRESH_PERIOD: std::time::Duration = std::time::Duration::from_secs(300);
/// A kernel TCP flow idle this long in our map, but still in the kernel's
/// table, has its entry renewed: an idle kube-proxy connection (a database
/// pool, a watch) outlives the map's idle timeout only if the kernel keeps it.
const RENEW_IDLE_NS: u64 = 3600 * 1_000_000_000;
const BPF_NOEXIST: u64 = 1;
const BPF_EXIST: u64 = 2;

#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    #[error("reading the kernel's conntrack table: {0}")]
    Dump(#[from] DumpError),
    #[error("map {MAP_CONNTRACK}: {0}")]
    Map(#[from] MapError),
}

type Addr = ([u8; 4], u16, u8);

/// The frontends and backends as the programs match them, read from the maps.
#[derive(Default)]
pub struct Frontends {
    /// ClusterIPs, externalIPs, LoadBalancer IPs → svc_id.
    exact: HashMap<Addr, u32>,
    /// NodePorts: (port, proto) → svc_id, on any of `node_addrs`.
    node_ports: HashMap<(u16, u8), u32>,
    node_addrs: HashSet<[u8; 4]>,
    backends: HashMap<Addr, u32>,
}

impl Frontends {
    /// From the programmed SERVICES and BACKENDS maps, and the addresses
    /// NodePorts answer on (NODE_ADDRS may not be written yet at start).
    pub fn read(t: &Tables, node_addrs: &[Ipv4Addr]) -> Self {
        let mut f = Frontends {
            node_addrs: node_addrs.iter().map(|a| a.octets()).collect(),
            ..Default::default()
        };
        f.node_addrs
            .extend(t.node_addrs.keys().filter_map(Result::ok));
        for (k, v) in t.services.iter().filter_map(Result::ok) {
            // One master per frontend: its own set, not the in-cluster one.
            if k.slot != 0 || k.scope != SCOPE_ALL {
                continue;
            }
            if v.flags & SVC_F_NODEPORT != 0 {
                f.node_ports.insert((k.port, k.proto), v.svc_id);
            } else {
                f.exact.insert((k.addr, k.port, k.proto), v.svc_id);
            }
        }
        for (id, b) in t.backends.iter().filter_map(Result::ok) {
            f.backends.insert((b.addr, b.port, b.proto), id);
        }
        f
    }

    fn svc_of(&self, t: &Tuple) -> Option<u32> {
        if let Some(id) = self.exact.get(&(t.dst, t.dport, t.proto)) {
            return Some(*id);
        }
        if self.node_addrs.contains(&t.dst) {
            return self.node_ports.get(&(t.dport, t.proto)).copied();
        }
        None
    }
}

fn key(t: &Tuple) -> CtKey {
    CtKey {
        saddr: t.src,
        daddr: t.dst,
        sport: t.sport,
        dport: t.dport,
        proto: t.proto,
        _pad: [0; 3],
    }
}

/// The packet a tuple's direction becomes after netfilter: the other
/// direction's tuple, reversed.
fn value(into: &Tuple, svc_id: u32, backend_id: u32, flags: u16, now_ns: u64) -> CtValue {
    CtValue {
        last_seen_ns: now_ns,
        nat_saddr: into.dst,
        nat_daddr: into.src,
        nat_sport: into.dport,
        nat_dport: into.sport,
        backend_id,
        svc_id,
        flags: CT_F_KERNEL | flags,
        proto: into.proto,
        _pad: 0,
    }
}

/// The two entries (reply first, then request) that leave `flow` to the
/// kernel, if it is one the programs would otherwise take: netfilter moved
/// its destination away from one of our frontends. A UDP flow to a backend
/// the Service no longer has is left to the programs, which send it to a
/// live one (UDP has no connection to cut); its backend id lets the writer
/// drop the entry when that backend leaves, as for the programs' own flows.
pub fn entries_for(
    flow: &KernelFlow,
    fe: &Frontends,
    now_ns: u64,
) -> Option<[(CtKey, CtValue); 2]> {
    if !flow.dst_translated() {
        return None;
    }
    let svc_id = fe.svc_of(&flow.orig)?;
    let backend = fe
        .backends
        .get(&(flow.reply.src, flow.reply.sport, flow.reply.proto))
        .copied();
    if flow.orig.proto == IPPROTO_UDP && backend.is_none() {
        return None;
    }
    let backend_id = backend.unwrap_or(0);
    Some([
        (
            key(&flow.reply),
            value(&flow.orig, svc_id, backend_id, CT_F_REPLY, now_ns),
        ),
        (
            key(&flow.orig),
            value(&flow.reply, svc_id, backend_id, 0, now_ns),
        ),
    ])
}

/// Writes entries for every kernel-translated flow to a frontend. An entry
/// the programs already have (a flow of their own) is never overwritten.
/// Returns how many flows were newly left to the kernel.
pub fn adopt_kernel_flows(
    t: &mut Tables,
    node_addrs: &[Ipv4Addr],
    now_ns: u64,
) -> Result<usize, TakeoverError> {
    let mut translated = vec![];
    kernel_conntrack::dump(|flow| {
        if flow.dst_translated() {
            translated.push(flow);
        }
    })?;
    // Reading the maps back costs two syscalls an entry (a second at
    // 100,000 backends): only when netfilter translates something.
    if translated.is_empty() {
        return Ok(0);
    }
    let fe = Frontends::read(t, node_addrs);
    let found: Vec<_> = translated
        .iter()
        .filter_map(|flow| entries_for(flow, &fe, now_ns))
        .collect();
    let mut written = 0;
    for [(rk, rv), (qk, qv)] in found {
        // NOEXIST: an existing entry is either ours (a newer flow on the
        // same tuple) or this flow's from the previous pass.
        let reply_new = t.conntrack.insert(rk, rv, BPF_NOEXIST).is_ok();
        if t.conntrack.insert(qk, qv, BPF_NOEXIST).is_ok() {
            written += 1;
        } else if reply_new {
            t.conntrack.remove(&rk)?;
        }
    }
    Ok(written)
}

/// Renews the kernel TCP flows the map would soon expire while the kernel
/// still tracks them. Reads the kernel's table only while such entries
/// exist. Returns how many entries were renewed.
pub fn renew_kernel_flows(t: &mut Tables, now_ns: u64) -> Result<usize, TakeoverError> {
    let idle: HashSet<CtKey> = t
        .conntrack
        .iter()
        .filter_map(Result::ok)
        .filter(|(_, v)| {
            v.flags & CT_F_KERNEL != 0
                && v.proto == IPPROTO_TCP
                && now_ns.saturating_sub(v.last_seen_ns) > RENEW_IDLE_NS
        })
        .map(|(k, _)| k)
        .collect();
    if idle.is_empty() {
        return Ok(0);
    }
    let mut alive = vec![];
    kernel_conntrack::dump(|flow| {
        for k in [key(&flow.orig), key(&flow.reply)] {
            if idle.contains(&k) {
                alive.push(k);
            }
        }
    })?;
    let mut renewed = 0;
    for k in alive {
        // Read again: the program may have replaced the entry meanwhile.
        let Ok(mut v) = t.conntrack.get(&k, 0) else {
            continue;
        };
        if v.flags & CT_F_KERNEL == 0 {
            continue;
        }
        v.last_seen_ns = now_ns;
        if t.conntrack.insert(k, v, BPF_EXIST).is_ok() {
            renewed += 1;
        }
    }
    Ok(renewed)
}

/// `renew_kernel_flows`, logged.
pub fn renew(t: &mut Tables, now_ns: u64) {
    match renew_kernel_flows(t, now_ns) {
        Ok(0) => {}
        Ok(n) => info!(
            renewed = n,
            "idle connections the kernel still translates kept"
        ),
        Err(e) => warn!("{e}"),
    }
}

/// `adopt_kernel_flows` (`when`: before or after attaching), logged, with NodePorts on `node_ips` (empty: every
/// address of the namespace, as the agent's NODE_ADDRS). A node without
/// kernel conntrack has nothing to take over, which is not an error.
pub fn take_over(t: &mut Tables, node_ips: &[Ipv4Addr], now_ns: u64, when: &str) {
    let addrs = match node_ips {
        [] => super::interfaces::node_addresses().unwrap_or_default(),
        ips => ips.to_vec(),
    };
    match adopt_kernel_flows(t, &addrs, now_ns) {
        Ok(0) => {}
        Ok(n) => info!(
            flows = n,
            attaching = when,
            "left connections the kernel's conntrack translates (kube-proxy's) to it"
        ),
        Err(e) => warn!(
            attaching = when,
            "{e}: connections opened through kube-proxy before the agent started may be cut"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: [u8; 4] = [10, 244, 1, 11];
    const VIP: [u8; 4] = [10, 96, 0, 10];
    const BACKEND: [u8; 4] = [10, 244, 1, 12];
    const NODE: [u8; 4] = [192, 168, 77, 11];

    fn frontends() -> Frontends {
        let mut f = Frontends::default();
        f.exact.insert((VIP, 80, IPPROTO_TCP), 7);
        f.exact.insert((VIP, 53, IPPROTO_UDP), 8);
        f.node_ports.insert((30080, IPPROTO_TCP), 9);
        f.node_addrs.insert(NODE);
        f.backends.insert((BACKEND, 8080, IPPROTO_TCP), 3);
        f
    }

    fn t(src: [u8; 4], sport: u16, dst: [u8; 4], dport: u16, proto: u8) -> Tuple {
        Tuple {
            src,
            dst,
            sport,
            dport,
            proto,
        }
    }

    fn dnat(dst: [u8; 4], dport: u16, proto: u8) -> KernelFlow {
        KernelFlow {
            orig: t(CLIENT, 40000, dst, dport, proto),
            reply: t(BACKEND, 8080, CLIENT, 40000, proto),
        }
    }

    #[test]
    fn a_kube_proxy_flow_gets_both_directions_paired() {
        let [(rk, rv), (qk, qv)] = entries_for(&dnat(VIP, 80, IPPROTO_TCP), &frontends(), 5)
            .expect("a DNATed flow to a ClusterIP");
        assert_eq!((qk.daddr, qk.dport), (VIP, 80));
        assert_eq!((rk.saddr, rk.sport), (BACKEND, 8080));
        assert_eq!(qv.flags, CT_F_KERNEL);
        assert_eq!(rv.flags, CT_F_KERNEL | CT_F_REPLY);
        assert_eq!((qv.svc_id, qv.backend_id, qv.last_seen_ns), (7, 3, 5));
        // The GC finds each entry's partner from its nat fields.
        let partner = |v: &CtValue| (v.nat_daddr, v.nat_saddr, v.nat_dport, v.nat_sport);
        assert_eq!(partner(&qv), (rk.saddr, rk.daddr, rk.sport, rk.dport));
        assert_eq!(partner(&rv), (qk.saddr, qk.daddr, qk.sport, qk.dport));
    }

    #[test]
    fn only_translated_flows_to_frontends_are_taken() {
        let f = frontends();
        let plain = KernelFlow {
            orig: t(CLIENT, 40000, VIP, 80, IPPROTO_TCP),
            reply: t(VIP, 80, CLIENT, 40000, IPPROTO_TCP),
        };
        assert!(
            entries_for(&plain, &f, 0).is_none(),
            "no NAT: not kube-proxy's"
        );
        assert!(entries_for(&dnat([10, 96, 0, 99], 80, IPPROTO_TCP), &f, 0).is_none());
        assert!(entries_for(&dnat(VIP, 81, IPPROTO_TCP), &f, 0).is_none());
        // A NodePort counts on a node address only.
        assert!(entries_for(&dnat(NODE, 30080, IPPROTO_TCP), &f, 0).is_some());
        assert!(entries_for(&dnat([192, 168, 77, 99], 30080, IPPROTO_TCP), &f, 0).is_none());
    }

    #[test]
    fn udp_to_a_backend_we_do_not_have_goes_to_the_programs() {
        let f = frontends();
        assert!(entries_for(&dnat(VIP, 53, IPPROTO_UDP), &f, 0).is_none());
        let mut f = f;
        f.backends.insert((BACKEND, 8080, IPPROTO_UDP), 4);
        let [_, (_, v)] = entries_for(&dnat(VIP, 53, IPPROTO_UDP), &f, 0).unwrap();
        assert_eq!((v.svc_id, v.backend_id), (8, 4));
        // TCP keeps its connection whoever the backend is (a terminating pod).
        f.backends.clear();
        let [_, (_, v)] = entries_for(&dnat(VIP, 80, IPPROTO_TCP), &f, 0).unwrap();
        assert_eq!(v.backend_id, 0);
    }
}
