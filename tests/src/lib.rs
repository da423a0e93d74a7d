//! Test hosts in network namespaces: topologies joined by veth pairs with no
//! route out, traffic helpers that run inside them, and a guard for the agent.
//! Everything made here is removed on drop, also when a test fails.
pub mod agent;
pub mod apiserver;
pub mod bpf;
pub mod cgroup;
pub mod fixture;
pub mod fuzz;
pub mod host_client;
pub mod load;
pub mod manifests;
pub mod netns;
pub mod oracle;
pub mod packet;
pub mod rng;
pub mod topology;
pub mod traffic;

use std::sync::atomic::{AtomicU32, Ordering};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call, short enough for netns and pin paths.
pub fn unique(prefix: &str) -> String {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    format!("{prefix}{}x{n}", std::process::id())
}

/// A pin directory on bpffs of its own, removed (links, maps, directory) on drop.
pub struct PinDir(pub std::path::PathBuf);

impl PinDir {
    pub fn new(prefix: &str) -> Self {
        Self(std::path::PathBuf::from("/sys/fs/bpf").join(unique(prefix)))
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = service_agent::dataplane::pins::remove_pins(&self.0);
    }
}
