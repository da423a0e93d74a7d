//! Reading the programmed state back from the pinned maps, for `list`,
//! `stats` and `dump`: what the kernel has, not what the agent meant.
use std::fmt::Write as _;

use crate::dataplane::maps::AnyBackend;

use serde::Serialize;
use service_common::*;

use crate::{
    dataplane::{maps::Maps as _, readback::read_frontends, tables::Tables},
    plan::{BackendAddr, FrontendKey, Protocol},
    status::Status,
};

/// After the frontend in `list` (and the metrics' frontend label): the
/// entry set sources inside the cluster use (a Local external frontend's).
pub const IN_CLUSTER_TAG: &str = "(in-cluster)";

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ProgrammedFrontend {
    pub frontend: String,
    pub svc_id: u32,
    pub backends: Vec<String>,
    pub affinity_timeout_s: Option<u32>,
    /// loadBalancerSourceRanges programmed for the frontend (CIDRs).
    pub source_ranges: Vec<String>,
    /// `namespace/name` from the agent's status file, when present.
    pub service: Option<String>,
    pub port_name: Option<String>,
    /// How new flows pick a backend: `random`, or `maglev` with the size of
    /// the table found (`maglev (no table: random)` while it is missing).
    pub algorithm: String,
}

pub fn programmed(t: &Tables, status: Option<&Status>) -> anyhow::Result<Vec<ProgrammedFrontend>> {
    let mut stored = read_frontends(t)?;
    let tables = t.maglev_tables()?;
    let mut out = vec![];
    for (k, f) in &stored.frontends {
        let Some(proto) = Protocol::from_number(k.proto()) else {
            continue;
        };
        let key = FrontendKey {
            addr: k.addr(),
            port: k.port(),
            proto,
        };
        let mut backends = vec![];
        for (slot, id) in f.counted_backends() {
            backends.push(match id {
                None => format!("<slot {slot} missing>"),
                Some(id) => match t.backend(id) {
                    Ok(Some(b)) => backend_addr(&b).to_string(),
                    _ => format!("<backend {id} missing>"),
                },
            });
        }
        backends.sort();
        let named = status.and_then(|s| s.frontends.iter().find(|f| f.frontend == key.to_string()));
        let frontend = if k.scope() == SCOPE_IN_CLUSTER {
            format!("{key} {IN_CLUSTER_TAG}")
        } else {
            key.to_string()
        };
        let m = f.master;
        let ranges = stored.ranges.remove(&m.svc_id).unwrap_or_default();
        out.push(ProgrammedFrontend {
            frontend,
            svc_id: m.svc_id,
            backends,
            affinity_timeout_s: (m.flags & SVC_F_AFFINITY != 0).then_some(m.affinity_timeout_s),
            source_ranges: ranges
                .iter()
                .map(|r| format!("{}/{}", r.addr, r.prefix))
                .collect(),
            service: named.map(|n| n.service.clone()),
            port_name: named.map(|n| n.port_name.clone()),
            algorithm: match (m.flags & SVC_F_MAGLEV != 0, tables.get(&m.svc_id)) {
                (false, _) => "random".into(),
                (true, Some(st)) => format!("maglev {}", st.size),
                (true, None) => "maglev (no table: random)".into(),
            },
        });
    }
    Ok(out)
}

fn backend_addr(b: &AnyBackend) -> BackendAddr {
    BackendAddr {
        addr: b.addr(),
        port: b.port(),
        local: b.flags() & BE_F_LOCAL != 0,
    }
}

