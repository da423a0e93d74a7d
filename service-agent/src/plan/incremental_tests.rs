//! The incremental planner against the full compile, over random sequences
//! of changes drawn from a small pool of names, addresses and ports so that
//! clashes, refusals, duplicates, orphans and kept frontends all happen.
//! The agent trusts the incremental plan without comparing: these tests are
//! where a disagreement with `compile_after` is caught, and they fail on one.
use serde_json::{Value, json};

use super::*;
use crate::{
    model::SERVICE_NAME_LABEL,
    plan::{compile_after, ipnet_lite::IpNet},
};

/// Seeded, so a failing seed can be replayed.
struct Rng(fastrand::Rng);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(fastrand::Rng::with_seed(seed))
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0.u64(..n)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.0.usize(..from.len())]
    }
}

const NAMESPACES: [&str; 2] = ["a", "b"];
const NAMES: [&str; 5] = ["s0", "s1", "s2", "s3", "s4"];

fn random_id(r: &mut Rng) -> ServiceId {
    ServiceId::new(r.pick(&NAMESPACES), r.pick(&NAMES))
}

fn random_service(r: &mut Rng, id: &ServiceId, origin: usize) -> Sourced<Service> {
    let ty = r.pick(&[
        "ClusterIP",
        "ClusterIP",
        "ClusterIP",
        "NodePort",
        "NodePort",
        "LoadBalancer",
    ]);
    let mut ports = vec![];
    for i in 0..1 + r.below(2) {
        let (port, proto) = r.pick(&[(80, "TCP"), (81, "TCP"), (53, "UDP")]);
        let mut p = json!({"name": format!("p{i}"), "port": port, "protocol": proto,
                           "targetPort": 8080 + i});
        if ty != "ClusterIP" && r.chance(90) {
            p["nodePort"] = json!(r.pick(&[30000, 30001, 30002]));
        }
        ports.push(p);
    }
    let mut spec = json!({
        "type": ty,
        "clusterIP": format!("10.96.0.{}", 1 + r.below(4)),
        "ports": ports,
    });
    match r.below(20) {
        0 => spec["clusterIP"] = json!("None"),
        1 => spec["clusterIP"] = json!("not-an-ip"),
        2 => spec["ports"][0]["port"] = json!(0),
        3 => {
            spec["sessionAffinity"] = json!("ClientIP");
            spec["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": 0}});
        }
        4 => spec["sessionAffinity"] = json!("ClientIP"),
        5 => spec["clusterIP"] = json!("10.200.0.1"),
        _ => {}
    }
    if r.chance(15) {
        spec["externalIPs"] = json!([format!("192.0.2.{}", 1 + r.below(2))]);
    }
    if r.chance(30) {
        spec["externalTrafficPolicy"] = json!("Local");
    }
    if r.chance(10) {
        spec["internalTrafficPolicy"] = json!("Local");
    }
    if r.chance(15) {
        spec["trafficDistribution"] = json!("PreferClose");
    }
    if ty == "LoadBalancer" && r.chance(70) {
        spec["healthCheckNodePort"] = json!(r.pick(&[32000, 32001]));
    }
    if ty == "LoadBalancer" && r.chance(30) {
        spec["loadBalancerSourceRanges"] = json!(["203.0.113.0/24"]);
    }
    let mut meta = json!({"namespace": &*id.namespace, "name": &*id.name});
    if r.chance(70) {
        meta["creationTimestamp"] = json!(format!("2024-01-0{}T00:00:00Z", 1 + r.below(3)));
    }
    if r.chance(3) {
        meta["labels"] = json!({"service.kubernetes.io/headless": ""});
    }
    let mut obj = json!({"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec});
    if ty == "LoadBalancer" {
        obj["status"] = json!({"loadBalancer": {"ingress": [{"ip": format!("198.51.100.{}", 1 + r.below(2))}]}});
    }
    Sourced::new(format!("svc#{origin}"), from_json(obj))
}

fn random_slice(
    r: &mut Rng,
    id: Option<&ServiceId>,
    n: usize,
    origin: usize,
) -> Sourced<EndpointSlice> {
    let mut endpoints = vec![];
    for _ in 0..r.below(5) {
        let addr = if r.chance(5) {
            "bad".to_string()
        } else {
            format!("10.1.0.{}", 1 + r.below(6))
        };
        let mut e = json!({"addresses": [addr], "nodeName": r.pick(&["node-1", "node-2"])});
        if r.chance(40) {
            e["conditions"] = json!({"ready": r.chance(50), "serving": r.chance(50),
                                     "terminating": r.chance(50)});
        }
        if r.chance(50) {
            e["hints"] = json!({"forZones": [{"name": r.pick(&["zone-a", "zone-b"])}]});
        }
        endpoints.push(e);
    }
    let ns = id.map_or("a", |i| &*i.namespace);
    let mut meta = json!({"namespace": ns, "name": format!("sl-{n}")});
    if let Some(id) = id {
        meta["labels"] = json!({SERVICE_NAME_LABEL: &*id.name});
    }
    let obj = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": meta,
        "addressType": "IPv4",
        "ports": [{"name": "p0", "port": 8080, "protocol": "TCP"},
                  {"name": "p1", "port": 9090, "protocol": "TCP"},
                  {"name": "p0", "port": 5353, "protocol": "UDP"}],
        "endpoints": endpoints,
    });
    Sourced::new(format!("slice#{origin}"), from_json(obj))
}

fn from_json<T: serde::de::DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).expect("generated objects are valid")
}

