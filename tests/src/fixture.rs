//! The one-node cluster most tests start from.
use crate::{agent::ManifestDir, manifests, topology::Topology, traffic::Server};

/// A node with a `client` pod and backend pods `web-1..=web-n`, each serving
/// TCP and UDP on 8080, and a manifest directory holding their Pods.
/// Declare the agent after it, so the agent stops first.
pub struct OneNode {
    pub servers: Vec<Server>,
    pub topo: Topology,
    pub dir: ManifestDir,
}

impl OneNode {
    /// `web-1..=web-<ready>` are ready, the rest not.
    pub fn new(backends: usize, ready: usize) -> anyhow::Result<Self> {
        let mut topo = Topology::new()?;
        topo.add_node()?;
        topo.add_pod(0, "client")?;
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
        let mut text = String::new();
        for p in self.topo.pods.iter().filter(|p| p.name.starts_with("web-")) {
            let i: usize = p.name[4..].parse()?;
            text.push_str(&manifests::pod(&p.name, "web", p.ip, ready(i), "node-1"));
            text.push_str("---\n");
        }
        self.dir.write("pods.yaml", &text)
    }
}
