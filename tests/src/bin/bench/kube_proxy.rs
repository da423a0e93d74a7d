//! kube-proxy's iptables and nftables layouts for the same Services, as
//! kube-proxy's two modes write them (chain names, masquerade marks, the
//! per-endpoint hairpin rule, the filter-table checks), so that loading them
//! and sending traffic through them costs what it costs under kube-proxy.
//!
//! Filler Services are `bench/svc-<i>` on `vip(i)`:80 with 10 endpoints that
//! do not exist; the measured Service, when given, is a real one whose
//! endpoints are pods, and it comes last (in the iptables layout that is the
//! worst case: KUBE-SERVICES is matched rule by rule).
use std::{
    fmt::Write as _,
    io::Write as _,
    net::Ipv4Addr,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};
use integration_tests::{netns::Netns, unique};

use crate::{BACKENDS_PER_SERVICE, backend_ip, vip};

/// kube-proxy's --cluster-cidr in these layouts: the pods' range, so that
/// pod-to-Service traffic is not masqueraded (as under kube-proxy).
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// kube-proxy's default masquerade bit 14.
const MASQ_MARK: &str = "0x4000";

/// One Service port as both layouts need it.
#[derive(Clone, Debug)]
pub struct SvcPort {
    /// "namespace/name:port" as kube-proxy prints it in comments.
    pub name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub endpoints: Vec<(Ipv4Addr, u16)>,
}

fn filler(i: u32) -> SvcPort {
    SvcPort {
        name: format!("bench/svc-{i}:http"),
        vip: vip(i),
        port: 80,
        endpoints: (0..BACKENDS_PER_SERVICE)
            .map(|k| (backend_ip(i, k), 8080))
            .collect(),
    }
}

/// `fillers` filler Services followed by `measured` (if any).
pub fn services(fillers: u32, measured: Option<&SvcPort>) -> Vec<SvcPort> {
    (0..fillers).map(filler).chain(measured.cloned()).collect()
}

/// A hash of `s` in base32, `chars` long: kube-proxy names its chains with
/// the base32 of a SHA-256 of the Service port (and endpoint); any
/// well-spread hash gives names of the same shape and length.
fn hash32(s: &str, chars: usize) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let fnv = |seed: u64| {
        s.bytes().fold(seed, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
        })
    };
    let mut bits = (fnv(0xcbf2_9ce4_8422_2325) as u128) << 64 | fnv(0x6c62_272e_07bb_0142) as u128;
    (0..chars)
        .map(|_| {
            let c = ALPHABET[(bits & 31) as usize] as char;
            bits >>= 5;
            c
        })
        .collect()
}

