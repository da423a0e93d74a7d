//! A small cluster in namespaces: nodes and an outside client on one L2
//! segment (a bridge in a namespace of its own), pods behind each node on
//! veth pairs with /32 routes, as a point-to-point CNI sets them up. Nothing
//! routes out of it. A dual-stack topology (`Topology::dual_stack`) gives
//! every host an IPv6 ULA address too (fd00::/8, inside the namespaces
//! only), with duplicate address detection off so addresses work at once.
use std::net::{Ipv4Addr, Ipv6Addr};

use crate::{netns::Netns, unique};

pub const LAN_PREFIX: [u8; 3] = [192, 168, 77];

pub struct Pod {
    pub name: String,
    pub ns: Netns,
    /// Its IPv4 address; in an IPv6-only topology (`ipv6_pods_only`) the
    /// address it would have, assigned to nothing.
    pub ip: Ipv4Addr,
    /// Its IPv6 address, in a dual-stack topology.
    pub ip6: Option<Ipv6Addr>,
    /// The host-side veth in the node namespace.
    pub host_if: String,
    pub node: usize,
}

pub struct Node {
    pub ns: Netns,
    /// Address on the shared segment (interface `eth0`).
    pub ip: Ipv4Addr,
    pub ip6: Option<Ipv6Addr>,
    pub index: usize,
    pods: usize,
}

impl Node {
    /// The node's gateway address on its pod veths.
    pub fn pod_gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, self.index as u8, 1)
    }

    /// The node's IPv6 gateway address on its pod veths.
    pub fn pod_gateway6(&self) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x10, 0x244, self.index as u16, 0, 0, 0, 1)
    }
}

pub struct Client {
    pub ns: Netns,
    pub ip: Ipv4Addr,
    pub ip6: Option<Ipv6Addr>,
}

/// The IPv6 segment the nodes and clients share.
pub const LAN6_PREFIX: [u16; 2] = [0xfd00, 0x77];

fn lan6(host: u8) -> Ipv6Addr {
    Ipv6Addr::new(LAN6_PREFIX[0], LAN6_PREFIX[1], 0, 0, 0, 0, 0, host as u16)
}

pub struct Topology {
    tag: String,
    // Field order is drop order: pods and hosts go before the segment.
    pub pods: Vec<Pod>,
    pub clients: Vec<Client>,
    /// Routers between the segment and clients behind them.
    routers: Vec<Netns>,
    pub nodes: Vec<Node>,
    lan: Netns,
    lan_ports: usize,
    dual_stack: bool,
    /// Pods get no IPv4 address or route (an IPv6-only pod network).
    ipv6_pods_only: bool,
}

impl Topology {
    pub fn new() -> anyhow::Result<Self> {
        let tag = unique("sv");
        let lan = Netns::new(&format!("{tag}-lan"))?;
        lan.ip(&["link", "add", "br0", "type", "bridge"])?;
        lan.ip(&["link", "set", "br0", "up"])?;
        Ok(Self {
            tag,
            pods: vec![],
            clients: vec![],
            routers: vec![],
            nodes: vec![],
            lan,
            lan_ports: 0,
            dual_stack: false,
            ipv6_pods_only: false,
        })
    }

    /// A topology whose hosts have IPv6 addresses too: nodes fd00:77::<10+i>
    /// on the segment, pods fd00:10:244:<node>::<10+k> behind fd00:10:244:<node>::1.
    pub fn dual_stack() -> anyhow::Result<Self> {
        let mut t = Self::new()?;
        t.dual_stack = true;
        t.no_dad(&t.lan)?;
        Ok(t)
    }

    /// A dual-stack topology whose pods have IPv6 addresses only, as in an
    /// IPv6-only cluster (the nodes keep their IPv4 addresses on the segment).
    pub fn ipv6_pods_only() -> anyhow::Result<Self> {
        let mut t = Self::dual_stack()?;
        t.ipv6_pods_only = true;
        Ok(t)
    }

    /// Turns duplicate address detection off in `ns` before its interfaces
    /// exist, so their addresses (link-local ones too) are usable at once.
    fn no_dad(&self, ns: &Netns) -> anyhow::Result<()> {
        for k in [
            "net.ipv6.conf.all.accept_dad",
            "net.ipv6.conf.default.accept_dad",
        ] {
            ns.sysctl(k, "0")?;
        }
        Ok(())
    }

    /// A new namespace of this topology (DAD off when it is dual-stack).
    fn namespace(&self, name: &str) -> anyhow::Result<Netns> {
        let ns = Netns::new(name)?;
        if self.dual_stack {
            self.no_dad(&ns)?;
        }
        Ok(ns)
    }

