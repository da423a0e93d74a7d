//! The name table and the answers, then the server on loopback sockets:
//! malformed datagrams, truncation and TCP, forwarding and refusal.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    str::FromStr,
    sync::{Arc, RwLock},
    time::{Duration, Instant},
};

use hickory_proto::{
    op::{Edns, Message, MessageType, Query, ResponseCode},
    rr::{Name, RData, RecordType},
};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use serde_json::json;
use tokio::net::UdpSocket;

use super::{
    forward::Forwarder,
    handler::Handler,
    listen,
    lookup::{Answer, Scope, Zone},
    ratelimit::RateLimit,
    table::Table,
};
use crate::model::{ServiceId, Sourced};

fn service(v: serde_json::Value) -> Sourced<Service> {
    Sourced::new("test", serde_json::from_value(v).unwrap())
}

fn slice(svc: &str, eps: &[(&str, bool, Option<&str>)]) -> Sourced<EndpointSlice> {
    let endpoints: Vec<_> = eps
        .iter()
        .map(|(ip, ready, host)| json!({"addresses": [ip], "conditions": {"ready": ready}, "hostname": host}))
        .collect();
    Sourced::new(
        "test",
        serde_json::from_value(json!({
            "metadata": {"name": format!("{svc}-1"), "namespace": "default",
                         "labels": {"kubernetes.io/service-name": svc}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
            "endpoints": endpoints,
        }))
        .unwrap(),
    )
}

fn cluster_ip(name: &str, ip: &str) -> Sourced<Service> {
    service(json!({"metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": ip, "ports": [{"name": "http", "protocol": "TCP", "port": 80}, {"port": 81}]}}))
}

fn headless(name: &str, publish_not_ready: bool) -> Sourced<Service> {
    service(json!({"metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": publish_not_ready,
                 "ports": [{"name": "http", "protocol": "TCP", "port": 80}]}}))
}

/// redis (ClusterIP), web (headless: two ready, one not, one hostname),
/// all (headless, publishNotReadyAddresses), empty (headless, none ready),
/// ext (ExternalName to redis).
fn table() -> Table {
    let mut t = Table::default();
    t.complete = true;
    let id = |n: &str| ServiceId::new("default", n);
    t.set(
        &id("redis"),
        &(vec![cluster_ip("redis", "10.96.0.20")], vec![]),
    );
    let eps = [
        ("10.1.0.1", true, Some("web-0")),
        ("10.1.0.2", true, None),
        ("10.1.0.3", false, None),
    ];
    t.set(
        &id("web"),
        &(vec![headless("web", false)], vec![slice("web", &eps)]),
    );
    t.set(
        &id("all"),
        &(vec![headless("all", true)], vec![slice("all", &eps)]),
    );
    t.set(
        &id("empty"),
        &(
            vec![headless("empty", false)],
            vec![slice("empty", &[("10.1.0.9", false, None)])],
        ),
    );
    let ext = service(json!({"metadata": {"name": "ext", "namespace": "default"},
        "spec": {"type": "ExternalName", "externalName": "redis.default.svc.cluster.local."}}));
    t.set(&id("ext"), &(vec![ext], vec![]));
    t
}

fn zone() -> Zone {
    Zone::new("cluster.local", 5).unwrap()
}

fn ask(t: &Table, name: &str, qtype: RecordType) -> Answer {
    let z = zone();
    // As off the wire: case kept (from_str would map it, as IDNA does).
    let qname = Name::from_ascii(name).unwrap();
    match z.scope(&qname, t) {
        Scope::Zone(labels) => z.answer_zone(t, &qname, qtype, &labels),
        Scope::Reverse(ip) => z.answer_reverse(t, &qname, qtype, ip),
        Scope::Outside => panic!("{name} is outside the zone"),
    }
}

fn datas(a: &Answer) -> Vec<String> {
    let mut v: Vec<String> = a.answers.iter().map(|r| r.data.to_string()).collect();
    v.sort();
    v
}

