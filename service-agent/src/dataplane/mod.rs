//! The only part of the agent that touches BPF: loading and attaching the
//! programs, adopting pinned maps, and writing plans into them.
pub mod batch;
pub mod cgroup;
#[cfg(test)]
pub mod fake;
pub mod interfaces;
pub mod kernel_conntrack;
pub mod links;
pub mod maps;
pub mod pins;
pub mod readback;
pub mod sock_destroy;
pub mod tables;
pub mod takeover;
pub mod writer;
pub mod xdp_features;

use std::{
    collections::BTreeMap,
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::PathBuf,
};

use anyhow::{Context as _, anyhow};
use aya::{
    EbpfLoader,
    maps::{Array, DevMapHash, MapData},
    programs::{SchedClassifier, TcAttachType, Xdp, links::PinnedLink},
};
use service_common::*;
use tracing::{info, warn};

use self::{pins::*, tables::Tables, writer::Writer};

/// Map capacities; the defaults are sized for about 10,000 Services.
#[derive(Clone, Debug)]
pub struct MapSizes {
    /// Frontends (each Service port × ClusterIP/NodePort/external address);
    /// the size of the per-CPU SVC_STATS array.
    pub frontends: u32,
    pub services: u32,
    pub backends: u32,
    pub conntrack: u32,
    pub affinity: u32,
    /// Frontends with a Maglev table (each takes about 64 KiB of kernel
    /// memory, allocated when written).
    pub maglev: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            frontends: SVC_STATS_MAX,
            services: DEFAULT_SERVICES_MAX,
            backends: DEFAULT_BACKENDS_MAX,
            conntrack: DEFAULT_CONNTRACK_MAX,
            affinity: DEFAULT_AFFINITY_MAX,
            maglev: DEFAULT_MAGLEV_MAX,
        }
    }
}

impl MapSizes {
    pub fn max_entries(&self, map: &str) -> u32 {
        match map {
            // Each family's maps are sized alike: a cluster may be either.
            MAP_SERVICES | MAP_SERVICES6 => self.services,
            MAP_BACKENDS | MAP_BACKENDS6 | MAP_AFFINITY_MATCH => self.backends,
            MAP_CONNTRACK | MAP_CONNTRACK6 => self.conntrack,
            MAP_AFFINITY | MAP_AFFINITY6 => self.affinity,
            MAP_NODE_ADDRS | MAP_NODE_ADDRS6 => NODE_ADDRS_MAX,
            MAP_SVC_STATS => self.frontends,
            MAP_REASONS => REASONS_MAX,
            MAP_META => META_MAX,
            MAP_SOURCE_RANGES | MAP_SOURCE_RANGES6 => DEFAULT_SOURCE_RANGES_MAX,
            MAP_FRAGMENTS | MAP_FRAGMENTS6 => DEFAULT_FRAGMENTS_MAX,
            MAP_XDP_EGRESS => XDP_EGRESS_MAX,
            MAP_SOCK_REVNAT | MAP_SOCK_REVNAT6 => DEFAULT_SOCK_REVNAT_MAX,
            MAP_FLOOD => 1,
            MAP_MAGLEV => self.maglev,
            _ => 0,
        }
    }
}

pub struct Dataplane {
    ebpf: aya::Ebpf,
    pub tables: Tables,
    pub writer: Writer,
    pub pin_dir: PathBuf,
    links: BTreeMap<String, (IfaceRole, PinnedLink)>,
    egress_links: BTreeMap<String, PinnedLink>,
    xdp_links: BTreeMap<String, PinnedLink>,
    xdp_egress: DevMapHash<MapData>,
}

/// How the XDP fast path is attached to external interfaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum XdpMode {
    /// No XDP: tc does everything.
    #[default]
    Off,
    /// In the driver, before an skb exists (veth has it; NICs whose driver supports XDP).
    Native,
    /// In the kernel's generic hook, after the skb is built: any device, less gain.
    Generic,
}

