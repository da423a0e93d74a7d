//! Full maps and floods: a full SERVICES map refuses one Service with a
//! clear error while the rest serve; LRU conntrack keeps established flows
//! through a SYN flood; SYN and UDP floods from one client do not break
//! another client's flows; what the LRU evicts under a flood beyond the
//! table, and the flood guard that keeps idle established flows through it.
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use integration_tests::{
    fixture::{self, OneNode, Running, VIP},
    manifests,
    traffic::{self, HeldConnection},
};

const FLOODED: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);

/// Clients `good` and `flooder`, web-1 and web-2, Service web on VIP:80/TCP
/// and VIP:53/UDP, and the agent with `flags`.
fn setup(flags: &[&str]) -> Running {
    OneNode::with_clients(&["good", "flooder"], 2, 2)
        .unwrap()
        .start(
            &[("http", "TCP", 80, "8080"), ("dns", "UDP", 53, "8080")],
            flags,
        )
        .unwrap()
}

#[test]
fn a_full_services_map_refuses_one_service_by_name_and_keeps_the_rest() {
    // web takes 2 frontends × (1 master + 2 slots) = 6 entries of 8.
    let s = setup(&["--services-max", "8"]);
    s.agent
        .wait_list("web", |l| l.contains("10.96.0.10:80/TCP -> 10.244"))
        .unwrap();
    let write_more = || {
        s.dir
            .write(
                "more.yaml",
                &manifests::service(
                    "more",
                    "web",
                    "10.96.0.20",
                    &[("http", "TCP", 80, "8080")],
                    "",
                ),
            )
            .unwrap()
    };
    write_more();
    let l = s
        .agent
        .wait_list("refusal", |l| l.contains("map SERVICES is full"))
        .unwrap();
    assert!(l.contains("Service default/more frontend 10.96.0.20:80/TCP: map SERVICES is full; raise --services-max"), "{l}");
    assert!(!l.contains("10.96.0.20:80/TCP ->"), "{l}");
    // The refused frontend leaves nothing behind: web's 6 entries remain.
    assert!(
        l.contains("maps: SERVICES 6/8,"),
        "the fill level is shown: {l}"
    );
    let r = s.ask("good");
    assert!(
        r.is_ok(),
        "the Services already programmed keep serving: {r:?}"
    );
    // Room again: the refused Service is programmed at the next sync.
    s.dir.remove("more.yaml").unwrap();
    s.write_web(&[("http", "TCP", 80, "8080")]).unwrap();
    write_more();
    s.agent
        .wait_list("more", |l| l.contains("10.96.0.20:80/TCP -> 10.244"))
        .unwrap();
}

