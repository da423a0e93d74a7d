//! The manifest directory, indexed by Service.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    sync::Arc,
};

use k8s_openapi::api::{
    core::v1::{Endpoints, Pod, Service},
    discovery::v1::EndpointSlice,
};

use super::parse::{
    MAX_FILE_BYTES, ManifestError, Sink, is_manifest, list_manifest_files, parse_file_into,
};
use crate::{
    model::{
        Cluster, ServiceId, Sourced, is_selectorless, mirror_endpoints, packed::Packed,
        pod_namespace, pod_selector, slices_from_pods,
    },
    source::ServiceObjects,
};

/// One file's objects as the directory keeps them: Services, slices and
/// Endpoints packed (the planner reads them only when they change), each
/// with what the indexes need of it; Pods as read (the selector index
/// looks at their labels at every change, and they are few next to
/// endpoints).
#[derive(Default)]
struct Stored {
    services: Vec<(Packed<Service>, ServiceId, Option<LabelKey>)>,
    slices: Vec<(Packed<EndpointSlice>, Option<ServiceId>)>,
    endpoints: Vec<(Packed<Endpoints>, ServiceId)>,
    pods: Vec<Sourced<Pod>>,
}

impl Sink for Stored {
    fn service(&mut self, s: Sourced<Service>) {
        let id = ServiceId::of(&s.object.metadata);
        let first_term = pod_selector(&s.object).and_then(|(ns, selector)| {
            let (k, v) = selector.iter().next()?;
            Some(label_key(ns, k, v))
        });
        self.services.push((Packed::pack(&s), id, first_term));
    }
    fn endpoint_slice(&mut self, s: Sourced<EndpointSlice>) {
        let id = ServiceId::of_slice(&s.object);
        self.slices.push((Packed::pack(&s), id));
    }
    fn endpoints(&mut self, e: Sourced<Endpoints>) {
        let id = ServiceId::of(&e.object.metadata);
        self.endpoints.push((Packed::pack(&e), id));
    }
    fn pod(&mut self, p: Sourced<Pod>) {
        self.pods.push(p);
    }
    fn append(&mut self, other: Self) {
        self.services.extend(other.services);
        self.slices.extend(other.slices);
        self.endpoints.extend(other.endpoints);
        self.pods.extend(other.pods);
    }
}

/// The manifest directory, read file by file. A file that fails keeps the
/// objects it had the last time it was read (the last good state).
///
/// Indexed by Service, so that a change costs in proportion to what it
/// touches: reading one file again names the Services whose objects it
/// changed, and [`ManifestDir::objects`] gathers one Service's objects
/// (with the endpoints its selector makes of Pods) without a scan.
#[derive(Default)]
pub struct ManifestDir {
    last_good: BTreeMap<PathBuf, Stored>,
    /// What each file looked like when last read, and its error if any: an
    /// unchanged file is not parsed again, so one edit among thousands of
    /// files costs one parse.
    seen: BTreeMap<PathBuf, (FileStamp, Option<ManifestError>)>,
    /// The directory could not be listed at the last full read.
    dir_error: Option<ManifestError>,
    /// Service → files with its Service objects, slices or Endpoints, and
    /// where in each they are: gathering one Service's objects must not scan
    /// a file that holds all 10,000 (`kubectl get -o yaml` output).
    /// (A few files per Service at most: a vector, not a map, whose
    /// empty node alone would be a kilobyte a Service.)
    files_of: BTreeMap<ServiceId, Vec<(Arc<Path>, Held)>>,
    /// (namespace, label, value) → Pods carrying it, by file and position.
    pods: BTreeMap<LabelKey, BTreeSet<(PathBuf, usize)>>,
    /// (namespace, label, value) of the first term of a selector → the
    /// Services whose selector starts with it (counted: a file may repeat one).
    selectors: BTreeMap<LabelKey, Vec<(ServiceId, usize)>>,
    /// Files holding slices that name no Service.
    unlabeled: BTreeSet<PathBuf>,
}

/// A hash of (namespace, label, value). The indexes by label give
/// candidates that are then matched in full, so a collision costs a
/// candidate, never a wrong answer; and a hash takes no allocation.
type LabelKey = u64;

fn label_key(namespace: &str, label: &str, value: &str) -> LabelKey {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::hash::DefaultHasher::new();
    (namespace, label, value).hash(&mut h);
    h.finish()
}

/// Positions of one Service's objects in one file's lists, in document order.
#[derive(Debug, Default)]
struct Held {
    services: Vec<u32>,
    slices: Vec<u32>,
    endpoints: Vec<u32>,
}

/// What reading files again changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Services whose objects (or selected Pods) may differ.
    pub services: BTreeSet<ServiceId>,
    /// The slices without a Service label changed.
    pub unlabeled: bool,
}

