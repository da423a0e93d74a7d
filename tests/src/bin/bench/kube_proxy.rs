//! kube-proxy's iptables and nftables layouts for the same Services.
use std::{
    fmt::Write as _,
    io::Write as _,
    process::{Command, Stdio},
    time::Instant,
};

use integration_tests::{netns::Netns, unique};

use crate::{BACKENDS_PER_SERVICE, backend_ip, vip};

/// kube-proxy's iptables layout for the same Services: KUBE-SERVICES jumps
/// to a KUBE-SVC chain per Service, which picks a KUBE-SEP chain with
/// `statistic`, which DNATs.
pub fn iptables_rules(services: u32) -> String {
    let mut s = String::from("*nat\n:KUBE-SERVICES - [0:0]\n");
    let chain = |kind: &str, i: u32, k: u32| format!("KUBE-{kind}-{i:08X}{k:02}");
    for i in 0..services {
        let _ = writeln!(s, ":{} - [0:0]", chain("SVC", i, 0));
        for k in 0..BACKENDS_PER_SERVICE {
            let _ = writeln!(s, ":{} - [0:0]", chain("SEP", i, k));
        }
    }
    s.push_str("-A PREROUTING -j KUBE-SERVICES\n");
    for i in 0..services {
        let svc = chain("SVC", i, 0);
        let _ = writeln!(
            s,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m tcp --dport 80 -j {svc}",
            vip(i)
        );
        for k in 0..BACKENDS_PER_SERVICE {
            let sep = chain("SEP", i, k);
            let left = BACKENDS_PER_SERVICE - k;
            if left > 1 {
                let _ = writeln!(
                    s,
                    "-A {svc} -m statistic --mode random --probability {:.11} -j {sep}",
                    1.0 / left as f64
                );
            } else {
                let _ = writeln!(s, "-A {svc} -j {sep}");
            }
            let _ = writeln!(
                s,
                "-A {sep} -p tcp -m tcp -j DNAT --to-destination {}:8080",
                backend_ip(i, k)
            );
        }
    }
    s.push_str("COMMIT\n");
    s
}

/// kube-proxy's nftables layout: one verdict map from (address, protocol,
/// port) to a per-Service chain that picks an endpoint with numgen.
pub fn nft_rules(services: u32) -> String {
    let mut s = String::from("table ip kube-proxy {\n");
    for i in 0..services {
        for k in 0..BACKENDS_PER_SERVICE {
            let _ = writeln!(
                s,
                " chain sep-{i}-{k} {{ meta l4proto tcp dnat to {}:8080; }}",
                backend_ip(i, k)
            );
        }
        let picks: Vec<String> = (0..BACKENDS_PER_SERVICE)
            .map(|k| format!("{k} : goto sep-{i}-{k}"))
            .collect();
        let _ = writeln!(
            s,
            " chain svc-{i} {{ numgen random mod {BACKENDS_PER_SERVICE} vmap {{ {} }}; }}",
            picks.join(", ")
        );
    }
    let elements: Vec<String> = (0..services)
        .map(|i| format!("{} . tcp . 80 : goto svc-{i}", vip(i)))
        .collect();
    let _ = writeln!(
        s,
        " map service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict; elements = {{ {} }}; }}",
        elements.join(", ")
    );
    s.push_str(" chain services { type nat hook prerouting priority dstnat; ip daddr . meta l4proto . th dport vmap @service-ips; }\n}\n");
    s
}

/// Times loading `rules` with `cmd` inside a fresh namespace of its own.
pub fn time_restore(cmd: &[&str], rules: &str) -> Option<f64> {
    let ns = Netns::new(&unique("bench-ipt")).ok()?;
    let t = Instant::now();
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .args(cmd)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    child.stdin.take()?.write_all(rules.as_bytes()).ok()?;
    let out = child.wait_with_output().ok()?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    if !out.status.success() {
        eprintln!(
            "{}: {}",
            cmd.join(" "),
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .next()
                .unwrap_or("")
        );
        return None;
    }
    Some(ms)
}
