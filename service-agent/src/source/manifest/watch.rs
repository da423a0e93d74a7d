//! The manifest directory as a [`Source`]: an inotify watch notes the files
//! written, and a sync reads only those.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use notify::{
    RecommendedWatcher, RecursiveMode, Watcher as _,
    event::{AccessKind, AccessMode, EventKind, ModifyKind},
};
use tokio::sync::mpsc;

use super::ManifestDir;
use crate::{
    model::{ServiceId, Sourced},
    source::{Pending, ServiceObjects, SharedPending, Source},
};

pub struct ManifestSource {
    dir: PathBuf,
    files: ManifestDir,
    /// Kept alive with the source: dropping it stops the events.
    _watcher: RecommendedWatcher,
}

impl ManifestSource {
    /// Watches `dir`; each finished write wakes `changed` and notes the file
    /// in `pending`. Nothing is read until the first refresh.
    pub fn watch(
        dir: &Path,
        changed: mpsc::Sender<()>,
        pending: SharedPending,
    ) -> anyhow::Result<Self> {
        if !dir.is_dir() {
            anyhow::bail!("--manifests {}: not a directory", dir.display());
        }
        let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            match res {
                Ok(event) if !event.need_rescan() => {
                    // A file is read when its writer is done with it (closed
                    // after writing, renamed into place, removed): reading
                    // at the first write could see it truncated and empty.
                    match event.kind {
                        EventKind::Access(AccessKind::Close(AccessMode::Write))
                        | EventKind::Modify(ModifyKind::Name(_))
                        | EventKind::Remove(_) => {}
                        _ => return,
                    }
                    pending.note(|p| p.files.extend(event.paths));
                }
                // A lost queue or a watch error: read everything again.
                Ok(_) | Err(_) => pending.note(|p| p.everything = true),
            }
            let _ = changed.try_send(());
        })
        .context("starting the file watcher")?;
        w.watch(dir, RecursiveMode::NonRecursive)
            .with_context(|| format!("watching {}", dir.display()))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            files: ManifestDir::default(),
            _watcher: w,
        })
    }
}

impl Source for ManifestSource {
    fn refresh(&mut self, pending: &Pending, all: bool) -> Option<BTreeSet<ServiceId>> {
        if all {
            self.files.load_all(&self.dir);
            None
        } else {
            Some(self.files.load_paths(&self.dir, &pending.files).services)
        }
    }

    /// Every file by its hash: a lost or coalesced inotify event is caught
    /// here, and only the Services of files that differ are named.
    fn resync(&mut self, _: &Pending) -> BTreeSet<ServiceId> {
        self.files.load_all(&self.dir).services
    }

    fn ids(&self) -> BTreeSet<ServiceId> {
        self.files.ids().cloned().collect()
    }

    fn objects(&self, id: &ServiceId) -> ServiceObjects {
        self.files.objects(id)
    }

    fn unlabeled_slices(&self) -> Vec<Sourced<EndpointSlice>> {
        self.files.unlabeled_slices()
    }

    fn errors(&self) -> Vec<String> {
        self.files.errors().iter().map(|e| e.to_string()).collect()
    }
}
