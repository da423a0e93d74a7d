//! Answering a packet for a Service without backends, in place: the packet is
//! turned into a TCP RST or an ICMP port unreachable and sent back out of the
//! interface it came in on, like kube-proxy's REJECT rule.
use aya_ebpf::{
    bindings::{TC_ACT_REDIRECT, TC_ACT_SHOT},
    helpers::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use service_common::{IPPROTO_ICMP, IPPROTO_TCP};

use crate::{
    access::skb_ifindex,
    csum,
    family::V4,
    headers::{ETH_HLEN, IP_HLEN, TCP_ACK, TCP_FIN, TCP_HLEN, TCP_RST, TCP_SYN},
    packet::Flow,
};

pub struct RejectFailed;

/// An IPv4 header from `src` to `dst` with a valid checksum.
#[inline(always)]
fn ipv4_header(src: [u8; 4], dst: [u8; 4], proto: u8, total_len: u16) -> [u8; 20] {
    let len = total_len.to_be_bytes();
    let mut h = [
        0x45, 0, len[0], len[1], 0, 0, 0x40, 0, 64, proto, 0, 0, src[0], src[1], src[2], src[3],
        dst[0], dst[1], dst[2], dst[3],
    ];
    let c = csum::of(&mut h);
    h[10] = c[0];
    h[11] = c[1];
    h
}

#[inline(always)]
pub fn swap_macs(ctx: &TcContext) -> Result<(), RejectFailed> {
    let macs = ctx.load::<[u8; 12]>(0).map_err(|_| RejectFailed)?;
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&macs[6..]);
    swapped[6..].copy_from_slice(&macs[..6]);
    ctx.store(0, &swapped, 0).map_err(|_| RejectFailed)
}

#[inline(always)]
pub fn send_back(ctx: &TcContext) -> i32 {
    let ifindex = skb_ifindex(ctx);
    // SAFETY: a helper call without pointers; the kernel checks the ifindex.
    let ret = unsafe { bpf_redirect(ifindex, 0) };
    if ret == TC_ACT_REDIRECT as i64 {
        TC_ACT_REDIRECT as i32
    } else {
        TC_ACT_SHOT as i32
    }
}

/// Cuts or extends the packet to `len` bytes, the size of the answer.
#[inline(always)]
pub fn resize(ctx: &TcContext, len: usize) -> Result<(), RejectFailed> {
    // SAFETY: the program's own skb; the helper checks the length, and the
    // verifier forgets every packet pointer taken before the call (none are
    // kept: all access goes through load/store).
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, len as u32, 0) } != 0 {
        return Err(RejectFailed);
    }
    Ok(())
}

/// Turns a TCP segment into the RST the peer would have sent (RFC 9293 3.10.7.1).
#[inline(always)]
pub fn tcp_reset(ctx: &TcContext, flow: &Flow<V4>) -> Result<i32, RejectFailed> {
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
        (
            [0u8; 4],
            their_seq.wrapping_add(seg_len).to_be_bytes(),
            TCP_RST | TCP_ACK,
        )
    };

    let total = IP_HLEN + TCP_HLEN;
    resize(ctx, ETH_HLEN + total)?;
    swap_macs(ctx)?;
    let ip = ipv4_header(flow.daddr, flow.saddr, IPPROTO_TCP, total as u16);
    let (sp, dp) = (flow.dport.to_be_bytes(), flow.sport.to_be_bytes());
    // Pseudo-header (12 bytes) then the 20-byte TCP header, summed together.
    let mut seg = [
        flow.daddr[0],
        flow.daddr[1],
        flow.daddr[2],
        flow.daddr[3],
        flow.saddr[0],
        flow.saddr[1],
        flow.saddr[2],
        flow.saddr[3],
        0,
        IPPROTO_TCP,
        0,
        20,
        sp[0],
        sp[1],
        dp[0],
        dp[1],
        seq[0],
        seq[1],
        seq[2],
        seq[3],
        ack[0],
        ack[1],
        ack[2],
        ack[3],
        0x50,
        flags,
        0,
        0,
        0,
        0,
        0,
        0,
    ];
    let c = csum::of(&mut seg);
    seg[28] = c[0];
    seg[29] = c[1];
    let mut tcp = [0u8; TCP_HLEN];
    tcp.copy_from_slice(&seg[12..]);
    ctx.store(ETH_HLEN, &ip, 0).map_err(|_| RejectFailed)?;
    ctx.store(ETH_HLEN + IP_HLEN, &tcp, 0)
        .map_err(|_| RejectFailed)?;
    Ok(send_back(ctx))
}

/// Turns a UDP datagram into ICMP destination unreachable / port unreachable
/// quoting its IP header and first 8 payload bytes (RFC 792, RFC 1122 3.2.2).
#[inline(always)]
pub fn icmp_port_unreachable(ctx: &TcContext, flow: &Flow<V4>) -> Result<i32, RejectFailed> {
    // Quoting a header with options would need a variable-length copy; such
    // packets are dropped and counted instead.
    if flow.l3_len != IP_HLEN {
        return Err(RejectFailed);
    }
    let quoted = ctx.load::<[u8; 28]>(ETH_HLEN).map_err(|_| RejectFailed)?;
    let mut icmp = [0u8; 36];
    icmp[0] = 3; // destination unreachable
    icmp[1] = 3; // port unreachable
    icmp[8..].copy_from_slice(&quoted);
    let c = csum::of(&mut icmp);
    icmp[2] = c[0];
    icmp[3] = c[1];
    let total = IP_HLEN + icmp.len();
    resize(ctx, ETH_HLEN + total)?;
    swap_macs(ctx)?;
    let ip = ipv4_header(flow.daddr, flow.saddr, IPPROTO_ICMP, total as u16);
    ctx.store(ETH_HLEN, &ip, 0).map_err(|_| RejectFailed)?;
    ctx.store(ETH_HLEN + IP_HLEN, &icmp, 0)
        .map_err(|_| RejectFailed)?;
    Ok(send_back(ctx))
}
