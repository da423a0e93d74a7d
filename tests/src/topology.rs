//! A small cluster in namespaces: nodes and an outside client on one L2
//! segment (a bridge in a namespace of its own), pods behind each node on
//! veth pairs with /32 routes, as a point-to-point CNI sets them up. Nothing
//! routes out of it.
use std::net::Ipv4Addr;

use crate::{netns::Netns, unique};

pub const LAN_PREFIX: [u8; 3] = [192, 168, 77];

pub struct Pod {
    pub name: String,
    pub ns: Netns,
    pub ip: Ipv4Addr,
    /// The host-side veth in the node namespace.
    pub host_if: String,
    pub node: usize,
}

pub struct Node {
    pub ns: Netns,
    /// Address on the shared segment (interface `eth0`).
    pub ip: Ipv4Addr,
    pub index: usize,
    pods: usize,
}

impl Node {
    /// The node's gateway address on its pod veths.
    pub fn pod_gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, self.index as u8, 1)
    }
}

pub struct Client {
    pub ns: Netns,
    pub ip: Ipv4Addr,
}

pub struct Topology {
    tag: String,
    // Field order is drop order: pods and hosts go before the segment.
    pub pods: Vec<Pod>,
    pub clients: Vec<Client>,
    pub nodes: Vec<Node>,
    lan: Netns,
    lan_ports: usize,
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
            nodes: vec![],
            lan,
            lan_ports: 0,
        })
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
        ns.ip(&["link", "set", "eth0", "up"])?;
        Ok(())
    }

    /// Adds a node; its pods get 10.244.<index>.0/24, and every node routes
    /// the other nodes' pod ranges through them.
    pub fn add_node(&mut self) -> anyhow::Result<usize> {
        let index = self.nodes.len() + 1;
        let ns = Netns::new(&format!("{}-n{index}", self.tag))?;
        for (k, v) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
            ("net.ipv4.conf.all.send_redirects", "0"),
            ("net.ipv4.conf.default.send_redirects", "0"),
        ] {
            ns.sysctl(k, v)?;
        }
        let ip = Ipv4Addr::new(
            LAN_PREFIX[0],
            LAN_PREFIX[1],
            LAN_PREFIX[2],
            10 + index as u8,
        );
        self.plug_into_lan(&ns, ip)?;
        for other in &self.nodes {
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
        n.ns.ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns.name,
        ])?;
        n.ns.ip(&["addr", "add", &format!("{gw}/32"), "dev", &host_if])?;
        n.ns.ip(&["link", "set", &host_if, "up"])?;
        n.ns.ip(&["route", "add", &format!("{ip}/32"), "dev", &host_if])?;
        ns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
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
        self.pods.push(Pod {
            name: name.to_string(),
            ns,
            ip,
            host_if,
            node,
        });
        Ok(self.pods.len() - 1)
    }

    /// Adds a host outside the cluster on the nodes' segment.
    pub fn add_client(&mut self) -> anyhow::Result<usize> {
        let k = self.clients.len() + 1;
        let ns = Netns::new(&format!("{}-c{k}", self.tag))?;
        let ip = Ipv4Addr::new(LAN_PREFIX[0], LAN_PREFIX[1], LAN_PREFIX[2], 100 + k as u8);
        self.plug_into_lan(&ns, ip)?;
        self.clients.push(Client { ns, ip });
        Ok(k - 1)
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
