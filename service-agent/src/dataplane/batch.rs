//! Writing many entries of one map in one `bpf()` call
//! (`BPF_MAP_UPDATE_BATCH`). A start at 10,000 Services × 10 endpoints
//! writes about 210,000 entries; a call each was a fifth of the first sync.
use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::{
    Pod,
    maps::{HashMap, IterableMap as _, MapData, MapError},
    sys::SyscallError,
};

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// The `batch` member of the kernel's `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Creates or replaces `keys[i] → values[i]`, in order. On an error, how
/// many were written before it (the kernel stops at the first that fails).
/// A kernel or map type without batches gets one call an entry.
pub fn update<K: Pod, V: Pod>(
    map: &mut HashMap<MapData, K, V>,
    keys: &[K],
    values: &[V],
) -> Result<(), (usize, MapError)> {
    assert_eq!(keys.len(), values.len(), "a value for every key");
    if keys.is_empty() {
        return Ok(());
    }
    let mut attr = BatchAttr {
        // The kernel reads key_size (value_size) bytes an entry: K and V
        // are the map's own types (aya checked their sizes when it opened
        // the map), laid out without gaps between elements.
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: keys.len() as u32,
        map_fd: map.map().fd().as_fd().as_raw_fd() as u32,
        ..Default::default()
    };
    match super::links::sys_bpf(BPF_MAP_UPDATE_BATCH, &mut attr) {
        Ok(_) => Ok(()),
        // Not offered for this map (or kernel): nothing was written.
        Err(e) if attr.count == 0 && unsupported(&e) => one_by_one(map, keys, values),
        Err(io_error) => Err((
            attr.count as usize,
            MapError::SyscallError(SyscallError {
                call: "bpf_map_update_batch",
                io_error,
            }),
        )),
    }
}

fn unsupported(e: &std::io::Error) -> bool {
    // ENOTSUPP (524) is the kernel's own, not in libc.
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | 524)
    )
}

fn one_by_one<K: Pod, V: Pod>(
    map: &mut HashMap<MapData, K, V>,
    keys: &[K],
    values: &[V],
) -> Result<(), (usize, MapError)> {
    for (i, (k, v)) in keys.iter().zip(values).enumerate() {
        map.insert(k, v, 0).map_err(|e| (i, e))?;
    }
    Ok(())
}
