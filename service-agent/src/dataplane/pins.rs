//! The pin directory: where the maps live across agent restarts.
use std::{
    fs,
    os::unix::fs::{DirBuilderExt, PermissionsExt},
    path::{Path, PathBuf},
};

use aya::maps::MapInfo;
use service_common::*;

/// statfs magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe4a11;

#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(
        "{0} is not on a bpffs mount; pins there would not outlive the agent. Mount one (mount -t bpf bpf /sys/fs/bpf) or choose --pin-dir under it. Inside `ip netns exec` /sys is remounted: enter only the network namespace (nsenter --net=...)"
    )]
    NotBpffs(PathBuf),
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{0} is writable by group or others; refusing to use it (chmod 700)")]
    TooOpen(PathBuf),
}

/// Creates the pin directory (0700) and checks it is on bpffs.
pub fn prepare_pin_dir(dir: &Path) -> Result<(), PinError> {
    let io = |error| PinError::Io {
        path: dir.to_path_buf(),
        error,
    };
    let parent = dir.parent().unwrap_or(Path::new("/"));
    let probe = if dir.exists() { dir } else { parent };
    let st = nix::sys::statfs::statfs(probe).map_err(|e| io(e.into()))?;
    if st.filesystem_type().0 as i64 != BPF_FS_MAGIC {
        return Err(PinError::NotBpffs(dir.to_path_buf()));
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io)?;
    let mode = fs::metadata(dir).map_err(io)?.permissions().mode();
    if mode & 0o022 != 0 {
        return Err(PinError::TooOpen(dir.to_path_buf()));
    }
    Ok(())
}

pub fn map_pin_path(dir: &Path, map: &str) -> PathBuf {
    dir.join(map)
}

/// Key and value sizes each map must have for this agent's layout.
pub fn expected_sizes(map: &str) -> Option<(u32, u32)> {
    use core::mem::size_of;
    let s = |k: usize, v: usize| Some((k as u32, v as u32));
    match map {
        MAP_SERVICES => s(size_of::<ServiceKey>(), size_of::<ServiceValue>()),
        MAP_BACKENDS => s(4, size_of::<Backend>()),
        MAP_CONNTRACK => s(size_of::<CtKey>(), size_of::<CtValue>()),
        MAP_AFFINITY => s(size_of::<AffinityKey>(), size_of::<AffinityValue>()),
        MAP_AFFINITY_MATCH => s(size_of::<AffinityMatchKey>(), 4),
        MAP_NODE_ADDRS => s(4, 4),
        MAP_SVC_STATS => s(4, size_of::<SvcStats>()),
        MAP_REASONS => s(4, 8),
        MAP_META => s(4, 8),
        MAP_SOURCE_RANGES => s(4 + size_of::<SourceRange>(), 4),
        MAP_FRAGMENTS => s(size_of::<FragKey>(), size_of::<FragValue>()),
        // struct bpf_devmap_val: ifindex and a program fd/id.
        MAP_XDP_EGRESS => s(4, 8),
        MAP_SOCK_REVNAT => s(size_of::<SockRevKey>(), size_of::<SockRevValue>()),
        MAP_FLOOD => s(4, size_of::<FloodWindow>()),
        MAP_MAGLEV => s(4, size_of::<MaglevTable>()),
        MAP_SERVICES6 => s(size_of::<ServiceKey6>(), size_of::<ServiceValue>()),
        MAP_BACKENDS6 => s(4, size_of::<Backend6>()),
        MAP_CONNTRACK6 => s(size_of::<CtKey6>(), size_of::<CtValue6>()),
        MAP_AFFINITY6 => s(size_of::<AffinityKey6>(), size_of::<AffinityValue>()),
        MAP_NODE_ADDRS6 => s(16, 4),
        MAP_SOURCE_RANGES6 => s(4 + size_of::<SourceRange6>(), 4),
        MAP_FRAGMENTS6 => s(size_of::<FragKey6>(), size_of::<FragValue6>()),
        MAP_SOCK_REVNAT6 => s(size_of::<SockRevKey6>(), size_of::<SockRevValue6>()),
        _ => None,
    }
}

/// Why the pinned maps cannot be adopted as they are.
pub fn incompatible_pins(dir: &Path, max_entries: impl Fn(&str) -> u32) -> Option<String> {
    for name in ALL_MAPS {
        let path = map_pin_path(dir, name);
        if !path.exists() {
            continue;
        }
        let info = match MapInfo::from_pin(&path) {
            Ok(i) => i,
            Err(e) => return Some(format!("{}: unreadable pin: {e}", path.display())),
        };
        let (k, v) = expected_sizes(name).expect("every map has a layout");
        if info.key_size() != k || info.value_size() != v {
            return Some(format!(
                "{name}: pinned key/value sizes {}/{} differ from this agent's {k}/{v}",
                info.key_size(),
                info.value_size()
            ));
        }
        let want = max_entries(name);
        if info.max_entries() != want {
            return Some(format!(
                "{name}: pinned with {} entries, configured for {want}",
                info.max_entries()
            ));
        }
    }
    None
}

/// The directories under a pin directory that hold pinned links (removing
/// a link's pin detaches it): tc ingress, tc egress, XDP (one directory per
/// mode below it).
pub const LINK_DIRS: [&str; 3] = ["links", "egress-links", "xdp-links"];

/// Removes the link pins below `dir` and `dir` itself; pins are files,
/// subdirectories hold more of them.
fn remove_link_tree(dir: &Path) -> std::io::Result<()> {
    for e in fs::read_dir(dir)? {
        let path = e?.path();
        if path.is_dir() {
            remove_link_tree(&path)?;
        } else {
            fs::remove_file(path)?;
        }
    }
    fs::remove_dir(dir)
}

/// Removes every pin this agent makes: links first (which detaches the
/// programs), then maps, then the directory itself.
pub fn remove_pins(dir: &Path) -> std::io::Result<()> {
    super::cgroup::detach_all(dir);
    // Only the agent's own link directories and map pins are removed, so a
    // mistaken --pin-dir (bpffs' root, another tool's directory) loses
    // nothing that is not ours, and its removal then fails as not empty.
    for links in LINK_DIRS {
        let links = dir.join(links);
        if links.exists() {
            remove_link_tree(&links)?;
        }
    }
    for name in ALL_MAPS {
        let p = map_pin_path(dir, name);
        if p.exists() {
            fs::remove_file(p)?;
        }
    }
    if dir.exists() {
        fs::remove_dir(dir)?;
    }
    Ok(())
}
