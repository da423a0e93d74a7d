//! A CIDR for allow-lists; two fields do not warrant a crate.
use std::{
    net::{AddrParseError, Ipv4Addr},
    num::ParseIntError,
    str::FromStr,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Net {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

/// Why a text is not an IPv4 CIDR; each names the text given.
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
    #[error("{0}: prefix longer than 32")]
    PrefixTooLong(String),
}

impl Ipv4Net {
    /// The network address (host bits cleared).
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }

    fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix)
        }
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.addr) & self.mask()
    }
}

impl std::fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Ipv4Net {
    type Err = ParseNetError;
    fn from_str(s: &str) -> Result<Self, ParseNetError> {
        let (a, p) = s.split_once('/').unwrap_or((s, "32"));
        let addr: Ipv4Addr = a.parse().map_err(|source| ParseNetError::Address {
            input: s.into(),
            source,
        })?;
        let prefix: u8 = p.parse().map_err(|source| ParseNetError::Prefix {
            input: s.into(),
            source,
        })?;
        if prefix > 32 {
            return Err(ParseNetError::PrefixTooLong(s.into()));
        }
        Ok(Self { addr, prefix })
    }
}
