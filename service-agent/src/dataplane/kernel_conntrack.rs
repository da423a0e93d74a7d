//! The kernel's own connection tracking table, read over ctnetlink
//! (`NETLINK_NETFILTER`, `IPCTNL_MSG_CT_GET` with `NLM_F_DUMP`), as
//! `conntrack -L` reads it. The agent needs the flows netfilter translates
//! (kube-proxy's DNAT): their NAT binding lives in the conntrack entry until
//! the connection ends, even after the rules that made it are flushed.
use std::{io, os::fd::AsRawFd as _, time::Duration};

use nix::sys::{
    socket::{
        AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, send,
        setsockopt, socket, sockopt,
    },
    time::TimeVal,
};
use service_common::{IPPROTO_TCP, IPPROTO_UDP};

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_GET: u16 = 1;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_HDRLEN: usize = 16;
const NFGEN_HDRLEN: usize = 4;
const AF_INET: u8 = 2;
/// Attribute types carry NLA_F_NESTED and NLA_F_NET_BYTEORDER in the top bits.
const NLA_TYPE_MASK: u16 = 0x3fff;

const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;

/// How long one read of the table may wait for the kernel.
const RECV_TIMEOUT: Duration = Duration::from_secs(5);

/// One direction of a flow, addresses in packet order, ports in host order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Tuple {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
}

/// A TCP or UDP flow in the kernel's table: the tuple the first packet had,
/// and the tuple replies have (after netfilter's NAT, as the kernel expects them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelFlow {
    pub orig: Tuple,
    pub reply: Tuple,
}

impl KernelFlow {
    /// Netfilter rewrote the destination: replies come from somewhere else
    /// than the original packet was sent to.
    pub fn dst_translated(&self) -> bool {
        (self.reply.src, self.reply.sport) != (self.orig.dst, self.orig.dport)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("ctnetlink: {0}")]
    Io(#[from] io::Error),
    /// The kernel answered the dump with an error (e.g. no nf_conntrack).
    #[error("the kernel refused the conntrack dump: {0}")]
    Refused(io::Error),
    #[error("ctnetlink: malformed answer: {0}")]
    Malformed(&'static str),
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn dump_request() -> Vec<u8> {
    let len = NLMSG_HDRLEN + NFGEN_HDRLEN;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET).to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    m.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it
    // nfgenmsg: family, version NFNETLINK_V0, resource id 0 (big endian).
    m.extend_from_slice(&[AF_INET, 0, 0, 0]);
    m
}

/// The (type, payload) attributes packed in `buf`.
fn attrs(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut off = 0;
    std::iter::from_fn(move || {
        if off + 4 > buf.len() {
            return None;
        }
        let len = u16::from_ne_bytes([buf[off], buf[off + 1]]) as usize;
        let ty = u16::from_ne_bytes([buf[off + 2], buf[off + 3]]) & NLA_TYPE_MASK;
        if len < 4 || off + len > buf.len() {
            return None;
        }
        let payload = &buf[off + 4..off + len];
        off += align4(len);
        Some((ty, payload))
    })
}

fn be16(v: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(v.get(..2)?.try_into().ok()?))
}

fn parse_tuple(buf: &[u8]) -> Option<Tuple> {
    let mut t = Tuple::default();
    let (mut ip, mut ports) = (0, 0);
    for (ty, v) in attrs(buf) {
        match ty {
            CTA_TUPLE_IP => {
                for (ty, v) in attrs(v) {
                    let a: [u8; 4] = v.get(..4)?.try_into().ok()?;
                    match ty {
                        CTA_IP_V4_SRC => t.src = a,
                        CTA_IP_V4_DST => t.dst = a,
                        _ => continue,
                    }
                    ip += 1;
                }
            }
            CTA_TUPLE_PROTO => {
                for (ty, v) in attrs(v) {
                    match ty {
                        CTA_PROTO_NUM => t.proto = *v.first()?,
                        CTA_PROTO_SRC_PORT => t.sport = be16(v)?,
                        CTA_PROTO_DST_PORT => t.dport = be16(v)?,
                        _ => continue,
                    }
                    ports += 1;
                }
            }
            _ => {}
        }
    }
    (ip == 2 && ports == 3).then_some(t)
}

/// A TCP or UDP flow from the attributes of one conntrack message; other
/// protocols (and IPv6, which an AF_INET dump does not send) give None.
fn parse_flow(buf: &[u8]) -> Option<KernelFlow> {
    let (mut orig, mut reply) = (None, None);
    for (ty, v) in attrs(buf) {
        match ty {
            CTA_TUPLE_ORIG => orig = parse_tuple(v),
            CTA_TUPLE_REPLY => reply = parse_tuple(v),
            _ => {}
        }
    }
    let (orig, reply) = (orig?, reply?);
    matches!(orig.proto, IPPROTO_TCP | IPPROTO_UDP).then_some(KernelFlow { orig, reply })
}

/// What one batch of answers held: whether the dump ended.
fn parse_batch(buf: &[u8], on_flow: &mut impl FnMut(KernelFlow)) -> Result<bool, DumpError> {
    let mut off = 0;
    while off + NLMSG_HDRLEN <= buf.len() {
        let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap_or_default()) as usize;
        let kind = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            return Err(DumpError::Malformed("message length"));
        }
        let body = &buf[off + NLMSG_HDRLEN..off + len];
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = i32::from_ne_bytes(
                    body.get(..4)
                        .ok_or(DumpError::Malformed("error message"))?
                        .try_into()
                        .unwrap_or_default(),
                );
                if errno != 0 {
                    return Err(DumpError::Refused(io::Error::from_raw_os_error(-errno)));
                }
            }
            k if k >> 8 == NFNL_SUBSYS_CTNETLINK && body.len() >= NFGEN_HDRLEN => {
                if let Some(flow) = parse_flow(&body[NFGEN_HDRLEN..]) {
                    on_flow(flow);
                }
            }
            _ => {}
        }
        off += align4(len);
    }
    Ok(false)
}