/// kube-proxy's iptables mode (nat and filter tables, iptables-restore
/// format) for `svcs`, in their order in KUBE-SERVICES.
pub fn iptables_rules(svcs: &[SvcPort]) -> String {
    let svc_chain = |s: &SvcPort| format!("KUBE-SVC-{}", hash32(&format!("{}tcp", s.name), 16));
    let sep_chain = |s: &SvcPort, ep: &(Ipv4Addr, u16)| {
        format!(
            "KUBE-SEP-{}",
            hash32(&format!("{}tcp{}:{}", s.name, ep.0, ep.1), 16)
        )
    };
    let mut s = String::new();
    // The filter table: every forwarded packet goes through KUBE-FORWARD,
    // every new connection through the (here empty) reject and firewall chains.
    s.push_str(
        "*filter\n\
         :KUBE-EXTERNAL-SERVICES - [0:0]\n\
         :KUBE-FORWARD - [0:0]\n\
         :KUBE-PROXY-FIREWALL - [0:0]\n\
         :KUBE-SERVICES - [0:0]\n\
         :KUBE-NODEPORTS - [0:0]\n\
         -A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A INPUT -m comment --comment \"kubernetes health check service ports\" -j KUBE-NODEPORTS\n\
         -A INPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A FORWARD -m comment --comment \"kubernetes forwarding rules\" -j KUBE-FORWARD\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes externally-visible service portals\" -j KUBE-EXTERNAL-SERVICES\n\
         -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes load balancer firewall\" -j KUBE-PROXY-FIREWALL\n\
         -A OUTPUT -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A KUBE-FORWARD -m conntrack --ctstate INVALID -j DROP\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding rules\" -m mark --mark 0x4000/0x4000 -j ACCEPT\n\
         -A KUBE-FORWARD -m comment --comment \"kubernetes forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n\
         COMMIT\n",
    );
    s.push_str(
        "*nat\n\
         :KUBE-SERVICES - [0:0]\n\
         :KUBE-NODEPORTS - [0:0]\n\
         :KUBE-POSTROUTING - [0:0]\n\
         :KUBE-MARK-MASQ - [0:0]\n",
    );
    for svc in svcs {
        let _ = writeln!(s, ":{} - [0:0]", svc_chain(svc));
        for ep in &svc.endpoints {
            let _ = writeln!(s, ":{} - [0:0]", sep_chain(svc, ep));
        }
    }
    let _ = write!(
        s,
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --set-xmark {MASQ_MARK}/{MASQ_MARK}\n\
         -A KUBE-POSTROUTING -m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --set-xmark {MASQ_MARK}/0x0\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n"
    );
    for svc in svcs {
        let chain = svc_chain(svc);
        let (name, vip, port) = (&svc.name, svc.vip, svc.port);
        let _ = writeln!(
            s,
            "-A KUBE-SERVICES -d {vip}/32 -p tcp -m comment --comment \"{name} cluster IP\" -m tcp --dport {port} -j {chain}"
        );
        let _ = writeln!(
            s,
            "-A {chain} ! -s {CLUSTER_CIDR} -d {vip}/32 -p tcp -m comment --comment \"{name} cluster IP\" -m tcp --dport {port} -j KUBE-MARK-MASQ"
        );
        let n = svc.endpoints.len();
        for (k, ep) in svc.endpoints.iter().enumerate() {
            let sep = sep_chain(svc, ep);
            // Endpoint k of n is taken with probability 1/(n-k) among those
            // left, so each is picked with probability 1/n overall.
            if k + 1 < n {
                let _ = writeln!(
                    s,
                    "-A {chain} -m comment --comment \"{name} -> {}:{}\" -m statistic --mode random --probability {:.11} -j {sep}",
                    ep.0,
                    ep.1,
                    1.0 / (n - k) as f64
                );
            } else {
                let _ = writeln!(
                    s,
                    "-A {chain} -m comment --comment \"{name} -> {}:{}\" -j {sep}",
                    ep.0, ep.1
                );
            }
            let _ = writeln!(
                s,
                "-A {sep} -s {}/32 -m comment --comment \"{name}\" -j KUBE-MARK-MASQ",
                ep.0
            );
            let _ = writeln!(
                s,
                "-A {sep} -p tcp -m comment --comment \"{name}\" -m tcp -j DNAT --to-destination {}:{}",
                ep.0, ep.1
            );
        }
    }
    s.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n\
         COMMIT\n",
    );
    s
}

