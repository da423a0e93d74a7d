//! The clusters the namespace tests start from: one node with a client pod
//! and backends, or two nodes with an outside client, backends and a client
//! pod on each. A test adds its Services and starts the agents.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    ops::Deref,
    thread::JoinHandle,
    time::Duration,
};

use crate::{
    agent::{Agent, ManifestDir},
    manifests,
    topology::{Pod, Topology},
    traffic::{self, LoopOutcome, Reply, Server},
};

/// The ClusterIP of Service `web`, the Service most tests program.
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// How long one request may take.
pub const T: Duration = Duration::from_secs(3);

/// Writes Service `web` (selecting the `web` pods) on VIP with `ports`
/// (name, protocol, port, targetPort) to svc.yaml of `dir`.
fn write_web(dir: &ManifestDir, ports: &[(&str, &str, u16, &str)]) -> anyhow::Result<()> {
    dir.write(
        "svc.yaml",
        &manifests::service("web", "web", &VIP.to_string(), ports, ""),
    )
}

/// The backends' Pods, each ready when `ready(pod)`, on its own node.
fn write_web_pods(
    topo: &Topology,
    dir: &ManifestDir,
    ready: impl Fn(&Pod) -> bool,
) -> anyhow::Result<()> {
    let mut text = String::new();
    for p in topo.pods.iter().filter(|p| p.name.starts_with("web-")) {
        let node = format!("node-{}", p.node + 1);
        text.push_str(&manifests::pod(&p.name, "web", p.ip, ready(p), &node));
        text.push_str("---\n");
    }
    dir.write("pods.yaml", &text)
}

/// One TCP request from `pod` to `to`.
pub fn ask_from(pod: &Pod, to: SocketAddrV4) -> std::io::Result<Reply> {
    pod.ns
        .within(move || traffic::tcp_ask(to, T))
        .expect("a thread in the pod's namespace")
}

/// `traffic::request_loop` from `pod`, in the background: new connections
/// to VIP:80 and, with `udp`, a datagram to VIP:53 after each.
pub fn loop_from(pod: &Pod, udp: bool, limit: Duration, max: usize) -> JoinHandle<LoopOutcome> {
    let udp = udp.then_some(SocketAddrV4::new(VIP, 53));
    pod.ns
        .spawn(move || traffic::request_loop(SocketAddrV4::new(VIP, 80), udp, limit, max))
        .expect("a thread in the pod's namespace")
}

/// A node with client pods (`client` unless named otherwise) and backend
/// pods `web-1..=web-n`, each serving TCP and UDP on 8080, and a manifest
/// directory holding their Pods. Declare the agent after it (or use
/// `start`), so the agent stops first.
pub struct OneNode {
    pub servers: Vec<Server>,
    pub topo: Topology,
    pub dir: ManifestDir,
}

impl OneNode {
    /// `web-1..=web-<ready>` are ready, the rest not.
    pub fn new(backends: usize, ready: usize) -> anyhow::Result<Self> {
        Self::with_clients(&["client"], backends, ready)
    }

    pub fn with_clients(clients: &[&str], backends: usize, ready: usize) -> anyhow::Result<Self> {
        let mut topo = Topology::new()?;
        topo.add_node()?;
        for c in clients {
            topo.add_pod(0, c)?;
        }
        let mut servers = vec![];
        for i in 1..=backends {
            let k = topo.add_pod(0, &format!("web-{i}"))?;
            let p = &topo.pods[k];
            servers.push(Server::start(&p.ns, p.ip, 8080, &p.name)?);
        }
        let f = Self {
            servers,
            topo,
            dir: ManifestDir::new()?,
        };
        f.write_pods(|i| i <= ready)?;
        Ok(f)
    }

    /// Rewrites pods.yaml with web-i ready when `ready(i)`.
    pub fn write_pods(&self, ready: impl Fn(usize) -> bool) -> anyhow::Result<()> {
        write_web_pods(&self.topo, &self.dir, |p| {
            p.name[4..].parse().is_ok_and(|i: usize| ready(i))
        })
    }

    /// Writes Service `web` on VIP with `ports` (name, protocol, port, targetPort).
    pub fn write_web(&self, ports: &[(&str, &str, u16, &str)]) -> anyhow::Result<()> {
        write_web(&self.dir, ports)
    }

    /// Starts an agent on the node with `flags`; it waits until the maps are programmed.
    pub fn start_agent(&self, flags: &[&str]) -> anyhow::Result<Agent> {
        Agent::start(&self.topo.nodes[0].ns, &self.dir.path, flags)
    }

