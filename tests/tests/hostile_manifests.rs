//! Bad input through the manifest source: each mistake gives one clear
//! error naming object and field, the rest keeps serving, memory stays
//! bounded. Plus the security defaults of the pin directory.
use std::{
    os::unix::fs::PermissionsExt as _,
    time::{Duration, Instant},
};

use integration_tests::fixture::{self, OneNode, Running};
use service_agent::source::manifest::MAX_FILE_BYTES;

/// web-1 behind Service web on VIP:80, and the agent with `flags`.
fn setup(flags: &[&str]) -> Running {
    OneNode::new(1, 1)
        .unwrap()
        .start(&[("http", "TCP", 80, "8080")], flags)
        .unwrap()
}

fn still_serving(s: &Running) {
    let r = s.ask("client");
    assert_eq!(r.expect("the good Service keeps serving").server, "web-1");
}

#[test]
fn each_mistake_is_named_once_and_the_rest_keeps_serving() {
    let s = setup(&["--service-cidr", "10.96.0.0/16"]);
    let svc = |name: &str, spec: &str| {
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {spec}\n---\n")
    };
    let bad = [
        svc("dup", "{clusterIP: 10.96.0.10, ports: [{port: 80}]}"),
        svc("np-a", "{type: NodePort, clusterIP: 10.96.0.21, ports: [{port: 80, nodePort: 30080}]}"),
        svc("np-b", "{type: NodePort, clusterIP: 10.96.0.22, ports: [{port: 80, nodePort: 30080}]}"),
        svc("range", "{clusterIP: 10.96.0.23, ports: [{port: 80, targetPort: 99999}]}"),
        svc("outside", "{clusterIP: 172.20.0.1, ports: [{port: 80}]}"),
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: orphan-1, labels: {kubernetes.io/service-name: orphan}}\naddressType: IPv4\nendpoints: []\n".to_string(),
    ]
    .concat();
    s.dir.write("bad.yaml", &bad).unwrap();
    let l = s
        .agent
        .wait_list("problems", |l| l.contains("EndpointSlice default/orphan-1"))
        .unwrap();
    for want in [
        "(Service default/dup): field spec: frontend 10.96.0.10:80/TCP is already used by Service default/",
        "(Service default/np-b): field spec: frontend *:30080/TCP is already used by Service default/np-a",
        "(Service default/range): field spec.ports[0].targetPort: 99999 is outside 1..=65535",
        "(Service default/outside): field spec.clusterIP: 172.20.0.1 is outside the service range 10.96.0.0/16",
        "(EndpointSlice default/orphan-1): field metadata.labels[kubernetes.io/service-name]: no Service default/orphan",
    ] {
        assert!(l.contains(want), "{want:?} missing:\n{l}");
    }
    still_serving(&s);
    // One log line per problem, not one per resync.
    std::thread::sleep(Duration::from_millis(300));
    s.write_pods(|_| true).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let log = s.agent.log_text();
    assert_eq!(log.matches("Service default/np-b").count(), 1, "{log}");
}

#[test]
fn a_huge_manifest_is_read_in_pieces_and_one_over_the_limit_refused() {
    let s = setup(&[]);
    // 50 MB that hold nothing: read a line at a time, never held whole.
    let mut text = String::with_capacity(50 << 20);
    while text.len() < 50 << 20 {
        text.push_str("# filler line to make the file very large, as a runaway generator would\n");
    }
    s.dir.write("filler.yaml", &text).unwrap();
    drop(text);
    // Over the limit: refused by its size, without a read (a sparse file,
    // so the test writes nothing).
    let huge = s.dir.path.join("huge.yaml");
    std::fs::File::create(&huge)
        .unwrap()
        .set_len(MAX_FILE_BYTES + 1)
        .unwrap();
    let l = s
        .agent
        .wait_list("size problem", |l| l.contains("huge.yaml"))
        .unwrap();
    assert!(
        l.contains(&format!("over the {MAX_FILE_BYTES}-byte limit")),
        "{l}"
    );
    assert!(!l.contains("filler.yaml"), "{l}");
    still_serving(&s);
    let peak = s.agent.status_kib("VmHWM").unwrap();
    assert!(
        peak < 100 * 1024,
        "agent peak memory {peak} KiB after a 50 MB manifest"
    );
}

#[test]
fn a_file_rewritten_every_millisecond_neither_stalls_traffic_nor_grows_memory() {
    let s = setup(&[]);
    let path = s.dir.path.clone();
    let churn = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut n = 0u64;
        while Instant::now() < deadline && n < 5000 {
            let text = format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: churn}}\nspec: {{clusterIP: 10.96.1.{}, ports: [{{port: 80}}]}}\n",
                n % 200 + 1
            );
            let _ = std::fs::write(path.join("churn.yaml"), text);
            n += 1;
            std::thread::sleep(Duration::from_millis(1));
        }
        n
    });
    let looping = fixture::loop_from(s.topo.pod("client"), false, Duration::from_secs(3), 3000);
    let outcome = looping.join().unwrap();
    let writes = churn.join().unwrap();
    assert!(writes > 500, "only {writes} rewrites");
    outcome.assert_clean(100, "requests during the churn");
    let rss = s.agent.rss_kib().unwrap();
    assert!(rss < 100 * 1024, "agent RSS {rss} KiB");
    s.agent
        .wait_list("settled", |l| l.contains("# default/churn"))
        .unwrap();
}

#[test]
fn pins_are_private_and_an_open_pin_directory_is_refused() {
    let s = setup(&[]);
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&s.agent.pin_dir), 0o700);
    assert_eq!(mode(&s.agent.pin_dir.join("links")), 0o700);
    for e in std::fs::read_dir(&s.agent.pin_dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            assert_eq!(mode(&p), 0o600, "{}", p.display());
        }
    }
    for e in std::fs::read_dir(s.agent.pin_dir.join("links")).unwrap() {
        let p = e.unwrap().path();
        assert_eq!(mode(&p), 0o600, "{}", p.display());
    }
    let mut agent = s.agent;
    agent.kill();
    std::fs::set_permissions(&agent.pin_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let err = agent.spawn().unwrap_err().to_string();
    assert!(
        err.contains("writable by group or others; refusing to use it"),
        "{err}"
    );
}
