//! Service DNS from a pod, through the dataplane to the agent's DNS
//! ClusterIP (10.96.0.10), asked with the real `dig`.
use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use integration_tests::{
    agent::{Agent, ManifestDir},
    manifests,
    netns::Netns,
    topology::Topology,
};

const DNS_IP: &str = "10.96.0.10";
const REDIS_IP: &str = "10.96.1.20";

struct Fixture {
    agent: Agent,
    topo: Topology,
    dir: ManifestDir,
}

/// The `db` pods' addresses (no namespaces behind them: DNS only names them).
fn db_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 9, i)
}

fn write_db_pods(dir: &ManifestDir, ready: &[bool]) {
    let text: Vec<String> = ready
        .iter()
        .enumerate()
        .map(|(i, r)| manifests::pod(&format!("db-{i}"), "db", db_ip(i as u8 + 1), *r, "node-1"))
        .collect();
    dir.write("db-pods.yaml", &text.join("---\n")).unwrap();
}

/// redis (ClusterIP, named port), db (headless over three pods, one not
/// ready), big (headless, 100 endpoints), ext (ExternalName).
fn fixture() -> Fixture {
    let mut topo = Topology::new().unwrap();
    topo.add_node().unwrap();
    topo.add_pod(0, "client-a").unwrap();
    topo.add_pod(0, "client-b").unwrap();
    let dir = ManifestDir::new().unwrap();
    let redis = manifests::service(
        "redis",
        "redis",
        REDIS_IP,
        &[("redis", "TCP", 6379, "6379")],
        "",
    );
    let db = manifests::service("db", "db", "None", &[("pg", "TCP", 5432, "8080")], "");
    dir.write("svc.yaml", &format!("{redis}---\n{db}")).unwrap();
    write_db_pods(&dir, &[true, true, false]);
    let endpoints: String = (0..100)
        .map(|i| {
            format!(
                "- addresses: [\"10.245.{}.{}\"]\n  conditions: {{ready: true}}\n",
                i / 200,
                i % 200 + 1
            )
        })
        .collect();
    dir.write(
        "big.yaml",
        &format!(
            r#"apiVersion: v1
kind: Service
metadata: {{name: big}}
spec:
  clusterIP: None
  ports: [{{name: http, protocol: TCP, port: 80}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: big-1
  labels: {{kubernetes.io/service-name: big}}
addressType: IPv4
ports: [{{name: http, protocol: TCP, port: 80}}]
endpoints:
{endpoints}---
apiVersion: v1
kind: Service
metadata: {{name: ext}}
spec:
  type: ExternalName
  externalName: redis.default.svc.cluster.local
"#
        ),
    )
    .unwrap();
    let agent = Agent::start(
        &topo.nodes[0].ns,
        &dir.path,
        &["--dns", "--dns-upstream", "none", "--node-name", "node-1"],
    )
    .unwrap();
    Fixture { agent, topo, dir }
}

/// `dig @10.96.0.10 ARGS` from `ns`: its output, or what it said when it
/// got no answer (dig exits 0 for any answer, NXDOMAIN included).
fn try_dig(ns: &Netns, args: &[&str]) -> Result<String, String> {
    let net = format!("--net={}", ns.path());
    let at = format!("@{DNS_IP}");
    let out = Command::new("nsenter")
        .args([net.as_str(), "dig", at.as_str(), "+tries=1", "+time=2"])
        .args(args)
        .output()
        .expect("running dig (cargo xtask setup installs bind9-dnsutils)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

fn dig(ns: &Netns, args: &[&str]) -> String {
    try_dig(ns, args).unwrap_or_else(|e| panic!("dig {args:?}: {e}"))
}

fn status(out: &str) -> &str {
    out.split("status: ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap_or_else(|| panic!("no status in {out}"))
}

/// The answer section's (type, data) pairs, sorted.
fn answers(out: &str) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = out
        .split(";; ANSWER SECTION:")
        .nth(1)
        .unwrap_or("")
        .lines()
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f[1], "5", "TTL of {l}");
            (f[3].to_string(), f[4..].join(" "))
        })
        .collect();
    v.sort();
    v
}

fn a(ips: &[&str]) -> Vec<(String, String)> {
    ips.iter()
        .map(|ip| ("A".to_string(), ip.to_string()))
        .collect()
}

#[test]
fn a_pod_resolves_services_per_the_kubernetes_dns_specification() {
    let f = fixture();
    let pod = &f.topo.pod("client-a").ns;
    let q = |args: &[&str]| dig(pod, args);

    let redis = q(&["redis.default.svc.cluster.local", "A"]);
    assert_eq!(status(&redis), "NOERROR");
    assert!(redis.contains("flags: qr aa"), "{redis}");
    assert_eq!(answers(&redis), a(&[REDIS_IP]));

    let aaaa = q(&["redis.default.svc.cluster.local", "AAAA"]);
    assert_eq!(status(&aaaa), "NOERROR");
    assert!(answers(&aaaa).is_empty(), "{aaaa}");

    let missing = q(&["nothing.default.svc.cluster.local", "A"]);
    assert_eq!(status(&missing), "NXDOMAIN");

    let db = q(&["db.default.svc.cluster.local", "A"]);
    assert_eq!(answers(&db), a(&["10.244.9.1", "10.244.9.2"]));

    let srv = q(&["_redis._tcp.redis.default.svc.cluster.local", "SRV"]);
    assert_eq!(
        answers(&srv),
        [(
            "SRV".to_string(),
            "0 100 6379 redis.default.svc.cluster.local.".to_string()
        )]
    );
    let db_srv = q(&["_pg._tcp.db.default.svc.cluster.local", "SRV"]);
    assert_eq!(answers(&db_srv).len(), 2, "{db_srv}");
    assert!(
        db_srv.contains("8080 10-244-9-1.db.default.svc.cluster.local."),
        "{db_srv}"
    );

    let ptr = q(&["-x", REDIS_IP]);
    assert_eq!(
        answers(&ptr),
        [(
            "PTR".to_string(),
            "redis.default.svc.cluster.local.".to_string()
        )]
    );

    let ext = q(&["ext.default.svc.cluster.local", "A"]);
    assert_eq!(
        answers(&ext),
        [
            ("A".to_string(), REDIS_IP.to_string()),
            (
                "CNAME".to_string(),
                "redis.default.svc.cluster.local.".to_string()
            )
        ]
    );

    // The agent's own Service has a name too.
    let own = q(&["kube-dns.kube-system.svc.cluster.local", "A", "+short"]);
    assert_eq!(own.trim(), DNS_IP);

    // Outside the zone with --dns-upstream none: refused at once.
    let outside = q(&["example.com", "A"]);
    assert_eq!(status(&outside), "REFUSED");

    // 100 endpoints: over UDP without EDNS the answer is cut to 512 bytes
    // and flagged; dig then asks again over TCP and gets them all.
    let cut = q(&["big.default.svc.cluster.local", "A", "+noedns", "+ignore"]);
    assert!(cut.contains(" tc"), "{cut}");
    assert!(answers(&cut).len() < 100);
    let full = q(&["big.default.svc.cluster.local", "A", "+noedns"]);
    assert!(full.contains("Truncated, retrying in TCP mode"), "{full}");
    assert_eq!(answers(&full).len(), 100);
    let tcp = q(&["big.default.svc.cluster.local", "A", "+tcp"]);
    assert_eq!(answers(&tcp).len(), 100);

    // A pod turning unready leaves the answer within a second.
    write_db_pods(&f.dir, &[true, false, false]);
    let changed = Instant::now();
    loop {
        let db = q(&["db.default.svc.cluster.local", "A"]);
        if answers(&db) == a(&["10.244.9.1"]) {
            break;
        }
        assert!(changed.elapsed() < Duration::from_secs(1), "still {db}");
        thread::sleep(Duration::from_millis(20));
    }

    // The counters: /metrics's and `stats`'s (written once a second).
    let deadline = Instant::now() + Duration::from_secs(3);
    let stats = loop {
        let s = f.agent.cli("stats", &[]).unwrap();
        if s.contains("A NXDOMAIN") && s.contains("PTR NOERROR") || Instant::now() > deadline {
            break s;
        }
        thread::sleep(Duration::from_millis(200));
    };
    assert!(
        stats.contains("A NXDOMAIN") && stats.contains("SRV NOERROR"),
        "{stats}"
    );
    assert!(stats.contains("latency p99"), "{stats}");
}

/// Datagrams no DNS message parses from.
fn malformed() -> Vec<Vec<u8>> {
    let header = |qd: u8| vec![0x12, 0x34, 0x01, 0x00, 0, qd, 0, 0, 0, 0, 0, 0];
    let mut looped = header(1);
    looped.extend([0xc0, 12, 0, 1, 0, 1]);
    let mut cut = header(1);
    cut.extend([9, b'r', b'e']);
    let mut labels = header(1);
    for _ in 0..300 {
        labels.extend([1, b'x']);
    }
    labels.extend([0, 0, 1, 0, 1]);
    let mut seed = 0x9e3779b97f4a7c15u64;
    let mut random = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect()
    };
    vec![
        looped,
        cut,
        labels,
        vec![0xff; 5],
        random(12),
        random(100),
        random(1400),
        header(40),
    ]
}

