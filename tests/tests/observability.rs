//! What the agent reports about itself: under load, with 500k flows in
//! CONNTRACK, a conntrack GC pass and `/metrics` scrapes running, a Service
//! change is programmed as fast as on an empty table (neither walks the
//! table on the agent's loop), and the scrape still reports CONNTRACK's
//! fill (counted by the GC pass); the network programming latency starts
//! at an EndpointSlice's trigger time.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use integration_tests::{
    agent::Agent,
    apiserver::{self, ApiServer, Kind},
    fixture::{OneNode, Running, T},
    manifests, traffic,
};
use service_agent::dataplane::tables::Tables;
use service_common::*;

const FLOWS: u32 = 500_000;
/// Longer than the agent's GC period (10 s): at least one pass overlaps.
const LOADED_CHANGES: usize = 12;

fn metrics_addr() -> SocketAddrV4 {
    service_agent::cli::DEFAULT_METRICS_ADDR.parse().unwrap()
}

fn now_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

/// Fills CONNTRACK through the pin with established TCP flows seen just
/// now (the GC keeps them: their lifetime is hours). No packet matches
/// them: their clients are in 10.250.0.0/16, which no namespace has.
fn fill_conntrack(t: &mut Tables, n: u32) {
    let seen = now_ns();
    for i in 0..n {
        let client = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 250, 0, 0)) + i / 60_000);
        let k = CtKey {
            saddr: client.octets(),
            daddr: [10, 96, 0, 10],
            sport: 1024 + (i % 60_000) as u16,
            dport: 80,
            proto: IPPROTO_TCP,
            _pad: [0; 3],
        };
        let v = CtValue {
            last_seen_ns: seen,
            nat_saddr: k.saddr,
            nat_sport: k.sport,
            nat_daddr: [10, 244, 0, 99],
            nat_dport: 8080,
            backend_id: 1,
            svc_id: 1,
            flags: 0,
            proto: IPPROTO_TCP,
            _pad: 0,
        };
        t.conntrack.insert(k, v, 0).unwrap();
    }
}

/// Writes Service `probe-<n>` on 10.96.1.<n>:80 and returns how long until
/// its master entry is in SERVICES, read straight from the pin (the CLI's
/// `list` would count CONNTRACK itself).
fn program_time(s: &Running, t: &Tables, n: u8) -> Duration {
    let addr = Ipv4Addr::new(10, 96, 1, n);
    let master = ServiceKey {
        addr: addr.octets(),
        port: 80,
        proto: IPPROTO_TCP,
        scope: SCOPE_ALL,
        slot: 0,
        _pad: 0,
    };
    let name = format!("probe-{n}");
    let text = manifests::service(
        &name,
        "web",
        &addr.to_string(),
        &[("http", "TCP", 80, "8080")],
        "",
    );
    let started = Instant::now();
    s.dir.write(&format!("{name}.yaml"), &text).unwrap();
    while t.services.get(&master, 0).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{name} not programmed in 20 s:\n{}",
            s.agent.log_text()
        );
        thread::sleep(Duration::from_millis(1));
    }
    started.elapsed()
}

/// Scrapes /metrics in the node's namespace until `stop`; keeps the last text.
struct Scraper {
    stop: Arc<AtomicBool>,
    scrapes: Arc<AtomicUsize>,
    handle: Option<thread::JoinHandle<String>>,
}

impl Scraper {
    fn start(s: &Running) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let scrapes = Arc::new(AtomicUsize::new(0));
        let (st, sc) = (stop.clone(), scrapes.clone());
        let handle = s.topo.nodes[0]
            .ns
            .spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(120);
                let mut last = String::new();
                while !st.load(Ordering::Relaxed) && Instant::now() < deadline {
                    if let Ok((200, text)) = traffic::http_request(metrics_addr(), "/metrics", T) {
                        last = text;
                        sc.fetch_add(1, Ordering::Relaxed);
                    }
                }
                last
            })
            .unwrap();
        Self {
            stop,
            scrapes,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> String {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap()
    }
}

impl Drop for Scraper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn conntrack_entries(metrics: &str) -> Option<u64> {
    let line = metrics
        .lines()
        .find(|l| l.starts_with("service_agent_map_entries{map=\"CONNTRACK\"} "))?;
    line.rsplit(' ').next()?.parse().ok()
}