/// `ipvsadm -Ln`-like text: one frontend a line.
pub fn render_list(frontends: &[ProgrammedFrontend], status: Option<&Status>) -> String {
    let mut s = String::new();
    for f in frontends {
        let backends = if f.backends.is_empty() {
            "(no endpoints: rejects)".to_string()
        } else {
            f.backends.join(", ")
        };
        let _ = write!(s, "{} -> {}", f.frontend, backends);
        let mut notes = vec![];
        if let Some(svc) = &f.service {
            match f.port_name.as_deref() {
                Some("") | None => notes.push(svc.clone()),
                Some(p) => notes.push(format!("{svc} port {p}")),
            }
        }
        if let Some(t) = f.affinity_timeout_s {
            notes.push(format!("affinity ClientIP {t}s"));
        }
        if !f.source_ranges.is_empty() {
            notes.push(format!("from {}", f.source_ranges.join(" ")));
        }
        if f.algorithm != "random" {
            notes.push(f.algorithm.clone());
        }
        if !notes.is_empty() {
            let _ = write!(s, "    # {}", notes.join(", "));
        }
        s.push('\n');
    }
    if let Some(st) = status {
        for sk in &st.skipped {
            let _ = writeln!(s, "skipped {}: {}", sk.service, sk.reason);
        }
        for p in &st.problems {
            let _ = writeln!(s, "problem: {p}");
        }
        for f in &st.failing {
            let subject = if f.subject.is_empty() { "" } else { " " };
            let _ = writeln!(
                s,
                "failing: {}{subject}{}: {}",
                f.kind, f.subject, f.message
            );
        }
    }
    s
}

/// Sums the per-CPU counters of every programmed frontend and every reason.
pub type FrontendCounters = Vec<(String, SvcStats)>;

pub fn counters(
    t: &Tables,
    frontends: &[ProgrammedFrontend],
) -> anyhow::Result<(FrontendCounters, Vec<(Reason, u64)>)> {
    let mut per = vec![];
    for f in frontends {
        let vals = t.svc_stats.get(&f.svc_id, 0)?;
        let mut sum = SvcStats::default();
        for v in vals.iter() {
            sum.packets += v.packets;
            sum.bytes += v.bytes;
            sum.new_flows += v.new_flows;
            sum.rejected += v.rejected;
        }
        per.push((f.frontend.clone(), sum));
    }
    let mut reasons = vec![];
    for r in Reason::ALL {
        let vals = t.reasons.get(&(r as u32), 0)?;
        reasons.push((r, vals.iter().sum()));
    }
    Ok((per, reasons))
}

/// How full each table map is: (name, entries, max_entries), read from the
/// kernel (capacity from the pinned map's info, not from flags).
pub fn fill(t: &Tables, pin_dir: &std::path::Path) -> Vec<(&'static str, usize, u32)> {
    fill_with(t, pin_dir, None)
}

/// As [`fill`], with CONNTRACK's entry count given instead of walked when
/// `conntrack` is set (a walk of a large table is what the caller avoids).
pub fn fill_with(
    t: &Tables,
    pin_dir: &std::path::Path,
    conntrack: Option<usize>,
) -> Vec<(&'static str, usize, u32)> {
    let capacity = |name: &str| {
        aya::maps::MapInfo::from_pin(crate::dataplane::pins::map_pin_path(pin_dir, name))
            .map(|i| i.max_entries())
            .unwrap_or(0)
    };
    [
        (MAP_SERVICES, t.services.keys().count()),
        (MAP_BACKENDS, t.backends.keys().count()),
        (
            MAP_CONNTRACK,
            conntrack.unwrap_or_else(|| t.conntrack.keys().count()),
        ),
        (MAP_AFFINITY, t.affinity.keys().count()),
        (MAP_AFFINITY_MATCH, t.affinity_match.keys().count()),
        (MAP_NODE_ADDRS, t.node_addrs.keys().count()),
        (MAP_SOURCE_RANGES, t.source_ranges.keys().count()),
        (MAP_SERVICES6, t.services6.keys().count()),
        (MAP_BACKENDS6, t.backends6.keys().count()),
        (MAP_NODE_ADDRS6, t.node_addrs6.keys().count()),
        (MAP_SOCK_REVNAT, t.sock_revnat.keys().count()),
        (MAP_SOCK_REVNAT6, t.sock_revnat6.keys().count()),
    ]
    .into_iter()
    .map(|(name, n)| (name, n, capacity(name)))
    .collect()
}

/// One line: `maps: SERVICES 8/262144, ...`.
pub fn render_fill(fill: &[(&str, usize, u32)]) -> String {
    let parts: Vec<String> = fill
        .iter()
        .map(|(n, e, c)| format!("{n} {e}/{c}"))
        .collect();
    format!("maps: {}\n", parts.join(", "))
}
