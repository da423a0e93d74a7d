//! Pinned tc and XDP links: the programs stay attached while the agent is
//! down, and a restarted agent swaps its new program into the same links
//! atomically, so translation never stops across a restart.
use std::{
    ffi::CString,
    fs, io,
    mem::size_of,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use aya::programs::{
    SchedClassifier, TcAttachType, Xdp,
    links::{FdLink, PinnedLink},
    tc::SchedClassifierLink,
    xdp::XdpLink,
};

use super::XdpMode;

pub fn links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("links")
}

pub fn link_pin_path(pin_dir: &Path, iface: &str) -> PathBuf {
    links_dir(pin_dir).join(iface)
}

/// tc egress links live apart from the ingress ones: one interface has both.
pub fn egress_links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("egress-links")
}

/// XDP links live apart from the tc ones, one directory per mode: a link's
/// mode is fixed when it is made, and a restart in another mode must find
/// and replace the links of the old one.
pub fn xdp_links_dir(pin_dir: &Path, mode: XdpMode) -> PathBuf {
    pin_dir.join("xdp-links").join(mode.as_str())
}

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_TYPE_XDP: u32 = 6;
const BPF_LINK_TYPE_TCX: u32 = 11;

#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// The head of `struct bpf_link_info` and its `tcx` member (the `xdp`
/// member starts the same way, with the ifindex).
#[repr(C)]
#[derive(Default)]
struct TcxLinkInfo {
    type_: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    ifindex: u32,
    attach_type: u32,
    _rest: [u64; 6],
}

pub(super) fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size_of::<T>()) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A new descriptor of the BPF object pinned at `path`.
pub(super) fn open_pinned(path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut get = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        ..Default::default()
    };
    let fd = sys_bpf(BPF_OBJ_GET, &mut get)? as i32;
    // SAFETY: BPF_OBJ_GET returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The kernel's `struct bpf_link_info` of link `fd`, read into `T` (its
/// head and the member for the link's type; the kernel fills what fits).
pub(super) fn link_info<T: Default>(fd: &OwnedFd) -> io::Result<T> {
    let mut info = T::default();
    let mut attr = InfoAttr {
        bpf_fd: fd.as_raw_fd() as u32,
        info_len: size_of::<T>() as u32,
        info: &mut info as *mut T as u64,
    };
    sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(info)
}

/// The interface a pinned link of `link_type` is attached to; 0 once its
/// device is gone. (aya does not expose this part of the link info.)
fn pinned_ifindex_of(path: &Path, link_type: u32) -> io::Result<u32> {
    let info: TcxLinkInfo = link_info(&open_pinned(path)?)?;
    if info.type_ != link_type {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is a link of type {}, not {link_type}",
                path.display(),
                info.type_
            ),
        ));
    }
    Ok(info.ifindex)
}

fn private(pin: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(pin, fs::Permissions::from_mode(0o600))
}

/// The link pinned at `pin` when it is a `link_type` link on `ifindex`, to
/// adopt; a pin of another device (deleted, or an older one with the same
/// name) or type is removed, to be replaced.
fn adoptable(pin: &Path, link_type: u32, ifindex: u32) -> anyhow::Result<Option<FdLink>> {
    if !pin.exists() {
        return Ok(None);
    }
    match pinned_ifindex_of(pin, link_type) {
        Ok(i) if i == ifindex => Ok(Some(FdLink::from(PinnedLink::from_pin(pin)?))),
        _ => {
            fs::remove_file(pin)?;
            Ok(None)
        }
    }
}

/// Pins `fd` at `pin`, readable by root only. An adopted link is pinned
/// there already and pinning it again would fail: the old pin goes and our
/// own handle takes its place.
pub(super) fn pin_private(fd: FdLink, pin: &Path) -> anyhow::Result<PinnedLink> {
    if pin.exists() {
        fs::remove_file(pin)?;
    }
    let pinned = fd.pin(pin)?;
    private(pin)?;
    Ok(pinned)
}

/// Pins a link for `iface` at `pin`. `link` gets the link a previous agent
/// pinned there when it has `link_type` and the same device (to swap the
/// new program into: no moment without a program), or `None` to attach
/// anew. Returns the pinned link and whether it was adopted.
fn pinned_link(
    iface: &str,
    pin: &Path,
    link_type: u32,
    link: impl FnOnce(Option<FdLink>) -> anyhow::Result<FdLink>,
) -> anyhow::Result<(PinnedLink, bool)> {
    let ifindex = nix::net::if_::if_nametoindex(iface)?;
    let old = adoptable(pin, link_type, ifindex)?;
    let adopted = old.is_some();
    Ok((pin_private(link(old)?, pin)?, adopted))
}

/// Attaches `prog` to the tc hook `at` of `iface` through a link pinned at
/// `pin`, adopting the link a previous agent pinned there.
pub fn attach_pinned(
    prog: &mut SchedClassifier,
    iface: &str,
    at: TcAttachType,
    pin: &Path,
) -> anyhow::Result<(PinnedLink, bool)> {
    pinned_link(iface, pin, BPF_LINK_TYPE_TCX, |old| {
        let id = match old {
            Some(fd) => prog.attach_to_link(SchedClassifierLink::try_from(fd)?)?,
            None => prog.attach(iface, at)?,
        };
        Ok(prog.take_link(id)?.try_into()?)
    })
}

/// The XDP counterpart of `attach_pinned`: adopts a pinned XDP link of the
/// same mode on the same device by swapping the program in, else attaches
/// in `mode` and pins the new link.
pub fn attach_pinned_xdp(
    prog: &mut Xdp,
    iface: &str,
    mode: XdpMode,
    pin: &Path,
) -> anyhow::Result<(PinnedLink, bool)> {
    let hint = if mode == XdpMode::Native {
        "; the driver may lack native XDP: try --xdp generic"
    } else {
        ""
    };
    pinned_link(iface, pin, BPF_LINK_TYPE_XDP, |old| {
        let id = match old {
            Some(fd) => prog.attach_to_link(XdpLink::try_from(fd)?)?,
            None => prog
                .attach(iface, mode.aya())
                .map_err(|e| anyhow::anyhow!("{e} (in {} mode{hint})", mode.as_str()))?,
        };
        // A netlink attachment (kernels without XDP links) cannot be pinned
        // and would vanish with this process: refuse it rather than pretend.
        prog.take_link(id)?.try_into().map_err(|_| {
            anyhow::anyhow!("the kernel attached XDP without a bpf link; links need Linux 5.9")
        })
    })
}
