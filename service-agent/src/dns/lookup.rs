//! What the Kubernetes DNS specification (schema 1.1.0) answers for a name
//! under the cluster zone or the reverse zones: records, or whether the name
//! exists without records of the type asked (NODATA) or not at all (NXDOMAIN).
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use hickory_proto::rr::{
    Name, RData, Record, RecordType,
    rdata::{A, AAAA, CNAME, PTR, SOA, SRV, TXT},
};

use super::table::{Entry, Kind, Table};

/// The schema version `dns-version.<zone>` answers with.
pub const SCHEMA_VERSION: &str = "1.1.0";

#[derive(Debug, Default, PartialEq)]
pub struct Answer {
    pub answers: Vec<Record>,
    pub additionals: Vec<Record>,
    /// The name does not exist (else: NOERROR, with or without records).
    pub nxdomain: bool,
}

/// Where a name falls.
#[derive(Debug, PartialEq)]
pub enum Scope {
    /// Under the cluster zone: labels below it, outermost first, lowercase.
    Zone(Vec<String>),
    /// A reverse name of an address the table knows.
    Reverse(IpAddr),
    /// Anything else (forwarded or refused).
    Outside,
}

/// The cluster zone (`cluster.local.`) and the TTL of every answer.
#[derive(Clone, Debug)]
pub struct Zone {
    pub name: Name,
    pub ttl: u32,
}

impl Zone {
    pub fn new(domain: &str, ttl: u32) -> Result<Self, String> {
        let mut name = Name::from_str(domain.trim_end_matches('.'))
            .map_err(|e| format!("--cluster-domain {domain}: {e}"))?
            .to_lowercase();
        name.set_fqdn(true);
        if name.is_root() {
            return Err(format!("--cluster-domain {domain}: empty"));
        }
        Ok(Self { name, ttl })
    }

    /// Where `qname` falls; reverse names of unknown addresses are outside.
    pub fn scope(&self, qname: &Name, table: &Table) -> Scope {
        let lower = qname.to_lowercase();
        if self.name.zone_of(&lower) {
            let below = lower.num_labels() - self.name.num_labels();
            let labels = lower
                .iter()
                .take(below as usize)
                .rev()
                .map(|l| String::from_utf8_lossy(l).into_owned())
                .collect();
            return Scope::Zone(labels);
        }
        match reverse_ip(&lower) {
            Some(ip) if table.names_of(ip).next().is_some() => Scope::Reverse(ip),
            _ => Scope::Outside,
        }
    }

    fn record(&self, name: &Name, data: RData) -> Record {
        Record::from_rdata(name.clone(), self.ttl, data)
    }

    fn service_name(&self, ns: &str, svc: &str) -> Name {
        self.child(&[svc, ns, "svc"])
    }

    /// `labels[0].labels[1]...<zone>`; the labels come from the table,
    /// which holds Kubernetes names (valid DNS labels).
    fn child(&self, labels: &[&str]) -> Name {
        let mut name = self.name.clone();
        for l in labels.iter().rev() {
            name = name.prepend_label(*l).unwrap_or_else(|_| self.name.clone());
        }
        name
    }

    /// The zone's SOA, for the authority section of negative answers (its
    /// minimum is the TTL, so resolvers cache a negative answer no longer
    /// than a positive one).
    pub fn soa(&self) -> Record {
        let data = SOA::new(
            self.child(&["ns", "dns"]),
            self.child(&["hostmaster"]),
            1,
            7200,
            1800,
            86400,
            self.ttl,
        );
        self.record(&self.name, RData::SOA(data))
    }

    /// The answer for `qname` (as asked, its case kept in the records) of
    /// type `qtype`, given its labels below the zone.
    pub fn answer_zone(
        &self,
        table: &Table,
        qname: &Name,
        qtype: RecordType,
        labels: &[String],
    ) -> Answer {
        let l: Vec<&str> = labels.iter().map(String::as_str).collect();
        match l.as_slice() {
            [] if qtype == RecordType::SOA => Answer {
                answers: vec![self.soa()],
                ..Default::default()
            },
            [] | ["svc"] => Answer::default(),
            ["dns-version"] if qtype == RecordType::TXT => Answer {
                answers: vec![self.record(
                    qname,
                    RData::TXT(TXT::new(vec![SCHEMA_VERSION.to_string()])),
                )],
                ..Default::default()
            },
            ["dns-version"] => Answer::default(),
            ["svc", ns] if table.has_namespace(ns) => Answer::default(),
            ["svc", ns, svc] => match table.get(ns, svc) {
                Some(e) => self.service(table, qname, qtype, e),
                None => nxdomain(),
            },
            ["svc", ns, svc, proto] if proto.starts_with('_') => match table.get(ns, svc) {
                Some(e) if e.ports.iter().any(|p| p.proto == proto[1..]) => Answer::default(),
                _ => nxdomain(),
            },
            ["svc", ns, svc, host] => match table.get(ns, svc) {
                Some(Entry {
                    kind: Kind::Headless(eps),
                    ..
                }) if eps.iter().any(|e| e.host == *host) => Answer {
                    answers: eps
                        .iter()
                        .filter(|e| e.host == *host)
                        .filter_map(|e| self.address(qname, qtype, e.ip))
                        .collect(),
                    ..Default::default()
                },
                _ => nxdomain(),
            },
            ["svc", ns, svc, proto, port] if proto.starts_with('_') && port.starts_with('_') => {
                match table.get(ns, svc) {
                    Some(e) => self.srv(qname, qtype, ns, svc, e, &port[1..], &proto[1..]),
                    None => nxdomain(),
                }
            }
            _ => nxdomain(),
        }
    }

