//! `cargo xtask setup | build | test | demo | bench`: everything beyond `cargo build`.
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "Project tasks for the Service dataplane")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what a fresh machine lacks (idempotent): Debian packages,
    /// nightly rust-src, bpf-linker against LLVM 22, a bpffs mount.
    Setup,
    /// Build the agent (and with it the BPF programs).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Setup, then formatting, lints, unit, BPF and namespace integration tests.
    Test {
        /// Only tests whose name contains this.
        filter: Option<String>,
        /// Skip `cargo fmt --check` and clippy.
        #[arg(long)]
        no_lint: bool,
    },
    /// Setup, then the two-node NodePort / ClusterIP / headless walk-through.
    Demo,
    /// Setup, then benchmarks side by side: per-packet cost at 10 to 100,000
    /// Services, control-plane latency, end-to-end rates through namespaces
    /// against kube-proxy's iptables and nftables layouts; writes
    /// bench/results/<date>.md and its PNG plots.
    Bench {
        /// Per-packet cost up to 10,000 Services instead of 100,000; end to
        /// end at 10,000 Services only, without the nftables layout, in
        /// shorter rounds; written to bench/results/<date>-quick.md.
        #[arg(long)]
        quick: bool,
        /// Only these parts, comma-separated (packet, edge, control, scale,
        /// e2e, layouts, dns, ...); nothing is written to bench/results.
        #[arg(long)]
        only: Option<String>,
    },
    /// A long packet-fuzzing run of the programs against the reference model.
    Fuzz {
        /// Packets per program.
        #[arg(long, default_value_t = 5_000_000)]
        packets: u64,
        /// Stop after this many seconds per program, whatever the count.
        #[arg(long, default_value_t = 300)]
        seconds: u64,
        /// Seed (default: from the clock; printed for reproduction).
        #[arg(long)]
        seed: Option<u64>,
    },
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Runs a command in the workspace root, failing on a non-zero exit.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    eprintln!("+ {shown}");
    let status = cmd
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn build(release: bool) -> anyhow::Result<PathBuf> {
    let mut c = cargo();
    c.args(["build", "--bins"]);
    if release {
        c.arg("--release");
    }
    run(&mut c)?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    Ok(target.join(if release { "release" } else { "debug" }))
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::Setup => setup::setup(),
        Task::Build { release } => build(release).map(|_| ()),
        Task::Test { filter, no_lint } => {
            setup::setup()?;
            let bin_dir = build(false)?;
            if !no_lint {
                run(cargo().args(["fmt", "--all", "--", "--check"]))?;
                run(cargo().args(["clippy", "--all-targets", "--", "-D", "warnings"]))?;
            }
            let mut c = cargo();
            c.args(["test"])
                .env("SERVICE_AGENT_BIN", bin_dir.join("service-agent"));
            if let Some(f) = filter {
                c.arg(f);
            }
            run(&mut c)
        }
        Task::Fuzz {
            packets,
            seconds,
            seed,
        } => {
            setup::setup()?;
            let seed = seed.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
            eprintln!("fuzz seed {seed:#x} (rerun with --seed {seed})");
            run(cargo()
                .args([
                    "test",
                    "--release",
                    "-p",
                    "integration-tests",
                    "--test",
                    "fuzz",
                    "--",
                    "--nocapture",
                ])
                .env("FUZZ_PACKETS", packets.to_string())
                .env("FUZZ_SECONDS", seconds.to_string())
                .env("FUZZ_SEED", seed.to_string()))
        }
        Task::Bench { quick, only } => {
            setup::setup()?;
            run(cargo().args(["build", "--release", "--bins"]))?;
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| workspace_root().join("target"));
            let mut c = Command::new(target.join("release").join("bench"));
            // The end-to-end paths start this build's agent, not a stale one.
            c.env(
                "SERVICE_AGENT_BIN",
                target.join("release").join("service-agent"),
            );
            if quick {
                c.arg("--quick");
            }
            if let Some(only) = only {
                c.args(["--only", &only]);
            }
            run(&mut c)
        }
        Task::Demo => {
            setup::setup()?;
            let bin_dir = build(false)?;
            run(Command::new(bin_dir.join("demo"))
                .env("SERVICE_AGENT_BIN", bin_dir.join("service-agent")))
        }
    }
}
