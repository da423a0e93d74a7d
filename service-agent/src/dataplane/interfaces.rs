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
