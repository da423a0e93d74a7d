//! The command line: `service-agent run | list | stats | dump | cleanup`.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use clap::{Parser, Subcommand, ValueEnum};
use service_common::*;

use crate::{
    dataplane::cgroup::SocketLb,
    plan::{
        ipnet_lite::{IpNet, ParseNetError},
        maglev::{self, Balancing},
    },
    status,
};

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/service-agent";
/// Where /metrics, /healthz and /readyz are served by default. Not 10249 or
/// 10256 (kube-proxy's metrics and healthz), which the agent would find
/// taken while it takes over from a running kube-proxy, nor a port of the
/// kubelet (10248, 10250, 10255), the control plane (10257 to 10259) or
/// the common CNIs (Calico 9091/9099, Cilium 9962 to 9965, Antrea 10349 to 10351).
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:10280";

#[derive(Parser)]
#[command(
    name = "service-agent",
    version,
    about = "eBPF Kubernetes Service dataplane (kube-proxy replacement)"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(clap::Args, Clone)]
pub struct PinArgs {
    /// bpffs directory holding the pinned maps.
    #[arg(long, default_value = DEFAULT_PIN_DIR, env = "SERVICE_AGENT_PIN_DIR")]
    pub pin_dir: PathBuf,
    /// Directory of the agent's status file (default: derived from --pin-dir under /run/service-agent).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
}

impl PinArgs {
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| status::default_state_dir(&self.pin_dir))
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum SourceKind {
    /// Kubernetes YAML files in --manifests (no cluster needed).
    Manifests,
    /// The Kubernetes API server (--kubeconfig or in-cluster).
    Kube,
}

#[derive(Clone, Copy)]
pub struct Listen(pub Option<std::net::SocketAddr>);

pub fn parse_listen(s: &str) -> Result<Listen, String> {
    if s == "off" {
        return Ok(Listen(None));
    }
    s.parse()
        .map(|a| Listen(Some(a)))
        .map_err(|e| format!("{s}: {e}"))
}

#[derive(Clone, Copy, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// How long an idle flow keeps its conntrack entries, by state, in seconds
/// (kube-proxy's flag names; its kernel conntrack has the same states).
#[derive(clap::Args)]
pub struct LifetimeArgs {
    /// A TCP flow no reply has answered (only its SYN was seen).
    #[arg(long, default_value_t = 60)]
    pub conntrack_tcp_timeout_syn: u64,
    /// An established TCP flow.
    #[arg(long, default_value_t = 6 * 3600)]
    pub conntrack_tcp_timeout_established: u64,
    /// A TCP flow after a FIN or RST in its direction.
    #[arg(long, default_value_t = 10)]
    pub conntrack_tcp_timeout_close: u64,
    /// A UDP flow (refreshed by traffic in either direction).
    #[arg(long, default_value_t = 120)]
    pub conntrack_udp_timeout: u64,
}

impl LifetimeArgs {
    pub fn lifetimes(&self) -> crate::dataplane::writer::Lifetimes {
        let ns = |s: u64| s.saturating_mul(1_000_000_000);
        crate::dataplane::writer::Lifetimes {
            tcp_syn_ns: ns(self.conntrack_tcp_timeout_syn),
            tcp_established_ns: ns(self.conntrack_tcp_timeout_established),
            tcp_closing_ns: ns(self.conntrack_tcp_timeout_close),
            udp_ns: ns(self.conntrack_udp_timeout),
        }
    }
}

/// How the programs give out source ports and admit new flows.
#[derive(clap::Args)]
pub struct FlowLimitArgs {
    /// Source ports for flows source-NATed to the node address (NodePort,
    /// LoadBalancer, externalIPs to a backend on another node) and for
    /// client ports rewritten on a tuple clash, as MIN-MAX. Keep it clear of
    /// the node's ip_local_port_range (its own connections share the node
    /// address) and of the NodePort range.
    #[arg(long, default_value = "1024-29999", value_parser = parse_port_range)]
    pub snat_port_range: PortRange,
    /// Flood guard: new flows one CPU may open per second; past it further
    /// openings are dropped (flood_dropped) until the next second, so a
    /// flood cannot push established flows out of conntrack. 0: no limit.
    #[arg(long, default_value_t = 0)]
    pub flood_threshold: u64,
}

