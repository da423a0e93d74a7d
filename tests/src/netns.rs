//! Network namespaces and links, through iproute2 so the steps read like the
//! commands a person would type.
use std::{
    fs::File,
    process::{Command, Output},
    thread,
};

use anyhow::{Context as _, bail};
use nix::sched::{CloneFlags, setns};

pub fn run(cmd: &str, args: &[&str]) -> anyhow::Result<Output> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// A network namespace, deleted (with every interface in it) on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        run("ip", &["netns", "add", name])?;
        let ns = Self {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// `ip -n NAME ARGS...`
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<Output> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Adds an IPv6 address (`addr/prefix`) to `dev` without duplicate
    /// address detection: with it the address stays tentative for a second
    /// or more, and a test that sends at once would race it.
    pub fn add_addr6(&self, cidr: &str, dev: &str) -> anyhow::Result<Output> {
        self.ip(&["-6", "addr", "add", cidr, "dev", dev, "nodad"])
    }

    /// Runs a command inside the namespace (network namespace only, so the
    /// host's /sys/fs/bpf stays visible).
    pub fn exec(&self, cmd: &str, args: &[&str]) -> anyhow::Result<Output> {
        let net = format!("--net={}", self.path());
        let mut full = vec![net.as_str(), cmd];
        full.extend_from_slice(args);
        run("nsenter", &full)
    }

    pub fn sysctl(&self, key: &str, value: &str) -> anyhow::Result<()> {
        self.exec("sysctl", &["-qw", &format!("{key}={value}")])?;
        Ok(())
    }

    /// Runs `f` on a thread that lives in this namespace.
    pub fn within<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        let handle = self.spawn(f)?;
        handle
            .join()
            .map_err(|_| anyhow::anyhow!("thread in {} panicked", self.name))
    }

    /// Starts `f` on a thread that lives in this namespace.
    /// (`enter` moves a thread of one's own between namespaces instead.)
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<thread::JoinHandle<T>> {
        let file = File::open(self.path()).with_context(|| self.path())?;
        Ok(thread::spawn(move || {
            setns(&file, CloneFlags::CLONE_NEWNET).expect("setns into the test namespace");
            f()
        }))
    }
}

/// Moves the calling thread into the network namespace at `path` for the
/// rest of its life: call it on a thread of one's own.
pub fn enter(path: &str) -> anyhow::Result<()> {
    let file = File::open(path).with_context(|| path.to_string())?;
    setns(&file, CloneFlags::CLONE_NEWNET).with_context(|| format!("setns into {path}"))?;
    Ok(())
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