/// One file as read: its stamp (none if it vanished meanwhile) and objects.
struct Read {
    stamp: Option<FileStamp>,
    objects: Result<Stored, ManifestError>,
}

/// Size and a hash of the contents. Timestamps would be cheaper but are
/// coarse on many filesystems: two writes within a tick would look alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    hash: u64,
}

fn stamp(path: &Path) -> Option<FileStamp> {
    use std::{hash::Hasher as _, io::Read as _};
    let len = fs::metadata(path).ok()?.len();
    if len > MAX_FILE_BYTES {
        // Refused by parse_file without reading; the size is its stamp.
        return Some(FileStamp { len, hash: 0 });
    }
    // Hashed as it is read: a file of every object is not held whole.
    let mut file = fs::File::open(path).ok()?;
    let mut h = std::hash::DefaultHasher::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut read = 0u64;
    loop {
        let n = file.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        h.write(&buf[..n]);
        read += n as u64;
    }
    Some(FileStamp {
        len: read,
        hash: h.finish(),
    })
}

impl ManifestDir {
    /// Reads the directory; returns the cluster and the errors of this read.
    pub fn load(&mut self, dir: &Path) -> (Cluster, Vec<ManifestError>) {
        self.load_all(dir);
        (self.cluster(), self.errors())
    }

    /// Reads every file of the directory (parsing only those that changed),
    /// and forgets files that are gone: at start and at each resync.
    pub fn load_all(&mut self, dir: &Path) -> Changes {
        let mut changes = Changes::default();
        let files = match list_manifest_files(dir) {
            Ok(f) => {
                self.dir_error = None;
                f
            }
            Err(e) => {
                self.dir_error = Some(ManifestError {
                    file: dir.to_path_buf(),
                    document: None,
                    object: None,
                    field: None,
                    message: format!("cannot read the manifest directory: {e}"),
                });
                // Keep serving what was read before.
                return changes;
            }
        };
        let present: BTreeSet<&PathBuf> = files.iter().collect();
        let gone: Vec<PathBuf> = self
            .seen
            .keys()
            .chain(self.last_good.keys())
            .filter(|p| !present.contains(p))
            .cloned()
            .collect();
        for p in gone {
            self.forget(&p, &mut changes);
        }
        self.read_all(&files, &mut changes);
        changes
    }

    /// Reads the named files again (those file events named): written ones
    /// are parsed, vanished ones forgotten, others in `dir` left alone.
    pub fn load_paths(&mut self, dir: &Path, paths: &BTreeSet<PathBuf>) -> Changes {
        let mut changes = Changes::default();
        for p in paths {
            if p.parent() != Some(dir) || !is_manifest(p) {
                continue;
            }
            if p.is_file() {
                self.read(p, &mut changes);
            } else {
                self.forget(p, &mut changes);
            }
        }
        changes
    }

    /// The errors of the files as last read, in file order.
    pub fn errors(&self) -> Vec<ManifestError> {
        self.dir_error
            .iter()
            .chain(self.seen.values().filter_map(|(_, e)| e.as_ref()))
            .cloned()
            .collect()
    }

    /// Every Service id any file mentions (Services, slices, Endpoints).
    pub fn ids(&self) -> impl Iterator<Item = &ServiceId> {
        self.files_of.keys()
    }

    /// The Service objects of `id` in file and document order, and every
    /// slice the planner should see for it: the files' own, those made of
    /// the Pods its selector picks, and those mirrored from its Endpoints —
    /// the same, in the same order, as `Cluster::all_endpoint_slices` has
    /// for it.
    pub fn objects(&self, id: &ServiceId) -> ServiceObjects {
        let held: Vec<(&Stored, &Held)> = self
            .files_of
            .get(id)
            .into_iter()
            .flatten()
            .filter_map(|(p, h)| Some((self.last_good.get(&**p)?, h)))
            .collect();
        let services: Vec<Sourced<Service>> = held
            .iter()
            .flat_map(|(f, h)| {
                h.services
                    .iter()
                    .filter_map(|i| f.services.get(*i as usize))
            })
            .map(|(s, _, _)| s.unpack())
            .collect();
        let mut slices: Vec<Sourced<EndpointSlice>> = held
            .iter()
            .flat_map(|(f, h)| h.slices.iter().filter_map(|i| f.slices.get(*i as usize)))
            .map(|(s, _)| s.unpack())
            .collect();
        let own_slices = !slices.is_empty();
        for svc in &services {
            let Some((ns, selector)) = pod_selector(&svc.object) else {
                continue;
            };
            let Some((k, v)) = selector.iter().next() else {
                continue;
            };
            let candidates = self
                .pods
                .get(&label_key(ns, k, v))
                .into_iter()
                .flatten()
                .filter_map(|(p, i)| self.last_good.get(p)?.pods.get(*i));
            slices.extend(slices_from_pods(svc, candidates));
        }
        if !own_slices && services.iter().any(|s| is_selectorless(&s.object)) {
            for (f, h) in &held {
                for (ep, _) in h
                    .endpoints
                    .iter()
                    .filter_map(|i| f.endpoints.get(*i as usize))
                {
                    slices.extend(mirror_endpoints(&ep.unpack()));
                }
            }
        }
        (services, slices)
    }

