//! A sync's change set costs in proportion to the cluster, whatever the
//! layout of the manifests: one `kubectl get -o yaml` file (a `List` of
//! every object), the same as separate documents in one file, or many
//! small files.
//!
//! Work is counted, not timed: heap allocations made on this thread while
//! the agent's steps run (read the files, gather each Service's objects,
//! compile, commit). Every step allocates as it goes (ids, objects, plan
//! entries), so a scan per Service over one file's 10,000 objects shows up
//! as n² allocations. The count is deterministic, so the bound can be
//! tight enough to catch a quadratic path at these sizes and loose enough
//! for the constant factors of a linear one.
use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    collections::BTreeSet,
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
};

use service_agent::{
    model::ServiceId,
    plan::{FrontendKey, Incremental},
    source::manifest::ManifestDir,
};

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static COUNT: Cell<u64> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // try_with: the thread's locals may be gone while it exits.
        let _ = COUNTING.try_with(|on| {
            if on.get() {
                let _ = COUNT.try_with(|c| c.set(c.get() + 1));
            }
        });
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Allocations `f` makes on this thread.
fn allocations<T>(f: impl FnOnce() -> T) -> (T, u64) {
    COUNT.with(|c| c.set(0));
    COUNTING.with(|on| on.set(true));
    let out = f();
    COUNTING.with(|on| on.set(false));
    (out, COUNT.with(Cell::get))
}

#[derive(Clone, Copy, Debug)]
enum Layout_ {
    /// `kubectl get svc,endpointslices -A -o yaml`: one List, Services
    /// first, then slices.
    List,
    /// One file of `---`-separated documents.
    Documents,
    /// Files of 20 Services and their slices.
    SmallFiles,
}

fn service(i: u32, generation: u32) -> (String, String) {
    let ns = format!("ns-{}", i % 37);
    let svc = format!(
        "apiVersion: v1\n  kind: Service\n  metadata:\n    name: svc-{i}\n    namespace: {ns}\n    resourceVersion: \"{i}\"\n    labels: {{app: svc-{i}, team: t{}}}\n  spec:\n    clusterIP: 10.{}.{}.{}\n    selector: {{app: svc-{i}}}\n    ports:\n    - {{name: http, port: 80, protocol: TCP, targetPort: 8080}}\n",
        i % 7,
        96 + i / 65536,
        (i / 256) % 256,
        i % 256
    );
    let eps: Vec<String> = (0..3)
        .map(|k| {
            format!(
                "    - addresses: [10.{}.{}.{}]\n      conditions: {{ready: true}}\n      nodeName: node-{k}\n",
                128 + (i * 3 + k + generation) / 65536,
                ((i * 3 + k + generation) / 256) % 256,
                (i * 3 + k + generation) % 256
            )
        })
        .collect();
    let slice = format!(
        "apiVersion: discovery.k8s.io/v1\n  kind: EndpointSlice\n  metadata:\n    name: svc-{i}-abcde\n    namespace: {ns}\n    resourceVersion: \"{}\"\n    labels: {{kubernetes.io/service-name: svc-{i}}}\n  addressType: IPv4\n  ports:\n  - {{name: http, port: 8080, protocol: TCP}}\n  endpoints:\n{}",
        i + 1_000_000 * (generation + 1),
        eps.concat()
    );
    (svc, slice)
}

/// Writes `n` Services in `layout` into `dir`, Service `changed` at
/// generation 1 and the rest at 0; returns the files written.
fn write(dir: &Path, layout: Layout_, n: u32, changed: Option<u32>) -> Vec<PathBuf> {
    let gen_of = |i| u32::from(Some(i) == changed);
    let objects: Vec<(String, String)> = (0..n).map(|i| service(i, gen_of(i))).collect();
    // The documents are written as List items (indented by two); a
    // separate document is the same text without the item marker.
    let doc = |t: &str| t.replace("\n  ", "\n");
    let mut files = vec![];
    match layout {
        Layout_::List => {
            let mut text = String::from("apiVersion: v1\nitems:\n");
            for (s, _) in &objects {
                let _ = write!(text, "- {s}");
            }
            for (_, e) in &objects {
                let _ = write!(text, "- {e}");
            }
            text.push_str("kind: List\nmetadata: {resourceVersion: \"\"}\n");
            files.push(("all.yaml".to_string(), text));
        }
        Layout_::Documents => {
            let mut text = String::new();
            for (s, e) in &objects {
                let _ = write!(text, "{}---\n{}---\n", doc(s), doc(e));
            }
            files.push(("all.yaml".to_string(), text));
        }
        Layout_::SmallFiles => {
            for (chunk, objs) in objects.chunks(20).enumerate() {
                let mut text = String::new();
                for (s, e) in objs {
                    let _ = write!(text, "{}---\n{}---\n", doc(s), doc(e));
                }
                files.push((format!("svc-{chunk:05}.yaml"), text));
            }
        }
    }
    let mut written = vec![];
    for (name, text) in files {
        let path = dir.join(name);
        let tmp = dir.join(".tmp");
        fs::write(&tmp, text).unwrap();
        fs::rename(&tmp, &path).unwrap();
        written.push(path);
    }
    written
}

