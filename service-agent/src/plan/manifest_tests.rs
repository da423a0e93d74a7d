//! The incremental planner fed from the manifest directory's per-Service
//! index, as the agent feeds it, against the full compile of the same files.
use std::{collections::BTreeSet, fs};

use super::{Incremental, NodeContext, Plan, compile_after};
use crate::{model::ServiceId, source::manifest::ManifestDir};

/// The planner fed Service by Service from the index, as the agent does.
fn incremental(md: &ManifestDir, planner: &mut Incremental, ids: &BTreeSet<ServiceId>) {
    for id in ids {
        let (services, slices) = md.objects(id);
        planner.set(id.clone(), services, slices);
    }
    planner.set_unlabeled(&md.unlabeled_slices());
    planner.commit();
}

fn full(md: &ManifestDir, previous: &Plan) -> Plan {
    let c = md.cluster();
    let node = NodeContext::default();
    let mut p = compile_after(&c.services, &c.all_endpoint_slices(), &node, previous);
    p.keep_refused_from(previous);
    p
}

const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: db}
spec: {clusterIP: 10.96.0.11, ports: [{port: 5432}]}
---
apiVersion: v1
kind: Endpoints
metadata: {name: db}
subsets: [{addresses: [{ip: 10.1.0.9}], ports: [{port: 5432}]}]
"#;

fn pods(ips: &[&str]) -> String {
    ips.iter()
        .enumerate()
        .map(|(i, ip)| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: web-{i}, labels: {{app: web, tier: x}}}}\n\
                 spec: {{containers: [{{name: c, ports: [{{name: http, containerPort: 8080}}]}}]}}\n\
                 status: {{podIP: {ip}, conditions: [{{type: Ready, status: \"True\"}}]}}\n---\n"
            )
        })
        .collect()
}

#[test]
fn per_service_objects_give_the_full_compile_and_a_pod_edit_names_its_service() {
    let dir = std::env::temp_dir().join(format!("svc-manifest-idx-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("a.yaml"), WEB).unwrap();
    fs::write(dir.join("pods.yaml"), pods(&["10.1.0.1", "10.1.0.2"])).unwrap();
    let mut md = ManifestDir::default();
    md.load_all(&dir);
    let mut planner = Incremental::default();
    let ids: BTreeSet<ServiceId> = md.ids().cloned().collect();
    incremental(&md, &mut planner, &ids);
    let expected = full(&md, &Plan::default());
    assert_eq!(planner.plan(), &expected);
    assert_eq!(expected.frontends.len(), 2, "{expected:?}");

    fs::write(dir.join("pods.yaml"), pods(&["10.1.0.1", "10.1.0.3"])).unwrap();
    let changes = md.load_paths(&dir, &BTreeSet::from([dir.join("pods.yaml")]));
    assert_eq!(
        changes.services,
        BTreeSet::from([ServiceId::new("default", "web")])
    );
    let previous = planner.plan().clone();
    incremental(&md, &mut planner, &changes.services);
    let expected = full(&md, &previous);
    assert_eq!(planner.plan(), &expected);
    let web = expected
        .frontends
        .values()
        .find(|f| &*f.service == "default/web")
        .unwrap();
    assert_eq!(
        web.backends
            .iter()
            .map(|b| b.to_string())
            .collect::<Vec<_>>(),
        ["10.1.0.1:8080", "10.1.0.3:8080"]
    );

    // An unchanged rewrite names nothing; a removed file takes its objects.
    fs::write(dir.join("a.yaml"), WEB).unwrap();
    let changes = md.load_paths(&dir, &BTreeSet::from([dir.join("a.yaml")]));
    assert!(changes.services.is_empty(), "{changes:?}");
    fs::remove_file(dir.join("a.yaml")).unwrap();
    let changes = md.load_paths(&dir, &BTreeSet::from([dir.join("a.yaml")]));
    assert_eq!(changes.services.len(), 2);
    let previous = planner.plan().clone();
    incremental(&md, &mut planner, &changes.services);
    assert_eq!(planner.plan(), &full(&md, &previous));
    assert!(planner.plan().frontends.is_empty());
    fs::remove_dir_all(&dir).unwrap();
}
