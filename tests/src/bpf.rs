//! The BPF test harness: the agent's BPF object loaded on a pin directory of
//! its own, programs run on crafted packets through BPF_PROG_TEST_RUN (no
//! interface is attached for a tc run), the verdicts they return, and the
//! namespace whose routes and neighbours the programs' FIB lookups consult.
//! Shared by the program tests, the fuzzer and the bench.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    time::Duration,
};

use anyhow::Context as _;
use aya::programs::{TestRun, TestRunOptions};
use service_agent::{
    dataplane::{Dataplane, IfaceRole, MapSizes, XdpEgress, XdpMode},
    plan::{BackendAddr, FrontendKind, FrontendPlan, Plan},
};
use service_common::{CtKey, CtValue, PROG_TC_EGRESS, Reason};

use crate::{PinDir, netns::Netns, unique};

// tc verdicts (linux/pkt_cls.h).
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

// XDP verdicts (enum xdp_action).
pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;
pub const XDP_REDIRECT: u32 = 4;

/// Room for any frame the tests build, and for what a program makes of it.
const OUT_BYTES: usize = 2048;

/// Which program a packet runs through.
#[derive(Clone, Copy, Debug)]
pub enum Prog {
    Tc(IfaceRole),
    /// tc egress (replies of host-network endpoints).
    TcEgress,
    /// The XDP program, as if the frame came in on interface `ingress`
    /// (the FIB lookup and the transmit decision depend on it).
    Xdp {
        ingress: u32,
    },
}

/// What one program run returned.
#[derive(Clone, Debug)]
pub struct Run {
    pub verdict: u32,
    /// The packet as the program left it.
    pub packet: Vec<u8>,
    /// The kernel's measure of the program's own run time.
    pub duration: Duration,
}

/// Map sizes for a test: every map `entries` long, conntrack `conntrack`.
pub fn sizes(entries: u32, conntrack: u32) -> MapSizes {
    MapSizes {
        frontends: entries,
        services: entries,
        backends: entries,
        conntrack,
        affinity: entries,
        maglev: entries,
    }
}

/// A frontend plan as the planner makes one: rejecting when it has no
/// backend, without affinity or source ranges.
pub fn frontend(service: &str, kind: FrontendKind, backends: Vec<BackendAddr>) -> FrontendPlan {
    FrontendPlan {
        service: service.into(),
        port_name: "".into(),
        kind,
        backends: backends.into(),
        in_cluster: None,
        affinity_timeout_s: None,
        reject_when_empty: true,
        source_ranges: vec![],
    }
}

pub fn backend(addr: impl Into<IpAddr>, port: u16, local: bool) -> BackendAddr {
    BackendAddr {
        addr: addr.into(),
        port,
        local,
    }
}

/// The programs and maps, loaded on a pin directory of their own that is
/// removed on drop.
pub struct Loaded {
    // Field order is drop order: the maps and programs close before their pins go.
    pub dp: Dataplane,
    pins: PinDir,
}

impl Loaded {
    /// Loads the BPF object (the verifier runs here) with maps of `sizes`.
    pub fn new(prefix: &str, sizes: &MapSizes) -> anyhow::Result<Self> {
        let pins = PinDir::new(prefix);
        let dp = Dataplane::load(pins.0.clone(), sizes)
            .context("the programs load and pass the verifier")?;
        Ok(Self { dp, pins })
    }

    /// `new`, then `plan` written to the maps.
    pub fn with_plan(prefix: &str, sizes: &MapSizes, plan: &Plan) -> anyhow::Result<Self> {
        let mut l = Self::new(prefix, sizes)?;
        l.apply(plan)?;
        Ok(l)
    }

    /// Writes `plan` to the maps; any refused frontend is an error.
    pub fn apply(&mut self, plan: &Plan) -> anyhow::Result<()> {
        let report = self.dp.writer.apply(&mut self.dp.tables, plan);
        anyhow::ensure!(
            report.errors.is_empty(),
            "writing the plan: {:?}",
            report.errors
        );
        Ok(())
    }