    /// The slices that name no Service, in file order.
    pub fn unlabeled_slices(&self) -> Vec<Sourced<EndpointSlice>> {
        self.unlabeled
            .iter()
            .filter_map(|p| self.last_good.get(p))
            .flat_map(|f| &f.slices)
            .filter(|(_, id)| id.is_none())
            .map(|(s, _)| s.unpack())
            .collect()
    }

    fn read(&mut self, file: &Path, changes: &mut Changes) {
        if let Some(read) = self.parse(file) {
            self.take(file, read, changes);
        }
    }

    /// Reads `files` again, parsing them on every CPU (each file on its
    /// own: files of 20 Services are most of a start from many files), and
    /// takes what they hold in their order, as one read after another would.
    fn read_all(&mut self, files: &[PathBuf], changes: &mut Changes) {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let share = files.len().div_ceil(cpus.min(files.len()).max(1)).max(1);
        let this = &*self;
        let parse = move |part: &[PathBuf]| part.iter().map(|f| this.parse(f)).collect::<Vec<_>>();
        // The first share on this thread: a single file (a `kubectl get -o
        // yaml` dump) starts no thread, and what this thread allocates it
        // reuses for the plan (another thread's allocator arena would hold
        // its freed memory apart).
        let reads: Vec<Option<Read>> = std::thread::scope(|scope| {
            let mut parts = files.chunks(share);
            let first = parts.next().unwrap_or_default();
            let others: Vec<_> = parts.map(|part| scope.spawn(move || parse(part))).collect();
            let mut reads = parse(first);
            for h in others {
                reads.extend(h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
            }
            reads
        });
        for (file, read) in files.iter().zip(reads) {
            if let Some(read) = read {
                self.take(file, read, changes);
            }
        }
    }

    /// `file` parsed, unless it is as it was when last read.
    fn parse(&self, file: &Path) -> Option<Read> {
        let now = stamp(file);
        if let (Some(now), Some((before, _))) = (now, self.seen.get(file))
            && now == *before
        {
            return None;
        }
        Some(Read {
            stamp: now,
            objects: parse_file_into::<Stored>(file),
        })
    }

    fn take(&mut self, file: &Path, read: Read, changes: &mut Changes) {
        let error = match read.objects {
            Ok(objects) => {
                self.replace(file, objects, changes);
                None
            }
            Err(e) => Some(e),
        };
        match read.stamp {
            Some(now) => {
                self.seen.insert(file.to_path_buf(), (now, error));
            }
            None => {
                self.seen.remove(file);
            }
        }
    }

    fn forget(&mut self, file: &Path, changes: &mut Changes) {
        self.seen.remove(file);
        if self.last_good.contains_key(file) {
            self.replace(file, Stored::default(), changes);
            self.last_good.remove(file);
        }
    }

    /// Puts `new` in place of what `file` held, keeping the indexes, and
    /// notes the Services whose objects differ.
    fn replace(&mut self, file: &Path, mut new: Stored, changes: &mut Changes) {
        // Kept until the file changes: without the room the reading grew.
        new.services.shrink_to_fit();
        new.slices.shrink_to_fit();
        new.endpoints.shrink_to_fit();
        new.pods.shrink_to_fit();
        let old = self.last_good.remove(file).unwrap_or_default();
        // Objects compared by position: an edit in place touches one
        // Service, an inserted document shifts the origins of those after it.
        fn differing<'a, T: PartialEq>(old: &'a [T], new: &'a [T]) -> impl Iterator<Item = &'a T> {
            let n = old.len().max(new.len());
            (0..n).flat_map(move |i| match (old.get(i), new.get(i)) {
                (Some(a), Some(b)) if a == b => vec![],
                (a, b) => a.into_iter().chain(b).collect(),
            })
        }
        for (_, id, _) in differing(&old.services, &new.services) {
            changes.services.insert(id.clone());
        }
        for (_, id) in differing(&old.slices, &new.slices) {
            match id {
                Some(id) => {
                    changes.services.insert(id.clone());
                }
                None => changes.unlabeled = true,
            }
        }
        for (_, id) in differing(&old.endpoints, &new.endpoints) {
            changes.services.insert(id.clone());
        }
        let moved_pods: Vec<&Sourced<Pod>> = differing(&old.pods, &new.pods).collect();
        // Services selecting a Pod before the change, by the old index...
        self.selecting(moved_pods.iter().copied(), &mut changes.services);
        self.index(file, &old, false);
        self.index(file, &new, true);
        // ...and after it (a Service in the same file may have changed too).
        self.selecting(moved_pods.iter().copied(), &mut changes.services);
        self.last_good.insert(file.to_path_buf(), new);
    }

    /// Services whose selector's first term is one of these Pods' labels: a
    /// superset of those selecting them.
    fn selecting<'a>(
        &self,
        pods: impl Iterator<Item = &'a Sourced<Pod>>,
        out: &mut BTreeSet<ServiceId>,
    ) {
        for pod in pods {
            let ns = pod_namespace(&pod.object);
            for (k, v) in pod.object.metadata.labels.iter().flatten() {
                if let Some(ids) = self.selectors.get(&label_key(ns, k, v)) {
                    out.extend(ids.iter().map(|(id, _)| id.clone()));
                }
            }
        }
    }

