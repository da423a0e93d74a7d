//! XDP programs assembled here from raw instructions and loaded with
//! bpf(BPF_PROG_LOAD), no object file involved: the bare `XDP_TX` program
//! that bounds what any XDP program can do on this machine, and the sink that
//! receives the transmitted frames on the far end of the veth.
//!
//! Each is pinned once, opened as an aya `Xdp` (so that the bench runs and
//! attaches it exactly like the dataplane's program) and unpinned at once:
//! the open descriptor keeps it loaded.
use std::{ffi::CString, os::fd::AsRawFd as _, os::unix::ffi::OsStrExt as _, path::Path};

use anyhow::Context as _;
use aya::programs::Xdp;
use aya_obj::programs::XdpAttachType;
use integration_tests::{PinDir, bpf::XDP_DROP, bpf::XDP_TX};

// bpf(2) commands and BPF_PROG_TYPE_XDP (linux/bpf.h).
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_PROG_TYPE_XDP: u32 = 6;

// Opcodes (linux/bpf_common.h, linux/bpf.h): class | size/op | mode/source.
const LDX_MEM_W: u8 = 0x61;
const ST_MEM_W: u8 = 0x62;
const ST_MEM_H: u8 = 0x6a;
const ST_MEM_B: u8 = 0x72;
const ALU64_MOV_K: u8 = 0xb7;
const ALU64_MOV_X: u8 = 0xbf;
const ALU64_ADD_K: u8 = 0x07;
const JMP_JGT_X: u8 = 0x2d;
const JMP_EXIT: u8 = 0x95;

/// struct bpf_insn, packed as the kernel reads it on a little-endian host.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    code as u64
        | ((dst as u64 | (src as u64) << 4) << 8)
        | ((off as u16 as u64) << 16)
        | ((imm as u32 as u64) << 32)
}

/// `r0 = XDP_TX; exit`: what a program costs that decides nothing.
pub fn tx_insns() -> Vec<u64> {
    vec![
        insn(ALU64_MOV_K, 0, 0, 0, XDP_TX as i32),
        insn(JMP_EXIT, 0, 0, 0, 0),
    ]
}

/// Writes `frame` back over the received frame, then drops it.
///
/// In live-frame mode the kernel recycles a transmitted frame's page for a
/// later repetition with its data as the program left it (only the
/// pointers are reset), so a program that rewrites packets would meet its
/// own output next time. The translated frames arrive here before their
/// pages return to the pool: putting the original bytes back makes every
/// repetition the same packet. Every transmitting program pays this sink
/// alike, the bare `XDP_TX` one included.
pub fn restoring_sink_insns(frame: &[u8]) -> Vec<u64> {
    let mut stores = vec![];
    let mut off = 0usize;
    for (width, code) in [(4usize, ST_MEM_W), (2, ST_MEM_H), (1, ST_MEM_B)] {
        while frame.len() - off >= width {
            let mut b = [0u8; 4];
            b[..width].copy_from_slice(&frame[off..off + width]);
            stores.push(insn(code, 2, 0, off as i16, i32::from_le_bytes(b)));
            off += width;
        }
    }
    let mut v = vec![
        // r2 = data, r3 = data_end (struct xdp_md).
        insn(LDX_MEM_W, 2, 1, 0, 0),
        insn(LDX_MEM_W, 3, 1, 4, 0),
        insn(ALU64_MOV_X, 4, 2, 0, 0),
        insn(ALU64_ADD_K, 4, 0, 0, frame.len() as i32),
        // A shorter frame is not one of ours: drop it as it is.
        insn(JMP_JGT_X, 4, 3, stores.len() as i16, 0),
    ];
    v.extend(stores);
    v.extend([
        insn(ALU64_MOV_K, 0, 0, 0, XDP_DROP as i32),
        insn(JMP_EXIT, 0, 0, 0, 0),
    ]);
    v
}

/// The head of union bpf_attr for BPF_PROG_LOAD, up to the fields used.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

#[repr(C)]
#[derive(Default)]
struct ObjPinAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
}

fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<i64> {
    // SAFETY: attr is a live, initialised bpf_attr prefix of its true size;
    // the kernel reads at most that many bytes and zero-extends the rest.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Loads `insns` as an XDP program named `name` and returns it as an aya
/// `Xdp` (pinned in `pins` for the moment it takes to open it).
pub fn load(name: &str, insns: &[u64], pins: &PinDir) -> anyhow::Result<Xdp> {
    let license = CString::new("GPL")?;
    let mut log = vec![0u8; 64 * 1024];
    let mut attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_XDP,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        ..Default::default()
    };
    let n = name.len().min(15);
    attr.prog_name[..n].copy_from_slice(&name.as_bytes()[..n]);
    let fd = sys_bpf(BPF_PROG_LOAD, &mut attr).map_err(|e| {
        let text = String::from_utf8_lossy(&log);
        anyhow::anyhow!(
            "BPF_PROG_LOAD of {name} ({} instructions): {e}; verifier: {}",
            insns.len(),
            text.trim_end_matches('\0').trim()
        )
    })?;
    // SAFETY: BPF_PROG_LOAD returned a new descriptor that nothing else owns.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    std::fs::create_dir_all(&pins.0).with_context(|| format!("creating {}", pins.0.display()))?;
    let path = pins.0.join(name);
    pin(fd.as_raw_fd(), &path)?;
    let prog = Xdp::from_pin(&path, XdpAttachType::Interface)
        .with_context(|| format!("opening the pinned {name} at {}", path.display()));
    // The open descriptor keeps the program loaded once the pin is gone.
    let _ = std::fs::remove_file(&path);
    prog
}

fn pin(fd: i32, path: &Path) -> anyhow::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    let mut attr = ObjPinAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd as u32,
        file_flags: 0,
    };
    sys_bpf(BPF_OBJ_PIN, &mut attr)
        .with_context(|| format!("BPF_OBJ_PIN at {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sink_restores_every_byte_of_an_odd_frame() {
        let frame: Vec<u8> = (1..=55).collect();
        let v = restoring_sink_insns(&frame);
        // 13 words, 1 half-word, 1 byte; the bounds check skips them all.
        assert_eq!(v.len(), 5 + 15 + 2);
        assert_eq!((v[4] >> 16) as i16, 15);
        let last_store = v[5 + 14];
        assert_eq!(last_store as u8, ST_MEM_B);
        assert_eq!((last_store >> 16) as i16, 54);
        assert_eq!((last_store >> 32) as u32, 55);
    }
}
