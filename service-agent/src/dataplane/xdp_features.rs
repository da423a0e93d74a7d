//! What a device can do with XDP frames, from the kernel's `netdev` generic
//! netlink family. The agent needs one bit of it: whether frames can be
//! transmitted out of the device from XDP (`NETDEV_XDP_ACT_NDO_XMIT`). A
//! veth has it only while its peer can receive them (the peer has an XDP
//! program or GRO on); frames sent out of a device without it are dropped
//! by the kernel without a trace, so such devices never go into XDP_EGRESS.
use std::{io, os::fd::AsRawFd as _};

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send,
    socket,
};

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const NETDEV_CMD_DEV_GET: u8 = 1;
const NETDEV_A_DEV_IFINDEX: u16 = 1;
const NETDEV_A_DEV_XDP_FEATURES: u16 = 3;
/// `NETDEV_XDP_ACT_NDO_XMIT`: the device accepts XDP frames for transmission.
pub const XDP_ACT_NDO_XMIT: u64 = 1 << 2;

const NLM_F_REQUEST: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_HDRLEN: usize = 16;
const GENL_HDRLEN: usize = 4;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn request(family: u16, cmd: u8, attr_type: u16, payload: &[u8]) -> Vec<u8> {
    let attr_len = 4 + payload.len();
    let len = NLMSG_HDRLEN + GENL_HDRLEN + align4(attr_len);
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&family.to_ne_bytes());
    m.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it
    m.extend_from_slice(&[cmd, 1, 0, 0]);
    m.extend_from_slice(&(attr_len as u16).to_ne_bytes());
    m.extend_from_slice(&attr_type.to_ne_bytes());
    m.extend_from_slice(payload);
    m.resize(len, 0);
    m
}

/// Sends one request and returns the attributes of its (single) answer.
fn ask(msg: &[u8]) -> io::Result<Vec<(u16, Vec<u8>)>> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkGeneric,
    )?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
    send(fd.as_raw_fd(), msg, MsgFlags::empty())?;
    let mut buf = vec![0u8; 8192];
    let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
    let buf = &buf[..n];
    if n < NLMSG_HDRLEN {
        return Err(io::Error::other("short netlink answer"));
    }
    let kind = u16::from_ne_bytes([buf[4], buf[5]]);
    if kind == NLMSG_ERROR {
        let errno = i32::from_ne_bytes(buf[16..20].try_into().unwrap_or_default());
        return Err(io::Error::from_raw_os_error(-errno));
    }
    let mut attrs = vec![];
    let mut off = NLMSG_HDRLEN + GENL_HDRLEN;
    let end = (u32::from_ne_bytes(buf[0..4].try_into().unwrap_or_default()) as usize).min(n);
    while off + 4 <= end {
        let len = u16::from_ne_bytes([buf[off], buf[off + 1]]) as usize;
        let ty = u16::from_ne_bytes([buf[off + 2], buf[off + 3]]) & 0x3fff;
        if len < 4 || off + len > end {
            break;
        }
        attrs.push((ty, buf[off + 4..off + len].to_vec()));
        off += align4(len);
    }
    Ok(attrs)
}

fn family_id(name: &str) -> io::Result<u16> {
    let mut n = name.as_bytes().to_vec();
    n.push(0);
    let attrs = ask(&request(
        GENL_ID_CTRL,
        CTRL_CMD_GETFAMILY,
        CTRL_ATTR_FAMILY_NAME,
        &n,
    ))?;
    attrs
        .iter()
        .find(|(t, v)| *t == CTRL_ATTR_FAMILY_ID && v.len() >= 2)
        .map(|(_, v)| u16::from_ne_bytes([v[0], v[1]]))
        .ok_or_else(|| io::Error::other(format!("no generic netlink family {name}")))
}

/// The `NETDEV_XDP_ACT_*` bits of device `ifindex` (Linux 6.3 and later).
pub fn xdp_features(ifindex: u32) -> io::Result<u64> {
    let family = family_id("netdev")?;
    let attrs = ask(&request(
        family,
        NETDEV_CMD_DEV_GET,
        NETDEV_A_DEV_IFINDEX,
        &ifindex.to_ne_bytes(),
    ))?;
    attrs
        .iter()
        .find(|(t, v)| *t == NETDEV_A_DEV_XDP_FEATURES && v.len() >= 8)
        .map(|(_, v)| u64::from_ne_bytes(v[..8].try_into().unwrap_or_default()))
        .ok_or_else(|| io::Error::other("the kernel did not report XDP features"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_reports_features() {
        // Any device answers; loopback is in every namespace. Kernels before
        // 6.3 have no netdev family, which is an error, not a panic.
        match xdp_features(1) {
            Ok(bits) => assert_eq!(bits & !0x7f, 0, "unknown bits {bits:#x}"),
            Err(e) => eprintln!("netdev family unavailable: {e}"),
        }
    }

    #[test]
    fn request_layout() {
        let m = request(0x20, 1, 1, &7u32.to_ne_bytes());
        assert_eq!(m.len(), 28);
        assert_eq!(u32::from_ne_bytes(m[0..4].try_into().unwrap()), 28);
        assert_eq!(&m[16..20], &[1, 1, 0, 0]);
        assert_eq!(u16::from_ne_bytes([m[20], m[21]]), 8);
    }
}
