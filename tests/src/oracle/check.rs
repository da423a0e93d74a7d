//! Whether a program's output meets an expectation: verdict, the fields it
//! must rewrite, checksums as valid as they came, and nothing else moved.
use super::{Expect, addr, be16};
use crate::{
    bpf::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT},
    packet::checksum,
};

fn l4_checksum_ok(pkt: &[u8]) -> Option<bool> {
    let ip = &pkt[14..];
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    let tot = be16(ip, 2) as usize;
    let l4 = &ip[ihl..tot];
    let proto = ip[9];
    if proto == 17 && be16(l4, 6) == 0 {
        return None;
    }
    let mut pseudo = Vec::with_capacity(12 + l4.len());
    pseudo.extend_from_slice(&ip[12..20]);
    pseudo.extend_from_slice(&[0, proto]);
    pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(l4);
    Some(checksum(&pseudo) == 0)
}

fn ip_checksum_ok(pkt: &[u8]) -> bool {
    let ihl = ((pkt[14] & 0x0f) as usize) * 4;
    checksum(&pkt[14..14 + ihl]) == 0
}

/// Compares what the program did with what the model expects. `None`: they agree.
pub fn check(input: &[u8], verdict: u32, out: &[u8], expect: &Expect) -> Option<String> {
    match expect {
        Expect::ToNextHop(inner) => check_sent(input, verdict, out, inner, TC_ACT_REDIRECT),
        _ => check_sent(input, verdict, out, expect, TC_ACT_OK),
    }
}

/// As `check`, with `sent`: the verdict of a packet sent on.
fn check_sent(
    input: &[u8],
    verdict: u32,
    out: &[u8],
    expect: &Expect,
    sent: u32,
) -> Option<String> {
    let mismatch = |what: &str| Some(format!("{what}: expected {expect:?}, verdict {verdict}"));
    match expect {
        Expect::ToNextHop(_) => return mismatch("sent to the next hop twice"),
        Expect::Unchanged => {
            if verdict != TC_ACT_OK || out != input {
                return mismatch("changed a packet it must pass untouched");
            }
        }
        Expect::Drop => {
            if verdict != TC_ACT_SHOT {
                return mismatch("did not drop");
            }
        }
        Expect::Rewritten { to, l4 } => {
            if verdict != sent || out.len() != input.len() {
                return mismatch("verdict or length");
            }
            let ihl = ((input[14] & 0x0f) as usize) * 4;
            let l4o = 14 + ihl;
            if addr(out, 26) != to.saddr || addr(out, 30) != to.daddr {
                return mismatch("addresses");
            }
            if *l4 && (be16(out, l4o) != to.sport || be16(out, l4o + 2) != to.dport) {
                return mismatch("ports");
            }
            if ip_checksum_ok(input) != ip_checksum_ok(out) {
                return mismatch("IP checksum validity changed");
            }
            let frag = be16(input, 20) & 0x2000 != 0;
            if !frag {
                let (a, b) = (l4_checksum_ok(input), l4_checksum_ok(out));
                if a != b {
                    return mismatch(&format!("L4 checksum validity changed {a:?} -> {b:?}"));
                }
            }
            // Nothing else moves.
            let csum_off = l4o + if to.proto == 6 { 16 } else { 6 };
            for (i, (x, y)) in input.iter().zip(out).enumerate() {
                let rewritten = (26..34).contains(&i)
                    || (24..26).contains(&i)
                    || (l4o..l4o + 4).contains(&i)
                    || (csum_off..csum_off + 2).contains(&i);
                if !rewritten && x != y {
                    return mismatch(&format!("byte {i} changed"));
                }
            }
        }
        Expect::AddressesRewritten { saddr, daddr } => {
            if verdict != sent || out.len() != input.len() {
                return mismatch("verdict or length");
            }
            if addr(out, 26) != *saddr || addr(out, 30) != *daddr {
                return mismatch("fragment addresses");
            }
            if ip_checksum_ok(input) != ip_checksum_ok(out) {
                return mismatch("IP checksum validity changed");
            }
            if out[34..] != input[34..] {
                return mismatch("fragment payload changed");
            }
        }
        Expect::Reset { from, seq, ack } => {
            if verdict != TC_ACT_REDIRECT || out.len() != 54 {
                return mismatch("not a 54-byte RST sent back");
            }
            let tcp = &out[34..];
            let ok = addr(out, 26) == from.saddr
                && addr(out, 30) == from.daddr
                && be16(tcp, 0) == from.sport
                && be16(tcp, 2) == from.dport
                && u32::from_be_bytes(tcp[4..8].try_into().unwrap()) == *seq
                && ack.is_none_or(|a| u32::from_be_bytes(tcp[8..12].try_into().unwrap()) == a)
                && tcp[13] & 0x04 != 0
                && ip_checksum_ok(out)
                && l4_checksum_ok(out) == Some(true);
            if !ok {
                return mismatch("RST fields or checksums");
            }
        }
        Expect::PortUnreachable { from, quoted } => {
            if verdict != TC_ACT_REDIRECT || out.len() != 70 {
                return mismatch("not a 70-byte ICMP error sent back");
            }
            let ok = addr(out, 26) == from.saddr
                && addr(out, 30) == from.daddr
                && out[23] == 1
                && out[34] == 3
                && out[35] == 3
                && out[42..70] == quoted[..]
                && ip_checksum_ok(out)
                && checksum(&out[34..70]) == 0;
            if !ok {
                return mismatch("ICMP fields or checksums");
            }
        }
        Expect::IcmpRewritten {
            outer_saddr,
            outer_daddr,
            inner,
        } => {
            if verdict != sent || out.len() != input.len() {
                return mismatch("verdict or length");
            }
            let l4o = 14 + ((input[14] & 0x0f) as usize) * 4;
            let q = l4o + 8;
            let tot = 14 + be16(input, 16) as usize;
            let icmp_ok = |p: &[u8]| checksum(&p[l4o..tot]) == 0;
            let ok = addr(out, 26) == *outer_saddr
                && addr(out, 30) == *outer_daddr
                && addr(out, q + 12) == inner.saddr
                && addr(out, q + 16) == inner.daddr
                && be16(out, q + 20) == inner.sport
                && be16(out, q + 22) == inner.dport
                && ip_checksum_ok(input) == ip_checksum_ok(out)
                && icmp_ok(input) == icmp_ok(out)
                && (checksum(&input[q..q + 20]) == 0) == (checksum(&out[q..q + 20]) == 0);
            if !ok {
                return mismatch("ICMP error rewrite");
            }
        }
    }
    None
}

