//! The socket hooks' attachment: the cgroup v2 directory whose processes
//! (and their descendants') sockets are translated at connect() time, with
//! pinned links so a restarted agent swaps its programs in without a gap;
//! and `--socket-lb`, whose sockets of that cgroup they translate.
use std::{
    collections::VecDeque,
    fs, io,
    mem::size_of,
    os::{
        fd::{AsFd as _, AsRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow};
use aya::programs::{CgroupAttachMode, CgroupSock, CgroupSockAddr, ProgramFd, links::FdLink};
use service_common::{
    META_NETNS_COOKIE, META_SOCKET_LB, PROG_SOCK_RELEASE, SOCK_HOOKS, SOCKET_LB_HOST,
    SOCKET_LB_OFF, SOCKET_LB_PODS,
};

use super::links::{link_info, open_pinned, pin_private, sys_bpf};

/// Where the socket hooks go, from `--cgroup`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CgroupTarget {
    /// `--cgroup none`: no socket hooks; links a previous agent pinned are removed.
    Off,
    Dir(PathBuf),
}

impl CgroupTarget {
    /// `none`, a directory, or (no flag) the cgroup2 mount of this machine.
    pub fn from_flag(flag: Option<&Path>) -> anyhow::Result<Self> {
        match flag {
            Some(p) if p.as_os_str() == "none" => Ok(Self::Off),
            Some(p) => Ok(Self::Dir(p.to_path_buf())),
            None => Ok(Self::Dir(cgroup2_mount(&fs::read_to_string(
                "/proc/mounts",
            )?)?)),
        }
    }
}

/// `--socket-lb`: whose sockets in the hooks' cgroup are translated at
/// connect()/sendto() time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SocketLb {
    /// The node's own: sockets of the agent's network namespace.
    #[default]
    Host,
    /// Those and pods' (sockets of any other network namespace): a pod's
    /// connection to a Service goes straight to its backend, and tc on the
    /// pod's veth sees only backend addresses. Connected UDP and frontends
    /// with source ranges stay with tc (`sock_passed_to_tc`).
    Pods,
    /// None: the hooks are detached, as with `--cgroup none`.
    Off,
}

impl SocketLb {
    pub fn as_str(self) -> &'static str {
        match self {
            SocketLb::Host => "host",
            SocketLb::Pods => "pods",
            SocketLb::Off => "off",
        }
    }

    /// Its META_SOCKET_LB value.
    pub fn meta_value(self) -> u64 {
        match self {
            SocketLb::Host => SOCKET_LB_HOST,
            SocketLb::Pods => SOCKET_LB_PODS,
            SocketLb::Off => SOCKET_LB_OFF,
        }
    }
}

/// Tells the programs whose sockets to translate: the agent's namespace
/// cookie and the mode. Written before the hooks are attached (or swapped
/// in), so no hook runs with a previous agent's mode after this one's start.
pub fn set_mode(
    meta: &mut aya::maps::Array<aya::maps::MapData, u64>,
    mode: SocketLb,
) -> anyhow::Result<()> {
    let cookie = netns_cookie().context("reading SO_NETNS_COOKIE")?;
    meta.set(META_NETNS_COOKIE, cookie, 0)
        .context("writing META_NETNS_COOKIE")?;
    meta.set(META_SOCKET_LB, mode.meta_value(), 0)
        .context("writing META_SOCKET_LB")?;
    Ok(())
}

/// The first cgroup2 mount point in a /proc/mounts text (`/sys/fs/cgroup`
/// on unified hosts, `/sys/fs/cgroup/unified` on hybrid ones).
pub fn cgroup2_mount(mounts: &str) -> anyhow::Result<PathBuf> {
    mounts
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            // /proc/mounts escapes blanks in paths as octal.
            (fstype == "cgroup2").then(|| PathBuf::from(dir.replace("\\040", " ")))
        })
        .ok_or_else(|| {
            anyhow!("no cgroup2 mount in /proc/mounts; pass --cgroup PATH or --cgroup none")
        })
}

pub fn links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("cgroup-links")
}

const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_TYPE_CGROUP: u32 = 3;

/// The release hook's attach point (its pin name): it removes a closed
/// socket's SOCK_REVNAT entry.
const RELEASE_HOOK: &str = "sock_release";

/// Every hook's pin name: the socket-address hooks and the release hook.
fn all_hooks() -> impl Iterator<Item = &'static str> {
    SOCK_HOOKS
        .iter()
        .map(|(_, hook)| *hook)
        .chain([RELEASE_HOOK])
}

/// The kernel's attach type of each hook (enum bpf_attach_type).
fn attach_type_of(hook: &str) -> u32 {
    match hook {
        "connect4" => 10,
        "sendmsg4" => 14,
        "recvmsg4" => 19,
        "getpeername4" => 29,
        "connect6" => 11,
        "sendmsg6" => 15,
        "recvmsg6" => 20,
        "getpeername6" => 30,
        "sock_release" => 34,
        _ => u32::MAX,
    }
}