    /// Adds (or removes) what `objects` of `file` contribute to the indexes.
    fn index(&mut self, file: &Path, objects: &Stored, add: bool) {
        let mut held: BTreeMap<ServiceId, Held> = BTreeMap::new();
        // Positions fit u32: a file is at most MAX_FILE_BYTES, and an object
        // takes more than a byte.
        let at = |i: usize| i as u32;
        for (i, (_, id, first_term)) in objects.services.iter().enumerate() {
            if let Some(key) = first_term {
                let counts = self.selectors.entry(*key).or_default();
                let at = match counts.iter().position(|(x, _)| x == id) {
                    Some(at) => at,
                    None => {
                        counts.push((id.clone(), 0));
                        counts.len() - 1
                    }
                };
                let n = &mut counts[at].1;
                if add {
                    *n += 1;
                } else {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        counts.swap_remove(at);
                    }
                    if counts.is_empty() {
                        self.selectors.remove(key);
                    }
                }
            }
            held.entry(id.clone()).or_default().services.push(at(i));
        }
        let mut unlabeled = false;
        for (i, (_, id)) in objects.slices.iter().enumerate() {
            match id {
                Some(id) => held.entry(id.clone()).or_default().slices.push(at(i)),
                None => unlabeled = true,
            }
        }
        for (i, (_, id)) in objects.endpoints.iter().enumerate() {
            held.entry(id.clone()).or_default().endpoints.push(at(i));
        }
        let shared: Arc<Path> = file.into();
        for (id, h) in held {
            if add {
                let files = self.files_of.entry(id).or_default();
                // In path order, as a map would keep them: objects() gathers
                // in that order.
                let mut h = h;
                h.services.shrink_to_fit();
                h.slices.shrink_to_fit();
                h.endpoints.shrink_to_fit();
                match files.binary_search_by(|(p, _)| (**p).cmp(file)) {
                    Ok(i) => files[i].1 = h,
                    Err(i) => {
                        // Kept for every Service: a first push would make
                        // room for four.
                        files.reserve_exact(1);
                        files.insert(i, (shared.clone(), h));
                    }
                }
            } else if let Some(files) = self.files_of.get_mut(&id) {
                files.retain(|(p, _)| **p != *file);
                if files.is_empty() {
                    self.files_of.remove(&id);
                }
            }
        }
        if add && unlabeled {
            self.unlabeled.insert(file.to_path_buf());
        } else if !add {
            self.unlabeled.remove(file);
        }
        for (i, pod) in objects.pods.iter().enumerate() {
            let ns = pod_namespace(&pod.object);
            for (k, v) in pod.object.metadata.labels.iter().flatten() {
                let key = label_key(ns, k, v);
                let at = (file.to_path_buf(), i);
                if add {
                    self.pods.entry(key).or_default().insert(at);
                } else if let Some(set) = self.pods.get_mut(&key) {
                    set.remove(&at);
                    if set.is_empty() {
                        self.pods.remove(&key);
                    }
                }
            }
        }
    }

    /// Everything, as one cluster (for the full compile).
    pub fn cluster(&self) -> Cluster {
        let mut c = Cluster::default();
        for objs in self.last_good.values() {
            c.services
                .extend(objs.services.iter().map(|(s, _, _)| s.unpack()));
            c.endpoint_slices
                .extend(objs.slices.iter().map(|(s, _)| s.unpack()));
            c.endpoints
                .extend(objs.endpoints.iter().map(|(e, _)| e.unpack()));
            c.pods.extend(objs.pods.iter().cloned());
        }
        c
    }
}