fn random_node(r: &mut Rng) -> NodeContext {
    NodeContext {
        name: r.chance(80).then(|| "node-1".to_string()),
        external_ip_allow: if r.chance(50) {
            vec!["192.0.2.0/24".parse::<IpNet>().unwrap()]
        } else {
            vec![]
        },
        service_cidrs: if r.chance(30) {
            vec!["10.96.0.0/16".parse::<IpNet>().unwrap()]
        } else {
            vec![]
        },
        zone: r
            .chance(60)
            .then(|| r.pick(&["zone-a", "zone-b"]).to_string()),
    }
}

type Objects = (Vec<Sourced<Service>>, Vec<Sourced<EndpointSlice>>);

/// What the full compile is given: Services in any order (here: reversed,
/// to show the order does not matter), slices grouped by Service id and the
/// unlabelled ones last.
fn full_inputs(
    world: &BTreeMap<ServiceId, Objects>,
    unlabeled: &[Sourced<EndpointSlice>],
) -> Objects {
    let services = world
        .values()
        .rev()
        .flat_map(|(s, _)| s.iter().cloned())
        .collect();
    let slices = world
        .values()
        .flat_map(|(_, sl)| sl.iter().cloned())
        .chain(unlabeled.iter().cloned())
        .collect();
    (services, slices)
}

fn run(seed: u64, steps: usize) {
    let mut r = Rng::new(seed);
    let mut node = random_node(&mut r);
    let mut inc = Incremental::new(node.clone(), Plan::default());
    let mut world: BTreeMap<ServiceId, Objects> = BTreeMap::new();
    let mut unlabeled = vec![];
    let mut previous = Plan::default();
    let mut origin = 0;
    for step in 0..steps {
        for _ in 0..1 + r.below(3) {
            origin += 1;
            match r.below(20) {
                0 => {
                    // A new node context: a new planner from the plan in
                    // force, given everything again (as the agent does).
                    node = random_node(&mut r);
                    inc = Incremental::new(node.clone(), previous.clone());
                    for (id, (services, slices)) in &world {
                        inc.set(id.clone(), services.clone(), slices.clone());
                    }
                    inc.set_unlabeled(&unlabeled);
                }
                1 => {
                    unlabeled = (0..r.below(2))
                        .map(|n| random_slice(&mut r, None, n as usize, origin))
                        .collect();
                    inc.set_unlabeled(&unlabeled);
                }
                n => {
                    let id = random_id(&mut r);
                    let (mut services, mut slices) = world.remove(&id).unwrap_or_default();
                    match n {
                        // Gone altogether.
                        2 | 3 => {
                            services.clear();
                            slices.clear();
                        }
                        // A repeated definition, as two manifests may hold.
                        4 => services.push(random_service(&mut r, &id, origin)),
                        5..=11 => services = vec![random_service(&mut r, &id, origin)],
                        12 => services.clear(),
                        _ => {
                            slices = (0..r.below(3))
                                .map(|n| random_slice(&mut r, Some(&id), n as usize, origin))
                                .collect()
                        }
                    }
                    inc.set(id.clone(), services.clone(), slices.clone());
                    if !services.is_empty() || !slices.is_empty() {
                        world.insert(id, (services, slices));
                    }
                }
            }
        }
        let changed = inc.commit();
        let (services, slices) = full_inputs(&world, &unlabeled);
        let mut full = compile_after(&services, &slices, &node, &previous);
        full.keep_refused_from(&previous);
        assert_eq!(
            inc.plan(),
            &full,
            "seed {seed} step {step}: incremental plan differs from the full compile"
        );
        let really: BTreeSet<FrontendKey> = previous
            .frontends
            .keys()
            .chain(full.frontends.keys())
            .filter(|k| previous.frontends.get(k) != full.frontends.get(k))
            .copied()
            .collect();
        assert!(
            changed.is_superset(&really),
            "seed {seed} step {step}: changed {changed:?}, really {really:?}"
        );
        previous = full;
    }
}

#[test]
fn incremental_equals_full_compile_over_random_changes() {
    for seed in 0..200 {
        run(seed, 60);
    }
}

#[test]
fn random_runs_do_meet_clashes_refusals_and_kept_frontends() {
    // Guards the generator: a pool that never clashed would prove little.
    let mut clashes = 0;
    let mut kept = 0;
    let mut r = Rng::new(7);
    let node = random_node(&mut r);
    let mut previous = Plan::default();
    for step in 0..2000 {
        let services: Vec<_> = (0..6)
            .map(|i| {
                let id = random_id(&mut r);
                random_service(&mut r, &id, step * 10 + i)
            })
            .collect();
        let mut p = compile_after(&services, &[], &node, &previous);
        clashes += p
            .problems
            .iter()
            .filter(|x| x.message.contains("already used"))
            .count();
        let before = p.frontends.len();
        p.keep_refused_from(&previous);
        kept += p.frontends.len() - before;
        previous = p;
    }
    assert!(clashes > 100 && kept > 10, "clashes {clashes}, kept {kept}");
}

#[test]
fn starting_from_a_previous_plan_drops_what_is_gone() {
    let mut r = Rng::new(1);
    let node = NodeContext::default();
    let id = ServiceId::new("a", "s0");
    let svc = random_service(&mut r, &id, 1);
    let before = compile_after(std::slice::from_ref(&svc), &[], &node, &Plan::default());
    assert!(
        !before.frontends.is_empty() || !before.refused.is_empty() || !before.skipped.is_empty()
    );
    let mut inc = Incremental::new(node, before.clone());
    let changed = inc.commit();
    assert!(inc.plan().frontends.is_empty());
    assert_eq!(changed, before.frontends.keys().copied().collect());
}
