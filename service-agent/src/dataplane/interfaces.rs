//! Finding the interfaces to attach to, in the agent's network namespace.
use std::net::Ipv4Addr;

/// Shell-style match with `*` and `?`, as used by --pod-iface.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match (p.first(), n.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], n) || (!n.is_empty() && go(p, &n[1..])),
            (Some(b'?'), Some(_)) => go(&p[1..], &n[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &n[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

/// Interface names of this network namespace (through netlink, not /sys,
/// which may belong to another namespace).
pub fn interface_names() -> std::io::Result<Vec<String>> {
    let list = nix::net::if_::if_nameindex().map_err(std::io::Error::from)?;
    Ok(list
        .iter()
        .filter_map(|i| i.name().to_str().ok().map(str::to_string))
        .collect())
}

/// IPv4 addresses assigned in this namespace, loopback excluded: the
/// addresses NodePorts answer on.
pub fn node_addresses() -> std::io::Result<Vec<Ipv4Addr>> {
    addresses(|_| true)
}

/// IPv4 addresses of one interface, in the kernel's order.
pub fn interface_addresses(iface: &str) -> std::io::Result<Vec<Ipv4Addr>> {
    addresses(|name| name == iface)
}

fn addresses(keep: impl Fn(&str) -> bool) -> std::io::Result<Vec<Ipv4Addr>> {
    let mut out: Vec<Ipv4Addr> = nix::ifaddrs::getifaddrs()
        .map_err(std::io::Error::from)?
        .filter(|ifa| keep(&ifa.interface_name))
        .filter_map(|ifa| {
            let a = ifa.address?;
            let sin = a.as_sockaddr_in()?;
            Some(sin.ip())
        })
        .filter(|a| !a.is_loopback())
        .collect();
    out.sort();
    out.dedup();
    Ok(out)
}

/// IPv6 addresses assigned in this namespace that NodePorts answer on:
/// loopback, link-local and multicast excluded (a link-local address names
/// a node only on one link).
pub fn node_addresses6() -> std::io::Result<Vec<std::net::Ipv6Addr>> {
    addresses6(|_| true)
}

/// `node_addresses6` of one interface.
pub fn interface_addresses6(iface: &str) -> std::io::Result<Vec<std::net::Ipv6Addr>> {
    addresses6(|name| name == iface)
}

fn addresses6(keep: impl Fn(&str) -> bool) -> std::io::Result<Vec<std::net::Ipv6Addr>> {
    let mut out: Vec<std::net::Ipv6Addr> = nix::ifaddrs::getifaddrs()
        .map_err(std::io::Error::from)?
        .filter(|ifa| keep(&ifa.interface_name))
        .filter_map(|ifa| Some(ifa.address?.as_sockaddr_in6()?.ip()))
        .filter(usable_node_address6)
        .collect();
    out.sort();
    out.dedup();
    Ok(out)
}

/// Whether an IPv6 address can name this node to others: loopback,
/// link-local (it names the node on one link only), multicast and the
/// unspecified address cannot.
pub fn usable_node_address6(a: &std::net::Ipv6Addr) -> bool {
    !a.is_loopback() && !a.is_unicast_link_local() && !a.is_multicast() && !a.is_unspecified()
}

/// Link and address changes of this network namespace, from rtnetlink
/// multicast groups: a pod veth appearing wakes the agent at once instead of
/// at the next poll. The messages are only a trigger; the agent then lists
/// the interfaces itself (level-triggered), so a lost message costs nothing.
pub struct LinkEvents {
    fd: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
}

impl LinkEvents {
    pub fn subscribe() -> std::io::Result<Self> {
        use nix::sys::socket::{
            AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, socket,
        };
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )?;
        let groups =
            (libc::RTMGRP_LINK | libc::RTMGRP_IPV4_IFADDR | libc::RTMGRP_IPV6_IFADDR) as u32;
        bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &NetlinkAddr::new(0, groups),
        )?;
        // SAFETY: the OwnedFd moves into the AsyncFd and stays open, and the
        // same descriptor, for as long as the AsyncFd lives.
        let fd = unsafe { tokio::io::unix::AsyncFd::register(fd) }
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(Self { fd })
    }

    /// Waits for the next batch of link or address messages.
    pub async fn changed(&self) -> std::io::Result<()> {
        let mut buf = [0u8; 16 * 1024];
        loop {
            let mut guard = self.fd.readable().await?;
            let fd = std::os::fd::AsRawFd::as_raw_fd(guard.get_inner());
            let mut got = false;
            // Drain whatever is queued; one wake-up covers the whole burst.
            loop {
                match nix::sys::socket::recv(fd, &mut buf, nix::sys::socket::MsgFlags::empty()) {
                    Ok(0) => break,
                    Ok(_) => got = true,
                    Err(nix::errno::Errno::EAGAIN) => break,
                    // Overrun: messages were lost, which a relist makes good.
                    Err(nix::errno::Errno::ENOBUFS) => got = true,
                    Err(e) => return Err(e.into()),
                }
            }
            guard.clear_ready();
            if got {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn globs() {
        assert!(glob_match("veth*", "veth1a2b"));
        assert!(glob_match("*", "eth0"));
        assert!(glob_match("lxc?", "lxc1"));
        assert!(!glob_match("lxc?", "lxc12"));
        assert!(!glob_match("veth*", "eth0"));
        assert!(glob_match("eth0", "eth0"));
    }
}