/// The head of `struct bpf_link_info` and its `cgroup` member.
#[repr(C)]
#[derive(Default)]
struct CgroupLinkInfo {
    type_: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    cgroup_id: u64,
    attach_type: u32,
    _rest: [u32; 11],
}

#[repr(C)]
#[derive(Default)]
struct LinkUpdateAttr {
    link_fd: u32,
    new_prog_fd: u32,
    flags: u32,
    old_prog_fd: u32,
}

/// A socket hook as pinned: what it is attached to and which program runs.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HookLink {
    pub hook: String,
    pub cgroup_id: u64,
    pub link_id: u32,
    pub prog_id: u32,
}

fn cgroup_link_info(fd: &OwnedFd) -> io::Result<CgroupLinkInfo> {
    let info: CgroupLinkInfo = link_info(fd)?;
    if info.type_ != BPF_LINK_TYPE_CGROUP {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a link of type {}, not a cgroup link", info.type_),
        ));
    }
    Ok(info)
}

/// The socket hooks pinned in `pin_dir`, as the kernel reports them.
pub fn pinned_hooks(pin_dir: &Path) -> Vec<HookLink> {
    let dir = links_dir(pin_dir);
    all_hooks()
        .filter_map(|hook| {
            let fd = open_pinned(&dir.join(hook)).ok()?;
            let info = cgroup_link_info(&fd).ok()?;
            Some(HookLink {
                hook: hook.to_string(),
                cgroup_id: info.cgroup_id,
                link_id: info.id,
                prog_id: info.prog_id,
            })
        })
        .collect()
}

/// The directory of cgroup `id` under `root` (a cgroup2 mount: a cgroup's
/// id is its directory's inode number), searched breadth first and bounded.
pub fn cgroup_path(root: &Path, id: u64) -> Option<PathBuf> {
    let mut queue = VecDeque::from([root.to_path_buf()]);
    let mut seen = 0;
    while let Some(dir) = queue.pop_front() {
        if fs::metadata(&dir).is_ok_and(|m| m.ino() == id) {
            return Some(dir);
        }
        seen += 1;
        if seen > 100_000 {
            return None;
        }
        for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                queue.push_back(e.path());
            }
        }
    }
    None
}

/// The two kinds of cgroup program the hooks are: socket-address hooks
/// and the release hook.
trait CgroupHook {
    fn program_fd(&self) -> anyhow::Result<&ProgramFd>;
    /// Attaches to `cgroup` and gives back the link to pin.
    fn attach_link(&mut self, cgroup: &fs::File) -> anyhow::Result<FdLink>;
}

// aya gives both program types the same methods, but no trait of them.
macro_rules! cgroup_hook {
    ($($ty:ty),*) => {$(
        impl CgroupHook for $ty {
            fn program_fd(&self) -> anyhow::Result<&ProgramFd> {
                Ok(self.fd()?)
            }

            fn attach_link(&mut self, cgroup: &fs::File) -> anyhow::Result<FdLink> {
                let id = self.attach(cgroup, CgroupAttachMode::Single)?;
                Ok(self.take_link(id)?.try_into()?)
            }
        }
    )*};
}

cgroup_hook!(CgroupSockAddr, CgroupSock);

/// Attaches every socket hook of `ebpf` to `cgroup` through links pinned
/// in `pin_dir`. A pinned link already on this cgroup gets the new program
/// swapped in (sockets are translated throughout); one on another cgroup
/// is removed, which detaches it. Returns each hook and whether it was adopted.
pub fn attach(
    ebpf: &mut aya::Ebpf,
    pin_dir: &Path,
    cgroup: &Path,
) -> anyhow::Result<Vec<(&'static str, bool)>> {
    let dir = links_dir(pin_dir);
    {
        use std::os::unix::fs::DirBuilderExt as _;
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .with_context(|| dir.display().to_string())?;
    }
    let cg = fs::File::open(cgroup).with_context(|| format!("--cgroup {}", cgroup.display()))?;
    let meta = cg.metadata()?;
    if !meta.is_dir()
        || nix::sys::statfs::fstatfs(&cg)?.filesystem_type()
            != nix::sys::statfs::CGROUP2_SUPER_MAGIC
    {
        anyhow::bail!(
            "--cgroup {}: not a cgroup v2 directory (see `grep cgroup2 /proc/mounts`)",
            cgroup.display()
        );
    }
    let mut out = vec![];
    // The release hook first: no socket translated from here on closes
    // without its entry going.
    let hooks = [(PROG_SOCK_RELEASE, RELEASE_HOOK)]
        .into_iter()
        .chain(SOCK_HOOKS);
    for (prog_name, hook) in hooks {
        let p = ebpf
            .program_mut(prog_name)
            .ok_or_else(|| anyhow!("program {prog_name} missing from the BPF object"))?;
        let hook_prog: &mut dyn CgroupHook = if hook == RELEASE_HOOK {
            <&mut CgroupSock>::try_from(p)?
        } else {
            <&mut CgroupSockAddr>::try_from(p)?
        };
        let adopted = attach_hook(hook_prog, &dir.join(hook), &cg, meta.ino(), hook)
            .with_context(|| format!("attaching {prog_name} to {}", cgroup.display()))?;
        out.push((hook, adopted));
    }
    Ok(out)
}

