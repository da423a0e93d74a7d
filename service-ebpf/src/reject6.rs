//! Answering an IPv6 packet for a Service without backends, in place, as
//! `reject.rs` does for IPv4: a TCP RST, or an ICMPv6 destination
//! unreachable / port unreachable (RFC 4443 3.1), sent back out of the
//! interface the packet came in on.
use aya_ebpf::programs::TcContext;
use service_common::{IPPROTO_ICMPV6, IPPROTO_TCP};

use crate::{
    csum,
    family::V6,
    headers::{ETH_HLEN, IP6_HLEN, TCP_ACK, TCP_FIN, TCP_HLEN, TCP_RST, TCP_SYN},
    packet::Flow,
    reject::{RejectFailed, resize, send_back, swap_macs},
};

const ICMP6_DEST_UNREACH: u8 = 1;
const ICMP6_PORT_UNREACH: u8 = 4;
/// What the ICMPv6 error quotes: the IPv6 header and the 8 bytes after it.
const QUOTED: usize = IP6_HLEN + 8;

/// An IPv6 header from `src` to `dst` carrying `payload` bytes of `next`.
#[inline(always)]
fn ipv6_header(src: &[u8; 16], dst: &[u8; 16], next: u8, payload: u16) -> [u8; IP6_HLEN] {
    let mut h = [0u8; IP6_HLEN];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&payload.to_be_bytes());
    h[6] = next;
    h[7] = 64;
    h[8..24].copy_from_slice(src);
    h[24..40].copy_from_slice(dst);
    h
}

/// The pseudo-header the upper layer's checksum covers (RFC 8200 8.1),
/// followed by room for the upper-layer message.
#[inline(always)]
fn pseudo_header<const N: usize>(src: &[u8; 16], dst: &[u8; 16], next: u8) -> [u8; N] {
    let mut b = [0u8; N];
    b[0..16].copy_from_slice(src);
    b[16..32].copy_from_slice(dst);
    b[32..36].copy_from_slice(&((N - IP6_HLEN) as u32).to_be_bytes());
    b[39] = next;
    b
}

/// Turns a TCP segment into the RST the peer would have sent (RFC 9293 3.10.7.1).
#[inline(always)]
pub fn tcp_reset(ctx: &TcContext, flow: &Flow<V6>) -> Result<i32, RejectFailed> {
    if flow.tcp_flags & TCP_RST != 0 {
        return Err(RejectFailed);
    }
    let l4 = flow.l4_off();
    let seq_ack = ctx.load::<[u8; 8]>(l4 + 4).map_err(|_| RejectFailed)?;
    let doff = ctx.load::<u8>(l4 + 12).map_err(|_| RejectFailed)?;
    let tcp_hlen = ((doff >> 4) as u32) * 4;
    let seg_len = (flow.ip_len as u32)
        .saturating_sub(flow.l3_len as u32)
        .saturating_sub(tcp_hlen)
        + (flow.tcp_flags & TCP_SYN != 0) as u32
        + (flow.tcp_flags & TCP_FIN != 0) as u32;
    let (seq, ack, flags) = if flow.tcp_flags & TCP_ACK != 0 {
        (
            [seq_ack[4], seq_ack[5], seq_ack[6], seq_ack[7]],
            [0u8; 4],
            TCP_RST,
        )
    } else {
        let their_seq = u32::from_be_bytes([seq_ack[0], seq_ack[1], seq_ack[2], seq_ack[3]]);
        let ack = their_seq.wrapping_add(seg_len).to_be_bytes();
        ([0u8; 4], ack, TCP_RST | TCP_ACK)
    };
    // From the frontend back to the client.
    let (src, dst) = (&flow.daddr, &flow.saddr);
    let mut seg = pseudo_header::<{ IP6_HLEN + TCP_HLEN }>(src, dst, IPPROTO_TCP);
    let t = IP6_HLEN;
    seg[t..t + 2].copy_from_slice(&flow.dport.to_be_bytes());
    seg[t + 2..t + 4].copy_from_slice(&flow.sport.to_be_bytes());
    seg[t + 4..t + 8].copy_from_slice(&seq);
    seg[t + 8..t + 12].copy_from_slice(&ack);
    seg[t + 12] = 0x50;
    seg[t + 13] = flags;
    let c = csum::of(&mut seg);
    seg[t + 16] = c[0];
    seg[t + 17] = c[1];
    let mut tcp = [0u8; TCP_HLEN];
    tcp.copy_from_slice(&seg[t..]);
    let ip = ipv6_header(src, dst, IPPROTO_TCP, TCP_HLEN as u16);
    resize(ctx, ETH_HLEN + IP6_HLEN + TCP_HLEN)?;
    swap_macs(ctx)?;
    ctx.store(ETH_HLEN, &ip, 0).map_err(|_| RejectFailed)?;
    ctx.store(ETH_HLEN + IP6_HLEN, &tcp, 0)
        .map_err(|_| RejectFailed)?;
    Ok(send_back(ctx))
}

/// Turns a UDP datagram into an ICMPv6 port unreachable quoting its IPv6
/// header and the 8 bytes after it.
#[inline(always)]
pub fn port_unreachable(ctx: &TcContext, flow: &Flow<V6>) -> Result<i32, RejectFailed> {
    let quoted = ctx
        .load::<[u8; QUOTED]>(ETH_HLEN)
        .map_err(|_| RejectFailed)?;
    let (src, dst) = (&flow.daddr, &flow.saddr);
    const MSG: usize = 8 + QUOTED;
    let mut buf = pseudo_header::<{ IP6_HLEN + MSG }>(src, dst, IPPROTO_ICMPV6);
    let m = IP6_HLEN;
    buf[m] = ICMP6_DEST_UNREACH;
    buf[m + 1] = ICMP6_PORT_UNREACH;
    buf[m + 8..].copy_from_slice(&quoted);
    let c = csum::of(&mut buf);
    buf[m + 2] = c[0];
    buf[m + 3] = c[1];
    let mut msg = [0u8; MSG];
    msg.copy_from_slice(&buf[m..]);
    let ip = ipv6_header(src, dst, IPPROTO_ICMPV6, MSG as u16);
    resize(ctx, ETH_HLEN + IP6_HLEN + MSG)?;
    swap_macs(ctx)?;
    ctx.store(ETH_HLEN, &ip, 0).map_err(|_| RejectFailed)?;
    ctx.store(ETH_HLEN + IP6_HLEN, &msg, 0)
        .map_err(|_| RejectFailed)?;
    Ok(send_back(ctx))
}