/// Calls `on_flow` for every IPv4 TCP and UDP flow in this network
/// namespace's conntrack table. Flows come one at a time, so a large table
/// is never held in memory at once.
pub fn dump(mut on_flow: impl FnMut(KernelFlow)) -> Result<(), DumpError> {
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    )
    .map_err(io::Error::from)?;
    setsockopt(
        &fd,
        sockopt::ReceiveTimeout,
        &TimeVal::new(RECV_TIMEOUT.as_secs() as _, 0),
    )
    .map_err(io::Error::from)?;
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).map_err(io::Error::from)?;
    send(fd.as_raw_fd(), &dump_request(), MsgFlags::empty()).map_err(io::Error::from)?;
    // The kernel fills each answer up to a page or two; 64 KiB never truncates.
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(io::Error::from(e).into()),
        };
        if n == 0 {
            return Err(DumpError::Malformed("the socket closed mid-dump"));
        }
        if parse_batch(&buf[..n], &mut on_flow)? {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(ty: u16, payload: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&ty.to_ne_bytes());
        a.extend_from_slice(payload);
        a.resize(align4(a.len()), 0);
        a
    }

    fn nested(ty: u16, parts: &[Vec<u8>]) -> Vec<u8> {
        attr(ty | 0x8000, &parts.concat())
    }

    fn tuple(ty: u16, t: Tuple) -> Vec<u8> {
        nested(
            ty,
            &[
                nested(
                    CTA_TUPLE_IP,
                    &[attr(CTA_IP_V4_SRC, &t.src), attr(CTA_IP_V4_DST, &t.dst)],
                ),
                nested(
                    CTA_TUPLE_PROTO,
                    &[
                        attr(CTA_PROTO_NUM, &[t.proto]),
                        attr(CTA_PROTO_SRC_PORT, &t.sport.to_be_bytes()),
                        attr(CTA_PROTO_DST_PORT, &t.dport.to_be_bytes()),
                    ],
                ),
            ],
        )
    }

    fn message(kind: u16, body: &[u8]) -> Vec<u8> {
        let len = NLMSG_HDRLEN + body.len();
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(body);
        m
    }

    fn ct_message(orig: Tuple, reply: Tuple) -> Vec<u8> {
        let mut body = vec![AF_INET, 0, 0, 0];
        body.extend(tuple(CTA_TUPLE_ORIG, orig));
        body.extend(tuple(CTA_TUPLE_REPLY, reply));
        // CTA_STATUS (3), which the parser skips like any attribute it does not need.
        body.extend(attr(3, &0x1bau32.to_be_bytes()));
        message(NFNL_SUBSYS_CTNETLINK << 8, &body)
    }

    const CLIENT: Tuple = Tuple {
        src: [10, 244, 1, 11],
        dst: [10, 96, 0, 10],
        sport: 40000,
        dport: 80,
        proto: IPPROTO_TCP,
    };
    const BACKEND_REPLY: Tuple = Tuple {
        src: [10, 244, 1, 12],
        dst: [10, 244, 1, 11],
        sport: 8080,
        dport: 40000,
        proto: IPPROTO_TCP,
    };

    #[test]
    fn a_batch_of_flows_ends_at_done() {
        let mut batch = ct_message(CLIENT, BACKEND_REPLY);
        let icmp = Tuple { proto: 1, ..CLIENT };
        batch.extend(ct_message(icmp, icmp));
        batch.extend(message(NLMSG_DONE, &0i32.to_ne_bytes()));
        let mut seen = vec![];
        assert!(parse_batch(&batch, &mut |f| seen.push(f)).unwrap());
        assert_eq!(seen.len(), 1, "ICMP is not a flow the dataplane serves");
        assert_eq!(seen[0].orig, CLIENT);
        assert_eq!(seen[0].reply, BACKEND_REPLY);
        assert!(seen[0].dst_translated());
    }

    #[test]
    fn an_untranslated_flow_is_told_apart() {
        let reply = Tuple {
            src: CLIENT.dst,
            dst: CLIENT.src,
            sport: CLIENT.dport,
            dport: CLIENT.sport,
            proto: IPPROTO_TCP,
        };
        let flow = KernelFlow {
            orig: CLIENT,
            reply,
        };
        assert!(!flow.dst_translated());
    }

    #[test]
    fn kernel_errors_and_cut_messages_are_errors() {
        let refused = message(NLMSG_ERROR, &(-libc::EPERM).to_ne_bytes());
        assert!(matches!(
            parse_batch(&refused, &mut |_| {}),
            Err(DumpError::Refused(_))
        ));
        let mut cut = ct_message(CLIENT, BACKEND_REPLY);
        cut.truncate(cut.len() - 8);
        assert!(matches!(
            parse_batch(&cut, &mut |_| {}),
            Err(DumpError::Malformed(_))
        ));
        // A batch without DONE asks for more.
        let more = ct_message(CLIENT, BACKEND_REPLY);
        assert!(!parse_batch(&more, &mut |_| {}).unwrap());
    }

    #[test]
    fn a_tuple_missing_a_port_is_skipped() {
        let mut body = vec![AF_INET, 0, 0, 0];
        body.extend(nested(
            CTA_TUPLE_ORIG,
            &[nested(
                CTA_TUPLE_IP,
                &[
                    attr(CTA_IP_V4_SRC, &CLIENT.src),
                    attr(CTA_IP_V4_DST, &CLIENT.dst),
                ],
            )],
        ));
        body.extend(tuple(CTA_TUPLE_REPLY, BACKEND_REPLY));
        let mut n = 0;
        parse_batch(&message(NFNL_SUBSYS_CTNETLINK << 8, &body), &mut |_| n += 1).unwrap();
        assert_eq!(n, 0);
    }
}