impl FlowLimitArgs {
    pub fn limits(&self) -> crate::dataplane::writer::FlowLimits {
        crate::dataplane::writer::FlowLimits {
            snat_ports: (self.snat_port_range.min, self.snat_port_range.max),
            flood_threshold: self.flood_threshold,
        }
    }
}

/// An inclusive range of ports, from 1 up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

pub fn parse_port_range(s: &str) -> Result<PortRange, String> {
    let Some((a, b)) = s.split_once('-') else {
        return Err(format!("{s}: expected MIN-MAX, e.g. 1024-29999"));
    };
    let port = |p: &str| match p.trim().parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("{s}: {p:?} is not a port (1 to 65535)")),
        Ok(n) => Ok(n),
    };
    let (min, max) = (port(a)?, port(b)?);
    if min > max {
        return Err(format!("{s}: the first port is above the last"));
    }
    Ok(PortRange { min, max })
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// Where Services and endpoints come from: a manifest directory, or the API server.
    #[arg(long, value_enum, default_value = "manifests")]
    pub source: SourceKind,
    /// Directory of Kubernetes YAML manifests (Service, Pod, EndpointSlice,
    /// Endpoints), for --source manifests.
    #[arg(long, required_if_eq("source", "manifests"))]
    pub manifests: Option<PathBuf>,
    /// kubeconfig for --source kube; without it the in-cluster service account is used.
    #[arg(long, env = "KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
    /// The API server's URL (https://HOST:PORT), for --source kube: it
    /// replaces the kubeconfig's server, or the in-cluster
    /// KUBERNETES_SERVICE_HOST (the `kubernetes` ClusterIP, which nothing
    /// translates before this agent has programmed the maps: a node without
    /// kube-proxy needs the real address). An empty value means unset.
    #[arg(long, env = "SERVICE_AGENT_API_SERVER")]
    pub api_server: Option<String>,
    /// Serve /metrics, /healthz and /readyz here ("off" to disable).
    #[arg(long, default_value = DEFAULT_METRICS_ADDR, value_parser = parse_listen)]
    pub metrics_addr: Listen,
    /// /healthz turns 503 when a change has waited this long to be programmed.
    #[arg(long, default_value_t = 60)]
    pub healthz_max_pending_seconds: u64,
    #[command(flatten)]
    pub pins: PinArgs,
    /// The node's external interface(s): NodePort, LoadBalancer and externalIP
    /// traffic arrives here, and replies of backends on other nodes.
    #[arg(long = "external-iface")]
    pub external_ifaces: Vec<String>,
    /// XDP fast path on the external interfaces for NodePort, LoadBalancer
    /// and externalIP flows to backends on other nodes: `native` (in the
    /// driver), `generic` (any device, smaller gain) or `off` (tc only).
    /// Needs frames with complete checksums, as they arrive from a wire.
    #[arg(long, value_enum, default_value_t = XdpArg::Off)]
    pub xdp: XdpArg,
    /// Glob of the host-side pod interfaces (e.g. 'veth*', 'lxc*'); interfaces
    /// that appear later are attached too.
    #[arg(long = "pod-iface")]
    pub pod_ifaces: Vec<String>,
    /// This node's name, for internalTrafficPolicy / externalTrafficPolicy Local.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// This node's zone (its topology.kubernetes.io/zone label), for topology hints.
    #[arg(long)]
    pub node_zone: Option<String>,
    /// Addresses NodePorts answer on, IPv4 or IPv6, repeated for several
    /// (default per family: every non-loopback IPv4 address here, every
    /// IPv6 one but link-local). The first of each family is also the
    /// source that traffic from outside to a backend on another node is
    /// NATed to (default: the first address of the first
    /// --external-iface that has one of that family).
    #[arg(long = "node-ip", value_parser = parse_node_ip)]
    pub node_ips: Vec<IpAddr>,
    /// Only externalIPs inside these CIDRs (IPv4 or IPv6) are programmed; without it none
    /// is (anyone allowed to set spec.externalIPs could otherwise intercept
    /// traffic to any address, CVE-2020-8554).
    #[arg(long = "external-ip-allow", value_parser = parse_net)]
    pub external_ip_allow: Vec<IpNet>,
    /// The ClusterIP range(s) of the cluster, of either family; a ClusterIP
    /// outside the ranges of its family is refused. A family without a
    /// range here is not checked.
    #[arg(long = "service-cidr", value_parser = parse_net)]
    pub service_cidrs: Vec<IpNet>,
    /// The cluster's pod range(s) of either family, as kube-proxy's --cluster-cidr: traffic
    /// from them arriving on an external interface counts as inside the
    /// cluster, to which externalTrafficPolicy Local does not apply (it
    /// reaches the cluster-wide endpoints). Traffic from pod interfaces and
    /// from the node's own sockets always counts as inside.
    #[arg(long = "cluster-cidr", value_parser = parse_net)]
    pub cluster_cidrs: Vec<IpNet>,
    /// cgroup v2 directory whose processes' sockets (in this network
    /// namespace only) are translated at connect()/sendmsg() time: host
    /// processes reaching Services. Default: the cgroup2 mount from
    /// /proc/mounts (all of the node); `none`: no socket hooks.
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// Whose sockets in --cgroup are translated at connect()/sendto():
    /// `host` (this network namespace's), `pods` (those and every other
    /// namespace's: pods reach backends directly, no per-packet
    /// translation), `off` (none; the hooks are detached).
    #[arg(long, value_enum, default_value_t = SocketLb::Host)]
    pub socket_lb: SocketLb,
    #[command(flatten)]
    pub lifetimes: LifetimeArgs,
    #[command(flatten)]
    pub flow_limits: FlowLimitArgs,
    /// Full resync period in seconds, besides file change events.
    #[arg(long, default_value_t = 30)]
    pub resync_seconds: u64,
    /// Most frontends (Service port × address: ClusterIP, NodePort, external);
    /// each has per-CPU counters.
    #[arg(long, default_value_t = SVC_STATS_MAX)]
    pub frontends_max: u32,
    /// Capacity of the SERVICES map (frontends × (backends + 1)).
    #[arg(long, default_value_t = DEFAULT_SERVICES_MAX)]
    pub services_max: u32,
    /// Capacity of the BACKENDS map.
    #[arg(long, default_value_t = DEFAULT_BACKENDS_MAX)]
    pub backends_max: u32,
    /// Capacity of the CONNTRACK map (two entries a flow; LRU).
    #[arg(long, default_value_t = DEFAULT_CONNTRACK_MAX)]
    pub conntrack_max: u32,
    /// Capacity of the AFFINITY map (LRU).
    #[arg(long, default_value_t = DEFAULT_AFFINITY_MAX)]
    pub affinity_max: u32,
    /// How new flows to NodePort, LoadBalancer and externalIP frontends
    /// pick a backend: `random`, or `maglev` (consistent hashing: every node
    /// picks the same backend for a flow). ClusterIPs always pick at random.
    #[arg(long, value_enum, default_value_t = LbAlgorithm::Random)]
    pub lb_algorithm: LbAlgorithm,
    /// Entries of each Maglev table: a prime, at least 100 per backend.
    #[arg(long, default_value_t = maglev::DEFAULT_TABLE_SIZE, value_parser = parse_table_size)]
    pub maglev_table_size: u32,
    /// Capacity of the MAGLEV map: frontends with a table (about 64 KiB of
    /// kernel memory each, taken when written). A frontend beyond it picks
    /// at random, and is reported.
    #[arg(long, default_value_t = DEFAULT_MAGLEV_MAX)]
    pub maglev_max: u32,
    /// Serve Service DNS (`--dns` or `--dns=true|false`); default: on with
    /// --source manifests, off with --source kube (a cluster has CoreDNS).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub dns: Option<bool>,
    /// The cluster's DNS zone.
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,
    /// The ClusterIP of the agent's DNS Service (kube-system/kube-dns), UDP and TCP 53.
    #[arg(long, default_value = "10.96.0.10")]
    pub dns_service_ip: Ipv4Addr,
    /// Where the DNS server listens (the endpoint of the DNS Service):
    /// ADDR:PORT; default: the first --node-ip (else the first node address), port 53.
    #[arg(long)]
    pub dns_listen: Option<std::net::SocketAddr>,
    /// Where names outside the cluster zone go: `resolv.conf` (the
    /// nameservers of /etc/resolv.conf), `none` (answered REFUSED), or
    /// ADDR[:PORT] (repeatable).
    #[arg(long = "dns-upstream", default_value = "resolv.conf", value_parser = parse_upstream)]
    pub dns_upstreams: Vec<Upstream>,
    /// DNS queries a second accepted from one source address (the excess is
    /// dropped and counted); 0: no limit.
    #[arg(long, default_value_t = 1000)]
    pub dns_rate_limit: u32,
    /// TTL of the DNS answers, in seconds.
    #[arg(long, default_value_t = 5)]
    pub dns_ttl: u32,
}

