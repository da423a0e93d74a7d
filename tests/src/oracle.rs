//! A reference model of the tc programs, written from the specification
//! (the README's failure behaviour and Kubernetes semantics), not from the
//! BPF code: for a fixed set of frontends it predicts the verdict and the
//! bytes of every packet, keeping its own conntrack and fragment tables.
use std::collections::HashMap;

use crate::{
    bpf::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT},
    packet::checksum,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tuple {
    pub saddr: [u8; 4],
    pub daddr: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

/// A frontend of the model world: address, port, protocol, and its single
/// backend (None: no endpoints, so it rejects).
#[derive(Clone, Copy, Debug)]
pub struct Frontend {
    pub addr: [u8; 4],
    pub port: u16,
    pub proto: u8,
    pub backend: Option<([u8; 4], u16)>,
}

/// What the program must do with one packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Passed on byte for byte.
    Unchanged,
    /// Dropped.
    Drop,
    /// Passed with addresses and ports rewritten (and checksums updated).
    Rewritten { to: Tuple, l4: bool },
    /// Only the IP addresses rewritten (a later fragment).
    AddressesRewritten { saddr: [u8; 4], daddr: [u8; 4] },
    /// Answered with a TCP RST to `to` (acknowledging `ack`, or with `seq`).
    Reset {
        from: Tuple,
        seq: u32,
        ack: Option<u32>,
    },
    /// Answered with ICMP port unreachable quoting the first 28 IP bytes.
    PortUnreachable { from: Tuple, quoted: Vec<u8> },
    /// An ICMP error rewritten: outer destination and quoted tuple.
    IcmpRewritten {
        outer_saddr: [u8; 4],
        outer_daddr: [u8; 4],
        inner: Tuple,
    },
}

type FragId = ([u8; 4], [u8; 4], u16, u8);

#[derive(Default)]
pub struct Model {
    pub frontends: Vec<Frontend>,
    ct: HashMap<Tuple, Tuple>,
    /// (source, destination, IP id, protocol) → rewritten (source, destination).
    frags: HashMap<FragId, ([u8; 4], [u8; 4])>,
}

fn be16(b: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([b[off], b[off + 1]])
}

fn addr(b: &[u8], off: usize) -> [u8; 4] {
    [b[off], b[off + 1], b[off + 2], b[off + 3]]
}

impl Model {
    pub fn new(frontends: Vec<Frontend>) -> Self {
        Self {
            frontends,
            ..Default::default()
        }
    }

    /// Predicts what the program does with `pkt` (an Ethernet frame) and
    /// updates the model's state as the program would.
    pub fn step(&mut self, pkt: &[u8]) -> Expect {
        if pkt.len() < 14 || pkt[12..14] != [0x08, 0x00] {
            return Expect::Unchanged;
        }
        if pkt.len() < 34 || pkt[14] >> 4 != 4 {
            return Expect::Unchanged;
        }
        let ip = &pkt[14..];
        let ihl = ((ip[0] & 0x0f) as usize) * 4;
        let tot = be16(ip, 2) as usize;
        if ihl < 20 || tot < ihl || 14 + tot > pkt.len() {
            return Expect::Unchanged;
        }
        let proto = ip[9];
        if proto != 1 && proto != 6 && proto != 17 {
            return Expect::Unchanged;
        }
        let (saddr, daddr) = (addr(ip, 12), addr(ip, 16));
        let frag = be16(ip, 6);
        let id = be16(ip, 4);
        if frag & 0x1fff != 0 {
            if proto == 1 {
                return Expect::Unchanged;
            }
            return match self.frags.get(&(saddr, daddr, id, proto)) {
                Some((s, d)) => Expect::AddressesRewritten {
                    saddr: *s,
                    daddr: *d,
                },
                None => Expect::Unchanged,
            };
        }
        let first_fragment = frag & 0x2000 != 0;
        let l4 = 14 + ihl;
        if proto == 1 {
            return self.icmp(&pkt[..14 + tot], l4);
        }
        let l4_min = if proto == 6 { 20 } else { 8 };
        if tot < ihl + l4_min {
            return Expect::Unchanged;
        }
        let t = Tuple {
            saddr,
            daddr,
            sport: be16(pkt, l4),
            dport: be16(pkt, l4 + 2),
            proto,
        };
        let flags = if proto == 6 { pkt[l4 + 13] } else { 0 };
        if let Some(to) = self.ct.get(&t).copied() {
            if first_fragment {
                self.frags
                    .insert((saddr, daddr, id, proto), (to.saddr, to.daddr));
            }
            return Expect::Rewritten { to, l4: true };
        }
        let Some(fe) = self
            .frontends
            .iter()
            .find(|f| f.addr == daddr && f.port == t.dport && f.proto == proto)
            .copied()
        else {
            return Expect::Unchanged;
        };
        // Only a SYN opens a TCP flow: not with ACK, FIN or RST beside it.
        if proto == 6 && flags & 0x17 != 0x02 {
            return Expect::Drop;
        }
        let Some((baddr, bport)) = fe.backend else {
            return self.reject(pkt, l4, ihl, tot, t, flags);
        };
        let hairpin = baddr == saddr;
        let to = Tuple {
            saddr: if hairpin { daddr } else { saddr },
            sport: t.sport,
            daddr: baddr,
            dport: bport,
            proto,
        };
        let reply_key = Tuple {
            saddr: to.daddr,
            daddr: to.saddr,
            sport: to.dport,
            dport: to.sport,
            proto,
        };
        let reply_to = Tuple {
            saddr: t.daddr,
            daddr: t.saddr,
            sport: t.dport,
            dport: t.sport,
            proto,
        };
        self.ct.insert(reply_key, reply_to);
        self.ct.insert(t, to);
        if first_fragment {
            self.frags
                .insert((saddr, daddr, id, proto), (to.saddr, to.daddr));
        }
        Expect::Rewritten { to, l4: true }
    }