#[test]
fn a_service_change_is_not_delayed_by_conntrack_gc_and_scrapes_over_500k_flows() {
    let s = OneNode::new(1, 1)
        .unwrap()
        .start(
            &[("http", "TCP", 80, "8080")],
            &["--conntrack-max", "1048576"],
        )
        .unwrap();
    let mut t = Tables::open_pinned(&s.agent.pin_dir).unwrap();
    let baseline: Vec<Duration> = (1..=4).map(|n| program_time(&s, &t, n)).collect();

    let filled = Instant::now();
    fill_conntrack(&mut t, FLOWS);
    let fill_time = filled.elapsed();
    let scraper = Scraper::start(&s);
    let mut loaded = vec![];
    for n in 0..LOADED_CHANGES {
        loaded.push(program_time(&s, &t, 10 + n as u8));
        thread::sleep(Duration::from_secs(1));
    }
    let scrapes = scraper.scrapes.load(Ordering::Relaxed);
    scraper.finish();
    let max = |v: &[Duration]| v.iter().max().copied().unwrap();
    println!(
        "programming time, empty table: {baseline:?}\n\
         with {FLOWS} flows (filled in {fill_time:?}), GC and {scrapes} scrapes: {loaded:?}"
    );
    assert!(
        max(&loaded) <= max(&baseline) + Duration::from_millis(200),
        "a change waited {:?} with the table full, {:?} at most without",
        max(&loaded),
        max(&baseline)
    );
    // A GC pass over the whole table has completed and published its count.
    let deadline = Instant::now() + Duration::from_secs(30);
    let metrics = loop {
        let scrape = s.topo.nodes[0]
            .ns
            .within(|| traffic::http_request(metrics_addr(), "/metrics", T))
            .unwrap();
        let text = scrape.map(|(_, text)| text).unwrap_or_default();
        if conntrack_entries(&text).is_some_and(|n| n >= FLOWS as u64) || Instant::now() > deadline
        {
            break text;
        }
        thread::sleep(Duration::from_millis(500));
    };
    assert!(
        conntrack_entries(&metrics).is_some_and(|n| n >= FLOWS as u64),
        "CONNTRACK's fill is not reported:\n{metrics}"
    );
    assert!(scrapes >= LOADED_CHANGES, "only {scrapes} scrapes answered");
}

/// The count of `le` bucket of `network_programming_duration_seconds`.
fn programming_bucket(metrics: &str, le: &str) -> u64 {
    let prefix =
        format!("service_agent_network_programming_duration_seconds_bucket{{le=\"{le}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no bucket {le}:\n{metrics}"))
}

#[test]
fn network_programming_latency_starts_at_the_slices_trigger_time() {
    let s = OneNode::new(1, 1).unwrap();
    let node = &s.topo.nodes[0].ns;
    let api = ApiServer::start(node).unwrap();
    api.apply(Kind::Node, apiserver::node("node-1", "zone-a"));
    api.apply(
        Kind::Service,
        apiserver::service("shop", "web", "10.96.0.10", 80, "TCP"),
    );
    let mut agent = Agent::start_kube(node, api.kubeconfig(), &["--node-name", "node-1"]).unwrap();
    agent
        .wait_log_from(0, "agent running", Duration::from_secs(30))
        .unwrap();
    let scrape = || {
        node.within(|| traffic::http_request(metrics_addr(), "/metrics", T))
            .unwrap()
            .unwrap()
            .1
    };
    // Samples between 2.5 s and 5 s: none before the change.
    let slow = |m: &str| programming_bucket(m, "5.0") - programming_bucket(m, "2.5");
    assert_eq!(slow(&scrape()), 0);
    // The endpoints controller saw the change 3 s ago (whole seconds, as
    // it writes the annotation), after the agent started: trigger times
    // from before its start are of changes it never saw happen.
    thread::sleep(Duration::from_secs(5));
    let now = k8s_openapi::jiff::Timestamp::now().as_second();
    let trigger = k8s_openapi::jiff::Timestamp::from_second(now - 3).unwrap();
    let mut slice = apiserver::endpoint_slice("shop", "web", "a", &[s.topo.pod("web-1").ip], "TCP");
    slice["metadata"]["annotations"] = serde_json::json!({
        "endpoints.kubernetes.io/last-change-trigger-time": trigger.to_string(),
    });
    api.apply(Kind::EndpointSlice, slice);
    agent
        .wait_list("web-1", |l| {
            l.contains(&format!("{}:8080", s.topo.pod("web-1").ip))
        })
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let m = scrape();
        if slow(&m) > 0 || Instant::now() > deadline {
            break m;
        }
        thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(slow(&metrics), 1, "{metrics}");
    assert!(
        metrics.contains("service_agent_sync_proxy_rules_endpoint_changes_total 1\n"),
        "{metrics}"
    );
}
