//! The manifests directory: every `*.yaml` / `*.yml` file in it (not recursive), watched for
//! edits, renames and deletes. A file that does not parse is reported and keeps its last good
//! content, so one bad edit never takes services away.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use notify::{EventKind, RecursiveMode, Watcher, event::AccessKind, event::AccessMode};
use tokio::sync::{mpsc, watch};

use super::manifest::{self, Manifest};
use crate::{catalog::Catalog, resource::fnv1a, status::Registry};

/// How long to wait after an event for more before re-reading: editors write a file in steps.
pub const DEBOUNCE: Duration = Duration::from_millis(100);
/// A full re-read this often even without events, in case the platform drops some (or no
/// watcher could be set up at all). Cheap: unchanged files are recognised by their hash.
pub const RESCAN: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
struct FileState {
    /// Hash of the content last read, good or bad; equal content is not parsed again.
    hash: u64,
    /// The last content that parsed; empty if it never did.
    objects: Arc<[Manifest]>,
}

/// The directory's files and their last good objects.
#[derive(Debug)]
pub struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    registry: Arc<Registry>,
}

impl ManifestDir {
    pub fn new(dir: impl Into<PathBuf>, registry: Arc<Registry>) -> Self {
        ManifestDir {
            dir: dir.into(),
            files: BTreeMap::new(),
            registry,
        }
    }

    /// Re-reads the directory; returns whether any file's objects changed. Errors reading the
    /// directory itself keep everything as it was.
    pub fn scan(&mut self) -> bool {
        let paths = match list(&self.dir) {
            Ok(paths) => paths,
            Err(e) => {
                tracing::error!(dir = %self.dir.display(), error = %e, "cannot list the manifests directory");
                return false;
            }
        };
        let mut changed = false;
        let before = self.files.len();
        self.files.retain(|path, _| paths.contains(path));
        if self.files.len() != before {
            changed = true;
        }
        self.registry
            .retain_source_errors(|file| paths.iter().any(|p| p.display().to_string() == file));
        for path in paths {
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                // Gone between listing and reading: the next event or rescan settles it.
                Err(e) => {
                    tracing::debug!(file = %path.display(), error = %e, "cannot read manifest file");
                    continue;
                }
            };
            let hash = fnv1a(text.as_bytes());
            let state = self.files.entry(path.clone()).or_default();
            if state.hash == hash {
                continue;
            }
            state.hash = hash;
            let file = path.display().to_string();
            // The span puts the file on whatever parsing logs.
            let parsed =
                tracing::info_span!("manifest", file).in_scope(|| manifest::parse_documents(&text));
            match parsed {
                Ok(objects) => {
                    self.registry.clear_source_error(&file);
                    if *state.objects != *objects {
                        state.objects = objects.into();
                        changed = true;
                    }
                }
                Err(e) => {
                    tracing::error!(
                        file,
                        line = e.line,
                        reason = e.reason,
                        "manifest file rejected; serving its last good content"
                    );
                    self.registry.set_source_error(&file, e.line, &e.reason);
                }
            }
        }
        changed
    }

    /// The catalog of every file's last good objects, files in path order.
    pub fn catalog(&self) -> Catalog {
        Catalog::from_manifests(self.files.values().flat_map(|f| f.objects.iter()))
    }

    /// The catalog to publish; what translation cannot use in it goes to the registry (and the
    /// log) first, once per change rather than once per proxy.
    fn publishable(&self) -> Arc<Catalog> {
        let catalog = self.catalog();
        self.registry
            .set_problems(crate::translate::object_diagnostics(&catalog));
        Arc::new(catalog)
    }

    /// Scans now, publishes, then keeps watching until the receivers are gone. The first scan
    /// has been published when this returns `Ok(watch receiver)`.
    pub async fn watch(
        mut self,
    ) -> anyhow::Result<(watch::Receiver<Arc<Catalog>>, tokio::task::JoinHandle<()>)> {
        self.scan();
        let (tx, rx) = watch::channel(self.publishable());
        let (events_tx, mut events) = mpsc::unbounded_channel::<()>();
        let dir = self.dir.clone();
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            match res {
                // Our own reads show up as access events: ignoring them is what keeps a scan
                // from triggering the next one.
                Ok(event) if is_change(&event.kind) => {
                    let _ = events_tx.send(());
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "manifest watcher error"),
            }
        })
        .and_then(|mut w| w.watch(&dir, RecursiveMode::NonRecursive).map(|()| w));
        let (watcher, rescan) = match watcher {
            Ok(w) => (Some(w), RESCAN),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot watch the manifests directory; polling every second");
                (None, Duration::from_secs(1))
            }
        };
        let task = tokio::spawn(async move {
            let _watcher = watcher; // dropping it stops the events
            loop {
                tokio::select! {
                    event = events.recv() => {
                        if event.is_none() {
                            break;
                        }
                        // Debounce: wait until the events stop for DEBOUNCE.
                        while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, events.recv()).await {}
                    }
                    () = tokio::time::sleep(rescan) => {}
                    () = tx.closed() => break,
                }
                tracing::trace!("rescanning manifests");
                if self.scan() {
                    let catalog = self.publishable();
                    tracing::info!(
                        services = catalog.services.len(),
                        slices = catalog.endpoint_slices.len(),
                        gateways = catalog.gateways.len(),
                        routes = catalog.http_routes.len(),
                        "catalog updated"
                    );
                    tx.send_replace(catalog);
                }
            }
        });
        Ok((rx, task))
    }
}

fn is_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

fn list(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let yaml = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        );
        // Editors' temporary and hidden files are not manifests.
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if yaml && !hidden && path.is_file() {
            paths.push(path);
        }
    }
    paths.sort();
    Ok(paths)
}