    fn reject(&self, pkt: &[u8], l4: usize, ihl: usize, tot: usize, t: Tuple, flags: u8) -> Expect {
        let from = Tuple {
            saddr: t.daddr,
            daddr: t.saddr,
            sport: t.dport,
            dport: t.sport,
            proto: t.proto,
        };
        if t.proto == 6 {
            // A segment carrying RST is never answered (RFC 9293 3.10.7.1).
            if flags & 0x04 != 0 {
                return Expect::Drop;
            }
            let seq = u32::from_be_bytes(pkt[l4 + 4..l4 + 8].try_into().unwrap());
            let doff = ((pkt[l4 + 12] >> 4) as usize) * 4;
            let seg = tot.saturating_sub(ihl).saturating_sub(doff) as u32
                + (flags & 0x02 != 0) as u32
                + (flags & 0x01 != 0) as u32;
            // Reached only by a SYN without ACK: the RST acknowledges it.
            return Expect::Reset {
                from,
                seq: 0,
                ack: Some(seq.wrapping_add(seg)),
            };
        }
        if ihl != 20 {
            return Expect::Drop;
        }
        Expect::PortUnreachable {
            from,
            quoted: pkt[14..42].to_vec(),
        }
    }

    /// `pkt` ends where the IP packet ends: bytes past its total length are
    /// not part of the ICMP message.
    fn icmp(&self, pkt: &[u8], l4: usize) -> Expect {
        // Only errors quoting a TCP/UDP packet with a plain header are ours.
        if pkt.len() < l4 + 1 || ![3u8, 11, 12].contains(&pkt[l4]) {
            return Expect::Unchanged;
        }
        let inner = l4 + 8;
        if pkt.len() < inner + 24 || pkt[inner] != 0x45 || ![6u8, 17].contains(&pkt[inner + 9]) {
            return Expect::Unchanged;
        }
        let q = Tuple {
            saddr: addr(pkt, inner + 12),
            daddr: addr(pkt, inner + 16),
            sport: be16(pkt, inner + 20),
            dport: be16(pkt, inner + 22),
            proto: pkt[inner + 9],
        };
        let other = Tuple {
            saddr: q.daddr,
            daddr: q.saddr,
            sport: q.dport,
            dport: q.sport,
            proto: q.proto,
        };
        match self.ct.get(&other) {
            Some(e) => Expect::IcmpRewritten {
                // An error from the backend itself comes from the frontend.
                outer_saddr: if addr(pkt, 26) == q.daddr && q.daddr != e.saddr {
                    e.saddr
                } else {
                    addr(pkt, 26)
                },
                outer_daddr: e.daddr,
                inner: Tuple {
                    saddr: e.daddr,
                    sport: e.dport,
                    daddr: e.saddr,
                    dport: e.sport,
                    proto: q.proto,
                },
            },
            None => Expect::Unchanged,
        }
    }
}

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
    let mismatch = |what: &str| Some(format!("{what}: expected {expect:?}, verdict {verdict}"));
    match expect {
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
            if verdict != TC_ACT_OK || out.len() != input.len() {
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
            if verdict != TC_ACT_OK || out.len() != input.len() {
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
            if verdict != TC_ACT_OK || out.len() != input.len() {
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
