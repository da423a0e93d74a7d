//! A cgroup v2 child of the test's own, under the cgroup2 mount: the only
//! place a test attaches socket programs (never the machine's root cgroup,
//! which holds every process here). Removed on drop, also on failure.
use std::{fs, path::PathBuf, thread, time::Duration};

use anyhow::Context as _;

use crate::unique;

pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    pub fn new() -> anyhow::Result<Self> {
        let mounts = fs::read_to_string("/proc/mounts")?;
        let root = service_agent::dataplane::cgroup::cgroup2_mount(&mounts)?;
        let path = root.join(unique("svc-test-"));
        fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        Ok(Self { path })
    }

    /// Moves process `pid` (all its threads) into this cgroup. Sockets it
    /// makes from then on run this cgroup's programs.
    pub fn add(&self, pid: u32) -> anyhow::Result<()> {
        let procs = self.path.join("cgroup.procs");
        fs::write(&procs, pid.to_string()).with_context(|| format!("{}", procs.display()))
    }

    /// `--cgroup` for the agent.
    pub fn flag(&self) -> String {
        self.path.display().to_string()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // Survivors go back to the parent: a cgroup with members cannot go.
        let parent = self.path.parent().map(|p| p.join("cgroup.procs"));
        for _ in 0..50 {
            let procs = fs::read_to_string(self.path.join("cgroup.procs")).unwrap_or_default();
            if let Some(parent) = &parent {
                for pid in procs.lines() {
                    let _ = fs::write(parent, pid);
                }
            }
            if fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        eprintln!("could not remove the test cgroup {}", self.path.display());
    }
}