/// One `--dns-upstream` value.
#[derive(Clone, Debug, PartialEq)]
pub enum Upstream {
    ResolvConf,
    None,
    Server(std::net::SocketAddr),
}

pub fn parse_upstream(s: &str) -> Result<Upstream, String> {
    match s {
        "resolv.conf" => Ok(Upstream::ResolvConf),
        "none" => Ok(Upstream::None),
        _ => s
            .parse()
            .or_else(|_| s.parse::<std::net::IpAddr>().map(|ip| (ip, 53).into()))
            .map(Upstream::Server)
            .map_err(|_| format!("{s}: not resolv.conf, none or ADDR[:PORT]")),
    }
}

impl RunArgs {
    /// The DNS server's settings, when it is on.
    pub fn dns_config(&self) -> Result<Option<crate::dns::DnsConfig>, String> {
        let on = self
            .dns
            .unwrap_or(matches!(self.source, SourceKind::Manifests));
        if !on {
            return Ok(None);
        }
        let servers: Vec<_> = self
            .dns_upstreams
            .iter()
            .filter_map(|u| match u {
                Upstream::Server(a) => Some(*a),
                _ => None,
            })
            .collect();
        let upstream = match self.dns_upstreams.as_slice() {
            [Upstream::None] => crate::dns::Upstream::None,
            [Upstream::ResolvConf] => crate::dns::Upstream::ResolvConf("/etc/resolv.conf".into()),
            all if servers.len() == all.len() => crate::dns::Upstream::Servers(servers),
            _ => {
                return Err(
                    "--dns-upstream: resolv.conf and none stand alone, not with other values"
                        .into(),
                );
            }
        };
        Ok(Some(crate::dns::DnsConfig {
            cluster_domain: self.cluster_domain.clone(),
            service_ip: self.dns_service_ip.into(),
            listen: self.dns_listen,
            upstream,
            rate_limit: self.dns_rate_limit,
            ttl: self.dns_ttl,
        }))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LbAlgorithm {
    Random,
    Maglev,
}

impl LbAlgorithm {
    pub fn balancing(self, table_size: u32) -> Balancing {
        match self {
            LbAlgorithm::Random => Balancing::Random,
            LbAlgorithm::Maglev => Balancing::Maglev { table_size },
        }
    }
}

pub fn parse_table_size(s: &str) -> Result<u32, String> {
    let m: u32 = s.parse().map_err(|e| format!("{s}: {e}"))?;
    maglev::valid_table_size(m)?;
    Ok(m)
}

#[derive(Subcommand)]
pub enum Command {
    /// Load the programs, attach them, and keep the maps in sync with the source.
    Run(Box<RunArgs>),
    /// Print the programmed frontends and their backends, read from the pinned maps.
    List {
        #[command(flatten)]
        pins: PinArgs,
        #[arg(short, long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Print per-frontend packet counters and per-reason counters.
    Stats {
        #[command(flatten)]
        pins: PinArgs,
        #[arg(short, long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Print the raw entries of one pinned map (as `bpftool map dump` would, decoded).
    Dump {
        #[command(flatten)]
        pins: PinArgs,
        /// One of SERVICES, BACKENDS, CONNTRACK, AFFINITY, NODE_ADDRS, MAGLEV.
        map: String,
    },
    /// Remove every pin and the status file this agent made (run after stopping it).
    Cleanup {
        #[command(flatten)]
        pins: PinArgs,
    },
}

pub fn parse_net(s: &str) -> Result<IpNet, ParseNetError> {
    s.parse()
}

/// A `--node-ip`: an address other nodes and clients can reach this node
/// on, since NodePorts answer there and replies of source-NATed flows
/// return to it.
pub fn parse_node_ip(s: &str) -> Result<IpAddr, String> {
    let a: IpAddr = s
        .parse()
        .map_err(|_| format!("{s:?} is not an IPv4 or IPv6 address"))?;
    let why = match a {
        IpAddr::V4(v4) if v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast() => {
            Some("not a unicast address")
        }
        IpAddr::V4(v4) if v4.is_loopback() => Some("a loopback address reaches no other host"),
        IpAddr::V6(v6) if v6.is_unicast_link_local() => Some(
            "a link-local address names the node on one link only; give a global or unique-local one",
        ),
        IpAddr::V6(v6) if !crate::dataplane::interfaces::usable_node_address6(&v6) => {
            Some("not a unicast address other hosts can reach")
        }
        _ => None,
    };
    match why {
        Some(why) => Err(format!("{s}: {why}")),
        None => Ok(a),
    }
}

/// `--node-ip`s split by family, each in the order given.
pub fn split_node_ips(ips: &[IpAddr]) -> (Vec<Ipv4Addr>, Vec<Ipv6Addr>) {
    let v4 = ips.iter().filter_map(|a| match a {
        IpAddr::V4(a) => Some(*a),
        IpAddr::V6(_) => None,
    });
    let v6 = ips.iter().filter_map(|a| match a {
        IpAddr::V6(a) => Some(*a),
        IpAddr::V4(_) => None,
    });
    (v4.collect(), v6.collect())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum XdpArg {
    Off,
    Native,
    Generic,
}

impl From<XdpArg> for crate::dataplane::XdpMode {
    fn from(a: XdpArg) -> Self {
        match a {
            XdpArg::Off => Self::Off,
            XdpArg::Native => Self::Native,
            XdpArg::Generic => Self::Generic,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ips_take_both_families_and_refuse_what_cannot_name_the_node() {
        let ips: Vec<IpAddr> = ["192.168.0.5", "fd00:77::11", "10.0.0.1", "2001:db8::1"]
            .iter()
            .map(|s| parse_node_ip(s).unwrap())
            .collect();
        let (v4, v6) = split_node_ips(&ips);
        assert_eq!(
            v4,
            [
                "192.168.0.5".parse::<Ipv4Addr>().unwrap(),
                "10.0.0.1".parse().unwrap()
            ]
        );
        assert_eq!(
            v6,
            [
                "fd00:77::11".parse::<Ipv6Addr>().unwrap(),
                "2001:db8::1".parse().unwrap()
            ]
        );
        for (bad, why) in [
            ("fe80::1", "link-local"),
            ("::1", "not a unicast address"),
            ("::", "not a unicast address"),
            ("ff02::1", "not a unicast address"),
            ("127.0.0.1", "loopback"),
            ("0.0.0.0", "not a unicast address"),
            ("224.0.0.1", "not a unicast address"),
            ("fd00::1/64", "is not an IPv4 or IPv6 address"),
            ("node-1", "is not an IPv4 or IPv6 address"),
        ] {
            let e = parse_node_ip(bad).unwrap_err();
            assert!(e.contains(bad) && e.contains(why), "{bad}: {e}");
        }
        // The flag as clap reads it, both families repeated.
        let cli = Cli::try_parse_from([
            "service-agent",
            "run",
            "--manifests",
            "/m",
            "--node-ip",
            "fd00:77::11",
            "--node-ip",
            "192.168.0.5",
        ]);
        let Ok(Cli {
            command: Command::Run(args),
            ..
        }) = cli
        else {
            panic!("--node-ip of both families refused");
        };
        assert_eq!(split_node_ips(&args.node_ips).0.len(), 1);
        let e = Cli::try_parse_from(["service-agent", "run", "--node-ip", "fe80::1"])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("--node-ip") && e.contains("link-local"), "{e}");
    }

    #[test]
    fn port_ranges_parse_and_bad_ones_say_why() {
        assert_eq!(
            parse_port_range("20000-20003"),
            Ok(PortRange {
                min: 20_000,
                max: 20_003
            })
        );
        assert_eq!(
            parse_port_range("1-65535").map(|r| (r.min, r.max)),
            Ok((1, 65_535))
        );
        for (bad, why) in [
            ("30000-20000", "the first port is above the last"),
            ("0-100", "\"0\" is not a port"),
            ("100-70000", "\"70000\" is not a port"),
            ("1024", "expected MIN-MAX"),
            ("a-b", "\"a\" is not a port"),
        ] {
            let e = parse_port_range(bad).unwrap_err();
            assert!(e.starts_with(bad) && e.contains(why), "{bad}: {e}");
        }
    }
}
