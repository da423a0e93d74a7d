//! The agent as a child process in a node namespace, stopped and cleaned up on drop.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{netns::Netns, unique};

/// The service-agent binary: $SERVICE_AGENT_BIN, else the workspace's target dir.
pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SERVICE_AGENT_BIN") {
        return PathBuf::from(p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    for profile in ["debug", "release"] {
        let p = target.join(profile).join("service-agent");
        if p.exists() {
            return p;
        }
    }
    panic!(
        "service-agent binary not found: run `cargo xtask test` (it builds it) or set SERVICE_AGENT_BIN"
    );
}

/// A directory of manifests, removed on drop.
pub struct ManifestDir {
    pub path: PathBuf,
}

impl ManifestDir {
    pub fn new() -> anyhow::Result<Self> {
        let path = std::env::temp_dir().join(unique("svc-manifests-"));
        fs::create_dir_all(&path)?;
        Ok(Self { path })
    }

    /// Replaces a file atomically, as `kubectl apply` replaces an object.
    pub fn write(&self, name: &str, text: &str) -> anyhow::Result<()> {
        let tmp = self.path.join(format!(".{name}.tmp"));
        fs::write(&tmp, text)?;
        fs::rename(&tmp, self.path.join(name))?;
        Ok(())
    }

    pub fn remove(&self, name: &str) -> anyhow::Result<()> {
        fs::remove_file(self.path.join(name))?;
        Ok(())
    }
}

impl Drop for ManifestDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

pub struct Agent {
    child: Option<Child>,
    netns_path: String,
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
    pub log: PathBuf,
    /// Source flags (`--manifests DIR` or `--source kube --kubeconfig F`) and the rest.
    args: Vec<String>,
    /// A command the agent runs under (e.g. `setpriv` limiting capabilities).
    pub wrapper: Vec<String>,
}

impl Agent {
    /// Starts the agent in `node` with the usual interfaces (eth0 external,
    /// vp* pods) plus `extra` flags, and waits until it has programmed the maps.
    pub fn start(node: &Netns, manifests: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_wrapped(node, manifests, extra, &[])
    }

    /// Like `start`, with the agent run under `wrapper` (a command prefix).
    pub fn start_wrapped(
        node: &Netns,
        manifests: &Path,
        extra: &[&str],
        wrapper: &[&str],
    ) -> anyhow::Result<Self> {
        let source = ["--manifests".to_string(), manifests.display().to_string()];
        let mut agent = Self::prepare(node, &source, extra);
        agent.wrapper = wrapper.iter().map(|s| s.to_string()).collect();
        agent.spawn()?;
        Ok(agent)
    }

    /// Like `start`, without waiting for anything (a start that takes
    /// longer than `spawn` waits, measured by the caller).
    pub fn start_nowait(node: &Netns, manifests: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        let source = ["--manifests".to_string(), manifests.display().to_string()];
        let mut agent = Self::prepare(node, &source, extra);
        agent.spawn_nowait()?;
        Ok(agent)
    }

    /// CPU time the agent has used (user + system, all threads), from /proc.
    pub fn cpu_seconds(&self) -> Option<f64> {
        let pid = self.child.as_ref()?.id();
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name, which is in parentheses and may
        // hold spaces: utime and stime are the 12th and 13th.
        let after = stat.rsplit_once(')')?.1;
        let f: Vec<&str> = after.split_whitespace().collect();
        let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        Some(ticks / hz)
    }

    /// Starts the agent on the Kubernetes API source, without waiting for it
    /// to program anything (it waits for its initial lists).
    pub fn start_kube(node: &Netns, kubeconfig: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        let source = [
            "--source".to_string(),
            "kube".into(),
            "--kubeconfig".into(),
            kubeconfig.display().to_string(),
        ];
        let mut agent = Self::prepare(node, &source, extra);
        agent.spawn_nowait()?;
        Ok(agent)
    }

    fn prepare(node: &Netns, source: &[String], extra: &[&str]) -> Self {
        let id = unique("svca");
        let mut args: Vec<String> = source.to_vec();
        args.extend([
            "--external-iface".into(),
            "eth0".into(),
            "--pod-iface".into(),
            "vp*".into(),
        ]);
        args.extend(extra.iter().map(|s| s.to_string()));
        // Never the agent's default (the machine's whole cgroup tree): socket
        // hooks only where a test asks, on a cgroup of its own.
        if !args.iter().any(|a| a == "--cgroup") {
            args.extend(["--cgroup".into(), "none".into()]);
        }
        // DNS (on by default with manifests) adds a Service to every plan:
        // only the tests that ask for it get it.
        if !args.iter().any(|a| a.starts_with("--dns")) {
            args.push("--dns=false".into());
        }
        Self {
            child: None,
            netns_path: node.path(),
            pin_dir: PathBuf::from("/sys/fs/bpf").join(&id),
            state_dir: std::env::temp_dir().join(format!("{id}-state")),
            log: std::env::temp_dir().join(format!("{id}.log")),
            args,
            wrapper: vec![],
        }
    }