/// Adopts the link pinned at `pin` (see `adopt`) or attaches `prog` anew
/// and pins its link there; returns whether it adopted.
fn attach_hook(
    prog: &mut dyn CgroupHook,
    pin: &Path,
    cgroup: &fs::File,
    cgroup_id: u64,
    hook: &str,
) -> anyhow::Result<bool> {
    let adopted = adopt(prog, pin, cgroup_id, attach_type_of(hook))
        .with_context(|| format!("adopting {}", pin.display()))?;
    if !adopted {
        pin_private(prog.attach_link(cgroup)?, pin)?;
    }
    Ok(adopted)
}

/// Swaps `prog` into the link pinned at `pin` when that link is a cgroup
/// link of `attach_type` on cgroup `cgroup_id`; removes any other pin there.
fn adopt(
    prog: &dyn CgroupHook,
    pin: &Path,
    cgroup_id: u64,
    attach_type: u32,
) -> anyhow::Result<bool> {
    if !pin.exists() {
        return Ok(false);
    }
    let fd = open_pinned(pin)?;
    match cgroup_link_info(&fd) {
        Ok(i) if i.cgroup_id == cgroup_id && i.attach_type == attach_type => {
            let mut attr = LinkUpdateAttr {
                link_fd: fd.as_raw_fd() as u32,
                new_prog_fd: prog.program_fd()?.as_fd().as_raw_fd() as u32,
                ..Default::default()
            };
            sys_bpf(BPF_LINK_UPDATE, &mut attr).context("BPF_LINK_UPDATE")?;
            Ok(true)
        }
        _ => {
            drop(fd);
            // The last reference: the old attachment goes with the pin.
            fs::remove_file(pin)?;
            Ok(false)
        }
    }
}

/// Removes the pinned socket hooks (detaching them); returns those removed.
pub fn detach_all(pin_dir: &Path) -> Vec<String> {
    let dir = links_dir(pin_dir);
    let mut gone = vec![];
    for hook in all_hooks() {
        if fs::remove_file(dir.join(hook)).is_ok() {
            gone.push(hook.to_string());
        }
    }
    let _ = fs::remove_dir(&dir);
    gone
}

/// The cookie of this process's network namespace (SO_NETNS_COOKIE), the
/// value bpf_get_netns_cookie() returns for sockets of the same namespace.
pub fn netns_cookie() -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // Unbound: binding needs an address, and a namespace whose loopback is
    // still down has none.
    let s = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: the buffer and its length describe `cookie`.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            &mut cookie as *mut u64 as *mut libc::c_void,
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// `list`'s lines on the socket hooks: attached or not, and where.
pub fn render(pin_dir: &Path) -> String {
    let hooks = pinned_hooks(pin_dir);
    if hooks.is_empty() {
        return "\nhost socket hooks: not attached\n".to_string();
    }
    let root = fs::read_to_string("/proc/mounts")
        .ok()
        .and_then(|m| cgroup2_mount(&m).ok());
    let mut out = String::from("\nhost socket hooks:\n");
    for h in hooks {
        let place = root
            .as_deref()
            .and_then(|r| cgroup_path(r, h.cgroup_id))
            .map_or(format!("cgroup id {}", h.cgroup_id), |p| {
                p.display().to_string()
            });
        out.push_str(&format!(
            "  {:<13} {place} (link {}, prog {})\n",
            h.hook, h.link_id, h.prog_id
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_on_hybrid_and_unified_hosts() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs ro 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nosuid 0 0\n\
                      cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n";
        assert_eq!(
            cgroup2_mount(hybrid).unwrap(),
            PathBuf::from("/sys/fs/cgroup/unified")
        );
        let unified = "cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n";
        assert_eq!(
            cgroup2_mount(unified).unwrap(),
            PathBuf::from("/sys/fs/cgroup")
        );
        assert!(cgroup2_mount("proc /proc proc rw 0 0\n").is_err());
    }

    #[test]
    fn none_turns_the_hooks_off() {
        assert_eq!(
            CgroupTarget::from_flag(Some(Path::new("none"))).unwrap(),
            CgroupTarget::Off
        );
        assert_eq!(
            CgroupTarget::from_flag(Some(Path::new("/x"))).unwrap(),
            CgroupTarget::Dir("/x".into())
        );
    }
}
