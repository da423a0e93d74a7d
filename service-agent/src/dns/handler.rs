//! One DNS request in, one answer out: from the name table for the cluster
//! zone and the reverse zones, from the upstreams (or REFUSED) for the rest.
use std::{
    sync::{Arc, RwLock},
    time::Instant,
};

use hickory_proto::{
    op::{Edns, Header, HeaderCounts, Metadata, OpCode, ResponseCode},
    rr::{DNSClass, Record, RecordType},
};
use hickory_server::{
    net::{runtime::Time, xfer::Protocol},
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
    zone_handler::MessageResponseBuilder,
};
use tracing::debug;

use super::{
    counters::{self, Dropped},
    forward::Forwarder,
    lookup::{Answer, Scope, Zone},
    ratelimit::RateLimit,
    table::Table,
};

/// The largest UDP answer offered to a client that announces more (the
/// size the DNS flag day of 2020 settled on: no IP fragmentation).
pub const MAX_UDP_PAYLOAD: u16 = 1232;

pub struct Handler {
    pub zone: Zone,
    pub table: Arc<RwLock<Table>>,
    /// `None`: names outside the zone are refused (`--dns-upstream none`).
    pub upstream: Option<Forwarder>,
    pub limit: RateLimit,
}

/// A response before encoding.
#[derive(Debug, Default)]
pub struct Reply {
    pub rcode: ResponseCode,
    pub authoritative: bool,
    pub answers: Vec<Record>,
    pub authorities: Vec<Record>,
    pub additionals: Vec<Record>,
}

impl Reply {
    fn code(rcode: ResponseCode) -> Self {
        Self {
            rcode,
            ..Default::default()
        }
    }
}

/// Query types counted by name; the others as OTHER, so a client cannot
/// grow the metric's label set.
fn type_label(t: RecordType) -> &'static str {
    use RecordType::*;
    match t {
        A => "A",
        AAAA => "AAAA",
        SRV => "SRV",
        PTR => "PTR",
        CNAME => "CNAME",
        TXT => "TXT",
        SOA => "SOA",
        NS => "NS",
        MX => "MX",
        ANY => "ANY",
        HTTPS => "HTTPS",
        _ => "OTHER",
    }
}

pub fn rcode_label(r: ResponseCode) -> &'static str {
    match r {
        ResponseCode::NoError => "NOERROR",
        ResponseCode::FormErr => "FORMERR",
        ResponseCode::ServFail => "SERVFAIL",
        ResponseCode::NXDomain => "NXDOMAIN",
        ResponseCode::NotImp => "NOTIMP",
        ResponseCode::Refused => "REFUSED",
        _ => "OTHER",
    }
}

impl Handler {
    /// Whether `src` is within its rate (checked before a UDP datagram is
    /// even parsed; TCP requests are checked in `handle_request`).
    pub fn admit(&self, src: std::net::IpAddr) -> bool {
        let ok = self.limit.allow(src, Instant::now());
        if !ok {
            counters::dropped(Dropped::RateLimited);
        }
        ok
    }

    /// The answer to a parsed request.
    pub async fn reply(&self, request: &Request) -> (Reply, &'static str) {
        if request.metadata.op_code != OpCode::Query {
            return (Reply::code(ResponseCode::NotImp), "OTHER");
        }
        let [query] = request.queries.queries() else {
            return (Reply::code(ResponseCode::FormErr), "OTHER");
        };
        let qtype = query.query_type();
        let label = type_label(qtype);
        if query.query_class() != DNSClass::IN {
            return (Reply::code(ResponseCode::Refused), label);
        }
        let qname = query.original().name().clone();
        let answer = {
            let table = self.table.read().unwrap_or_else(|e| e.into_inner());
            let scope = self.zone.scope(&qname, &table);
            // Until the source is read (the API's initial lists), no
            // name of the zone is known not to exist.
            if !table.complete && !matches!(scope, Scope::Outside) {
                return (Reply::code(ResponseCode::ServFail), label);
            }
            match scope {
                Scope::Zone(labels) => Some(self.zone.answer_zone(&table, &qname, qtype, &labels)),
                Scope::Reverse(ip) => Some(self.zone.answer_reverse(&table, &qname, qtype, ip)),
                Scope::Outside => None,
            }
        };
        if let Some(a) = answer {
            return (self.authoritative(a), label);
        }
        let Some(up) = &self.upstream else {
            return (Reply::code(ResponseCode::Refused), label);
        };
        let payload = request.max_payload().min(MAX_UDP_PAYLOAD);
        match up.forward(query.original(), payload).await {
            Ok(m) => (
                Reply {
                    rcode: m.metadata.response_code,
                    authoritative: false,
                    answers: m.answers,
                    authorities: m.authorities,
                    additionals: m.additionals,
                },
                label,
            ),
            Err(e) => {
                debug!(name = %qname, "forwarding: {e}");
                (Reply::code(ResponseCode::ServFail), label)
            }
        }
    }

    /// An answer from the table: a negative one carries the zone's SOA so
    /// resolvers may cache it (RFC 2308) for the zone's TTL.
    fn authoritative(&self, a: Answer) -> Reply {
        let Answer {
            answers,
            additionals,
            nxdomain,
        } = a;
        let authorities = if answers.is_empty() {
            vec![self.zone.soa()]
        } else {
            vec![]
        };
        Reply {
            rcode: if nxdomain {
                ResponseCode::NXDomain
            } else {
                ResponseCode::NoError
            },
            authoritative: true,
            answers,
            authorities,
            additionals,
        }
    }
}

fn silent(request: &Request) -> ResponseInfo {
    ResponseInfo::from(Header {
        metadata: Metadata::response_from_request(&request.metadata),
        counts: HeaderCounts::default(),
    })
}

/// The handler as hickory-server holds it (shared with the UDP loop).
pub struct Shared(pub Arc<Handler>);

#[async_trait::async_trait]
impl RequestHandler for Shared {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let started = Instant::now();
        let this = &self.0;
        if request.protocol() != Protocol::Udp && !this.admit(request.src().ip()) {
            return silent(request);
        }
        let (reply, qtype) = this.reply(request).await;
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.response_code = reply.rcode;
        metadata.authoritative = reply.authoritative;
        metadata.recursion_available = this.upstream.is_some();
        // EDNS(0) answered with EDNS(0): the size the client can take,
        // bounded, which is what a UDP answer is truncated to.
        let edns = request.edns.as_ref().map(|_| {
            let mut e = Edns::new();
            e.set_max_payload(request.max_payload().min(MAX_UDP_PAYLOAD));
            e
        });
        let mut builder = MessageResponseBuilder::new(&request.queries, None);
        if let Some(e) = &edns {
            builder.edns(e);
        }
        let response = builder.build(
            metadata,
            reply.answers.iter(),
            reply.authorities.iter(),
            [],
            reply.additionals.iter(),
        );
        let info = match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(e) => {
                debug!(src = %request.src(), "sending a DNS answer: {e}");
                silent(request)
            }
        };
        counters::answered(qtype, rcode_label(reply.rcode), started.elapsed());
        info
    }
}