    fn plug_into_lan(&mut self, ns: &Netns, ip: Ipv4Addr) -> anyhow::Result<()> {
        self.lan_ports += 1;
        let port = format!("p{}", self.lan_ports);
        self.lan.ip(&[
            "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ])?;
        self.lan
            .ip(&["link", "set", &port, "master", "br0", "up"])?;
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        if self.dual_stack {
            let ip6 = lan6(ip.octets()[3]);
            ns.add_addr6(&format!("{ip6}/64"), "eth0")?;
        }
        ns.ip(&["link", "set", "eth0", "up"])?;
        Ok(())
    }

    /// Adds a node; its pods get 10.244.<index>.0/24, and every node routes
    /// the other nodes' pod ranges through them.
    pub fn add_node(&mut self) -> anyhow::Result<usize> {
        let index = self.nodes.len() + 1;
        let ns = self.namespace(&format!("{}-n{index}", self.tag))?;
        for (k, v) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
            ("net.ipv4.conf.all.send_redirects", "0"),
            ("net.ipv4.conf.default.send_redirects", "0"),
        ] {
            ns.sysctl(k, v)?;
        }
        if self.dual_stack {
            ns.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        }
        let ip = Ipv4Addr::new(
            LAN_PREFIX[0],
            LAN_PREFIX[1],
            LAN_PREFIX[2],
            10 + index as u8,
        );
        self.plug_into_lan(&ns, ip)?;
        let ip6 = self.dual_stack.then(|| lan6(ip.octets()[3]));
        for other in &self.nodes {
            if let (Some(mine), Some(theirs)) = (ip6, other.ip6) {
                let (me, them) = (index as u16, other.index as u16);
                let range = |n: u16| format!("fd00:10:244:{n:x}::/64");
                ns.ip(&[
                    "-6",
                    "route",
                    "add",
                    &range(them),
                    "via",
                    &theirs.to_string(),
                ])?;
                other
                    .ns
                    .ip(&["-6", "route", "add", &range(me), "via", &mine.to_string()])?;
            }
            ns.ip(&[
                "route",
                "add",
                &format!("10.244.{}.0/24", other.index),
                "via",
                &other.ip.to_string(),
            ])?;
            other.ns.ip(&[
                "route",
                "add",
                &format!("10.244.{index}.0/24"),
                "via",
                &ip.to_string(),
            ])?;
        }
        self.nodes.push(Node {
            ns,
            ip,
            ip6,
            index,
            pods: 0,
        });
        Ok(index - 1)
    }

    /// Adds a pod behind node `node` (0-based) and returns its position in `pods`.
    pub fn add_pod(&mut self, node: usize, name: &str) -> anyhow::Result<usize> {
        let n = &mut self.nodes[node];
        n.pods += 1;
        let k = n.pods;
        let ip = Ipv4Addr::new(10, 244, n.index as u8, 10 + k as u8);
        let gw = n.pod_gateway();
        let host_if = format!("vp{k}");
        let ns = Netns::new(&format!("{}-n{}p{k}", self.tag, n.index))?;
        let ip6 = self
            .dual_stack
            .then(|| Ipv6Addr::new(0xfd00, 0x10, 0x244, n.index as u16, 0, 0, 0, 10 + k as u16));
        if ip6.is_some() {
            for key in [
                "net.ipv6.conf.all.accept_dad",
                "net.ipv6.conf.default.accept_dad",
            ] {
                ns.sysctl(key, "0")?;
            }
        }
        n.ns.ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ])?;
        n.ns.ip(&["link", "set", &host_if, "up"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        if !self.ipv6_pods_only {
            n.ns.ip(&["addr", "add", &format!("{gw}/32"), "dev", &host_if])?;
            n.ns.ip(&["route", "add", &format!("{ip}/32"), "dev", &host_if])?;
            ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
            ns.ip(&[
                "route",
                "add",
                &gw.to_string(),
                "dev",
                "eth0",
                "scope",
                "link",
            ])?;
            ns.ip(&[
                "route",
                "add",
                "default",
                "via",
                &gw.to_string(),
                "dev",
                "eth0",
            ])?;
        }
        if let Some(ip6) = ip6 {
            let gw6 = n.pod_gateway6().to_string();
            let host = &n.ns;
            host.add_addr6(&format!("{gw6}/128"), &host_if)?;
            host.ip(&["-6", "route", "add", &format!("{ip6}/128"), "dev", &host_if])?;
            ns.add_addr6(&format!("{ip6}/128"), "eth0")?;
            ns.ip(&["-6", "route", "add", &gw6, "dev", "eth0"])?;
            ns.ip(&["-6", "route", "add", "default", "via", &gw6, "dev", "eth0"])?;
        }
        self.pods.push(Pod {
            name: name.to_string(),
            ns,
            ip,
            ip6,
            host_if,
            node,
        });
        Ok(self.pods.len() - 1)
    }

    /// Adds a host outside the cluster on the nodes' segment.
    pub fn add_client(&mut self) -> anyhow::Result<usize> {
        let k = self.clients.len() + 1;
        let ns = self.namespace(&format!("{}-c{k}", self.tag))?;
        let ip = Ipv4Addr::new(LAN_PREFIX[0], LAN_PREFIX[1], LAN_PREFIX[2], 100 + k as u8);
        self.plug_into_lan(&ns, ip)?;
        let ip6 = self.dual_stack.then(|| lan6(100 + k as u8));
        self.clients.push(Client { ns, ip, ip6 });
        Ok(k - 1)
    }

    /// Adds a host outside the cluster behind a router on the nodes'
    /// segment (dual-stack topologies): the host is 10.<78+k>.0.2 and
    /// fd00:<78+k>::2, every node routes its network through the router,
    /// and the router's link to it has `mtu`, smaller than the segment's,
    /// so packets to it too large for that link are answered with "packet
    /// too big" (IPv6) or "fragmentation needed" by the router. Returns its
    /// position in `clients`.
    pub fn add_routed_client(&mut self, mtu: u32) -> anyhow::Result<usize> {
        anyhow::ensure!(
            self.dual_stack,
            "a routed client needs a dual-stack topology"
        );
        let k = self.routers.len() + 1;
        let router = self.namespace(&format!("{}-r{k}", self.tag))?;
        let router_lan = Ipv4Addr::new(LAN_PREFIX[0], LAN_PREFIX[1], LAN_PREFIX[2], 200 + k as u8);
        self.plug_into_lan(&router, router_lan)?;
        router.sysctl("net.ipv4.ip_forward", "1")?;
        router.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        let ns = self.namespace(&format!("{}-rc{k}", self.tag))?;
        router.ip(&[
            "link",
            "add",
            "r0",
            "mtu",
            &mtu.to_string(),
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &ns.name,
        ])?;
        let net = 78 + k as u8;
        let ip = Ipv4Addr::new(10, net, 0, 2);
        let ip6 = Ipv6Addr::new(0xfd00, net as u16, 0, 0, 0, 0, 0, 2);
        let (gw, gw6) = (
            Ipv4Addr::new(10, net, 0, 1),
            Ipv6Addr::new(0xfd00, net as u16, 0, 0, 0, 0, 0, 1),
        );
        router.ip(&["addr", "add", &format!("{gw}/24"), "dev", "r0"])?;
        router.add_addr6(&format!("{gw6}/64"), "r0")?;
        router.ip(&["link", "set", "r0", "up"])?;
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        ns.add_addr6(&format!("{ip6}/64"), "eth0")?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&["route", "add", "default", "via", &gw.to_string()])?;
        ns.ip(&["-6", "route", "add", "default", "via", &gw6.to_string()])?;
        let router_lan6 = lan6(200 + k as u8).to_string();
        for n in &self.nodes {
            n.ns.ip(&[
                "route",
                "add",
                &format!("10.{net}.0.0/24"),
                "via",
                &router_lan.to_string(),
            ])?;
            n.ns.ip(&[
                "-6",
                "route",
                "add",
                &format!("fd00:{net:x}::/64"),
                "via",
                &router_lan6,
            ])?;
        }
        self.routers.push(router);
        self.clients.push(Client {
            ns,
            ip,
            ip6: Some(ip6),
        });
        Ok(self.clients.len() - 1)
    }

    /// Makes the segment's veths behave like wires for XDP, which sees raw
    /// frames: senders fill in their checksums (a veth otherwise passes
    /// "checksum to be completed" packets, which a wire never carries), and
    /// the segment's ports run NAPI so native XDP can transmit to them.
    pub fn emulate_wires(&self) -> anyhow::Result<()> {
        let hosts = self
            .nodes
            .iter()
            .map(|n| &n.ns)
            .chain(self.clients.iter().map(|c| &c.ns));
        for ns in hosts {
            ns.exec("ethtool", &["-K", "eth0", "tx", "off"])?;
        }
        for k in 1..=self.lan_ports {
            self.lan
                .exec("ethtool", &["-K", &format!("p{k}"), "gro", "on"])?;
        }
        Ok(())
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name}"))
    }
}
