//! The agent works with exactly the capabilities deploy/service-agent.yaml
//! gives it (BPF, NET_ADMIN, PERFMON; the deploy test checks the manifest
//! names these), and not with fewer.
use integration_tests::{agent::Agent, cgroup::TestCgroup, fixture::OneNode};

fn with_caps(caps: &str) -> Vec<String> {
    vec![
        "setpriv".into(),
        "--inh-caps=-all".into(),
        "--ambient-caps=-all".into(),
        format!("--bounding-set=-all,{caps}"),
    ]
}

#[test]
fn bpf_net_admin_and_perfmon_are_enough_and_needed() {
    let f = OneNode::new(1, 1).unwrap();
    f.write_web(&[("http", "TCP", 80, "8080")]).unwrap();
    let (topo, dir) = (&f.topo, &f.dir);

    // The socket hooks attach with the same capabilities (to a test cgroup).
    let cgroup = TestCgroup::new().unwrap();
    let caps = with_caps("+bpf,+net_admin,+perfmon");
    let wrapper: Vec<&str> = caps.iter().map(String::as_str).collect();
    let hooks = ["--cgroup", &cgroup.flag()];
    let agent = Agent::start_wrapped(&topo.nodes[0].ns, &dir.path, &hooks, &wrapper).unwrap();
    assert!(agent.list().unwrap().contains(&cgroup.flag()));
    assert_eq!(f.ask("client").unwrap().server, "web-1");
    drop(agent);

    let caps = with_caps("+bpf,+net_admin");
    let wrapper: Vec<&str> = caps.iter().map(String::as_str).collect();
    let err = Agent::start_wrapped(&topo.nodes[0].ns, &dir.path, &[], &wrapper)
        .err()
        .expect("without CAP_PERFMON the verifier refuses the programs");
    assert!(err.to_string().contains("verifier rejected"), "{err}");
}
