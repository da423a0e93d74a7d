//! `cargo xtask demo`: the scenario a new user tries first, on a two-node
//! cluster built from network namespaces. Prints what a person at a terminal
//! would see and exits non-zero when what it shows is not what it claims.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};
use integration_tests::{
    agent::{Agent, ManifestDir},
    topology::{Pod, Topology},
    traffic::{self, Server},
};

const REDIS_IP: &str = "10.96.0.20";
const DUAL_IP4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 90);
const DUAL_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x90);

fn heading(s: &str) {
    println!("\n\x1b[1m== {s}\x1b[0m");
}

fn myapp_service(affinity: bool) -> String {
    let aff = if affinity {
        "  sessionAffinity: ClientIP\n"
    } else {
        ""
    };
    format!(
        r#"apiVersion: v1
kind: Service
metadata:
  name: myapp
spec:
  type: NodePort
  clusterIP: 10.96.0.80
  selector: {{app: myapp}}
{aff}  ports:
  - {{port: 80, targetPort: 80, nodePort: 30080}}
"#
    )
}

/// A Pod as the API server shows it: `podIPs` lists its IPv6 address too
/// when it has one (a dual-stack pod).
fn pod(
    name: &str,
    app: &str,
    ip: Ipv4Addr,
    ip6: Option<Ipv6Addr>,
    node: &str,
    port: u16,
) -> String {
    let ips = match ip6 {
        Some(ip6) => format!("[{{ip: {ip}}}, {{ip: '{ip6}'}}]"),
        None => format!("[{{ip: {ip}}}]"),
    };
    format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: {name}, labels: {{app: {app}}}}}
spec:
  nodeName: {node}
  containers: [{{name: main, image: example/{app}, ports: [{{containerPort: {port}}}]}}]
status:
  podIP: {ip}
  podIPs: {ips}
  conditions: [{{type: Ready, status: "True"}}]
---
"#
    )
}

const OTHER_SERVICES: &str = r#"apiVersion: v1
kind: Service
metadata: {name: redis}
spec:
  clusterIP: 10.96.0.20
  selector: {app: redis}
  ports: [{name: redis, port: 6379, targetPort: 6379}]
---
apiVersion: v1
kind: Service
metadata: {name: myapp-svc}
spec:
  clusterIP: None
  selector: {app: myapp}
  ports: [{name: http, port: 80}]
"#;

/// A dual-stack Service over the myapp pods: one ClusterIP per family, the
/// endpoints of each from the pods' `podIPs` of that family (the manifest
/// source makes one EndpointSlice per family, as the controller does).
fn dual_stack_service() -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: myapp-dual}}
spec:
  ipFamilyPolicy: RequireDualStack
  ipFamilies: [IPv4, IPv6]
  clusterIP: {DUAL_IP4}
  clusterIPs: [{DUAL_IP4}, '{DUAL_IP6}']
  selector: {{app: myapp}}
  ports: [{{name: http, port: 80, targetPort: 80}}]
---
"#
    )
}

/// The line of `list` for `frontend`, if it has `n` backends on port 80.
fn list_line<'a>(list: &'a str, frontend: &str, n: usize) -> Option<&'a str> {
    list.lines()
        .find(|l| l.starts_with(frontend))
        .filter(|l| l.split(" # ").next().unwrap_or("").matches(":80").count() == n + 1)
}