impl XdpMode {
    pub fn as_str(self) -> &'static str {
        match self {
            XdpMode::Off => "off",
            XdpMode::Native => "native",
            XdpMode::Generic => "generic",
        }
    }

    fn aya(self) -> aya::programs::XdpMode {
        match self {
            XdpMode::Native => aya::programs::XdpMode::Driver,
            _ => aya::programs::XdpMode::Skb,
        }
    }
}

/// Whether XDP may send frames out of an attached interface, and why not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum XdpEgress {
    Allowed,
    Refused(String),
}

/// Which side of the node an interface faces; it decides the program attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IfaceRole {
    Pod,
    External,
}

impl IfaceRole {
    pub fn program(self) -> &'static str {
        match self {
            IfaceRole::Pod => PROG_TC_POD,
            IfaceRole::External => PROG_TC_EXTERNAL,
        }
    }
}

fn pinned_layout_version(dir: &std::path::Path) -> Option<u64> {
    let data = MapData::from_pin(map_pin_path(dir, MAP_META)).ok()?;
    let meta: Array<MapData, u64> =
        Array::try_from(aya::maps::Map::from_map_data(data).ok()?).ok()?;
    meta.get(&META_LAYOUT_VERSION, 0).ok()
}

/// Loads the programs `names` of type `$ty` from `$ebpf` (aya gives each
/// program type its own `load`, so this is a macro, not a function).
macro_rules! load_programs {
    ($ebpf:expr, $ty:ty, $kind:literal, $names:expr) => {
        for name in $names {
            let prog: &mut $ty = $ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the BPF object"))?
                .try_into()?;
            prog.load().with_context(|| {
                format!("the kernel verifier rejected the {} program {name}", $kind)
            })?;
        }
    };
}

/// Creates `dir` (0700) when missing and gives it back.
fn private_dir(dir: &std::path::Path) -> anyhow::Result<PathBuf> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| dir.display().to_string())?;
    Ok(dir.to_path_buf())
}

