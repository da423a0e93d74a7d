//! Kubernetes YAML for tests, written the way a person would write it.
use std::net::Ipv4Addr;

/// A Pod with `app=<app>`, its IP, readiness, and a named container port.
pub fn pod(name: &str, app: &str, ip: Ipv4Addr, ready: bool, node: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: {name}
  labels: {{app: {app}}}
spec:
  nodeName: {node}
  containers:
  - name: app
    image: example/app
    ports:
    - {{name: http, containerPort: 8080}}
    - {{name: dns, containerPort: 8080, protocol: UDP}}
status:
  podIP: {ip}
  conditions:
  - {{type: Ready, status: "{}"}}
"#,
        if ready { "True" } else { "False" }
    )
}

/// A ClusterIP Service selecting `app=<app>`; `ports` are
/// `(name, protocol, port, targetPort)` with targetPort a number or a name.
pub fn service(
    name: &str,
    app: &str,
    cluster_ip: &str,
    ports: &[(&str, &str, u16, &str)],
    extra_spec: &str,
) -> String {
    let mut p = String::new();
    for (n, proto, port, target) in ports {
        let target = if target.parse::<u32>().is_ok() {
            target.to_string()
        } else {
            format!("\"{target}\"")
        };
        p.push_str(&format!(
            "  - {{name: \"{n}\", protocol: {proto}, port: {port}, targetPort: {target}}}\n"
        ));
    }
    format!(
        r#"apiVersion: v1
kind: Service
metadata:
  name: {name}
spec:
  clusterIP: {cluster_ip}
  selector: {{app: {app}}}
{extra_spec}  ports:
{p}"#
    )
}
