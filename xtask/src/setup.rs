//! `cargo xtask setup`: brings a fresh machine to what the build and the
//! tests need, and does nothing on a machine that already has it.
use std::process::Command;

use anyhow::{Context as _, bail};

use crate::run;

/// Debian packages: LLVM 22 for bpf-linker, bpftool to inspect maps,
/// iproute2/util-linux/procps for namespaces, curl for the demo's client,
/// iptables/nftables for side-by-side comparisons, ethtool to make test
/// veths behave like wires for XDP (complete checksums, NAPI on the peer),
/// dig (bind9-dnsutils) for the DNS tests and the demo, ping (iputils-ping)
/// for the IPv6 neighbour-discovery test.
const DEB_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "bpftool",
    "iproute2",
    "util-linux",
    "procps",
    "curl",
    "iptables",
    "nftables",
    "ethtool",
    "bind9-dnsutils",
    "iputils-ping",
    // The bench's PNG plots render text with this TTF, loaded from its
    // file (no fontconfig).
    "fonts-dejavu-core",
];

const BPF_LINKER_VERSION: &str = "0.13";
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

fn deb_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn output_of(cmd: &str, args: &[&str]) -> Option<String> {
    let o = Command::new(cmd).args(args).output().ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
}

fn install_debs() -> anyhow::Result<()> {
    let missing: Vec<&str> = DEB_PACKAGES
        .iter()
        .copied()
        .filter(|p| !deb_installed(p))
        .collect();
    if missing.is_empty() {
        eprintln!("setup: Debian packages present");
        return Ok(());
    }
    eprintln!("setup: installing {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-q"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn install_rust_src() -> anyhow::Result<()> {
    let have = output_of(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )
    .context("the nightly toolchain is needed for the BPF build (rustup toolchain list)")?;
    if have.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("setup: nightly rust-src present");
        return Ok(());
    }
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn install_bpf_linker() -> anyhow::Result<()> {
    if let Some(v) = output_of("bpf-linker", &["--version"])
        && v.contains(&format!("bpf-linker {BPF_LINKER_VERSION}"))
    {
        eprintln!("setup: {}", v.trim());
        return Ok(());
    }
    eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about 4 minutes)");
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            &format!("~{BPF_LINKER_VERSION}"),
            "--no-default-features",
            "--features",
            "llvm-22",
            "--force",
        ])
        .env("LLVM_PREFIX", "/usr/lib/llvm-22"))
}

fn mount_bpffs() -> anyhow::Result<()> {
    let path = "/sys/fs/bpf";
    let is_bpffs = nix_statfs(path).is_some_and(|m| m == BPF_FS_MAGIC);
    if is_bpffs {
        eprintln!("setup: bpffs mounted on {path}");
        return Ok(());
    }
    std::fs::create_dir_all(path)?;
    run(Command::new("mount").args(["-t", "bpf", "bpf", path]))
}

/// The filesystem magic of `path`, through `stat -f` (no libc binding needed here).
fn nix_statfs(path: &str) -> Option<i64> {
    let out = output_of("stat", &["-f", "-c", "%t", path])?;
    i64::from_str_radix(out.trim(), 16).ok()
}

pub fn setup() -> anyhow::Result<()> {
    if output_of("id", &["-u"]).is_some_and(|u| u.trim() != "0") {
        bail!("setup installs packages and mounts bpffs: run it as root");
    }
    install_debs()?;
    install_rust_src()?;
    install_bpf_linker()?;
    mount_bpffs()?;
    Ok(())
}