/// RFC 1624's incremental update of checksum `c` for one 16-bit word.
fn csum_adjust(c: u16, old: u16, new: u16) -> u16 {
    let mut s = (!c) as u32 + (!old) as u32 + new as u32;
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// Whether XDP's output is `expect` forwarded as a router would: to the
/// next hop's MAC from the egress interface's, TTL one less (its checksum
/// updated), and otherwise the translation tc would make.
pub(super) fn check_forwarded(
    input: &[u8],
    verdict: u32,
    out: &[u8],
    expect: &Expect,
    (dmac, smac): ([u8; 6], [u8; 6]),
) -> Option<String> {
    let mismatch = |what: &str| {
        Some(format!(
            "XDP {what}: expected {expect:?} forwarded, verdict {verdict}"
        ))
    };
    if verdict != crate::bpf::XDP_REDIRECT || out.len() != input.len() || out.len() < 34 {
        return mismatch("verdict or length");
    }
    if out[0..6] != dmac || out[6..12] != smac {
        return mismatch("MACs are not the next hop's and the egress interface's");
    }
    if out[22].wrapping_add(1) != input[22] {
        return mismatch("TTL not decremented");
    }
    // Undo the router's part; what is left is tc's translation.
    let mut norm = out.to_vec();
    norm[0..12].copy_from_slice(&input[0..12]);
    norm[22] = input[22];
    let c = csum_adjust(
        be16(out, 24),
        u16::from_be_bytes([out[22], out[23]]),
        u16::from_be_bytes([input[22], input[23]]),
    );
    norm[24..26].copy_from_slice(&c.to_be_bytes());
    if ip_checksum_ok(out) != ip_checksum_ok(input) {
        return mismatch("IP checksum validity changed");
    }
    check(input, TC_ACT_OK, &norm, expect)
}