impl Dataplane {
    /// Loads the programs and creates or adopts the pinned maps in `pin_dir`.
    pub fn load(pin_dir: PathBuf, sizes: &MapSizes) -> anyhow::Result<Self> {
        prepare_pin_dir(&pin_dir)?;
        let mut why_recreate = incompatible_pins(&pin_dir, |m| sizes.max_entries(m));
        if why_recreate.is_none()
            && let Some(v) = pinned_layout_version(&pin_dir)
            && v != 0
            && v != LAYOUT_VERSION as u64
        {
            why_recreate = Some(format!(
                "pinned maps have layout version {v}, this agent writes {LAYOUT_VERSION}"
            ));
        }
        if let Some(why) = why_recreate {
            warn!(pin_dir = %pin_dir.display(), "{why}: recreating the maps (existing connections lose their conntrack entries)");
            remove_pins(&pin_dir).context("removing incompatible pins")?;
            prepare_pin_dir(&pin_dir)?;
        }
        let adopting = map_pin_path(&pin_dir, MAP_SERVICES).exists();
        let paths: Vec<(&str, PathBuf)> = ALL_MAPS
            .iter()
            .map(|m| (*m, map_pin_path(&pin_dir, m)))
            .collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
            loader.map_max_entries(name, sizes.max_entries(name));
        }
        let mut ebpf = loader
            .load(crate::EBPF_OBJECT)
            .context("loading the BPF object (is this kernel built with BTF and bpf support?)")?;
        // The verifier runs here: a program it refuses stops the agent at
        // start, with the program named.
        load_programs!(
            ebpf,
            SchedClassifier,
            "tc",
            [PROG_TC_POD, PROG_TC_EXTERNAL, PROG_TC_EGRESS]
        );
        load_programs!(ebpf, Xdp, "XDP", [PROG_XDP_EXTERNAL]);
        load_programs!(
            ebpf,
            aya::programs::CgroupSockAddr,
            "socket",
            SOCK_HOOKS.map(|(name, _)| name)
        );
        load_programs!(
            ebpf,
            aya::programs::CgroupSock,
            "socket",
            [PROG_SOCK_RELEASE]
        );
        // Pins are the agent's alone: maps hold every flow of the node.
        for (_, path) in &paths {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("chmod 600 {}", path.display()))?;
        }
        let mut tables = Tables::take(&mut ebpf)?;
        let xdp_egress = DevMapHash::try_from(
            ebpf.take_map(MAP_XDP_EGRESS)
                .ok_or_else(|| anyhow!("map {MAP_XDP_EGRESS} missing from the BPF object"))?,
        )?;
        tables
            .meta
            .set(META_LAYOUT_VERSION, LAYOUT_VERSION as u64, 0)?;
        let writer =
            Writer::adopt(&mut tables, sizes.frontends).context("reading the pinned maps")?;
        if adopting {
            info!(
                frontends = writer.frontend_count(),
                backends = writer.backend_count(),
                "adopted pinned maps"
            );
        }
        Ok(Self {
            ebpf,
            tables,
            writer,
            pin_dir,
            links: BTreeMap::new(),
            egress_links: BTreeMap::new(),
            xdp_links: BTreeMap::new(),
            xdp_egress,
        })
    }

    /// A loaded tc ingress program (also for BPF_PROG_TEST_RUN in tests and benchmarks).
    pub fn program(&mut self, role: IfaceRole) -> anyhow::Result<&mut SchedClassifier> {
        self.tc_program(role.program())
    }

    /// A loaded tc program by name.
    pub fn tc_program(&mut self, name: &str) -> anyhow::Result<&mut SchedClassifier> {
        Ok(self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("program {name} missing"))?
            .try_into()?)
    }

    /// The loaded XDP program (also for BPF_PROG_TEST_RUN).
    pub fn xdp_program(&mut self) -> anyhow::Result<&mut Xdp> {
        Ok(self
            .ebpf
            .program_mut(PROG_XDP_EXTERNAL)
            .ok_or_else(|| anyhow!("program {PROG_XDP_EXTERNAL} missing"))?
            .try_into()?)
    }

    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.links.keys().map(String::as_str)
    }

    pub fn xdp_attached(&self) -> impl Iterator<Item = &str> {
        self.xdp_links.keys().map(String::as_str)
    }

    /// Attaches the XDP fast path to `iface` in `mode` (once), through a
    /// pinned link, like `attach`. Returns whether a link was adopted.
    pub fn attach_xdp(&mut self, iface: &str, mode: XdpMode) -> anyhow::Result<Option<bool>> {
        if mode == XdpMode::Off || self.xdp_links.contains_key(iface) {
            return Ok(None);
        }
        let pin = private_dir(&links::xdp_links_dir(&self.pin_dir, mode))?.join(iface);
        let (link, adopted) = links::attach_pinned_xdp(self.xdp_program()?, iface, mode, &pin)
            .with_context(|| format!("attaching {PROG_XDP_EXTERNAL} to {iface}"))?;
        self.xdp_links.insert(iface.to_string(), link);
        Ok(Some(adopted))
    }

    /// Detaches XDP links a previous agent left in another mode (or in any
    /// mode when XDP is now off): tc handles their traffic meanwhile.
    pub fn detach_other_xdp_modes(&mut self, mode: XdpMode) -> Vec<String> {
        let mut gone = vec![];
        for other in [XdpMode::Native, XdpMode::Generic] {
            if other == mode {
                continue;
            }
            let dir = links::xdp_links_dir(&self.pin_dir, other);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                // Removing the pin drops the last reference: the link detaches.
                if std::fs::remove_file(e.path()).is_ok() {
                    gone.push(format!(
                        "{} ({})",
                        e.file_name().to_string_lossy(),
                        other.as_str()
                    ));
                }
            }
            let _ = std::fs::remove_dir(&dir);
        }
        gone
    }

    /// Fills XDP_EGRESS with the XDP interfaces that can transmit XDP frames
    /// (in native mode: the device reports NDO_XMIT; a veth does only while
    /// its peer can receive them). Returns each interface's standing.
    pub fn sync_xdp_egress(&mut self, mode: XdpMode) -> Vec<(String, XdpEgress)> {
        let mut out = vec![];
        let mut keep = std::collections::BTreeSet::new();
        for iface in self.xdp_links.keys() {
            let standing = match nix::net::if_::if_nametoindex(iface.as_str()) {
                Err(e) => XdpEgress::Refused(format!("no ifindex: {e}")),
                Ok(ifindex) => {
                    let ok = match mode {
                        XdpMode::Generic => Ok(()),
                        _ => match xdp_features::xdp_features(ifindex) {
                            Ok(bits) if bits & xdp_features::XDP_ACT_NDO_XMIT != 0 => Ok(()),
                            Ok(_) => Err("the device cannot transmit XDP frames (for a veth: its peer needs an XDP program or GRO on)".to_string()),
                            Err(e) => Err(format!("XDP features unknown: {e}")),
                        },
                    };
                    match ok.and_then(|()| {
                        self.xdp_egress
                            .insert(ifindex, ifindex, None, 0)
                            .map_err(|e| format!("{MAP_XDP_EGRESS}: {e}"))
                    }) {
                        Ok(()) => {
                            keep.insert(ifindex);
                            XdpEgress::Allowed
                        }
                        Err(why) => XdpEgress::Refused(why),
                    }
                }
            };
            out.push((iface.clone(), standing));
        }
        let stale: Vec<u32> = self
            .xdp_egress
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !keep.contains(k))
            .collect();
        for k in stale {
            let _ = self.xdp_egress.remove(k);
        }
        out
    }

    /// Attaches the program for `role` to the tc ingress of `iface` and the
    /// egress program to its tc egress (once), through pinned links that
    /// outlive this process. Returns whether links left by a previous agent
    /// were adopted.
    pub fn attach(&mut self, iface: &str, role: IfaceRole) -> anyhow::Result<Option<bool>> {
        if self.links.contains_key(iface) {
            return Ok(None);
        }
        // Egress first: once ingress translates a flow to a host-network
        // endpoint, its replies need the egress program already there.
        let egress_pin = private_dir(&links::egress_links_dir(&self.pin_dir))?.join(iface);
        let (egress, _) = links::attach_pinned(
            self.tc_program(PROG_TC_EGRESS)?,
            iface,
            TcAttachType::Egress,
            &egress_pin,
        )
        .with_context(|| format!("attaching {PROG_TC_EGRESS} to tc egress of {iface}"))?;
        self.egress_links.insert(iface.to_string(), egress);
        let pin = private_dir(&links::links_dir(&self.pin_dir))?.join(iface);
        let (link, adopted) =
            links::attach_pinned(self.program(role)?, iface, TcAttachType::Ingress, &pin)
                .with_context(|| {
                    format!("attaching {} to tc ingress of {iface}", role.program())
                })?;
        self.links.insert(iface.to_string(), (role, link));
        Ok(Some(adopted))
    }

    /// Attaches the socket hooks to `cgroup` (adopting pinned links there)
    /// for the sockets `mode` names; with `SocketLb::Off` the hooks still
    /// attached from a previous agent stop translating, then the caller
    /// detaches them.
    pub fn attach_sock_hooks(
        &mut self,
        cgroup: Option<&std::path::Path>,
        mode: cgroup::SocketLb,
    ) -> anyhow::Result<Vec<(&'static str, bool)>> {
        cgroup::set_mode(&mut self.tables.meta, mode)?;
        match cgroup {
            Some(dir) if mode != cgroup::SocketLb::Off => {
                cgroup::attach(&mut self.ebpf, &self.pin_dir, dir)
            }
            _ => Ok(vec![]),
        }
    }

    /// Forgets interfaces that no longer exist; their devices took the
    /// attachment with them, the pins go too.
    pub fn forget_missing(&mut self, present: &[String]) -> Vec<String> {
        let gone: Vec<String> = self
            .links
            .keys()
            .filter(|i| !present.contains(i))
            .cloned()
            .collect();
        for iface in &gone {
            if let Some((_, link)) = self.links.remove(iface) {
                drop(link.unpin());
            }
            if let Some(link) = self.egress_links.remove(iface) {
                drop(link.unpin());
            }
            if let Some(link) = self.xdp_links.remove(iface) {
                drop(link.unpin());
            }
        }
        gone
    }
}