#[test]
fn cluster_ip_services_answer_a_srv_and_ptr_and_nodata_for_aaaa() {
    let t = table();
    let a = ask(&t, "redis.default.svc.cluster.local.", RecordType::A);
    assert_eq!(datas(&a), ["10.96.0.20"]);
    assert_eq!(a.answers[0].ttl, 5);
    // Case does not matter, and the answer keeps the question's.
    let a = ask(&t, "REDIS.Default.svc.cluster.local.", RecordType::A);
    assert_eq!(datas(&a), ["10.96.0.20"]);
    assert_eq!(
        a.answers[0].name.to_string(),
        "REDIS.Default.svc.cluster.local."
    );
    let aaaa = ask(&t, "redis.default.svc.cluster.local.", RecordType::AAAA);
    assert!(aaaa.answers.is_empty() && !aaaa.nxdomain);
    let srv = ask(
        &t,
        "_http._tcp.redis.default.svc.cluster.local.",
        RecordType::SRV,
    );
    assert_eq!(datas(&srv), ["0 100 80 redis.default.svc.cluster.local."]);
    assert_eq!(srv.additionals.len(), 1);
    // An unnamed port has no SRV record; a named one asked as A is NODATA.
    assert!(
        ask(
            &t,
            "_81._tcp.redis.default.svc.cluster.local.",
            RecordType::SRV
        )
        .nxdomain
    );
    let nodata = ask(
        &t,
        "_http._tcp.redis.default.svc.cluster.local.",
        RecordType::A,
    );
    assert!(nodata.answers.is_empty() && !nodata.nxdomain);
    assert!(!ask(&t, "_tcp.redis.default.svc.cluster.local.", RecordType::A).nxdomain);
    assert!(ask(&t, "_udp.redis.default.svc.cluster.local.", RecordType::A).nxdomain);
    let ptr = ask(&t, "20.0.96.10.in-addr.arpa.", RecordType::PTR);
    assert_eq!(datas(&ptr), ["redis.default.svc.cluster.local."]);
}

#[test]
fn headless_services_answer_ready_endpoints_and_their_hostnames() {
    let t = table();
    let a = ask(&t, "web.default.svc.cluster.local.", RecordType::A);
    assert_eq!(datas(&a), ["10.1.0.1", "10.1.0.2"]);
    let all = ask(&t, "all.default.svc.cluster.local.", RecordType::A);
    assert_eq!(datas(&all), ["10.1.0.1", "10.1.0.2", "10.1.0.3"]);
    assert!(ask(&t, "empty.default.svc.cluster.local.", RecordType::A).nxdomain);
    let pet = ask(&t, "web-0.web.default.svc.cluster.local.", RecordType::A);
    assert_eq!(datas(&pet), ["10.1.0.1"]);
    let dashed = ask(&t, "10-1-0-2.web.default.svc.cluster.local.", RecordType::A);
    assert_eq!(datas(&dashed), ["10.1.0.2"]);
    assert!(ask(&t, "10-1-0-3.web.default.svc.cluster.local.", RecordType::A).nxdomain);
    let srv = ask(
        &t,
        "_http._tcp.web.default.svc.cluster.local.",
        RecordType::SRV,
    );
    assert_eq!(
        datas(&srv),
        [
            "0 100 8080 10-1-0-2.web.default.svc.cluster.local.",
            "0 100 8080 web-0.web.default.svc.cluster.local."
        ]
    );
    assert_eq!(srv.additionals.len(), 2);
    let ptr = ask(&t, "1.0.1.10.in-addr.arpa.", RecordType::PTR);
    assert_eq!(
        datas(&ptr),
        [
            "web-0.all.default.svc.cluster.local.",
            "web-0.web.default.svc.cluster.local."
        ]
    );
}

#[test]
fn external_names_namespaces_missing_names_and_the_schema_version() {
    let t = table();
    let ext = ask(&t, "ext.default.svc.cluster.local.", RecordType::A);
    assert_eq!(
        datas(&ext),
        ["10.96.0.20", "redis.default.svc.cluster.local."]
    );
    assert!(matches!(ext.answers[0].data, RData::CNAME(_)));
    assert!(ask(&t, "nope.default.svc.cluster.local.", RecordType::A).nxdomain);
    assert!(ask(&t, "redis.other.svc.cluster.local.", RecordType::A).nxdomain);
    assert!(ask(&t, "other.svc.cluster.local.", RecordType::A).nxdomain);
    assert!(!ask(&t, "default.svc.cluster.local.", RecordType::A).nxdomain);
    assert!(!ask(&t, "svc.cluster.local.", RecordType::A).nxdomain);
    assert!(ask(&t, "a.b.c.redis.default.svc.cluster.local.", RecordType::A).nxdomain);
    let v = ask(&t, "dns-version.cluster.local.", RecordType::TXT);
    assert_eq!(datas(&v), ["1.1.0"]);
    // Unknown addresses are not ours to answer.
    let z = zone();
    let unknown = Name::from_str("7.7.7.7.in-addr.arpa.").unwrap();
    assert_eq!(z.scope(&unknown, &t), Scope::Outside);
}