    /// Service `web` with `ports` and an agent started with `flags`, owning the fixture.
    pub fn start(
        self,
        ports: &[(&str, &str, u16, &str)],
        flags: &[&str],
    ) -> anyhow::Result<Running> {
        self.write_web(ports)?;
        let agent = self.start_agent(flags)?;
        Ok(Running { agent, node: self })
    }

    /// One TCP request from pod `from` to VIP:80.
    pub fn ask(&self, from: &str) -> std::io::Result<Reply> {
        ask_from(self.topo.pod(from), SocketAddrV4::new(VIP, 80))
    }
}

/// A OneNode and the agent running on it, which stops first.
pub struct Running {
    pub agent: Agent,
    pub node: OneNode,
}

impl Deref for Running {
    type Target = OneNode;
    fn deref(&self) -> &OneNode {
        &self.node
    }
}

/// Two nodes (zones a and b) and an outside client on their segment;
/// backends `web-1` on node-1 and `web-2` on node-2, each serving TCP and
/// UDP on 8080 (answering with its name) and 9090 (`<name>-alt`); a client
/// pod `c1` on node-1 and `c2` on node-2. `xdp` is the agents' --xdp mode.
pub struct TwoNodes {
    pub servers: Vec<Server>,
    pub topo: Topology,
    pub dir: ManifestDir,
    pub xdp: &'static str,
}

impl TwoNodes {
    /// The cluster with Pods written for both backends, ready.
    pub fn new(xdp: &'static str) -> anyhow::Result<Self> {
        let mut topo = Topology::new()?;
        topo.add_node()?;
        topo.add_node()?;
        topo.add_client()?;
        let mut servers = vec![];
        for (name, node) in [("web-1", 0), ("web-2", 1)] {
            let k = topo.add_pod(node, name)?;
            let p = &topo.pods[k];
            servers.push(Server::start(&p.ns, p.ip, 8080, name)?);
            servers.push(Server::start(&p.ns, p.ip, 9090, &format!("{name}-alt"))?);
        }
        topo.add_pod(0, "c1")?;
        topo.add_pod(1, "c2")?;
        // XDP sees raw frames: the segment must behave like wires.
        if xdp != "off" {
            topo.emulate_wires()?;
        }
        let f = Self {
            servers,
            topo,
            dir: ManifestDir::new()?,
            xdp,
        };
        f.write_pods(|_| true)?;
        Ok(f)
    }

    /// Rewrites pods.yaml with each backend ready when `ready(name)`.
    pub fn write_pods(&self, ready: impl Fn(&str) -> bool) -> anyhow::Result<()> {
        write_web_pods(&self.topo, &self.dir, |p| ready(&p.name))
    }

    /// An agent on each node with `flags` added to the node's name, zone and
    /// --xdp mode, owning the cluster.
    pub fn start(self, flags: &[&str]) -> anyhow::Result<Cluster> {
        let agents = (0..2)
            .map(|i| {
                let node = format!("node-{}", i + 1);
                let zone = ["a", "b"][i];
                let mut args = vec!["--node-name", &node, "--node-zone", zone, "--xdp", self.xdp];
                args.extend_from_slice(flags);
                Agent::start(&self.topo.nodes[i].ns, &self.dir.path, &args)
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Cluster {
            agents,
            nodes: self,
        })
    }
}

/// TwoNodes and the agents running on them, which stop first.
pub struct Cluster {
    pub agents: Vec<Agent>,
    pub nodes: TwoNodes,
}

impl Deref for Cluster {
    type Target = TwoNodes;
    fn deref(&self) -> &TwoNodes {
        &self.nodes
    }
}

impl Cluster {
    /// Waits until every agent's `list` satisfies `pred`.
    pub fn wait_all(&self, what: &str, pred: impl Fn(&str) -> bool) -> anyhow::Result<()> {
        for a in &self.agents {
            a.wait_list(what, &pred)?;
        }
        Ok(())
    }
}

/// Instantiates test functions `fn name(mode: &str)` once per mode, each
/// set in a module of its own: `tests_in_modes!([tc_only = "off", xdp_native
/// = "native"] {name_a, name_b});`.
#[macro_export]
macro_rules! tests_in_modes {
    ([$($module:ident = $mode:literal),+ $(,)?] $names:tt) => {
        $( $crate::tests_in_modes!(@one $module, $mode, $names); )+
    };
    (@one $module:ident, $mode:literal, {$($name:ident),* $(,)?}) => {
        mod $module {
            $( #[test] fn $name() { super::$name($mode) } )*
        }
    };
}
