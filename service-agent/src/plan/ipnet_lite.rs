//! A CIDR of either family for allow-lists and source ranges; two fields
//! do not warrant a crate.
use std::{
    net::{AddrParseError, IpAddr, Ipv4Addr, Ipv6Addr},
    num::ParseIntError,
    str::FromStr,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpNet {
    pub addr: IpAddr,
    pub prefix: u8,
}

/// Why a text is not a CIDR; each names the text given.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseNetError {
    #[error("{input}: {source}")]
    Address {
        input: String,
        source: AddrParseError,
    },
    #[error("{input}: {source}")]
    Prefix {
        input: String,
        source: ParseIntError,
    },
    #[error("{0}: prefix longer than the address (32 bits for IPv4, 128 for IPv6)")]
    PrefixTooLong(String),
}

fn mask(bits: u32, prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        (u128::MAX << (bits - prefix as u32)) & (u128::MAX >> (128 - bits))
    }
}

/// The address as a number and its width in bits.
fn bits_of(a: IpAddr) -> (u128, u32) {
    match a {
        IpAddr::V4(a) => (u32::from(a) as u128, 32),
        IpAddr::V6(a) => (u128::from(a), 128),
    }
}

impl IpNet {
    /// The network address (host bits cleared).
    pub fn network(&self) -> IpAddr {
        let (n, bits) = bits_of(self.addr);
        let net = n & mask(bits, self.prefix);
        match self.addr {
            IpAddr::V4(_) => Ipv4Addr::from(net as u32).into(),
            IpAddr::V6(_) => Ipv6Addr::from(net).into(),
        }
    }

    /// Whether `ip` is in the range; never for an address of the other family.
    pub fn contains(&self, ip: impl Into<IpAddr>) -> bool {
        let ip = ip.into();
        if ip.is_ipv6() != self.addr.is_ipv6() {
            return false;
        }
        let (n, bits) = bits_of(ip);
        let m = mask(bits, self.prefix);
        n & m == bits_of(self.addr).0 & m
    }

    pub fn is_ipv6(&self) -> bool {
        self.addr.is_ipv6()
    }
}

impl std::fmt::Display for IpNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for IpNet {
    type Err = ParseNetError;
    fn from_str(s: &str) -> Result<Self, ParseNetError> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().map_err(|source| ParseNetError::Address {
            input: s.into(),
            source,
        })?;
        let max = if addr.is_ipv6() { 128 } else { 32 };
        let prefix: u8 = match p {
            Some(p) => p.parse().map_err(|source| ParseNetError::Prefix {
                input: s.into(),
                source,
            })?,
            None => max,
        };
        if prefix > max {
            return Err(ParseNetError::PrefixTooLong(s.into()));
        }
        Ok(Self { addr, prefix })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_families_parse_and_match_their_own_addresses_only() {
        let v4: IpNet = "10.96.0.0/12".parse().unwrap();
        assert!(v4.contains("10.100.1.2".parse::<IpAddr>().unwrap()));
        assert!(!v4.contains("10.112.0.1".parse::<IpAddr>().unwrap()));
        assert!(!v4.contains("::ffff:10.96.0.1".parse::<IpAddr>().unwrap()));
        assert_eq!(v4.network().to_string(), "10.96.0.0");
        let v6: IpNet = "fd00:96::1/108".parse().unwrap();
        assert!(v6.contains("fd00:96::f:ffff".parse::<IpAddr>().unwrap()));
        assert!(!v6.contains("fd00:96::10:0".parse::<IpAddr>().unwrap()));
        assert!(!v6.contains(Ipv4Addr::new(10, 96, 0, 1)));
        assert_eq!(v6.network().to_string(), "fd00:96::");
        let all6: IpNet = "::/0".parse().unwrap();
        assert!(all6.contains("2001:db8::1".parse::<IpAddr>().unwrap()));
        let host: IpNet = "2001:db8::7".parse().unwrap();
        assert_eq!(host.prefix, 128);
        assert!(matches!(
            "10.0.0.0/33".parse::<IpNet>(),
            Err(ParseNetError::PrefixTooLong(_))
        ));
        assert!("fd00::/129".parse::<IpNet>().is_err());
        assert!("fd00::/64".parse::<IpNet>().is_ok());
    }
}