#[test]
fn a_change_replaces_the_answers_and_a_removal_forgets_every_name() {
    let mut t = table();
    let id = ServiceId::new("default", "web");
    let eps = [("10.1.0.1", false, Some("web-0")), ("10.1.0.5", true, None)];
    t.set(
        &id,
        &(vec![headless("web", false)], vec![slice("web", &eps)]),
    );
    let a = ask(&t, "web.default.svc.cluster.local.", RecordType::A);
    assert_eq!(datas(&a), ["10.1.0.5"]);
    let ptr = ask(&t, "1.0.1.10.in-addr.arpa.", RecordType::PTR);
    assert_eq!(datas(&ptr), ["web-0.all.default.svc.cluster.local."]);
    let keep = [ServiceId::new("default", "redis")].into();
    t.retain(&keep);
    assert_eq!(t.len(), 1);
    let z = zone();
    assert_eq!(
        z.scope(&Name::from_str("1.0.1.10.in-addr.arpa.").unwrap(), &t),
        Scope::Outside
    );
    assert!(ask(&t, "web.default.svc.cluster.local.", RecordType::A).nxdomain);
}

fn headless_100() -> Table {
    let mut t = table();
    let ips: Vec<String> = (0..100)
        .map(|i| format!("10.2.{}.{}", i / 200, i % 200 + 1))
        .collect();
    let eps: Vec<(&str, bool, Option<&str>)> =
        ips.iter().map(|ip| (ip.as_str(), true, None)).collect();
    let id = ServiceId::new("default", "big");
    t.set(
        &id,
        &(vec![headless("big", false)], vec![slice("big", &eps)]),
    );
    t
}

async fn server(table: Table, upstream: Option<Forwarder>, rate: u32) -> SocketAddr {
    let probe = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = probe.local_addr().unwrap();
    drop(probe);
    let handler = Arc::new(Handler {
        zone: zone(),
        table: Arc::new(RwLock::new(table)),
        upstream,
        limit: RateLimit::new(rate),
    });
    listen::serve(addr, handler).await.unwrap();
    addr
}

fn query(name: &str, qtype: RecordType, edns: Option<u16>) -> Message {
    let mut m = Message::query();
    m.metadata.id = 4242;
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_str(name).unwrap(), qtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m
}

async fn udp_raw(to: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    s.send_to(bytes, to).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let n = tokio::time::timeout(Duration::from_millis(500), s.recv(&mut buf))
        .await
        .ok()?
        .unwrap();
    Some(buf[..n].to_vec())
}

async fn udp(to: SocketAddr, m: &Message) -> Message {
    let reply = udp_raw(to, &m.to_vec().unwrap()).await.expect("an answer");
    Message::from_vec(&reply).unwrap()
}

async fn tcp(to: SocketAddr, m: &Message) -> Message {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(to).await.unwrap();
    let bytes = m.to_vec().unwrap();
    s.write_all(&(bytes.len() as u16).to_be_bytes())
        .await
        .unwrap();
    s.write_all(&bytes).await.unwrap();
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await.unwrap();
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).await.unwrap();
    Message::from_vec(&buf).unwrap()
}

#[tokio::test]
async fn answers_over_udp_truncate_to_the_client_size_and_tcp_gives_all() {
    let addr = server(headless_100(), None, 0).await;
    let q = query("big.default.svc.cluster.local.", RecordType::A, None);
    let small = udp(addr, &q).await;
    assert!(small.metadata.truncation);
    assert!(small.answers.len() < 100);
    let q_edns = query("big.default.svc.cluster.local.", RecordType::A, Some(4096));
    let edns = udp(addr, &q_edns).await;
    // 1232 bytes at most however much the client offers.
    assert!(edns.metadata.truncation);
    assert!(edns.answers.len() > small.answers.len());
    assert_eq!(edns.max_payload(), 1232);
    let full = tcp(addr, &q).await;
    assert!(!full.metadata.truncation);
    assert_eq!(full.answers.len(), 100);
    assert!(full.metadata.authoritative);
    let nx = udp(
        addr,
        &query("nope.default.svc.cluster.local.", RecordType::A, None),
    )
    .await;
    assert_eq!(nx.metadata.response_code, ResponseCode::NXDomain);
    assert!(matches!(nx.authorities[0].data, RData::SOA(_)));
    let refused = udp(addr, &query("example.com.", RecordType::A, None)).await;
    assert_eq!(refused.metadata.response_code, ResponseCode::Refused);
}