/// `curl -s http://ADDR/hostname.html` from the outside client, 12 times.
fn curl_loop(client_ns: &str, node_ip: Ipv4Addr) -> anyhow::Result<Vec<String>> {
    println!("$ for i in $(seq 12); do curl -s http://{node_ip}:30080/hostname.html; done");
    let mut answers = vec![];
    for _ in 0..12 {
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{client_ns}"))
            .args(["curl", "-s", "--max-time", "3"])
            .arg(format!("http://{node_ip}:30080/hostname.html"))
            .output()
            .context("running curl (cargo xtask setup installs it)")?;
        let body = String::from_utf8_lossy(&out.stdout).trim().to_string();
        ensure!(
            out.status.success() && !body.is_empty(),
            "curl to {node_ip}:30080 failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        println!("{body}");
        answers.push(body);
    }
    Ok(answers)
}

fn tally(answers: &[String]) -> BTreeMap<&str, usize> {
    let mut t = BTreeMap::new();
    for a in answers {
        *t.entry(a.as_str()).or_default() += 1;
    }
    t
}

/// Checks the spread claim: the 12 shown came from more than one pod, and
/// a larger quiet sample reaches all three.
fn check_spread(
    client: &integration_tests::netns::Netns,
    node_ip: Ipv4Addr,
    shown: &[String],
) -> anyhow::Result<()> {
    let t = tally(shown);
    println!("   -> {} answers from {} pods: {t:?}", shown.len(), t.len());
    ensure!(
        t.len() >= 2,
        "12 requests all went to one pod without affinity"
    );
    let to = SocketAddrV4::new(node_ip, 30080);
    let more = client.within(move || {
        (0..90)
            .map(|_| traffic::http_get(to, "/hostname.html", Duration::from_secs(3)))
            .collect::<Result<Vec<_>, _>>()
    })??;
    let all = tally(&more);
    println!("   -> 90 more requests: {all:?}");
    ensure!(
        all.len() == 3,
        "90 requests did not reach all 3 pods: {all:?}"
    );
    Ok(())
}

/// Packets XDP sent back out of the interface they came in on.
fn xdp_sent(agent: &Agent) -> anyhow::Result<u64> {
    let v: serde_json::Value = serde_json::from_str(&agent.cli("stats", &["-o", "json"])?)?;
    v["reasons"]["xdp_tx"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no xdp_tx counter in stats"))
}

/// The resolv.conf a pod gets (`ip netns exec` mounts it over
/// /etc/resolv.conf for the command it runs); removed on drop.
struct PodResolvConf(std::path::PathBuf);

impl PodResolvConf {
    fn new(ns: &str) -> anyhow::Result<Self> {
        let dir = std::path::Path::new("/etc/netns").join(ns);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("resolv.conf"),
            "search default.svc.cluster.local svc.cluster.local cluster.local\nnameserver 10.96.0.10\noptions ndots:5\n",
        )?;
        Ok(Self(dir))
    }
}

impl Drop for PodResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        // /etc/netns itself, unless something else keeps files there.
        if let Some(parent) = self.0.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// `dig ARGS` as a pod runs it: in its namespace, with its resolv.conf.
fn dig_in_pod(ns: &str, args: &[&str]) -> anyhow::Result<String> {
    println!("$ dig {}", args.join(" "));
    let _conf = PodResolvConf::new(ns)?;
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "dig"])
        .args(args)
        .output()
        .context("running dig (cargo xtask setup installs bind9-dnsutils)")?;
    ensure!(
        out.status.success(),
        "dig {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The dual-stack Service from pod `from`: a few connections to each
/// ClusterIP, each answered by a myapp pod that saw the pod's own address of
/// that family, and the Service's two frontends in `list`.
fn dual_stack_section(agent: &Agent, from: &Pod) -> anyhow::Result<()> {
    heading(&format!(
        "Dual-stack Service myapp-dual (RequireDualStack, ipFamilies [IPv4, IPv6]) from pod {} on node-{}",
        from.name,
        from.node + 1
    ));
    let fe4 = format!("{DUAL_IP4}:80/TCP");
    let fe6 = format!("[{DUAL_IP6}]:80/TCP");
    let list = agent.wait_list("both families of myapp-dual", |l| {
        list_line(l, &fe4, 3).is_some() && list_line(l, &fe6, 3).is_some()
    })?;
    let own6 = from
        .ip6
        .context("the demo topology gives every pod an IPv6 address")?;
    let mut answered: BTreeMap<String, usize> = BTreeMap::new();
    for (to, own) in [
        (SocketAddr::new(DUAL_IP4.into(), 80), IpAddr::from(from.ip)),
        (SocketAddr::new(DUAL_IP6.into(), 80), IpAddr::from(own6)),
    ] {
        let replies = from.ns.within(move || {
            (0..3)
                .map(|_| traffic::tcp_ask(to, Duration::from_secs(3)))
                .collect::<Result<Vec<_>, _>>()
        })??;
        for r in replies {
            println!(
                "  {} -> {to} answered by {} (it saw the client as {}, the pod's own address)",
                from.name, r.server, r.seen_from
            );
            ensure!(
                r.server.starts_with("myapp-"),
                "{to} answered by {}",
                r.server
            );
            ensure!(
                r.seen_from.ip() == own,
                "{to}: the backend saw {} instead of the pod's {own}",
                r.seen_from
            );
            *answered.entry(r.server).or_default() += 1;
        }
    }
    println!(
        "   -> 6 answers over both families from {} pods: {answered:?}",
        answered.len()
    );
    println!("$ service-agent list | grep myapp-dual");
    let lines: Vec<&str> = list
        .lines()
        .filter(|l| l.contains("default/myapp-dual"))
        .collect();
    for l in &lines {
        println!("{l}");
    }
    ensure!(
        lines.len() == 2,
        "list shows {} lines for myapp-dual, not one per family",
        lines.len()
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    heading("A two-node cluster in network namespaces (nothing leaves this machine)");
    let mut topo = Topology::dual_stack()?;
    let n1 = topo.add_node()?;
    let n2 = topo.add_node()?;
    let c = topo.add_client()?;
    // Deployment myapp: pods on both nodes; redis on node 2; a client pod on node 1.
    let placement = [
        ("myapp-6d8f7-hx2lq", n1),
        ("myapp-6d8f7-p9zkt", n2),
        ("myapp-6d8f7-w4rmd", n1),
    ];
    let mut servers = vec![];
    let mut manifests = String::new();
    for (name, node) in placement {
        let k = topo.add_pod(node, name)?;
        let p = &topo.pods[k];
        servers.push(Server::start(&p.ns, p.ip, 80, name)?);
        if let Some(ip6) = p.ip6 {
            servers.push(Server::start(&p.ns, ip6, 80, name)?);
        }
        let node = format!("node-{}", node + 1);
        manifests.push_str(&pod(name, "myapp", p.ip, p.ip6, &node, 80));
    }
    let r = topo.add_pod(n2, "redis-0")?;
    let rp = &topo.pods[r];
    servers.push(Server::start(&rp.ns, rp.ip, 6379, "redis-0")?);
    manifests.push_str(&pod("redis-0", "redis", rp.ip, rp.ip6, "node-2", 6379));
    let cp = topo.add_pod(n1, "toolbox")?;
    let v6 = |a: Option<Ipv6Addr>| a.map(|a| a.to_string()).unwrap_or_default();
    for n in &topo.nodes {
        println!(
            "  node-{} {} {} (pods 10.244.{}.0/24, fd00:10:244:{}::/64)",
            n.index,
            n.ip,
            v6(n.ip6),
            n.index,
            n.index
        );
    }
    for p in &topo.pods {
        println!(
            "  pod {:<20} {:<12} {:<18} on node-{}",
            p.name,
            p.ip.to_string(),
            v6(p.ip6),
            p.node + 1
        );
    }
    println!(
        "  client {} {} (a laptop on the node network, outside the cluster)",
        topo.clients[c].ip,
        v6(topo.clients[c].ip6)
    );

    let dir = ManifestDir::new()?;
    dir.write("pods.yaml", &manifests)?;
    dir.write("myapp.yaml", &myapp_service(false))?;
    dir.write("other.yaml", OTHER_SERVICES)?;
    dir.write("myapp-dual.yaml", &dual_stack_service())?;
    heading("service-agent on each node, same manifests, its own pin directory");
    let mut a1 = Agent::start(
        &topo.nodes[n1].ns,
        &dir.path,
        &["--node-name", "node-1", "--dns"],
    )?;
    let mut a2 = Agent::start(
        &topo.nodes[n2].ns,
        &dir.path,
        &["--node-name", "node-2", "--dns"],
    )?;
    println!(
        "  node-1: {}\n  node-2: {}",
        a1.pin_dir.display(),
        a2.pin_dir.display()
    );

    let client_ns = topo.clients[c].ns.name.clone();
    for (i, node) in [n1, n2].into_iter().enumerate() {
        let ip = topo.nodes[node].ip;
        heading(&format!(
            "NodePort 30080 on node-{} from outside the cluster",
            i + 1
        ));
        let shown = curl_loop(&client_ns, ip)?;
        check_spread(&topo.clients[c].ns, ip, &shown)?;
    }

    heading("Both agents restarted with --xdp native: the NodePort fast path");
    // The namespace links stand in for wires: senders complete their checksums.
    topo.emulate_wires()?;
    for a in [&mut a1, &mut a2] {
        a.kill();
        a.set_flag("--xdp", "native");
        a.spawn()?;
    }
    let before = xdp_sent(&a1)?;
    let shown = curl_loop(&client_ns, topo.nodes[n1].ip)?;
    check_spread(&topo.clients[c].ns, topo.nodes[n1].ip, &shown)?;
    let sent = xdp_sent(&a1)? - before;
    println!(
        "   -> node-1's XDP program forwarded {sent} packets of the flows to node-2's pod (both directions) before the kernel built an skb"
    );
    ensure!(sent > 0, "XDP forwarded nothing");

    heading("kubectl patch service myapp -p '{\"spec\":{\"sessionAffinity\":\"ClientIP\"}}'");
    dir.write("myapp.yaml", &myapp_service(true))?;
    a1.wait_list("affinity programmed", |l| {
        l.contains("affinity ClientIP 10800s")
    })?;
    let shown = curl_loop(&client_ns, topo.nodes[n1].ip)?;
    let t = tally(&shown);
    println!("   -> {} answers from {} pod: {t:?}", shown.len(), t.len());
    ensure!(
        t.len() == 1,
        "with ClientIP affinity every answer must come from one pod: {t:?}"
    );

    heading(&format!(
        "ClusterIP redis {REDIS_IP}:6379 from pod toolbox on node-1"
    ));
    let to = SocketAddrV4::new(REDIS_IP.parse()?, 6379);
    let reply = topo.pods[cp]
        .ns
        .within(move || traffic::tcp_ask(to, Duration::from_secs(3)))??;
    println!(
        "  toolbox -> {REDIS_IP}:6379 answered by {} (it saw the client as {}, the pod's own address)",
        reply.server, reply.seen_from
    );
    ensure!(
        reply.server == "redis-0",
        "redis answered by {}",
        reply.server
    );
    ensure!(
        reply.seen_from.ip() == std::net::IpAddr::V4(topo.pods[cp].ip),
        "source address not preserved"
    );

    dual_stack_section(&a1, &topo.pods[cp])?;

    heading("service-agent list (node-1), read back from the pinned maps");
    let list = a1.list()?;
    print!("{list}");
    ensure!(
        list.contains("skipped default/myapp-svc: clusterIP None: headless"),
        "headless Service not shown as skipped"
    );
    ensure!(
        list.contains("*:30080/TCP ->") && list.contains("10.96.0.20:6379/TCP ->"),
        "list lacks the NodePort or redis"
    );

    heading(&format!(
        "bpftool map dump pinned {}/SERVICES (first entry)",
        a1.pin_dir.display()
    ));
    let dump = Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(a1.pin_dir.join("SERVICES"))
        .output()?;
    let text = String::from_utf8_lossy(&dump.stdout);
    let excerpt: Vec<&str> = text.lines().take(18).collect();
    println!("{}", excerpt.join("\n"));
    if !text.contains("\"backend_id\"") {
        bail!("bpftool did not print the map's field names");
    }
    let toolbox = topo.pods[cp].ns.name.clone();
    let myapp_ips: Vec<String> = topo
        .pods
        .iter()
        .filter(|p| p.name.starts_with("myapp-"))
        .map(|p| p.ip.to_string())
        .collect();
    heading("DNS from pod toolbox: the agent serves kube-dns on 10.96.0.10");
    let out = dig_in_pod(
        &toolbox,
        &[
            "-t",
            "A",
            "myapp-svc.default.svc.cluster.local.",
            "@10.96.0.10",
        ],
    )?;
    print!("{out}");
    for ip in &myapp_ips {
        ensure!(
            out.lines().any(|l| l.ends_with(&format!("A\t{ip}"))),
            "dig of headless myapp-svc lacks {ip}"
        );
    }
    let out = dig_in_pod(&toolbox, &["redis.default.svc.cluster.local", "+short"])?;
    print!("{out}");
    ensure!(out.trim() == REDIS_IP, "dig +short redis gave {out:?}");

    heading("stats (node-1)");
    print!("{}", a1.cli("stats", &[])?);
    drop((a1, a2, servers));
    heading("done: every namespace, pin and process made here is removed");
    Ok(())
}
