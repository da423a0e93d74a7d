//! Packets near valid ones for the fuzz world: openings towards every
//! frontend, packets of flows the model knows (both directions, and their
//! translated tuples opened afresh), replies to nobody, ICMP errors quoting
//! translated flows, fragments, and damage (truncation, bad header lengths,
//! options, every TCP flag, bad data offsets, UDP length mismatches, other
//! ethertypes).
use std::net::Ipv4Addr;

use super::{NODE, NODE2, REMOTE_1};
use crate::{
    oracle::{Model, Tuple},
    packet::{self, Builder},
    rng::Rng,
};

fn s(a: [u8; 4]) -> String {
    Ipv4Addr::from(a).to_string()
}

fn on_tuple(t: &Tuple, flags: u8) -> Builder {
    let (src, dst) = (s(t.saddr), s(t.daddr));
    if t.proto == packet::TCP {
        Builder::tcp(&src, t.sport, &dst, t.dport, flags)
    } else {
        Builder::udp(&src, t.sport, &dst, t.dport)
    }
}

fn flags(r: &mut Rng, usual: u8) -> u8 {
    if r.chance(75) {
        usual
    } else {
        r.below(256) as u8
    }
}

/// A packet from one of `clients` towards a frontend (or near one).
fn opening(r: &mut Rng, m: &Model, clients: &[&str]) -> Builder {
    let client = *r.pick(clients);
    let cport = 40000 + r.below(64) as u16;
    let f = r.pick(&m.world.frontends);
    let daddr = if f.is_node_port() {
        // Mostly the node's addresses; sometimes one that is not.
        *r.pick(&[NODE, NODE2, NODE, NODE2, REMOTE_1])
    } else {
        return on_tuple(
            &Tuple {
                saddr: super::a(client),
                daddr: f.addr,
                sport: cport,
                dport: f.port,
                proto: f.proto,
            },
            flags(r, packet::SYN),
        );
    };
    let t = Tuple {
        saddr: super::a(client),
        daddr: super::a(daddr),
        sport: cport,
        dport: f.port,
        proto: f.proto,
    };
    on_tuple(&t, flags(r, packet::SYN))
}

/// An ICMP error about a packet of a known flow, as it travelled after
/// translation: from a router on the way, or from its destination itself.
fn icmp_error(r: &mut Rng, m: &Model) -> Option<Vec<u8>> {
    let (key, to) = m.known_flow(|n| r.below(n as u64) as usize)?;
    let quoted = if r.chance(80) { to } else { key };
    let inner = on_tuple(&quoted, packet::ACK).build();
    let from = if r.chance(50) {
        "10.0.0.254".to_string()
    } else {
        s(quoted.daddr)
    };
    let kind = *r.pick(&[3u8, 11, 12, 0, 8]);
    Some(packet::icmp_error(&from, &s(quoted.saddr), kind, 4, &inner))
}

/// One generated packet.
pub fn packet(r: &mut Rng, m: &Model, clients: &[&str]) -> Vec<u8> {
    let mut b = match r.below(10) {
        0..=3 => opening(r, m, clients),
        4..=6 => match m.known_flow(|n| r.below(n as u64) as usize) {
            // A flow's tuple as translated, opened afresh: for a request,
            // its client reaching the backend directly from the same port.
            Some((_, to)) if r.chance(10) => on_tuple(&to, flags(r, packet::SYN)),
            Some((key, _)) => on_tuple(&key, flags(r, packet::ACK)),
            None => opening(r, m, clients),
        },
        7 => {
            // From a backend (the node's own too) to a client or the node,
            // on no known flow.
            let (src, sport) = *r.pick(&[
                ("10.244.0.11", 8080),
                (REMOTE_1, 8080),
                ("10.244.3.12", 8080),
                (NODE, 8443),
            ]);
            let dst = *r.pick(&[clients[0], NODE]);
            let port = if r.chance(50) {
                1024 + r.below(29000) as u16
            } else {
                40000 + r.below(64) as u16
            };
            Builder::tcp(src, sport, dst, port, flags(r, packet::SYN | packet::ACK))
        }
        8 => {
            if let Some(mut p) = icmp_error(r, m) {
                mutate(r, &mut p);
                return p;
            }
            opening(r, m, clients)
        }
        _ => {
            let mut b = match m.known_flow(|n| r.below(n as u64) as usize) {
                Some((key, _)) if r.chance(50) => on_tuple(&key, packet::ACK),
                _ => opening(r, m, clients),
            };
            b.frag = if r.chance(50) {
                0x2000
            } else {
                1 + r.below(0x1fff) as u16
            };
            b
        }
    };
    b.payload = (0..r.below(64)).map(|_| r.next_u64() as u8).collect();
    b.udp_zero_csum = r.chance(15);
    if r.chance(10) {
        b.ip_options = 4 * r.below(11) as usize;
    }
    b.seq = r.next_u64() as u32;
    let mut pkt = b.build();
    // Fragments of one datagram share an id; a few ids only, so later
    // fragments meet first ones.
    if b.frag != 0 {
        pkt[18] = 0;
        pkt[19] = r.below(4) as u8;
        fix_ip_checksum(&mut pkt);
    }
    if r.chance(5) {
        pkt[22] = 1; // A TTL XDP leaves to tc.
        fix_ip_checksum(&mut pkt);
    }
    mutate(r, &mut pkt);
    pkt
}

fn fix_ip_checksum(pkt: &mut [u8]) {
    if pkt.len() < 34 {
        return;
    }
    let ihl = ((pkt[14] & 0x0f) as usize) * 4;
    if pkt.len() >= 14 + ihl && ihl >= 20 {
        pkt[24] = 0;
        pkt[25] = 0;
        let c = packet::checksum(&pkt[14..14 + ihl]);
        pkt[24..26].copy_from_slice(&c.to_be_bytes());
    }
}

fn mutate(r: &mut Rng, pkt: &mut Vec<u8>) {
    if !r.chance(30) {
        return;
    }
    match r.below(9) {
        0 => pkt.truncate(r.below(pkt.len() as u64 + 1) as usize),
        1 => pkt[14] = 0x40 | r.below(16) as u8,
        2 => {
            let v = r.below(1600) as u16;
            pkt[16..18].copy_from_slice(&v.to_be_bytes());
        }
        3 => pkt[22] = r.below(2) as u8, // TTL 0 or 1
        4 if !pkt.is_empty() => {
            let i = r.below(pkt.len() as u64) as usize;
            pkt[i] ^= 1 << r.below(8);
        }
        5 => {
            // TCP data offset out of range (if TCP with a plain header).
            if pkt.len() > 46 && pkt[23] == 6 {
                pkt[46] = (r.below(16) as u8) << 4;
            }
        }
        6 => {
            // UDP length that disagrees with the IP length.
            if pkt.len() > 40 && pkt[23] == 17 {
                let v = r.below(2000) as u16;
                pkt[38..40].copy_from_slice(&v.to_be_bytes());
            }
        }
        7 => {
            // A VLAN tag or another ethertype.
            const OTHER: [[u8; 2]; 3] = [[0x81, 0x00], [0x86, 0xdd], [0x08, 0x06]];
            let t = *r.pick(&OTHER);
            pkt[12..14].copy_from_slice(&t);
        }
        _ => {
            pkt[20] = r.below(256) as u8;
            pkt[21] = r.below(256) as u8;
        }
    }
    if r.chance(50) {
        fix_ip_checksum(pkt);
    }
}