#[test]
fn floods_from_one_client_do_not_break_another_clients_flows() {
    // A small LRU conntrack (16384 entries): the 30,000 SYNs want 60,000
    // entries, so it overflows several times over while the held flow stays
    // recently used.
    let s = setup(&["--conntrack-max", "16384"]);
    s.dir
        .write(
            "flooded.yaml",
            &manifests::service(
                "flooded",
                "web",
                &FLOODED.to_string(),
                &[("dns", "UDP", 53, "9999")],
                "",
            ),
        )
        .unwrap();
    s.agent
        .wait_list("flooded", |l| l.contains("10.96.0.11:53/UDP -> 10.244"))
        .unwrap();
    let good = s.topo.pod("good");
    let udp_flow = traffic::UdpFlow::open(&good.ns, SocketAddrV4::new(VIP, 53)).unwrap();
    let udp_backend = udp_flow.ask().unwrap().server;
    let mut held = HeldConnection::open(&good.ns, SocketAddrV4::new(VIP, 80)).unwrap();
    let held_backend = held.ask().unwrap().server;
    let flooding = s
        .topo
        .pod("flooder")
        .ns
        .spawn(|| {
            let syn =
                traffic::syn_flood(SocketAddrV4::new(VIP, 80), 30_000, Duration::from_secs(3))
                    .unwrap();
            // At a Service whose backends have no socket on the port, so the
            // flood loads the dataplane, not the other client's server socket.
            let udp = traffic::udp_flood(
                SocketAddrV4::new(FLOODED, 53),
                50_000,
                Duration::from_secs(2),
            )
            .unwrap();
            (syn, udp)
        })
        .unwrap();
    let looping = fixture::loop_from(good, true, Duration::from_secs(5), 10_000);
    let mut held_failures = vec![];
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match held.ask() {
            Ok(r) if r.server == held_backend => {}
            other => held_failures.push(format!("TCP {other:?}")),
        }
        match udp_flow.ask() {
            Ok(r) if r.server == udp_backend => {}
            other => held_failures.push(format!("UDP {other:?}")),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let (syn, udp) = flooding.join().unwrap();
    let other = looping.join().unwrap();
    assert!(
        syn > 5_000 && udp > 5_000,
        "the flood was too small: {syn} SYNs, {udp} datagrams"
    );
    assert!(
        held_failures.is_empty(),
        "an established flow broke: {:?}",
        &held_failures[..held_failures.len().min(3)]
    );
    other.assert_clean(50, "the other client during the floods");
    let stats = s.agent.cli("stats", &["-o", "json"]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert!(
        v["reasons"]["new_flow"].as_u64().unwrap() > 5_000,
        "the flood reached the dataplane: {stats}"
    );
}

/// Idle established flows held through a flood.
const IDLE: usize = 20;

/// Holds `idle` established connections through good's VIP:80, idle while
/// flooder sends 30,000 spoofed SYNs (each a new flow, 60,000 entries
/// against a 16,384-entry conntrack), then asks on each again. Gives how
/// many still answer from their backend, and the agent's reasons.
fn idle_flows_through_a_syn_flood(
    flags: &[&str],
    idle: usize,
    times: u32,
) -> (usize, serde_json::Value) {
    let mut all = vec!["--conntrack-max", "16384"];
    all.extend_from_slice(flags);
    let s = setup(&all);
    let good = s.topo.pod("good");
    let mut held: Vec<(HeldConnection, String)> = (0..idle)
        .map(|_| {
            let mut h = HeldConnection::open(&good.ns, SocketAddrV4::new(VIP, 80)).unwrap();
            let backend = h.ask().unwrap().server;
            (h, backend)
        })
        .collect();
    let sent = s
        .topo
        .pod("flooder")
        .ns
        .within(move || {
            let to = SocketAddrV4::new(VIP, 80);
            traffic::syn_flood_repeating(to, 30_000, times, Duration::from_secs(8))
        })
        .unwrap()
        .unwrap();
    assert!(sent > 20_000, "the flood was too small: {sent} SYNs");
    // At once: each lost flow costs a read timeout.
    let alive = std::thread::scope(|scope| {
        let asks: Vec<_> = held
            .iter_mut()
            .map(|(h, backend)| scope.spawn(|| h.ask().is_ok_and(|r| r.server == *backend)))
            .collect();
        asks.into_iter()
            .filter_map(|a| a.join().unwrap().then_some(()))
            .count()
    });
    let stats = s.agent.cli("stats", &["-o", "json"]).unwrap();
    (alive, serde_json::from_str(&stats).unwrap())
}

#[test]
fn a_syn_flood_beyond_the_table_evicts_idle_established_flows_without_the_guard() {
    // What the kernel's LRU does: an entry used again after its insert is
    // marked referenced and kept on the active list, inserts into the full
    // map evict from the inactive list first, and the active list is
    // rotated (references cleared, unreferenced entries demoted) whenever
    // it outgrows the inactive one. A flood of one SYN per flow evicts
    // mostly its own entries, but how many idle established flows go with
    // them varies from run to run; a flooder that sends each SYN twice
    // references its entries too, and the idle flows, as old as any, go.
    let (once, stats) = idle_flows_through_a_syn_flood(&[], IDLE, 1);
    assert!(
        stats["reasons"]["new_flow"].as_u64().unwrap() > 20_000,
        "the flood reached the dataplane: {stats}"
    );
    // The LRU's lists are per CPU and the flood's spread over them varies:
    // the best of three floods shows what it does.
    let twice = (0..3)
        .map(|_| idle_flows_through_a_syn_flood(&[], IDLE, 2).0)
        .min()
        .unwrap_or(IDLE);
    eprintln!("idle flows left of {IDLE}: {once} (one SYN per flow), {twice} (each SYN twice)");
    assert!(
        twice <= IDLE / 2,
        "{twice} of {IDLE} idle flows survived a repeating flood"
    );
}

#[test]
fn the_flood_guard_keeps_idle_established_flows_through_a_syn_flood() {
    // 500 new flows a second per CPU: at most a few thousand of the flood's
    // openings are recorded in its 5 s, well inside the table.
    let (alive, stats) = idle_flows_through_a_syn_flood(&["--flood-threshold", "500"], IDLE, 2);
    assert_eq!(alive, IDLE, "idle established flows lost: {stats}");
    let dropped = stats["reasons"]["flood_dropped"].as_u64().unwrap();
    assert!(dropped > 10_000, "the guard refused the flood: {stats}");
}
