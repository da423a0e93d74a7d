//! What can be wrong with a field, worded once: the planner's problems and
//! refusals carry these, and the status file and logs show their text.
use super::{
    ipnet_lite::ParseNetError,
    types::{FrontendKey, Problem, Protocol},
};

/// The highest port number, for the range messages.
pub const MAX_PORT: u32 = u16::MAX as u32;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FieldError {
    #[error("missing")]
    Missing,
    /// A value the API server would allocate (`ClusterIPs`, `NodePorts`).
    #[error("missing: the manifest source does not allocate {0}, set one")]
    NotAllocated(&'static str),
    #[error("{ip} is outside the service range {ranges}")]
    OutsideServiceRange { ip: String, ranges: String },
    #[error("{0} cannot be a Service address")]
    NotAServiceAddress(String),
    #[error("{0:?} is not an IPv4 address")]
    NotIpv4(String),
    #[error("{0:?} is not an IPv4 address; endpoint ignored")]
    EndpointNotIpv4(String),
    #[error("{0:?} is not an IP address")]
    NotAnAddress(String),
    #[error("{addr:?} is not an {family} address; endpoint ignored")]
    EndpointWrongFamily { addr: String, family: &'static str },
    #[error("a second {0} address; only the first of a family is programmed")]
    SecondOfFamily(&'static str),
    #[error("{ip} is an {actual} address, not {named}; programmed as {actual}")]
    FamilyMismatch {
        ip: String,
        actual: &'static str,
        named: String,
    },
    #[error("{value} is outside 1..={max}")]
    OutOfRange { value: i64, max: u32 },
    #[error("unknown value {0:?}")]
    UnknownValue(String),
    #[error(
        "unknown value {0:?} (PreferClose, PreferSameZone, PreferSameNode); \
         endpoints are not narrowed"
    )]
    UnknownDistribution(String),
    #[error("not a CIDR: {0}")]
    NotCidr(ParseNetError),
    #[error("SCTP is not supported by this dataplane; the port is not programmed")]
    Sctp,
    #[error("unknown protocol {0:?}")]
    UnknownProtocol(String),
    #[error(
        "{0:?} is neither a number nor a port name \
         (1-15 lowercase letters, digits and '-', with a letter)"
    )]
    NotAPortName(String),
    #[error("{port}/{proto} appears twice")]
    DuplicatePort { port: u16, proto: Protocol },
    #[error(
        "{0} is not in an --external-ip-allow range; not programmed \
         (externalIPs are refused by default, CVE-2020-8554)"
    )]
    ExternalIpNotAllowed(std::net::IpAddr),
    #[error("frontend {key} is already used by Service {other}; Service not programmed")]
    FrontendTaken { key: FrontendKey, other: String },
    /// An EndpointSlice labelled with a Service that does not exist.
    #[error("no Service {0}; the slice is ignored")]
    NoSuchService(String),
}

impl FieldError {
    /// A port number (or timeout) outside `1..=max`.
    pub fn out_of_range(value: impl Into<i64>, max: u32) -> Self {
        Self::OutOfRange {
            value: value.into(),
            max,
        }
    }
}

/// A Service refused as a whole: the field that makes it unprogrammable.
/// Its previous frontends stay programmed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{object}: field {field}: {error}")]
pub struct Refusal {
    /// `Service namespace/name`.
    pub object: String,
    pub field: String,
    pub error: FieldError,
}

impl Refusal {
    /// As the plan lists it.
    pub fn problem(&self, origin: &str) -> Problem {
        Problem::new(origin, self.object.clone(), &self.field, &self.error, true)
    }
}
