//! The host-side client (`src/bin/host_client.rs`) as a child process in a
//! node namespace and a test cgroup; killed on drop.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::{cgroup::TestCgroup, netns::Netns};

pub struct HostClient {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl HostClient {
    /// Starts `bin` in `ns` (network namespace only) and moves it into
    /// `cgroup` before it is given any command, so before its first socket.
    pub fn start(bin: &Path, ns: &Netns, cgroup: &TestCgroup) -> anyhow::Result<Self> {
        // nsenter execs the client in place: the pid is the client's.
        let mut child = Command::new("nsenter")
            .arg(format!("--net={}", ns.path()))
            .arg(bin)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("starting the host client")?;
        let stdin = child.stdin.take().context("client stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("client stdout")?);
        let mut c = Self {
            child,
            stdin,
            stdout,
        };
        if let Err(e) = cgroup.add(c.child.id()) {
            c.stop();
            return Err(e);
        }
        Ok(c)
    }

    /// Sends one command line; returns the answer line.
    pub fn ask(&mut self, cmd: &str) -> anyhow::Result<String> {
        writeln!(self.stdin, "{cmd}")?;
        self.stdin.flush()?;
        self.answer(cmd)
    }

    /// Asserts that a TCP connect and a UDP sendto to `vip` fail with
    /// ECONNREFUSED at once (the socket hook's refusal), not after a wait.
    pub fn assert_refused_at_once(&mut self, vip: std::net::Ipv4Addr) {
        for cmd in [format!("tcp {vip}:80"), format!("udp-sendto {vip}:53")] {
            let a = self.ask(&cmd).unwrap();
            let w: Vec<&str> = a.split_whitespace().collect();
            assert_eq!(w[..2], ["err", "111"], "{cmd}: ECONNREFUSED, got {a}");
            let ms: u64 = w[2].parse().unwrap();
            assert!(ms < 100, "{cmd}: refused after {ms} ms, not at once");
        }
    }

    /// Sends a command whose answer comes later (`answer`).
    pub fn send(&mut self, cmd: &str) -> anyhow::Result<()> {
        writeln!(self.stdin, "{cmd}")?;
        Ok(self.stdin.flush()?)
    }

    pub fn answer(&mut self, cmd: &str) -> anyhow::Result<String> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("the host client exited before answering {cmd:?}");
        }
        Ok(line.trim().to_string())
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for HostClient {
    fn drop(&mut self) {
        self.stop();
    }
}