#[tokio::test]
async fn before_the_source_is_read_the_zone_answers_servfail_not_nxdomain() {
    let addr = server(Table::default(), None, 0).await;
    let m = udp(
        addr,
        &query("redis.default.svc.cluster.local.", RecordType::A, None),
    )
    .await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
}

/// A query header for `name`-less bodies: id 7, one question.
fn header(qdcount: u16) -> Vec<u8> {
    let mut h = vec![0, 7, 0x01, 0x00, 0, 0, 0, 0, 0, 0, 0, 0];
    h[4..6].copy_from_slice(&qdcount.to_be_bytes());
    h
}

#[tokio::test]
async fn malformed_datagrams_get_formerr_or_nothing_and_the_server_goes_on() {
    let addr = server(table(), None, 0).await;
    let mut loop_ = header(1);
    // A name whose compression pointer points at itself.
    loop_.extend([0xc0, 12, 0, 1, 0, 1]);
    let mut truncated = header(1);
    truncated.extend([7, b'e', b'x']);
    let mut labels = header(1);
    // 200 one-byte labels: past the 255-byte name limit.
    for _ in 0..200 {
        labels.extend([1, b'a']);
    }
    labels.extend([0, 0, 1, 0, 1]);
    let mut rng = 0x2545f4914f6cdd1du64;
    let mut cases = vec![loop_, truncated, labels, vec![1, 2, 3], header(3)];
    for len in [12, 40, 300, 1500] {
        cases.push(
            (0..len)
                .map(|_| {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng as u8
                })
                .collect(),
        );
    }
    for case in &cases {
        if let Some(reply) = udp_raw(addr, case).await {
            let m = Message::from_vec(&reply).unwrap();
            assert_eq!(m.metadata.message_type, MessageType::Response);
            assert_ne!(m.metadata.response_code, ResponseCode::NoError, "{case:?}");
        }
    }
    let ok = udp(
        addr,
        &query("redis.default.svc.cluster.local.", RecordType::A, None),
    )
    .await;
    assert_eq!(ok.answers.len(), 1);
}

/// An upstream on loopback answering every A question with 192.0.2.1, or
/// never answering.
async fn fake_upstream(answer: bool) -> SocketAddr {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = s.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, from)) = s.recv_from(&mut buf).await {
            let Ok(q) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            if !answer {
                continue;
            }
            let mut r = Message::response(q.metadata.id, q.metadata.op_code);
            r.add_queries(q.queries.clone());
            let name = q.queries[0].name().clone();
            r.add_answer(hickory_proto::rr::Record::from_rdata(
                name,
                30,
                RData::A(Ipv4Addr::new(192, 0, 2, 1).into()),
            ));
            let _ = s.send_to(&r.to_vec().unwrap(), from).await;
        }
    });
    addr
}

