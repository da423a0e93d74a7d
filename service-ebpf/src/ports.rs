//! Choosing the source port of a translated flow (the node's port of a
//! source-NATed flow, or a clashing client's port as its backend sees it):
//! one whose reply tuple no other flow holds, claimed by inserting the
//! flow's reply entry under it.
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    cty::c_void,
    helpers::{bpf_get_prandom_u32, bpf_loop},
};
use service_common::{CtKeyOf, CtValueOf, META_SNAT_PORTS, SNAT_PORT_COUNT, SNAT_PORT_MIN};

use crate::{family::Family, maps::META};

/// Ports probed for one flow at most after its own: the whole of a range
/// up to this size, else this many from a random start. Enough that a range
/// must be nearly full before an opening is refused, while a refused one
/// costs a bounded number of lookups.
const PROBES_MAX: u32 = 4_096;

/// The ports a flow may be given: `count` ports from `min` (META_SNAT_PORTS,
/// written by the agent's --snat-port-range; 0 there means the default).
#[derive(Clone, Copy)]
pub struct PortRange {
    min: u32,
    count: u32,
}

impl PortRange {
    #[inline(always)]
    pub fn configured() -> Self {
        let v = META.get(META_SNAT_PORTS).copied().unwrap_or(0);
        let (min, count) = ((v & 0xffff) as u32, ((v >> 16) & 0xffff) as u32);
        // The agent checked the range; a value that is not one (a damaged
        // map) must still never give a port outside 1..=65535.
        if count == 0 || min == 0 || min + count > 65_536 {
            return Self {
                min: SNAT_PORT_MIN as u32,
                count: SNAT_PORT_COUNT as u32,
            };
        }
        Self { min, count }
    }

    #[inline(always)]
    fn holds(&self, port: u16) -> bool {
        (port as u32).wrapping_sub(self.min) < self.count
    }
}

/// Whether `key` was free and now holds `reply`. The lookup comes first
/// because an insert into a full LRU map takes a free node, evicting the
/// least recently used entry, before it checks the key: probing by refused
/// inserts would forget one live flow per port tried.
#[inline(always)]
pub fn claim<F: Family>(key: &CtKeyOf<F::Addr>, reply: &CtValueOf<F::Addr>) -> bool {
    if F::ct_ptr(key).is_some() {
        return false;
    }
    F::ct_insert(key, reply, BPF_NOEXIST as u64)
}

/// What a scan carries between the iterations bpf_loop runs.
#[repr(C)]
struct Scan<F: Family> {
    /// The reply key; its `dport` is the port being tried.
    key: CtKeyOf<F::Addr>,
    reply: CtValueOf<F::Addr>,
    range: PortRange,
    start: u32,
    found: u32,
}

/// One iteration of the scan: port `start + i` of the range (wrapping).
/// Returns 1 (stop) once a port is claimed.
extern "C" fn try_port<F: Family>(i: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: bpf_loop passes back the pointer `scan` gave it, to a Scan on
    // the caller's stack that lives until bpf_loop returns.
    let scan = unsafe { &mut *(ctx as *mut Scan<F>) };
    if scan.range.count == 0 {
        return 1;
    }
    let off = scan.start.wrapping_add(i as u32) % scan.range.count;
    scan.key.dport = (scan.range.min + off) as u16;
    if claim::<F>(&scan.key, &scan.reply) {
        scan.found = scan.key.dport as u32;
        return 1;
    }
    0
}

/// Claims a port for the reply tuple `key` (its `dport` is the port being
/// chosen) by inserting `reply` under it: `keep` first when the range holds
/// it, then up to PROBES_MAX ports of the range in order from a random
/// start (bpf_loop, so the verifier checks one iteration, not thousands).
/// None: every port tried is held by another flow.
#[inline(always)]
pub fn claim_port<F: Family>(
    key: CtKeyOf<F::Addr>,
    reply: &CtValueOf<F::Addr>,
    range: PortRange,
    keep: Option<u16>,
) -> Option<u16> {
    if range.count == 0 {
        return None;
    }
    if let Some(port) = keep.filter(|p| range.holds(*p)) {
        let own = CtKeyOf { dport: port, ..key };
        if claim::<F>(&own, reply) {
            return Some(port);
        }
    }
    let mut scan = Scan::<F> {
        key,
        reply: *reply,
        range,
        // SAFETY: a helper call without arguments.
        start: unsafe { bpf_get_prandom_u32() } % range.count,
        found: 0,
    };
    let probes = if range.count < PROBES_MAX {
        range.count
    } else {
        PROBES_MAX
    };
    // SAFETY: the callback and its context are what bpf_loop expects; the
    // context outlives the call.
    unsafe {
        bpf_loop(
            probes,
            try_port::<F> as *mut c_void,
            (&mut scan as *mut Scan<F>).cast(),
            0,
        )
    };
    (scan.found != 0).then_some(scan.found as u16)
}