/// The table and the fixed chains, sets and maps of kube-proxy's nftables
/// mode (`setupNFTables`), as `nft -f` commands.
fn nft_setup() -> String {
    let t = "ip kube-proxy";
    let mut s = format!("add table {t} {{ comment \"rules for kube-proxy\" ; }}\n");
    // Base chains at kube-proxy's priorities (dstnat = -100, srcnat = 100;
    // numbers, because nft only takes the names on some hooks).
    for (name, kind, hook, prio) in [
        ("filter-prerouting", "filter", "prerouting", -110),
        ("filter-input", "filter", "input", -110),
        ("filter-forward", "filter", "forward", -110),
        ("filter-output", "filter", "output", -110),
        ("filter-output-post-dnat", "filter", "output", -90),
        ("nat-prerouting", "nat", "prerouting", -100),
        ("nat-output", "nat", "output", -100),
        ("nat-postrouting", "nat", "postrouting", 100),
    ] {
        let _ = writeln!(
            s,
            "add chain {t} {name} {{ type {kind} hook {hook} priority {prio} ; }}"
        );
    }
    for chain in [
        "nodeport-endpoints-check",
        "service-endpoints-check",
        "firewall-check",
        "services",
        "masquerading",
        "cluster-ips-check",
        "mark-for-masquerade",
        "reject-chain",
    ] {
        let _ = writeln!(s, "add chain {t} {chain}");
    }
    for (to, from, extra) in [
        ("nodeport-endpoints-check", "filter-input", "ct state new "),
        ("service-endpoints-check", "filter-input", "ct state new "),
        ("service-endpoints-check", "filter-forward", "ct state new "),
        ("service-endpoints-check", "filter-output", "ct state new "),
        ("firewall-check", "filter-prerouting", "ct state new "),
        ("firewall-check", "filter-output", "ct state new "),
        ("services", "nat-output", ""),
        ("services", "nat-prerouting", ""),
        ("masquerading", "nat-postrouting", ""),
        ("cluster-ips-check", "filter-forward", "ct state new "),
        (
            "cluster-ips-check",
            "filter-output-post-dnat",
            "ct state new ",
        ),
    ] {
        let _ = writeln!(s, "add rule {t} {from} {extra}jump {to}");
    }
    let _ = write!(
        s,
        "add rule {t} mark-for-masquerade mark set mark or {MASQ_MARK}\n\
         add rule {t} masquerading mark and {MASQ_MARK} == 0 return\n\
         add rule {t} masquerading mark set mark xor {MASQ_MARK}\n\
         add rule {t} masquerading masquerade fully-random\n\
         add set {t} cluster-ips {{ type ipv4_addr ; comment \"Active ClusterIPs\" ; }}\n\
         add rule {t} cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"\n\
         add map {t} no-endpoint-services {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to services with no endpoints\" ; }}\n\
         add map {t} no-endpoint-nodeports {{ type inet_proto . inet_service : verdict ; comment \"vmap to drop or reject packets to service nodeports with no endpoints\" ; }}\n\
         add rule {t} reject-chain reject\n\
         add rule {t} service-endpoints-check ip daddr . meta l4proto . th dport vmap @no-endpoint-services\n\
         add rule {t} nodeport-endpoints-check ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @no-endpoint-nodeports\n\
         add map {t} firewall-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"destinations that are subject to LoadBalancerSourceRanges\" ; }}\n\
         add rule {t} firewall-check ip daddr . meta l4proto . th dport vmap @firewall-ips\n\
         add map {t} service-ips {{ type ipv4_addr . inet_proto . inet_service : verdict ; comment \"ClusterIP, ExternalIP and LoadBalancer IP traffic\" ; }}\n\
         add map {t} service-nodeports {{ type inet_proto . inet_service : verdict ; comment \"NodePort traffic\" ; }}\n\
         add rule {t} services ip daddr . meta l4proto . th dport vmap @service-ips\n\
         add rule {t} services fib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @service-nodeports\n"
    );
    s
}

/// The chains, rules and map elements of `svcs` in kube-proxy's nftables
/// layout: a `service-<hash>-<ns>/<name>/tcp/<port>` chain per Service port
/// picking an `endpoint-<hash>-...__<ip>/<port>` chain with `numgen random
/// mod N vmap`, reached from the `service-ips` verdict map. The elements go
/// in one `add element` block per map, as one list.
fn nft_services(svcs: &[SvcPort]) -> String {
    let t = "ip kube-proxy";
    let base = |svc: &SvcPort| {
        let (ns_name, port) = svc.name.split_once(':').unwrap_or((&svc.name, ""));
        let plain = format!("{ns_name}/tcp/{port}");
        (hash32(&plain, 8), plain)
    };
    let svc_chain = |svc: &SvcPort| {
        let (h, plain) = base(svc);
        format!("service-{h}-{plain}")
    };
    let ep_chain = |svc: &SvcPort, ep: &(Ipv4Addr, u16)| {
        let (_, plain) = base(svc);
        let full = format!("{plain}__{}/{}", ep.0, ep.1);
        format!("endpoint-{}-{full}", hash32(&full, 8))
    };
    let mut s = String::new();
    for svc in svcs {
        let _ = writeln!(s, "add chain {t} {}", svc_chain(svc));
        for ep in &svc.endpoints {
            let _ = writeln!(s, "add chain {t} {}", ep_chain(svc, ep));
        }
    }
    for svc in svcs {
        let chain = svc_chain(svc);
        let _ = writeln!(
            s,
            "add rule {t} {chain} ip daddr {} tcp dport {} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade",
            svc.vip, svc.port
        );
        let picks: Vec<String> = svc
            .endpoints
            .iter()
            .enumerate()
            .map(|(k, ep)| format!("{k} : goto {}", ep_chain(svc, ep)))
            .collect();
        let _ = writeln!(
            s,
            "add rule {t} {chain} numgen random mod {} vmap {{ {} }}",
            svc.endpoints.len(),
            picks.join(" , ")
        );
        for ep in &svc.endpoints {
            let ec = ep_chain(svc, ep);
            let _ = writeln!(
                s,
                "add rule {t} {ec} ip saddr {} jump mark-for-masquerade",
                ep.0
            );
            let _ = writeln!(
                s,
                "add rule {t} {ec} meta l4proto tcp dnat to {}:{}",
                ep.0, ep.1
            );
        }
    }
    let ips: Vec<String> = svcs.iter().map(|svc| svc.vip.to_string()).collect();
    let _ = writeln!(s, "add element {t} cluster-ips {{ {} }}", ips.join(" , "));
    let elems: Vec<String> = svcs
        .iter()
        .map(|svc| format!("{} . tcp . {} : goto {}", svc.vip, svc.port, svc_chain(svc)))
        .collect();
    let _ = writeln!(s, "add element {t} service-ips {{ {} }}", elems.join(" , "));
    s
}

/// kube-proxy's nftables layout for `svcs` as `nft -f` transactions: the
/// first sets up the table, each further one adds `per_tx` Services.
///
/// Why not one transaction, as kube-proxy's first full sync does: on this
/// kernel nf_tables binds each anonymous set (every Service's `numgen ...
/// vmap { }`) by walking the whole pending transaction
/// (`__nft_set_trans_bind`), which makes one transaction quadratic in the
/// number of Services (206 s for 10,000 in one, under 1 s for 1,000; see
/// `single_transaction`). Smaller transactions are what kube-proxy's
/// partial syncs send, and produce the same ruleset.
pub fn nft_transactions(svcs: &[SvcPort], per_tx: usize) -> Vec<String> {
    std::iter::once(nft_setup())
        .chain(svcs.chunks(per_tx.max(1)).map(nft_services))
        .collect()
}

/// The whole layout as one transaction, as kube-proxy's first full sync.
pub fn nft_single_transaction(svcs: &[SvcPort]) -> String {
    nft_setup() + &nft_services(svcs)
}

/// Feeds `input` to `cmd` inside `ns` (never the host's own namespace) and
/// returns how long it took in ms.
pub fn restore_in(ns: &Netns, cmd: &[&str], input: &str) -> anyhow::Result<f64> {
    let t = Instant::now();
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .args(cmd)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| cmd.join(" "))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    if !out.status.success() {
        bail!(
            "{}: {}",
            cmd.join(" "),
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .take(3)
                .collect::<Vec<_>>()
                .join(" / ")
        );
    }
    Ok(ms)
}

