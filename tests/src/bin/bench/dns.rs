//! DNS answers a second from a pod through the dataplane to the agent's
//! DNS ClusterIP: a ClusterIP Service's A record and a headless Service
//! with 100 endpoints, with the bench's own client (bounded in time and
//! count, a fixed number of queries outstanding).
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddrV4, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use integration_tests::{
    agent::{Agent, ManifestDir},
    manifests,
    topology::Topology,
};

const DNS: SocketAddrV4 = SocketAddrV4::new(std::net::Ipv4Addr::new(10, 96, 0, 10), 53);
/// Client threads, each with one query outstanding.
const CLIENTS: usize = 4;
const LIMIT: Duration = Duration::from_secs(2);
const MAX_QUERIES: usize = 200_000;

pub struct DnsRow {
    pub what: &'static str,
    pub qps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub lost: usize,
}

/// An A question with EDNS(0) offering `payload` bytes.
fn query(name: &str, id: u16, payload: u16) -> Vec<u8> {
    let mut q = id.to_be_bytes().to_vec();
    q.extend([0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 1]);
    for l in name.split('.').filter(|l| !l.is_empty()) {
        q.push(l.len() as u8);
        q.extend(l.as_bytes());
    }
    q.extend([0, 0, 1, 0, 1]);
    // OPT: root name, type 41, class = payload size, ttl 0, no data.
    q.extend([0, 0, 41]);
    q.extend(payload.to_be_bytes());
    q.extend([0, 0, 0, 0, 0, 0]);
    q
}

/// Whether `reply` answers query `id` with NOERROR.
fn answers(reply: &[u8], id: u16) -> bool {
    reply.len() >= 12 && reply[..2] == id.to_be_bytes() && reply[3] & 0x0f == 0
}

/// One client: its latencies in microseconds, and how many got no answer.
fn client(name: &'static str, tcp: bool, per_client: usize) -> (Vec<f64>, usize) {
    let mut lat = Vec::with_capacity(per_client.min(100_000));
    let mut lost = 0;
    let started = Instant::now();
    let mut buf = vec![0u8; 65535];
    let udp = UdpSocket::bind("0.0.0.0:0").expect("a UDP socket");
    udp.set_read_timeout(Some(Duration::from_millis(200))).ok();
    let mut stream = tcp.then(|| {
        let s =
            TcpStream::connect_timeout(&DNS.into(), Duration::from_secs(2)).expect("TCP to DNS");
        s.set_read_timeout(Some(Duration::from_secs(1))).ok();
        s
    });
    for i in 0..per_client {
        if started.elapsed() > LIMIT {
            break;
        }
        let id = i as u16;
        let q = query(name, id, 1232);
        let t = Instant::now();
        let ok = match stream.as_mut() {
            Some(s) => {
                let mut framed = (q.len() as u16).to_be_bytes().to_vec();
                framed.extend(&q);
                let mut len = [0u8; 2];
                s.write_all(&framed).is_ok()
                    && s.read_exact(&mut len).is_ok()
                    && s.read_exact(&mut buf[..u16::from_be_bytes(len) as usize])
                        .is_ok()
                    && answers(&buf, id)
            }
            None => {
                udp.send_to(&q, DNS).is_ok()
                    && loop {
                        match udp.recv(&mut buf) {
                            Ok(n) if answers(&buf[..n], id) => break true,
                            Ok(_) => continue,
                            Err(_) => break false,
                        }
                    }
            }
        };
        if ok {
            lat.push(t.elapsed().as_secs_f64() * 1e6);
        } else {
            lost += 1;
        }
    }
    (lat, lost)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn measure(
    pod: &integration_tests::netns::Netns,
    what: &'static str,
    name: &'static str,
    tcp: bool,
) -> anyhow::Result<DnsRow> {
    let started = Instant::now();
    let handles: Vec<_> = (0..CLIENTS)
        .map(|_| pod.spawn(move || client(name, tcp, MAX_QUERIES / CLIENTS)))
        .collect::<Result<_, _>>()?;
    let mut lat = vec![];
    let mut lost = 0;
    for h in handles {
        let (l, n) = h
            .join()
            .map_err(|_| anyhow::anyhow!("a DNS client panicked"))?;
        lat.extend(l);
        lost += n;
    }
    let elapsed = started.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    Ok(DnsRow {
        what,
        qps: lat.len() as f64 / elapsed,
        p50_us: percentile(&lat, 0.5),
        p99_us: percentile(&lat, 0.99),
        lost,
    })
}

pub fn dns_rates() -> anyhow::Result<Vec<DnsRow>> {
    let mut topo = Topology::new()?;
    topo.add_node()?;
    topo.add_pod(0, "client")?;
    let dir = ManifestDir::new()?;
    let redis = manifests::service(
        "redis",
        "redis",
        "10.96.1.20",
        &[("redis", "TCP", 6379, "6379")],
        "",
    );
    let endpoints: String = (0..100)
        .map(|i| {
            format!(
                "- addresses: [\"10.245.0.{}\"]\n  conditions: {{ready: true}}\n",
                i + 1
            )
        })
        .collect();
    dir.write(
        "svc.yaml",
        &format!(
            "{redis}---\napiVersion: v1\nkind: Service\nmetadata: {{name: big}}\nspec:\n  clusterIP: None\n  ports: [{{name: http, protocol: TCP, port: 80}}]\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: big-1\n  labels: {{kubernetes.io/service-name: big}}\naddressType: IPv4\nports: [{{name: http, protocol: TCP, port: 80}}]\nendpoints:\n{endpoints}"
        ),
    )?;
    // No rate limit: one client is the whole load here.
    let agent = Agent::start(
        &topo.nodes[0].ns,
        &dir.path,
        &["--dns", "--dns-upstream", "none", "--dns-rate-limit", "0"],
    )?;
    let pod = &topo.pod("client").ns;
    let rows = vec![
        measure(
            pod,
            "ClusterIP A (UDP)",
            "redis.default.svc.cluster.local",
            false,
        )?,
        measure(
            pod,
            "headless, 100 endpoints (UDP, cut to 1232 bytes)",
            "big.default.svc.cluster.local",
            false,
        )?,
        measure(
            pod,
            "headless, 100 endpoints (TCP, all 100)",
            "big.default.svc.cluster.local",
            true,
        )?,
    ];
    drop(agent);
    Ok(rows)
}

pub fn report(md: &mut String, rows: &[DnsRow]) {
    use std::fmt::Write as _;
    let _ = writeln!(
        md,
        "## DNS answers from a pod\n\n\
         {CLIENTS} clients in one pod, each with one query outstanding, for {} s, through the dataplane to the \
         agent's DNS ClusterIP (its listener on the node). Latency is the client's, query sent to answer read.\n\n\
         | query | answers/s | p50 (µs) | p99 (µs) | unanswered |\n|---|---:|---:|---:|---:|",
        LIMIT.as_secs()
    );
    for r in rows {
        let _ = writeln!(
            md,
            "| {} | {:.0} | {:.0} | {:.0} | {} |",
            r.what, r.qps, r.p50_us, r.p99_us, r.lost
        );
    }
    let _ = writeln!(md);
}