#[test]
fn malformed_packets_and_a_flood_from_one_pod_do_not_stop_answers_to_another() {
    let f = fixture();
    let dns = SocketAddrV4::new(DNS_IP.parse().unwrap(), 53);
    let replies = f
        .topo
        .pod("client-a")
        .ns
        .within(move || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.set_read_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            let mut codes = vec![];
            for m in malformed() {
                s.send_to(&m, dns).unwrap();
                let mut buf = [0u8; 4096];
                // FORMERR (rcode 1) or nothing at all.
                if let Ok(n) = s.recv(&mut buf) {
                    assert!(
                        n >= 12 && buf[2] & 0x80 != 0,
                        "not a response: {:?}",
                        &buf[..n]
                    );
                    codes.push(buf[3] & 0x0f);
                }
            }
            codes
        })
        .unwrap();
    assert!(
        !replies.is_empty() && replies.iter().all(|c| *c == 1),
        "{replies:?}"
    );
    let b = &f.topo.pod("client-b").ns;
    assert_eq!(
        dig(b, &["redis.default.svc.cluster.local", "+short"]).trim(),
        REDIS_IP
    );

    // A bounded flood from client-a: 10 times its rate limit, for 2 s,
    // while client-b keeps asking (as a resolver does: it tries again).
    let query = {
        let mut q = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for l in ["redis", "default", "svc", "cluster", "local"] {
            q.push(l.len() as u8);
            q.extend(l.as_bytes());
        }
        q.extend([0, 0, 1, 0, 1]);
        q
    };
    let flood = f
        .topo
        .pod("client-a")
        .ns
        .spawn(move || {
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            let started = Instant::now();
            let mut sent = 0u32;
            while started.elapsed() < Duration::from_secs(2) {
                // 10000 a second: 100 every 10 ms.
                let due = (started.elapsed().as_millis() as u32 / 10 + 1) * 100;
                while sent < due {
                    if s.send_to(&query, dns).is_ok() {
                        sent += 1;
                    }
                }
                thread::sleep(Duration::from_millis(2));
            }
            sent
        })
        .unwrap();
    let (mut asked, mut answered, mut failures) = (0, 0, vec![]);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(2) {
        asked += 1;
        let out = try_dig(
            b,
            &[
                "redis.default.svc.cluster.local",
                "+short",
                "+tries=3",
                "+time=1",
            ],
        );
        match out {
            // A try lost to a full socket buffer is retried, as by any resolver.
            Ok(o) if o.lines().last() == Some(REDIS_IP) => answered += 1,
            other => failures.push(format!("{:?} after {:?}", other, started.elapsed())),
        }
        thread::sleep(Duration::from_millis(50));
    }
    let sent = flood.join().unwrap();
    assert!(sent >= 15_000, "the flood sent only {sent}");
    assert_eq!(
        answered, asked,
        "client-b answered {answered} of {asked} times during the flood: {failures:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let s = f.agent.cli("stats", &[]).unwrap();
        if s.contains("dropped rate_limited") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no rate_limited drops counted:\n{s}"
        );
        thread::sleep(Duration::from_millis(200));
    }
    // And right after it, at once.
    assert_eq!(
        dig(b, &["redis.default.svc.cluster.local", "+short"]).trim(),
        REDIS_IP
    );
}
