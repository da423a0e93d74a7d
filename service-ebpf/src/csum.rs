//! Internet checksum arithmetic (RFC 1071, RFC 1624), in one place for the
//! XDP rewrite, the rejects and the kernel's checksum helpers.
use aya_ebpf::helpers::bpf_csum_diff;

/// Folds a 32-bit one's complement sum into the 16-bit checksum, in the
/// byte order the sum was taken in.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Updates `check` for a 32-bit field changing from `old` to `new`, all in
/// the packet's byte order.
#[inline(always)]
pub fn replace4(check: u16, old: [u8; 4], new: [u8; 4]) -> u16 {
    let (o, n) = (u32::from_ne_bytes(old), u32::from_ne_bytes(new));
    let mut sum = (!check) as u32;
    sum += (!o & 0xffff) + (!o >> 16);
    sum += (n & 0xffff) + (n >> 16);
    fold(sum)
}

/// Updates `check` for a 16-bit field changing from `old` to `new`.
#[inline(always)]
pub fn replace2(check: u16, old: [u8; 2], new: [u8; 2]) -> u16 {
    let mut sum = (!check) as u32;
    sum += (!u16::from_ne_bytes(old)) as u32;
    sum += u16::from_ne_bytes(new) as u32;
    fold(sum)
}

/// The checksum of `buf` (an even number of bytes), ready to store.
#[inline(always)]
pub fn of<const N: usize>(buf: &mut [u8; N]) -> [u8; 2] {
    // SAFETY: bpf_csum_diff reads N bytes from `buf`, a stack buffer the
    // verifier sees is N bytes long; the "from" side is empty (null, 0).
    let sum = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            buf.as_mut_ptr().cast(),
            N as u32,
            0,
        )
    };
    fold(sum as u32).to_ne_bytes()
}

/// An address as the kernel's `l3/l4_csum_replace` helpers take it: its
/// bytes in packet order.
#[inline(always)]
pub fn word(addr: [u8; 4]) -> u64 {
    u32::from_ne_bytes(addr) as u64
}

/// A port as the checksum helpers take it: its bytes in packet order.
#[inline(always)]
pub fn half(port: u16) -> u64 {
    u16::from_ne_bytes(port.to_be_bytes()) as u64
}