/// Loads kube-proxy's iptables layout into `ns` in one iptables-restore (as
/// kube-proxy does); returns the time taken in ms.
pub fn load_iptables(ns: &Netns, svcs: &[SvcPort]) -> anyhow::Result<f64> {
    restore_in(ns, &["iptables-restore"], &iptables_rules(svcs))
}

/// Loads kube-proxy's nftables layout into `ns` in transactions of
/// `per_tx` Services; returns the total time in ms.
pub fn load_nft(ns: &Netns, svcs: &[SvcPort], per_tx: usize) -> anyhow::Result<f64> {
    nft_transactions(svcs, per_tx)
        .iter()
        .map(|tx| restore_in(ns, &["nft", "-f", "-"], tx))
        .sum()
}

/// Time of `nft -f` of the whole layout of `services` filler Services as
/// one transaction, in a namespace of its own.
pub fn single_transaction(n: u32) -> anyhow::Result<f64> {
    let ns = Netns::new(&unique("bench-nft"))?;
    restore_in(
        &ns,
        &["nft", "-f", "-"],
        &nft_single_transaction(&services(n, None)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_have_kube_proxys_shape() {
        let h = hash32("bench/svc-1:httptcp", 16);
        assert_eq!(h.len(), 16);
        assert!(
            h.bytes()
                .all(|b| b.is_ascii_uppercase() || (b'2'..=b'7').contains(&b))
        );
        assert_ne!(h, hash32("bench/svc-2:httptcp", 16));
    }
}
