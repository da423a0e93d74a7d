//! Restarting the agent: SIGKILL while clients keep talking, then start it
//! again on the same pins. Nothing a client does may notice.
use std::{net::SocketAddrV4, process::Command, time::Duration};

use integration_tests::{
    agent::Agent,
    fixture::{self, OneNode, VIP},
    traffic::{self, HeldConnection, UdpFlow},
};

fn map_id(agent: &Agent, map: &str) -> String {
    let out = Command::new("bpftool")
        .args(["-j", "map", "show", "pinned"])
        .arg(agent.pin_dir.join(map))
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["id"].to_string()
}

#[test]
fn sigkill_and_restart_break_no_connection_and_keep_the_maps() {
    let f = OneNode::new(3, 3).unwrap();
    f.write_web(&[("http", "TCP", 80, "http"), ("dns", "UDP", 53, "8080")])
        .unwrap();
    let mut agent = f.start_agent(&["--node-name", "node-1"]).unwrap();
    let topo = &f.topo;
    let ids_before = (map_id(&agent, "SERVICES"), map_id(&agent, "CONNTRACK"));

    let client = topo.pod("client");
    let mut held = HeldConnection::open(&client.ns, SocketAddrV4::new(VIP, 80)).unwrap();
    let held_backend = held.ask().unwrap().server;
    let udp = UdpFlow::open(&client.ns, SocketAddrV4::new(VIP, 53)).unwrap();
    let udp_backend = udp.ask().unwrap().server;

    let looping = fixture::loop_from(client, true, Duration::from_secs(5), 20_000);
    std::thread::sleep(Duration::from_millis(800));
    agent.kill();
    // The agent is gone: the pinned links keep the programs attached.
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        held.ask().unwrap().server,
        held_backend,
        "held connection while the agent is down"
    );
    assert_eq!(
        udp.ask().unwrap().server,
        udp_backend,
        "UDP flow while the agent is down"
    );
    agent.spawn().unwrap();
    looping
        .join()
        .unwrap()
        .assert_clean(100, "requests across the SIGKILL and restart");
    assert_eq!(
        held.ask().unwrap().server,
        held_backend,
        "held connection after the restart"
    );
    assert_eq!(
        udp.ask().unwrap().server,
        udp_backend,
        "UDP flow keeps its backend"
    );
    assert_eq!(
        (map_id(&agent, "SERVICES"), map_id(&agent, "CONNTRACK")),
        ids_before,
        "the restarted agent adopted the maps"
    );
    assert!(
        agent.log_text().contains("adopted the pinned link"),
        "{}",
        agent.log_text()
    );

    // Changes made while the agent is down are applied when it is back.
    agent.kill();
    f.write_pods(|i| i == 1).unwrap();
    agent.spawn().unwrap();
    let l = agent
        .wait_list("one backend", |l| {
            l.lines()
                .any(|x| x.starts_with("10.96.0.10:80/TCP") && x.matches(":8080").count() == 1)
        })
        .unwrap();
    assert!(l.contains(&format!("{}:8080", topo.pod("web-1").ip)), "{l}");
}

#[test]
fn cleanup_detaches_everything_it_made() {
    let f = OneNode::new(1, 1).unwrap();
    f.write_web(&[("http", "TCP", 80, "8080")]).unwrap();
    let mut agent = f.start_agent(&[]).unwrap();
    agent.kill();
    let links = agent.pin_dir.join("links");
    assert!(links.join("eth0").exists() && links.join("vp1").exists());
    let client = f.topo.pod("client");
    // Short: once detached, the ClusterIP leads nowhere and only times out.
    let ask = || {
        client
            .ns
            .within(|| traffic::tcp_ask(SocketAddrV4::new(VIP, 80), Duration::from_millis(500)))
            .unwrap()
    };
    assert!(ask().is_ok(), "programs stay attached after the agent died");
    agent.cli("cleanup", &[]).unwrap();
    assert!(!agent.pin_dir.exists(), "pins removed");
    // The kernel drops an unpinned link after an RCU grace period: allow it a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while ask().is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "programs detached by cleanup: the ClusterIP is no longer translated"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