    fn address(&self, owner: &Name, qtype: RecordType, ip: IpAddr) -> Option<Record> {
        match (qtype, ip) {
            (RecordType::A, IpAddr::V4(v4)) => Some(self.record(owner, RData::A(A(v4)))),
            (RecordType::AAAA, IpAddr::V6(v6)) => Some(self.record(owner, RData::AAAA(AAAA(v6)))),
            _ => None,
        }
    }

    fn service(&self, table: &Table, qname: &Name, qtype: RecordType, e: &Entry) -> Answer {
        match &e.kind {
            Kind::ClusterIp(ips) => Answer {
                answers: ips
                    .iter()
                    .filter_map(|ip| self.address(qname, qtype, *ip))
                    .collect(),
                ..Default::default()
            },
            // No ready endpoint: the name does not exist (specification 2.4.1).
            Kind::Headless(eps) if eps.is_empty() => nxdomain(),
            Kind::Headless(eps) => Answer {
                answers: eps
                    .iter()
                    .filter_map(|ep| self.address(qname, qtype, ep.ip))
                    .collect(),
                ..Default::default()
            },
            Kind::ExternalName(target) => self.cname(table, qname, qtype, target),
        }
    }

    /// The CNAME, followed by the target's records when the target is a
    /// Service of this zone (one step: a chain of ExternalNames ends there).
    fn cname(&self, table: &Table, qname: &Name, qtype: RecordType, target: &str) -> Answer {
        let Ok(mut to) = Name::from_str(target) else {
            return Answer::default();
        };
        to.set_fqdn(true);
        let mut answers = vec![self.record(qname, RData::CNAME(CNAME(to.clone())))];
        if qtype != RecordType::CNAME
            && let Scope::Zone(labels) = self.scope(&to, table)
            && let ["svc", ns, svc] = labels.iter().map(String::as_str).collect::<Vec<_>>()[..]
            && let Some(Entry {
                kind: kind @ (Kind::ClusterIp(_) | Kind::Headless(_)),
                ports,
            }) = table.get(ns, svc)
        {
            let e = Entry {
                kind: kind.clone(),
                ports: ports.clone(),
            };
            answers.extend(self.service(table, &to, qtype, &e).answers);
        }
        Answer {
            answers,
            ..Default::default()
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn srv(
        &self,
        qname: &Name,
        qtype: RecordType,
        ns: &str,
        svc: &str,
        e: &Entry,
        port: &str,
        proto: &str,
    ) -> Answer {
        let named = |p: &&super::table::NamedPort| p.name == port && p.proto == proto;
        let Some(svc_port) = e.ports.iter().find(named) else {
            return nxdomain();
        };
        if qtype != RecordType::SRV {
            return Answer::default();
        }
        let srv = |port: u16, target: Name| {
            self.record(qname, RData::SRV(SRV::new(0, 100, port, target)))
        };
        match &e.kind {
            Kind::ClusterIp(ips) => {
                let target = self.service_name(ns, svc);
                Answer {
                    answers: vec![srv(svc_port.port, target.clone())],
                    additionals: ips
                        .iter()
                        .filter_map(|ip| {
                            let t = if ip.is_ipv4() {
                                RecordType::A
                            } else {
                                RecordType::AAAA
                            };
                            self.address(&target, t, *ip)
                        })
                        .collect(),
                    ..Default::default()
                }
            }
            Kind::Headless(eps) => {
                let mut answer = Answer::default();
                for ep in eps {
                    let port = ep
                        .ports
                        .iter()
                        .find(named)
                        .map_or(svc_port.port, |p| p.port);
                    let target = self.child(&[&ep.host, svc, ns, "svc"]);
                    answer.answers.push(srv(port, target.clone()));
                    let t = if ep.ip.is_ipv4() {
                        RecordType::A
                    } else {
                        RecordType::AAAA
                    };
                    answer.additionals.extend(self.address(&target, t, ep.ip));
                }
                answer
            }
            Kind::ExternalName(_) => Answer::default(),
        }
    }

    /// PTR records of an address the table knows.
    pub fn answer_reverse(
        &self,
        table: &Table,
        qname: &Name,
        qtype: RecordType,
        ip: IpAddr,
    ) -> Answer {
        if qtype != RecordType::PTR {
            return Answer::default();
        }
        let answers = table
            .names_of(ip)
            .map(|(id, host)| {
                let target = match host {
                    Some(h) => self.child(&[h, &id.name, &id.namespace, "svc"]),
                    None => self.service_name(&id.namespace, &id.name),
                };
                self.record(qname, RData::PTR(PTR(target)))
            })
            .collect();
        Answer {
            answers,
            ..Default::default()
        }
    }
}

fn nxdomain() -> Answer {
    Answer {
        nxdomain: true,
        ..Default::default()
    }
}

/// The address a full `in-addr.arpa.` / `ip6.arpa.` name stands for.
fn reverse_ip(name: &Name) -> Option<IpAddr> {
    let labels: Vec<String> = name
        .iter()
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect();
    let (body, tail) = labels.split_at(labels.len().checked_sub(2)?);
    match (body, tail) {
        (b, [x, arpa]) if x == "in-addr" && arpa == "arpa" && b.len() == 4 => {
            let mut o = [0u8; 4];
            for (i, l) in b.iter().rev().enumerate() {
                o[i] = l.parse().ok()?;
            }
            Some(IpAddr::V4(Ipv4Addr::from(o)))
        }
        (b, [x, arpa]) if x == "ip6" && arpa == "arpa" && b.len() == 32 => {
            let mut v: u128 = 0;
            for l in b.iter().rev() {
                if l.len() != 1 {
                    return None;
                }
                v = (v << 4) | u128::from(u8::from_str_radix(l, 16).ok()?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(v)))
        }
        _ => None,
    }
}