#[tokio::test]
async fn names_outside_the_zone_are_forwarded_and_a_silent_upstream_gives_servfail_in_time() {
    let up = fake_upstream(true).await;
    let addr = server(
        table(),
        Some(Forwarder::new(vec![up], Duration::from_secs(1))),
        0,
    )
    .await;
    let m = udp(addr, &query("example.com.", RecordType::A, None)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    assert_eq!(
        m.answers[0].data,
        RData::A(Ipv4Addr::new(192, 0, 2, 1).into())
    );
    assert!(!m.metadata.authoritative && m.metadata.recursion_available);

    let silent = fake_upstream(false).await;
    let fwd = Forwarder::new(vec![silent], Duration::from_millis(300));
    let addr = server(table(), Some(fwd), 0).await;
    let started = Instant::now();
    let m = udp(addr, &query("example.com.", RecordType::A, None)).await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert!(started.elapsed() < Duration::from_millis(450));
    // The zone is still answered meanwhile.
    let ok = udp(
        addr,
        &query("redis.default.svc.cluster.local.", RecordType::A, None),
    )
    .await;
    assert_eq!(ok.answers.len(), 1);
}

#[tokio::test]
async fn a_source_over_its_rate_is_dropped() {
    let addr = server(table(), None, 5).await;
    let q = query("redis.default.svc.cluster.local.", RecordType::A, None)
        .to_vec()
        .unwrap();
    let before = super::counters::snapshot()
        .dropped
        .get("rate_limited")
        .copied()
        .unwrap_or(0);
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for _ in 0..20 {
        s.send_to(&q, addr).await.unwrap();
    }
    let mut answered = 0;
    let mut buf = vec![0u8; 4096];
    while tokio::time::timeout(Duration::from_millis(300), s.recv(&mut buf))
        .await
        .is_ok()
    {
        answered += 1;
    }
    // The burst (5), and what the rate refilled while they were sent.
    assert!((5..=7).contains(&answered), "{answered} answered");
    let after = super::counters::snapshot()
        .dropped
        .get("rate_limited")
        .copied()
        .unwrap_or(0);
    assert!(after - before >= 13, "{} dropped", after - before);
    // Another source is answered meanwhile.
    let other = udp(
        addr,
        &query("redis.default.svc.cluster.local.", RecordType::A, None),
    )
    .await;
    assert_eq!(other.answers.len(), 1);
}

/// A source holding just these Services (no slices).
struct Fixed(Vec<Sourced<Service>>);

impl crate::source::Source for Fixed {
    fn refresh(
        &mut self,
        _: &crate::source::Pending,
        _: bool,
    ) -> Option<std::collections::BTreeSet<ServiceId>> {
        None
    }

    fn ids(&self) -> std::collections::BTreeSet<ServiceId> {
        self.0
            .iter()
            .map(|s| ServiceId::of(&s.object.metadata))
            .collect()
    }

    fn objects(&self, id: &ServiceId) -> crate::source::ServiceObjects {
        let svcs = self
            .0
            .iter()
            .filter(|s| ServiceId::of(&s.object.metadata) == *id)
            .cloned()
            .collect();
        (svcs, vec![])
    }
}

/// Runs a full sync's calls, as the agent makes them, through the wrapper.
fn full_sync(src: &dyn crate::source::Source) -> Vec<crate::source::ServiceObjects> {
    let objs = src.ids().iter().map(|id| src.objects(id)).collect();
    src.unlabeled_slices();
    objs
}

fn wrapped(services: Vec<Sourced<Service>>) -> (super::service::DnsSource, Arc<RwLock<Table>>) {
    let ip: IpAddr = "10.96.0.10".parse().unwrap();
    let listen: SocketAddr = "192.168.77.11:53".parse().unwrap();
    let table = Arc::new(RwLock::new(Table::default()));
    let own = super::service::objects(ip, listen, Some("node-1"));
    let src = super::service::DnsSource::new(Box::new(Fixed(services)), table.clone(), ip, own);
    (src, table)
}

#[test]
fn the_wrapped_source_adds_the_dns_service_and_fills_the_table_in_the_same_sync() {
    use crate::source::Source as _;
    let (src, table) = wrapped(vec![cluster_ip("redis", "10.96.0.20")]);
    assert!(!table.read().unwrap().complete);
    let objs = full_sync(&src);
    let own = objs
        .iter()
        .find(|(s, _)| {
            s.first()
                .is_some_and(|s| ServiceId::of(&s.object.metadata) == super::service::id())
        })
        .expect("kube-system/kube-dns handed to the planner");
    let slice = &own.1[0].object;
    assert_eq!(
        slice.endpoints.as_ref().unwrap()[0].addresses,
        ["192.168.77.11"]
    );
    let t = table.read().unwrap();
    assert!(t.complete);
    let a = ask(&t, "kube-dns.kube-system.svc.cluster.local.", RecordType::A);
    assert_eq!(datas(&a), ["10.96.0.10"]);
    assert_eq!(
        datas(&ask(&t, "redis.default.svc.cluster.local.", RecordType::A)),
        ["10.96.0.20"]
    );
    drop(t);
    assert!(src.errors().is_empty(), "{:?}", src.errors());
}

#[test]
fn a_service_on_the_dns_address_or_of_its_name_is_reported_naming_both() {
    use crate::source::Source as _;
    let (src, _) = wrapped(vec![cluster_ip("web", "10.96.0.10")]);
    full_sync(&src);
    let errors = src.errors();
    assert!(
        errors
            .iter()
            .any(|e| e.contains("--dns-service-ip 10.96.0.10")
                && e.contains("default/web")
                && e.contains("kube-system/kube-dns")),
        "{errors:?}"
    );
    let theirs = service(
        json!({"metadata": {"name": "kube-dns", "namespace": "kube-system"},
        "spec": {"clusterIP": "10.96.0.53", "ports": [{"name": "dns", "protocol": "UDP", "port": 53}]}}),
    );
    let (src, table) = wrapped(vec![theirs]);
    full_sync(&src);
    let errors = src.errors();
    assert!(
        errors.iter().any(|e| e.contains("takes the place")),
        "{errors:?}"
    );
    let t = table.read().unwrap();
    let a = ask(&t, "kube-dns.kube-system.svc.cluster.local.", RecordType::A);
    assert_eq!(datas(&a), ["10.96.0.53"]);
}
