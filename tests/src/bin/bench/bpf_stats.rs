//! The kernel's own accounting of BPF program time (BPF_ENABLE_STATS):
//! while enabled, every run of every program adds its run time and one run
//! to the program's info (run_time_ns, run_cnt). Read before and after a
//! stretch of real traffic, the difference is the per-packet program time
//! under that traffic, without the syscall and setup that a
//! BPF_PROG_TEST_RUN duration carries.
use std::{collections::BTreeMap, fmt::Write as _, os::fd::OwnedFd, path::Path};

use aya::{
    programs::{ProgramInfo, links::FdLink, links::PinnedLink, loaded_programs},
    sys::{Stats, enable_stats},
};

/// Statistics stay enabled for as long as this lives (the kernel counts
/// only while some descriptor from BPF_ENABLE_STATS is open).
pub struct Enabled(#[allow(dead_code)] OwnedFd);

pub fn enable() -> anyhow::Result<Enabled> {
    Ok(Enabled(enable_stats(Stats::RunTime).map_err(|e| {
        anyhow::anyhow!("BPF_ENABLE_STATS(BPF_STATS_RUN_TIME): {e}")
    })?))
}

/// One program's counters at one moment.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    pub name: String,
    pub runs: u64,
    pub run_ns: u64,
}

/// Counters of the programs `ids`, by id; a program gone since is left out.
pub fn sample(ids: &[u32]) -> BTreeMap<u32, Sample> {
    loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| ids.contains(&p.id()))
        .map(|p| (p.id(), of(&p)))
        .collect()
}

pub fn of(p: &ProgramInfo) -> Sample {
    Sample {
        name: p.name_as_str().unwrap_or("?").to_string(),
        runs: p.run_count(),
        run_ns: p.run_time().as_nanos() as u64,
    }
}

/// What ran between two samples, added to `into` (by program name: one
/// program attached to many interfaces is one row).
pub fn accumulate(
    into: &mut BTreeMap<String, Sample>,
    before: &BTreeMap<u32, Sample>,
    after: &BTreeMap<u32, Sample>,
) {
    for (id, a) in after {
        let Some(b) = before.get(id) else { continue };
        let e = into.entry(a.name.clone()).or_insert_with(|| Sample {
            name: a.name.clone(),
            ..Default::default()
        });
        e.runs += a.runs.saturating_sub(b.runs);
        e.run_ns += a.run_ns.saturating_sub(b.run_ns);
    }
}

/// The programs attached through the links pinned under `pin_dir` (an
/// agent's: tc, XDP and socket hooks), each once.
pub fn attached_programs(pin_dir: &Path) -> Vec<u32> {
    let mut ids = vec![];
    let mut dirs = vec![pin_dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            // Maps are pinned here too: only links answer with link info.
            let Ok(pinned) = PinnedLink::from_pin(&path) else {
                continue;
            };
            // Dropping the descriptor leaves the link attached (the pin holds it).
            if let Ok(info) = FdLink::from(pinned).info() {
                ids.push(info.program_id());
            }
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// A program's row: name, runs, mean ns per run.
pub type Row = (String, u64, f64);

/// One path's programs that ran.
pub fn rows(stats: &BTreeMap<String, Sample>) -> Vec<Row> {
    stats
        .values()
        .filter(|s| s.runs > 0)
        .map(|s| (s.name.clone(), s.runs, s.run_ns as f64 / s.runs as f64))
        .collect()
}

/// The table of the programs' own time during the end-to-end runs, one row
/// per path and program that ran.
pub fn report(md: &mut String, paths: &[(String, u32, Vec<Row>)]) {
    let _ = writeln!(
        md,
        "### Program time under the end-to-end traffic (kernel.bpf_stats_enabled)\n\n\
         BPF_ENABLE_STATS was on during one more round of the same loads after the rounds above (whose rates it \
         would have lowered: it costs two clock reads per program run, which a node does not pay and the no-Service \
         baselines, running no program, would not either; that round's rates are not counted): the kernel added each \
         run of each attached program to its run_time_ns and run_cnt, read before and after every load on a path. \
         ns/run is the program's own time per packet (per connect() or sendmsg() for the socket hooks), under the real \
         traffic, with no syscall in it.\n\n\
         | path | Services | program | runs | ns/run |\n|---|---:|---|---:|---:|"
    );
    for (path, services, progs) in paths {
        for (name, runs, ns) in progs {
            let _ = writeln!(md, "| {path} | {services} | {name} | {runs} | {ns:.0} |");
        }
    }
    let _ = writeln!(md);
}