    /// Makes `addr` this node's address and the source of source-NATed flows.
    pub fn set_node_addr(&mut self, addr: Ipv4Addr) -> anyhow::Result<()> {
        self.dp
            .writer
            .set_node_addrs(&mut self.dp.tables, &[addr])?;
        self.dp
            .writer
            .set_snat_addr(&mut self.dp.tables, Some(addr))?;
        Ok(())
    }

    /// Makes `addrs` this node's addresses and `snat` the source of
    /// source-NATed flows.
    pub fn set_node_addrs(&mut self, addrs: &[Ipv4Addr], snat: Ipv4Addr) -> anyhow::Result<()> {
        self.dp.writer.set_node_addrs(&mut self.dp.tables, addrs)?;
        self.dp
            .writer
            .set_snat_addr(&mut self.dp.tables, Some(snat))?;
        Ok(())
    }

    /// Makes `addr` this node's IPv6 address and the source of
    /// source-NATed IPv6 flows.
    pub fn set_node_addr6(&mut self, addr: Ipv6Addr) -> anyhow::Result<()> {
        self.dp
            .writer
            .set_node_addrs6(&mut self.dp.tables, &[addr])?;
        self.dp
            .writer
            .set_snat_addr6(&mut self.dp.tables, Some(addr))?;
        Ok(())
    }

    /// Attaches XDP (generic) to `iface` of the caller's namespace, lets it
    /// transmit there, and returns the interface's index for `Prog::Xdp`.
    pub fn attach_xdp(&mut self, iface: &str) -> anyhow::Result<u32> {
        self.dp.attach_xdp(iface, XdpMode::Generic)?;
        let egress = self.dp.sync_xdp_egress(XdpMode::Generic);
        anyhow::ensure!(
            egress
                .iter()
                .any(|(i, e)| i == iface && *e == XdpEgress::Allowed),
            "XDP may not transmit out of {iface}: {egress:?}"
        );
        Ok(nix::net::if_::if_nametoindex(iface)?)
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pins.0
    }

    /// Runs `pkt` through `prog` `repeat` times (the duration is the mean).
    pub fn test_run(&mut self, prog: Prog, pkt: &[u8], repeat: u32) -> anyhow::Result<Run> {
        let mut out = vec![0u8; OUT_BYTES];
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex.
        let mut xdp_md = [0u8; 24];
        let ctx_in = match prog {
            Prog::Tc(_) | Prog::TcEgress => None,
            Prog::Xdp { ingress } => {
                xdp_md[4..8].copy_from_slice(&(pkt.len() as u32).to_ne_bytes());
                xdp_md[12..16].copy_from_slice(&ingress.to_ne_bytes());
                Some(&xdp_md[..])
            }
        };
        let opts = TestRunOptions {
            data_in: Some(pkt),
            data_out: Some(&mut out),
            ctx_in,
            repeat,
            ..Default::default()
        };
        let r = match prog {
            Prog::Tc(role) => self.dp.program(role)?.test_run(opts),
            Prog::TcEgress => self.dp.tc_program(PROG_TC_EGRESS)?.test_run(opts),
            Prog::Xdp { .. } => self.dp.xdp_program()?.test_run(opts),
        }
        .with_context(|| format!("BPF_PROG_TEST_RUN of {prog:?} on {} bytes", pkt.len()))?;
        out.truncate(r.data_size_out as usize);
        Ok(Run {
            verdict: r.return_value,
            packet: out,
            duration: r.duration,
        })
    }

    /// Runs `pkt` once through `prog`; the run itself failing fails the test.
    pub fn run(&mut self, prog: Prog, pkt: &[u8]) -> Run {
        self.test_run(prog, pkt, 1).unwrap()
    }

    /// How many packets the programs counted under `r`, over all CPUs.
    pub fn reason(&self, r: Reason) -> u64 {
        self.dp
            .tables
            .reasons
            .get(&(r as u32), 0)
            .map_or(0, |per_cpu| per_cpu.iter().sum())
    }

    pub fn conntrack(&self, key: &CtKey) -> Option<CtValue> {
        self.dp.tables.conntrack.get(key, 0).ok()
    }
}

/// Reason counters as they stood before a packet, to check what it added.
pub struct Counts {
    expected: &'static [(Reason, u64)],
    before: Vec<u64>,
}

