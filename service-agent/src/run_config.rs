//! What `service-agent run` is told on its command line, resolved into
//! the values the agent loop uses.
use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use crate::{
    dataplane::{
        MapSizes, XdpMode,
        cgroup::{CgroupTarget, SocketLb},
        writer,
    },
    plan::{self, NodeContext},
    source::SourceConfig,
};

/// What `service-agent run` is told on its command line.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub source: SourceConfig,
    pub node: NodeContext,
    pub sizes: MapSizes,
    pub resync: Duration,
    pub metrics_addr: Option<SocketAddr>,
    pub max_pending: Duration,
    /// Where the maps and links are pinned, to outlive the agent, and
    /// where the status file is written.
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
    /// Interfaces traffic from outside the cluster arrives on, and the
    /// names (globs) of the pods' host-side interfaces.
    pub external_ifaces: Vec<String>,
    pub pod_iface_globs: Vec<String>,
    /// Fixed node addresses; empty: every non-loopback IPv4 address of the namespace.
    pub node_ips: Vec<Ipv4Addr>,
    /// The IPv6 ones; empty: every IPv6 address of the namespace but
    /// link-local ones.
    pub node_ips6: Vec<Ipv6Addr>,
    /// The cluster's pod ranges: sources inside the cluster on the wire.
    pub cluster_cidrs: Vec<plan::ipnet_lite::IpNet>,
    /// The XDP fast path on the external interfaces.
    pub xdp: XdpMode,
    /// The cgroup whose sockets are translated at connect().
    pub cgroup: CgroupTarget,
    /// Whose sockets in it: this namespace's, pods' too, or none.
    pub socket_lb: SocketLb,
    /// Conntrack lifetimes by flow state, for the garbage collection.
    pub lifetimes: writer::Lifetimes,
    /// The SNAT port range and the flood guard, for the programs.
    pub flow_limits: writer::FlowLimits,
    /// How NodePort, LoadBalancer and externalIP frontends pick backends.
    pub balancing: plan::maglev::Balancing,
    /// Service DNS, when on.
    pub dns: Option<crate::dns::DnsConfig>,
}