    /// Sets `flag` to `value` for the next start (a restart with other options).
    pub fn set_flag(&mut self, flag: &str, value: &str) {
        match self.args.iter().position(|a| a == flag) {
            Some(i) if i + 1 < self.args.len() => self.args[i + 1] = value.to_string(),
            _ => self.args.extend([flag.to_string(), value.to_string()]),
        }
    }

    /// (Re)starts the process on the same pins, as a restarted agent would,
    /// and waits until it has programmed the maps.
    pub fn spawn(&mut self) -> anyhow::Result<()> {
        let start_len = self.spawn_nowait()?;
        self.wait_log_from(start_len, "agent running", Duration::from_secs(30))
    }

    /// Waits until the log, from byte `from` on, contains `what`.
    pub fn wait_log_from(&mut self, from: u64, what: &str, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let text = fs::read_to_string(&self.log).unwrap_or_default();
            if text.get(from as usize..).is_some_and(|t| t.contains(what)) {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("service-agent exited with {status}:\n{text}");
            }
            if Instant::now() > deadline {
                bail!("service-agent did not log {what:?} in {limit:?}:\n{text}");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the process; returns the log length before it, for `wait_log_from`.
    pub fn spawn_nowait(&mut self) -> anyhow::Result<u64> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let start_len = log.metadata()?.len();
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.netns_path))
            .args(&self.wrapper)
            .arg(agent_bin())
            .arg("run")
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(&self.args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.child = Some(cmd.spawn().context("starting service-agent")?);
        Ok(start_len)
    }

    /// The agent's resident memory in KiB, from /proc.
    pub fn rss_kib(&self) -> Option<u64> {
        let pid = self.child.as_ref()?.id();
        let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// A field of the agent's /proc status in KiB (`VmRSS`, `VmHWM`, ...).
    pub fn status_kib(&self, field: &str) -> Option<u64> {
        let pid = self.child.as_ref()?.id();
        let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    }

    /// SIGKILL, no goodbye: what a crash or an OOM kill does.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `service-agent SUB` against this agent's pins and state, with `extra`.
    fn cli_command(&self, sub: &str, extra: &[&str]) -> Command {
        let mut c = Command::new(agent_bin());
        c.arg(sub)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(extra);
        c
    }

    /// Runs a CLI subcommand against this agent's pins.
    pub fn cli(&self, sub: &str, extra: &[&str]) -> anyhow::Result<String> {
        let out = self.cli_command(sub, extra).output()?;
        if !out.status.success() {
            bail!(
                "service-agent {sub} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    pub fn list(&self) -> anyhow::Result<String> {
        self.cli("list", &[])
    }

    /// How many packets the programs counted under the reason `name`
    /// (`stats -o json`); 0 when it is not listed.
    pub fn reason(&self, name: &str) -> anyhow::Result<u64> {
        let stats = self.cli("stats", &["-o", "json"])?;
        let v: serde_json::Value = serde_json::from_str(&stats)?;
        Ok(v["reasons"][name].as_u64().unwrap_or(0))
    }

    /// Runs a CLI subcommand whose standard output is a pipe nobody reads
    /// any more (`service-agent stats | head -0`); gives its exit status and
    /// what it printed on standard error.
    pub fn cli_into_closed_pipe(
        &self,
        sub: &str,
        extra: &[&str],
    ) -> anyhow::Result<(std::process::ExitStatus, String)> {
        let (reader, writer) = std::io::pipe()?;
        drop(reader);
        let out = self.cli_command(sub, extra).stdout(writer).output()?;
        Ok((
            out.status,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// Waits until `list` output satisfies `pred` (the agent applies changes asynchronously).
    pub fn wait_list(&self, what: &str, pred: impl Fn(&str) -> bool) -> anyhow::Result<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let l = self.list()?;
            if pred(&l) {
                return Ok(l);
            }
            if Instant::now() > deadline {
                bail!(
                    "timed out waiting for {what}; list says:\n{l}\nlog:\n{}",
                    self.log_text()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
        if thread::panicking() {
            eprintln!(
                "--- agent log {} ---\n{}",
                self.log.display(),
                self.log_text()
            );
        }
        let _ = Command::new(agent_bin())
            .args(["cleanup", "--pin-dir"])
            .arg(&self.pin_dir)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .output();
        let _ = fs::remove_dir_all(&self.pin_dir);
        let _ = fs::remove_dir_all(&self.state_dir);
        let _ = fs::remove_file(&self.log);
    }
}