impl Counts {
    /// Checks that the counters grew by what `expected` says since `Loaded::counts`.
    pub fn check(&self, l: &Loaded) -> anyhow::Result<()> {
        for ((r, n), b) in self.expected.iter().zip(&self.before) {
            let added = l.reason(*r) - b;
            anyhow::ensure!(added == *n, "counted {added} under {r:?}, expected {n}");
        }
        Ok(())
    }
}

impl Loaded {
    /// The counters of `expected` (reason, how much a packet adds) now.
    pub fn counts(&self, expected: &'static [(Reason, u64)]) -> Counts {
        Counts {
            expected,
            before: expected.iter().map(|(r, _)| self.reason(*r)).collect(),
        }
    }
}

/// Checks every case of a table and fails naming each case that failed and why.
pub fn check_table<C>(
    cases: &[C],
    name: impl Fn(&C) -> &str,
    mut check: impl FnMut(&C) -> anyhow::Result<()>,
) {
    let failed: Vec<String> = cases
        .iter()
        .filter_map(|c| check(c).err().map(|e| format!("{}: {e:#}", name(c))))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} cases failed:\n{}",
        failed.len(),
        cases.len(),
        failed.join("\n")
    );
}

pub fn ct_key(saddr: Ipv4Addr, sport: u16, daddr: Ipv4Addr, dport: u16, proto: u8) -> CtKey {
    CtKey {
        saddr: saddr.octets(),
        daddr: daddr.octets(),
        sport,
        dport,
        proto,
        _pad: [0; 3],
    }
}

/// A namespace that stands for a node's view of the network in FIB lookups:
/// veth pairs whose far ends lead nowhere, permanent neighbour entries and
/// routes. No packet leaves it; BPF_PROG_TEST_RUN only consults it.
pub struct FibNamespace {
    pub ns: Netns,
}

impl FibNamespace {
    pub fn new(prefix: &str) -> anyhow::Result<Self> {
        let ns = Netns::new(&unique(prefix))?;
        ns.sysctl("net.ipv4.ip_forward", "1")?;
        Ok(Self { ns })
    }

    /// A veth pair `iface` (with address `cidr`) and `peer`, both up.
    pub fn link(&self, iface: &str, peer: &str, cidr: &str) -> anyhow::Result<&Self> {
        self.ns
            .ip(&["link", "add", iface, "type", "veth", "peer", "name", peer])?;
        self.ns.ip(&["addr", "add", cidr, "dev", iface])?;
        self.ns.ip(&["link", "set", iface, "up"])?;
        self.ns.ip(&["link", "set", peer, "up"])?;
        Ok(self)
    }

    /// A resolved neighbour: `ip` is at `mac` on `dev`.
    pub fn neighbour(&self, ip: &str, mac: [u8; 6], dev: &str) -> anyhow::Result<&Self> {
        let mac = mac.map(|b| format!("{b:02x}")).join(":");
        self.ns.ip(&[
            "neigh",
            "add",
            ip,
            "lladdr",
            &mac,
            "dev",
            dev,
            "nud",
            "permanent",
        ])?;
        Ok(self)
    }

    /// A route to `dst` (`ip route add DST ...via`), e.g. `["via", "10.0.0.1"]`.
    pub fn route(&self, dst: &str, via: &[&str]) -> anyhow::Result<&Self> {
        let mut args = vec!["route", "add", dst];
        args.extend_from_slice(via);
        self.ns.ip(&args)?;
        Ok(self)
    }

    pub fn mac(&self, iface: &str) -> anyhow::Result<[u8; 6]> {
        let out = self.ns.ip(&["-br", "link", "show", iface])?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let mac = text
            .split_whitespace()
            .nth(2)
            .with_context(|| format!("no MAC in {text:?}"))?;
        let bytes = mac
            .split(':')
            .map(|h| u8::from_str_radix(h, 16))
            .collect::<Result<Vec<u8>, _>>()?;
        bytes
            .try_into()
            .map_err(|b| anyhow::anyhow!("MAC {b:02x?} of {iface}"))
    }
}
