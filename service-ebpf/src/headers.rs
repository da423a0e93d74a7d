//! Where the fields the dataplane reads and rewrites sit in an Ethernet +
//! IPv4 or IPv6 frame. Shared by the parser, the rewriters and the ICMP code, which
//! import it and not each other.
pub const ETH_HLEN: usize = 14;
pub const ETH_TYPE_OFF: usize = 12;
pub const ETH_P_IP: [u8; 2] = [0x08, 0x00];
/// An IPv4 header without options.
pub const IP_HLEN: usize = 20;
/// Fields within an IPv4 header (the packet's own, or one quoted by ICMP).
pub const IPH_CSUM: usize = 10;
pub const IPH_SRC: usize = 12;
pub const IPH_DST: usize = 16;
pub const IP_CSUM_OFF: usize = ETH_HLEN + IPH_CSUM;
pub const IP_SRC_OFF: usize = ETH_HLEN + IPH_SRC;
pub const IP_DST_OFF: usize = ETH_HLEN + IPH_DST;
/// The fragment offset bits of the IPv4 flags/offset field, and "more fragments".
pub const IP_OFFSET_MASK: u16 = 0x1fff;
pub const IP_MF: u16 = 0x2000;

pub const TCP_HLEN: usize = 20;
pub const UDP_HLEN: usize = 8;
/// The TCP data offset byte, followed by the flags byte.
pub const TCP_DOFF_OFF: usize = 12;
pub const TCP_CSUM_OFF: usize = 16;
pub const UDP_CSUM_OFF: usize = 6;

pub const ICMP_HLEN: usize = 8;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

pub const AF_INET: u8 = 2;

pub const ETH_P_IPV6: [u8; 2] = [0x86, 0xdd];
pub const AF_INET6: u8 = 10;
/// The fixed IPv6 header; extension headers follow it.
pub const IP6_HLEN: usize = 40;
pub const IP6_SRC_OFF: usize = ETH_HLEN + 8;
pub const IP6_DST_OFF: usize = ETH_HLEN + 24;
/// Extension headers the IPv6 parser walks (RFC 8200 4.1).
pub const NEXTHDR_HOP: u8 = 0;
pub const NEXTHDR_ROUTING: u8 = 43;
pub const NEXTHDR_FRAGMENT: u8 = 44;
pub const NEXTHDR_DEST: u8 = 60;
/// The fragment offset bits of the fragment header's offset field, and "more fragments".
pub const IP6_OFFSET_MASK: u16 = 0xfff8;
pub const IP6_MF: u16 = 0x0001;