/// Feeds the planner the Services `ids` names, as the agent's sync does.
fn sync(
    md: &ManifestDir,
    planner: &mut Incremental,
    ids: BTreeSet<ServiceId>,
) -> BTreeSet<FrontendKey> {
    for id in ids {
        let (services, slices) = md.objects(&id);
        planner.set(id, services, slices);
    }
    planner.set_unlabeled(&md.unlabeled_slices());
    planner.commit()
}

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Allocations of the start, of one Service's change and of a resync
/// with nothing changed, at `n` Services.
fn costs(layout: Layout_, n: u32) -> [u64; 3] {
    let dir =
        Dir(std::env::temp_dir().join(format!("svc-linear-{}-{layout:?}-{n}", std::process::id())));
    fs::create_dir_all(&dir.0).unwrap();
    write(&dir.0, layout, n, None);
    let mut md = ManifestDir::default();
    let mut planner = Incremental::default();
    let (changed, start) = allocations(|| {
        md.load_all(&dir.0);
        let ids: BTreeSet<ServiceId> = md.ids().cloned().collect();
        sync(&md, &mut planner, ids)
    });
    assert_eq!(
        changed.len(),
        n as usize,
        "{layout:?} at {n}: every frontend"
    );

    // The files the watch would name: those whose contents changed.
    let chunk = format!("svc-{:05}.yaml", n / 2 / 20);
    let files: BTreeSet<PathBuf> = write(&dir.0, layout, n, Some(n / 2))
        .into_iter()
        .filter(|p| p.ends_with("all.yaml") || p.ends_with(&chunk))
        .collect();
    let (changed, change) = allocations(|| {
        let c = md.load_paths(&dir.0, &files);
        sync(&md, &mut planner, c.services)
    });
    assert_eq!(changed.len(), 1, "{layout:?} at {n}: one frontend changed");

    let (changed, resync) = allocations(|| {
        let c = md.load_all(&dir.0);
        sync(&md, &mut planner, c.services)
    });
    assert!(changed.is_empty(), "{layout:?} at {n}: nothing changed");
    [start, change, resync]
}

#[test]
fn a_sync_costs_in_proportion_to_the_cluster_in_every_layout() {
    const N: u32 = 500;
    const K: u32 = 8;
    for layout in [Layout_::List, Layout_::Documents, Layout_::SmallFiles] {
        let small = costs(layout, N);
        let large = costs(layout, N * K);
        for (what, (s, l)) in ["start", "one change", "resync"]
            .iter()
            .zip(small.iter().zip(large))
        {
            let ratio = l as f64 / (*s).max(1) as f64;
            eprintln!("{layout:?} {what}: {s} → {l} allocations ({ratio:.1}×)");
            // Linear: about K. A quadratic step would give K² = 64.
            assert!(
                ratio < 1.5 * K as f64,
                "{layout:?}, {what}: {s} allocations at {N} Services, {l} at {} ({ratio:.1}×, linear is {K}×)",
                N * K
            );
        }
        // A change to one small file costs what that file holds, at any
        // size of the cluster.
        if let Layout_::SmallFiles = layout {
            let (s, l) = (small[1], large[1]);
            assert!(
                l < 2 * s,
                "one small file changed: {s} allocations at {N} Services, {l} at {}",
                N * K
            );
        }
        // Nothing to do costs nearly nothing.
        let [start, _, resync] = large;
        assert!(
            resync * 100 < start,
            "{layout:?}: a resync with nothing changed made {resync} allocations, the start {start}"
        );
    }
}
